"""The virtio_net_hdr of a TUN opened with IFF_VNET_HDR, for Python's own reads and writes.

Theory of operation
-------------------
With ``TunPort(vnet_hdr=True)`` every packet on the TUN descriptor starts with a ``virtio_net_hdr``
(10 bytes here: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset; native byte order, as a
TUN without TUNSETVNETLE uses on a little-endian host). The native forwarder reads and writes it in C
(ipsecstack/native/fwd_seg.c); this module lets the Python datapath (punted packets, the Python
engine) keep seeing plain IP packets:

- :func:`unwrap` turns what one ``read()`` returned into the IP packets the host meant: the header
  stripped, an unfinished checksum (``NEEDS_CSUM``: the field holds the pseudo-header sum) finished,
  and a TCP/UDP super-packet (``GSO_TCPV4``/``GSO_TCPV6``/``GSO_UDP_L4``) cut into ``gso_size``
  segments exactly as the C code cuts them (IPv4 total length, ID + i, header checksum; IPv6 payload
  length; TCP sequence number + offset, CWR on the first, FIN/PSH on the last, checksum over the
  pseudo-header, RFC 9293 §3.1; UDP length and checksum, RFC 768). A header that does not parse gives
  no packet (the caller counts it).
- :func:`wrap` puts an all-zero header (no offload asked: the kernel checks the checksums itself) in
  front of a packet to write.
"""

from __future__ import annotations

import struct

VNET_HDR_LEN = 10
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 3, 4, 5, 0x80
_HDR = struct.Struct("=BBHHHH")
_ZERO = bytes(VNET_HDR_LEN)


def csum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The folded ones' complement sum (not complemented) of ``data``, added to ``start``."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    s: int = start + sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(ip: bytes | bytearray, proto: int, l4_len: int) -> int:
    addrs = ip[12:20] if ip[0] >> 4 == 4 else ip[8:40]
    return csum(addrs, proto + l4_len)


def wrap(pkt: bytes, hdr_len: int = VNET_HDR_LEN) -> bytes:
    return _ZERO[:hdr_len] + pkt if hdr_len <= VNET_HDR_LEN else bytes(hdr_len) + pkt


def _segments(pkt: bytes, gso_type: int, gso_size: int) -> list[bytes]:
    version = pkt[0] >> 4
    if version == 4:
        l3 = (pkt[0] & 0x0F) * 4
        proto = pkt[9]
        if l3 < 20 or len(pkt) < l3 or struct.unpack_from("!H", pkt, 2)[0] != len(pkt):
            return []
    elif version == 6 and len(pkt) >= 40:
        l3, proto = 40, pkt[6]
        if 40 + struct.unpack_from("!H", pkt, 4)[0] != len(pkt):
            return []
    else:
        return []
    tcp = gso_type in (GSO_TCPV4, GSO_TCPV6)
    if (tcp and (proto != 6 or (version == 4) != (gso_type == GSO_TCPV4))) or (not tcp and proto != 17):
        return []
    if gso_size == 0 or len(pkt) < l3 + (20 if tcp else 8):
        return []
    hdrs = l3 + ((pkt[l3 + 12] >> 4) * 4 if tcp else 8)
    if hdrs > len(pkt) or (tcp and hdrs < l3 + 20):
        return []
    payload = pkt[hdrs:]
    count = max(1, -(-len(payload) // gso_size))
    out: list[bytes] = []
    for i in range(count):
        chunk = payload[i * gso_size : (i + 1) * gso_size]
        seg = bytearray(pkt[:hdrs] + chunk)
        n = len(seg)
        if version == 4:
            struct.pack_into("!HH", seg, 2, n, (struct.unpack_from("!H", pkt, 4)[0] + i) & 0xFFFF)
            struct.pack_into("!H", seg, 10, 0)
            struct.pack_into("!H", seg, 10, ~csum(seg[:l3]) & 0xFFFF)
        else:
            struct.pack_into("!H", seg, 4, n - 40)
        l4 = n - l3
        if tcp:
            seq = (struct.unpack_from("!I", pkt, l3 + 4)[0] + i * gso_size) & 0xFFFFFFFF
            struct.pack_into("!I", seg, l3 + 4, seq)
            if i > 0:
                seg[l3 + 13] &= ~0x80 & 0xFF
            if i + 1 < count:
                seg[l3 + 13] &= ~0x09 & 0xFF
            struct.pack_into("!H", seg, l3 + 16, 0)
            struct.pack_into("!H", seg, l3 + 16, ~csum(seg[l3:], pseudo(seg, 6, l4)) & 0xFFFF)
        else:
            struct.pack_into("!HH", seg, l3 + 4, l4, 0)
            c = ~csum(seg[l3:], pseudo(seg, 17, l4)) & 0xFFFF
            struct.pack_into("!H", seg, l3 + 6, c or 0xFFFF)
        out.append(bytes(seg))
    return out


def unwrap(data: bytes, hdr_len: int = VNET_HDR_LEN) -> list[bytes]:
    """The IP packets one read() of a vnet_hdr TUN stands for ([] when its header does not parse)."""
    if len(data) < hdr_len:
        return []
    flags, gso_type, _hl, gso_size, cstart, coff = _HDR.unpack_from(data, 0)
    pkt = data[hdr_len:]
    gso_type &= ~GSO_ECN
    if gso_type != GSO_NONE:
        return _segments(pkt, gso_type, gso_size)
    if flags & F_NEEDS_CSUM:
        if cstart + coff + 2 > len(pkt) or coff % 2:
            return []
        b = bytearray(pkt)
        c = ~csum(b[cstart:]) & 0xFFFF
        struct.pack_into("!H", b, cstart + coff, 0xFFFF if c == 0 and coff == 6 else c)
        return [bytes(b)]
    return [pkt]
