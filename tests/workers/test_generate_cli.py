"""`kvrelay generate`: prints exactly the engine's completion; typed errors exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from workers import generate_cli
from workers.config import CacheConfig, EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]


def test_kvrelay_generate_prints_the_engine_completion(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--prompt", "Once upon a time", "--max-tokens", "12"]
    args += ["--temperature", "0.8", "--seed", "3", "--num-blocks", "64", "--device", "cpu"]
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_model_dir), device="cpu", seed=3, cache=CacheConfig(num_blocks=64)
        )
    )
    (expected,) = engine.generate(
        ["Once upon a time"], SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    )
    assert expected.text.strip()
    assert result.stdout == expected.text + "\n"


def test_generate_reports_typed_error_on_stderr(tiny_model_dir, capsys):
    argv = ["--model", str(tiny_model_dir), "--prompt", "hi", "--max-tokens", "0"]
    assert generate_cli.main(argv + ["--num-blocks", "16", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert (
        captured.out == "" and "InvalidParameter" in captured.err and "max_tokens" in captured.err
    )
