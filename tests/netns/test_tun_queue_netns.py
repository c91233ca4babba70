"""backends/tun_queue.py on a real TUN device in a namespace: the ring's length follows the bytes per
packet the reader takes from it (the kernel's transmit counters, SIOCSIFTXQLEN), and the daemon's
default configuration sizes its TUN this way."""

from __future__ import annotations

import json
import sys

import pytest

from tests.netns import nsutil

pytestmark = pytest.mark.root
DATAPATH_ENGINES = ("default",)  # the TUN device alone, no datapath engine (tests/engine_param.py)

SCRIPT = r"""
import json, socket, time
from backends.tun import TunPort
from backends.tun_queue import QueueSizer
tun = TunPort("tq0", mtu=9000, addresses=["10.98.0.1/24"])
sizer = QueueSizer("tq0", budget=64 * 1024)
sizer.open()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def burst(size, n=200):
    got = 0
    for i in range(0, n, 8):  # 8 at a time: even a 16-entry ring holds them
        for _ in range(8):
            u.sendto(b"x" * size, ("10.98.0.2", 9))
        want, deadline = i + 8, time.monotonic() + 3
        while got < want and time.monotonic() < deadline:
            got += len([p for p in tun.read_batch(64) if p[0] >> 4 == 4])
    return got
def qlen():
    return int(open("/sys/class/net/tq0/tx_queue_len").read())
out = {"start": qlen()}
out["big_read"] = burst(8000)
out["big_step"] = sizer.step()
out["big_qlen"] = qlen()
out["small_read"] = burst(100)
out["small_step"] = sizer.step()
out["small_qlen"] = qlen()
out["idle_step"] = sizer.step()
sizer.stop()
tun.close()
print(json.dumps(out))
"""


def test_the_ring_follows_the_packet_size() -> None:
    with nsutil.netns_pair("tq") as pair:
        out = pair.a.run(sys.executable, "-c", SCRIPT, timeout=30)
        res = json.loads(out.stdout.decode().strip().splitlines()[-1])
        assert res["start"] == 500 and res["big_read"] == 200 and res["small_read"] == 200, res
        # 64 KiB of 8028-byte packets: 8 fit, the floor is 16
        assert res["big_step"] == 16 and res["big_qlen"] == 16, res
        # 128-byte packets: 512 would fit, the ceiling is 500
        assert res["small_step"] == 500 and res["small_qlen"] == 500, res
        assert res["idle_step"] is None  # nothing went through: the length stays
