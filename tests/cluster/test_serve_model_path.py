"""`kvrelay serve` with a `--model` that is neither a checkpoint folder, a config.json nor a
.gguf file exits 2 with one line on stderr before Ray starts (it used to crash both workers
with a UnicodeDecodeError)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_serve_refuses_a_bad_model_in_one_line_before_ray(tmp_path):
    """The other bad paths: tests/workers/test_model_source.py (the same check)."""
    model = str(tmp_path / "fake.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", model, "--port", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvrelay serve: error: --model {model}: ")
