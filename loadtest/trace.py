"""Trace files to replay: one request per row with its send time and token lengths.

JSONL rows: {"timestamp": 0.5, "input_length": 812, "output_length": 64} (`input_len` /
`output_len` / `prompt_tokens` / `output_tokens` also accepted; Mooncake-style traces work).
CSV: a header naming the same columns. Timestamps are seconds unless `time_unit="ms"`; rows
are sorted by timestamp and replayed relative to the first.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from loadtest.errors import BadInputFile

_INPUT_KEYS = ("input_length", "input_len", "prompt_tokens", "input_tokens")
_OUTPUT_KEYS = ("output_length", "output_len", "output_tokens", "max_tokens")
_TIME_KEYS = ("timestamp", "time", "arrival_time")
_UNITS = {"s": 1.0, "ms": 1e-3}


@dataclass(frozen=True)
class TraceEntry:
    timestamp: float
    """Seconds (already converted from the file's unit)."""
    input_len: int
    output_len: int


def _pick(row: dict, keys: tuple[str, ...], path: str, line: int) -> float:
    for key in keys:
        if key in row and row[key] not in ("", None):
            try:
                return float(row[key])
            except (TypeError, ValueError):
                raise BadInputFile(path, line, f"{key}={row[key]!r} is not a number") from None
    raise BadInputFile(path, line, f"missing one of {', '.join(keys)}")


def _entry(row: dict, scale: float, path: str, line: int) -> TraceEntry:
    input_len = int(_pick(row, _INPUT_KEYS, path, line))
    output_len = int(_pick(row, _OUTPUT_KEYS, path, line))
    if input_len < 1 or output_len < 1:
        raise BadInputFile(path, line, f"lengths must be >= 1, got {input_len}, {output_len}")
    return TraceEntry(_pick(row, _TIME_KEYS, path, line) * scale, input_len, output_len)


def _rows(path: Path) -> list[tuple[int, dict]]:
    text = path.read_text()
    if path.suffix.lower() == ".csv":
        return [(i + 2, row) for i, row in enumerate(csv.DictReader(text.splitlines()))]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise BadInputFile(str(path), number, f"not JSON: {exc.msg}") from None
    return rows


def load_trace(path: str | Path, time_unit: str = "s") -> list[TraceEntry]:
    """Read a JSONL (any suffix but .csv) or CSV trace; raises BadInputFile naming the line."""
    path = Path(path)
    if not path.is_file():
        raise BadInputFile(str(path), 0, "no such file")
    scale = _UNITS[time_unit]
    entries = [_entry(row, scale, str(path), line) for line, row in _rows(path)]
    if not entries:
        raise BadInputFile(str(path), 0, "trace has no rows")
    return sorted(entries, key=lambda e: e.timestamp)
