"""TunPort(vnet_hdr=True) for Python's own reads and writes: the virtio_net_hdr stripped and added, the
checksums the kernel left unfinished (TUN_F_CSUM) finished, so callers see plain, valid IP packets; and
the device's queue length as asked (txqueuelen)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.netns import nsutil

pytestmark = pytest.mark.root
DATAPATH_ENGINES = ("default",)  # TunPort's own reads and writes, no datapath engine (tests/engine_param.py)

SCRIPT = r"""
import json, socket, struct, subprocess, time
from backends.tun import TunPort
from backends import tun_offload as t
tun = TunPort("vnt0", mtu=1400, addresses=["10.99.0.1/24"], vnet_hdr=True, txqueuelen=16)
link = json.loads(subprocess.run(["ip", "-j", "link", "show", "vnt0"], capture_output=True, check=True).stdout)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"x" * 1000, ("10.99.0.2", 9))
c = socket.socket(); c.setblocking(False)
try:
    c.connect(("10.99.0.2", 80))
except BlockingIOError:
    pass
# an echo request from 10.99.0.2 written into the TUN: the kernel answers it
icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping")
struct.pack_into("!H", icmp, 2, ~t.csum(icmp) & 0xFFFF)
ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0,
               socket.inet_aton("10.99.0.2"), socket.inet_aton("10.99.0.1")))
struct.pack_into("!H", ip, 10, ~t.csum(ip) & 0xFFFF)
sent = tun.write_batch([bytes(ip + icmp)])
got = []
deadline = time.monotonic() + 3
while time.monotonic() < deadline and len(got) < 3:
    got += [p for p in tun.read_batch(16) if p[0] >> 4 == 4]  # (IPv6 router solicitations aside)
    time.sleep(0.05)
def ok(p):
    l3 = (p[0] & 15) * 4
    proto = p[9]
    if proto == 1:
        return t.csum(p[l3:]) == 0xFFFF
    return t.csum(p[l3:], t.pseudo(p, proto, len(p) - l3)) == 0xFFFF
print(json.dumps({"offloads": tun.offloads, "sent": sent, "txqlen": link[0]["txqlen"],
                  "got": [[p[9], len(p), ok(p), t.csum(p[:20]) == 0xFFFF] for p in got]}))
tun.close()
"""


def test_python_reads_and_writes_on_a_vnet_hdr_tun() -> None:
    with nsutil.netns_pair("vn") as pair:
        out = pair.a.run(sys.executable, "-c", SCRIPT, timeout=30)
        res = json.loads(out.stdout.decode().strip().splitlines()[-1])
        assert res["offloads"] & 0x07 == 0x07 and res["sent"] == 1
        assert res["txqlen"] == 16  # [agent] tun_txqueuelen
        by_proto = {g[0]: g for g in res["got"]}
        assert set(by_proto) >= {1, 6, 17}, res
        assert by_proto[17][1] == 1028  # the UDP datagram, whole
        assert all(g[2] and g[3] for g in res["got"]), res  # every L4 and IPv4 checksum valid
