"""Certificates and private keys named by the config: ``certs``/``cacerts`` and ``[secrets.private.<name>]``.

    [connections.gw.local]
    auth = "pubkey"
    certs = ["x509/gw-a.pem"]          # our certificate (PEM or DER); relative to the config file
    cacerts = ["x509ca/sub-ca.pem"]     # our chain: intermediates are sent along with our certificate

    [connections.gw.remote]
    auth = "pubkey"
    cacerts = ["x509ca/root-ca.pem"]    # trust anchors for the peer's certificate
    crls = ["x509crl/root-ca.crl"]      # optional: revocation lists of those CAs (PEM or DER)
    id = "C=CH, O=example, CN=gw-b.example"

    [secrets.private.gw-a]              # swanctl's secrets.private<suffix> (also rsa, ecdsa, pkcs8)
    file = "private/gw-a.pem"
    secret_env = "GW_A_KEY_PASSPHRASE"  # only for an encrypted key (or secret, secret_file)

Parsing only: files are read through the ``read_bytes`` callable; every error names the key path,
the value and the fix, and never shows key material or a passphrase.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ipsecstack.errors import ConfigError
from ipsecstack.ike.auth import PrivateKey
from ipsecstack.ike.certs import signs

KEY_SECTIONS = ("private", "rsa", "ecdsa", "pkcs8")
_KEY_KEYS = {"file", "secret", "secret_file", "secret_env"}
ReadBytes = Callable[[str], bytes]


def _read(read_bytes: ReadBytes, name: str, path: str) -> bytes:
    try:
        return read_bytes(name)
    except OSError as e:
        raise ConfigError(path, name, f"cannot read it: {e.strerror or e}") from None


def _files(value: Any, path: str, example: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, value, example)
    return value


def load_certs(value: Any, path: str, read_bytes: ReadBytes) -> tuple[x509.Certificate, ...]:
    """Certificates from a list of files; a PEM file may hold several."""
    out: list[x509.Certificate] = []
    for i, name in enumerate(_files(value, path, 'give a list of certificate files, e.g. ["x509/gw.pem"]')):
        raw = _read(read_bytes, name, f"{path}[{i}]")
        try:
            out += (
                x509.load_pem_x509_certificates(raw) if b"-----BEGIN" in raw else [x509.load_der_x509_certificate(raw)]
            )
        except ValueError:
            raise ConfigError(f"{path}[{i}]", name, "not an X.509 certificate in PEM or DER") from None
    return tuple(out)


def load_crls(value: Any, path: str, read_bytes: ReadBytes) -> tuple[x509.CertificateRevocationList, ...]:
    """Certificate revocation lists (RFC 5280 §5) from a list of files; a PEM file may hold several."""
    out: list[x509.CertificateRevocationList] = []
    for i, name in enumerate(_files(value, path, 'give a list of CRL files, e.g. ["x509crl/ca.crl"]')):
        raw = _read(read_bytes, name, f"{path}[{i}]")
        try:
            if b"-----BEGIN" in raw:
                pems = re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", raw, re.DOTALL)
                if not pems:
                    raise ValueError("no CRL")
                out += [x509.load_pem_x509_crl(pem) for pem in pems]
            else:
                out.append(x509.load_der_x509_crl(raw))
            for c in out:  # parsed lazily: a malformed extension is a config error now, not a handshake error
                _ = c.extensions, [entry.extensions for entry in c]
        except ValueError:
            raise ConfigError(f"{path}[{i}]", name, "not an X.509 CRL in PEM or DER") from None
    return tuple(out)


def load_private_keys(secrets: Mapping[str, Any], read_bytes: ReadBytes, env: Mapping[str, str]) -> list[PrivateKey]:
    """Every private key in ``[secrets.private.*]`` (and rsa/ecdsa/pkcs8, as swanctl)."""
    keys: list[PrivateKey] = []
    for section in KEY_SECTIONS:
        for name, t in secrets.get(section, {}).items():
            path = f"secrets.{section}.{name}"
            if not isinstance(t, dict) or "file" not in t:
                raise ConfigError(f"{path}.file", "<missing>", 'give the key file: file = "private/gw.pem"')
            for k in t:
                if k not in _KEY_KEYS:
                    raise ConfigError(f"{path}.{k}", "...", f"unknown key; known: {', '.join(sorted(_KEY_KEYS))}")
            password = _passphrase(t, path, read_bytes, env)
            raw = _read(read_bytes, t["file"], f"{path}.file")
            try:
                load = (
                    serialization.load_pem_private_key if b"-----BEGIN" in raw else serialization.load_der_private_key
                )
                key = load(raw, password)
            except TypeError:
                why = "it is encrypted: give its passphrase (secret_env)" if password is None else "it is not encrypted"
                raise ConfigError(f"{path}.file", t["file"], why) from None
            except ValueError:
                fix = "not a private key in PEM or DER, or the passphrase is wrong"
                raise ConfigError(f"{path}.file", t["file"], fix) from None
            if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
                raise ConfigError(f"{path}.file", t["file"], "use an RSA, ECDSA or Ed25519 key")
            keys.append(key)
    return keys


def _passphrase(t: Mapping[str, Any], path: str, read_bytes: ReadBytes, env: Mapping[str, str]) -> bytes | None:
    sources = [k for k in ("secret", "secret_file", "secret_env") if k in t]
    if not sources:
        return None
    if len(sources) > 1:
        raise ConfigError(f"{path}.secret", "<secret>", "give at most one of secret, secret_file, secret_env")
    src = sources[0]
    if src == "secret_env":
        if t[src] not in env:
            raise ConfigError(f"{path}.secret_env", t[src], "that environment variable is not set")
        return env[t[src]].encode()
    if src == "secret_file":
        return _read(read_bytes, t[src], f"{path}.secret_file").strip()
    return str(t[src]).encode()


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def key_for(cert: x509.Certificate, keys: list[PrivateKey], path: str) -> PrivateKey:
    """The private key whose public half is in ``cert``."""
    want = _spki(cert.public_key())
    for key in keys:
        if _spki(key.public_key()) == want:
            return key
    raise ConfigError(
        path, "<certificate>", 'no private key for this certificate: add [secrets.private.<name>] file = "key.pem"'
    )


def is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and signs(cert, cert)
