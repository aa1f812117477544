"""`python -m kernels.bench.sass`: the decode matrix-vector kernels, and the attention kernels
over an fp8 KV cache, compiled for a GPU architecture on this machine, no GPU needed, with their
registers, spills and the SASS of their streaming loop counted by opcode.

    python -m kernels.bench.sass [--arch 90] [--json]

A batch-1 matmul streams its weight once; where its inner loop issues more instructions per
weight than the memory system delivers weights, it is bound by issue, not bytes (the W4A16 and
channel kernels were, 2026-11-28). Counting needs no GPU: Triton compiles for any target
(`triton.compile` with a GPUTarget) and its wheel ships NVIDIA's `cuobjdump`. Each kernel is
compiled with its default launch for Llama-3-8B's q/k/v projection at one row (K 4096, N 6144),
with the pointer and integer arguments specialized as the JIT does for aligned tensors.

Columns: registers per thread, local-memory (spill) instructions, instructions in the streaming
loop (the longest), and per weight the loop's instructions and multiply-adds (the channel
kernel: a BLOCK_N x BLOCK_K tile per iteration over 32 x num_warps threads; W4A16: four packed
rows per lane and column, its once-per-unit scaling branch counted as if taken every time).
Counts are of this machine's Triton, which may schedule differently from the GPU machine's.

Runs without TRITON_INTERPRET (the interpreter replaces every @triton.jit function).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from kernels.bench.bench_quant_kernels import SHAPES

K, N = SHAPES["qkv"]
GROUP_SIZE = 128
"""The W4A16 weight's group size (GPTQ layout)."""


@dataclass
class SassReport:
    kernel: str
    launch: str
    registers: int
    spill_instructions: int
    loop_instructions: int
    weights_per_iteration: int
    """Weights one thread multiplies per loop iteration."""
    loop_opcodes: dict[str, int]

    @property
    def per_weight(self) -> float:
        return self.loop_instructions / self.weights_per_iteration

    @property
    def fma_per_weight(self) -> float:
        return self.loop_opcodes.get("FFMA", 0) / self.weights_per_iteration


def _compile(fn, signature: dict[str, str], constexprs: dict, num_warps: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # The JIT marks aligned pointers and integers divisible by 16 (tt.divisibility); every
    # argument here is one at these shapes.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in signature}
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn, full, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": 1})


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def _main_loop(sass: str) -> collections.Counter:
    """Opcodes (without modifiers or predicates) between the target of a backward branch and
    that branch, for the longest such loop: the streaming loop (a split's finishing loop over
    partial sums is shorter)."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass)
    code = [(int(addr, 16), text) for addr, text in lines]
    loop = collections.Counter()
    for addr, text in code:
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            body = collections.Counter(
                re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                for a, t in code if start <= a <= addr)
            if sum(body.values()) > sum(loop.values()):
                loop = body
    return loop


def report(name: str, fn, signature: dict[str, str], constexprs: dict, num_warps: int,
           weights_per_iteration: int, launch: str, arch: int) -> SassReport:
    compiled = _compile(fn, signature, constexprs, num_warps, arch)
    cubin = compiled.asm["cubin"]
    registers = re.search(r"REG:(\d+)", _cuobjdump(cubin, "-res-usage"))
    sass = _cuobjdump(cubin, "-sass")
    loop = _main_loop(sass)
    return SassReport(name, launch, int(registers.group(1)) if registers else -1,
                      len(re.findall(r"\b(?:STL|LDL)\b", sass)), sum(loop.values()),
                      weights_per_iteration, dict(loop.most_common()))


def _signature(fn, constexprs: dict, pointers: dict[str, str]) -> dict[str, str]:
    """Every runtime argument of `fn` in order: `pointers`' types, int32 for the rest."""
    return {name: pointers.get(name, "i32") for name in fn.arg_names if name not in constexprs}


NORM_POINTERS = {"sq_in_ptr": "*fp32", "eps": "fp32", "res_ptr": "*bf16",
                 "scaled_ptr": "*bf16", "norm_w_ptr": "*bf16", "sq_out_ptr": "*fp32"}
"""The arguments of the RMSNorm finished across two matrix-vector kernels
(kernels/norm_handoff.py AddNorm, NormedRows)."""


def _norm_variants(fp8_or_w4: bool) -> list[tuple[str, dict]]:
    """(name suffix, constexprs): the plain launch, and for FP8 and W4A16 the one that takes
    NormedRows and adds AddNorm's epilogue."""
    plain = ("", dict(NORMED=False, PARTS=1, ADD_NORM=False))
    if not fp8_or_w4:
        return [plain]
    return [plain, (" + norm", dict(NORMED=True, PARTS=128, ADD_NORM=True))]


def decode_kernels(arch: int) -> list[SassReport]:
    """The channel kernel (FP8 and int8 weights) and the W4A16 matrix-vector kernel at their
    default launches for one row of x and Llama-3-8B's q/k/v weight; FP8 and W4A16 also with
    the norm handed between projections."""
    from kernels import quant_split_k as split_k
    from kernels.quant_w4a16_gemv import (
        UNIT_ROWS,
        _w4a16_gemv_kernel,
        gemv_defaults,
        whole_tiles,
    )
    from kernels.quant_w8a16 import _channel_gemv_kernel, channel_gemv_defaults

    reports = []
    launch = split_k.gemv_launch(1, N, K, channel_gemv_defaults(1, N, K))
    for fmt, fp8 in (("fp8", True), ("int8", False)):
        for suffix, norm in _norm_variants(fp8):
            constexprs = dict(BLOCK_N=launch["block_n"], BLOCK_K=launch["block_k"],
                              PREFETCH=launch.get("prefetch", True), EVEN_N=True,
                              FP8_WEIGHTS=fp8, GATED=False, SPLIT=_splits(launch) > 1, PDL=True,
                              **norm)
            signature = _signature(_channel_gemv_kernel, constexprs, {
                "x_ptr": "*bf16", "w_ptr": "*i32",
                "s_ptr": "*fp32", "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32",
                **NORM_POINTERS})
            reports.append(report(f"channel {fmt}{suffix}", _channel_gemv_kernel, signature,
                                  constexprs, launch["num_warps"], _weights_per_thread(launch),
                                  _launch_text(launch), arch))
    launch = split_k.gemv_launch(1, N, K, gemv_defaults(1, N, K, GROUP_SIZE))
    lanes = launch["block_k"] // launch["unit_k"]
    for suffix, norm in _norm_variants(True):
        constexprs = dict(BLOCK_N=launch["block_n"], LANES=lanes, MIN_FORM=False,
                          EVEN=whole_tiles(N, K, launch["block_n"], launch["block_k"]),
                          GATED=False, SPLIT=_splits(launch) > 1, PDL=True, **norm)
        signature = _signature(_w4a16_gemv_kernel, constexprs, {
            "x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16",
            "z_ptr": "*fp16", "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32",
            **NORM_POINTERS})
        # One iteration: UNIT_ROWS packed rows (8 weights each) per lane and column.
        weights = lanes * UNIT_ROWS * 8 * launch["block_n"] // (32 * launch["num_warps"])
        reports.append(report(f"w4a16 gptq{suffix}", _w4a16_gemv_kernel, signature,
                              constexprs, launch["num_warps"], weights, _launch_text(launch),
                              arch))
    return reports


ATTENTION_HEADS = (32, 8, 128)
"""Llama-3-8B attention: query heads, kv heads, head dim."""
ATTENTION_POINTERS = {
    "q_ptr": "*bf16", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv", "out_ptr": "*bf16",
    "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "bt_ptr": "*i32", "cu_q_ptr": "*i32",
    "seq_lens_ptr": "*i32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "tree_ptr": "*i32",
    "qk_scale": "fp32"}


def attention_kernels(arch: int) -> list[SassReport]:
    """The decode and prefill attention kernels over an fp8 (e4m3) cache with bf16 queries at
    Llama-3-8B's heads and their default GPU tiles, pages of 16, several KV splits. "Weights"
    here are the K and V values one thread widens per tile (BLOCK_N keys x head dim x 2)."""
    import torch

    from kernels.flash_prefill import _prefill_kernel
    from kernels.flash_prefill import default_tiles as prefill_tiles
    from kernels.paged_decode import _decode_kernel
    from kernels.paged_decode import default_tiles as decode_tiles

    heads, kv_heads, head_dim = ATTENTION_HEADS
    group = heads // kv_heads
    common = dict(GROUP=group, PAGE=16, BLOCK_D=head_dim, EVEN_D=True, PRECISION="tf32",
                  FP8=True, SINGLE_SPLIT=False, PDL=True)
    decode = decode_tiles(torch.device("cuda"), torch.float8_e4m3fn)
    prefill = prefill_tiles(head_dim, torch.device("cuda"))
    reports = []
    for name, fn, tiles, constexprs in (
            ("decode fp8 kv", _decode_kernel, decode,
             dict(common, BLOCK_M=16, BLOCK_N=decode.block_n, TREE=False, BLOCK_T=16)),
            ("prefill fp8 kv", _prefill_kernel, prefill,
             dict(common, BLOCK_M=prefill.block_m, BLOCK_N=prefill.block_n))):
        signature = _signature(fn, constexprs, ATTENTION_POINTERS)
        values = 2 * constexprs["BLOCK_N"] * head_dim // (32 * tiles.num_warps)
        reports.append(report(name, fn, signature, constexprs, tiles.num_warps, values,
                              f"{constexprs['BLOCK_M']}x{constexprs['BLOCK_N']} "
                              f"w{tiles.num_warps}", arch))
    return reports


def _splits(launch: dict) -> int:
    """Programs along K at this shape (split_k.split_output: splits are whole K tiles)."""
    from kernels.quant_split_k import split_count

    return split_count(K, launch["block_k"], launch["split"])


def _weights_per_thread(launch: dict) -> int:
    """Weights one thread multiplies per iteration: a BLOCK_N x BLOCK_K tile over the
    program's threads."""
    return launch["block_n"] * launch["block_k"] // (32 * launch["num_warps"])


def _launch_text(launch: dict) -> str:
    return (f"{launch['block_n']}x{launch['block_k']} w{launch['num_warps']} "
            f"s{_splits(launch)}{' pf' if launch.get('prefetch') else ''}")


def format_table(reports: list[SassReport], arch: int) -> str:
    lines = [f"sm_{arch}, one row x [{K}, {N}] (Llama-3-8B q/k/v), default launches",
             f"{'kernel':<20}{'launch':<20}{'regs':>6}{'spills':>8}{'loop':>7}"
             f"{'per weight':>12}{'FFMA/weight':>13}  top opcodes"]
    for r in reports:
        top = ", ".join(f"{op} {n}" for op, n in list(r.loop_opcodes.items())[:6])
        lines.append(f"{r.kernel:<20}{r.launch:<20}{r.registers:>6}{r.spill_instructions:>8}"
                     f"{r.loop_instructions:>7}{r.per_weight:>12.2f}{r.fma_per_weight:>13.2f}"
                     f"  {top}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench.sass",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    reports = decode_kernels(args.arch) + attention_kernels(args.arch)
    if args.json:
        for r in reports:
            print(json.dumps({**asdict(r), "per_weight": r.per_weight,
                              "fma_per_weight": r.fma_per_weight}))
    else:
        print(format_table(reports, args.arch))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
