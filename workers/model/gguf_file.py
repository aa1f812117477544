"""`GGUFFile`: a GGUF file's metadata, its tensor infos, and each tensor dequantized.

Read from the GGUF format description (versions 2 and 3, little-endian): magic "GGUF", u32
version, u64 tensor count, u64 metadata count; each metadata entry is a string key, a u32
value type and the value; each tensor info is a string name, u32 n_dims, u64 dims (innermost
first), u32 ggml type and a u64 offset into the data section, which starts at the next
multiple of `general.alignment` (32 by default). A string is a u64 byte length and UTF-8.

The header is parsed with `struct` (the gguf package's reader takes 10-30 s on the ~100k
tokenizer strings of a small model; this takes well under one), and a tensor's bytes are read
only when it is dequantized.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.errors import InvalidModelConfig, InvalidTensor
from workers.model.gguf_blocks import FORMATS, BlockFormat, dequantize_rows, type_name

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    """torch order (outermost first): the file's dims reversed."""
    type_id: int
    offset: int
    """Absolute byte offset of the tensor's data in the file."""

    @property
    def format(self) -> str:
        return type_name(self.type_id)


class _Cursor:
    """Reads little-endian GGUF values from a buffer, advancing `pos`."""

    def __init__(self, buffer: mmap.mmap):
        self.buffer = buffer
        self.pos = 0

    def scalar(self, code: str) -> Any:
        (value,) = struct.unpack_from("<" + code, self.buffer, self.pos)
        self.pos += struct.calcsize(code)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        raw = self.buffer[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        return self.scalar(_SCALARS[value_type])

    def array(self) -> list[Any]:
        item_type, count = self.scalar("I"), self.scalar("Q")
        if item_type in _SCALARS:  # numbers in one go, not one struct call each
            dtype = np.dtype("<" + _SCALARS[item_type])
            items = np.frombuffer(self.buffer, dtype, count, self.pos).tolist()
            self.pos += count * dtype.itemsize
            return items
        return [self.value(item_type) for _ in range(count)]


class GGUFFile:
    """`metadata` (key -> value), `tensors` (name -> TensorInfo), `dequantize(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            cursor = _Cursor(mm)
            self._read_header(cursor)
            self.metadata = self._read_metadata(cursor)
            infos = [self._read_tensor_info(cursor) for _ in range(self._num_tensors)]
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors = {
            name: TensorInfo(name, shape, type_id, data_start + offset)
            for name, shape, type_id, offset in infos
        }

    def _read_header(self, cursor: _Cursor) -> None:
        if bytes(cursor.buffer[:4]) != MAGIC:
            raise InvalidModelConfig(str(self.path), "not a GGUF file (no 'GGUF' magic)")
        cursor.pos = 4
        version = cursor.scalar("I")
        if version not in SUPPORTED_VERSIONS:
            raise InvalidModelConfig(
                "GGUF version", f"{version} is not supported (versions 2 and 3, little-endian)"
            )
        self._num_tensors = cursor.scalar("Q")
        self._num_metadata = cursor.scalar("Q")

    def _read_metadata(self, cursor: _Cursor) -> dict[str, Any]:
        metadata = {}
        for _ in range(self._num_metadata):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("I"))
        return metadata

    @staticmethod
    def _read_tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cursor.string()
        dims = [cursor.scalar("Q") for _ in range(cursor.scalar("I"))]
        type_id, offset = cursor.scalar("I"), cursor.scalar("Q")
        return name, tuple(reversed(dims)), type_id, offset

    def require(self, key: str) -> Any:
        """A metadata value that must be present."""
        if key not in self.metadata:
            raise InvalidModelConfig(key, f"missing from the GGUF metadata of {self.path}")
        return self.metadata[key]

    def dequantize(self, name: str) -> torch.Tensor:
        """The tensor `name` as float32 in its torch shape (CPU)."""
        info = self.tensors[name]
        fmt, raw = self.blocks(name)
        values = dequantize_rows(raw, fmt, raw.shape[0], raw.shape[1] * fmt.block_size)
        return values.reshape(info.shape)

    def blocks(self, name: str) -> tuple[BlockFormat, np.ndarray]:
        """The tensor's format and its bytes as uint8 [rows, blocks per row, block_bytes]
        (rows: every dim but the innermost), checked against its shape."""
        info = self.tensors[name]
        fmt = FORMATS.get(info.type_id)
        if fmt is None:
            supported = ", ".join(f.name for f in FORMATS.values())
            raise InvalidTensor(name, info.format, f"one of {supported}", info.format)
        cols = info.shape[-1] if info.shape else 1
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        if cols % fmt.block_size:
            raise InvalidTensor(
                name, fmt.name, f"rows of a multiple of {fmt.block_size} values", f"{cols}"
            )
        num_bytes = rows * cols // fmt.block_size * fmt.block_bytes
        with self.path.open("rb") as f:
            f.seek(info.offset)
            raw = bytearray(f.read(num_bytes))
        if len(raw) != num_bytes:
            raise InvalidTensor(
                name, fmt.name, f"{num_bytes} bytes for shape {list(info.shape)}",
                f"{len(raw)} before the end of the file",
            )
        return fmt, np.frombuffer(raw, np.uint8).reshape(rows, -1, fmt.block_bytes)
