#!/usr/bin/env python3
"""The native forwarder with each offload on or off, against plain veth, in one run (issue #10, phase 2).

Two network namespaces joined by veth (tests/netns/nsutil.py). For every configuration each namespace
runs tests/netns/fwd_peer.py: a TunPort (``vnet_hdr=True`` when tso is on), a UdpEncapPort on 4500 (or
raw ESP with ``--outer esp``), an engine with one manually keyed aes128gcm16 tunnel SA pair and its
forwarder started with the configuration's fwd_start keywords; the peer answers the few punts. Then
iperf3 runs from A's inner address to B's: TCP with 1 and 4 streams, and UDP with 64-byte IP packets at
the highest rate the sender manages (``-b 0``). ``veth`` is the same iperf3 runs on the veth addresses
with no tunnel. The peers are restarted for every test so that each test's counters are its own.

Figures: Gbit/s and packets/s as iperf3's receiver counted them; CPU per packet = utime + stime of both
peers (``/proc/<pid>/stat``, all threads) over the run / the packets A's forwarder sent (inner packets,
i.e. TCP segments after TSO), in µs. Benchmarks only measure: nothing here asserts a figure.

    sudo .venv/bin/python bench/bench_fwd.py                          # every configuration, 4 s per test
    sudo .venv/bin/python bench/bench_fwd.py --configs veth,base,all --seconds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.suite.common import cpu_seconds, iperf, machine, udp_result  # noqa: E402
from tests.netns import nsutil  # noqa: E402

PEER = REPO / "tests" / "netns" / "fwd_peer.py"
NET_A, NET_B = ("10.77.1.1/24", "10.77.1.0/24"), ("10.77.2.1/24", "10.77.2.0/24")
IN_A, IN_B = "10.77.1.1", "10.77.2.1"
SPI_AB, SPI_BA = 0x7701, 0x7702
KEY_AB, KEY_BA = bytes(range(20)).hex(), bytes(range(20, 40)).hex()

CONFIGS: dict[str, str | None] = {
    "veth": None,  # no tunnel
    "base": "-",  # phase 1: one read/write per packet on the TUN, sendmmsg/recvmmsg outside
    "tso": "tso",
    "tso+coalesce": "tso,coalesce",
    "gso": "gso",
    "gro": "gro",
    "gso+gro": "gso,gro",
    "all": "tso,coalesce,gso,gro",
}
TESTS = {"tcp-1": ["-P", "1"], "tcp-4": ["-P", "4"], "udp-64": ["-u", "-b", "0", "-l", "36"]}


def start_peer(ns: nsutil.Netns, outer: str, local: str, remote: str, net: tuple[str, str], remote_net: str,
               out: tuple[int, str], inn: tuple[int, str], offloads: str,
               batch: int) -> subprocess.Popen[bytes]:  # fmt: skip
    p = ns.popen(sys.executable, str(PEER), outer, local, remote, net[0], remote_net, str(out[0]), out[1],
                 str(inn[0]), inn[1], offloads, str(batch), stdin=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != b"ready":
        p.kill()
        _, err = p.communicate(timeout=10)
        raise RuntimeError(f"fwd_peer did not start: {line!r} {err.decode(errors='replace')[-2000:]}")
    return p


def finish(p: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, err = p.communicate(b"", timeout=20)
    if p.returncode != 0:
        raise RuntimeError(f"fwd_peer failed: {err.decode(errors='replace')[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def wait_ping(pair: nsutil.Pair, dst: str) -> None:
    for _ in range(50):
        if pair.a.run("ping", "-c", "1", "-W", "1", dst, check=False).returncode == 0:
            return
    raise RuntimeError(f"no ping to {dst} through the tunnel")


def figures(test: str, res: dict[str, Any], seconds: float) -> dict[str, float | None]:
    if "error" in res:
        return {"gbps": None, "pps": None}
    if test.startswith("udp"):
        delivered, _sent, secs = udp_result(res, seconds)
        size = 64
        return {"gbps": delivered * size * 8 / secs / 1e9, "pps": delivered / secs}
    bps = float(res["end"]["sum_received"]["bits_per_second"])
    return {"gbps": bps / 1e9, "pps": None}


def run_one(pair: nsutil.Pair, config: str, test: str, args: argparse.Namespace) -> dict[str, Any]:
    offloads = CONFIGS[config]
    row: dict[str, Any] = {"config": config, "test": test}
    if offloads is None:
        res = iperf(pair, pair.addr_a, pair.addr_b, TESTS[test], args.seconds)
        row.update(figures(test, res, args.seconds), cpu_us_pkt=None, error=res.get("error"))
        return row
    a = start_peer(pair.a, args.outer, pair.addr_a, pair.addr_b, NET_A, NET_B[1], (SPI_AB, KEY_AB),
                   (SPI_BA, KEY_BA), offloads, args.batch)  # fmt: skip
    b = start_peer(pair.b, args.outer, pair.addr_b, pair.addr_a, NET_B, NET_A[1], (SPI_BA, KEY_BA),
                   (SPI_AB, KEY_AB), offloads, args.batch)  # fmt: skip
    try:
        wait_ping(pair, IN_B)
        cpu0 = cpu_seconds(a.pid) + cpu_seconds(b.pid)
        res = iperf(pair, IN_A, IN_B, TESTS[test], args.seconds)
        cpu = cpu_seconds(a.pid) + cpu_seconds(b.pid) - cpu0
    finally:
        st_a, st_b = finish(a), finish(b)
    pkts = int(st_a["out_packets"])
    row.update(figures(test, res, args.seconds), error=res.get("error"))
    row["cpu_us_pkt"] = cpu / pkts * 1e6 if pkts else None
    row["counters"] = {
        "a_out_packets": pkts, "a_syscalls": st_a["syscalls"], "b_syscalls": st_b["syscalls"],
        "a_tso": st_a["tso"], "a_gso": st_a["gso"], "b_gro": st_b["gro"], "b_coalesced": st_b["coalesced"],
        "a_tx_errors": {k: v for k, v in st_a["tx_errors"].items() if v},
        "b_drops": st_b["drops"], "b_tx_errors": {k: v for k, v in st_b["tx_errors"].items() if v},
    }  # fmt: skip
    return row


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["config"], {})[r["test"]] = r
    head = ("| technique | TCP 1 stream Gbit/s | TCP 4 streams Gbit/s | UDP 64 B kpps | CPU µs/pkt TCP-1 "
            "| CPU µs/pkt UDP-64 |")  # fmt: skip
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for config, t in by.items():
        udp = t.get("udp-64", {})
        kpps = udp.get("pps")
        lines.append(
            f"| {config} | {fmt(t.get('tcp-1', {}).get('gbps'))} | {fmt(t.get('tcp-4', {}).get('gbps'))} | "
            f"{fmt(kpps / 1e3 if kpps else None, 0)} | {fmt(t.get('tcp-1', {}).get('cpu_us_pkt'))} | "
            f"{fmt(udp.get('cpu_us_pkt'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--tests", default=",".join(TESTS), help=f"comma-separated, of {', '.join(TESTS)}")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--outer", choices=("udp", "esp"), default="udp")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    tests = [t for t in args.tests.split(",") if t]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c!r}")
    rows: list[dict[str, Any]] = []
    with nsutil.netns_pair("bf") as pair:
        for config in configs:
            for test in tests:
                t0 = time.monotonic()
                row = run_one(pair, config, test, args)
                rows.append(row)
                print(f"{config:>14} {test:>7}: {fmt(row['gbps'])} Gbit/s, {fmt(row.get('pps'), 0)} pps, "
                      f"{fmt(row.get('cpu_us_pkt'))} us/pkt ({time.monotonic() - t0:.0f} s)"
                      + (f" error: {row['error']}" if row.get("error") else ""), flush=True)  # fmt: skip
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
