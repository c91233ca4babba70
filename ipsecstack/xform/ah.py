"""AH protect/unprotect of whole IP packets (RFC 4302).

The ICV (§3.3.3) covers the IP header with its mutable fields zeroed, the AH header with a zeroed
ICV field (alignment padding included), the payload, and with ESN the high sequence bits appended
(§3.3.3.2.2, not transmitted). Mutable IPv4 fields: TOS, flags + fragment offset, TTL, checksum, and
every option not listed immutable in Appendix A.1. Mutable IPv6 fields: traffic class, flow label,
hop limit, and the data of hop-by-hop / destination options whose type has the "may change en
route" bit (0x20, RFC 8200 §4.2). Routing headers are covered as they are (no type-0 address
prediction: RFC 5095 deprecated it).
"""

from __future__ import annotations

import hmac

from ipsecstack.errors import Dropped, Reason
from ipsecstack.sa import SecurityAssociation
from ipsecstack.wire import ip
from ipsecstack.wire.ah import FIXED_LEN, HEADER, build_header, icv_field_len
from ipsecstack.wire.outer import parse_outer
from ipsecstack.xform import mode

_M32 = 0xFFFFFFFF
# RFC 4302 Appendix A.1: IPv4 options whose content is immutable (EOL, NOP, security, extended
# security, commercial security, router alert, sender directed multi-destination delivery).
_IMMUTABLE_V4_OPTIONS = frozenset({0, 1, 130, 133, 134, 148, 149})


def mutable_zeroed(hdr: bytes, version: int) -> bytearray:
    """A copy of the IP header (up to the AH) with the mutable fields zeroed for the ICV."""
    z = bytearray(hdr)
    if version == 4:
        z[1] = 0
        z[6] = z[7] = z[8] = 0
        z[10] = z[11] = 0
        ihl = (z[0] & 0x0F) * 4
        i = 20
        while i < ihl:
            opt = z[i]
            if opt == 0:
                break
            if opt == 1:
                i += 1
                continue
            if i + 1 >= ihl or z[i + 1] < 2 or i + z[i + 1] > ihl:
                raise Dropped(Reason.MALFORMED, "IPv4 option length")
            length = z[i + 1]
            if opt not in _IMMUTABLE_V4_OPTIONS:
                z[i : i + length] = bytes(length)
            i += length
        return z
    z[0] = 0x60
    z[1] = z[2] = z[3] = 0
    z[7] = 0
    nh = z[6]
    off = 40
    while off < len(z):
        if off + 2 > len(z):
            raise Dropped(Reason.MALFORMED, "IPv6 extension header")
        ext_len = 8 if nh == ip.PROTO_FRAGMENT else (z[off + 1] + 1) * 8
        if nh in (ip.PROTO_HOPOPTS, ip.PROTO_DSTOPTS):
            i = off + 2
            end = min(off + ext_len, len(z))
            while i < end:
                t = z[i]
                if t == 0:  # Pad1
                    i += 1
                    continue
                if i + 1 >= end:
                    raise Dropped(Reason.MALFORMED, "IPv6 option")
                olen = z[i + 1]
                if i + 2 + olen > end:
                    raise Dropped(Reason.MALFORMED, "IPv6 option runs past its extension header")
                if t & 0x20:
                    z[i + 2 : i + 2 + olen] = bytes(olen)
                i += 2 + olen
        nh = z[off]
        off += ext_len
    return z


def protect(sa: SecurityAssociation, pkt: bytes) -> bytes:
    ctx = sa.ah_ctx
    assert ctx is not None
    seq_hi_needed = sa.esn
    if sa.mode == "tunnel":
        v = pkt[0] >> 4 if pkt else 0
        if v not in (4, 6):
            raise Dropped(Reason.BAD_IP_VERSION, str(v))
        if len(pkt) < 20 or ip.packet_length(pkt) != len(pkt):
            raise Dropped(Reason.MALFORMED, "inner packet length does not match its header")
        seq = sa.next_seq()
        ah = build_header(ip.PROTO_IPIP if v == 4 else ip.PROTO_IPV6, sa.spi, seq & _M32,
                          icv_field_len(ctx.icv_len, sa.outer_version == 6))  # fmt: skip
        hdr = mode.outer_header(sa, pkt, len(ah) + len(pkt), seq)
        version = sa.outer_version
        payload = pkt
    else:
        version, off, nh_field, end = parse_outer(pkt, inbound=False)
        payload = pkt[off:end]
        seq = sa.next_seq()
        ah = build_header(pkt[nh_field], sa.spi, seq & _M32, icv_field_len(ctx.icv_len, version == 6))
        hdr = mode.transport_header(pkt, version, off, nh_field, len(ah) + len(payload), ip.PROTO_AH)
    seq_hi = (seq >> 32).to_bytes(4, "big") if seq_hi_needed else b""
    ah[FIXED_LEN : FIXED_LEN + ctx.icv_len] = ctx.icv(mutable_zeroed(hdr, version), ah, payload, seq_hi)
    sa.charge(len(pkt))
    return hdr + bytes(ah) + payload


def unprotect(sa: SecurityAssociation, pkt: bytes) -> bytes:
    ctx = sa.ah_ctx
    assert ctx is not None
    version, off, nh_field, end = parse_outer(pkt)
    if pkt[nh_field] != ip.PROTO_AH:
        raise Dropped(Reason.MALFORMED, f"IP protocol {pkt[nh_field]} is not AH")
    if end - off < FIXED_LEN:
        raise Dropped(Reason.TRUNCATED, "AH header")
    nh, plen, _reserved, spi, seq_low = HEADER.unpack_from(pkt, off)
    ah_len = (plen + 2) * 4
    if ah_len < FIXED_LEN + ctx.icv_len or off + ah_len > end:
        raise Dropped(Reason.BAD_LENGTH, "AH payload length")
    if version == 6 and ah_len % 8:
        raise Dropped(Reason.MALFORMED, "AH length not a multiple of 64 bits over IPv6 (RFC 4302 §2.2)")
    if spi != sa.spi:
        raise Dropped(Reason.UNKNOWN_SPI, f"0x{spi:08x}")
    seq, seq_hi = sa.inbound_seq(seq_low)
    ah = bytearray(pkt[off : off + ah_len])
    received = bytes(ah[FIXED_LEN : FIXED_LEN + ctx.icv_len])
    ah[FIXED_LEN:] = bytes(ah_len - FIXED_LEN)
    payload = pkt[off + ah_len : end]
    expected = ctx.icv(mutable_zeroed(pkt[:off], version), ah, payload, seq_hi)
    if not hmac.compare_digest(expected, received):
        raise Dropped(Reason.BAD_ICV)
    sa.replay.update(seq)
    sa.charge(len(payload))
    if nh == ip.PROTO_NONE:
        raise Dropped(Reason.DUMMY)
    if sa.mode == "tunnel":
        inner = mode.tunnel_inner(payload, len(payload), nh)
        inner = mode.ecn_decapsulate(ip.traffic_class(pkt), inner)
    else:
        inner = mode.transport_header(pkt, version, off, nh_field, len(payload), nh) + payload
    if sa.selectors:
        mode.check_selectors(sa, inner)
    return inner
