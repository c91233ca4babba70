"""``flood``: unlimited UDP through the tunnel; goodput, peak memory and CPU per packet of each daemon.

One ``iperf3 -u -b 0`` run of ``settings.flood_seconds`` with 1400-byte IP packets from A to B (the sender
offers more than any of the paths carries, so every queue on the way fills). Figures (test ``flood-1400``):

* ``gbps``, ``pps``, ``loss_pct``: what the receiver got, and the share of the sent packets lost;
* ``rss_mb``: the larger of the two daemons' ``VmHWM`` at the end (the kernel's peak resident set over the
  daemon's life, so it covers the flood) in MiB; ``extra`` has each daemon's and the highest ``VmRSS``
  sampled every 0.1 s during the flood;
* ``cpu_us_pkt``: utime+stime of both daemons during the flood / delivered packets, in us; ``extra`` has
  each daemon's share;
* after the flood, 3 pings must cross again: ``extra.pings_after`` says how many did (a path that stays
  wedged after a flood queued without bound, or lost state).
"""

from __future__ import annotations

from bench.suite.common import ProcWatch, Progress, Row, Settings, iperf, ping, udp_result
from bench.suite.paths import Path, stamp

FLOOD_SIZE = 1400


def tests(settings: Settings) -> list[str]:
    return [f"flood-{FLOOD_SIZE}"]


def measure(path: Path, settings: Settings, progress: Progress, scenario: str = "flood") -> list[Row]:
    test = f"flood-{FLOOD_SIZE}"
    progress.start(f"{scenario} {path.kind} {test}")
    with ProcWatch(path.pids) as w:
        res = iperf(path.pair, path.src, path.dst, ["-u", "-b", "0", "-l", str(FLOOD_SIZE - 28)],
                    settings.flood_seconds)  # fmt: skip
    after = ping(path.pair.a, path.src, path.dst, 3, interval=0.2)
    err = res.get("error")
    got, sent, secs = udp_result(res, settings.flood_seconds)
    rows = [
        Row(scenario, path.kind, path.engine, test, "gbps", got * FLOOD_SIZE * 8 / secs / 1e9 if not err else None,
            err, {"pings_after": after.get("received", 0)}),
        Row(scenario, path.kind, path.engine, test, "pps", got / secs if not err else None, err,
            {"sent_pps": sent / secs}),
        Row(scenario, path.kind, path.engine, test, "loss_pct", 100.0 * (sent - got) / sent if sent else None, err),
    ]  # fmt: skip
    if path.pids:
        mib = {k: v / 1024 for k, v in w.hwm_kb.items()}
        rows.append(
            Row(
                scenario,
                path.kind,
                path.engine,
                test,
                "rss_mb",
                max(mib.values()) if mib else None,
                None,
                {"vmhwm_mb": mib, "vmrss_peak_mb": {k: v / 1024 for k, v in w.rss_peak_kb.items()}},
            )
        )
        rows.append(Row(scenario, path.kind, path.engine, test, "cpu_us_pkt",
                        w.cpu_total / got * 1e6 if got and not err else None, err,
                        {"per_daemon": {k: v / got * 1e6 for k, v in w.cpu.items()} if got else {},
                         "cpu_s": w.cpu}))  # fmt: skip
    progress.done()
    return stamp(rows, path)
