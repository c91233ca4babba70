"""QueueFastPath's answer to the TCP queue's "qseg" punts (runtime/fastpath_nfq.py), with a recording engine.

A segment of a super-packet whose flow the engine did not know is protected by the Python datapath and sent
on the engine's raw socket (``nfq_send``), and the flow is taught (``learn_out``) so that the next
super-packets stay in the engine.
The bytes sent decrypt, at the peer's datapath, to the segment; a segment no policy covers is dropped.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ipsecstack.config import build_datapath, parse
from ipsecstack.datapath import Datapath
from ipsecstack.runtime.fastpath_nfq import QueueFastPath
from ipsecstack.runtime.node import Node
from ipsecstack.wire import ip
from tests.netns import nsutil
from tests.netns.test_transport_nfqueue import _config

A, B = "192.0.2.1", "192.0.2.2"


def _dp(side: str) -> Datapath:
    """The manual transport-mode ESP host of the NFQUEUE tests (tests/netns/test_transport_nfqueue.py)."""
    pair = nsutil.Pair(nsutil.Netns("x"), nsutil.Netns("y"), A, B, "", "")
    return build_datapath(parse(_config(pair, side, "esp", False, "")), 0.0)


class FakeQueue:
    fd, queue_num, mark = -1, 10, None


class RecordingEngine:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.learnt: list[tuple[bytes, int | None]] = []

    def nfq_send(self, packet: bytes) -> bool:
        self.sent.append(bytes(packet))
        return True

    def learn_out(self, pkt: bytes, spi: int | None, *, mtu: int = 0) -> None:
        self.learnt.append((bytes(pkt), spi))

    def nfq_verdict(self, *args: Any, **kwargs: Any) -> bool:
        raise AssertionError("a segment has no packet id to give a verdict for")


def _segment(src: str, dst: str) -> bytes:
    tcp = bytes.fromhex("c35001bb0000000100000000501000ff00000000") + b"x" * 1000
    return (
        ip.build_ipv4(
            0, 20 + len(tcp), 7, True, 64, 6, ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
        )
        + tcp
    )


def test_qseg_is_protected_sent_and_its_flow_taught() -> None:
    dp_a = _dp("a")
    dp_b = _dp("b")
    engine = RecordingEngine()
    fp = QueueFastPath(Node(dp_a, queue_out=FakeQueue(), queue_in=FakeQueue()), engine, FakeQueue(), FakeQueue())  # type: ignore[arg-type]
    seg = _segment(A, B)
    fp.answer([("qseg", seg)])
    assert fp.punts["qseg"] == 1 and fp.send_errors == 0
    assert len(engine.sent) == 1 and engine.sent[0][9] == 50  # ESP, transport mode
    assert engine.learnt == [(seg, 0x1001)]
    res = dp_b.inbound([engine.sent[0]], 0.0)
    assert res.to_inner == [seg]


def test_qseg_no_policy_covers_is_dropped_not_sent() -> None:
    dp_a = _dp("a")
    engine = RecordingEngine()
    node = Node(dp_a, queue_out=FakeQueue(), queue_in=FakeQueue())  # type: ignore[arg-type]
    fp = QueueFastPath(node, engine, FakeQueue(), FakeQueue())  # type: ignore[arg-type]
    fp.answer([("qseg", _segment(A, "198.51.100.7"))])  # RFC 4301 §5.1: no SPD entry -> discard
    assert fp.punts["qseg"] == 1 and engine.sent == [] and engine.learnt == []
