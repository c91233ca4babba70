"""The native forwarder through real TUN devices and a veth link: two namespaces, ping and TCP.

Each namespace runs tests/netns/fwd_peer.py: a TunPort, an outer port (UdpEncapPort on 4500, or a
RawPort for ESP: esp4 receive + raw4 send) and an engine whose forwarder moves the packets, with a small
Python loop answering the punts as the daemon will. After a flow's first packets every packet of it
stays in the engine's threads; the counters printed at the end say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.native.native_helpers import needs_native
from tests.netns import nsutil

pytestmark = [pytest.mark.root, needs_native]
DATAPATH_ENGINES = ("default",)  # the engine's forwarder is driven directly, no daemon (tests/engine_param.py)

PEER = Path(__file__).with_name("fwd_peer.py")
NET_A, NET_B = ("10.71.1.1/24", "10.71.1.0/24"), ("10.71.2.1/24", "10.71.2.0/24")
SPI_AB, SPI_BA = 0x7001, 0x7002
KEY_AB, KEY_BA = bytes(range(20)).hex(), bytes(range(20, 40)).hex()
SIZE = 2 << 20

SERVER = """
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 5201)); srv.listen(1); srv.settimeout(20)
print("listening", flush=True)
c, _ = srv.accept(); c.settimeout(15); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = """
import socket, sys, time
data = sys.stdin.buffer.read()
for _ in range(50):
    try:
        s = socket.create_connection((sys.argv[1], 5201), timeout=5); break
    except OSError:
        time.sleep(0.1)
s.settimeout(15); s.sendall(data); s.close()
"""


def _start_peer(ns: nsutil.Netns, outer: str, local: str, remote: str, net: tuple[str, str],
                remote_net: str, out: tuple[int, str], inn: tuple[int, str],
                offloads: str = "-") -> subprocess.Popen[bytes]:  # fmt: skip
    p = ns.popen(sys.executable, str(PEER), outer, local, remote, net[0], remote_net, str(out[0]), out[1],
                 str(inn[0]), inn[1], offloads, stdin=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != b"ready":
        p.kill()
        _, err = p.communicate(timeout=10)
        raise AssertionError(f"fwd_peer did not start: {line!r} {err.decode(errors='replace')[-2000:]}")
    return p


def _finish(p: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, err = p.communicate(b"", timeout=15)  # stdin closed: the peer prints its counters and exits
    assert p.returncode == 0, err.decode(errors="replace")[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("outer", ["udp", "esp"])
def test_ping_and_tcp_through_the_forwarder(outer: str) -> None:
    with nsutil.netns_pair("fw") as pair:
        a = _start_peer(pair.a, outer, pair.addr_a, pair.addr_b, NET_A, NET_B[1], (SPI_AB, KEY_AB), (SPI_BA, KEY_BA))
        b = _start_peer(pair.b, outer, pair.addr_b, pair.addr_a, NET_B, NET_A[1], (SPI_BA, KEY_BA), (SPI_AB, KEY_AB))
        stats: list[dict[str, Any]] = []
        try:
            ping = pair.a.run("ping", "-c", "5", "-i", "0.2", "-W", "2", "10.71.2.1", check=False, timeout=30)
            assert ping.returncode == 0, ping.stdout.decode() + ping.stderr.decode()
            server = pair.b.popen(sys.executable, "-c", SERVER, "10.71.2.1")
            assert server.stdout is not None
            assert server.stdout.readline().strip() == b"listening"
            data = os.urandom(SIZE)
            pair.a.run(sys.executable, "-c", CLIENT, "10.71.2.1", input=data, timeout=60)
            out, _ = server.communicate(timeout=30)
            n, digest = out.split()
            assert int(n) == SIZE and digest.decode() == hashlib.sha256(data).hexdigest()
        finally:
            for p in (a, b):
                if p.poll() is None:
                    stats.append(_finish(p))
        st_a, st_b = stats
        # nearly everything stayed in the engine's threads: a handful of punts per flow and direction
        assert st_a["out_packets"] > 1000 and st_b["in_packets"] > 1000, (st_a, st_b)
        assert st_a["handled"]["out"] < 20 and st_b["handled"]["in"] < 20, (st_a["handled"], st_b["handled"])
        assert st_a["punt_dropped"] == 0 and st_b["punt_dropped"] == 0
        assert st_b["drops"].get("bad_icv", 0) == 0 and st_b["drops"].get("replay", 0) == 0


def _csum_errors(ns: nsutil.Netns) -> dict[str, int]:
    """InCsumErrors of IP/TCP/UDP in the namespace (/proc/net/snmp): what the kernel refused."""
    lines = ns.run("cat", "/proc/net/snmp").stdout.decode().splitlines()
    out: dict[str, int] = {}
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        names, nums = head.split()[1:], vals.split()[1:]
        for k, v in zip(names, nums, strict=True):
            if k == "InCsumErrors":
                out[head.split(":")[0]] = int(v)
    return out


def test_offloads_tso_coalesce_gso_gro_through_real_tun_and_veth() -> None:
    """TUN with IFF_VNET_HDR and TSO on both ends, UDP_SEGMENT and UDP_GRO outside: ping sizes up to the
    MTU and a hash-checked TCP transfer in both directions; the receiving kernels accept every segment
    (no checksum errors), so the segments the engine cut and the super-packets it coalesced are right."""
    offloads = "tso,coalesce,gso,gro"
    with nsutil.netns_pair("fo") as pair:
        a = _start_peer(pair.a, "udp", pair.addr_a, pair.addr_b, NET_A, NET_B[1], (SPI_AB, KEY_AB), (SPI_BA, KEY_BA),
                        offloads)  # fmt: skip
        b = _start_peer(pair.b, "udp", pair.addr_b, pair.addr_a, NET_B, NET_A[1], (SPI_BA, KEY_BA), (SPI_AB, KEY_AB),
                        offloads)  # fmt: skip
        stats: list[dict[str, Any]] = []
        try:
            for size in (56, 1000, 1372):  # 1372 + 28 = the TUN's MTU of 1400
                ping = pair.a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s", str(size), "10.71.2.1",
                                  check=False, timeout=30)  # fmt: skip
                assert ping.returncode == 0, (size, ping.stdout.decode() + ping.stderr.decode())
            for src_ns, dst_ns, dst in ((pair.a, pair.b, "10.71.2.1"), (pair.b, pair.a, "10.71.1.1")):
                server = dst_ns.popen(sys.executable, "-c", SERVER, dst)
                assert server.stdout is not None
                assert server.stdout.readline().strip() == b"listening"
                data = os.urandom(SIZE * 4)
                src_ns.run(sys.executable, "-c", CLIENT, dst, input=data, timeout=60)
                out, _ = server.communicate(timeout=30)
                n, digest = out.split()
                assert int(n) == len(data) and digest.decode() == hashlib.sha256(data).hexdigest()
            errors = {"a": _csum_errors(pair.a), "b": _csum_errors(pair.b)}
        finally:
            for p in (a, b):
                if p.poll() is None:
                    stats.append(_finish(p))
        st_a, st_b = stats
        assert errors["a"] and all(v == 0 for e in errors.values() for v in e.values()), errors
        for st in (st_a, st_b):
            assert st["offloads"] == {"tso": True, "coalesce": True, "gso": True, "gro": True}
            assert st["tso"]["super"] > 0 and st["tso"]["segments"] > st["tso"]["super"], st["tso"]
            assert st["gso"]["sends"] > 0 and st["gro"]["super"] > 0, (st["gso"], st["gro"])
            assert st["coalesced"]["writes"] > 0, st["coalesced"]
            assert st["punt_dropped"] == 0 and st["drops"].get("bad_icv", 0) == 0 and st["drops"].get("replay", 0) == 0
            assert not any(st["tx_errors"].values()), st["tx_errors"]
