"""The gateway of a launched cluster: FastAPI app over the Router actor, with metrics."""

from __future__ import annotations

from typing import Any

import ray
from fastapi import FastAPI

from cluster.config import ClusterConfig
from cluster.metrics import GatewayMetrics
from router.gateway import GatewayConfig, create_app
from router.router import RayBackend
from workers.actors.worker_actor import WILDCARD_HOSTS
from workers.text.request_text import load_tokenizer


def build_app(config: ClusterConfig, router: Any, max_model_len: int,
              ranks: dict[str, list[dict]] | None = None) -> FastAPI:
    """`create_app` wired to the Router; the PULL socket binds on the serve host (this node's
    IP when that is a wildcard) so workers on other nodes can reach it. `ranks`
    (`Cluster.ranks`) adds each worker's shape and per-rank KV to /metrics."""
    output_host = config.host
    if output_host in WILDCARD_HOSTS:
        # Workers on other nodes push tokens here: advertise this node's IP, not a wildcard.
        output_host = ray.util.get_node_ip_address()
    gateway = GatewayConfig(output_host=output_host, max_in_flight=config.max_queue,
                            max_request_bytes=config.max_request_bytes)
    return create_app(
        RayBackend(router, config.model_name),
        load_tokenizer(config.engine),
        config.model_name,
        max_model_len,
        config=gateway,
        metrics=GatewayMetrics(ranks=ranks),
    )
