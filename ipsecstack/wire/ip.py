"""IPv4 / IPv6 header codecs: checksums, flow extraction for selectors, header builders.

All functions take and return ``bytes``-like objects and never keep state. Offsets follow RFC 791
(IPv4) and RFC 8200 (IPv6, extension header order in §4.1).
"""

from __future__ import annotations

import struct
from typing import Final

from ipsecstack.errors import Dropped, Reason

PROTO_HOPOPTS: Final = 0
PROTO_ICMP: Final = 1
PROTO_IPIP: Final = 4
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_IPV6: Final = 41
PROTO_ROUTING: Final = 43
PROTO_FRAGMENT: Final = 44
PROTO_ESP: Final = 50
PROTO_AH: Final = 51
PROTO_ICMPV6: Final = 58
PROTO_NONE: Final = 59
PROTO_DSTOPTS: Final = 60
PROTO_SCTP: Final = 132
PROTO_UDPLITE: Final = 136

#: Upper-layer protocols whose first four bytes are source and destination port.
PORT_PROTOCOLS: Final = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_UDPLITE})
#: Port value meaning "not available" (non-initial fragment, truncated header): RFC 4301 §4.4.1 OPAQUE.
OPAQUE: Final = -1

_IPV6_EXT: Final = frozenset({PROTO_HOPOPTS, PROTO_ROUTING, PROTO_FRAGMENT, PROTO_DSTOPTS})

_V4HDR = struct.Struct("!BBHHHBBH4s4s")
_V4WORDS = struct.Struct("!10H")
_V6HDR = struct.Struct("!IHBB16s16s")
_H = struct.Struct("!H")
_HH = struct.Struct("!HH")
_II = struct.Struct("!II")
_QQQQ = struct.Struct("!QQQQ")


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 checksum. Uses the fact that 2**16 == 1 (mod 0xFFFF) to sum all words at C speed."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    total = int.from_bytes(data, "big") + initial
    folded = total % 0xFFFF
    if folded == 0 and total != 0:
        folded = 0xFFFF
    return int(~folded & 0xFFFF)


def ipv4_header_checksum(header: bytes | bytearray) -> int:
    """Checksum of a 20-byte header whose checksum field is zero (fast path, no options)."""
    s: int = sum(_V4WORDS.unpack_from(header))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_ipv4(tos: int, total_len: int, ident: int, df: bool, ttl: int, proto: int, src: bytes, dst: bytes) -> bytes:
    """A 20-byte IPv4 header with a correct checksum."""
    flags = 0x4000 if df else 0
    hdr = bytearray(_V4HDR.pack(0x45, tos, total_len, ident & 0xFFFF, flags, ttl, proto, 0, src, dst))
    _H.pack_into(hdr, 10, ipv4_header_checksum(hdr))
    return bytes(hdr)


def build_ipv6(tclass: int, flow_label: int, payload_len: int, nh: int, hlim: int, src: bytes, dst: bytes) -> bytes:
    """A 40-byte IPv6 header."""
    first = 0x60000000 | (tclass << 20) | (flow_label & 0xFFFFF)
    return _V6HDR.pack(first, payload_len, nh, hlim, src, dst)


def fix_ipv4_header(hdr: bytearray, total_len: int, proto: int) -> None:
    """Set total length and protocol of an IPv4 header (any IHL) in place and recompute its checksum."""
    hdr[9] = proto
    _H.pack_into(hdr, 2, total_len)
    hdr[10] = hdr[11] = 0
    _H.pack_into(hdr, 10, internet_checksum(hdr))


def ipv4_is_fragment(pkt: bytes | bytearray | memoryview) -> bool:
    """True for any fragment: MF set or a non-zero offset (RFC 791)."""
    return bool(((pkt[6] << 8) | pkt[7]) & 0x3FFF)


def ipv6_transport_split(pkt: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Where ESP/AH goes in an IPv6 packet in transport mode (RFC 4303 §3.1.1, RFC 4302 §3.1.1).

    Returns ``(insert_offset, nh_field_offset)``: the IPsec header is inserted at ``insert_offset``,
    after hop-by-hop, routing and fragment headers (and destination options that precede a routing
    header); ``nh_field_offset`` is the byte holding the Next Header value that must become 50/51.
    """
    n = len(pkt)
    nh_field = 6
    off = 40
    nh = pkt[6]
    while True:
        if nh in (PROTO_HOPOPTS, PROTO_ROUTING, PROTO_FRAGMENT):
            pass
        elif nh == PROTO_DSTOPTS:
            # Destination options go before the IPsec header only when a routing header follows.
            if off + 2 > n or pkt[off] != PROTO_ROUTING:
                return off, nh_field
        else:
            return off, nh_field
        if off + 8 > n:
            raise Dropped(Reason.TRUNCATED, "IPv6 extension header")
        ext_len = 8 if nh == PROTO_FRAGMENT else (pkt[off + 1] + 1) * 8
        nh_field = off
        nh = pkt[off]
        off += ext_len
        if off > n:
            raise Dropped(Reason.TRUNCATED, "IPv6 extension header")


def flow_of(pkt: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int]:
    """The selector fields of an IP packet (RFC 4301 §4.4.1.1).

    Returns ``(version, src, dst, proto, sport, dport)`` with addresses as integers. Ports are
    :data:`OPAQUE` when not available (non-initial fragment, truncated). For ICMP/ICMPv6 the "ports"
    are the message type and code, as Linux xfrm does. IPv6 extension headers are walked to find the
    upper-layer protocol. Raises :class:`Dropped` on packets too short to hold their IP header.
    """
    n = len(pkt)
    if n < 20:
        raise Dropped(Reason.TRUNCATED, "IP header")
    version = pkt[0] >> 4
    if version == 4:
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or n < ihl:
            raise Dropped(Reason.MALFORMED, "IPv4 IHL")
        src, dst = _II.unpack_from(pkt, 12)
        proto = pkt[9]
        off = ihl
        if ((pkt[6] << 8) | pkt[7]) & 0x1FFF:
            return 4, src, dst, proto, OPAQUE, OPAQUE
    elif version == 6:
        if n < 40:
            raise Dropped(Reason.TRUNCATED, "IPv6 header")
        s1, s2, d1, d2 = _QQQQ.unpack_from(pkt, 8)
        src = (s1 << 64) | s2
        dst = (d1 << 64) | d2
        proto = pkt[6]
        off = 40
        while proto in _IPV6_EXT:
            if off + 8 > n:
                return 6, src, dst, proto, OPAQUE, OPAQUE
            if proto == PROTO_FRAGMENT:
                if ((pkt[off + 2] << 8) | pkt[off + 3]) & 0xFFF8:
                    return 6, src, dst, pkt[off], OPAQUE, OPAQUE
                ext_len = 8
            else:
                ext_len = (pkt[off + 1] + 1) * 8
            proto = pkt[off]
            off += ext_len
    else:
        raise Dropped(Reason.BAD_IP_VERSION, str(version))
    if proto in PORT_PROTOCOLS:
        if off + 4 > n:
            return version, src, dst, proto, OPAQUE, OPAQUE
        sport, dport = _HH.unpack_from(pkt, off)
        return version, src, dst, proto, sport, dport
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        if off + 2 > n:
            return version, src, dst, proto, OPAQUE, OPAQUE
        return version, src, dst, proto, pkt[off], pkt[off + 1]
    return version, src, dst, proto, OPAQUE, OPAQUE


def traffic_class(pkt: bytes | bytearray | memoryview) -> int:
    """The 8-bit DS field (DSCP + ECN) of an IPv4 or IPv6 packet."""
    if pkt[0] >> 4 == 4:
        return pkt[1]
    return ((pkt[0] & 0x0F) << 4) | (pkt[1] >> 4)


def set_traffic_class(pkt: bytearray, tc: int) -> None:
    """Rewrite the DS field in place (IPv4 checksum updated)."""
    if pkt[0] >> 4 == 4:
        old = pkt[1]
        if old == tc:
            return
        pkt[1] = tc
        ihl = (pkt[0] & 0x0F) * 4
        pkt[10] = pkt[11] = 0
        _H.pack_into(pkt, 10, internet_checksum(pkt[:ihl]))
    else:
        pkt[0] = 0x60 | (tc >> 4)
        pkt[1] = ((tc & 0x0F) << 4) | (pkt[1] & 0x0F)


def packet_length(pkt: bytes | bytearray | memoryview) -> int:
    """Length an IP packet claims in its header (IPv4 total length, IPv6 40 + payload length)."""
    if pkt[0] >> 4 == 4:
        return int((pkt[2] << 8) | pkt[3])
    return 40 + ((pkt[4] << 8) | pkt[5])


def pseudo_header_sum(version: int, src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The pseudo-header contribution for TCP/UDP checksums (RFC 793, RFC 8200 §8.1), unfolded."""
    # Every address is a whole number of 16-bit words, so adding the integers is the same, modulo
    # 0xFFFF, as adding their words; internet_checksum() folds the rest.
    del version
    return int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + length
