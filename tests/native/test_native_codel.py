"""CoDel on the native engine's ESP receive queues (native/codel.c, RFC 8289), no root needed.

The state machine is checked on its own (``_engine.codel_trace``) against the RFC's schedule and a
Python model of RFC 8289 §5, with Hypothesis; then through the forwarder: ESP datagrams that waited in
the socket longer than the target are dropped as ``queue_delay`` before any decryption, and none are
when CoDel is off or the target is above their wait.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.native.fwd_helpers import SPI_AB, Peer, peers, take, wait_until
from tests.native.native_helpers import needs_native, udp_packet

pytestmark = needs_native

MS = 1_000_000  # ns
SO_TIMESTAMPNS = 35  # Linux; Python's socket module does not name it


def trace(target: int, interval: int, dequeues: list[tuple[int, int]]) -> list[int]:
    from ipsecstack.native import _engine

    return [i for i, d in enumerate(_engine.codel_trace(target, interval, dequeues)) if d]


@dataclass
class Model:
    """RFC 8289 §5 as prose: the reference the C state machine is held to."""

    target: int
    interval: int
    first_above: int = 0
    drop_next: int = 0
    count: int = 0
    lastcount: int = 0
    dropping: bool = False

    def _next(self, t: int) -> int:
        return t + int(self.interval / math.sqrt(self.count))

    def _may_drop(self, now: int, sojourn: int) -> bool:
        if sojourn < self.target:
            self.first_above = 0
            return False
        if self.first_above == 0:
            self.first_above = now + self.interval
            return False
        return now >= self.first_above

    def dequeue(self, now: int, sojourn: int) -> bool:
        ok = self._may_drop(now, sojourn)
        if self.dropping:
            if not ok:
                self.dropping = False
                return False
            if now >= self.drop_next:
                self.count += 1
                self.drop_next = self._next(self.drop_next)
                return True
            return False
        if not ok:
            return False
        delta = self.count - self.lastcount
        recent = now - self.drop_next < 16 * self.interval
        self.count = delta if delta > 1 and recent else 1
        self.dropping = True
        self.drop_next = self._next(now)
        self.lastcount = self.count
        return True


def test_the_drop_schedule_of_a_standing_queue() -> None:
    # a queue that never drains below 10 ms, one dequeue per ms: nothing for the first interval, then
    # drops at 100, 200, 200 + 100/sqrt(2), ... (RFC 8289 §5.4 control law)
    got = trace(5 * MS, 100 * MS, [(i * MS, 10 * MS) for i in range(400)])
    assert got == [100, 200, 271, 329, 379]


def test_a_queue_below_target_or_a_short_burst_is_never_dropped_from() -> None:
    assert trace(5 * MS, 100 * MS, [(i * MS, 4 * MS) for i in range(1000)]) == []
    # above target for less than an interval, then drained: a burst the buffer is there for
    burst = [(i * MS, 50 * MS) for i in range(99)] + [(99 * MS, 0)] + [(i * MS, 50 * MS) for i in range(100, 199)]
    assert trace(5 * MS, 100 * MS, burst) == []


def test_dropping_ends_below_target_and_resumes_at_the_last_rate() -> None:
    standing = [(i * MS, 10 * MS) for i in range(400)]
    calm = [(i * MS, 1 * MS) for i in range(400, 420)]
    again = [(i * MS, 10 * MS) for i in range(420, 800)]
    got = trace(5 * MS, 100 * MS, standing + calm + again)
    first = [i for i in got if i < 400]
    later = [i for i in got if i >= 420]
    assert first == [100, 200, 271, 329, 379] and later
    # back within 16 intervals: the second episode starts from count - lastcount (§5.5), so its drops
    # come faster than the first episode's first two (100 ms apart)
    assert later[1] - later[0] < 100


def test_off_never_drops() -> None:
    assert trace(0, 100 * MS, [(i * MS, 10_000 * MS) for i in range(500)]) == []


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 20).map(lambda x: x * MS),
    st.integers(0, 60).map(lambda x: x * MS // 4),
    st.lists(st.tuples(st.integers(0, 5 * MS), st.integers(0, 40 * MS)), max_size=300),
)
def test_the_state_machine_matches_the_model(interval_scale: int, target: int, steps: list[tuple[int, int]]) -> None:
    interval = 10 * interval_scale
    now, dequeues = 1, []
    for gap, sojourn in steps:
        now += gap
        dequeues.append((now, sojourn))
    model = Model(target, interval)
    want = [i for i, (t, s) in enumerate(dequeues) if target > 0 and model.dequeue(t, s)]
    assert trace(target, interval, dequeues) == want


# --- through the forwarder ------------------------------------------------------------------------


def _queue(a: Peer, b: Peer, n: int) -> None:
    """``n`` ESP datagrams from A's forwarder waiting in B's socket (B's forwarder not started)."""
    pkt = udp_packet(4, 40)
    a.send_inner(pkt)
    assert take(a, 1) == [("out", pkt)]
    a.engine.learn_out(pkt, SPI_AB)
    with _sock(b) as s:
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # as fwd_start sets it: stamped on arrival
    for _ in range(n // 500):
        a.send_inner(pkt, 500)
        time.sleep(0.005)  # A's socketpair stand-in for a TUN holds only so much
    wait_until(lambda: a.engine.fwd_stats()["out_packets"] >= n, what=f"A sent {n}")
    time.sleep(0.2)  # every datagram in B's queue has now waited 200 ms or more


def _received(b: Peer, n: int) -> dict[str, int]:
    got = 0

    def all_seen() -> bool:
        nonlocal got
        got += len(b.engine.take_punts(4096))
        st_b = b.engine.fwd_stats()
        return got + st_b["drops"].get("queue_delay", 0) + st_b["punt_dropped"] >= n

    wait_until(all_seen, timeout=20, what=f"B handled {n} datagrams")
    st_b = b.engine.fwd_stats()
    return {"punted": got + st_b["punt_dropped"], "shed": st_b["drops"].get("queue_delay", 0)}


N = 6000


def _sock(p: Peer) -> socket.socket:
    return socket.socket(fileno=os.dup(p.port.fileno()))  # a second handle on the port's socket


def _deep_buffer(p: Peer) -> None:
    with _sock(p) as s:
        deep = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 4 << 20
    if not deep:
        pytest.skip("needs a receive buffer of several MB (SO_RCVBUFFORCE: root) to hold a standing queue")


@pytest.mark.parametrize(("target_us", "interval_us", "expect_shed"),
                         [(100, 1000, True), (0, 1000, False), (10_000_000, 20_000_000, False)])  # fmt: skip
def test_datagrams_that_waited_too_long_are_shed_before_decryption(target_us: int, interval_us: int,
                                                                   expect_shed: bool) -> None:  # fmt: skip
    with peers(start=False) as (a, b):
        _deep_buffer(b)
        a.start()
        _queue(a, b, N)
        b.start(codel_target_us=target_us, codel_interval_us=interval_us)
        seen = _received(b, N)
        assert seen["punted"] + seen["shed"] == N
        if expect_shed:
            # draining 6000 datagrams takes more than the 1 ms interval, all of them 200 ms old
            assert seen["shed"] > 0
            assert b.engine.stats()["drops"].get("queue_delay") == seen["shed"]
            # shed before unprotect: the SA saw only what was decrypted
            assert b.engine.sa_stats("in", SPI_AB)["packets"] == seen["punted"]
        else:
            assert seen["shed"] == 0


def test_codel_arguments_are_checked() -> None:
    with peers(start=False) as (a, _b):
        with pytest.raises(ValueError, match="codel_target_us must be below codel_interval_us"):
            a.start(codel_target_us=5000, codel_interval_us=5000)
        with pytest.raises(ValueError, match="codel_interval_us"):
            a.start(codel_target_us=10, codel_interval_us=10)
