"""The gateway's /metrics counts the spec_decode counters of finished requests' final
chunks (vLLM's names) and derives acceptance rate and mean accepted length."""

from __future__ import annotations

from cluster.metrics import GatewayMetrics
from workers.spec.decoder import SpecStats


def test_spec_decode_counters_from_final_chunks():
    metrics = GatewayMetrics()
    first, second = SpecStats(), SpecStats()
    first.add(4, 4)
    first.add(4, 1)
    second.add(3, 0)
    metrics.phases({"decode": 0.5, **first.to_dict()})
    metrics.phases({"decode": 0.5, **second.to_dict()})
    metrics.phases({"decode": 0.5})  # a request that never speculated
    body = metrics.render([]).decode()
    assert "kvrelay_spec_decode_num_draft_tokens_total 11.0" in body
    assert "kvrelay_spec_decode_num_accepted_tokens_total 5.0" in body
    assert "kvrelay_spec_decode_num_drafts_total 3.0" in body
    assert f"kvrelay_spec_decode_acceptance_rate {5 / 11}" in body
    assert f"kvrelay_spec_decode_mean_accepted_length {1 + 5 / 3}" in body
    snapshot = metrics.snapshot([])
    assert snapshot["spec_decode_num_draft_tokens"] == 11
