"""ICMP errors the datapath sends to a local sender: "fragmentation needed" and "packet too big".

RFC 4301 §8.1/§8.2: when a packet that may not be fragmented (IPv4 with DF set, any IPv6 packet)
would exceed the path MTU once protected, the IPsec implementation drops it and reports an MTU that
leaves room for its overhead, with ICMP type 3 code 4 (RFC 792, next-hop MTU as in RFC 1191) or ICMPv6
type 2 (RFC 4443 §3.2). Stateless builders; the caller chooses the source address (this host).
"""

from __future__ import annotations

import struct

from ipsecstack.wire.ip import build_ipv4, build_ipv6, internet_checksum

PROTO_ICMP = 1
PROTO_ICMPV6 = 58
# RFC 1812 §4.3.2.3: quote as much of the original as fits in 576 bytes; RFC 4443 §2.4 (c): 1280 for IPv6
_V4_LIMIT = 576 - 20 - 8
_V6_LIMIT = 1280 - 40 - 8


def frag_needed(original: bytes, mtu: int, src: bytes, ttl: int = 64) -> bytes:
    """An IPv4 ICMP destination unreachable / fragmentation needed (type 3, code 4) about ``original``."""
    quoted = original[:_V4_LIMIT]
    body = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, mtu & 0xFFFF) + quoted)
    struct.pack_into("!H", body, 2, internet_checksum(body))
    dst = original[12:16]  # back to the packet's sender
    return build_ipv4(0xC0, 20 + len(body), 0, False, ttl, PROTO_ICMP, src, dst) + bytes(body)


def packet_too_big(original: bytes, mtu: int, src: bytes, hlim: int = 64) -> bytes:
    """An ICMPv6 packet too big (type 2, code 0) about ``original``."""
    quoted = original[:_V6_LIMIT]
    dst = original[8:24]
    body = bytearray(struct.pack("!BBHI", 2, 0, 0, mtu) + quoted)
    pseudo = src + dst + struct.pack("!IxxxB", len(body), PROTO_ICMPV6)
    struct.pack_into("!H", body, 2, internet_checksum(pseudo + body))
    return build_ipv6(0, 0, len(body), PROTO_ICMPV6, hlim, src, dst) + bytes(body)
