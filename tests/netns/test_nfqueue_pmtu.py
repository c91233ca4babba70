"""Path MTU in NFQUEUE transport mode (RFC 4301 §8), as a kernel IPsec stack handles it.

A host's packet grows by the ESP overhead after the kernel sized it for the link. UDP of every size from
64 to 1472 bytes is sent both ways, with the three socket settings an application can have:

- ``dont`` (DF clear): every size arrives; the protected packets that exceed the link MTU are fragmented
  by the kernel (the outer packet, RFC 4301 §8.1);
- ``want`` (Linux's default, DF set while the packet fits the path MTU): the first datagram too big once
  protected is dropped and answered with ICMP "fragmentation needed" carrying ``MTU - overhead``; the
  kernel then fragments the sender's larger datagrams itself, so, sent twice, every size arrives;
- ``do`` (DF always): sizes that fit arrive, larger ones fail at the sender with EMSGSIZE after that
  ICMP, never silently.

Before the datapath answered with ICMP (and routed the protected packets by a table of their own,
``backends/esp_routes.py``), DF-set datagrams over ~1436 bytes vanished without an error. TCP runs both
ways through the same SAs. Manual keys and an IKE-negotiated child.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_transport_nfqueue import assert_transfer_ok, start_agents, stop, transfer
from tests.netns.test_tunnel import Daemon

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

SIZES = range(64, 1473)

RECV = r"""
import json, select, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9000))
got = {}
print("ready", flush=True)
quiet_until = time.monotonic() + 20
while time.monotonic() < quiet_until:
    if select.select([s], [], [], 0.5)[0]:
        n = len(s.recv(65535))
        if n == 1:  # the sender is done
            break
        got[n] = got.get(n, 0) + 1
print(json.dumps(got), flush=True)
"""

SEND = r"""
import json, socket, sys, time
dst, mode, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, {"dont": 0, "want": 1, "do": 2}[mode])  # IP_MTU_DISCOVER
errors = {}
for _ in range(rounds):  # a second sweep resends what was lost while the sender learnt the MTU
    for n in range(64, 1473):
        try:
            s.sendto(b"u" * n, (dst, 9000))
        except OSError as e:
            errors[n] = e.errno
        time.sleep(0.0004)
time.sleep(0.3)
s.sendto(b"!", (dst, 9000))
print(json.dumps(errors), flush=True)
"""

IKE = """
[agent]
log_level = "info"
control_socket = "{sock}"

[connections.host]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]

[connections.host.children.h2h]
mode = "transport"
start_action = "{start}"

[secrets.ike.host]
secret = "transport mode path mtu secret"
"""


def _udp_sizes(
    src: nsutil.Netns, dst_ns: nsutil.Netns, dst: str, mode: str, rounds: int
) -> tuple[set[int], dict[int, int]]:
    recv = dst_ns.popen(sys.executable, "-c", RECV, dst)
    try:
        assert recv.stdout is not None and recv.stdout.readline() == b"ready\n"
        out = src.run(sys.executable, "-c", SEND, dst, mode, str(rounds), timeout=60)
        errors = {int(k): v for k, v in json.loads(out.stdout).items()}
        got = {int(k) for k in json.loads(recv.stdout.readline())}
    finally:
        if recv.poll() is None:
            recv.kill()
        recv.wait(timeout=5)
    return got, errors


def _check_all_sizes(pair: nsutil.Pair) -> None:
    for src, dst_ns, dst in ((pair.a, pair.b, pair.addr_b), (pair.b, pair.a, pair.addr_a)):
        got, errors = _udp_sizes(src, dst_ns, dst, "dont", 1)
        assert not errors and set(SIZES) <= got, f"DF clear: lost {sorted(set(SIZES) - got)[:20]} errors {errors}"
        got, errors = _udp_sizes(src, dst_ns, dst, "want", 2)
        assert not errors and set(SIZES) <= got, f"default PMTU discovery: lost {sorted(set(SIZES) - got)[:20]}"
        got, errors = _udp_sizes(src, dst_ns, dst, "do", 1)
        lost = set(SIZES) - got - set(errors)
        assert len(lost) <= 1, f"DF set: silently lost {sorted(lost)[:20]}"  # at most the one that taught the MTU
        assert errors and min(errors) > 1400 and set(errors.values()) == {90}, errors  # EMSGSIZE above the MTU
        assert set(range(64, min(errors))) <= got | lost, "DF set: a size below the MTU did not arrive"


def test_pmtu_every_udp_size_and_tcp_manual_keys(tmp_path: Path) -> None:
    with nsutil.netns_pair("pm") as pair:
        a, b = start_agents(pair, tmp_path)
        try:
            _check_all_sizes(pair)
            assert_transfer_ok(transfer(pair))
        finally:
            rc_a, err_a = stop(a)
            rc_b, err_b = stop(b)
        assert rc_a == 0 and rc_b == 0, err_a[-2000:] + err_b[-2000:]
        for ns in (pair.a, pair.b):  # the protected packets' routing rule and table are gone
            assert "2471" not in ns.run("ip", "rule").stdout.decode()
            assert ns.run("ip", "route", "show", "table", "2471", check=False).stdout.strip() == b""


def test_pmtu_every_udp_size_and_tcp_ike(tmp_path: Path) -> None:
    with nsutil.netns_pair("pi") as pair:
        for side, local, remote, start in (
            ("b", pair.addr_b, pair.addr_a, "none"),
            ("a", pair.addr_a, pair.addr_b, "start"),
        ):
            (tmp_path / f"{side}.toml").write_text(IKE.format(sock=tmp_path / f"{side}.sock", local=local,
                                                              remote=remote, start=start))  # fmt: skip
        db = Daemon(pair.b, tmp_path / "b.toml")
        nsutil.wait_for(db.started, timeout=20, what="responder")
        da = Daemon(pair.a, tmp_path / "a.toml")
        try:
            for d in (da, db):
                nsutil.wait_for(lambda d=d: "child sa installed" in d.output(), timeout=25,
                                what=f"child SA in {d.ns.name}:\n{d.output()}")  # fmt: skip
            _check_all_sizes(pair)
            assert_transfer_ok(transfer(pair))
        except (AssertionError, subprocess.SubprocessError) as e:
            raise AssertionError(f"{e}\n--- A ---\n{da.output()[-3000:]}\n--- B ---\n{db.output()[-3000:]}") from None
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0]
