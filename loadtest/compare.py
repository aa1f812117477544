"""Two runs side by side with ratios B/A (e.g. colocated vs disaggregated at the same load)."""

from __future__ import annotations

from loadtest.metrics import Summary
from loadtest.report import RunDocument, fmt

# (row label, getter, unit scale); latencies print in ms.
_ROWS = [
    *((f"{name} {stat} (ms)", (lambda s, k=key, st=stat: getattr(getattr(s, k), st)), 1e3)
      for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"))
      for stat in ("mean", "p50", "p90", "p99")),
    ("requests ok", lambda s: s.num_ok, 1.0),
    ("requests failed", lambda s: s.num_failed, 1.0),
    ("request throughput (req/s)", lambda s: s.request_throughput, 1.0),
    ("output tokens/s", lambda s: s.output_token_throughput, 1.0),
    ("total tokens/s", lambda s: s.total_token_throughput, 1.0),
    ("goodput (req/s)", lambda s: s.goodput, 1.0),
    ("SLO attainment (%)", lambda s: s.attainment, 100.0),
]


def ratio(a: float | None, b: float | None) -> float | None:
    """b / a, or None where either is missing or a is zero."""
    if a is None or b is None or a == 0:
        return None
    return b / a


def compare_rows(a: Summary, b: Summary) -> list[tuple[str, float | None, float | None,
                                                      float | None]]:
    """(label, value A, value B, B/A) per row, values already in the row's unit."""
    rows = []
    for label, get, scale in _ROWS:
        va, vb = get(a), get(b)
        va = None if va is None else va * scale
        vb = None if vb is None else vb * scale
        rows.append((label, va, vb, ratio(va, vb)))
    return rows


def markdown_compare(a: RunDocument, b: RunDocument, label_a: str, label_b: str) -> str:
    lines = [
        f"## compare: A = {label_a} ({a.meta.get('url')}), B = {label_b} ({b.meta.get('url')})",
        "",
        f"| metric | A: {label_a} | B: {label_b} | B/A |",
        "|---|---|---|---|",
    ]
    for label, va, vb, r in compare_rows(a.summary, b.summary):
        lines.append(f"| {label} | {fmt(va)} | {fmt(vb)} | {fmt(r, digits=3)} |")
    return "\n".join(lines) + "\n"
