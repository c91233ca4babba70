"""The virtio_net_hdr of a TUN opened with IFF_VNET_HDR, for Python's own reads and writes.

Theory of operation
-------------------
With ``TunPort(vnet_hdr=True)`` every packet on the TUN descriptor starts with a ``virtio_net_hdr``
(10 bytes here: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset; native byte order, as a
TUN without TUNSETVNETLE uses on a little-endian host). The native forwarder reads and writes it in C
(ipsecstack/native/fwd_seg.c, fwd_coal.c); this module does the same for the Python datapath (the
Python engine, and the native engine's punted packets), which keeps seeing plain IP packets:

- :func:`unwrap` turns what one ``read()`` returned into the IP packets the host meant: the header
  stripped, an unfinished checksum (``NEEDS_CSUM``: the field holds the pseudo-header sum) finished,
  and a TCP/UDP super-packet (``GSO_TCPV4``/``GSO_TCPV6``/``GSO_UDP_L4``) cut into ``gso_size``
  segments exactly as the C code cuts them (IPv4 total length, ID + i, header checksum; IPv6 payload
  length; TCP sequence number + offset, CWR on the first, FIN/PSH on the last, checksum over the
  pseudo-header, RFC 9293 §3.1; UDP length and checksum, RFC 768). A header that does not parse gives
  no packet (the caller counts it). One read of a 64 KB super-packet replaces ~45 reads.
- :func:`coalesce` turns the packets of one write batch into the writes that carry them: consecutive
  in-order TCP segments of one flow become one super-packet (``GSO_TCPV4``/``GSO_TCPV6``,
  ``NEEDS_CSUM``), under the rules of fwd_coal.c (the rules GRO applies: next sequence number, no
  larger payload than the first, same IP and TCP header fields but length, ACK with at most PSH, PSH
  or a short segment ends the run). The kernel takes the run into its stack at once. Every other
  packet is one write behind an all-zero header (no offload asked: the kernel checks its checksums).
  The inner packets' integrity was checked by ESP, which is why the kernel may skip the per-segment
  TCP checksums of a run.

Checksums use the fact that 2**16 = 1 (mod 0xFFFF): the ones' complement sum of a buffer is its value
as a big integer modulo 0xFFFF (RFC 1071), which ``int.from_bytes`` computes at C speed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ipsecstack.wire.ip import internet_checksum

VNET_HDR_LEN = 10
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 3, 4, 5, 0x80
COALESCE_MAX = 64  # segments in one super-packet (fwd.h: IPS_COAL_MAX)
COALESCE_OPEN = 8  # flows coalesced at once (IPS_COAL_OPEN)
_COALESCE_BYTES = 65535 - 60
_HDR = struct.Struct("=BBHHHH")
_H = struct.Struct("!H")
_HH = struct.Struct("!HH")
_I = struct.Struct("!I")
ZERO_HDR = bytes(VNET_HDR_LEN)  # no offload asked

Frame = list[bytes | bytearray | memoryview]  # the buffers of one write (os.writev)


_FOLDS: dict[int, tuple[tuple[int, int], ...]] = {}


def _folds(nbytes: int) -> tuple[tuple[int, int], ...]:
    """Shifts (multiples of 16 bits) and masks that halve an ``nbytes``-byte integer down to ~64 bits."""
    steps: list[tuple[int, int]] = []
    bits = nbytes * 8
    while bits > 64:
        h = ((bits // 2 + 15) // 16) * 16
        steps.append((h, (1 << h) - 1))
        bits = h + 1
    if len(_FOLDS) >= 4096:
        _FOLDS.clear()
    folds = _FOLDS[nbytes] = tuple(steps)
    return folds


def _sum(data: bytes | bytearray | memoryview) -> int:
    """The ones' complement sum of ``data`` modulo 0xFFFF (0 stands for both 0 and 0xFFFF).

    ``hi * 2**h + lo = hi + lo (mod 0xFFFF)`` when ``h`` is a multiple of 16: a few halving folds (cheap
    shifts and additions) before the one modulo, which costs a hardware division per 30-bit digit."""
    x = int.from_bytes(data, "big")
    n = len(data)
    if n & 1:
        x <<= 8
        n += 1
    folds = _FOLDS.get(n)
    if folds is None:
        folds = _folds(n)
    for h, m in folds:
        x = (x >> h) + (x & m)
    return x % 0xFFFF


def _fold(s: int) -> int:
    """The folded 16-bit sum of a non-empty buffer's words (never 0 unless every word is 0)."""
    r = s % 0xFFFF
    return r if r or not s else 0xFFFF


def csum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """The folded ones' complement sum (not complemented) of ``data``, added to ``start``."""
    return 0xFFFF ^ internet_checksum(data, start)


def pseudo(ip: bytes | bytearray, proto: int, l4_len: int) -> int:
    addrs = ip[12:20] if ip[0] >> 4 == 4 else ip[8:40]
    return csum(addrs, proto + l4_len)


def _complement(s: int) -> int:
    """The checksum field for the words' sum ``s``: ~fold(s) (0 and 0xFFFF verify alike)."""
    r = s % 0xFFFF
    return 0xFFFF - r if r else 0


def _segments(pkt: bytes, gso_type: int, gso_size: int) -> list[bytes]:
    version = pkt[0] >> 4
    n = len(pkt)
    if version == 4:
        l3 = (pkt[0] & 0x0F) * 4
        proto = pkt[9]
        if l3 < 20 or n < l3 or (pkt[2] << 8 | pkt[3]) != n:
            return []
    elif version == 6 and n >= 40:
        l3, proto = 40, pkt[6]
        if 40 + (pkt[4] << 8 | pkt[5]) != n:
            return []
    else:
        return []
    tcp = gso_type in (GSO_TCPV4, GSO_TCPV6)
    if (tcp and (proto != 6 or (version == 4) != (gso_type == GSO_TCPV4))) or (not tcp and proto != 17):
        return []
    if gso_size == 0 or n < l3 + (20 if tcp else 8):
        return []
    hdrs = l3 + ((pkt[l3 + 12] >> 4) * 4 if tcp else 8)
    if hdrs > n or (tcp and hdrs < l3 + 20):
        return []
    view = memoryview(pkt)
    count = max(1, -(-(n - hdrs) // gso_size))
    # the words that are the same in every segment, summed once: the pseudo-header's addresses and
    # protocol, the IPv4 header without length, ID and checksum, the TCP header without sequence
    # number, flags and checksum (the UDP header without length and checksum)
    addr_sum = _sum(view[12:20] if version == 4 else view[8:40]) + proto
    hdr = bytearray(view[:hdrs])
    if version == 4:
        hdr[2:6] = b"\0\0\0\0"
        hdr[10:12] = b"\0\0"
        ident = pkt[4] << 8 | pkt[5]
        ip_sum = _sum(hdr[:l3])
    if tcp:
        seq0 = _I.unpack_from(pkt, l3 + 4)[0]
        flags0 = pkt[l3 + 13]
        hdr[l3 + 4 : l3 + 8] = b"\0\0\0\0"
        hdr[l3 + 16 : l3 + 18] = b"\0\0"
        hdr[l3 + 13] = 0
    else:
        hdr[l3 + 4 : l3 + 8] = b"\0\0\0\0"
    l4_sum = _sum(hdr[l3:])
    out: list[bytes] = []
    last = count - 1
    for i in range(count):
        start = hdrs + i * gso_size
        chunk = view[start : min(n, start + gso_size)]
        size = hdrs + len(chunk)
        l4_len = size - l3
        seg = bytearray(hdr)
        if version == 4:
            idv = (ident + i) & 0xFFFF
            _HH.pack_into(seg, 2, size, idv)
            _H.pack_into(seg, 10, _complement(ip_sum + size + idv))
        else:
            _H.pack_into(seg, 4, size - 40)
        if tcp:
            seq = (seq0 + i * gso_size) & 0xFFFFFFFF
            flags = flags0
            if i > 0:
                flags &= ~0x80 & 0xFF  # CWR on the first segment only
            if i < last:
                flags &= ~0x09 & 0xFF  # FIN and PSH on the last only
            _I.pack_into(seg, l3 + 4, seq)
            seg[l3 + 13] = flags
            # sequence number words, the data-offset/flags word, the pseudo-header's length
            s = addr_sum + l4_len + l4_sum + (seq >> 16) + (seq & 0xFFFF) + flags + _sum(chunk)
            _H.pack_into(seg, l3 + 16, _complement(s))
        else:
            _H.pack_into(seg, l3 + 4, l4_len)
            c = _complement(addr_sum + 2 * l4_len + l4_sum + _sum(chunk))
            _H.pack_into(seg, l3 + 6, c or 0xFFFF)
        out.append(b"".join((seg, chunk)))  # one copy of the payload
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
        c = ~csum(memoryview(b)[cstart:]) & 0xFFFF
        _H.pack_into(b, cstart + coff, 0xFFFF if c == 0 and coff == 6 else c)
        return [bytes(b)]
    return [pkt]


# --- coalescing (the Python side of fwd_coal.c) ---------------------------------------------------


class _Run:
    """Consecutive segments of one TCP flow that will be one super-packet."""

    __slots__ = ("bytes", "closed", "first", "gso", "hdrs", "l3", "next_seq", "segs")

    def __init__(self, pkt: bytes, l3: int, hdrs: int, payload: int, seq: int, flags: int) -> None:
        self.first = pkt
        self.l3 = l3
        self.hdrs = hdrs
        self.gso = payload
        self.bytes = payload
        self.next_seq = (seq + payload) & 0xFFFFFFFF
        self.closed = bool(flags & 0x08)
        self.segs: list[bytes] = [pkt]

    def joins(self, pkt: bytes, hdrs: int, payload: int, seq: int, flags: int) -> bool:
        if (
            self.closed
            or len(self.segs) == COALESCE_MAX
            or payload == 0
            or payload > self.gso
            or seq != self.next_seq
            or hdrs != self.hdrs
            or (flags & ~0x08) != 0x10
            or self.bytes + payload > _COALESCE_BYTES
        ):
            return False
        x = self.first
        l3 = self.l3
        if l3 == 20:  # TOS, DF, TTL
            if x[1] != pkt[1] or (x[6] ^ pkt[6]) & 0x40 or x[8] != pkt[8]:
                return False
        elif x[:4] != pkt[:4] or x[7] != pkt[7]:  # traffic class, flow label, hop limit
            return False
        # acknowledgment, data offset, window; urgent pointer and options
        return (
            x[l3 + 8 : l3 + 13] == pkt[l3 + 8 : l3 + 13]
            and x[l3 + 14 : l3 + 16] == pkt[l3 + 14 : l3 + 16]
            and (x[l3 + 18 : hdrs] == pkt[l3 + 18 : hdrs])
        )

    def add(self, pkt: bytes, payload: int, seq: int, flags: int) -> None:
        self.segs.append(pkt)
        self.bytes += payload
        self.next_seq = (seq + payload) & 0xFFFFFFFF
        self.closed = payload < self.gso or bool(flags & 0x08)

    def frame(self) -> Frame:
        segs = self.segs
        if len(segs) == 1:
            return [ZERO_HDR, self.first]
        l3, hdrs = self.l3, self.hdrs
        h = bytearray(memoryview(self.first)[:hdrs])
        total = hdrs + self.bytes
        if l3 == 20:
            _H.pack_into(h, 2, total)
            h[10:12] = b"\0\0"
            _H.pack_into(h, 10, _complement(_sum(h[:20])))
            addrs = h[12:20]
        else:
            _H.pack_into(h, 4, total - 40)
            addrs = h[8:40]
        h[l3 + 13] |= segs[-1][l3 + 13] & 0x08  # PSH of the last segment
        # NEEDS_CSUM: the field holds the folded pseudo-header sum, the kernel adds the rest
        _H.pack_into(h, l3 + 16, _fold(_sum(addrs) + 6 + total - l3))
        gso_type = GSO_TCPV4 if l3 == 20 else GSO_TCPV6
        frame: Frame = [_HDR.pack(F_NEEDS_CSUM, gso_type, hdrs, self.gso, l3, 16), h]
        frame.extend(memoryview(s)[hdrs:] for s in segs)
        return frame


def _tcp_of(pkt: bytes) -> tuple[int, int, int, int, int] | None:
    """``(l3, hdrs, payload, seq, flags)`` of a TCP segment that may be coalesced, else None."""
    n = len(pkt)
    if n < 40:
        return None
    b0 = pkt[0]
    if b0 == 0x45:
        if pkt[9] != 6 or (pkt[2] << 8 | pkt[3]) != n or (pkt[6] & 0xBF) or pkt[7]:
            return None  # not TCP, a length that does not match, or a fragment
        l3 = 20
    elif b0 >> 4 == 6:
        if n < 60 or pkt[6] != 6 or 40 + (pkt[4] << 8 | pkt[5]) != n:
            return None
        l3 = 40
    else:
        return None
    thl = (pkt[l3 + 12] >> 4) * 4
    if thl < 20 or l3 + thl > n:
        return None
    hdrs = l3 + thl
    return l3, hdrs, n - hdrs, _I.unpack_from(pkt, l3 + 4)[0], pkt[l3 + 13]


def coalesce(packets: Sequence[bytes]) -> list[tuple[Frame, int, int]]:
    """The writes that carry ``packets``: ``(buffers, packets, IP bytes)`` each, in an order that keeps
    every flow's order (runs of other flows may pass)."""
    out: list[tuple[Frame, int, int]] = []
    runs: dict[bytes, _Run] = {}

    def close(r: _Run) -> None:
        out.append((r.frame(), len(r.segs), len(r.segs) * r.hdrs + r.bytes))

    for pkt in packets:
        t = _tcp_of(pkt)
        if t is None:
            out.append(([ZERO_HDR, pkt], 1, len(pkt)))
            continue
        l3, hdrs, payload, seq, flags = t
        key = pkt[12:24] if l3 == 20 else pkt[8:44]  # addresses and ports
        r = runs.get(key)
        if r is not None:
            if r.joins(pkt, hdrs, payload, seq, flags):
                r.add(pkt, payload, seq, flags)
                continue
            close(r)  # this flow's older run goes first
            del runs[key]
        if payload == 0 or (flags & ~0x08) != 0x10:  # pure ACKs, SYN, FIN, RST, URG, ECE/CWR
            out.append(([ZERO_HDR, pkt], 1, len(pkt)))
            continue
        if len(runs) == COALESCE_OPEN:
            oldest = next(iter(runs))
            close(runs.pop(oldest))
        runs[key] = _Run(pkt, l3, hdrs, payload, seq, flags)
    for r in runs.values():
        close(r)
    return out
