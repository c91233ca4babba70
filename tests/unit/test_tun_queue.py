"""The TUN queue's length from its traffic (backends/tun_queue.py ``next_length``), no root needed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from backends.tun_queue import MIN_LEN, next_length

MiB = 1 << 20


def test_bulk_tcp_gets_a_short_ring_small_packets_the_default() -> None:
    # 64 KiB TSO super-packets: 1 MiB is 16 of them
    assert next_length(500, 1000, 1000 * 65536, MiB, 500) == 16
    # 1400-byte packets: 749 would fit, the default is the ceiling
    assert next_length(16, 1000, 1000 * 1400, MiB, 500) == 500
    # 64-byte packets, already at the ceiling: no change
    assert next_length(500, 1000, 64_000, MiB, 500) is None


def test_idle_keeps_the_length_and_small_moves_are_ignored() -> None:
    assert next_length(16, 0, 0, MiB, 500) is None
    assert next_length(100, 10, 10 * 8000, MiB, 500) is None  # 131: within 2x of 100
    assert next_length(100, 10, 10 * 4000, MiB, 500) == 262  # twice or more: resized
    assert next_length(100, 10, 10 * 15000, MiB, 500) is None  # 69: above half of 100
    assert next_length(100, 10, 10 * 30000, MiB, 500) == 34  # half or less: resized
    assert next_length(100, 10, 10 * 65536, MiB, 500) == MIN_LEN  # the floor
    assert next_length(20, 10, 10 * 65536, MiB, 500) == MIN_LEN  # reached even from within 2x of it


@given(st.integers(MIN_LEN, 5000), st.integers(0, 10**6), st.integers(0, 10**10), st.integers(1, 1 << 30),
       st.integers(MIN_LEN, 5000))  # fmt: skip
def test_always_within_bounds(current: int, packets: int, nbytes: int, budget: int, max_len: int) -> None:
    got = next_length(current, packets, nbytes, budget, max_len)
    if got is not None:
        assert MIN_LEN <= got <= max(MIN_LEN, max_len) and got != current
    if packets == 0 or nbytes == 0:
        assert got is None
