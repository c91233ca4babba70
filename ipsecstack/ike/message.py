"""IKEv2 message codec (RFC 7296 §3): header, payload chain, and every payload this stack speaks.

Decoding never trusts a length: each field is bounds-checked and a violation raises
:class:`ParseError` (the exchange layer answers INVALID_SYNTAX or drops, per §2.21). The SK payload
(§3.14) is kept as an opaque :class:`Encrypted` container here; ``ike.sk`` seals and opens it.
An unknown payload is kept as :class:`Unknown` (its critical bit decides what the caller does, §2.5).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from ipsecstack.ike.const import ATTR_KEY_LENGTH, Payload
from ipsecstack.ike.payloads import (
    CP,
    KE,
    SA,
    TS,
    AnyPayload,
    Auth,
    Certificate,
    Delete,
    Encrypted,
    Identification,
    Nonce,
    Notify,
    Proposal,
    TrafficSelector,
    Transform,
    Unknown,
    Vendor,
)

HEADER = struct.Struct("!8s8sBBBBII")
HEADER_LEN: Final = 28
MAJOR_VERSION: Final = 2  # RFC 7296 §3.1: we speak 2.0; a higher major version is refused (§2.5)
GENERIC = struct.Struct("!BBH")
MAX_MESSAGE: Final = 65535


class ParseError(ValueError):
    """A malformed message; ``reason`` is a short stable string for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Message:
    spi_i: bytes
    spi_r: bytes
    exchange: int
    flags: int
    message_id: int
    payloads: list[AnyPayload] = field(default_factory=list)
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def is_response(self) -> bool:
        return bool(self.flags & 0x20)

    @property
    def is_initiator(self) -> bool:
        return bool(self.flags & 0x08)

    def get(self, kind: type[AnyPayload]) -> list[AnyPayload]:
        return [p for p in self.payloads if isinstance(p, kind)]

    def notifies(self) -> list[Notify]:
        return [p for p in self.payloads if isinstance(p, Notify)]

    def notify(self, notify_type: int) -> Notify | None:
        return next((n for n in self.notifies() if n.notify_type == notify_type), None)

    def encode(self) -> bytes:
        """The whole message. An :class:`Encrypted` payload must be last (§3.14)."""
        body, first = encode_payloads(self.payloads)
        length = HEADER_LEN + len(body)
        return (
            HEADER.pack(self.spi_i, self.spi_r, first, 0x20, self.exchange, self.flags, self.message_id, length) + body
        )


def _payload_body(p: AnyPayload) -> bytes:
    if isinstance(p, SA):
        return _encode_sa(p)
    if isinstance(p, KE):
        return struct.pack("!HH", p.group, 0) + p.data
    if isinstance(p, Identification):
        return bytes((p.id_type, 0, 0, 0)) + p.data
    if isinstance(p, Auth):
        return bytes((p.method, 0, 0, 0)) + p.data
    if isinstance(p, Nonce | Vendor):
        return p.data
    if isinstance(p, Notify):
        return struct.pack("!BBH", p.protocol, len(p.spi), p.notify_type) + p.spi + p.data
    if isinstance(p, Delete):
        size = len(p.spis[0]) if p.spis else 0
        return struct.pack("!BBH", p.protocol, size, len(p.spis)) + b"".join(p.spis)
    if isinstance(p, TS):
        out = [bytes((len(p.selectors), 0, 0, 0))]
        for ts in p.selectors:
            n = 8 + len(ts.start_addr) + len(ts.end_addr)
            out.append(struct.pack("!BBHHH", ts.ts_type, ts.ip_proto, n, ts.start_port, ts.end_port))
            out.append(ts.start_addr + ts.end_addr)
        return b"".join(out)
    if isinstance(p, CP):
        attrs = b"".join(struct.pack("!HH", t & 0x7FFF, len(v)) + v for t, v in p.attributes)
        return bytes((p.cfg_type, 0, 0, 0)) + attrs
    if isinstance(p, Certificate):
        return bytes((p.encoding,)) + p.data
    if isinstance(p, Encrypted):
        return p.body
    return p.data


def encode_payloads(payloads: list[AnyPayload]) -> tuple[bytes, int]:
    """Encode a payload chain; returns ``(bytes, type of the first payload)``."""
    parts: list[bytes] = []
    for i, p in enumerate(payloads):
        body = _payload_body(p)
        nxt = payloads[i + 1].TYPE if i + 1 < len(payloads) else 0
        if isinstance(p, Encrypted):
            nxt = p.first  # §3.14: the SK payload's Next Payload names the first inner payload
        critical = 0x80 if isinstance(p, Unknown) and p.critical else 0
        parts.append(GENERIC.pack(int(nxt), critical, 4 + len(body)) + body)
    return b"".join(parts), int(payloads[0].TYPE) if payloads else 0


def _encode_sa(sa: SA) -> bytes:
    out = []
    for i, prop in enumerate(sa.proposals):
        tparts = []
        for j, t in enumerate(prop.transforms):
            attrs = b"" if t.key_length is None else struct.pack("!HH", 0x8000 | ATTR_KEY_LENGTH, t.key_length)
            last = 0 if j == len(prop.transforms) - 1 else 3
            tparts.append(struct.pack("!BBHBBH", last, 0, 8 + len(attrs), t.type, 0, t.id) + attrs)
        tbytes = b"".join(tparts)
        last = 0 if i == len(sa.proposals) - 1 else 2
        hdr = struct.pack("!BBHBBBB", last, 0, 8 + len(prop.spi) + len(tbytes), prop.num, prop.protocol,
                          len(prop.spi), len(prop.transforms))  # fmt: skip
        out.append(hdr + prop.spi + tbytes)
    return b"".join(out)


def decode_header(data: bytes) -> tuple[bytes, bytes, int, int, int, int, int, int]:
    """``(spi_i, spi_r, next_payload, version, exchange, flags, message_id, length)``."""
    if len(data) < HEADER_LEN:
        raise ParseError("truncated", "IKE header")
    return HEADER.unpack_from(data)


def decode(data: bytes) -> Message:
    """Decode a whole message (the SK payload stays encrypted)."""
    spi_i, spi_r, first, version, exchange, flags, mid, length = decode_header(data)
    if version >> 4 != MAJOR_VERSION:
        raise ParseError("bad_version", f"major version {version >> 4}")
    if length != len(data):
        raise ParseError("bad_length", f"header says {length}, datagram has {len(data)}")
    msg = Message(spi_i, spi_r, exchange, flags, mid, raw=data)
    msg.payloads = decode_payloads(data, HEADER_LEN, first)
    return msg


def decode_payloads(data: bytes, off: int, nxt: int) -> list[AnyPayload]:
    """Decode a payload chain starting at ``off`` whose first payload type is ``nxt``."""
    out: list[AnyPayload] = []
    end = len(data)
    while nxt != 0:
        if len(out) > 256:
            raise ParseError("too_many_payloads")
        if off + 4 > end:
            raise ParseError("truncated", "generic payload header")
        next_type, crit, plen = GENERIC.unpack_from(data, off)
        if plen < 4 or off + plen > end:
            raise ParseError("bad_length", f"payload type {nxt} length {plen}")
        body = data[off + 4 : off + plen]
        if nxt == Payload.SK:
            out.append(Encrypted(next_type, body))
            if off + plen != end:
                raise ParseError("bad_syntax", "SK payload must be the last payload")
            return out
        out.append(_decode_one(nxt, body, bool(crit & 0x80)))
        off += plen
        nxt = next_type
    if off != end:
        raise ParseError("bad_length", "trailing bytes after the last payload")
    return out


def _need(body: bytes, n: int, what: str) -> None:
    if len(body) < n:
        raise ParseError("truncated", what)


def _decode_one(ptype: int, body: bytes, critical: bool) -> AnyPayload:
    if ptype == Payload.SA:
        return _decode_sa(body)
    if ptype == Payload.KE:
        _need(body, 4, "KE")
        return KE(struct.unpack_from("!H", body)[0], body[4:])
    if ptype in (Payload.IDi, Payload.IDr):
        _need(body, 4, "ID")
        return Identification(body[0], body[4:], ptype == Payload.IDi)
    if ptype == Payload.AUTH:
        _need(body, 4, "AUTH")
        return Auth(body[0], body[4:])
    if ptype == Payload.NONCE:
        if not 16 <= len(body) <= 256:
            raise ParseError("bad_syntax", "nonce must be 16..256 bytes (§3.9)")
        return Nonce(body)
    if ptype == Payload.NOTIFY:
        _need(body, 4, "N")
        proto, spi_size, ntype = struct.unpack_from("!BBH", body)
        _need(body, 4 + spi_size, "N SPI")
        return Notify(ntype, body[4 + spi_size :], proto, body[4 : 4 + spi_size])
    if ptype == Payload.DELETE:
        _need(body, 4, "D")
        proto, size, count = struct.unpack_from("!BBH", body)
        if len(body) != 4 + size * count:
            raise ParseError("bad_length", "D payload SPIs")
        return Delete(proto, [body[4 + i * size : 4 + (i + 1) * size] for i in range(count)])
    if ptype == Payload.VENDOR:
        return Vendor(body)
    if ptype in (Payload.TSi, Payload.TSr):
        return _decode_ts(body, ptype == Payload.TSi)
    if ptype == Payload.CP:
        _need(body, 4, "CP")
        attrs = []
        off = 4
        while off < len(body):
            _need(body, off + 4, "CP attribute")
            t, n = struct.unpack_from("!HH", body, off)
            _need(body, off + 4 + n, "CP attribute value")
            attrs.append((t & 0x7FFF, body[off + 4 : off + 4 + n]))
            off += 4 + n
        return CP(body[0], attrs)
    if ptype in (Payload.CERT, Payload.CERTREQ):
        _need(body, 1, "CERT")
        return Certificate(body[0], body[1:], ptype == Payload.CERTREQ)
    return Unknown(ptype, body, critical)


def _decode_sa(body: bytes) -> SA:
    proposals: list[Proposal] = []
    off = 0
    last = 2
    while last == 2:
        if len(proposals) >= 64:
            raise ParseError("too_many_proposals")
        _need(body, off + 8, "proposal")
        last, _r, plen, num, proto, spi_size, ntrans = struct.unpack_from("!BBHBBBB", body, off)
        if last not in (0, 2) or plen < 8 + spi_size or off + plen > len(body):
            raise ParseError("bad_syntax", "proposal substructure")
        spi = body[off + 8 : off + 8 + spi_size]
        toff = off + 8 + spi_size
        tend = off + plen
        transforms = []
        tlast = 3
        for _ in range(ntrans):
            if tlast != 3:
                raise ParseError("bad_syntax", "transform count")
            _need(body, toff + 8, "transform")
            tlast, _r1, tlen, ttype, _r2, tid = struct.unpack_from("!BBHBBH", body, toff)
            if tlast not in (0, 3) or tlen < 8 or toff + tlen > tend:
                raise ParseError("bad_syntax", "transform substructure")
            key_length = None
            aoff = toff + 8
            while aoff < toff + tlen:
                _need(body, aoff + 4, "attribute")
                atype, aval = struct.unpack_from("!HH", body, aoff)
                if atype & 0x8000:
                    if atype & 0x7FFF == ATTR_KEY_LENGTH:
                        key_length = aval
                    aoff += 4
                else:
                    aoff += 4 + aval
            if aoff != toff + tlen:
                raise ParseError("bad_syntax", "transform attributes")
            transforms.append(Transform(ttype, tid, key_length))
            toff += tlen
        if toff != tend or tlast != 0:
            raise ParseError("bad_syntax", "proposal transforms")
        proposals.append(Proposal(num, proto, spi, transforms))
        off += plen
    if off != len(body):
        raise ParseError("bad_syntax", "trailing bytes in SA payload")
    return SA(proposals)


def _decode_ts(body: bytes, initiator: bool) -> TS:
    _need(body, 4, "TS")
    count = body[0]
    off = 4
    sels = []
    for _ in range(count):
        _need(body, off + 8, "traffic selector")
        ts_type, proto, slen, sp, ep = struct.unpack_from("!BBHHH", body, off)
        alen = {7: 4, 8: 16}.get(ts_type)
        if alen is None or slen != 8 + 2 * alen or off + slen > len(body):
            raise ParseError("bad_syntax", f"traffic selector type {ts_type}")
        a = body[off + 8 : off + 8 + alen]
        b = body[off + 8 + alen : off + 8 + 2 * alen]
        sels.append(TrafficSelector(ts_type, proto, sp, ep, a, b))
        off += slen
    if off != len(body):
        raise ParseError("bad_syntax", "trailing bytes in TS payload")
    return TS(sels, initiator)


__all__ = [  # the payload records (payloads.py) are part of the codec's surface
    "CP", "HEADER_LEN", "KE", "MAJOR_VERSION", "MAX_MESSAGE", "SA", "TS", "AnyPayload", "Auth", "Certificate",
    "Delete", "Encrypted", "Identification", "Message", "Nonce", "Notify", "ParseError", "Proposal",
    "TrafficSelector", "Transform", "Unknown", "Vendor", "decode", "decode_header", "decode_payloads",
    "encode_payloads",
]  # fmt: skip
