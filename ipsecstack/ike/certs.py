"""X.509 for IKE: distinguished names, identities bound to certificates, certificate paths.

Theory of operation
-------------------
Everything here is a pure function of its arguments; the time used to check validity periods is
passed in (seconds since the epoch), so the sans-IO core never reads a clock.

* A peer's identity (IDi/IDr, RFC 7296 §3.5) must be *in* the certificate that authenticates it
  (RFC 4945 §3.1): an ID_DER_ASN1_DN equals the subject, an ID_FQDN / ID_RFC822_ADDR / ID_IPV*_ADDR
  is one of the subjectAltName entries. Distinguished names are compared attribute by attribute,
  case-insensitively, so a PrintableString and a UTF8String spelling of the same name match.
* A certificate path is built from the end-entity certificate upwards through the intermediates the
  peer sent (CERT payloads) to one of the configured trust anchors (``cacerts``): each link is a
  signature check (``verify_directly_issued_by``), every certificate must be inside its validity
  period, every issuer must be a CA (basicConstraints) within its pathLenConstraint, and an
  end-entity keyUsage, if present, must allow signatures (RFC 4945 §5.1.3.2). A pinned peer
  certificate (``remote.certs``) is accepted without a path. Revocation (CRL, OCSP) is not checked.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ipsecstack.ike.const import IdType

MAX_PATH = 8
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


# --- distinguished names -------------------------------------------------------------------------


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


# --- identities in certificates ------------------------------------------------------------------


def _san(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def cert_has_id(cert: x509.Certificate, id_type: int, data: bytes) -> bool:
    """RFC 4945 §3.1: is this identity the certificate's subject or one of its subjectAltNames?"""
    if id_type == IdType.ID_DER_ASN1_DN:
        return same_dn(cert.subject.public_bytes(), data)
    text = data.decode(errors="replace").casefold()
    for name in _san(cert):
        if id_type == IdType.ID_FQDN and isinstance(name, x509.DNSName) and name.value.casefold() == text:
            return True
        if id_type == IdType.ID_RFC822_ADDR and isinstance(name, x509.RFC822Name) and name.value.casefold() == text:
            return True
        ip = name.value if isinstance(name, x509.IPAddress) else None
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address) and ip.packed == data:
            return id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR)
    return False


def ca_hash(cert: x509.Certificate) -> bytes:
    """RFC 7296 §3.7: a CERTREQ names a CA by the SHA-1 hash of its SubjectPublicKeyInfo."""
    return hashlib.sha1(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()


def subject(cert: x509.Certificate) -> str:
    return dn_text(cert.subject.public_bytes())


# --- paths -----------------------------------------------------------------------------------------


def _when(cert: x509.Certificate, now: float) -> str | None:
    t = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if t < cert.not_valid_before_utc:
        return f"certificate {subject(cert)!r} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z"
    if t > cert.not_valid_after_utc:
        return f"certificate {subject(cert)!r} expired {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
    return None


def _ca_limit(cert: x509.Certificate) -> tuple[bool, int | None]:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False, None
    return bc.ca, bc.path_length


def signs(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    """``issuer`` issued ``cert``: names match and its key verifies the signature."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _as_issuer(ca: x509.Certificate, below: int, what: str) -> str | None:
    """Why ``ca`` may not issue a path with ``below`` CA certificates under it (None: it may)."""
    is_ca, limit = _ca_limit(ca)
    if not is_ca:
        return f"{what} {subject(ca)!r} is not a CA certificate (basicConstraints)"
    if limit is not None and below > limit:
        return f"path too long for CA {subject(ca)!r} (pathLenConstraint {limit})"
    return None


def _signing_allowed(cert: x509.Certificate) -> bool:
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.digital_signature or ku.content_commitment


def verify_path(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    anchors: list[x509.Certificate],
    pinned: list[x509.Certificate],
    now: float,
) -> str | None:
    """None if ``leaf`` is trusted at time ``now``; otherwise why not, in words."""
    if not _signing_allowed(leaf):
        return f"certificate {subject(leaf)!r} has a keyUsage without digitalSignature"
    if (why := _when(leaf, now)) is not None:
        return why
    if any(p == leaf for p in pinned):
        return None
    if not anchors:
        return f"certificate {subject(leaf)!r} is not one of remote.certs and no remote.cacerts are configured"
    cert, below = leaf, 0
    for _ in range(MAX_PATH):
        if any(a == cert for a in anchors):
            return None
        for anchor in anchors:
            if anchor.subject == cert.issuer and signs(anchor, cert):
                return _as_issuer(anchor, below, "trust anchor") or _when(anchor, now)
        up = next((c for c in intermediates if c.subject == cert.issuer and signs(c, cert)), None)
        if up is None:
            return f"no trusted CA issued {subject(cert)!r} (issuer {dn_text(cert.issuer.public_bytes())!r})"
        if (why := _as_issuer(up, below, "issuer") or _when(up, now)) is not None:
            return why
        cert, below = up, below + 1  # ``up`` is one more CA between the next issuer and the leaf
    return f"certificate path longer than {MAX_PATH}"
