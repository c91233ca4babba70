"""The Encrypted and Authenticated payload, SK (RFC 7296 §3.14; AEAD per RFC 5282 and RFC 7634).

Sealing takes the plaintext payload chain of a message and produces the whole datagram:
IKE header || SK generic header || IV || E(payloads || padding || pad length) || ICV.

- AEAD (AES-GCM-16, ChaCha20-Poly1305): 8-byte IV (a per-SA counter, never repeated under a key),
  nonce = salt || IV, AAD = IKE header || SK generic payload header (RFC 5282 §5.1), ICV = the tag.
- AES-CBC + HMAC-SHA2: random 16-byte IV from the injected rng, padding to the block size, ICV =
  HMAC over everything from the IKE header through the ciphertext, truncated (§3.14, RFC 4868).

Opening checks the ICV before decrypting and raises :class:`SkError` on any failure; the caller
drops the message (an unauthenticated message must not change state, §2.21.2).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ipsecstack.crypto.registry import EncrAlg, IntegAlg
from ipsecstack.entropy import Rng
from ipsecstack.ike.const import Payload
from ipsecstack.ike.message import (
    GENERIC,
    HEADER,
    HEADER_LEN,
    AnyPayload,
    Message,
    ParseError,
    decode_payloads,
    encode_payloads,
)


class SkError(ValueError):
    """The SK payload did not authenticate or decrypt."""


@dataclass
class SkKeys:
    """One direction's SK_e / SK_a (with the cipher/integrity algorithms) and the AEAD IV counter."""

    encr: EncrAlg
    integ: IntegAlg | None
    sk_e: bytes
    sk_a: bytes
    counter: int = 0

    def __repr__(self) -> str:
        return f"SkKeys({self.encr.keyword}, <secret>)"

    @property
    def overhead(self) -> int:
        icv = self.encr.icv_len if self.integ is None else self.integ.icv_len
        return 4 + self.encr.iv_len + self.encr.block + icv


def seal(msg: Message, inner: list[AnyPayload], keys: SkKeys, rng: Rng) -> bytes:
    """The whole datagram of ``msg`` with ``inner`` payloads inside an SK payload."""
    plain, first = encode_payloads(inner)
    encr = keys.encr
    block = 1 if encr.aead else encr.block
    padlen = (-(len(plain) + 1)) % block
    plaintext = plain + bytes(padlen) + bytes((padlen,))
    icv_len = encr.icv_len if keys.integ is None else keys.integ.icv_len
    body_len = encr.iv_len + len(plaintext) + icv_len
    length = HEADER_LEN + 4 + body_len
    header = HEADER.pack(msg.spi_i, msg.spi_r, Payload.SK, 0x20, msg.exchange, msg.flags, msg.message_id, length)
    sk_hdr = GENERIC.pack(first, 0, 4 + body_len)
    if encr.aead:
        keys.counter += 1
        iv = keys.counter.to_bytes(8, "big")
        key, salt = keys.sk_e[: encr.key_len], keys.sk_e[encr.key_len :]
        aead = AESGCM(key) if encr.kind == "gcm" else ChaCha20Poly1305(key)
        return header + sk_hdr + iv + aead.encrypt(salt + iv, plaintext, header + sk_hdr)
    assert keys.integ is not None and encr.kind == "cbc"  # IKE never negotiates ENCR_NULL (§3.3.2)
    iv = rng(16)
    enc = Cipher(algorithms.AES(keys.sk_e), modes.CBC(iv)).encryptor()
    ct = enc.update(plaintext) + enc.finalize()
    data = header + sk_hdr + iv + ct
    return data + hmac.digest(keys.sk_a, data, keys.integ.hash_name)[:icv_len]


def open_(data: bytes, msg: Message, keys: SkKeys) -> list[AnyPayload]:
    """Authenticate and decrypt the SK payload of a decoded ``msg`` (whose bytes are ``data``).

    The SK payload must be the only payload (this stack does not send or accept others next to it).
    """
    if len(msg.payloads) != 1 or msg.payloads[0].TYPE != Payload.SK:
        raise SkError("expected exactly one SK payload")
    sk = msg.payloads[0]
    first = sk.first  # type: ignore[union-attr]
    body = sk.body  # type: ignore[union-attr]
    encr = keys.encr
    sk_off = len(data) - len(body) - 4
    aad = data[: sk_off + 4]
    if encr.aead:
        if len(body) < 8 + 16 + 1:
            raise SkError("SK payload too short")
        key, salt = keys.sk_e[: encr.key_len], keys.sk_e[encr.key_len :]
        aead = AESGCM(key) if encr.kind == "gcm" else ChaCha20Poly1305(key)
        try:
            plaintext = aead.decrypt(salt + body[:8], body[8:], aad)
        except InvalidTag:
            raise SkError("ICV mismatch") from None
    else:
        assert keys.integ is not None
        icv_len = keys.integ.icv_len
        if len(body) < encr.iv_len + icv_len + 1:
            raise SkError("SK payload too short")
        signed = data[: len(data) - icv_len]
        if not hmac.compare_digest(hmac.digest(keys.sk_a, signed, keys.integ.hash_name)[:icv_len], data[-icv_len:]):
            raise SkError("ICV mismatch")
        iv, ct = body[: encr.iv_len], body[encr.iv_len : len(body) - icv_len]
        if not ct or len(ct) % 16:
            raise SkError("ciphertext is not a whole number of blocks")
        dec = Cipher(algorithms.AES(keys.sk_e), modes.CBC(iv)).decryptor()
        plaintext = dec.update(ct) + dec.finalize()
    padlen = plaintext[-1]
    if padlen + 1 > len(plaintext):
        raise SkError("bad pad length")
    inner = plaintext[: len(plaintext) - 1 - padlen]
    try:
        return decode_payloads(inner, 0, first)
    except ParseError as e:
        raise SkError(f"inner payloads: {e}") from None
