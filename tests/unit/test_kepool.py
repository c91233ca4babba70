"""The runtime's pool of MODP key pairs made ahead of time in a worker thread (runtime/kepool.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike.groups import GROUPS, Group
from ipsecstack.runtime.kepool import KeyPairPool

MODP2048, MODP3072, X25519 = GROUPS[14], GROUPS[15], GROUPS[31]


async def _until(cond: Callable[[], bool]) -> None:
    for _ in range(500):  # at most 5 s
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the pool did not fill in time")


def _run(coro: Any) -> list[dict[str, Any]]:
    """Run ``coro`` in a fresh loop; returns what reached the loop's exception handler."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        await coro

    asyncio.run(main())
    return errors


def test_pairs_are_made_in_the_worker_in_rng_order_and_handed_out_once(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = Group.modp_keypair

    def spy(self: Group, x: int) -> Any:
        threads.append(threading.current_thread().name)
        return real(self, x)

    monkeypatch.setattr(Group, "modp_keypair", spy)
    pool = KeyPairPool([MODP2048, X25519], seeded_rng(5), depth=2)
    taken: list[Any] = []

    async def scenario() -> None:
        assert pool.take(MODP2048) is None  # not started: the IKE SA makes its own pair
        pool.start(asyncio.get_running_loop())
        await _until(lambda: pool.ready(MODP2048) == 2)
        first, second = pool.take(MODP2048), pool.take(MODP2048)
        assert pool.take(MODP2048) is None  # both handed out; the refill has not come back yet
        await _until(lambda: pool.ready(MODP2048) == 2)
        third = pool.take(MODP2048)
        assert first is not None and second is not None and third is not None
        taken.extend((first, second, third))
        assert pool.take(X25519) is None and pool.ready(X25519) == 0  # cheap groups are not pooled
        assert pool.take(MODP3072) is None  # a MODP group not configured is served from then on
        await _until(lambda: pool.ready(MODP3072) == 2)
        pool.close()
        assert pool.take(MODP2048) is None and pool.ready(MODP2048) == 0

    assert _run(scenario()) == []
    assert len(threads) >= 6 and all(name.startswith("ike-keypairs") for name in threads)
    # the exponents come from the pool's rng on the loop, in order: the same pairs as generate() in a row
    rng = seeded_rng(5)
    assert [pub for _, pub in taken] == [MODP2048.generate(rng)[1] for _ in range(3)]
    (a, pub_a), (b, pub_b) = taken[:2]
    assert MODP2048.shared(a, pub_b) == MODP2048.shared(b, pub_a)
    # made: 4 + 2 of MODP3072, and the refill after the third take unless close() came first
    assert pool.stats["missed"] == 3 and pool.stats["taken"] == 3 and pool.stats["made"] in (6, 7)


def test_close_with_work_in_flight_is_quiet_and_a_failure_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = KeyPairPool([MODP2048], seeded_rng(6), depth=3)

    async def closing() -> None:
        pool.start(asyncio.get_running_loop())
        pool.close()  # three exponentiations queued or running
        await asyncio.sleep(0.2)
        assert pool.ready(MODP2048) == 0

    assert _run(closing()) == []

    def broken(self: Group, x: int) -> Any:
        raise ValueError("no OpenSSL today")

    monkeypatch.setattr(Group, "modp_keypair", broken)
    failing = KeyPairPool([MODP2048], seeded_rng(7), depth=1)

    async def failure() -> None:
        failing.start(asyncio.get_running_loop())
        await _until(lambda: failing.stats.get("failed") == 1)
        assert failing.take(MODP2048) is None  # the caller makes its own; the pool tries once more
        await _until(lambda: failing.stats.get("failed") == 2)
        failing.close()

    assert _run(failure()) == []
