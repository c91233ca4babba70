"""The outer plane on a UDP socket: ESP-in-UDP (RFC 3948), IPv4 or IPv6 by the local address.

Theory of operation
-------------------
The outer plane speaks datagrams (``wire.udp_encap``): a UDP socket takes and gives payloads, so the
datapath hands this port :class:`OutDatagram` (ESP bytes, destination, TOS) and takes
:class:`Datagram` (payload, peer, and the header fields the socket reports), with no IP header built
on one side only to be parsed and thrown away on the other.

Receiving: ``recvmsg`` on a socket bound to ``(local_addr, port)``, with ancillary data switched on
for the header fields the payload lost: the local destination address (``IP_PKTINFO`` /
``IPV6_PKTINFO``, right even for a wildcard bind), the TOS / traffic class (its ECN bits matter to
RFC 6040 decapsulation) and the TTL / hop limit. NAT keepalives (one 0xFF byte), IKE messages
(non-ESP marker) and ESP come out alike; the datapath sorts them. ``read_batch`` (for consumers of
whole packets) rebuilds each as ``IP header + UDP header + payload`` (``wire.udp_encap.to_ip_packet``:
a valid IPv4 header checksum or a 40-byte IPv6 header, the UDP checksum left zero, as the kernel has
verified the real one).

Sending: ``write_datagrams`` sends each payload to its destination with ``sendto``; a non-zero TOS /
traffic class is carried over with an ``IP_TOS`` / ``IPV6_TCLASS`` control message, so DSCP and ECN
survive encapsulation. ``write_batch`` takes whole ESP-in-UDP packets instead and keeps only the
payload, destination and TOS of each. The source address and port are the socket's (the SA's
encapsulation source port is expected to be the bound port). Whatever the kernel refuses
(``EAGAIN``, ``ENOBUFS``, no route, ...) is dropped and counted.

Offloads (``offloads=True``, ``[agent] offloads``): with UDP GRO (``UDP_GRO``) the kernel hands over a run
of same-size datagrams from one peer as one buffer with the datagram size in a control message; the
port cuts it back into the datagrams (views of the one buffer, not copies). With UDP GSO
(``UDP_SEGMENT``) a run of same-size payloads to one peer with one TOS (the last may be shorter) goes
out in one ``sendmsg`` that the kernel cuts into exactly those datagrams. A kernel that refuses GSO
(``EIO``, ``EOPNOTSUPP``) switches it off for the port; a run it cannot cut (``EINVAL``: larger than
the path MTU) is sent one datagram at a time. One system call per up to 64 datagrams each way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence

from ipsecstack.errors import Dropped
from ipsecstack.runtime.io import BackendError, PortStats
from ipsecstack.wire.ip import PROTO_UDP, traffic_class
from ipsecstack.wire.outer import parse_outer
from ipsecstack.wire.udp_encap import (
    NAT_KEEPALIVE,
    NON_ESP_MARKER,
    UDP_HEADER_LEN,
    Datagram,
    OutDatagram,
    to_ip_packet,
)

RECV_SIZE = 65535
SOCKBUF = 4 << 20
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux values; not every Python names them
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_INT = struct.Struct("@i")
_ANC = socket.CMSG_SPACE(20) + 2 * socket.CMSG_SPACE(4)
_ADDR_CACHE_MAX = 4096
SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: send one buffer as datagrams of this size (UDP GSO, Linux 4.18)
UDP_GRO = 104  # receive runs of same-size datagrams as one buffer, with their size (Linux 5.0)
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of the kernels before 6.9
GSO_MAX_BYTES = 65000  # below the 65,507 bytes of an IPv4 UDP payload
_ANC_GRO = _ANC + socket.CMSG_SPACE(4)
_U16 = struct.Struct("=H")
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: ``int & IntFlag`` builds an enum member per packet
_GSO_REFUSED = frozenset((errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT))


class UdpEncapPort:
    """A UDP socket for ESP-in-UDP as a :class:`~ipsecstack.runtime.io.PacketPort` (the outer plane)."""

    def __init__(self, local_addr: str, port: int = 4500, *, mtu: int = 1500, offloads: bool = False) -> None:
        try:
            addr = ipaddress.ip_address(local_addr)
        except ValueError:
            raise BackendError(f"udp backend: local address {local_addr!r} is not an IP address") from None
        if not 0 <= port <= 0xFFFF:
            raise BackendError(f"udp backend: port {port} is not a UDP port (0..65535)")
        self.version = addr.version
        self.af = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        self.local_addr = str(addr)
        self.mtu = mtu
        self.stats = PortStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._dst_cache: dict[tuple[bytes, int], tuple[str, int]] = {}
        self._src_cache: dict[str, bytes] = {}
        try:
            self._sock = socket.socket(self.af, socket.SOCK_DGRAM)
        except OSError as e:
            raise BackendError(f"cannot open a UDP/IPv{self.version} socket: {e.strerror}") from None
        s = self._sock
        try:
            s.setblocking(False)
            if self.version == 4:
                s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                s.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
                s.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            else:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                for opt in (socket.IPV6_RECVPKTINFO, socket.IPV6_RECVTCLASS, socket.IPV6_RECVHOPLIMIT):
                    s.setsockopt(socket.IPPROTO_IPV6, opt, 1)
            for opt, fallback in (
                (SO_RCVBUFFORCE, socket.SO_RCVBUF),
                (SO_SNDBUFFORCE, socket.SO_SNDBUF),
            ):
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
                except OSError:  # not CAP_NET_ADMIN: the ordinary option, capped by net.core.*mem_max
                    with contextlib.suppress(OSError):
                        s.setsockopt(socket.SOL_SOCKET, fallback, SOCKBUF)
            self._bind(s, self.local_addr, port)
            self.gso = self.gro = False
            if offloads:
                self.gso = True  # a refused GSO send switches it off (write_batch)
                try:
                    s.setsockopt(SOL_UDP, UDP_GRO, 1)
                    self.gro = True
                except OSError:  # a kernel before 5.0: one datagram per read
                    pass
        except BaseException:
            s.close()
            raise
        self.port = int(s.getsockname()[1])
        self.name = (
            f"udp:[{self.local_addr}]:{self.port}" if self.version == 6 else f"udp:{self.local_addr}:{self.port}"
        )
        self._local_bytes = addr.packed

    @staticmethod
    def _bind(s: socket.socket, host: str, port: int) -> None:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise BackendError(
                    f"cannot bind UDP {where}: that address is not on this machine; check local_addrs (ip addr show)"
                ) from None
            if e.errno == errno.EADDRINUSE:
                raise BackendError(
                    f"cannot bind UDP {where}: the port is in use (another IKE daemon such as charon, "
                    "or another ipsecstack?); stop it or set agent.encap_port"
                ) from None
            if e.errno == errno.EACCES:
                raise BackendError(f"cannot bind UDP {where}: permission denied; ports below 1024 need root") from None
            raise BackendError(f"cannot bind UDP {where}: {e.strerror}") from None

    # --- extras -----------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def set_mark(self, mark: int) -> None:
        """Firewall mark on everything sent (SO_MARK)."""
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError as e:
            raise BackendError(f"cannot set SO_MARK {mark}: {e.strerror} (needs CAP_NET_ADMIN)") from None

    def send_ike(self, message: bytes, addr: str, port: int) -> bool:
        """Send an IKE message on the encapsulation port, behind the non-ESP marker (RFC 3948 §2.2)."""
        if self._closed:
            return False
        try:
            self._sock.sendto(NON_ESP_MARKER + message, (addr, port))
        except OSError:
            self.stats.tx_dropped += 1
            return False
        self.stats.tx_packets += 1
        self.stats.tx_bytes += 4 + len(message)
        return True

    def send_keepalive(self, addr: str, port: int = 4500) -> bool:
        """Send one NAT-keepalive (a single 0xFF byte, RFC 3948 §2.3); False if the kernel refused it."""
        if self._closed:
            return False
        try:
            self._sock.sendto(NAT_KEEPALIVE, (addr, port))
        except OSError:
            self.stats.tx_dropped += 1
            return False
        self.stats.tx_packets += 1
        self.stats.tx_bytes += 1
        return True

    # --- PacketPort -------------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None:
        if self._closed:
            raise BackendError(f"{self.name} is closed")
        self._loop = loop
        loop.add_reader(self._sock.fileno(), on_readable)

    def read_datagrams(self, limit: int) -> list[Datagram]:
        """Up to ``limit`` datagrams as the socket gives them (a GRO buffer cut back into its datagrams,
        each a view of it): payload, the peer's address and port, and the header fields the control
        messages report."""
        out: list[Datagram] = []
        if self._closed:
            return out
        recvmsg = self._sock.recvmsg
        v4 = self.version == 4
        af = self.af
        dport = self.port
        default_dst = self._local_bytes
        src_cache = self._src_cache
        anc_size = _ANC_GRO if self.gro else _ANC
        stats = self.stats
        nbytes = 0
        while len(out) < limit:
            try:
                data, anc, flags, addr = recvmsg(RECV_SIZE, anc_size)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:  # e.g. ECONNREFUSED reported from an earlier ICMP error: keep going
                stats.rx_errors += 1
                continue
            if flags & _MSG_TRUNC:
                stats.rx_errors += 1
                continue
            dst = default_dst
            tos = 0
            ttl = 64
            seg = 0
            for level, kind, value in anc:
                if level == SOL_UDP:
                    if kind == UDP_GRO:
                        seg = _INT.unpack_from(value)[0] if len(value) >= 4 else _U16.unpack_from(value)[0]
                elif v4:
                    if level != socket.IPPROTO_IP:
                        continue
                    if kind == IP_PKTINFO:
                        dst = value[8:12]  # struct in_pktinfo: ifindex, spec_dst, addr (header destination)
                    elif kind == socket.IP_TOS:
                        tos = value[0]
                    elif kind == socket.IP_TTL:
                        ttl = _INT.unpack_from(value)[0] & 0xFF
                else:
                    if level != socket.IPPROTO_IPV6:
                        continue
                    if kind == socket.IPV6_PKTINFO:
                        dst = value[:16]  # struct in6_pktinfo: addr, ifindex
                    elif kind == socket.IPV6_TCLASS:
                        tos = _INT.unpack_from(value)[0] & 0xFF
                    elif kind == socket.IPV6_HOPLIMIT:
                        ttl = _INT.unpack_from(value)[0] & 0xFF
            host = addr[0]
            src = src_cache.get(host)
            if src is None:
                src = socket.inet_pton(af, host.split("%", 1)[0])
                if len(src_cache) >= _ADDR_CACHE_MAX:
                    src_cache.clear()
                src_cache[host] = src
            n = len(data)
            sport = addr[1]
            if 0 < seg < n:
                # UDP GRO: a run of datagrams of ``seg`` bytes (the last may be shorter), one buffer
                stats.rx_super += 1
                view = memoryview(data)
                out.extend(Datagram(src, dst, sport, dport, tos, ttl, view[o : o + seg]) for o in range(0, n, seg))
            else:
                out.append(Datagram(src, dst, sport, dport, tos, ttl, data))
            nbytes += n
        stats.rx_packets += len(out)
        stats.rx_bytes += nbytes
        return out

    def read_split(self, limit: int) -> tuple[list[Datagram], list[bytes]]:
        """:class:`~ipsecstack.runtime.io.DatagramPort`: everything here is a datagram."""
        return self.read_datagrams(limit), []

    def read_batch(self, limit: int) -> list[bytes]:
        """The datagrams as the IP packets they were (for consumers of whole packets)."""
        return [to_ip_packet(d) for d in self.read_datagrams(limit)]

    def _parse(self, pkt: bytes) -> OutDatagram:
        """A whole ESP-in-UDP packet as the datagram to send: the bytes after its UDP header, where to,
        and its TOS / traffic class."""
        n = len(pkt)
        if self.version == 4:
            if n < 28 or pkt[0] >> 4 != 4 or pkt[9] != PROTO_UDP:
                raise ValueError
            off = (pkt[0] & 0x0F) * 4
            end = (pkt[2] << 8) | pkt[3]
            dst = pkt[16:20]
            tos = pkt[1]
        else:
            if n < 48 or pkt[0] >> 4 != 6:
                raise ValueError
            if pkt[6] == PROTO_UDP:
                off = 40
                end = 40 + ((pkt[4] << 8) | pkt[5])
            else:  # extension headers before UDP (transport mode may keep them)
                _v, off, nh_field, end = parse_outer(pkt)
                if pkt[nh_field] != PROTO_UDP:
                    raise ValueError
            dst = pkt[24:40]
            tos = traffic_class(pkt)
        if end > n or end < off + UDP_HEADER_LEN:
            raise ValueError
        return OutDatagram(memoryview(pkt)[off + UDP_HEADER_LEN : end], dst, (pkt[off + 2] << 8) | pkt[off + 3], tos)

    def write_batch(self, packets: Sequence[bytes]) -> int:
        """Send whole ESP-in-UDP packets: each one's UDP payload, to its destination (see write_datagrams)."""
        items: list[OutDatagram] = []
        for pkt in packets:
            try:
                items.append(self._parse(pkt))
            except (ValueError, IndexError, Dropped):  # not ESP-in-UDP: drop
                self.stats.tx_dropped += 1
        return self.write_datagrams(items)

    def write_datagrams(self, items: Sequence[OutDatagram]) -> int:
        """Send datagrams; with GSO, runs to one peer in one ``sendmsg`` (UDP_SEGMENT): consecutive
        payloads of one size to the same address and port with the same TOS (the last of a run may be
        shorter), as the kernel cuts them again into exactly these datagrams."""
        stats = self.stats
        if self._closed:
            stats.tx_dropped += len(items)
            return 0
        send = self._send_run
        gso = self.gso
        cache = self._dst_cache
        sent = 0
        run: list[bytes | memoryview] = []
        where: tuple[str, int] = ("", 0)
        key: tuple[bytes, int] = (b"", 0)
        tos = size = total = 0
        ended = False
        for payload, dst, port, t in items:
            n = len(payload)
            k = (dst, port)
            if run and (
                ended or k != key or t != tos or n > size or len(run) == GSO_MAX_SEGMENTS or total + n > GSO_MAX_BYTES
            ):
                sent += send(run, where, tos, size)
                run = []
            if not run:
                w = cache.get(k)
                if w is None:
                    try:
                        w = (socket.inet_ntop(self.af, dst), port)
                    except (ValueError, OSError):  # not an address of this family: drop
                        stats.tx_dropped += 1
                        continue
                    if len(cache) >= _ADDR_CACHE_MAX:
                        cache.clear()
                    cache[k] = w
                where, key, tos, size, total, ended = w, k, t, n, 0, False
            run.append(payload)
            total += n
            ended = n < size or not gso
        if run:
            sent += send(run, where, tos, size)
        return sent

    def _send_run(self, run: list[bytes | memoryview], where: tuple[str, int], tos: int, size: int) -> int:
        """Send a run of payloads to one peer: one GSO ``sendmsg`` when there are several; the number sent."""
        stats = self.stats
        sock = self._sock
        cmsg: list[tuple[int, int, bytes]] = []
        if tos:
            if self.version == 4:
                cmsg.append((socket.IPPROTO_IP, socket.IP_TOS, _INT.pack(tos)))
            else:
                cmsg.append((socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _INT.pack(tos)))
        if len(run) > 1 and self.gso:
            try:
                sock.sendmsg(run, [*cmsg, (SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, where)
            except OSError as e:
                if e.errno not in _GSO_REFUSED:  # EAGAIN, ENOBUFS, no route, ...: the whole run is dropped
                    stats.tx_dropped += len(run)
                    return 0
                if e.errno != errno.EINVAL:  # no GSO here at all (EIO: no checksum offload on the route)
                    self.gso = False
                # EINVAL: this run cannot be cut (larger than the path MTU, say): one by one below
            else:
                stats.tx_super += 1
                stats.tx_packets += len(run)
                stats.tx_bytes += sum(len(p) for p in run)
                return len(run)
        sent = 0
        nbytes = 0
        for payload in run:
            try:
                if cmsg:
                    sock.sendmsg((payload,), cmsg, 0, where)
                else:
                    sock.sendto(payload, where)
            except OSError:  # refused by the kernel: drop
                stats.tx_dropped += 1
                continue
            sent += 1
            nbytes += len(payload)
        stats.tx_packets += sent
        stats.tx_bytes += nbytes
        return sent

    def close(self) -> None:
        """Remove the reader and close the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
            self._loop = None
        self._sock.close()

    def __repr__(self) -> str:
        return f"UdpEncapPort({self.local_addr!r}, {self.port})"
