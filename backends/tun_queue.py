"""A TUN device's queue bounded in bytes: its length in packets follows the size of what goes through it.

Theory of operation
-------------------
The kernel queues packets for a TUN device's reader in a ring of ``txqueuelen`` entries (500 by
default). The TUN driver orphans what it queues, so TCP's small-queue limit does not apply, and a bulk
flow fills the ring: with TSO every entry may be a 64 KiB super-packet, 32 MB in all, and each packet of
every other flow (a ping, a DNS answer, an interactive session) waits behind it for tens of
milliseconds. Nothing reports the ring's depth (the driver drops at a full ring rather than stop the
queue, so the qdisc never holds a backlog, and no AQM can see it), but its length can be changed at any
time (``SIOCSIFTXQLEN``: the driver resizes the ring).

So :class:`QueueSizer` keeps the ring near ``budget`` bytes, as byte queue limits do for a NIC: every
``period`` seconds it reads the device's transmit counters (what the reader took from the ring), and from
the bytes per entry since the last look it derives the length ``budget / bytes-per-entry``, clamped to
``[MIN_LEN, max_len]``. Bulk TCP (64 KiB entries) gets a short ring; small packets, whose senders burst,
get the kernel's default. The length changes only when the new one is at least twice or at most half the
current one (no resizing on noise) and only after traffic (an idle period keeps what was there). When a
counter cannot be read or the length cannot be set, the sizer logs it once and stops: the device keeps
working with the length it has.

:func:`next_length` is the decision alone, for tests.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIN_LEN = 16  # at least a few reads' worth: the reader's thread is off the CPU now and then
SIOCSIFTXQLEN = 0x8943


def next_length(current: int, packets: int, nbytes: int, budget: int, max_len: int) -> int | None:
    """The ring length for ``budget`` bytes given the last period's traffic, or None to keep ``current``."""
    if packets <= 0 or nbytes <= 0:
        return None
    want = max(MIN_LEN, min(max_len, budget * packets // nbytes))
    if want == current or (current // 2 < want < current * 2 and want not in (MIN_LEN, max_len)):
        return None
    return want


class QueueSizer:
    """Resize ``name``'s ring every ``period`` s to hold about ``budget`` bytes (see the module docstring)."""

    def __init__(self, name: str, *, budget: int, max_len: int = 500, period: float = 0.2,
                 sys_net: str = "/sys/class/net", log: Any = None) -> None:  # fmt: skip
        self.name = name
        self.budget = budget
        self.max_len = max_len
        self.period = period
        self.length = max_len
        self.changes = 0
        self.log = log
        self._stats = Path(sys_net) / name / "statistics"
        self._last: tuple[int, int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None

    def open(self) -> None:
        """Start from ``max_len`` and the counters as they are now (OSError when either is out of reach)."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._set(self.max_len)
        self._last = self._read()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """open(), then step() every ``period`` s on ``loop`` until stop()."""
        self._loop = loop
        self._then_again(self.open)

    def step(self) -> int | None:
        """One look at the counters (what the timer runs): the new length when it changed, else None."""
        now = self._read()
        want = None
        if self._last is not None:
            want = next_length(self.length, now[0] - self._last[0], now[1] - self._last[1], self.budget,
                               self.max_len)  # fmt: skip
            if want is not None:
                self._set(want)
                self.changes += 1
        self._last = now
        return want

    def stats(self) -> dict[str, object]:
        return {"txqueuelen": self.length, "budget_kb": self.budget // 1024, "changes": self.changes,
                "running": self._sock is not None}  # fmt: skip

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read(self) -> tuple[int, int]:
        packets = int((self._stats / "tx_packets").read_text())
        nbytes = int((self._stats / "tx_bytes").read_text())
        return packets, nbytes

    def _set(self, length: int) -> None:
        assert self._sock is not None
        req = struct.pack("16si", self.name.encode(), length)
        fcntl.ioctl(self._sock.fileno(), SIOCSIFTXQLEN, req.ljust(40, b"\0"))
        self.length = length

    def _give_up(self, e: OSError) -> None:
        if self.log is not None:
            self.log.warning("TUN queue sizing off", device=self.name, error=e.strerror or str(e),
                             txqueuelen=self.length)  # fmt: skip
        self.stop()

    def _tick(self) -> None:
        self._timer = None
        self._then_again(self.step)

    def _then_again(self, work: Callable[[], object]) -> None:
        """``work``, then the next tick; an OSError (the counters or the ioctl out of reach) ends sizing."""
        try:
            work()
        except OSError as e:
            self._give_up(e)
            return
        if self._loop is not None and self._sock is not None:
            self._timer = self._loop.call_later(self.period, self._tick)
