"""`kvrelay serve`: start (or join) Ray, place the workers and the Router, run the gateway.

    kvrelay serve --model DIR --prefill 1 --decode 1 --port 8000
    kvrelay serve --model DIR --colocated 2
    kvrelay serve --model DIR --colocated 1 --tp 2 --pp 2
    kvrelay serve --dummy-config config.json --prefill 1 --decode 1 --gpu-share
    kvrelay serve --model DIR --join --redis-url redis://HOST:6379/0 --port 8001

The gateway (FastAPI on uvicorn) runs in this process; Ray shuts down with it if this process
started Ray. SIGTERM or SIGINT (to this process or its process group) drains the requests in
flight for up to --drain-timeout seconds, then stops everything (cluster/graceful.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from cluster.config import ClusterConfig
from router.body_limit import DEFAULT_MAX_REQUEST_BYTES
from router.router_state import RouterConfig
from workers.actors.host_memory import return_large_frees_to_os
from workers.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from workers.errors import KvrelayError
from workers.model.model_source import check_model_path, resolve_model_path, served_model_name
from workers.model.presets import resolve_config_path
from workers.model.quant.load_mode import QUANTIZATION_CHOICES, QUANTIZATION_HELP, check_load_mode
from workers.spec.decoder import check_speculative_config

if TYPE_CHECKING:
    from cluster.launcher import Cluster

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvrelay serve", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder, .gguf file or packaged model (smollm2)")
    src.add_argument("--dummy-config", type=resolve_config_path,
                     help="config.json or a preset name (llama3-8b): random weights")
    p.add_argument("--served-model-name", default=None, help="name clients use (default: dir)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--colocated", type=int, default=0,
                   help="K > 0: K colocated workers instead of prefill/decode pools")
    for flag, who in (("", "each colocated worker"), ("prefill-", "each prefill worker"),
                      ("decode-", "each decode worker")):
        p.add_argument(f"--{flag}tp", type=int, default=1,
                       help=f"tensor-parallel ranks of {who} (one GPU each, one node)")
        p.add_argument(f"--{flag}pp", type=int, default=1,
                       help=f"pipeline stages of {who} (stages may span nodes)")
    p.add_argument("--placement-timeout", type=float, default=60.0,
                   help="seconds to wait for a TP/PP worker's devices before start-up fails")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto')")
    p.add_argument("--kv-transport", default="auto",
                   choices=["auto", "nccl", "gloo", "zmq", "cuda_ipc"])
    p.add_argument("--kv-max-pairs", type=int, default=64,
                   help="most decode workers one prefill worker keeps a KV pair with (NCCL "
                        "communicators hold GPU memory); past it the least recently used idle "
                        "pair is torn down")
    p.add_argument("--attention-backend", default="torch", choices=["torch", "triton"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes per worker")
    p.add_argument("--num-blocks", type=int, default=None, help="fix the KV pool size")
    p.add_argument("--redis-url", default=None,
                   help="keep the router's control plane (worker heartbeats, loads, the KV "
                        "cache index) in this Redis, e.g. redis://127.0.0.1:6379/0; default: "
                        "in the router's memory")
    p.add_argument("--cluster-name", default=ClusterConfig.name,
                   help="names this cluster's Ray actors and, with --redis-url, its Redis keys "
                        "(clusters sharing one Ray or one Redis need distinct names); with "
                        "--join: the cluster to join")
    p.add_argument("--join", action="store_true",
                   help="start no workers: serve a second gateway (with its own router) over "
                        "the running cluster on this Ray (--ray-address, default auto), "
                        "sharing its state through --redis-url (cluster/join.py)")
    p.add_argument("--rescan-interval", type=float, default=RouterConfig.rescan_interval_s,
                   help="with --redis-url: seconds between the router's rescans of the "
                        "cluster's workers (ones started later are admitted, gone ones leave)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="every request computes (and ships) its whole prompt's KV instead of "
                        "sharing cached blocks of a prefix seen before")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="fp8: e4m3 KV cache with per-layer scales from the checkpoint "
                        "(self_attn.k_scale / v_scale), else 1.0 (half of bf16's bytes per "
                        "block, in memory and on the wire); auto: the model's dtype")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight, then 429")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="larger request bodies get 413 before they are parsed (0: no limit)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds requests in flight may go on (503 to new "
                        "ones); then they end with an error event")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES,
                   help=QUANTIZATION_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--gpu-share", action="store_true", help="two workers per GPU")
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="priority: a request's `priority` (lower first) orders the prefill and "
                        "decode queues; fcfs refuses a non-zero one")
    p.add_argument("--prefill-policy", default="least_tokens")
    p.add_argument("--decode-policy", default="kv_capacity")
    p.add_argument("--colocated-policy", default="least_tokens")
    p.add_argument("--local-prefill-max-tokens", type=int, default=0,
                   help="prompts this short (or whose part not cached on a decode worker is "
                        "this short) skip remote prefill (conditional disaggregation)")
    p.add_argument("--max-prefill-queue-tokens", type=int, default=0,
                   help="when every prefill worker has this many tokens queued, decode "
                        "workers prefill new requests themselves (0: never)")
    p.add_argument("--speculative", default=None, choices=["ngram", "draft", "medusa"],
                   help="speculative decoding on decode/colocated workers (workers/spec/)")
    p.add_argument("--num-speculative-tokens", type=int, default=0,
                   help="K: drafts per sequence per step (1..7 with --speculative)")
    p.add_argument("--draft-model", default=None,
                   help="--speculative draft: the draft checkpoint (same tokenizer); medusa: "
                        "the Medusa heads folder")
    p.add_argument("--medusa-tree", default="chain", choices=["chain", "tree"],
                   help="--speculative medusa: verify the heads' top chain, or a tree of their "
                        "top-k candidates (greedy requests) in one forward")
    p.add_argument("--no-migration", action="store_true",
                   help="a request whose worker is lost ends with an error (WorkerLost) instead "
                        "of continuing on a live worker")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> ClusterConfig:
    """The one place command-line arguments become configuration."""
    model = resolve_model_path(args.model) if args.model else args.dummy_config
    engine = EngineConfig(
        model=model,
        load_format="dummy" if args.dummy_config else "auto",
        quantization=args.quantization,
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        max_model_len=args.max_model_len,
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                          num_blocks=args.num_blocks, kv_cache_dtype=args.kv_cache_dtype,
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(policy=args.scheduling_policy),
        speculative=SpeculativeConfig(method=args.speculative,
                                      num_speculative_tokens=args.num_speculative_tokens,
                                      draft_model=args.draft_model,
                                      medusa_tree=args.medusa_tree),
    )
    check_speculative_config(engine.speculative)
    router = RouterConfig(max_queue=args.max_queue, prefill_policy=args.prefill_policy,
                          decode_policy=args.decode_policy, block_size=args.block_size,
                          colocated_policy=args.colocated_policy,
                          local_prefill_max_tokens=args.local_prefill_max_tokens,
                          max_prefill_queue_tokens=args.max_prefill_queue_tokens,
                          max_migrations=0 if args.no_migration else RouterConfig.max_migrations,
                          rescan_interval_s=args.rescan_interval)
    name = args.served_model_name or served_model_name(args.model or args.dummy_config)
    return ClusterConfig(
        engine=engine, model_name=name, num_prefill=args.prefill, num_decode=args.decode,
        num_colocated=args.colocated, host=args.host, port=args.port,
        ray_address=args.ray_address, kv_transport=args.kv_transport,
        kv_max_pairs=args.kv_max_pairs, redis_url=args.redis_url, join=args.join,
        tp=args.tp, pp=args.pp, prefill_tp=args.prefill_tp,
        prefill_pp=args.prefill_pp, decode_tp=args.decode_tp, decode_pp=args.decode_pp,
        placement_timeout_s=args.placement_timeout,
        gpu_share=args.gpu_share, max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes, drain_timeout_s=args.drain_timeout,
        router=router, name=args.cluster_name,
    )


def describe(config: ClusterConfig) -> str:
    """The banner: layout, URL and a curl line that works against this server."""
    url = f"http://{config.host}:{config.port}"
    def shaped(count: int, role: str) -> str:
        tp, pp = config.shape(role)
        return f"{count} {role}" + (f" tp{tp}xpp{pp}" if tp * pp > 1 else "")

    layout = (shaped(config.num_colocated, "colocated") if config.colocated
              else f"{shaped(config.num_prefill, 'prefill')} + "
                   f"{shaped(config.num_decode, 'decode')}")
    if config.join:
        layout = f"joined cluster {config.name!r}"
    body = json.dumps({"model": config.model_name, "prompt": "The capital of France is",
                       "max_tokens": 16, "temperature": 0})
    return (f"kvrelay serving {config.model_name!r} ({layout}, kv transport "
            f"{config.kv_transport}) at {url}\n"
            f"  curl {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'")


def main(argv: list[str]) -> int:
    from cluster.graceful import stop_cluster
    from cluster.join import check_join, join
    from cluster.launcher import check_shapes, launch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # a huge prompt's tokenization buffers (workers/actors/host_memory.py)
    return_large_frees_to_os()
    try:
        config = build_config(parse_args(argv))
        check_model_path(config.engine.model)
        check_load_mode(config.engine.model, config.engine.quantization)
        check_shapes(config)
        check_join(config)
    except KvrelayError as error:  # before Ray starts: one line, no stack
        print(f"kvrelay serve: error: {error}", file=sys.stderr)
        return 2
    try:
        cluster = join(config) if config.join else launch(config)
    except KvrelayError as error:  # devices it cannot place, no cluster to join
        print(f"kvrelay serve: error: {error}", file=sys.stderr)
        return 2
    code = 1
    try:
        serve(config, cluster)
        code = 0
    except Exception:
        log.exception("the gateway failed")
    finally:
        stop_cluster(cluster)
        log.info("stopped")
        logging.shutdown()
        sys.stdout.flush()
        # Not a normal exit: Ray's exit hook would wait on the GCS that stop_cluster killed.
        os._exit(code)


def serve(config: ClusterConfig, cluster: Cluster) -> None:
    """Runs the gateway until SIGTERM or SIGINT and the drain that follows."""
    import uvicorn

    from cluster.gateway_app import build_app
    from cluster.graceful import GracefulServer

    app = build_app(config, cluster.router, cluster.max_model_len, cluster.ranks)
    uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port,
                                    log_level="warning", timeout_graceful_shutdown=2)
    server = GracefulServer(uvicorn_config, app.state.gateway.drain, config.drain_timeout_s)
    # Start-up's ~230k objects (torch, Ray, FastAPI) live for good: out of the collector's
    # sight, a full collection no longer stops the event loop for ~160 ms.
    gc.collect()
    gc.freeze()
    print(describe(config), flush=True)
    server.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
