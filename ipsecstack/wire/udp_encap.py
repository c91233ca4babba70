"""UDP encapsulation of ESP (RFC 3948) and what may arrive on the encapsulation port.

On port 4500 three things share one UDP socket (RFC 3948 §2):
- a NAT-keepalive: a single 0xFF byte (§2.3), dropped silently;
- IKE: the payload starts with the 4-byte non-ESP marker (zeros) where an SPI would be (§2.2);
- ESP: anything else (a zero SPI is reserved, RFC 4303 §2.1, so there is no ambiguity).

The outer plane speaks datagrams: a UDP socket gives and takes payloads, never IP headers, so the
datapath and the UDP port exchange :class:`Datagram` (received: payload and the header fields the
socket reports) and :class:`OutDatagram` (to send: ESP bytes, destination, TOS). Only a port that sees
whole IP packets (a raw socket, an in-memory pipe) needs :func:`to_ip_packet`.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from ipsecstack.wire.ip import PROTO_UDP, build_ipv4, build_ipv6

UDP_HEADER_LEN: Final = 8
NON_ESP_MARKER: Final = b"\x00\x00\x00\x00"
NAT_KEEPALIVE: Final = b"\xff"
ENCAP_PORT: Final = 4500
UDP_HEADER = struct.Struct("!HHHH")

KIND_ESP: Final = 0
KIND_IKE: Final = 1
KIND_KEEPALIVE: Final = 2
KIND_MALFORMED: Final = 3


def classify(payload: bytes | bytearray | memoryview) -> int:
    """Which of ESP, IKE (non-ESP marker), keepalive or malformed a UDP-4500 payload is."""
    n = len(payload)
    if n == 1 and payload[0] == 0xFF:
        return KIND_KEEPALIVE
    if n >= 4 and payload[0] == 0 and payload[1] == 0 and payload[2] == 0 and payload[3] == 0:
        return KIND_IKE
    if n < 8:
        return KIND_MALFORMED
    return KIND_ESP


def build_header(sport: int, dport: int, payload_len: int, checksum: int = 0) -> bytes:
    """UDP header. Over IPv4 the checksum SHOULD be zero for ESP-in-UDP (RFC 3948 §2.1)."""
    return UDP_HEADER.pack(sport, dport, UDP_HEADER_LEN + payload_len, checksum)


class Datagram(NamedTuple):
    """A datagram received on an encapsulation port, as the socket reports it (no IP or UDP header).

    ``src``/``dst`` are packed addresses (4 or 16 bytes; ``dst`` is this host's), ``tos`` the TOS /
    traffic class byte (its ECN bits matter to RFC 6040 decapsulation), ``ttl`` the TTL / hop limit.
    """

    src: bytes
    dst: bytes
    sport: int
    dport: int
    tos: int
    ttl: int
    payload: bytes | memoryview


class OutDatagram(NamedTuple):
    """ESP-in-UDP to send from the encapsulation port: the ESP bytes, where to (packed address and
    port) and the TOS / traffic class to set. The source address and port are the socket's."""

    payload: bytes | memoryview
    dst: bytes
    dport: int
    tos: int


def ip_udp_header(tos: int, ttl: int, src: bytes, dst: bytes, sport: int, dport: int, n: int) -> bytes:
    """The IP and UDP headers of a datagram of ``n`` payload bytes (UDP checksum left zero: the socket
    verified the real one, and nothing after it reads the field)."""
    udp = UDP_HEADER.pack(sport, dport, UDP_HEADER_LEN + n, 0)
    if len(src) == 4:
        return build_ipv4(tos, 20 + UDP_HEADER_LEN + n, 0, False, ttl, PROTO_UDP, src, dst) + udp
    return build_ipv6(tos, 0, UDP_HEADER_LEN + n, PROTO_UDP, ttl, src, dst) + udp


def to_ip_packet(d: Datagram) -> bytes:
    """The whole IP packet a received datagram was (for consumers that want packets, not datagrams)."""
    return ip_udp_header(d.tos, d.ttl, d.src, d.dst, d.sport, d.dport, len(d.payload)) + d.payload
