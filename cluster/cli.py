"""The `kvrelay` console script: one subcommand per module, each owning its own arguments.

Subcommand modules are imported only when chosen, so `kvrelay generate` never imports Ray.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "serve": ("cluster.serve", "start a cluster (prefill/decode or colocated) and the gateway"),
    "generate": ("workers.generate_cli", "offline generation on one engine, prints the text"),
    "make-tiny-model": (
        "workers.model.tiny_model", "write a small random Llama checkpoint + tokenizer"
    ),
    "quantize": (
        "workers.model.quantize", "write a GPTQ/AWQ/INT8/FP8 checkpoint (round-to-nearest)"
    ),
    "bench-engine": ("workers.bench.bench_engine", "offline engine throughput table"),
    "loadtest": ("loadtest.cli", "load-test any OpenAI-compatible endpoint"),
}


def usage() -> str:
    lines = ["usage: kvrelay <command> [args]", "", "commands:"]
    lines += [f"  {name:<16} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
