"""The output of a run: a table on the terminal, one JSON file, PNG plots (when matplotlib is installed).

JSON (``bench/results/suite-<UTC time>.json``)::

    {"suite": "ipsecstack-bench", "format": 1, "started": ..., "elapsed_s": ..., "machine": {...},
     "settings": {...}, "scenarios": [...], "rows": [Row.to_json(), ...], "ratios": {"compare": [...]},
     "goals": {"compare": [...]}}

Format 2 (engines): each ratio entry has an ``engine`` (ipsecstack's, one entry per engine that ran) and
there is a ``goals`` section (``goals.evaluate``).

Plots (``suite-<time>-<scenario>.png``, next to the JSON): one figure per scenario with up to three panels,
throughput (Gbit/s), packets/s and CPU per packet (us), one bar per path (and engine) for each test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.suite.common import METRICS, Row

PLOT_METRICS = ("gbps", "pps", "cpu_us_pkt")


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _columns(header: list[str], body: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r).rstrip() for r in body)])


def rows_table(rows: Iterable[Row]) -> str:
    """Every figure: scenario, path, engine, test, metric, value, unit (and the error, if any)."""
    body = []
    notes = []
    for r in rows:
        body.append([r.scenario, r.path, r.engine or "", r.test, r.metric, fmt(r.value), r.unit,
                     "ERROR" if r.error else ""])  # fmt: skip
        if r.error:
            notes.append(f"  {r.scenario} {r.path} {r.test} {r.metric}: {r.error.splitlines()[0][:200]}")
    text = _columns(["scenario", "path", "engine", "test", "metric", "value", "unit", ""], body, {5})
    return text + ("\nerrors:\n" + "\n".join(dict.fromkeys(notes)) if notes else "")


def ratio_table(entries: list[dict[str, Any]]) -> str:
    """The comparison: value per path, ipsecstack's on each engine, and its ratios (ours / theirs)."""
    body = [[e["test"], e["metric"], e["unit"], e["better"], e.get("engine") or "", fmt(e["veth"]),
             fmt(e["strongswan"]), fmt(e["ipsecstack"]), fmt(e["vs_strongswan"]), fmt(e["vs_veth"])]
            for e in entries]  # fmt: skip
    header = ["test", "metric", "unit", "better", "engine", "veth", "strongSwan", "ipsecstack", "ipsec/swan",
              "ipsec/veth"]  # fmt: skip
    return _columns(header, body, {5, 6, 7, 8, 9})


def markdown_ratio_table(entries: list[dict[str, Any]]) -> str:
    head = (
        "| test | metric (unit) | better | engine | veth | strongSwan | ipsecstack | ipsecstack / strongSwan "
        "| ipsecstack / veth |"
    )
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for e in entries:
        lines.append(f"| {e['test']} | {e['metric']} ({e['unit']}) | {e['better']} | {e.get('engine') or '-'} | "
                     f"{fmt(e['veth'])} | {fmt(e['strongswan'])} | {fmt(e['ipsecstack'])} | "
                     f"{fmt(e['vs_strongswan'])} | {fmt(e['vs_veth'])} |")  # fmt: skip
    return "\n".join(lines)


def _met(g: dict[str, Any]) -> str:
    return "not measured" if g["met"] is None else "met" if g["met"] else "NOT MET"


def goals_table(goals: list[dict[str, Any]]) -> str:
    """The issue #10 goals: engine, goal, test, measured (ratio or value), target, met / NOT MET / not measured."""
    body = [[g["engine"], g["goal"], g["test"], g["metric"], fmt(g["measured"]), g["target"], _met(g),
             g["why"] or ""] for g in goals]  # fmt: skip
    return _columns(["engine", "goal", "test", "metric", "measured", "target", "status", ""], body, {4})


def markdown_goals_table(goals: list[dict[str, Any]]) -> str:
    lines = ["| engine | goal | test | measured | target | status |", "|---|---|---|---:|---|---|"]
    for g in goals:
        lines.append(f"| {g['engine']} | {g['goal']} | {g['test']} {g['metric']} | {fmt(g['measured'])} | "
                     f"{g['target']} | {_met(g)} |")  # fmt: skip
    return "\n".join(lines)


def document(machine: dict[str, Any], settings: dict[str, Any], scenarios: list[str], rows: list[Row],
             ratios: dict[str, list[dict[str, Any]]], started: str, elapsed: float,
             goals: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"suite": "ipsecstack-bench", "format": 2, "started": started, "elapsed_s": round(elapsed, 1),
            "machine": machine, "settings": settings, "scenarios": scenarios,
            "rows": [r.to_json() for r in rows], "ratios": ratios, "goals": goals or {}}  # fmt: skip


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def load_rows(doc: dict[str, Any]) -> list[Row]:
    """The rows of a JSON document written by ``write_json`` (to re-plot or re-tabulate an old run)."""
    return [Row(r["scenario"], r["path"], r["engine"], r["test"], r["metric"], r["value"], r.get("error"),
                r.get("extra") or {}) for r in doc["rows"]]  # fmt: skip


def _series(r: Row) -> str:
    return r.path + (f" ({r.engine})" if r.engine else "")


def plot(rows: list[Row], prefix: Path) -> tuple[list[Path], str | None]:
    """PNG per scenario; ([], why) when matplotlib is missing or nothing is plottable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install -e '.[bench]')"
    written: list[Path] = []
    for scenario in dict.fromkeys(r.scenario for r in rows):
        mine = [r for r in rows if r.scenario == scenario and r.metric in PLOT_METRICS and r.value is not None]
        metrics = [m for m in PLOT_METRICS if any(r.metric == m for r in mine)]
        if not metrics:
            continue
        fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 3.2 * len(metrics)), squeeze=False)
        # one colour per path (and engine) in every panel of the figure
        colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(map(_series, mine)))}
        for ax, metric in zip(axes[:, 0], metrics, strict=True):
            sel = [r for r in mine if r.metric == metric]
            tests = list(dict.fromkeys(r.test for r in sel))
            series = list(dict.fromkeys(map(_series, sel)))
            width = 0.8 / len(series)
            for i, name in enumerate(series):
                vals = {r.test: r.value for r in sel if _series(r) == name}
                xs = [t + (i - (len(series) - 1) / 2) * width for t in range(len(tests))]
                bars = ax.bar(xs, [vals.get(t) or 0.0 for t in tests], width, label=name, color=colours[name])
                ax.bar_label(bars, labels=[fmt(vals.get(t)) for t in tests], fontsize=6, padding=1)
            ax.set_xticks(range(len(tests)), tests, rotation=20 if len(tests) > 6 else 0, fontsize=8)
            ax.set_ylabel(METRICS[metric][0])
            ax.set_title(f"{scenario}: {metric} ({'higher' if METRICS[metric][1] else 'lower'} is better)",
                         fontsize=10)  # fmt: skip
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        out = prefix.with_name(f"{prefix.name}-{scenario}.png")
        fig.savefig(out, dpi=90)
        plt.close(fig)
        written.append(out)
    return written, None if written else "no plottable figures"
