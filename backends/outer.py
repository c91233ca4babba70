"""The outer plane as a set of ports used at once (DESIGN.md §3): raw ESP/AH and ESP-in-UDP side by side.

Theory of operation
-------------------
The kernel sends each SA the way IKE negotiated it: ESP (protocol 50) or AH (51) straight in IP when
no NAT is on the path, ESP in UDP (RFC 3948) when there is one, both at once on one host. This port
does the same for the datapath: it owns a :class:`~backends.rawsock.RawPort` and a
:class:`~backends.udp.UdpEncapPort` and

- **sends** datagrams (``write_datagrams``) and every whole packet whose IP protocol is UDP (an SA
  with ``udp_encap`` on the native transforms) through the UDP socket, everything else (ESP, AH)
  through the raw socket;
- **reads** both: one readiness callback for the pair; ``read_split`` (a
  :class:`~ipsecstack.runtime.io.DatagramPort`) drains the UDP socket first as datagrams (it also
  carries IKE on port 4500, which the datapath hands back through ``to_ike``), then the raw sockets
  as packets, at most ``limit`` in all (a full batch means "call me again"); ``read_batch`` gives the
  same as whole packets;
- offers the UDP socket's extras (``send_ike``, ``send_keepalive``, ``port``) so the IKE endpoint
  serves port 4500 on it, and sets a firewall mark on both.

Nothing is queued here: each sub-port drops and counts what the kernel refuses; ``stats`` adds them up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from backends.rawsock import RawPort
from backends.udp import UdpEncapPort
from ipsecstack.runtime.io import PortStats
from ipsecstack.wire.ip import PROTO_UDP
from ipsecstack.wire.outer import parse_outer
from ipsecstack.wire.udp_encap import Datagram, OutDatagram

PROTO_ESP = 50
PROTO_AH = 51


def is_udp(pkt: bytes) -> bool:
    """The outer IP packet carries UDP (ESP in UDP), not ESP/AH directly."""
    if len(pkt) < 20:
        return False
    if pkt[0] >> 4 == 4:
        return pkt[9] == PROTO_UDP
    if len(pkt) < 40:
        return False
    nh = pkt[6]
    if nh in (PROTO_UDP, PROTO_ESP, PROTO_AH):
        return nh == PROTO_UDP
    try:  # extension headers first (transport mode may keep them)
        _v, _off, nh_field, _end = parse_outer(pkt)
    except Exception:
        return False
    return pkt[nh_field] == PROTO_UDP


class _SumStats:
    """The sum of the sub-ports' counters (:class:`PortStats` fields), read live."""

    def __init__(self, ports: Sequence[RawPort | UdpEncapPort]) -> None:
        self._ports = ports

    def __getattr__(self, name: str) -> int:
        if name in PortStats.__slots__:
            return sum(int(getattr(p.stats, name)) for p in self._ports)
        raise AttributeError(name)

    def as_dict(self) -> dict[str, int]:
        return {k: sum(int(getattr(p.stats, k)) for p in self._ports) for k in PortStats.__slots__}


class OuterSet:
    """Raw ESP/AH and ESP-in-UDP as one :class:`~ipsecstack.runtime.io.PacketPort`."""

    def __init__(self, raw: RawPort, udp: UdpEncapPort) -> None:
        self.raw = raw
        self.udp = udp
        self.name = f"{raw.name}+{udp.name}"
        self.mtu = min(raw.mtu, udp.mtu)
        self.port = udp.port
        self.stats = _SumStats((raw, udp))

    # --- the UDP socket's extras (IKE on port 4500) -------------------------------------------------

    def send_ike(self, message: bytes, addr: str, port: int) -> bool:
        return self.udp.send_ike(message, addr, port)

    def send_keepalive(self, addr: str, port: int = 4500) -> bool:
        return self.udp.send_keepalive(addr, port)

    def set_mark(self, mark: int) -> None:
        self.raw.set_mark(mark)
        self.udp.set_mark(mark)

    # --- PacketPort ---------------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None:
        self.udp.attach(loop, on_readable)
        self.raw.attach(loop, on_readable)

    def read_split(self, limit: int) -> tuple[list[Datagram], list[bytes]]:
        """:class:`~ipsecstack.runtime.io.DatagramPort`: the UDP socket's datagrams first, then raw packets."""
        dgrams = self.udp.read_datagrams(limit)
        return dgrams, self.raw.read_batch(limit - len(dgrams)) if len(dgrams) < limit else []

    def write_datagrams(self, items: Sequence[OutDatagram]) -> int:
        return self.udp.write_datagrams(items)

    def read_batch(self, limit: int) -> list[bytes]:
        out = self.udp.read_batch(limit)
        if len(out) < limit:
            out += self.raw.read_batch(limit - len(out))
        return out

    def write_batch(self, packets: Sequence[bytes]) -> int:
        udp: list[bytes] = []
        raw: list[bytes] = []
        for pkt in packets:
            (udp if is_udp(pkt) else raw).append(pkt)
        sent = 0
        if raw:
            sent += self.raw.write_batch(raw)
        if udp:
            sent += self.udp.write_batch(udp)
        return sent

    def close(self) -> None:
        for p in (self.udp, self.raw):
            with contextlib.suppress(Exception):
                p.close()

    def __repr__(self) -> str:
        return f"OuterSet({self.raw!r}, {self.udp!r})"
