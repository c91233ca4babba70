"""MODP key pairs made ahead of time in a worker process, for the IKE SAs to take.

Theory of operation
-------------------
A MODP key exchange costs two modular exponentiations in OpenSSL: our public value g^x and the
shared secret y^x (milliseconds each; figures in :mod:`ipsecstack.ike.groups`). Only the second one
needs the peer's value, so the first one can be done before the exchange starts. For every MODP
group it serves (the configured ones from the start, and any other the IKE SAs ask for), the pool
keeps up to ``depth`` key pairs ready. :meth:`KeyPairPool.take` is the
:data:`~ipsecstack.ike.groups.KeyPairSource` that the sans-IO IKE manager calls on the event loop.
It hands out a ready pair, each pair at most once, and starts a refill. It returns None when no pair
is ready: during a burst of exchanges, for a group it has not served yet, once the worker is given
up, or for an ECP or Curve25519 group, which is cheap anyway. The IKE SA then makes its pair at once
from its ``rng``.

The private exponents are drawn from the injected ``rng`` on the event loop, in the order the pairs
are requested. Only the exponentiation g^x runs elsewhere: in a worker process
(:mod:`ipsecstack.runtime.kexworker`), because ``cryptography`` holds the GIL while OpenSSL computes,
so a thread would stall the loop for each whole exponentiation. The worker is our own child on a
local pipe, in the same trust domain as the daemon; it receives (group number, x) in fixed binary
frames, answers g^x, and never logs. The loop side only builds the OpenSSL key from x and g^x (tens
of microseconds). Requests go out as the pool empties (at most ``depth`` per group in flight, a few
kilobytes: a pipe write never blocks) and the answers, in request order, are read when the pipe is
readable (``add_reader``), so the ready pairs are only touched on the event loop. A refused or
failed exponentiation is counted in ``stats`` (``failed``) and not retried until the next ``take``.

Measured with a 1 ms periodic task on the loop while 10 MODP4096 IKE_SA_INITs, 30 ms apart, are
answered from a warm pool (2 shared cores under a load of 4, 8 runs each; one modexp took 20-50 ms):
with a worker thread, the worst stall was 119-159 ms (an exchange and a refill back to back), 44-76 ms
outside the exchanges, and 0.97-1.12 s of ~1.5 s went to stalls over 2 ms; with the worker process,
the worst stall is 30-72 ms, 4.7-9.2 ms outside the exchanges (the ticker alone: 6.6-7.8 ms on that
machine), 0.28-0.63 s of ~1.2 s. What remains is the exchange itself: the IKE core computes the
shared secret y^x on the loop.

Lifecycle. The worker is started only when the pool serves a MODP group, by :meth:`launch` (the
agent calls it before it drops root, so the worker starts from an installation only root may be
able to read; it then becomes the ``[agent] user`` itself before reading a request) or else when
first needed. It is started with ``subprocess``, not ``fork``: the daemon has threads and an event
loop. :meth:`close` kills it; if the daemon dies, EOF on its stdin and ``PR_SET_PDEATHSIG`` end it.
A worker that dies (EOF on its stdout, a write that fails, a garbled answer) is counted
(``worker_died``, and its requests in flight as ``lost``) and started again, at most
``max_restarts`` times in the daemon's life; after that the pool hands out nothing and every IKE
SA makes its own pairs, as without a pool. A worker started after the privilege drop (again, or the
first one when only a reload brought a MODP group) starts as the user: then the Python installation
must be readable by it, or the start fails (``worker_start_failed``, tried again at the next
``take``) or the worker dies at once, and the starts run out the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections import deque
from collections.abc import Iterable
from typing import Any

from ipsecstack.entropy import Rng
from ipsecstack.ike.groups import Group, KeyPair
from ipsecstack.runtime import kexworker
from ipsecstack.runtime.privs import Account

DEFAULT_DEPTH = 4  # ready pairs per group: a few exchanges at once before falling back to inline work
MAX_RESTARTS = 3  # worker processes started again after one died, in the daemon's life
_READ_SIZE = 1 << 16


class _Worker:
    """The worker process and our ends of its pipes."""

    def __init__(self, user: Account | None) -> None:
        self.proc = subprocess.Popen(
            kexworker.command(user), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True, start_new_session=True, bufsize=0,
        )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self.stdout, False)

    def send(self, data: bytes) -> bool:
        """Write one request; False if the worker is gone."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.stdin, view) :]
        except OSError:
            return False
        return True

    def close(self) -> int | None:
        """Kill and reap the worker; its exit status if known."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1.0)
        return self.proc.returncode


class KeyPairPool:
    def __init__(self, groups: Iterable[Group], rng: Rng, *, depth: int = DEFAULT_DEPTH,
                 max_restarts: int = MAX_RESTARTS, log: Any = None) -> None:  # fmt: skip
        self.rng = rng
        self.depth = depth
        self.max_restarts = max_restarts
        self.log = log
        self._groups: dict[int, Group] = {g.number: g for g in groups if g.kind == "modp"}
        self._ready: dict[int, deque[KeyPair]] = {n: deque() for n in self._groups}
        self._in_flight: dict[int, int] = dict.fromkeys(self._groups, 0)
        self._sent: deque[tuple[int, int]] = deque()  # (group number, x) asked of the worker, in order
        self._answers = bytearray()  # read from the worker, not yet a whole answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: _Worker | None = None
        self._user: Account | None = None
        self._starts = 0
        self._closed = False
        self.stats: dict[str, int] = {}

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    @property
    def worker_pid(self) -> int | None:
        """The worker process's pid while one runs."""
        return self._worker.proc.pid if self._worker is not None else None

    def launch(self, user: Account | None = None) -> None:
        """Start the worker now if the pool serves a MODP group; it becomes ``user`` before reading a request.

        For a daemon that drops root later (``[agent] user``): see the module docstring.
        """
        self._user = user
        if self._groups and self._worker is None and not self._closed:
            self._spawn()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start making pairs for every group the pool serves."""
        self._loop = loop
        if self._worker is not None:
            loop.add_reader(self._worker.stdout, self._readable)
        self._refill_all()

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
            # after the callback that took it: the pool's draws from the rng (the IKE SAs' too) never fall inside it
            self._loop.call_soon(self._refill, group.number)
        return pair

    def _spawn(self) -> bool:
        if self._starts > self.max_restarts:
            return False
        self._starts += 1
        try:
            worker = _Worker(self._user)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            self._count("worker_start_failed")
            self._warn("ike key-pair worker cannot start", error=str(e))
            return False
        self._worker = worker
        self._count("worker_started")
        if self._loop is not None:
            self._loop.add_reader(worker.stdout, self._readable)
        return True

    def _refill_all(self) -> None:
        for number in list(self._groups):
            self._refill(number)

    def _refill(self, number: int) -> None:
        if self._loop is None or self._closed:
            return
        if self._worker is None and not self._spawn():
            return
        group = self._groups[number]
        while self._worker is not None and len(self._ready[number]) + self._in_flight[number] < self.depth:
            x = group.modp_exponent(self.rng)  # on the loop: the rng is the caller's, used in order
            if not self._worker.send(bytes([number]) + x.to_bytes(group.size, "big")):
                self._died()
                return
            self._sent.append((number, x))
            self._in_flight[number] += 1

    def _readable(self) -> None:
        worker = self._worker
        if worker is None:
            return
        try:
            data = os.read(worker.stdout, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died()
            return
        self._answers += data
        while self._sent and self._answers:
            number, x = self._sent[0]
            group = self._groups[number]
            status = self._answers[0]
            if status == kexworker.OK:
                if len(self._answers) < 1 + group.size:
                    return  # the rest of this answer comes with the next read
                public = bytes(self._answers[1 : 1 + group.size])
                del self._answers[: 1 + group.size]
            elif status == kexworker.REFUSED:
                public = None
                del self._answers[:1]
            else:
                break
            self._sent.popleft()
            self._in_flight[number] -= 1
            try:
                if public is None:
                    raise ValueError("refused")
                self._ready[number].append((group.modp_key(x, public), public))
            except ValueError:
                self._count("failed")
            else:
                self._count("made")
        if self._answers:  # an answer nobody asked for, or one that is none
            self._died()

    def _died(self) -> None:
        """The worker is gone (or talks nonsense): forget it and what it owed; start another if allowed."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(worker.stdout)
        code = worker.close()
        self._count("worker_died")
        self._count("lost", len(self._sent))
        self._sent.clear()
        self._answers.clear()
        self._in_flight = dict.fromkeys(self._groups, 0)
        left = self.max_restarts + 1 - self._starts
        self._warn("ike key-pair worker died", exit_code=code, restarts_left=max(left, 0))
        if self._loop is not None and not self._closed:
            self._loop.call_soon(self._refill_all)

    def _warn(self, event: str, **kw: Any) -> None:
        if self.log is not None:
            self.log.warning(event, **kw)

    def close(self) -> None:
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(worker.stdout)
            worker.close()
        self._sent.clear()
        for ready in self._ready.values():
            ready.clear()
