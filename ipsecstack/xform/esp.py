"""ESP protect/unprotect of whole IP packets (RFC 4303), with UDP encapsulation (RFC 3948).

Outbound (§3.3): take the next sequence number (never wrapping), build payload || padding (1, 2,
3, ...) || pad length || next header, seal it with the SA's context, then wrap it: in tunnel mode
under a new outer header, in transport mode after the original header (IPv6: after hop-by-hop,
routing and fragment headers), with a UDP header in between when the SA is UDP-encapsulated.

Inbound (§3.4): locate the ESP header, check the SPI and encapsulation match the SA, infer the ESN
high half, check the replay window, verify the ICV and decrypt, *then* update the window (§3.4.3),
then check padding and next header. Next header 59 is a dummy packet, discarded (§2.6). In tunnel
mode the inner length trims TFC padding (§2.4) and RFC 6040 decides the inner ECN field.
"""

from __future__ import annotations

from ipsecstack.errors import Dropped, Reason
from ipsecstack.sa import SecurityAssociation
from ipsecstack.wire import ip
from ipsecstack.wire.esp import PAD
from ipsecstack.wire.outer import parse_outer
from ipsecstack.wire.udp_encap import (
    KIND_ESP,
    KIND_IKE,
    KIND_KEEPALIVE,
    UDP_HEADER,
    UDP_HEADER_LEN,
    Datagram,
    OutDatagram,
    classify,
    to_ip_packet,
)
from ipsecstack.xform import mode

_M32 = 0xFFFFFFFF


def _seal_input(sa: SecurityAssociation, pkt: bytes) -> tuple[int, int, int, bytes, int, bytes, bytes]:
    """What both outputs of protect share: ``(version, off, nh_field, header, seq, seq_hi, plaintext)``,
    with the sequence number taken and the lifetimes charged (``off``/``nh_field``: transport mode)."""
    ctx = sa.ctx
    assert ctx is not None
    n = len(pkt)
    version = pkt[0] >> 4 if n else 0
    off = nh_field = 0
    if sa.tunnel:
        if version == 4:
            nh = ip.PROTO_IPIP
            ok = n >= 20 and (pkt[2] << 8 | pkt[3]) == n
        elif version == 6:
            nh = ip.PROTO_IPV6
            ok = n >= 40 and 40 + (pkt[4] << 8 | pkt[5]) == n
        else:
            raise Dropped(Reason.BAD_IP_VERSION, str(version))
        if not ok:
            raise Dropped(Reason.MALFORMED, "inner packet length does not match its header")
        payload = pkt
        if sa.tfc_padding:
            # RFC 4303 §2.4: random-length TFC padding after the inner packet, inside the encryption.
            payload = pkt + bytes(int.from_bytes(sa.rng(2), "big") % (sa.tfc_padding + 1))
    else:
        version, off, nh_field, end = parse_outer(pkt, inbound=False)
        nh = pkt[nh_field]
        payload = pkt[off:end]
    # RFC 4303 §3.3.3: the counter never wraps (SecurityAssociation.next_seq, inlined: hot path)
    if sa.dead:
        raise Dropped(Reason.SA_EXPIRED)
    seq = sa.seq + 1
    if seq > sa.seq_max:
        raise Dropped(Reason.SEQ_EXHAUSTED, "rekey: the sequence number would wrap")
    sa.seq = seq
    if seq == sa.seq_soft:
        sa.expire_soft("seq")
    padlen = (-(len(payload) + 2)) % ctx.block
    plaintext = b"".join((payload, PAD[padlen], bytes((padlen, nh))))
    header = sa.spi_bytes + (seq & _M32).to_bytes(4, "big")
    seq_hi = (seq >> 32).to_bytes(4, "big") if sa.esn else b""
    # byte/packet lifetimes (SecurityAssociation.charge, inlined)
    sa.packets += 1
    sa.bytes += n
    if sa.packets >= sa.next_packets or sa.bytes >= sa.next_bytes:
        sa.limits_crossed()
    return version, off, nh_field, header, seq, seq_hi, plaintext


def protect(sa: SecurityAssociation, pkt: bytes) -> bytes:
    """The whole protected IP packet (outer header, UDP header when encapsulated, ESP)."""
    ctx = sa.ctx
    assert ctx is not None
    version, off, nh_field, header, seq, seq_hi, plaintext = _seal_input(sa, pkt)
    esp_len = 8 + ctx.iv_len + len(plaintext) + ctx.icv_len
    encap = sa.udp_encap
    if encap is not None:
        if (sa.outer_version if sa.tunnel else version) == 6:
            return _protect_udp6(sa, pkt, version, header, seq, seq_hi, plaintext, esp_len)
        ip_payload_len = UDP_HEADER_LEN + esp_len
        proto = ip.PROTO_UDP
    else:
        ip_payload_len = esp_len
        proto = ip.PROTO_ESP
    if sa.tunnel:
        prefix = mode.outer_header(sa, pkt, ip_payload_len, seq)
    else:
        prefix = mode.transport_header(pkt, version, off, nh_field, ip_payload_len, proto)
    if encap is not None:
        prefix += UDP_HEADER.pack(encap[0], encap[1], ip_payload_len, 0)
    return ctx.seal_packet(prefix, header, seq, seq_hi, plaintext)


def protect_datagram(sa: SecurityAssociation, pkt: bytes) -> OutDatagram:
    """ESP-in-UDP for the UDP socket: the ESP bytes with where they go and their TOS, no IP or UDP
    header (the socket builds them). The TOS is the outer header's (tunnel mode: DSCP copied per the
    SA, ECN per RFC 6040) or the packet's own (transport mode)."""
    ctx = sa.ctx
    encap = sa.udp_encap
    assert ctx is not None and encap is not None
    version, _off, _nh_field, header, seq, seq_hi, plaintext = _seal_input(sa, pkt)
    esp = ctx.seal_packet(b"", header, seq, seq_hi, plaintext)
    if sa.tunnel:
        assert sa.outer_dst is not None
        return OutDatagram(esp, sa.outer_dst, encap[1], mode.outer_tos(sa, pkt))
    return OutDatagram(esp, pkt[16:20] if version == 4 else pkt[24:40], encap[1], ip.traffic_class(pkt))


def _protect_udp6(
    sa: SecurityAssociation, pkt: bytes, version: int, header: bytes, seq: int, seq_hi: bytes,
    plaintext: bytes, esp_len: int,
) -> bytes:  # fmt: skip
    """ESP-in-UDP over IPv6: the UDP checksum covers the ESP bytes, so it is filled in afterwards."""
    ctx = sa.ctx
    assert ctx is not None
    esp = ctx.seal_packet(b"", header, seq, seq_hi, plaintext)
    src, dst = _outer_addrs(sa, pkt, version)
    udp = mode.udp_encap_header(sa, esp_len, src, dst, esp)
    if sa.tunnel:
        return mode.outer_header(sa, pkt, UDP_HEADER_LEN + esp_len, seq) + udp + esp
    _v, off, nh_field, _end = parse_outer(pkt, inbound=False)
    return mode.transport_header(pkt, version, off, nh_field, UDP_HEADER_LEN + esp_len, ip.PROTO_UDP) + udp + esp


def _outer_addrs(sa: SecurityAssociation, pkt: bytes, version: int) -> tuple[bytes, bytes]:
    if sa.tunnel:
        assert sa.outer_src is not None and sa.outer_dst is not None
        return sa.outer_src, sa.outer_dst
    if version == 4:
        return pkt[12:16], pkt[16:20]
    return pkt[8:24], pkt[24:40]


def locate(pkt: bytes) -> tuple[int, int, int, int, bool]:
    """Find the ESP header in a received packet: ``(version, off, nh_field, end, udp)``.

    ``off`` points at the IP payload (the UDP header when ``udp``). Raises ``Dropped`` for packets that
    carry no ESP: NAT keepalives (silently), IKE on the encapsulation port, other protocols.
    """
    version, off, nh_field, end = parse_outer(pkt)
    proto = pkt[nh_field]
    if proto == ip.PROTO_ESP:
        return version, off, nh_field, end, False
    if proto == ip.PROTO_UDP:
        if end - off < UDP_HEADER_LEN:
            raise Dropped(Reason.TRUNCATED, "UDP header")
        kind = classify(pkt[off + UDP_HEADER_LEN : end])
        if kind == KIND_ESP:
            return version, off, nh_field, end, True
        if kind == KIND_KEEPALIVE:
            raise Dropped(Reason.NAT_KEEPALIVE)
        if kind == KIND_IKE:
            raise Dropped(Reason.MALFORMED, "IKE message (non-ESP marker) handed to ESP")
        raise Dropped(Reason.TRUNCATED, "ESP-in-UDP payload")
    raise Dropped(Reason.MALFORMED, f"IP protocol {proto} is not ESP")


def unprotect(sa: SecurityAssociation, pkt: bytes) -> bytes:
    version, off, nh_field, end, udp = locate(pkt)
    return unprotect_located(sa, pkt, version, off, nh_field, end, udp)


def unprotect_located(
    sa: SecurityAssociation, pkt: bytes, version: int, off: int, nh_field: int, end: int, udp: bool
) -> bytes:
    """Unprotect a packet whose ESP header was found by :func:`locate` (the datapath's entry)."""
    if udp != (sa.udp_encap is not None):
        raise Dropped(Reason.ENCAP_MISMATCH, "SA is UDP-encapsulated" if sa.udp_encap else "SA is not UDP-encapsulated")
    esp_off = off + UDP_HEADER_LEN if udp else off
    plaintext, plen, nh = _open(sa, memoryview(pkt)[esp_off:end])
    if sa.tunnel:
        inner = mode.tunnel_inner(plaintext, plen, nh)
        if pkt[1] & 3 if version == 4 else pkt[1] & 0x30:
            inner = mode.ecn_decapsulate(ip.traffic_class(pkt), inner)
    else:
        payload = plaintext[:plen]
        inner = mode.transport_header(pkt, version, off, nh_field, plen, nh) + payload
        if udp and nh in (ip.PROTO_TCP, ip.PROTO_UDP):
            buf = bytearray(inner)
            mode.fix_l4_checksum(buf, version, off, nh)
            inner = bytes(buf)
    if sa.selectors:
        mode.check_selectors(sa, inner)
    return inner


def unprotect_datagram(sa: SecurityAssociation, d: Datagram) -> bytes:
    """Unprotect ESP that arrived in a UDP datagram (``d.payload`` is the ESP header onwards).

    Tunnel mode needs nothing of the outer headers but the ECN bits (``d.tos``); transport mode
    keeps the outer header as the inner one, so the IP packet is rebuilt for it first.
    """
    if sa.udp_encap is None:
        raise Dropped(Reason.ENCAP_MISMATCH, "SA is not UDP-encapsulated")
    if not sa.tunnel:
        pkt = to_ip_packet(d)  # a 20-byte IPv4 or 40-byte IPv6 header, then UDP
        if len(d.src) == 4:
            return unprotect_located(sa, pkt, 4, 20, 9, len(pkt), True)
        return unprotect_located(sa, pkt, 6, 40, 6, len(pkt), True)
    plaintext, plen, nh = _open(sa, d.payload)
    inner = mode.tunnel_inner(plaintext, plen, nh)
    if d.tos & 3:
        inner = mode.ecn_decapsulate(d.tos, inner)
    if sa.selectors:
        mode.check_selectors(sa, inner)
    return inner


def _open(sa: SecurityAssociation, esp: bytes | memoryview) -> tuple[bytes, int, int]:
    """Check, decrypt and account one ESP packet (``esp``: SPI onwards): ``(plaintext, plen, nh)``
    with ``plen`` the payload length before the padding."""
    ctx = sa.ctx
    assert ctx is not None
    if len(esp) < 8:
        raise Dropped(Reason.TRUNCATED, "ESP header")
    header = bytes(esp[:8])
    if header[:4] != sa.spi_bytes:
        raise Dropped(Reason.UNKNOWN_SPI, f"0x{header[:4].hex()}")
    seq, seq_hi = sa.inbound_seq(int.from_bytes(header[4:8], "big"))
    plaintext = ctx.open(header, seq_hi, esp[8:])
    # RFC 4303 §3.4.3: the window moves only for packets whose ICV verified.
    sa.replay.update(seq)
    n = len(plaintext)
    padlen = plaintext[n - 2]
    nh = plaintext[n - 1]
    if padlen + 2 > n:
        raise Dropped(Reason.BAD_PADDING, "pad length exceeds payload")
    if padlen and plaintext[n - 2 - padlen : n - 2] != PAD[padlen]:
        raise Dropped(Reason.BAD_PADDING, "padding bytes are not 1, 2, 3, ... (RFC 4303 §2.4)")
    plen = n - 2 - padlen
    sa.packets += 1
    sa.bytes += plen
    if sa.packets >= sa.next_packets or sa.bytes >= sa.next_bytes:
        sa.limits_crossed()
    if nh == ip.PROTO_NONE:
        raise Dropped(Reason.DUMMY)
    return plaintext, plen, nh
