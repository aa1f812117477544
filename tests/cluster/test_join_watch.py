"""A router's rescan of the cluster's workers (router/membership.py, `watch`) with real
in-process prefill and decode workers over gloo KV pairs (set up eagerly at admission): a
prefill and a decode worker that appear after the router started are registered, admitted
and paired with the others as at start; a decode worker no longer found is lost and
forgotten, and requests then run on the new one with greedy output equal to transformers; a
worker found under a new identity (restarted as a new actor) is admitted again as a new
incarnation and paired again. The gateway's /metrics, rendered from the router's
worker_metrics, has the per-rank KV gauges of the workers found later (their ranks learnt by
the router) and no label of a forgotten one."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import GatewayMetrics
from router.membership import Found
from router.router_core import RouterCore
from router.router_state import RouterConfig
from router.worker_handle import LocalHandle
from tests.cluster.helpers import ChunkCollector, hf_greedy, prompts, request
from tests.cluster.test_disaggregated_workers import make_spec, wait_all_free
from workers.actors.decode_worker import DecodeWorker
from workers.actors.prefill_worker import PrefillWorker


@pytest.fixture()
def collector():
    collector = ChunkCollector()
    yield collector
    collector.close()


async def until(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        await asyncio.sleep(0.02)


def found(workers: dict) -> Found:
    """A rescan's answer: each worker object is its own identity (as an actor handle is)."""
    return {wid: (wid.split("-")[0], worker, LocalHandle(worker))
            for wid, worker in workers.items()}


def paired(prefill: PrefillWorker, decode: DecodeWorker) -> bool:
    """The prefill worker's KV pair with `decode` is set up (its path known)."""
    return prefill.transfer_paths().get(decode.kv_address(), {}).get("path") is not None


def serving(core: RouterCore) -> dict[str, str]:
    """The incarnation the router serves of each worker it knows."""
    return {m["worker_id"]: m["incarnation"] for m in core.worker_metrics()
            if m["role"] != "router"}


def labelled(core: RouterCore) -> dict[str, dict[str, float]]:
    """The gateway's /metrics (no ranks known at its start-up) over the router's
    worker_metrics: per metric family, its value per `worker` label."""
    text = GatewayMetrics().render(core.worker_metrics()).decode()
    return {family.name: {sample.labels["worker"]: sample.value
                          for sample in family.samples if "worker" in sample.labels}
            for family in text_string_to_metric_families(text)}


def kv_capacity(worker) -> float:
    (rank,) = worker.ready()["ranks"]
    return float(rank["num_blocks"] * rank["kv_bytes_per_block"])


def test_rescan_admits_new_workers_forgets_gone_ones_and_pairs_them(tiny_model_dir,
                                                                    hf_reference, collector):
    prefill, scaled = (PrefillWorker(make_spec(tiny_model_dir, f"prefill-{i}", "gloo"))
                       for i in (0, 1))
    made = [DecodeWorker(make_spec(tiny_model_dir, f"decode-{i}", "gloo")) for i in (0, 1, 1)]
    old, late, successor = made
    model = hf_reference(tiny_model_dir)
    batch = prompts(4, prefill.ready()["vocab_size"], seed=31, low=4, high=30)
    live = {"prefill-0": prefill, "decode-0": old}

    async def find() -> Found:
        return found(live)

    async def run() -> tuple[list, dict, dict]:
        core = RouterCore(RouterConfig(block_size=8, poll_interval_s=0.05,
                                       rescan_interval_s=0.05))
        try:  # stopped even when a check fails: its news socket is closed, not left to GC
            core.add_worker("prefill-0", "prefill", LocalHandle(prefill))
            core.add_worker("decode-0", "decode", LocalHandle(old))
            core.membership.watch(find)
            await core.wait_ready(10)
            core.start()
            decodes = lambda: core.health()["workers"]["decode"]  # noqa: E731
            # Started after the router: registered, admitted, paired with the others.
            live.update({"decode-1": late, "prefill-1": scaled})
            await until(lambda: decodes() == {"ready": 2, "known": 2}, "decode-1 admitted")
            await until(lambda: all(paired(p, d) for p in (prefill, scaled) for d in (old, late)),
                        "every prefill -> decode KV pair")
            # The router asks an admitted worker for its ranks after introducing it to the
            # others, so a pair can be up before the ranks are known: wait for them too.
            await until(lambda: len(labelled(core).get("kvrelay_rank_kv_capacity_bytes", {}))
                        == 4, "the ranks of all four workers")
            admitted = labelled(core)
            del live["decode-0"]  # gone: lost, then forgotten
            await until(lambda: decodes() == {"ready": 1, "known": 1}, "decode-0 forgotten")
            forgotten = labelled(core)
            reqs = [request(f"r{i}", p, collector.address, 5) for i, p in enumerate(batch)]
            await asyncio.gather(*(core.submit(r) for r in reqs))
            await asyncio.to_thread(collector.wait_finished, [r.request_id for r in reqs], 120)
            first = serving(core)
            live["decode-1"] = successor  # restarted under a new actor: a new incarnation
            await until(lambda: decodes()["ready"] == 1 and serving(core)["decode-1"]
                        not in ("", first["decode-1"]), "decode-1's successor admitted")
            await until(lambda: paired(prefill, successor) and paired(scaled, successor),
                        "prefill -> successor KV pairs")
            again = request("again", batch[0], collector.address, 5)
            await core.submit(again)
            await asyncio.to_thread(collector.wait_finished, ["again"], 60)
            await until(lambda: not core.requests, "requests done")
            return reqs, first, serving(core), admitted, forgotten
        finally:
            await core.stop()

    try:
        reqs, first, then, admitted, forgotten = asyncio.run(run())
        capacity = {wid: kv_capacity(w) for wid, w in
                    [("prefill-0", prefill), ("decode-0", old), ("decode-1", late),
                     ("prefill-1", scaled)]}
        assert admitted["kvrelay_rank_kv_capacity_bytes"] == capacity
        assert admitted["kvrelay_worker_tp_size"] == dict.fromkeys(capacity, 1.0)
        assert all("decode-0" not in values for values in forgotten.values())
        assert forgotten["kvrelay_rank_kv_capacity_bytes"] == {
            wid: c for wid, c in capacity.items() if wid != "decode-0"}
        for req in reqs:
            assert collector.final(req.request_id).worker_id == "decode-1"
            assert collector.tokens(req.request_id) == hf_greedy(model, req.prompt_token_ids, 5)
        assert list(then) == ["prefill-0", "decode-1", "prefill-1"]
        assert then["decode-1"] == successor.incarnation != late.incarnation
        assert first["decode-1"] == late.incarnation
        assert collector.tokens("again") == collector.tokens("r0")
        wait_all_free(prefill, scaled, late, successor)
    finally:
        for worker in [prefill, scaled, *made]:
            worker.shutdown()
