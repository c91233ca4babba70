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
from ipsecstack.wire.udp_encap import KIND_ESP, KIND_IKE, KIND_KEEPALIVE, UDP_HEADER_LEN, classify
from ipsecstack.xform import mode

_M32 = 0xFFFFFFFF


def protect(sa: SecurityAssociation, pkt: bytes) -> bytes:
    ctx = sa.ctx
    assert ctx is not None
    version = pkt[0] >> 4 if pkt else 0
    tunnel = sa.mode == "tunnel"
    if tunnel:
        if version == 4:
            nh = ip.PROTO_IPIP
        elif version == 6:
            nh = ip.PROTO_IPV6
        else:
            raise Dropped(Reason.BAD_IP_VERSION, str(version))
        if len(pkt) < 20 or ip.packet_length(pkt) != len(pkt):
            raise Dropped(Reason.MALFORMED, "inner packet length does not match its header")
        payload = pkt
        if sa.tfc_padding:
            # RFC 4303 §2.4: random-length TFC padding after the inner packet, inside the encryption.
            payload = pkt + bytes(int.from_bytes(sa.rng(2), "big") % (sa.tfc_padding + 1))
    else:
        version, off, nh_field, end = mode.parse_outer(pkt, inbound=False)
        nh = pkt[nh_field]
        payload = pkt[off:end]
    seq = sa.next_seq()
    padlen = (-(len(payload) + 2)) % ctx.block
    plaintext = payload + PAD[padlen] + bytes((padlen, nh))
    header = sa.spi_bytes + (seq & _M32).to_bytes(4, "big")
    esp = header + ctx.seal(header, seq, (seq >> 32).to_bytes(4, "big") if sa.esn else b"", plaintext)
    if sa.udp_encap is not None:
        src, dst = _outer_addrs(sa, pkt, tunnel, version)
        esp = mode.udp_encap_header(sa, len(esp), src, dst, esp) + esp
        proto = ip.PROTO_UDP
    else:
        proto = ip.PROTO_ESP
    sa.charge(len(pkt))
    if tunnel:
        return mode.outer_header(sa, pkt, len(esp), proto, seq) + esp
    return mode.transport_header(pkt, version, off, nh_field, len(esp), proto) + esp


def _outer_addrs(sa: SecurityAssociation, pkt: bytes, tunnel: bool, version: int) -> tuple[bytes, bytes]:
    if tunnel:
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
    version, off, nh_field, end = mode.parse_outer(pkt)
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
    ctx = sa.ctx
    assert ctx is not None
    if sa.dead:
        raise Dropped(Reason.SA_EXPIRED)
    if udp != (sa.udp_encap is not None):
        raise Dropped(Reason.ENCAP_MISMATCH, "SA is UDP-encapsulated" if sa.udp_encap else "SA is not UDP-encapsulated")
    esp_off = off + UDP_HEADER_LEN if udp else off
    if end - esp_off < 8:
        raise Dropped(Reason.TRUNCATED, "ESP header")
    header = pkt[esp_off : esp_off + 8]
    if header[:4] != sa.spi_bytes:
        raise Dropped(Reason.UNKNOWN_SPI, f"0x{header[:4].hex()}")
    seq_low = int.from_bytes(header[4:8], "big")
    seq, seq_hi = sa.inbound_seq(seq_low)
    plaintext = ctx.open(header, seq_hi, pkt[esp_off + 8 : end])
    # RFC 4303 §3.4.3: the window moves only for packets whose ICV verified.
    sa.replay.update(seq)
    n = len(plaintext)
    padlen = plaintext[n - 2]
    nh = plaintext[n - 1]
    if padlen + 2 > n:
        raise Dropped(Reason.BAD_PADDING, "pad length exceeds payload")
    if padlen and plaintext[n - 2 - padlen : n - 2] != PAD[padlen]:
        raise Dropped(Reason.BAD_PADDING, "padding bytes are not 1, 2, 3, ... (RFC 4303 §2.4)")
    payload = plaintext[: n - 2 - padlen]
    sa.charge(len(payload))
    if nh == ip.PROTO_NONE:
        raise Dropped(Reason.DUMMY)
    if sa.mode == "tunnel":
        inner = mode.tunnel_inner(payload, nh)
        inner = mode.ecn_decapsulate(ip.traffic_class(pkt), inner)
    else:
        inner = mode.transport_header(pkt, version, off, nh_field, len(payload), nh) + payload
        if udp and nh in (ip.PROTO_TCP, ip.PROTO_UDP):
            buf = bytearray(inner)
            mode.fix_l4_checksum(buf, version, off, nh)
            inner = bytes(buf)
    if sa.selectors:
        mode.check_selectors(sa, inner)
    return inner
