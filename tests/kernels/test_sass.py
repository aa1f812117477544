"""kernels/bench/sass.py: the decode matrix-vector kernels and the fp8-cache attention kernels
compiled for sm_90 on this machine (no GPU), their inner loops counted. Run as a subprocess
without TRITON_INTERPRET, which the rest of the suite sets and which replaces every kernel by
its interpreted form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton wheel has no cuobjdump")
def test_decode_kernels_compile_for_hopper_with_one_multiply_add_per_weight():
    """The channel kernel's loop multiplies each widened byte once (`_widen_words`: four
    multiply-adds per word, no per-tile reduction), the W4A16 loop stays within its issue
    budget, and no kernel spills at its default launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kernels.bench.sass", "--json"], env=env,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    reports = {r["kernel"]: r for r in map(json.loads, out.splitlines())}
    attention = {name: reports.pop(name) for name in ("decode fp8 kv", "prefill fp8 kv")}
    # "+ norm": the launch taking NormedRows and finishing AddNorm (kernels/quant_split_k.py);
    # its prologue and epilogue stay out of the loop.
    assert set(reports) == {"channel fp8", "channel int8", "w4a16 gptq", "channel fp8 + norm",
                            "w4a16 gptq + norm"}
    for name in ("channel fp8", "channel int8", "channel fp8 + norm"):
        assert reports[name]["fma_per_weight"] == 1.0, reports[name]
    # Group-major W4A16 (kernels/quant_w4a16_gemv.py): within the ~3.5 instructions per weight
    # an H200's SMs can issue at its bandwidth, scaling branch included.
    for name in ("w4a16 gptq", "w4a16 gptq + norm"):
        assert reports[name]["per_weight"] < 3.3, reports[name]
    for report in reports.values():
        assert report["loop_instructions"] > 0 and report["spill_instructions"] == 0, report
    # Over an fp8 cache with bf16 queries, K and V widen to float16 in packed conversions
    # (F2FP; attention_tile.mma_query): no per-value conversion chain (F2F, which widening
    # to bfloat16 took, 256 per decode tile) in either loop.
    for report in attention.values():
        assert report["loop_instructions"] > 0 and "F2F" not in report["loop_opcodes"], report
    assert attention["decode fp8 kv"]["spill_instructions"] == 0, attention["decode fp8 kv"]
