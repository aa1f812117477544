"""The gateway of a launched cluster: FastAPI app over the Router actor, with metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from cluster.config import ClusterConfig
from cluster.metrics import GatewayMetrics
from router.gateway import GatewayConfig, create_app
from router.router import RayBackend
from workers.request_text import load_tokenizer


def build_app(config: ClusterConfig, router: Any, max_model_len: int) -> FastAPI:
    """`create_app` wired to the Router; the PULL socket binds on the serve host so workers
    on other nodes can reach it."""
    gateway = GatewayConfig(output_host=config.host, max_in_flight=config.max_queue)
    return create_app(
        RayBackend(router, config.model_name),
        load_tokenizer(config.engine),
        config.model_name,
        max_model_len,
        config=gateway,
        metrics=GatewayMetrics(),
    )
