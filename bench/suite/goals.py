"""The goals of ipsecstack issue #10, checked against the ratios of a ``compare`` run.

Each goal is one check of one engine's figure (``GOALS``): a ratio of ipsecstack to strongSwan or to veth
(``compare.ratios``), or a value (the flood's peak RSS). ``evaluate(entries, engines)`` gives one entry per
goal and engine it applies to::

    {"goal": "TCP, 1 stream", "engine": "native", "test": "tcp-1", "metric": "gbps", "against": "strongswan",
     "measured": 6.1, "target": ">= 5x strongSwan", "met": True, "why": None}

``measured`` is the ratio (or the value, ``against`` None), ``met`` True/False, or None with ``why`` when the
run has no figure for it (the engine or the path did not run, or its row is an error). The per-packet CPU
goal is checked on every test that has a CPU per packet figure for both paths (the fixed-rate runs are the
fairest: the same packets offered to both); the engine's goals are for the native engine (the default),
the Python engine has its own TCP goal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Goal:
    name: str
    engine: str  # the engine the goal is set for
    test: str  # a test name, or a prefix ending in "*" (every test that starts with it)
    metric: str
    against: str | None  # "strongswan" / "veth": the goal is on the ratio; None: on the value itself
    op: str  # ">=" or "<"
    target: float
    stretch: bool = False

    def describe(self) -> str:
        what = {"strongswan": "x strongSwan", "veth": "x veth", None: ""}[self.against]
        unit = " MB" if self.metric == "rss_mb" and self.against is None else ""
        return f"{self.op} {self.target:g}{what}{unit}" + (" (stretch)" if self.stretch else "")

    def check(self, value: float) -> bool:
        return value >= self.target if self.op == ">=" else value < self.target


GOALS = (
    Goal("TCP, 1 stream", "native", "tcp-1", "gbps", "strongswan", ">=", 5.0),
    Goal("TCP, 1 stream", "native", "tcp-1", "gbps", "strongswan", ">=", 10.0, stretch=True),
    Goal("TCP, 4 streams", "native", "tcp-4", "gbps", "strongswan", ">=", 5.0),
    Goal("TCP, 4 streams", "native", "tcp-4", "gbps", "strongswan", ">=", 10.0, stretch=True),
    Goal("UDP 64 B packets/s", "native", "udp-64", "pps", "strongswan", ">=", 5.0),
    Goal("UDP 64 B packets/s", "native", "udp-64", "pps", "veth", ">=", 0.7),
    Goal("flood RSS per daemon", "native", "flood-1400", "rss_mb", None, "<", 100.0),
    Goal("CPU per packet", "native", "*", "cpu_us_pkt", "strongswan", "<", 1.0),
    Goal("ping RTT idle", "native", "ping-idle", "rtt_ms", "strongswan", "<", 1.0),
    Goal("ping RTT under load", "native", "ping-load", "rtt_ms", "strongswan", "<", 1.0),
    Goal("TCP, 1 stream", "python", "tcp-1", "gbps", "strongswan", ">=", 2.0),
    Goal("TCP, 4 streams", "python", "tcp-4", "gbps", "strongswan", ">=", 2.0),
)


def _matches(goal: Goal, test: str) -> bool:
    return test.startswith(goal.test[:-1]) if goal.test.endswith("*") else test == goal.test


def evaluate(entries: list[dict[str, Any]], engines: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """Every goal against the ratio entries of one ``compare`` run; ``engines`` are the engines that ran."""
    out: list[dict[str, Any]] = []
    for goal in GOALS:
        base = {"goal": goal.name, "engine": goal.engine, "metric": goal.metric, "against": goal.against,
                "target": goal.describe(), "stretch": goal.stretch}  # fmt: skip
        if goal.engine not in engines:
            out.append({**base, "test": goal.test, "measured": None, "met": None,
                        "why": f"the {goal.engine} engine did not run (--engine {goal.engine} or both)"})  # fmt: skip
            continue
        mine = [e for e in entries if e["engine"] == goal.engine and e["metric"] == goal.metric
                and _matches(goal, e["test"])]  # fmt: skip
        if goal.test.endswith("*"):  # only the tests both sides have a figure of, each its own line
            mine = [e for e in mine if e[goal.against or "ipsecstack"] is not None] or mine[:1]
        if not mine:
            out.append({**base, "test": goal.test, "measured": None, "met": None, "why": "not in this run"})
            continue
        for e in mine:
            value = e["ipsecstack"] if goal.against is None else e[f"vs_{goal.against}"]
            why = None
            if value is None:
                missing = "ipsecstack" if e["ipsecstack"] is None else goal.against
                why = f"no {missing} figure (see the errors)"
            out.append({**base, "test": e["test"], "measured": value,
                        "met": None if value is None else goal.check(value), "why": why})  # fmt: skip
    return out
