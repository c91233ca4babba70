"""``compare``: the tunnel and flood figures over plain veth, strongSwan on both ends and ipsecstack on both
ends, and the handshake figures with strongSwan and ipsecstack as responder, all in the same run; then
ipsecstack's ratio to each.

The paths run one after the other on the same machine with the same settings, so whatever else the machine
does at that moment weighs on all three; the ratios are the figures to read, more than the absolute values.

``ratios(rows)`` pivots the rows of a scenario by (test, metric): the value per path, and
``ipsecstack / strongswan`` and ``ipsecstack / veth`` of the raw values. A ratio is always ours divided by
theirs, whatever the metric: above 1 is better for throughput, packets/s and handshakes/s, below 1 is better
for RTT, memory and CPU per packet (``better`` says which way each metric goes).
"""

from __future__ import annotations

from typing import Any

from bench.suite import flood, handshake, tunnel
from bench.suite.common import METRICS, Progress, Row, Settings
from bench.suite.paths import PATHS, open_path

METRIC_ORDER = ("gbps", "pps", "loss_pct", "cpu_us_pkt", "rtt_ms", "rss_mb", "hs_per_s", "cpu_ms_hs", "kb_per_sa")


def steps(settings: Settings, paths: tuple[str, ...] = PATHS) -> int:
    per_path = len(tunnel.tests(settings)) + len(flood.tests(settings))
    return per_path * len(paths) + sum(1 for p in paths if p in handshake.RESPONDERS)


def measure(settings: Settings, progress: Progress, paths: tuple[str, ...] = PATHS,
            scenario: str = "compare") -> list[Row]:  # fmt: skip
    rows: list[Row] = []
    per_path = len(tunnel.tests(settings)) + len(flood.tests(settings))
    for kind in paths:
        n0 = progress.count
        try:
            with open_path(kind, settings, tag="bc") as path:
                rows += tunnel.measure(path, settings, progress, scenario)
                rows += flood.measure(path, settings, progress, scenario)
        except Exception as e:  # one broken path must not cost the others' figures
            progress.write(f"compare: {kind} failed: {e}")
            rows.append(Row(scenario, kind, None, "setup", "gbps", None, f"{type(e).__name__}: {e}"[:2000]))
            progress.done(max(0, per_path - (progress.count - n0)))
    for kind in paths:
        if kind not in handshake.RESPONDERS:
            continue
        try:
            rows += handshake.measure(kind, settings, progress, scenario)
        except Exception as e:
            progress.write(f"compare: handshake with {kind} failed: {e}")
            rows.append(Row(scenario, kind, None, "handshake", "hs_per_s", None, f"{type(e).__name__}: {e}"[:2000]))
            progress.done()
    return rows


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """One entry per (test, metric) measured on more than one path, in the order the tests ran."""
    table: dict[tuple[str, str], dict[str, float | None]] = {}
    for r in rows:
        if r.test == "setup":
            continue
        table.setdefault((r.test, r.metric), {})[r.path] = r.value
    out = []
    tests_order = list(dict.fromkeys(r.test for r in rows))
    for key in sorted(table, key=lambda k: (tests_order.index(k[0]), METRIC_ORDER.index(k[1])
                                             if k[1] in METRIC_ORDER else 99)):  # fmt: skip
        values = table[key]
        ours = values.get("ipsecstack")
        out.append({
            "test": key[0], "metric": key[1], "unit": METRICS[key[1]][0], "better": "higher" if METRICS[key[1]][1]
            else "lower", "veth": values.get("veth"), "strongswan": values.get("strongswan"), "ipsecstack": ours,
            "vs_strongswan": _ratio(ours, values.get("strongswan")), "vs_veth": _ratio(ours, values.get("veth")),
        })  # fmt: skip
    return out
