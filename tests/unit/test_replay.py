"""Anti-replay window against a naive reference model, and ESN inference (RFC 4303 §3.4.3, App. A)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecstack.errors import ConfigError, Reason
from ipsecstack.replay import ReplayWindow


class NaiveWindow:
    """The RFC's words, literally: a set of received numbers and the highest one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.top = 0
        self.seen: set[int] = set()

    def check(self, seq: int) -> str | None:
        if seq == 0:
            return Reason.TOO_OLD
        if seq > self.top:
            return None
        if seq <= self.top - self.size:
            return Reason.TOO_OLD
        return Reason.REPLAY if seq in self.seen else None

    def update(self, seq: int) -> None:
        self.seen.add(seq)
        self.top = max(self.top, seq)


@settings(max_examples=300, deadline=None)
@given(
    size=st.sampled_from([32, 64, 65, 100, 128, 1000, 4096]),
    ops=st.lists(
        st.tuples(st.integers(min_value=-300, max_value=5000), st.booleans()),
        min_size=1,
        max_size=300,
    ),
)
def test_window_matches_naive_model(size: int, ops: list[tuple[int, bool]]) -> None:
    real = ReplayWindow(size)
    ref = NaiveWindow(size)
    base = 0
    for delta, icv_ok in ops:
        seq = max(0, base + delta)
        assert real.check(seq) == ref.check(seq), (seq, real.top)
        # RFC 4303 §3.4.3: only packets whose ICV verified update the window.
        if ref.check(seq) is None and icv_ok:
            real.update(seq)
            ref.update(seq)
            base = max(base, seq)
    lo = max(1, ref.top - size + 1)
    assert real.snapshot() == sorted(s for s in ref.seen if s >= lo)


def test_large_jump_clears_the_window() -> None:
    w = ReplayWindow(4096)
    for s in range(1, 5000):
        w.update(s)
    w.update(10_000_000)
    assert w.check(10_000_000) == Reason.REPLAY
    assert w.check(9_999_999) is None
    assert w.check(10_000_000 - 4096) == Reason.TOO_OLD
    assert w.snapshot() == [10_000_000]


def test_default_and_sizes() -> None:
    assert ReplayWindow().size == 64
    for bad in (1, 31, -1, 1 << 21):
        with pytest.raises(ConfigError, match="replay_window"):
            ReplayWindow(bad)


def test_disabled_window_accepts_duplicates_but_not_zero() -> None:
    w = ReplayWindow(0)
    w.update(5)
    assert w.check(5) is None
    assert w.check(0) == Reason.TOO_OLD


@settings(max_examples=500, deadline=None)
@given(
    top=st.integers(min_value=1, max_value=(1 << 40)),
    size=st.sampled_from([32, 64, 1024]),
    low=st.integers(min_value=0, max_value=(1 << 32) - 1),
)
def test_esn_inference_picks_the_candidate_in_range(top: int, size: int, low: int) -> None:
    """Appendix A2.2: the inferred number is the unique one with these low bits in
    [top - W + 1, top - W + 2^32] (or -1 if that would be before the SA began)."""
    w = ReplayWindow(size)
    w.top = top
    got = w.infer(low)
    lo = top - size + 1
    candidates = [((top >> 32) + d) << 32 | low for d in (-1, 0, 1)]
    want = next(c for c in candidates if lo <= c <= lo + (1 << 32) - 1)
    assert got == (want if want >= 0 else -1)


def test_esn_inference_across_the_boundary() -> None:
    w = ReplayWindow(64)
    w.top = (1 << 32) - 10  # window near the end of sub-space 0
    assert w.infer(5) == (1 << 32) + 5  # wrapped sender
    assert w.infer((1 << 32) - 20) == (1 << 32) - 20
    w.top = (1 << 32) + 3  # window spans sub-spaces 0 and 1
    assert w.infer((1 << 32) - 30) == (1 << 32) - 30
    assert w.infer(2) == (1 << 32) + 2
    w.top = 3  # at the very start there is no sub-space -1
    assert w.infer(0xFFFFFFF0) == -1
