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
                remote_net: str, out: tuple[int, str], inn: tuple[int, str]) -> subprocess.Popen[bytes]:  # fmt: skip
    p = ns.popen(sys.executable, str(PEER), outer, local, remote, net[0], remote_net, str(out[0]), out[1],
                 str(inn[0]), inn[1], stdin=subprocess.PIPE)  # fmt: skip
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
