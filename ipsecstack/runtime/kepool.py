"""MODP key pairs made ahead of time in a worker thread, for the IKE SAs to take.

Theory of operation
-------------------
A MODP key exchange costs two modular exponentiations in OpenSSL: our public value g^x and the
shared secret y^x (milliseconds each; figures in :mod:`ipsecstack.ike.groups`). Only the second one
needs the peer's value, so the first one can be done before the exchange starts. For every MODP
group it serves (the configured ones from the start, and any other the IKE SAs ask for), the pool
keeps up to ``depth`` key pairs ready. :meth:`KeyPairPool.take` is the
:data:`~ipsecstack.ike.groups.KeyPairSource` that the sans-IO IKE manager calls on the event loop.
It hands out a ready pair, each pair at most once, and starts a refill. It returns None when no pair
is ready: during a burst of exchanges, for a group it has not served yet, or for an ECP or
Curve25519 group, which is cheap anyway. The IKE SA then makes its pair at once from its ``rng``.

The private exponents are drawn from the injected ``rng`` on the event loop, in the order the pairs
are requested. Only the exponentiation (``Group.modp_keypair``) runs in the worker thread. One thread
is enough, because ``cryptography`` holds the GIL while OpenSSL computes: the thread moves that work
to the loop's idle time, but it cannot overlap it with the loop. So a refill is started only once the
callback that took a pair has returned (``call_soon``), not in the middle of the exchange that needs
the loop, and an exponentiation that has already started when a datagram arrives delays that
datagram by at most one exponentiation. The results come
back as asyncio futures, so the ready pairs are only touched on the event loop. A failed
exponentiation is counted in ``stats`` and not retried until the next ``take``. ``close()`` cancels
the work in flight and forgets the pairs.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ipsecstack.entropy import Rng
from ipsecstack.ike.groups import Group, KeyPair

DEFAULT_DEPTH = 4  # ready pairs per group: a few exchanges at once before falling back to inline work


class KeyPairPool:
    def __init__(self, groups: Iterable[Group], rng: Rng, *, depth: int = DEFAULT_DEPTH) -> None:
        self.rng = rng
        self.depth = depth
        self._groups: dict[int, Group] = {g.number: g for g in groups if g.kind == "modp"}
        self._ready: dict[int, deque[KeyPair]] = {n: deque() for n in self._groups}
        self._in_flight: dict[int, int] = dict.fromkeys(self._groups, 0)
        self._futures: set[asyncio.Future[KeyPair]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self.stats: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start making pairs for every group the pool serves."""
        self._loop = loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ike-keypairs")
        for number in self._groups:
            self._refill(number)

    def ready(self, group: Group) -> int:
        """How many pairs of ``group`` are ready now."""
        return len(self._ready.get(group.number, ()))

    def take(self, group: Group) -> KeyPair | None:
        """A ready key pair of ``group`` (never handed out twice), or None: then the caller makes one."""
        if group.kind != "modp" or self._closed:
            return None
        if group.number not in self._groups:
            self._groups[group.number] = group
            self._ready[group.number] = deque()
            self._in_flight[group.number] = 0
        ready = self._ready[group.number]
        pair = ready.popleft() if ready else None
        self._count("taken" if pair is not None else "missed")
        if self._loop is not None:
            # after the callback that took it: a refill started now would contend with the rest of this exchange
            self._loop.call_soon(self._refill, group.number)
        return pair

    def _refill(self, number: int) -> None:
        if self._loop is None or self._executor is None or self._closed:
            return
        group = self._groups[number]
        while len(self._ready[number]) + self._in_flight[number] < self.depth:
            x = group.modp_exponent(self.rng)  # on the loop: the rng is the caller's, used in order
            fut: asyncio.Future[KeyPair] = self._loop.run_in_executor(self._executor, group.modp_keypair, x)
            self._in_flight[number] += 1
            self._futures.add(fut)
            fut.add_done_callback(functools.partial(self._made, number))

    def _made(self, number: int, fut: asyncio.Future[KeyPair]) -> None:
        self._futures.discard(fut)
        self._in_flight[number] -= 1
        if self._closed or fut.cancelled():
            return
        if fut.exception() is not None:
            self._count("failed")
            return
        self._ready[number].append(fut.result())
        self._count("made")

    def close(self) -> None:
        self._closed = True
        for fut in list(self._futures):
            fut.cancel()
        self._futures.clear()
        for ready in self._ready.values():
            ready.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
