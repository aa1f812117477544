"""`kvrelay generate`: offline generation on one in-process engine; prints the completion.

    kvrelay generate --model DIR|FILE.gguf|smollm2 --prompt TEXT --max-tokens N [--chat]

Only the completion text goes to stdout (so it pipes); errors go to stderr with exit 2.
"""

from __future__ import annotations

import argparse
import sys

from workers.config import CacheConfig, EngineConfig
from workers.errors import KvrelayError
from workers.model.model_source import check_model_path, resolve_model_path
from workers.model.quant.load_mode import QUANTIZATION_CHOICES, QUANTIZATION_HELP, check_load_mode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrelay generate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", required=True, help="checkpoint folder, .gguf file or packaged model (smollm2)"
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES,
                        help=QUANTIZATION_HELP)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention-backend", default="torch", choices=["torch", "triton"])
    parser.add_argument("--num-blocks", type=int, default=None, help="fix the KV pool size")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="fp8: e4m3 KV cache (the checkpoint's per-layer scales, else "
                             "1.0); auto: the model's dtype")
    return parser


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    """The engine configuration of parsed arguments (`model`: the resolved --model)."""
    return EngineConfig(
        model=model,
        dtype=args.dtype,
        quantization=args.quantization,
        device=args.device,
        attention_backend=args.attention_backend,
        seed=args.seed or 0,
        cache=CacheConfig(num_blocks=args.num_blocks, kv_cache_dtype=args.kv_cache_dtype),
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so `--help` stays fast (torch loads with the engine).
    from workers.engine.engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams

    try:
        model = resolve_model_path(args.model)
        check_model_path(model)
        check_load_mode(model, args.quantization)
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
        )
        engine = LLMEngine(engine_config(args, model))
        prompt = args.prompt
        if args.chat:
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            prompt = engine.tokenizer.encode(text, add_special_tokens=False)
        (output,) = engine.generate([prompt], params)
    except KvrelayError as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(output.text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
