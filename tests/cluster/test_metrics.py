"""cluster/metrics.py: the KV ready delay, per-phase time and KV transfer bytes/seconds from a
worker's final-chunk timings, in the Prometheus text and in the /v1/metrics snapshot."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import GatewayMetrics


def _samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render([]).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_kv_ready_delay_is_a_phase_and_its_own_histogram_beside_bytes_and_wire_seconds():
    metrics = GatewayMetrics()
    metrics.phases({"queue": 0.01, "prefill": 0.1, "kv_ready_delay": 0.003,
                    "transfer_wire": 0.002, "transfer_bytes": 2**20, "decode": 0.3})
    metrics.phases({"queue": 0.02, "prefill": 0.2, "kv_ready_delay": 0.007,
                    "transfer_wire": 0.004, "transfer_bytes": 2**21, "decode": 0.5})
    samples = _samples(metrics)
    assert samples[("kvrelay_kv_ready_delay_seconds_count", ())] == 2
    assert samples[("kvrelay_kv_ready_delay_seconds_sum", ())] == pytest.approx(0.01)
    # Both delays fall in fine buckets (a few ms), not in one coarse latency bucket.
    assert samples[("kvrelay_kv_ready_delay_seconds_bucket", (("le", "0.005"),))] == 1
    for phase, total in (("queue", 0.03), ("prefill", 0.3), ("kv_ready_delay", 0.01),
                         ("decode", 0.8)):
        key = ("kvrelay_request_phase_seconds_sum", (("phase", phase),))
        assert samples[key] == pytest.approx(total)
    assert ("kvrelay_request_phase_seconds_sum", (("phase", "transfer"),)) not in samples
    assert samples[("kvrelay_kv_transfer_bytes_total", ())] == 3 * 2**20
    assert samples[("kvrelay_kv_transfer_seconds_total", ())] == pytest.approx(0.006)
    snapshot = metrics.snapshot([])
    assert snapshot["kv_transfer_bytes"] == 3 * 2**20
    assert snapshot["kv_transfer_seconds"] == pytest.approx(0.006)
    assert snapshot["kv_ready_delay_count"] == 2
    assert snapshot["kv_ready_delay_seconds"] == pytest.approx(0.01)
    assert snapshot["mean_kv_ready_delay_s"] == pytest.approx(0.005)


def test_colocated_timings_have_no_kv_ready_delay_and_move_no_bytes():
    metrics = GatewayMetrics()
    metrics.phases({"queue": 0.01, "prefill": 0.1, "decode": 0.3})
    samples = _samples(metrics)
    assert samples[("kvrelay_kv_ready_delay_seconds_count", ())] == 0
    assert samples[("kvrelay_kv_transfer_bytes_total", ())] == 0
    snapshot = metrics.snapshot([])
    assert snapshot["kv_ready_delay_count"] == 0 and snapshot["mean_kv_ready_delay_s"] is None


def test_negative_clock_skew_is_clamped_to_zero():
    metrics = GatewayMetrics()
    metrics.phases({"kv_ready_delay": -0.001, "transfer_bytes": 64, "transfer_wire": 0.001})
    assert metrics.snapshot([])["kv_ready_delay_seconds"] == 0.0
