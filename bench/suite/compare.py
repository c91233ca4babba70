"""``compare``: the tunnel and flood figures over plain veth, strongSwan on both ends and ipsecstack on both
ends (once per engine the run measures), and the handshake figures with strongSwan and ipsecstack as
responder, all in the same run; then ipsecstack's ratio to each, per engine, and the goals of issue #10
(``goals.py``).

The paths run one after the other on the same machine with the same settings, so whatever else the machine
does at that moment weighs on all of them; the ratios are the figures to read, more than the absolute values.

``ratios(rows)`` pivots the rows of a scenario by (test, metric, engine): the value of veth, of strongSwan and
of ipsecstack on that engine, and ``ipsecstack / strongswan`` and ``ipsecstack / veth`` of the raw values. A
ratio is always ours divided by theirs, whatever the metric: above 1 is better for throughput, packets/s and
handshakes/s, below 1 is better for RTT, memory and CPU per packet (``better`` says which way each metric
goes). A row with an error (a failed run, an engine the daemon did not confirm) has no value, so no ratio.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bench.suite import flood, handshake, tunnel
from bench.suite.common import METRICS, Progress, Row, Settings
from bench.suite.paths import PATHS, open_path

METRIC_ORDER = ("gbps", "pps", "loss_pct", "cpu_us_pkt", "rtt_ms", "rss_mb", "hs_per_s", "cpu_ms_hs", "kb_per_sa")


def steps(settings: Settings, paths: tuple[str, ...] = PATHS) -> int:
    per_path = len(tunnel.tests(settings)) + len(flood.tests(settings))
    runs = [n for p in paths for n in ([len(settings.engines)] if p == "ipsecstack" else [1])]
    hs = sum(len(settings.engines) if p == "ipsecstack" else 1 for p in paths if p in handshake.RESPONDERS)
    return per_path * sum(runs) + hs * len(handshake.tests(settings))


def _runs(settings: Settings, paths: tuple[str, ...]) -> list[tuple[str, Settings]]:
    """(path, settings) in the order they run: ipsecstack once per engine, the others once."""
    out: list[tuple[str, Settings]] = []
    for kind in paths:
        engines = settings.engines if kind == "ipsecstack" else (settings.engine,)
        out += [(kind, replace(settings, engine=e)) for e in engines]
    return out


def measure(settings: Settings, progress: Progress, paths: tuple[str, ...] = PATHS,
            scenario: str = "compare") -> list[Row]:  # fmt: skip
    rows: list[Row] = []
    per_path = len(tunnel.tests(settings)) + len(flood.tests(settings))
    for kind, s in _runs(settings, paths):
        engine = s.engine if kind == "ipsecstack" else None
        n0 = progress.count
        try:
            with open_path(kind, s, tag="bc") as path:
                rows += tunnel.measure(path, s, progress, scenario)
                rows += flood.measure(path, s, progress, scenario)
        except Exception as e:  # one broken path must not cost the others' figures
            progress.write(f"compare: {kind} ({engine or '-'}) failed: {e}")
            rows.append(Row(scenario, kind, engine, "setup", "gbps", None, f"{type(e).__name__}: {e}"[:2000]))
            progress.done(max(0, per_path - (progress.count - n0)))
    for kind, s in _runs(settings, tuple(p for p in paths if p in handshake.RESPONDERS)):
        engine = s.engine if kind == "ipsecstack" else None
        n0 = progress.count
        try:
            rows += handshake.measure(kind, s, progress, scenario)
        except Exception as e:
            progress.write(f"compare: handshake with {kind} ({engine or '-'}) failed: {e}")
            rows.append(Row(scenario, kind, engine, "handshake", "hs_per_s", None, f"{type(e).__name__}: {e}"[:2000]))
            progress.done(max(0, len(handshake.tests(s)) - (progress.count - n0)))
    return rows


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """One entry per (test, metric, engine) with an ipsecstack figure or figures of other paths, in the order
    the tests ran, then the engine order of the run (native before python)."""
    others: dict[tuple[str, str], dict[str, float | None]] = {}
    ours: dict[tuple[str, str], dict[str | None, float | None]] = {}
    for r in rows:
        if r.test == "setup":
            continue
        if r.path == "ipsecstack":
            ours.setdefault((r.test, r.metric), {})[r.engine or "?"] = r.value
        else:
            others.setdefault((r.test, r.metric), {})[r.path] = r.value
    tests_order = list(dict.fromkeys(r.test for r in rows))
    engines_order = list(dict.fromkeys(r.engine for r in rows if r.path == "ipsecstack" and r.engine))
    out = []
    keys = set(others) | set(ours)
    for key in sorted(keys, key=lambda k: (tests_order.index(k[0]), METRIC_ORDER.index(k[1])
                                           if k[1] in METRIC_ORDER else 99)):  # fmt: skip
        theirs = others.get(key, {})
        mine: dict[str | None, float | None] = ours.get(key) or {None: None}  # only the other paths ran it
        for engine in sorted(mine, key=lambda e: engines_order.index(e) if e in engines_order else 99):
            value = mine[engine]
            out.append({
                "test": key[0], "metric": key[1], "engine": engine, "unit": METRICS[key[1]][0],
                "better": "higher" if METRICS[key[1]][1] else "lower", "veth": theirs.get("veth"),
                "strongswan": theirs.get("strongswan"), "ipsecstack": value,
                "vs_strongswan": _ratio(value, theirs.get("strongswan")), "vs_veth": _ratio(value, theirs.get("veth")),
            })  # fmt: skip
    return out
