"""Datapath backends in one harness: UDP packets/s at 64/512/1400 bytes and TCP throughput (iperf3).

Scenarios (each in two fresh network namespaces joined by a veth pair, torn down afterwards):

- ``veth``: no IPsec at all, iperf3 between the veth addresses (the baseline every ratio uses);
- ``tun+raw``: tunnel mode, TUN inner side, ESP over raw IP sockets, iperf3 between the inner subnets;
- ``tun+udp``: the same with ESP in UDP (RFC 3948) on port 4500;
- ``nfqueue``: transport mode on the hosts' own traffic through NFQUEUE;
- ``memory``: two nodes in one process over in-memory links (no kernel), for the core's ceiling.

Packet sizes are whole IP packets (the iperf3 UDP payload is the size minus 28 bytes of headers).
Needs root. Prints a table with the machine's details and writes JSON to bench/results/.

    PYTHONPATH=. python3 bench/bench_backends.py [--quick] [--seconds 5] [--only tun+udp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.netns import nsutil  # noqa: E402

SIZES = (64, 512, 1400)
KEY = "5a" * 20
KEY2 = "a5" * 20


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from ipsecstack.runtime.loop import loop_name

        loop = loop_name()
    except ImportError:
        loop = "?"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "event_loop": loop,
        "iperf3": subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
    }


def agent_config(pair: nsutil.Pair, side: str, scenario: str, datapath: str | None = None,
                 sock: str | None = None) -> str:  # fmt: skip
    """The daemon's configuration; ``datapath`` and ``sock`` add ``[agent] datapath`` and ``control_socket``."""
    text = _agent_config(pair, side, scenario)
    extra = (f'datapath = "{datapath}"\n' if datapath else "") + (f'control_socket = "{sock}"\n' if sock else "")
    return text.replace("[agent]\n", "[agent]\n" + extra, 1)


def _agent_config(pair: nsutil.Pair, side: str, scenario: str) -> str:
    a_side = side == "a"
    local, remote = (pair.addr_a, pair.addr_b) if a_side else (pair.addr_b, pair.addr_a)
    spi_in, spi_out = (0x2001, 0x1001) if a_side else (0x1001, 0x2001)
    key_in, key_out = (KEY2, KEY) if a_side else (KEY, KEY2)
    if scenario == "nfqueue":
        return f"""
[agent]
inner_backend = "nfqueue"
outer_backend = "nfqueue"
log_level = "warning"

[manual.bench]
mode = "transport"
local_addrs = "{local}"
remote_addrs = "{remote}"
spi_in = {spi_in}
spi_out = {spi_out}
key_in = "{key_in}"
key_out = "{key_out}"
"""
    lnet, rnet = ("10.1.0.0/16", "10.2.0.0/16") if a_side else ("10.2.0.0/16", "10.1.0.0/16")
    tun_addr = "10.1.0.1/16" if a_side else "10.2.0.1/16"
    outer = "udp" if scenario == "tun+udp" else "raw"
    return f"""
[agent]
inner_backend = "tun"
outer_backend = "{outer}"
tun_addrs = ["{tun_addr}"]
log_level = "warning"

[manual.bench]
mode = "tunnel"
local_addrs = "{local}"
remote_addrs = "{remote}"
local_ts = ["{lnet}"]
remote_ts = ["{rnet}"]
spi_in = {spi_in}
spi_out = {spi_out}
key_in = "{key_in}"
key_out = "{key_out}"
encap = {"true" if outer == "udp" else "false"}
"""


def iperf(pair: nsutil.Pair, server_addr: str, args: list[str], seconds: float) -> dict[str, Any]:
    server = pair.b.popen("iperf3", "-s", "-1", "-B", server_addr)
    try:
        time.sleep(0.3)
        cmd = ["iperf3", "-c", server_addr, "-t", str(seconds), "-J", "--connect-timeout", "5000", *args]
        try:
            out = pair.a.run(*cmd, check=False, timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            # e.g. a UDP flood starving iperf3's own control connection through a full queue
            return {"error": f"iperf3 did not finish within {seconds + 20:.0f}s"}
        try:
            return json.loads(out.stdout)  # type: ignore[no-any-return]
        except json.JSONDecodeError:
            return {"error": out.stderr.decode(errors="replace")[-300:]}
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=5)
        pair.b.procs.remove(server)


def engine_status(sock: str) -> dict[str, Any]:
    """``datapath`` and ``python_sas`` from a daemon's ``status`` (or {"error": why})."""
    from ipsecstack.runtime import control

    deadline = time.monotonic() + 10
    while not Path(sock).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        st = control.request(sock, "status", timeout=5)
    except (OSError, ValueError) as e:
        return {"error": f"control socket {sock}: {type(e).__name__}: {e}"}
    if not st.get("ok"):
        return {"error": str(st.get("error"))}
    return {"datapath": st["result"].get("datapath"), "python_sas": st["result"].get("python_sas") or {}}


def measure_kernel(scenario: str, seconds: float, sizes: tuple[int, ...],
                   datapath: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """UDP per size and one TCP run over ``scenario``; with ``datapath``, each row's ``engine_seen`` is what
    both daemons' control sockets said they run."""
    rows: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}
    with nsutil.netns_pair("bn") as pair, tempfile.TemporaryDirectory() as tmp:
        target = pair.addr_b
        if scenario != "veth":
            for side, ns in (("a", pair.a), ("b", pair.b)):
                cfg = Path(tmp) / f"{side}.toml"
                sock = str(Path(tmp) / f"{side}.sock") if datapath else None
                cfg.write_text(agent_config(pair, side, scenario, datapath, sock))
                ns.ipsecstack("run", "-c", str(cfg))
            if scenario.startswith("tun"):
                target = "10.2.0.1"
                nsutil.wait_for(lambda: pair.a.run("ping", "-c1", "-W1", "-I", "10.1.0.1", target, check=False)
                                .returncode == 0, timeout=15, what="tunnel up")  # fmt: skip
            else:
                time.sleep(1.0)
            if datapath:
                seen = {side: engine_status(str(Path(tmp) / f"{side}.sock")) for side in ("a", "b")}
        for size in sizes:
            res = iperf(pair, target, ["-u", "-b", "0", "-l", str(size - 28)], seconds)
            end = res.get("end", {}).get("sum", {})
            pkts = max(0, end.get("packets", 0) - end.get("lost_packets", 0))
            secs = end.get("seconds") or seconds
            rows.append({"scenario": scenario, "test": f"udp-{size}", "pps": pkts / secs,
                         "gbps": pkts * size * 8 / secs / 1e9, "error": res.get("error")})  # fmt: skip
        res = iperf(pair, target, [], seconds)
        bps = res.get("end", {}).get("sum_received", {}).get("bits_per_second", 0.0)
        rows.append({"scenario": scenario, "test": "tcp", "pps": None, "gbps": bps / 1e9, "error": res.get("error")})
    if seen:
        for r in rows:
            r["engine_seen"] = seen
    return rows


def measure_memory(seconds: float, sizes: tuple[int, ...], datapath: str | None = None) -> list[dict[str, Any]]:
    from backends.memory import MemoryLink
    from ipsecstack.config import build_datapath, parse
    from ipsecstack.runtime import logs
    from ipsecstack.runtime.node import Node
    from ipsecstack.wire import ip

    logs.configure("console", "warning")

    agent = f'[agent]\ndatapath = "{datapath}"\n' if datapath else ""

    def cfg(local: str, remote: str, lnet: str, rnet: str, a: bool) -> str:
        manual = f"""
[manual.m]
local_addrs = "{local}"
remote_addrs = "{remote}"
local_ts = ["{lnet}"]
remote_ts = ["{rnet}"]
spi_in = {0x2001 if a else 0x1001}
spi_out = {0x1001 if a else 0x2001}
key_in = "{KEY2 if a else KEY}"
key_out = "{KEY if a else KEY2}"
"""
        return agent + manual

    rows = []
    seen: dict[str, Any] = {}
    for size in sizes:
        pkt = ip.build_ipv4(0, size, 1, True, 64, 17, bytes([10, 1, 0, 1]), bytes([10, 2, 0, 1])) + bytes(size - 20)

        async def run(pkt: bytes = pkt) -> tuple[int, float]:
            app_a, wire, app_b = (
                MemoryLink(capacity=1 << 16),
                MemoryLink(capacity=1 << 16),
                MemoryLink(capacity=1 << 16),
            )
            na = Node(build_datapath(parse(cfg("172.31.0.1", "172.31.0.2", "10.1.0.0/16", "10.2.0.0/16", True)), 0),
                      app_a.b, wire.a)  # fmt: skip
            nb = Node(build_datapath(parse(cfg("172.31.0.2", "172.31.0.1", "10.2.0.0/16", "10.1.0.0/16", False)), 0),
                      app_b.a, wire.b)  # fmt: skip
            seen.update({side: {"datapath": n.datapath.engine_name,
                                "python_sas": n.counters().get("python_sas") or {}}
                         for side, n in (("a", na), ("b", nb))})  # fmt: skip
            na.start()
            nb.start()
            got = 0
            t0 = time.perf_counter()
            deadline = t0 + seconds
            while time.perf_counter() < deadline:
                app_a.a.write_batch([pkt] * 256)
                await asyncio.sleep(0)
                got += len(app_b.b.drain())
            for _ in range(100):
                await asyncio.sleep(0)
                got += len(app_b.b.drain())
            dt = time.perf_counter() - t0
            na.stop()
            nb.stop()
            return got, dt

        from ipsecstack.runtime.loop import run as run_loop

        got, dt = run_loop(run())
        rows.append({"scenario": "memory", "test": f"udp-{size}", "pps": got / dt, "gbps": got * size * 8 / dt / 1e9,
                     "error": None, **({"engine_seen": dict(seen)} if datapath else {})})  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each iperf3 run (default 5)")
    ap.add_argument("--quick", action="store_true", help="2-second runs, 64 and 1400 bytes only")
    ap.add_argument("--only", action="append", help="scenario(s): veth, tun+raw, tun+udp, nfqueue, memory")
    ap.add_argument("--json", type=Path, help="output file (default bench/results/backends-<time>.json)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_backends: needs root (network namespaces, TUN, NFQUEUE)", file=sys.stderr)
        return 2
    seconds = 2.0 if args.quick else args.seconds
    sizes = (64, 1400) if args.quick else SIZES
    scenarios = args.only or ["veth", "tun+raw", "tun+udp", "nfqueue", "memory"]
    if "veth" not in scenarios:
        scenarios = ["veth", *scenarios]
    info = machine()
    print("ipsecstack backend benchmark")
    for k, v in info.items():
        print(f"  {k:<11} {v}")
    rows: list[dict[str, Any]] = []
    for sc in scenarios:
        print(f"  running {sc} ...", flush=True)
        rows += measure_memory(seconds, sizes) if sc == "memory" else measure_kernel(sc, seconds, sizes)
    base = {r["test"]: r for r in rows if r["scenario"] == "veth"}
    for r in rows:
        b = base.get(r["test"])
        r["ratio_vs_veth"] = (r["gbps"] / b["gbps"]) if b and b["gbps"] else None
    print(f"\n{'scenario':<10} {'test':<10} {'packets/s':>12} {'Gbit/s':>8} {'vs veth':>8}")
    for r in rows:
        pps = f"{r['pps']:,.0f}" if r["pps"] is not None else "-"
        ratio = f"{r['ratio_vs_veth']:.3f}" if r["ratio_vs_veth"] is not None else "-"
        err = f"  ERROR {r['error']}" if r.get("error") else ""
        print(f"{r['scenario']:<10} {r['test']:<10} {pps:>12} {r['gbps']:>8.3f} {ratio:>8}{err}")
    out = args.json or REPO / "bench" / "results" / f"backends-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "seconds": seconds, "rows": rows}, indent=2))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
