"""IKE_AUTH proofs (RFC 7296 §2.15): pre-shared keys, and signatures (RFC 7296 §3.8, RFC 7427, RFC 8420).

Both ends sign (or MAC) their "signed octets": their own first message, the peer's nonce and
prf(SK_p, ID'). With a signature the key is a certificate's; which encoding we *send* depends on
what the peer announced in SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4): if it speaks RFC 7427 we send
method 14 (Digital Signature: an ASN.1 AlgorithmIdentifier, then the signature) with the best hash
both support; otherwise the classic methods (1: RSA PKCS#1 v1.5 with SHA-1, 9/10/11: ECDSA with the
curve's hash, r||s). We *accept* all of them. Stateless; the only state is :class:`Credentials`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from ipsecstack.ike import message as m
from ipsecstack.ike.certs import ca_hash
from ipsecstack.ike.const import AuthMethod, Notify
from ipsecstack.ike.keymat import Prf

KEY_PAD = b"Key Pad for IKEv2"
CERT_X509_SIGNATURE = 4  # RFC 7296 §3.6, Certificate Encoding
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class HashAlg(IntEnum):
    """IKEv2 Hash Algorithms registry (RFC 7427 §7, RFC 8420 §2)."""

    SHA1 = 1
    SHA2_256 = 2
    SHA2_384 = 3
    SHA2_512 = 4
    IDENTITY = 5


WE_ACCEPT = (HashAlg.SHA2_256, HashAlg.SHA2_384, HashAlg.SHA2_512, HashAlg.IDENTITY)
_HASH: dict[HashAlg, Callable[[], hashes.HashAlgorithm]] = {
    HashAlg.SHA2_256: hashes.SHA256,
    HashAlg.SHA2_384: hashes.SHA384,
    HashAlg.SHA2_512: hashes.SHA512,
}
# RFC 7427 Appendix A and RFC 8420 §2: the DER AlgorithmIdentifiers of the signature schemes we speak
_RSA_OID = bytes.fromhex("300d06092a864886f70d0101")
_ECDSA_OID = bytes.fromhex("300a06082a8648ce3d0403")
ALGIDS: dict[bytes, tuple[str, HashAlg]] = {
    _RSA_OID + bytes.fromhex("0b0500"): ("rsa", HashAlg.SHA2_256),
    _RSA_OID + bytes.fromhex("0c0500"): ("rsa", HashAlg.SHA2_384),
    _RSA_OID + bytes.fromhex("0d0500"): ("rsa", HashAlg.SHA2_512),
    _ECDSA_OID + b"\x02": ("ecdsa", HashAlg.SHA2_256),
    _ECDSA_OID + b"\x03": ("ecdsa", HashAlg.SHA2_384),
    _ECDSA_OID + b"\x04": ("ecdsa", HashAlg.SHA2_512),
    bytes.fromhex("300506032b6570"): ("ed25519", HashAlg.IDENTITY),
}
_ALGID_OF = {v: k for k, v in ALGIDS.items()}
# RFC 4754: the classic ECDSA methods fix curve, hash and the r||s width
_CLASSIC_EC = {
    "secp256r1": (AuthMethod.ECDSA_256, HashAlg.SHA2_256, 32),
    "secp384r1": (AuthMethod.ECDSA_384, HashAlg.SHA2_384, 48),
    "secp521r1": (AuthMethod.ECDSA_521, HashAlg.SHA2_512, 66),
}
_EC_BY_METHOD = {v[0]: (k, v[1], v[2]) for k, v in _CLASSIC_EC.items()}


@dataclass(frozen=True)
class Credentials:
    """How each side proves itself (``local.auth`` / ``remote.auth``) and what that needs.

    ``certs``: our end-entity certificate first, then intermediates to send; ``key`` its private key.
    ``cacerts``: trust anchors for the peer's certificate; ``peer_certs``: peer certificates trusted
    as they are (pinned, strongSwan's ``remote.certs``); ``crls``: revocation lists for the peer's path.
    """

    local: str = "psk"
    remote: str = "psk"
    key: PrivateKey | None = field(default=None, repr=False)
    certs: tuple[x509.Certificate, ...] = ()
    cacerts: tuple[x509.Certificate, ...] = ()
    peer_certs: tuple[x509.Certificate, ...] = ()
    send_certreq: bool = True
    crls: tuple[x509.CertificateRevocationList, ...] = ()

    def cert_payloads(self) -> list[m.AnyPayload]:
        from cryptography.hazmat.primitives.serialization import Encoding

        return [m.Certificate(CERT_X509_SIGNATURE, c.public_bytes(Encoding.DER)) for c in self.certs]

    def certreq(self) -> list[m.AnyPayload]:
        """RFC 7296 §3.7: the CAs we trust, by key hash (an empty list asks for any certificate)."""
        if self.remote != "pubkey" or not self.send_certreq:
            return []
        return [m.Certificate(CERT_X509_SIGNATURE, b"".join(ca_hash(c) for c in self.cacerts), request=True)]


def certreqs(creds: list[Credentials]) -> list[m.AnyPayload]:
    """The CERTREQ a responder sends in IKE_SA_INIT for several candidate connections (profiles chosen in
    IKE_AUTH): one payload with the CA key hashes of all of them, so a client of any of them sends its
    certificate (RFC 7296 §3.7). One candidate: its own CERTREQ, unchanged."""
    if len(creds) == 1:
        return creds[0].certreq()
    hashes: list[bytes] = []
    asked = False
    for c in creds:
        for p in c.certreq():
            assert isinstance(p, m.Certificate)
            asked = True
            for i in range(0, len(p.data), 20):  # SHA-1 key hashes, 20 octets each
                if p.data[i : i + 20] not in hashes:
                    hashes.append(p.data[i : i + 20])
    return [m.Certificate(CERT_X509_SIGNATURE, b"".join(hashes), request=True)] if asked else []


def signed_octets(first_message: bytes, peer_nonce: bytes, prf: Prf, sk_p: bytes, ident: m.Identification) -> bytes:
    """RFC 7296 §2.15: <message> | <peer's nonce> | prf(SK_p, ID type | RESERVED | ID data)."""
    return first_message + peer_nonce + prf(sk_p, bytes((ident.id_type, 0, 0, 0)) + ident.data)


def psk_auth(prf: Prf, psk: bytes, octets: bytes) -> bytes:
    """RFC 7296 §2.15: prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    return prf(prf(psk, KEY_PAD), octets)


def hash_notify() -> m.Notify:
    """RFC 7427 §4: the hashes we accept in signatures, announced in IKE_SA_INIT."""
    return m.Notify(Notify.SIGNATURE_HASH_ALGORITHMS, b"".join(h.to_bytes(2, "big") for h in WE_ACCEPT))


def parse_hashes(data: bytes) -> frozenset[int]:
    return frozenset(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data) - 1, 2))


def _pick(preferred: HashAlg, peer: frozenset[int]) -> HashAlg | None:
    if preferred in peer:
        return preferred
    return next((h for h in (HashAlg.SHA2_256, HashAlg.SHA2_384, HashAlg.SHA2_512) if h in peer), None)


def sign(key: PrivateKey, octets: bytes, peer_hashes: frozenset[int] | None) -> m.Auth:
    """Our AUTH payload: RFC 7427 if the peer announced a hash we can use, else the classic method."""
    if isinstance(key, ed25519.Ed25519PrivateKey):  # RFC 8420: only defined with RFC 7427
        return _digital(("ed25519", HashAlg.IDENTITY), key.sign(octets))
    if isinstance(key, ec.EllipticCurvePrivateKey):
        method, preferred, width = _CLASSIC_EC[key.curve.name]
        h = _pick(preferred, peer_hashes) if peer_hashes is not None else None
        if h is not None:
            return _digital(("ecdsa", h), key.sign(octets, ec.ECDSA(_HASH[h]())))
        r, s = decode_dss_signature(key.sign(octets, ec.ECDSA(_HASH[preferred]())))
        return m.Auth(method, r.to_bytes(width, "big") + s.to_bytes(width, "big"))
    h = _pick(HashAlg.SHA2_256, peer_hashes) if peer_hashes is not None else None
    if h is not None:
        return _digital(("rsa", h), key.sign(octets, padding.PKCS1v15(), _HASH[h]()))
    return m.Auth(AuthMethod.RSA_SIG, key.sign(octets, padding.PKCS1v15(), hashes.SHA1()))


def _digital(scheme: tuple[str, HashAlg], signature: bytes) -> m.Auth:
    algid = _ALGID_OF[scheme]
    return m.Auth(AuthMethod.DIGITAL_SIGNATURE, bytes((len(algid),)) + algid + signature)


def describe(auth: m.Auth) -> str:
    """What a peer's AUTH payload uses, for logs: ``ecdsa-sha256 (RFC 7427)``."""
    if auth.method == AuthMethod.DIGITAL_SIGNATURE and auth.data:
        scheme = ALGIDS.get(auth.data[1 : 1 + auth.data[0]])
        return f"{scheme[0]}-{scheme[1].name.lower()} (RFC 7427)" if scheme else "unknown RFC 7427 algorithm"
    try:
        return AuthMethod(auth.method).name
    except ValueError:
        return f"method {auth.method}"


def verify(cert: x509.Certificate, auth: m.Auth, octets: bytes) -> str | None:
    """None if ``auth`` is a valid signature of ``octets`` by the key of ``cert``; else why not."""
    pub = cert.public_key()
    try:
        if auth.method == AuthMethod.DIGITAL_SIGNATURE:
            n = auth.data[0] if auth.data else 0
            scheme = ALGIDS.get(auth.data[1 : 1 + n])
            if scheme is None:
                return f"unsupported RFC 7427 signature algorithm {auth.data[1 : 1 + n].hex()}"
            sig, (kind, h) = auth.data[1 + n :], scheme
            if kind == "rsa" and isinstance(pub, rsa.RSAPublicKey):
                pub.verify(sig, octets, padding.PKCS1v15(), _HASH[h]())
            elif kind == "ecdsa" and isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(sig, octets, ec.ECDSA(_HASH[h]()))
            elif kind == "ed25519" and isinstance(pub, ed25519.Ed25519PublicKey):
                pub.verify(sig, octets)
            else:
                return f"signature scheme {kind} does not fit the certificate's {type(pub).__name__}"
        elif auth.method == AuthMethod.RSA_SIG and isinstance(pub, rsa.RSAPublicKey):
            pub.verify(auth.data, octets, padding.PKCS1v15(), hashes.SHA1())
        elif auth.method in _EC_BY_METHOD and isinstance(pub, ec.EllipticCurvePublicKey):
            curve, h, width = _EC_BY_METHOD[AuthMethod(auth.method)]
            if pub.curve.name != curve or len(auth.data) != 2 * width:
                return f"{describe(auth)} needs a {curve} key and a {2 * width}-byte signature"
            r, s = int.from_bytes(auth.data[:width], "big"), int.from_bytes(auth.data[width:], "big")
            pub.verify(encode_dss_signature(r, s), octets, ec.ECDSA(_HASH[h]()))
        else:
            return f"AUTH {describe(auth)} does not fit the certificate's {type(pub).__name__}"
    except InvalidSignature:
        return f"the {describe(auth)} signature does not verify"
    return None
