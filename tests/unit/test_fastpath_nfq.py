"""QueueFastPath's answer to the TCP queue's "qseg" punts and to the raw-ESP inbound thread's "in" and
"outer" punts (runtime/fastpath_nfq.py), with a recording engine.

A segment of a super-packet whose flow the engine did not know is protected by the Python datapath and sent
on the engine's raw socket (``nfq_send``), and the flow is taught (``learn_out``) so that the next
super-packets stay in the engine.
The bytes sent decrypt, at the peer's datapath, to the segment; a segment no policy covers is dropped.
Plaintext the engine decrypted from a raw ESP socket passes the RFC 4301 §5.2 check and enters the inject
TUN (its flow taught), or is dropped; ESP the engine does not hold is decrypted by Python into the TUN.
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

    def learn_in(self, spi: int, inner: bytes) -> None:
        self.learnt.append((bytes(inner), spi))

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


class Inject:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def fileno(self) -> int:
        return -1

    def write_batch(self, packets: list[bytes]) -> int:
        self.written += packets
        return len(packets)


def _raw_path(dp: Datapath, engine: RecordingEngine, inject: Inject) -> QueueFastPath:
    node = Node(dp, queue_out=FakeQueue(), queue_in=FakeQueue())  # type: ignore[arg-type]
    return QueueFastPath(node, engine, FakeQueue(), FakeQueue(), esp_fds={4: -1}, inject=inject)  # type: ignore[arg-type]


def test_raw_in_punts_enter_the_inject_tun_after_the_policy_check() -> None:
    engine, inject = RecordingEngine(), Inject()
    fp = _raw_path(_dp("b"), engine, inject)
    seg = _segment(A, B)
    fp.answer([("in", 0x1001, seg)])
    assert inject.written == [seg] and engine.learnt == [(seg, 0x1001)] and fp.punts["in"] == 1
    # the SA left while its packet was on its way: dropped, nothing written or taught
    fp.answer([("in", 0x7777, seg)])
    assert inject.written == [seg] and len(engine.learnt) == 1 and fp.punts["in"] == 2


def test_raw_outer_punts_are_decrypted_by_python_into_the_tun() -> None:
    dp_a, engine, inject = _dp("a"), RecordingEngine(), Inject()
    seg = _segment(A, B)
    esp = dp_a.outbound([seg], 0.0).to_network[0]
    fp = _raw_path(_dp("b"), engine, inject)
    fp.answer([("outer", esp), ("outer", esp)])  # the second is a replay (RFC 4303 §3.4.3): dropped
    assert inject.written == [seg] and fp.punts["outer"] == 2


def test_raw_esp_needs_the_inject_tun() -> None:
    import pytest

    node = Node(_dp("b"), queue_out=FakeQueue(), queue_in=FakeQueue())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="go together"):
        QueueFastPath(node, RecordingEngine(), FakeQueue(), FakeQueue(), esp_fds={4: 3})  # type: ignore[arg-type]
