"""The cluster's configuration: one frozen object built once by `kvrelay serve`.

Worker engine configs are per-role copies of `engine` (`dataclasses.replace`), made by the
worker classes themselves; the router gets `router`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from router.body_limit import DEFAULT_MAX_REQUEST_BYTES
from router.router_state import RouterConfig
from workers.config import EngineConfig

KvTransport = Literal["auto", "nccl", "gloo", "zmq", "cuda_ipc", "inprocess"]


@dataclass(frozen=True)
class ClusterConfig:
    engine: EngineConfig
    model_name: str
    """The name clients put in `model` (OpenAI API)."""
    name: str = "kvrelay"
    """Prefix of this cluster's actor names (several clusters can share one Ray) and, with
    `redis_url`, of its Redis keys (several can share one Redis); `--cluster-name`."""
    num_prefill: int = 1
    num_decode: int = 1
    num_colocated: int = 0
    """> 0 selects the classic colocated mode (num_prefill/num_decode are then ignored)."""
    host: str = "127.0.0.1"
    port: int = 8000
    ray_address: str | None = None
    """None: start a local Ray; else join this cluster ('auto' finds a running one)."""
    kv_transport: KvTransport = "auto"
    kv_max_pairs: int = 64
    """Each prefill worker's bound on its KV pairs (WorkerSpec.kv_max_pairs)."""
    redis_url: str | None = None
    """The router's control plane (heartbeats, loads, KV index) in this Redis, shared by
    router replicas and kept across a router's restart; None: in the router's memory."""
    join: bool = False
    """`kvrelay serve --join`: start no workers; serve with a Router of this gateway's own over
    the running cluster's (cluster/join.py); needs `redis_url`."""
    gpu_share: bool = False
    """Two workers per GPU (num_gpus=0.5 each), e.g. 1P+1D on one GPU."""
    max_queue: int = 1024
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """Request bodies above this get 413 before they are parsed (0: no limit)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM/SIGINT: how long requests in flight may go on before they are ended."""
    router: RouterConfig = field(default_factory=RouterConfig)
    startup_timeout_s: float = 600.0
    max_worker_restarts: int = 3
    """Ray restarts a dead worker this many times; the router admits it again."""
    tp: int = 1
    pp: int = 1
    """Colocated workers' shape: each is tp x pp ranks (workers/actors/rank_group.py)."""
    prefill_tp: int = 1
    prefill_pp: int = 1
    decode_tp: int = 1
    decode_pp: int = 1
    placement_timeout_s: float = 60.0
    """A worker's placement group (tp x pp devices) not placed by then fails start-up."""

    @property
    def colocated(self) -> bool:
        return self.num_colocated > 0

    def shape(self, role: str) -> tuple[int, int]:
        """(tp, pp) of a worker of `role`."""
        return {"colocated": (self.tp, self.pp), "prefill": (self.prefill_tp, self.prefill_pp),
                "decode": (self.decode_tp, self.decode_pp)}[role]

    def engine_for(self, role: str) -> EngineConfig:
        """The engine config of a worker of `role` (its TP/PP shape filled in)."""
        tp, pp = self.shape(role)
        return replace(self.engine, tp_size=tp, pp_size=pp)

    def worker_roles(self) -> list[tuple[str, str]]:
        """(worker_id, role) of every worker, in start order."""
        if self.colocated:
            return [(f"colocated-{i}", "colocated") for i in range(self.num_colocated)]
        return [(f"prefill-{i}", "prefill") for i in range(self.num_prefill)] + [
            (f"decode-{i}", "decode") for i in range(self.num_decode)
        ]
