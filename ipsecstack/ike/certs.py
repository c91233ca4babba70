"""X.509 for IKE: identities bound to certificates, certificate paths (distinguished names: :mod:`dn`).

Theory of operation
-------------------
Everything here is a pure function of its arguments; the time used to check validity periods is
passed in (seconds since the epoch), so the sans-IO core never reads a clock.

* A peer's identity (IDi/IDr, RFC 7296 §3.5) must be *in* the certificate that authenticates it
  (RFC 4945 §3.1): an ID_DER_ASN1_DN equals the subject, an ID_FQDN / ID_RFC822_ADDR / ID_IPV*_ADDR
  is one of the subjectAltName entries. Distinguished names are compared attribute by attribute,
  case-insensitively, so a PrintableString and a UTF8String spelling of the same name match.
* A certificate path is built and validated by cryptography's RFC 5280 verifier
  (``cryptography.x509.verification``) from the end-entity certificate through the intermediates the
  peer sent (CERT payloads) to one of the configured trust anchors (``cacerts``), at the time passed
  in: signatures, validity periods, basicConstraints, pathLenConstraint, nameConstraints, unknown
  critical extensions. Its extension policies are ours, RFC 5280's profile rather than the Web
  PKI's: a CA needs basicConstraints cA and, if it has a keyUsage, keyCertSign; an end entity's
  keyUsage, if present, must allow signatures (RFC 4945 §5.1.3.2), its extendedKeyUsage, if present,
  must name a purpose IKE may use (RFC 4945 §5.1.3.12), and it needs no subjectAltName (whether the
  peer's identity is in it is ``cert_has_id``'s question). The verifier decides; when it refuses, the
  path is walked again here only to name the cause in words. A pinned peer certificate
  (``remote.certs``) is its own and only trust anchor.
* Revocation: the path the verifier built (not the anchor) is looked up in the configured CRLs
  (``remote.crls``, direct CRLs signed by the certificate's issuer, RFC 5280 §6.3); OCSP is not used.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import dsa, ed448, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ipsecstack.ike.const import IdType
from ipsecstack.ike.dn import dn_text, same_dn

MAX_PATH = 8
_E = TypeVar("_E", bound=x509.ExtensionType)


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

# RFC 4945 §5.1.3.12: an end entity with an extendedKeyUsage must list one of these (serverAuth and
# clientAuth because real IKE certificates carry them: strongSwan's and Windows' CAs issue them so)
_IKE_EKUS = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.IPSEC_IKE: "ipsecIKE", ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}  # fmt: skip
_EKU_NAMES = {
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection", ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping", ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}  # fmt: skip
# the extensions cryptography's verifier accounts for; a critical one of any other kind refuses the certificate
_KNOWN = {
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.KEY_USAGE, ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.NAME_CONSTRAINTS, ExtensionOID.EXTENDED_KEY_USAGE,
}  # fmt: skip


def _ext_of(extensions: x509.Extensions, kind: type[_E]) -> _E | None:
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _ext(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    return _ext_of(cert.extensions, kind)


def _signing_problem(cert: x509.Certificate) -> str | None:
    """RFC 4945 §5.1.3.2: a keyUsage, if present, must allow digitalSignature or nonRepudiation."""
    ku = _ext(cert, x509.KeyUsage)
    if ku is None or ku.digital_signature or ku.content_commitment:
        return None
    return f"certificate {subject(cert)!r} has a keyUsage without digitalSignature"


def _eku_problem(cert: x509.Certificate) -> str | None:
    """RFC 4945 §5.1.3.12: no extendedKeyUsage, or one naming a purpose IKE may use."""
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is None or any(oid in _IKE_EKUS for oid in eku):
        return None
    listed = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku) or "nothing"
    return (f"certificate {subject(cert)!r} is not for IKE: its extendedKeyUsage lists {listed}, "
            f"none of {', '.join(_IKE_EKUS.values())} (RFC 4945 §5.1.3.12)")  # fmt: skip


def _ca_problem(cert: x509.Certificate, what: str = "issuer") -> str | None:
    """RFC 5280 §6.1.4 (k), (n): an issuer is a CA (basicConstraints) allowed to sign certificates (keyUsage)."""
    bc = _ext(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        return f"{what} {subject(cert)!r} is not a CA certificate (basicConstraints)"
    ku = _ext(cert, x509.KeyUsage)
    if ku is not None and not ku.key_cert_sign:
        return f"{what} {subject(cert)!r} may not sign certificates (keyUsage without keyCertSign)"
    return None


def _raising(check: Callable[[x509.Certificate], str | None]) -> Callable[[Policy, x509.Certificate, Any], None]:
    """One of our checks as an extension validator of cryptography's verifier (it refuses on an exception)."""

    def validate(policy: Policy, cert: x509.Certificate, value: Any) -> None:
        if (why := check(cert)) is not None:
            raise ValueError(why)

    return validate


_AGNOSTIC = Criticality.AGNOSTIC
# RFC 5280 rather than the Web PKI's stricter profile: no keyUsage, AKI, SKI or subjectAltName required
_CA_POLICY = (
    ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, _AGNOSTIC, _raising(_ca_problem))
    .may_be_present(x509.KeyUsage, _AGNOSTIC, _raising(_ca_problem))
)
_EE_POLICY = (
    ExtensionPolicy.permit_all()
    .may_be_present(x509.KeyUsage, _AGNOSTIC, _raising(_signing_problem))
    .may_be_present(x509.ExtendedKeyUsage, _AGNOSTIC, _raising(_eku_problem))
)


def _when(cert: x509.Certificate, t: datetime.datetime) -> str | None:
    if t < cert.not_valid_before_utc:
        return f"certificate {subject(cert)!r} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z"
    if t > cert.not_valid_after_utc:
        return f"certificate {subject(cert)!r} expired {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
    return None


def _unknown_critical(cert: x509.Certificate) -> str | None:
    """RFC 5280 §4.2: a certificate with a critical extension the validator does not process is refused."""
    oid = next((e.oid for e in cert.extensions if e.critical and e.oid not in _KNOWN), None)
    if oid is None:
        return None
    return f"certificate {subject(cert)!r} has a critical extension {oid.dotted_string} that is not supported"


def _leaf_problem(leaf: x509.Certificate, t: datetime.datetime) -> str | None:
    return _signing_problem(leaf) or _eku_problem(leaf) or _when(leaf, t) or _unknown_critical(leaf)


def _issuer_problem(ca: x509.Certificate, below: int, what: str, t: datetime.datetime) -> str | None:
    """Why ``ca`` may not issue a path with ``below`` CA certificates under it (None: no reason found)."""
    if (why := _ca_problem(ca, what)) is not None:
        return why
    bc = _ext(ca, x509.BasicConstraints)
    if bc is not None and bc.path_length is not None and below > bc.path_length:
        return f"path too long for CA {subject(ca)!r} (pathLenConstraint {bc.path_length})"
    if isinstance(ca.public_key(), ed25519.Ed25519PublicKey | ed448.Ed448PublicKey | dsa.DSAPublicKey):
        return f"{what} {subject(ca)!r} signs with a key type the path validator refuses (RSA and ECDSA CAs only)"
    return _when(ca, t) or _unknown_critical(ca)


def signs(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    """``issuer`` issued ``cert``: names match and its key verifies the signature."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _verifier_says(e: VerificationError) -> str:
    text = re.sub(r"\s*\(encountered processing <Certificate.*\)$", "", str(e))
    return re.sub(r"^((validation failed|candidates exhausted|fatal error): )+", "", text)


def _diagnose(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], anchors: list[x509.Certificate],
    t: datetime.datetime, said: str,
) -> str:  # fmt: skip
    """Why the verifier refused ``leaf`` in words: the first problem found walking its path up to an anchor."""
    if (why := _leaf_problem(leaf, t)) is not None:
        return why
    path, cert = [leaf], leaf
    while anchors and not any(a == cert for a in anchors):
        if len(path) > MAX_PATH:
            return f"certificate path longer than {MAX_PATH}"
        anchor = next((a for a in anchors if a.subject == cert.issuer and signs(a, cert)), None)
        up = anchor or next((c for c in intermediates if c.subject == cert.issuer and signs(c, cert)), None)
        if up is None:
            return f"no trusted CA issued {subject(cert)!r} (issuer {dn_text(cert.issuer.public_bytes())!r})"
        # ``len(path) - 1`` CA certificates lie between ``up`` and the leaf
        if (why := _issuer_problem(up, len(path) - 1, "trust anchor" if anchor else "issuer", t)) is not None:
            return why
        path.append(up)
        if anchor is not None:
            break
        cert = up
    if "nameconstraint" in said.replace(" ", "").casefold():
        ncs = [repr(subject(c)) for c in path[1:] if _ext(c, x509.NameConstraints) is not None]
        names = ", ".join(str(n.value) for n in _san(leaf)) or "none"
        return (f"certificate {subject(leaf)!r} (subjectAltName: {names}) fails the nameConstraints of "
                f"{', '.join(ncs) or 'its CA'}: {said}")  # fmt: skip
    if "max depth" in said:
        return f"certificate path longer than {MAX_PATH}"
    return f"certificate {subject(leaf)!r} refused by path validation: {said}"


def _crl_usable(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    """A direct CRL (RFC 5280 §5) of ``issuer``: its name, its signature, no critical extension we do not know."""
    if crl.issuer != issuer.subject:
        return False
    for ext in crl.extensions:
        if isinstance(ext.value, x509.IssuingDistributionPoint) and ext.value.indirect_crl:
            return False  # RFC 5280 §5.2.5: entries may belong to other issuers; not supported
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            return False  # RFC 5280 §5.2: a CRL with an unknown critical extension must not be used
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def revoked(chain: list[x509.Certificate], crls: Sequence[x509.CertificateRevocationList]) -> str | None:
    """Why a certificate of ``chain`` (leaf first, trust anchor last) is revoked by its issuer's CRL (None: none is).

    The anchor itself is trusted as configured. A stale CRL (past nextUpdate) still counts: a serial it
    lists stays revoked. A delta CRL's removeFromCRL entry (RFC 5280 §5.3.1) is not a revocation.
    """
    for cert, issuer in itertools.pairwise(chain):
        for crl in crls:
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is None or not _crl_usable(crl, issuer):
                continue
            reason = _ext_of(entry.extensions, x509.CRLReason)
            if reason is not None and reason.reason == x509.ReasonFlags.remove_from_crl:
                continue
            why = f", reason {reason.reason.value}" if reason is not None else ""
            return (f"certificate {subject(cert)!r} revoked {entry.revocation_date_utc:%Y-%m-%d %H:%M:%S}Z "
                    f"(CRL of {subject(issuer)!r}{why})")  # fmt: skip
    return None


def verify_path(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    anchors: list[x509.Certificate],
    pinned: list[x509.Certificate],
    now: float,
    crls: Sequence[x509.CertificateRevocationList] = (),
) -> str | None:
    """None if ``leaf`` is trusted at time ``now``; otherwise why not, in words.

    cryptography's RFC 5280 verifier decides, with our IKE profile (RFC 4945 §5.1.3) as extension
    policies; a pinned ``leaf`` is its own trust anchor and nothing else is. Then the path it built
    is checked against ``crls``.
    """
    pin = any(p == leaf for p in pinned)
    if not pin and not anchors:
        return f"certificate {subject(leaf)!r} is not one of remote.certs and no remote.cacerts are configured"
    t = datetime.datetime.fromtimestamp(now, datetime.UTC)
    verifier = (
        PolicyBuilder()
        .store(Store([leaf] if pin else anchors))
        .time(t)
        .max_chain_depth(MAX_PATH)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()  # the client profile asks for no subjectAltName: the identity check is ours
    )
    try:
        chain = verifier.verify(leaf, [] if pin else intermediates).chain
    except VerificationError as e:
        return _diagnose(leaf, intermediates, [] if pin else anchors, t, _verifier_says(e))
    return revoked(chain, crls)
