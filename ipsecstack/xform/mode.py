"""Transport- and tunnel-mode header rules shared by ESP and AH.

Tunnel mode (RFC 4301 §5.1.2): the outer header is built fresh from the SA's endpoints; TTL/hop
limit is the SA's (default 64); DSCP is copied from the inner header unless disabled; ECN follows
RFC 6040 (normal mode copies the inner ECN field, compatibility mode sends Not-ECT; decapsulation
applies the §4.2 table); DF is copied from an inner IPv4 header, set for inner IPv6, or forced
(RFC 4301 §8.1). The outer IPv4 Identification is taken from the sequence number (atomic datagrams,
RFC 6864). Transport mode keeps the original header and only rewrites protocol/next header, length
and checksum.
"""

from __future__ import annotations

import struct

from ipsecstack.errors import Dropped, Reason
from ipsecstack.sa import SecurityAssociation
from ipsecstack.wire import ip
from ipsecstack.wire.udp_encap import UDP_HEADER_LEN
from ipsecstack.wire.udp_encap import build_header as build_udp_header

_H = struct.Struct("!H")
_V4HDR = struct.Struct("!BBHHHBBH4s4s")


def outer_header(sa: SecurityAssociation, inner: bytes, payload_len: int, seq: int) -> bytes:
    """The tunnel-mode outer IP header for an inner packet and ``payload_len`` bytes after it."""
    if inner[0] >> 4 == 4:
        tos = inner[1] & sa.tos_mask
        flags = (inner[6] & 0x40) << 8 if sa.df_flags < 0 else sa.df_flags
    else:
        tos = (((inner[0] & 0x0F) << 4) | (inner[1] >> 4)) & sa.tos_mask
        flags = 0x4000 if sa.df_flags < 0 else sa.df_flags
    if sa.outer_version == 4:
        total = 20 + payload_len
        ident = seq & 0xFFFF
        # RFC 1071: the constant words were summed once per SA (sa.v4_sum_base)
        s = sa.v4_sum_base + tos + total + ident + flags
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        return _V4HDR.pack(
            0x45, tos, total, ident, flags, sa.ttl, sa.outer_proto, ~s & 0xFFFF, sa.outer_src, sa.outer_dst
        )
    return ip.build_ipv6(tos, 0, payload_len, sa.outer_proto, sa.ttl, sa.outer_src, sa.outer_dst)  # type: ignore[arg-type]


def outer_tos(sa: SecurityAssociation, inner: bytes) -> int:
    """The tunnel-mode outer TOS / traffic class for an inner packet (as :func:`outer_header` sets it)."""
    return ip.traffic_class(inner) & sa.tos_mask


def udp_encap_header(sa: SecurityAssociation, esp_len: int, src: bytes, dst: bytes, esp: bytes) -> bytes:
    """UDP header for ESP-in-UDP (RFC 3948 §2.1): zero checksum over IPv4, a real one over IPv6."""
    assert sa.udp_encap is not None
    sport, dport = sa.udp_encap
    if len(src) == 4:
        return build_udp_header(sport, dport, esp_len)
    hdr = build_udp_header(sport, dport, esp_len)
    length = UDP_HEADER_LEN + esp_len
    csum = ip.internet_checksum(hdr + esp, ip.pseudo_header_sum(6, src, dst, ip.PROTO_UDP, length))
    return build_udp_header(sport, dport, esp_len, csum or 0xFFFF)


def ecn_decapsulate(outer_tc: int, inner: bytes) -> bytes:
    """Apply RFC 6040 §4.2 to the inner packet given the outer header's DS byte."""
    o = outer_tc & 3
    if o == 0:
        return inner
    tc = ip.traffic_class(inner)
    i = tc & 3
    if i == 0:
        if o == 3:
            raise Dropped(Reason.ECN_DROP, "outer CE on a Not-ECT inner packet (RFC 6040 §4.2)")
        return inner
    if o == 3 and i != 3:
        new = 3
    elif o == 1 and i == 2:
        new = 1
    else:
        return inner
    out = bytearray(inner)
    ip.set_traffic_class(out, (tc & 0xFC) | new)
    return bytes(out)


def transport_header(pkt: bytes, version: int, off: int, nh_field: int, payload_len: int, proto: int) -> bytes:
    """The first ``off`` bytes of ``pkt`` with the protocol byte at ``nh_field`` set to ``proto`` and
    the length fields fixed for ``payload_len`` bytes following them."""
    hdr = bytearray(pkt[:off])
    if version == 4:
        ip.fix_ipv4_header(hdr, off + payload_len, proto)
    else:
        hdr[nh_field] = proto
        _H.pack_into(hdr, 4, off - 40 + payload_len)
    return bytes(hdr)


def fix_l4_checksum(pkt: bytearray, version: int, off: int, proto: int) -> None:
    """Recompute a TCP/UDP checksum after NAT-T transport-mode decapsulation (RFC 3948 §3.1.2).

    A NAT between the peers rewrote the outer addresses the upper-layer checksum was computed over;
    the receiver recomputes it over the addresses the packet now carries.
    """
    if proto == ip.PROTO_TCP:
        cks_off = off + 16
    elif proto == ip.PROTO_UDP:
        cks_off = off + 6
        if version == 4 and len(pkt) >= off + 8 and pkt[cks_off] == 0 and pkt[cks_off + 1] == 0:
            return  # IPv4 UDP without checksum stays without one
    else:
        return
    if len(pkt) < cks_off + 2:
        return
    src, dst = (pkt[12:16], pkt[16:20]) if version == 4 else (pkt[8:24], pkt[24:40])
    pkt[cks_off] = pkt[cks_off + 1] = 0
    seg = pkt[off:]
    csum = ip.internet_checksum(seg, ip.pseudo_header_sum(version, bytes(src), bytes(dst), proto, len(seg)))
    if proto == ip.PROTO_UDP and csum == 0:
        csum = 0xFFFF
    _H.pack_into(pkt, cks_off, csum)


def tunnel_inner(buf: bytes, plen: int, nh: int) -> bytes:
    """The inner packet of a tunnel-mode payload (the first ``plen`` bytes of ``buf``), with TFC padding
    (RFC 4303 §2.4) trimmed by the inner header's own length. Only slices (copies) when it has to."""
    if nh == ip.PROTO_IPIP:
        minimum = 20
        ok = plen >= 20 and buf[0] >> 4 == 4
        length = ((buf[2] << 8) | buf[3]) if ok else 0
    elif nh == ip.PROTO_IPV6:
        minimum = 40
        ok = plen >= 40 and buf[0] >> 4 == 6
        length = (40 + ((buf[4] << 8) | buf[5])) if ok else 0
    else:
        raise Dropped(Reason.BAD_NEXT_HEADER, f"{nh} in tunnel mode")
    if not ok:
        raise Dropped(Reason.MALFORMED, "inner header does not match next header")
    if length > plen or length < minimum:
        raise Dropped(Reason.BAD_LENGTH, "inner length field")
    return buf if length == len(buf) else buf[:length]


def check_selectors(sa: SecurityAssociation, inner: bytes) -> None:
    """RFC 4301 §5.2 step 4: a packet that arrived through an SA must match the SA's selectors."""
    flow = ip.flow_of(inner)
    for sel in sa.selectors:
        if sel.matches(flow):
            return
    raise Dropped(Reason.POLICY_MISMATCH, "inner packet outside the SA's traffic selectors")
