"""``tunnel``: iperf3 and ping through one path (ipsecstack on both ends unless ``compare`` says otherwise).

Tests, in this order, from A's address to B's:

* ``tcp-1``, ``tcp-4``: ``iperf3`` TCP with 1 and 4 parallel streams; Gbit/s the receiver got.
* ``udp-<size>``: ``iperf3 -u -b 0`` (no rate limit) with IP packets of ``size`` bytes (UDP payload
  size - 28); packets/s and Gbit/s the receiver got (sent - lost), the loss, and the CPU both daemons
  used per delivered packet (utime+stime over the run / packets; ``ProcWatch``).
* ``udp-<size>@<rate>``: for each of ``settings.rates`` (packets/s) and ``settings.rate_sizes``, ``iperf3 -u``
  offering exactly that rate (``-b`` = rate x UDP payload bits); delivered packets/s, loss and CPU per
  delivered packet. At a rate the path carries, loss is ~0 and the CPU per packet compares the paths at
  the same work; the max-rate runs above mix the sender's limit into the path's. ``extra.sent_pps`` says
  what iperf3 really offered (a sender that cannot reach the rate shows there).
* ``ping-idle``: ``settings.pings`` pings 0.1 s apart on an idle path; the average RTT (min/max/mdev in
  the row's ``extra``).
* ``ping-load``: the same number of pings while a 1-stream TCP run fills the path; the average RTT.
"""

from __future__ import annotations

import time

from bench.suite.common import ProcWatch, Progress, Row, Settings, background, iperf, ping, udp_result
from bench.suite.paths import Path, stamp

TCP_STREAMS = (1, 4)


def rate_label(pps: int) -> str:
    """50000 -> "50k", 1500000 -> "1.5m", 750 -> "750" (the tail of a fixed-rate test's name)."""
    for div, suffix in ((1_000_000, "m"), (1000, "k")):
        if pps >= div:
            return f"{pps / div:g}{suffix}"
    return str(pps)


def rate_tests(settings: Settings) -> list[str]:
    return [f"udp-{s}@{rate_label(r)}" for s in settings.rate_sizes for r in settings.rates]


def tests(settings: Settings) -> list[str]:
    return [*(f"tcp-{n}" for n in TCP_STREAMS), *(f"udp-{s}" for s in settings.sizes), *rate_tests(settings),
            "ping-idle", "ping-load"]  # fmt: skip


def rate_of(test: str, settings: Settings) -> tuple[int, int]:
    """(size, packets/s) of a fixed-rate test name made by ``rate_tests``."""
    size, label = test[4:].split("@")
    return int(size), next(r for r in settings.rates if rate_label(r) == label)


def _ping_extra(r: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in r.items() if k not in ("avg", "error")}


def measure(path: Path, settings: Settings, progress: Progress, scenario: str = "tunnel") -> list[Row]:
    rows: list[Row] = []

    def row(test: str, metric: str, value: float | None, error: str | None = None, **extra: object) -> None:
        rows.append(Row(scenario, path.kind, path.engine, test, metric, value, error, dict(extra)))

    for test in tests(settings):
        progress.start(f"{scenario} {path.kind} {test}")
        if test.startswith("tcp-"):
            streams = int(test[4:])
            with ProcWatch(path.pids) as w:
                res = iperf(path.pair, path.src, path.dst, ["-P", str(streams)], settings.seconds)
            end = res.get("end", {})
            bps = end.get("sum_received", {}).get("bits_per_second")
            row(test, "gbps", bps / 1e9 if bps else None, res.get("error"),
                retransmits=end.get("sum_sent", {}).get("retransmits"), cpu_s=w.cpu)  # fmt: skip
        elif test.startswith("udp-") and "@" in test:
            size, rate = rate_of(test, settings)
            bitrate = rate * (size - 28) * 8  # iperf3's -b counts the UDP payload
            with ProcWatch(path.pids) as w:
                res = iperf(path.pair, path.src, path.dst, ["-u", "-b", str(bitrate), "-l", str(size - 28)],
                            settings.seconds)  # fmt: skip
            err = res.get("error")
            got, sent, secs = udp_result(res, settings.seconds)
            row(test, "pps", got / secs if not err else None, err, offered_pps=rate, sent_pps=sent / secs)
            row(test, "loss_pct", 100.0 * (sent - got) / sent if sent and not err else None, err, offered_pps=rate)
            if path.pids:
                row(test, "cpu_us_pkt", w.cpu_total / got * 1e6 if got and not err else None, err, offered_pps=rate,
                    per_daemon={k: v / got * 1e6 for k, v in w.cpu.items()} if got else {}, cpu_s=w.cpu)  # fmt: skip
        elif test.startswith("udp-"):
            size = int(test[4:])
            with ProcWatch(path.pids) as w:
                res = iperf(path.pair, path.src, path.dst, ["-u", "-b", "0", "-l", str(size - 28)], settings.seconds)
            err = res.get("error")
            got, sent, secs = udp_result(res, settings.seconds)
            row(test, "pps", got / secs if not err else None, err, sent_pps=sent / secs)
            row(test, "gbps", got * size * 8 / secs / 1e9 if not err else None, err)
            row(test, "loss_pct", 100.0 * (sent - got) / sent if sent and not err else None, err)
            if path.pids:
                per = {k: v / got * 1e6 for k, v in w.cpu.items()} if got else {}
                row(test, "cpu_us_pkt", w.cpu_total / got * 1e6 if got and not err else None, err,
                    per_daemon=per, cpu_s=w.cpu)  # fmt: skip
        elif test == "ping-idle":
            r = ping(path.pair.a, path.src, path.dst, settings.pings)
            row(test, "rtt_ms", r.get("avg"), r.get("error"), **_ping_extra(r))
        else:  # ping-load: pings in the middle of a TCP run that lasts longer than they do
            load_seconds = max(settings.seconds, settings.pings * 0.1 + 1.5)
            with background(iperf, path.pair, path.src, path.dst, [], load_seconds) as load:
                time.sleep(0.5)  # let TCP ramp up first
                r = ping(path.pair.a, path.src, path.dst, settings.pings)
            lres = load.get("result", {})
            bps = lres.get("end", {}).get("sum_received", {}).get("bits_per_second")
            row(test, "rtt_ms", r.get("avg"), r.get("error") or lres.get("error"),
                load_gbps=bps / 1e9 if bps else None, **_ping_extra(r))  # fmt: skip
        progress.done()
    return stamp(rows, path)
