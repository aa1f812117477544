"""Prometheus metrics: one registry per process; the gateway's also shows the workers'.

Each process builds its own `CollectorRegistry` (never prometheus_client's global one, so two
gateways in one test process do not collide). `GatewayMetrics` is what the HTTP gateway
counts into: requests by status, TTFT / TPOT / end-to-end latency, per-phase time from the
workers' final chunks (queue, prefill, kv_ready_delay, decode) and KV transfer bytes and
seconds. The KV ready delay of a disaggregated request runs from the end of its prefill (token
1 sampled on the prefill worker) to its KV having landed on the decode worker: what a user
waits beyond prefill. It starts after token 1, so it is no part of TTFT, and it has its own
histogram (`kvrelay_kv_ready_delay_seconds`, finer buckets) beside the phase one.
Workers' own numbers (queue depth, KV usage, their counters) arrive at scrape time as a list
of plain dicts, one per worker with its `worker_id`; every numeric entry is rendered as a
gauge `kvrelay_worker_<key>{worker=...}`, so the gateway is the one scrape target.

The gateway does not import this module (dependencies point cluster -> router): the launcher
builds a `GatewayMetrics` and hands it to `router.gateway.create_app`.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from cluster.rank_metrics import RankGauges

# Latency buckets from a 5 ms TTFT on a warm GPU up to multi-minute long generations.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)
# Per-token latency: ~5 ms is the memory-bound floor of an 8B decode step on an H100.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
# KV ready delay: from ~1 ms (a few MiB over NVLink) to seconds (a stalled or slow link).
KV_READY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)
PHASES = ("queue", "prefill", "kv_ready_delay", "decode")
SPEC_COUNTERS = ("spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
                 "spec_decode_num_drafts")
"""A speculating worker's per-request counters in the final chunk's timings (vLLM's names)."""
CONTENT_TYPE = CONTENT_TYPE_LATEST


def new_registry() -> CollectorRegistry:
    """A fresh per-process registry (no default process/platform collectors)."""
    return CollectorRegistry(auto_describe=True)


class GatewayMetrics:
    """Everything the gateway records; `render()` is the /metrics body, `snapshot()` the
    /v1/metrics JSON. Called from the gateway's event loop only."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 ranks: dict[str, list[dict]] | None = None):
        """`ranks`: worker_id -> its ranks' facts (`Cluster.ranks`), for the per-rank KV
        gauges (cluster/rank_metrics.py)."""
        self.registry = registry or new_registry()
        r = self.registry
        self._rank_gauges = RankGauges(r, ranks or {})
        self.requests = Counter("kvrelay_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("kvrelay_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kvrelay_time_per_output_token_seconds",
                              "Mean gap between output tokens after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("kvrelay_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.phase = Histogram("kvrelay_request_phase_seconds",
                               "Per-request time in each phase (from the workers)", ["phase"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.kv_ready_delay = Histogram("kvrelay_kv_ready_delay_seconds",
                                        "End of prefill to the KV landed on the decode worker",
                                        buckets=KV_READY_BUCKETS, registry=r)
        self.transfer_bytes = Counter("kvrelay_kv_transfer_bytes", "KV bytes moved", registry=r)
        self.transfer_seconds = Counter("kvrelay_kv_transfer_seconds",
                                        "Seconds spent moving those bytes", registry=r)
        self.prompt_tokens = Counter("kvrelay_prompt_tokens", "Prompt tokens", registry=r)
        self.output_tokens = Counter("kvrelay_generation_tokens", "Generated tokens",
                                     registry=r)
        self.migrations = Counter("kvrelay_migrations",
                                  "Requests continued on a live worker after theirs was lost",
                                  registry=r)
        self.migration_added = Histogram("kvrelay_migration_added_seconds",
                                         "Stall of a migrated stream: last token before the "
                                         "loss to the first after it",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.spec_draft_tokens = Counter(
            "kvrelay_spec_decode_num_draft_tokens",
            "Speculative decoding: draft tokens proposed and verified", registry=r)
        self.spec_accepted_tokens = Counter(
            "kvrelay_spec_decode_num_accepted_tokens",
            "Speculative decoding: draft tokens the target accepted", registry=r)
        self.spec_drafts = Counter(
            "kvrelay_spec_decode_num_drafts",
            "Speculative decoding: verification runs (one per sequence per step)", registry=r)
        self.spec_acceptance_rate = Gauge(
            "kvrelay_spec_decode_acceptance_rate",
            "Accepted / drafted tokens over every finished request so far", registry=r)
        self.spec_mean_accepted_length = Gauge(
            "kvrelay_spec_decode_mean_accepted_length",
            "Tokens per verification run (accepted drafts + 1), over every finished request",
            registry=r)
        self.in_flight = Gauge("kvrelay_gateway_requests_in_flight",
                               "Requests admitted and not yet finished", registry=r)
        self._worker_gauges: dict[str, Gauge] = {}
        self._router_gauges: dict[str, Gauge] = {}
        self._counts: dict[str, int] = {}
        # Plain totals beside the Prometheus objects, for the JSON snapshot.
        self._sums = {"ttft": 0.0, "tpot": 0.0, "e2e": 0.0, "n_ttft": 0, "n_tpot": 0, "n_e2e": 0}
        # kv_ready_delay sum and count let a client take means over any interval (deltas).
        self._totals = {"prompt_tokens": 0, "generation_tokens": 0, "kv_transfer_bytes": 0.0,
                        "kv_transfer_seconds": 0.0, "kv_ready_delay_seconds": 0.0,
                        "kv_ready_delay_count": 0, "migrations": 0,
                        "migration_added_seconds": 0.0, **dict.fromkeys(SPEC_COUNTERS, 0)}
        self._in_flight = 0

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self._counts[str(status)] = self._counts.get(str(status), 0) + 1

    def set_in_flight(self, count: int) -> None:
        self.in_flight.set(count)
        self._in_flight = count

    def tokens(self, prompt: int, output: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.output_tokens.inc(output)
        self._totals["prompt_tokens"] += prompt
        self._totals["generation_tokens"] += output

    def latency(self, ttft_s: float | None, e2e_s: float, num_output_tokens: int) -> None:
        """One finished request: TTFT, end-to-end, and TPOT derived from both."""
        self.e2e.observe(e2e_s)
        self._add("e2e", e2e_s)
        if ttft_s is None:
            return
        self.ttft.observe(ttft_s)
        self._add("ttft", ttft_s)
        if num_output_tokens > 1:
            tpot = (e2e_s - ttft_s) / (num_output_tokens - 1)
            self.tpot.observe(tpot)
            self._add("tpot", tpot)

    def phases(self, timings: dict[str, float]) -> None:
        """A final chunk's `timings`: seconds per phase; for a disaggregated request also the
        KV's bytes (`transfer_bytes`) and the wire seconds of those bytes (`transfer_wire`,
        first byte posted to last landed), so bytes / seconds is the link's bandwidth."""
        timings = dict(timings)
        for phase in PHASES:
            if phase in timings:
                self.phase.labels(phase=phase).observe(max(0.0, float(timings[phase])))
        if "kv_ready_delay" in timings:
            delay = max(0.0, float(timings["kv_ready_delay"]))
            self.kv_ready_delay.observe(delay)
            self._totals["kv_ready_delay_seconds"] += delay
            self._totals["kv_ready_delay_count"] += 1
        if "transfer_bytes" in timings:
            moved = max(0.0, float(timings["transfer_bytes"]))
            seconds = max(0.0, float(timings.get("transfer_wire", 0.0)))
            self.transfer_bytes.inc(moved)
            self.transfer_seconds.inc(seconds)
            self._totals["kv_transfer_bytes"] += moved
            self._totals["kv_transfer_seconds"] += seconds
        if SPEC_COUNTERS[0] in timings:
            self._spec(timings)

    def _spec(self, timings: dict[str, float]) -> None:
        counters = (self.spec_draft_tokens, self.spec_accepted_tokens, self.spec_drafts)
        for name, counter in zip(SPEC_COUNTERS, counters, strict=True):
            value = max(0, int(timings.get(name, 0)))
            counter.inc(value)
            self._totals[name] += value
        drafted, accepted, runs = (self._totals[name] for name in SPEC_COUNTERS)
        if drafted:
            self.spec_acceptance_rate.set(accepted / drafted)
        if runs:
            self.spec_mean_accepted_length.set(1 + accepted / runs)

    def migrated(self, added_s: float) -> None:
        """A stream continued on a live worker, `added_s` after its last token before the
        worker was lost (router/stream_resume.py)."""
        self.migrations.inc()
        self.migration_added.observe(added_s)
        self._totals["migrations"] += 1
        self._totals["migration_added_seconds"] += added_s

    def render(self, worker_metrics: list[dict[str, Any]]) -> bytes:
        """The Prometheus text exposition, with the workers' numbers as of now."""
        self._set_worker_gauges(worker_metrics)
        return generate_latest(self.registry)

    def snapshot(self, worker_metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """Plain JSON numbers for /v1/metrics."""
        s = self._sums
        return {
            "requests_by_status": dict(self._counts),
            "requests_in_flight": self._in_flight,
            **self._totals,
            "mean_ttft_s": s["ttft"] / s["n_ttft"] if s["n_ttft"] else None,
            "mean_tpot_s": s["tpot"] / s["n_tpot"] if s["n_tpot"] else None,
            "mean_e2e_s": s["e2e"] / s["n_e2e"] if s["n_e2e"] else None,
            "mean_kv_ready_delay_s": _mean(self._totals["kv_ready_delay_seconds"],
                                           self._totals["kv_ready_delay_count"]),
            "workers": worker_metrics,
        }

    def _add(self, name: str, value: float) -> None:
        self._sums[name] += value
        self._sums["n_" + name] += 1

    def _set_worker_gauges(self, worker_metrics: list[dict[str, Any]]) -> None:
        # Cleared each scrape so a worker that left stops being reported.
        for gauge in self._worker_gauges.values():
            gauge.clear()
        self._rank_gauges.set(worker_metrics)
        for values in worker_metrics:
            if values.get("role") == "router":
                self._set_router_gauges(values)
                continue
            worker_id = values.get("worker_id", "?")
            values = {**_derived(values), **values}
            for key, value in values.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                self._worker_gauge(key).labels(worker=str(worker_id)).set(value)

    def _set_router_gauges(self, values: dict[str, Any]) -> None:
        """The router's own numbers (router/router_core.py's last worker_metrics entry: its
        control plane's KV events applied, health, Redis round trips) as kvrelay_router_*."""
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = "kvrelay_router_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            gauge = self._router_gauges.get(name)
            if gauge is None:
                gauge = Gauge(name, f"Router {key}", registry=self.registry)
                self._router_gauges[name] = gauge
            gauge.set(value)

    def _worker_gauge(self, key: str) -> Gauge:
        name = "kvrelay_worker_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
        gauge = self._worker_gauges.get(name)
        if gauge is None:
            gauge = Gauge(name, f"Worker-reported {key}", ["worker"], registry=self.registry)
            self._worker_gauges[name] = gauge
        return gauge


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None


def _derived(values: dict[str, Any]) -> dict[str, float]:
    """KV usage and queue depth from what the router reports (free/total blocks, requests
    routed to the worker and not finished); a worker's own numbers win over these."""
    derived: dict[str, float] = {}
    total = values.get("total_blocks")
    if total and "free_blocks" in values:
        derived["kv_usage"] = 1.0 - values["free_blocks"] / total
    if "num_requests" in values:
        derived["queue_depth"] = values["num_requests"]
    return derived
