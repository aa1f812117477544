"""GGUF block formats: our dequantization of every supported ggml type equals the gguf
package's (gguf.quants.dequantize), on data its quantizer made and on random blocks; the
file reader's metadata, shapes and tensors equal the gguf package's reader on a written file;
a truncated file names the tensor and the bytes it needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.errors import InvalidTensor
from workers.model.gguf_blocks import FORMATS, dequantize_rows
from workers.model.gguf_file import GGUFFile

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
BY_NAME = {fmt.name: fmt for fmt in FORMATS.values()}
QUANTIZABLE = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
"""The types gguf.quants.quantize implements."""
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
                 "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
"""Byte offsets of each block's float16 scales (random bytes there could be inf or NaN)."""


def ours(raw: np.ndarray, name: str, rows: int, cols: int) -> torch.Tensor:
    return dequantize_rows(raw.flatten(), BY_NAME[name], rows, cols)


def test_every_format_has_ggml_type_id_and_block_sizes():
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"} <= BY_NAME.keys()
    for fmt in FORMATS.values():
        assert Q(fmt.type_id).name == fmt.name
        assert gguf.GGML_QUANT_SIZES[Q(fmt.type_id)] == (fmt.block_size, fmt.block_bytes)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_dequantize_equals_gguf_on_quantized_data(name):
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((8, 512)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    data[0, :7] = [0.0, -0.0, 1e-8, -65000.0, 250.0, 0.5, -0.25]
    quantized = gguf.quants.quantize(data, Q[name])
    expected = gguf.quants.dequantize(quantized, Q[name])
    assert torch.equal(ours(quantized.view(np.uint8), name, 8, 512), torch.from_numpy(expected))


@pytest.mark.parametrize("name", sorted(SCALE_OFFSETS))
def test_dequantize_equals_gguf_on_random_blocks(name):
    fmt, rng = BY_NAME[name], np.random.default_rng(2)
    rows, cols = 4, 1024
    blocks = rng.integers(0, 256, (rows * cols // fmt.block_size, fmt.block_bytes), np.uint8)
    for offset in SCALE_OFFSETS[name]:
        scales = rng.uniform(-0.1, 0.1, len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    raw = blocks.reshape(rows, -1)
    expected = gguf.quants.dequantize(raw, Q[name])
    assert torch.equal(ours(raw, name, rows, cols), torch.from_numpy(expected))


def write_file(path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.count", 7)
    writer.add_array("test.names", ["a", "b c", "\u00e9"])
    writer.add_float32("test.eps", 1e-5)
    for name, (array, qtype) in tensors.items():
        raw = gguf.quants.quantize(array, Q[qtype]) if qtype != "F32" else array
        writer.add_tensor(name, raw, raw_dtype=None if qtype == "F32" else Q[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_file_reader_equals_gguf_reader(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {f"t.{name}": (rng.standard_normal((3, 64)).astype(np.float32), name)
               for name in ["F32", "F16", "Q8_0", "Q4_1"]}
    tensors["norm"] = (rng.standard_normal(40).astype(np.float32), "F32")
    write_file(tmp_path / "t.gguf", tensors)
    file, reference = GGUFFile(tmp_path / "t.gguf"), gguf.GGUFReader(tmp_path / "t.gguf")
    for key, field in reference.fields.items():
        if not key.startswith("GGUF."):
            assert file.metadata[key] == pytest.approx(field.contents()), key
    assert file.tensors.keys() == {t.name for t in reference.tensors}
    for tensor in reference.tensors:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert torch.equal(file.dequantize(tensor.name), torch.from_numpy(np.array(expected)))
        assert file.tensors[tensor.name].format == tensor.tensor_type.name


def test_truncated_file_names_the_tensor_and_the_bytes_it_needs(tmp_path):
    path = tmp_path / "t.gguf"
    write_file(path, {"w": (np.ones((2, 64), np.float32), "Q8_0")})
    end = GGUFFile(path).tensors["w"].offset + 100
    path.write_bytes(path.read_bytes()[:end])
    with pytest.raises(InvalidTensor) as caught:
        GGUFFile(path).dequantize("w")
    assert caught.value.name == "w" and caught.value.format == "Q8_0"
    assert caught.value.expected == "136 bytes for shape [2, 64]"
