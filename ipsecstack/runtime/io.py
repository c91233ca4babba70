"""Batched packet I/O protocols that backends implement (DESIGN.md §3).

Two planes, as in wireguard-go: the *inner* plane carries plaintext IP packets (TUN, memory pipes),
the *outer* plane protected ones (raw IP sockets for ESP/AH, UDP sockets for ESP-in-UDP, memory
pipes). Both move whole IP packets as ``bytes``, except where the kernel speaks datagrams: a UDP
outer port is also a :class:`DatagramPort` and exchanges ESP-in-UDP with the datapath as payloads
with their endpoints (``wire.udp_encap.Datagram`` / ``OutDatagram``), no IP header built on one side
to be parsed and thrown away on the other.

A port is readiness-driven, never awaited per packet: the runtime calls ``attach(loop, callback)``
once and the port arranges for ``callback()`` to run when packets may be waiting (for a file
descriptor, ``loop.add_reader``). The callback drains with ``read_batch(limit)`` (non-blocking, at
most ``limit`` packets per call; a full batch means "call me again") and answers with
``write_batch(packets)`` (non-blocking; what the kernel refuses is dropped and counted, never
queued without bound). ``close()`` detaches and releases what the port created.

NFQUEUE does not fit read/write: each queued packet needs a verdict, so it has its own
:class:`QueuePort` protocol (read a batch of queued packets, then hand back one verdict each).

Optional capabilities are separate small protocols checked with ``isinstance`` (see
:class:`SupportsMark`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ipsecstack.wire.udp_encap import Datagram, OutDatagram


class BackendError(RuntimeError):
    """A backend cannot start. The message says what is missing and how to get it."""


@runtime_checkable
class PacketPort(Protocol):
    name: str
    mtu: int

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None: ...

    def read_batch(self, limit: int) -> list[bytes]: ...

    def write_batch(self, packets: Sequence[bytes]) -> int: ...

    def close(self) -> None: ...


@runtime_checkable
class DatagramPort(Protocol):
    """An outer port (also a :class:`PacketPort`) with a UDP socket in it, which speaks datagrams."""

    def read_split(self, limit: int) -> tuple[list[Datagram], list[bytes]]:
        """Up to ``limit`` in all: the UDP socket's datagrams, and whole IP packets from any other
        socket in the port (a raw ESP socket beside the UDP one)."""
        ...

    def write_datagrams(self, items: Sequence[OutDatagram]) -> int: ...


class QueuedPacket(Protocol):
    """One packet held by a verdict-based queue (NFQUEUE)."""

    @property
    def payload(self) -> bytes: ...


@runtime_checkable
class QueuePort(Protocol):
    name: str

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None: ...

    def read_batch(self, limit: int) -> list[QueuedPacket]: ...

    def verdicts(self, packets: Sequence[QueuedPacket], replacements: Sequence[bytes | None]) -> None:
        """Accept each packet with its replacement payload, or drop it where the replacement is None."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class SupportsMark(Protocol):
    """A port that can set a firewall mark on what it sends (SO_MARK)."""

    def set_mark(self, mark: int) -> None: ...


class PortStats:
    """Counters every port keeps; the node reports them.

    ``rx_super`` / ``tx_super``: reads and writes that carried more than one packet (a TSO super-packet
    read from a TUN, coalesced TCP written to it; UDP GRO reads and GSO sends): the offloads at work.
    """

    __slots__ = ("rx_bytes", "rx_errors", "rx_packets", "rx_super", "tx_bytes", "tx_dropped", "tx_packets",
                 "tx_super")  # fmt: skip

    def __init__(self) -> None:
        self.rx_packets = 0
        self.rx_bytes = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.tx_dropped = 0
        self.rx_errors = 0
        self.rx_super = 0
        self.tx_super = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}
