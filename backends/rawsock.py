"""The outer plane on raw IP sockets: ESP (protocol 50) and AH (51) without UDP encapsulation.

Theory of operation
-------------------
The datapath reads and writes whole IP packets; raw sockets almost give it that.

Receiving: one ``SOCK_RAW`` socket per protocol (ESP, AH), bound to ``local`` when given, so the
kernel delivers only packets addressed to it (a userspace check of the destination backs this up).
An IPv4 raw socket hands over the packet with its IP header. An IPv6 raw socket strips the header
(and any extension headers), so the port rebuilds a 40-byte header from what ``recvmsg`` reports:
the source from the sender's address, the destination from ``IPV6_PKTINFO``, the traffic class from
``IPV6_TCLASS`` (the ECN bits matter to RFC 6040 decapsulation) and the hop limit from
``IPV6_HOPLIMIT``; the next header is the socket's protocol. The flow label is lost (zero).
Each socket has its own readiness flag, so a wake-up drains only the sockets that are readable.

Sending: one ``IPPROTO_RAW`` socket, which on Linux implies "header included" for IPv4
(``IP_HDRINCL``) and for IPv6 alike: the datapath's packet goes out byte for byte (DSCP/ECN, DF,
hop limit as the datapath set them), routed by its destination address. The kernel does not
fragment such packets; one larger than the route MTU is refused (``EMSGSIZE``) and, like anything
else the kernel refuses (``EAGAIN``, ``ENOBUFS``, no route), dropped and counted in
``stats.tx_dropped``.

The kernel's own ESP/AH input (xfrm) still sees these packets, finds no state and drops them;
raw-socket delivery happens first and is unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable, Sequence

from ipsecstack.runtime.io import BackendError, PortStats
from ipsecstack.wire.ip import build_ipv6

RECV_SIZE = 65535
RCVBUF = 4 << 20
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux values; not every Python names them
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_INT = struct.Struct("@i")
_ANC6 = socket.CMSG_SPACE(20) + 2 * socket.CMSG_SPACE(4)
_ADDR_CACHE_MAX = 4096
_PROTO_NAMES = {50: "ESP", 51: "AH"}


def _family_of(family: int) -> int:
    if family in (4, socket.AF_INET):
        return 4
    if family in (6, socket.AF_INET6):
        return 6
    raise BackendError(f"raw backend: family {family!r} is neither IPv4 (4) nor IPv6 (6)")


def _socket(af: int, proto: int, what: str) -> socket.socket:
    try:
        return socket.socket(af, socket.SOCK_RAW, proto)
    except PermissionError:
        raise BackendError(
            f"cannot open a raw {what} socket: operation not permitted; run as root or grant CAP_NET_RAW "
            "(or use outer_backend = 'udp' with encap = true)"
        ) from None
    except OSError as e:
        if e.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            raise BackendError(f"cannot open a raw {what} socket: {e.strerror} (is IPv6 disabled?)") from None
        raise BackendError(f"cannot open a raw {what} socket: {e.strerror}") from None


_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)  # a plain int: ``int & IntFlag`` is slow per packet


class RawPort:
    """Raw IP sockets for ESP/AH as a :class:`~ipsecstack.runtime.io.PacketPort` (the outer plane)."""

    def __init__(
        self,
        family: int,
        *,
        local: str | None = None,
        protocols: Iterable[int] = (50, 51),
        mtu: int = 1500,
    ) -> None:
        self.version = _family_of(family)
        af = socket.AF_INET if self.version == 4 else socket.AF_INET6
        self.af = af
        self.protocols = tuple(protocols)
        if not self.protocols or any(not 0 < p < 255 for p in self.protocols):
            raise BackendError(f"raw backend: protocols {self.protocols!r} must be IP protocol numbers 1..254")
        self.local = local
        self._local_bytes: bytes | None = None
        if local is not None:
            try:
                addr = ipaddress.ip_address(local)
            except ValueError:
                raise BackendError(f"raw backend: local address {local!r} is not an IP address") from None
            if addr.version != self.version:
                raise BackendError(f"raw backend: local address {local} is not IPv{self.version}")
            self._local_bytes = addr.packed
        self.name = f"raw{self.version}:{local or 'any'}"
        self.mtu = mtu
        self.stats = PortStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rx: list[socket.socket] = []
        self._ready: list[bool] = []
        self._dst_cache: dict[bytes, str] = {}
        self._src_cache: dict[str, bytes] = {}
        try:
            for proto in self.protocols:
                what = f"IPv{self.version} {_PROTO_NAMES.get(proto, f'protocol {proto}')}"
                s = _socket(af, proto, what)
                self._rx.append(s)
                self._ready.append(True)  # until a drain meets EAGAIN
                s.setblocking(False)
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                if self.version == 6:
                    for opt in (socket.IPV6_RECVPKTINFO, socket.IPV6_RECVTCLASS, socket.IPV6_RECVHOPLIMIT):
                        s.setsockopt(socket.IPPROTO_IPV6, opt, 1)
                if local is not None:
                    self._bind(s, local, what)
            self._tx = _socket(af, socket.IPPROTO_RAW, f"IPv{self.version} sending (IPPROTO_RAW)")
            self._tx.setblocking(False)
            with contextlib.suppress(OSError):
                self._tx.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, RCVBUF)
        except BaseException:
            for s in self._rx:
                s.close()
            self._rx.clear()
            raise
        self._closed = False

    @staticmethod
    def _bind(s: socket.socket, local: str, what: str) -> None:
        try:
            s.bind((local, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise BackendError(
                    f"cannot bind the raw {what} socket to {local}: that address is not on this machine; "
                    "check local_addrs (ip addr show)"
                ) from None
            raise BackendError(f"cannot bind the raw {what} socket to {local}: {e.strerror}") from None

    # --- optional capability ----------------------------------------------------------------------

    def set_mark(self, mark: int) -> None:
        """Firewall mark on everything sent (SO_MARK), e.g. to route protected traffic by policy."""
        try:
            self._tx.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError as e:
            raise BackendError(f"cannot set SO_MARK {mark}: {e.strerror} (needs CAP_NET_ADMIN)") from None

    # --- PacketPort -------------------------------------------------------------------------------

    def attach(
        self,
        loop: asyncio.AbstractEventLoop,
        on_readable: Callable[[], None],
        *,
        protocols: Iterable[int] | None = None,
    ) -> None:
        """Read the sockets of ``protocols`` (default: all) when readable; the others are someone else's."""
        if self._closed:
            raise BackendError(f"{self.name} is closed")
        self._loop = loop
        wanted = None if protocols is None else frozenset(protocols)
        for i, s in enumerate(self._rx):
            if wanted is None or self.protocols[i] in wanted:
                loop.add_reader(s.fileno(), self._readable, i, on_readable)
            else:
                self._ready[i] = False  # never drained here

    def receive_fds(self) -> list[tuple[int, int]]:
        """(protocol, fd) of each receiving socket, for a reader that is not this port (the native forwarder)."""
        return [(p, s.fileno()) for p, s in zip(self.protocols, self._rx, strict=True)]

    def send_fd(self) -> int:
        """The IPPROTO_RAW sending socket's fd."""
        return self._tx.fileno()

    def _readable(self, i: int, on_readable: Callable[[], None]) -> None:
        self._ready[i] = True
        on_readable()

    def read_batch(self, limit: int) -> list[bytes]:
        out: list[bytes] = []
        ready = self._ready
        for i, s in enumerate(self._rx):
            if not ready[i]:
                continue
            room = limit - len(out)
            if room <= 0:
                break
            got = self._drain4(s, room) if self.version == 4 else self._drain6(s, self.protocols[i], room)
            if len(got) < room:
                ready[i] = False  # drained to EAGAIN; the reader callback sets it again
            out += got
        self.stats.rx_packets += len(out)
        self.stats.rx_bytes += sum(map(len, out))
        return out

    def _drain4(self, s: socket.socket, room: int) -> list[bytes]:
        out: list[bytes] = []
        local = self._local_bytes
        recv = s.recv
        while len(out) < room:
            try:
                pkt = recv(RECV_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                self.stats.rx_errors += 1
                break
            if len(pkt) < 20 or (local is not None and pkt[16:20] != local):
                continue
            out.append(pkt)
        return out

    def _drain6(self, s: socket.socket, proto: int, room: int) -> list[bytes]:
        out: list[bytes] = []
        local = self._local_bytes
        recvmsg = s.recvmsg
        src_cache = self._src_cache
        while len(out) < room:
            try:
                data, anc, flags, addr = recvmsg(RECV_SIZE, _ANC6)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                self.stats.rx_errors += 1
                break
            if flags & _TRUNCATED:
                self.stats.rx_errors += 1
                continue
            dst = b""
            tclass = 0
            hlim = 64
            for level, kind, value in anc:
                if level != socket.IPPROTO_IPV6:
                    continue
                if kind == socket.IPV6_PKTINFO:
                    dst = value[:16]
                elif kind == socket.IPV6_TCLASS:
                    tclass = _INT.unpack_from(value)[0] & 0xFF
                elif kind == socket.IPV6_HOPLIMIT:
                    hlim = _INT.unpack_from(value)[0] & 0xFF
            if len(dst) != 16 or (local is not None and dst != local):
                continue
            host = addr[0]
            src = src_cache.get(host)
            if src is None:
                src = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
                if len(src_cache) >= _ADDR_CACHE_MAX:
                    src_cache.clear()
                src_cache[host] = src
            out.append(build_ipv6(tclass, 0, len(data), proto, hlim, src, dst) + data)
        return out

    def write_batch(self, packets: Sequence[bytes]) -> int:
        stats = self.stats
        if self._closed:
            stats.tx_dropped += len(packets)
            return 0
        sendto = self._tx.sendto
        cache = self._dst_cache
        v4 = self.version == 4
        af = self.af
        sent = 0
        nbytes = 0
        for pkt in packets:
            try:
                if v4:
                    if len(pkt) < 20 or pkt[0] >> 4 != 4:
                        raise ValueError
                    key = pkt[16:20]
                else:
                    if len(pkt) < 40 or pkt[0] >> 4 != 6:
                        raise ValueError
                    key = pkt[24:40]
                dst = cache.get(key)
                if dst is None:
                    dst = socket.inet_ntop(af, key)
                    if len(cache) >= _ADDR_CACHE_MAX:
                        cache.clear()
                    cache[key] = dst
                sendto(pkt, (dst, 0))
            except (OSError, ValueError):  # EAGAIN, ENOBUFS, EMSGSIZE, no route, not an IP packet: drop
                stats.tx_dropped += 1
                continue
            sent += 1
            nbytes += len(pkt)
        stats.tx_packets += sent
        stats.tx_bytes += nbytes
        return sent

    def close(self) -> None:
        """Remove the readers and close every socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in self._rx:
            if self._loop is not None:  # (a socket attach() left alone was never added: removing it is a no-op)
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(s.fileno())
            s.close()
        self._loop = None
        self._tx.close()

    def __repr__(self) -> str:
        return f"RawPort({self.version}, local={self.local!r}, protocols={self.protocols!r})"
