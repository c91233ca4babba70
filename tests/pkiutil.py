"""Test PKIs built on the fly with ``cryptography``: CAs, intermediates and end-entity certificates.

Keys are generated per test run (never checked in); everything is written as PEM where a test needs files.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

NOW = datetime.datetime.now(datetime.UTC)


def new_key(kind: str = "ecdsa256") -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(65537, 2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    curve = {"ecdsa256": ec.SECP256R1(), "ecdsa384": ec.SECP384R1(), "ecdsa521": ec.SECP521R1()}[kind]
    return ec.generate_private_key(curve)


def name(cn: str, org: str = "ipsecstack test") -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])  # fmt: skip


@dataclass
class Issued:
    cert: x509.Certificate
    key: Any

    @property
    def dn(self) -> str:
        return ", ".join(f"{a.rfc4514_attribute_name}={a.value}" for a in self.cert.subject)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, password: bytes | None = None) -> bytes:
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.pem", directory / f"{stem}.key.pem"
        cert.write_bytes(self.pem())
        key.write_bytes(self.key_pem())
        return cert, key


def issue(
    cn: str,
    issuer: Issued | None = None,
    *,
    kind: str = "ecdsa256",
    ca: bool = False,
    path_length: int | None = None,
    san: tuple[str, ...] = (),
    days: tuple[int, int] = (-1, 365),
    key_usage: str | None = None,
    org: str = "ipsecstack test",
    extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
) -> Issued:
    """A certificate for ``cn`` signed by ``issuer`` (self-signed when None)."""
    key = new_key(kind)
    subject = name(cn, org)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + datetime.timedelta(days=days[0]))
        .not_valid_after(NOW + datetime.timedelta(days=days[1]))
    )
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
    names: list[x509.GeneralName] = []
    for s in san:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            names.append(x509.RFC822Name(s) if "@" in s else x509.DNSName(s))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for ext, critical in extensions:  # (extension, critical)
        b = b.add_extension(ext, critical=critical)
    if key_usage == "encipher-only":
        b = b.add_extension(x509.KeyUsage(False, False, True, False, False, False, False, False, False), critical=True)
    signer = issuer.key if issuer else key
    algo = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return Issued(b.sign(signer, algo), key)


def crl(
    issuer: Issued, revoked: tuple[Issued, ...] = (), *, reason: x509.ReasonFlags | None = None, next_days: int = 7
) -> x509.CertificateRevocationList:
    """A CRL by ``issuer`` listing ``revoked`` (each with ``reason`` if given)."""
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(NOW - datetime.timedelta(days=1))
        .next_update(NOW + datetime.timedelta(days=next_days))
    )
    for r in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(r.cert.serial_number).revocation_date(NOW)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        b = b.add_revoked_certificate(entry.build())
    algo = None if isinstance(issuer.key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(issuer.key, algo)
