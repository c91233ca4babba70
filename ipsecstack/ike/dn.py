"""Distinguished names as IKE uses them (RFC 7296 §3.5 ID_DER_ASN1_DN, RFC 4514 text, RFC 4517 matching).

A DN is parsed from DER by hand (a few dozen lines of TLV reading, so that a peer's ID payload
need not be a valid certificate field for ``cryptography``), printed in strongSwan's text form
(``C=CH, O=example, CN=gw``) and read from it (encoded by ``cryptography``), and compared attribute
by attribute, case-insensitively, so that a PrintableString and a UTF8String spelling of the same
name match. A ``*`` attribute value in a pattern (``remote.id``) matches any value. Pure functions.
"""

from __future__ import annotations

import re

from cryptography import x509

# short names strongSwan and OpenSSL print for DN attributes (RFC 4514 and common extensions)
_SHORT = {
    "2.5.4.3": "CN", "2.5.4.4": "SN", "2.5.4.5": "serialNumber", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST",
    "2.5.4.9": "street", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.12": "T", "2.5.4.42": "G", "2.5.4.46": "dnQualifier",
    "2.5.4.65": "pseudonym", "1.2.840.113549.1.9.1": "E", "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}  # fmt: skip
_BY_NAME = {v.casefold(): k for k, v in _SHORT.items()} | {"emailaddress": "1.2.840.113549.1.9.1"}
_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}

RDN = list[tuple[str, str]]


class DnError(ValueError):
    pass


def _tlv(buf: bytes, off: int) -> tuple[int, int, int]:
    """One DER TLV at ``off``: (tag, start of value, end of value)."""
    if off + 2 > len(buf):
        raise DnError("truncated DER")
    tag, n = buf[off], buf[off + 1]
    off += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 3 or off + k > len(buf):
            raise DnError("bad DER length")
        n, off = int.from_bytes(buf[off : off + k], "big"), off + k
    if off + n > len(buf):
        raise DnError("truncated DER")
    return tag, off, off + n


def _oid(raw: bytes) -> str:
    if not raw:
        raise DnError("empty OID")
    arcs = [min(raw[0] // 40, 2), raw[0] - 40 * min(raw[0] // 40, 2)]
    value = 0
    for b in raw[1:]:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(map(str, arcs))


def parse_dn(der: bytes) -> list[RDN]:
    """An RDNSequence (the DER of an X.509 Name) as [[(oid, text), ...], ...]."""
    tag, off, end = _tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise DnError("not a DER SEQUENCE")
    rdns: list[RDN] = []
    while off < end:
        tag, s_off, s_end = _tlv(der, off)
        if tag != 0x31:
            raise DnError("RDN is not a SET")
        rdn: RDN = []
        while s_off < s_end:
            tag, a_off, a_end = _tlv(der, s_off)
            if tag != 0x30:
                raise DnError("attribute is not a SEQUENCE")
            tag, o_off, o_end = _tlv(der, a_off)
            if tag != 0x06:
                raise DnError("attribute type is not an OID")
            vtag, v_off, v_end = _tlv(der, o_end)
            codec = _STRINGS.get(vtag)
            raw = der[v_off:v_end]
            value = raw.decode(codec, errors="replace") if codec else "#" + raw.hex()
            rdn.append((_oid(der[o_off:o_end]), value))
            s_off = a_end
        rdns.append(rdn)
        off = s_end
    return rdns


def dn_text(der: bytes) -> str:
    """strongSwan's way of writing a DN: ``C=CH, O=strongSwan, CN=moon.strongswan.org``."""
    try:
        rdns = parse_dn(der)
    except DnError:
        return "asn1dn:#" + der.hex()
    return ", ".join("+".join(f"{_SHORT.get(o, o)}={v}" for o, v in rdn) for rdn in rdns)


def dn_from_text(text: str) -> bytes:
    """The DER of a DN written as strongSwan does (``C=CH, O=x, CN=y``; ``\\,`` escapes a comma)."""
    rdns = []
    for part in re.split(r"(?<!\\)[,/]", text):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        oid = _BY_NAME.get(key.strip().casefold(), key.strip())
        if not sep or not re.fullmatch(r"\d+(\.\d+)+", oid):
            raise DnError(f"{key.strip()!r} is not a DN attribute (use C, ST, L, O, OU, CN, E, DC, UID or an OID)")
        try:
            attr = x509.NameAttribute(x509.ObjectIdentifier(oid), value.strip().replace("\\,", ","))
        except ValueError as e:
            raise DnError(str(e)) from None
        rdns.append(x509.RelativeDistinguishedName([attr]))
    if not rdns:
        raise DnError("empty distinguished name")
    return x509.Name(rdns).public_bytes()


def _norm(rdns: list[RDN]) -> list[list[tuple[str, str]]]:
    return [sorted((o, " ".join(v.split()).casefold()) for o, v in rdn) for rdn in rdns]


def same_dn(a: bytes, b: bytes) -> bool:
    try:
        return _norm(parse_dn(a)) == _norm(parse_dn(b))
    except DnError:
        return a == b


def dn_matches(pattern: bytes, der: bytes) -> bool:
    """``der`` matches the DN ``pattern``: the same attributes in the same order, each value equal (as in
    ``same_dn``) or ``*`` in the pattern (strongSwan's wildcard, e.g. ``C=CH, O=example, CN=*``)."""
    try:
        want, got = _norm(parse_dn(pattern)), _norm(parse_dn(der))
    except DnError:
        return False
    if len(want) != len(got):
        return False
    for w_rdn, g_rdn in zip(want, got, strict=True):
        if len(w_rdn) != len(g_rdn):
            return False
        for (w_oid, w_val), (g_oid, g_val) in zip(w_rdn, g_rdn, strict=True):
            if w_oid != g_oid or w_val not in ("*", g_val):
                return False
    return True
