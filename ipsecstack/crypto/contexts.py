"""Per-SA cipher contexts: the only objects that touch key material on the hot path.

Theory of operation
-------------------
A context is built once per SA from its key and exposes two calls:

- ``seal_packet(prefix, header, seq, seq_hi, plaintext)`` returns prefix || header || IV ||
  ciphertext || ICV for an ESP packet whose 8-byte header (SPI, low sequence number) is ``header``;
  the prefix (outer IP and UDP headers) rides along so the packet is assembled with a single copy;
  ``seal(header, seq, seq_hi, plaintext)`` is the same without prefix and header (IV || ct || ICV);
- ``open(header, seq_hi, body)`` takes IV || ciphertext || ICV (any bytes-like object, a memoryview
  avoids a copy), checks the ICV and returns the plaintext, or raises :class:`Dropped` with
  ``bad_icv`` / ``bad_length`` / ``truncated``.

``seq_hi`` is the high 32 bits of an extended sequence number as 4 bytes, or ``b""`` without ESN.

AEAD (AES-GCM-16 per RFC 4106, ChaCha20-Poly1305 per RFC 7634): nonce = salt || IV, the IV is the
64-bit sequence number (unique per key because the sender never wraps), AAD = SPI || seq (|| with the
high half in between when ESN is on, RFC 4106 §5).

AES-CBC + HMAC (RFC 3602, RFC 4868): encrypt-then-MAC; the ICV covers header || IV || ciphertext and,
with ESN, the high sequence bits appended (RFC 4303 §3.3.2.1). Creating a CBC cipher object costs
~30 us in ``cryptography``, so each context keeps one CBC encryptor and one decryptor alive as
streams. To seal, a block of fresh random bytes is fed first: its ciphertext, E(r xor previous block),
is uniformly unpredictable and becomes the packet's IV, and the following blocks are exactly CBC under
that IV (RFC 3602 §2). To open, the packet's IV is fed first and its (garbage) output discarded; the
next blocks decrypt correctly whatever the stream state was. Only whole blocks are ever fed, checked
before the call, so the stream never holds a partial block.
"""

from __future__ import annotations

import abc
import hmac
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ipsecstack.crypto.registry import AhSuite, EspSuite
from ipsecstack.entropy import Rng
from ipsecstack.errors import Dropped, Reason

Buffer = bytes | bytearray | memoryview


class EspContext(Protocol):
    iv_len: int
    icv_len: int
    block: int

    def seal_packet(self, prefix: bytes, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes: ...

    def seal(self, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes: ...

    def open(self, header: bytes, seq_hi: bytes, body: Buffer) -> bytes: ...


class _SealMixin(abc.ABC):
    """``seal`` in terms of ``seal_packet`` (the datapath uses the latter)."""

    __slots__ = ()

    @abc.abstractmethod
    def seal_packet(self, prefix: bytes, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes:
        """prefix || header || IV || ciphertext || ICV."""

    def seal(self, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes:
        return self.seal_packet(b"", header, seq, seq_hi, plaintext)[len(header) :]


class AeadContext(_SealMixin):
    __slots__ = ("_aead", "_salt", "block", "icv_len", "iv_len")

    def __init__(self, aead: AESGCM | ChaCha20Poly1305, salt: bytes) -> None:
        self._aead = aead
        self._salt = salt
        self.iv_len = 8
        self.icv_len = 16
        self.block = 4

    def seal_packet(self, prefix: bytes, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes:
        iv = seq.to_bytes(8, "big")
        aad = header[:4] + seq_hi + header[4:] if seq_hi else header
        return b"".join((prefix, header, iv, self._aead.encrypt(self._salt + iv, plaintext, aad)))

    def open(self, header: bytes, seq_hi: bytes, body: Buffer) -> bytes:
        if len(body) < 8 + 16 + 2:
            raise Dropped(Reason.TRUNCATED, "ESP payload shorter than IV + tag")
        aad = header[:4] + seq_hi + header[4:] if seq_hi else header
        try:
            return self._aead.decrypt(self._salt + body[:8], body[8:], aad)
        except InvalidTag:
            raise Dropped(Reason.BAD_ICV) from None


class _HmacIcv(_SealMixin):
    """The ESP ICV of encrypt-then-MAC suites: HMAC over header || body (|| ESN high bits)."""

    __slots__ = ("_mac", "icv_len")
    _mac: hmac.HMAC
    icv_len: int

    def _icv(self, header: bytes, body: Buffer, seq_hi: bytes) -> bytes:
        h = self._mac.copy()
        h.update(header)
        h.update(body)
        if seq_hi:
            h.update(seq_hi)
        return h.digest()[: self.icv_len]


class CbcHmacContext(_HmacIcv):
    __slots__ = ("_dec", "_enc", "_rng", "block", "iv_len")

    def __init__(self, enc_key: bytes, integ_key: bytes, hash_name: str, icv_len: int, rng: Rng) -> None:
        cipher = Cipher(algorithms.AES(enc_key), modes.CBC(bytes(16)))
        self._enc = cipher.encryptor()
        self._dec = cipher.decryptor()
        self._mac = hmac.new(integ_key, digestmod=hash_name)
        self._rng = rng
        self.iv_len = 16
        self.icv_len = icv_len
        self.block = 16

    def seal_packet(self, prefix: bytes, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes:
        out = self._enc.update(self._rng(16) + plaintext)
        return b"".join((prefix, header, out, self._icv(header, out, seq_hi)))

    def open(self, header: bytes, seq_hi: bytes, body: Buffer) -> bytes:
        icv_len = self.icv_len
        n = len(body) - icv_len
        if n < 32:
            raise Dropped(Reason.TRUNCATED, "ESP payload shorter than IV + one block + ICV")
        if n % 16:
            raise Dropped(Reason.BAD_LENGTH, "CBC ciphertext is not a whole number of blocks")
        data = body[:n]
        if not hmac.compare_digest(self._icv(header, data, seq_hi), body[n:]):
            raise Dropped(Reason.BAD_ICV)
        return self._dec.update(data)[16:]


class NullHmacContext(_HmacIcv):
    """ENCR_NULL (RFC 2410) with HMAC: integrity only, the payload travels in clear."""

    __slots__ = ("block", "iv_len")

    def __init__(self, integ_key: bytes, hash_name: str, icv_len: int) -> None:
        self._mac = hmac.new(integ_key, digestmod=hash_name)
        self.iv_len = 0
        self.icv_len = icv_len
        self.block = 4

    def seal_packet(self, prefix: bytes, header: bytes, seq: int, seq_hi: bytes, plaintext: bytes) -> bytes:
        return b"".join((prefix, header, plaintext, self._icv(header, plaintext, seq_hi)))

    def open(self, header: bytes, seq_hi: bytes, body: Buffer) -> bytes:
        n = len(body) - self.icv_len
        if n < 2:
            raise Dropped(Reason.TRUNCATED, "ESP payload shorter than trailer + ICV")
        data = body[:n]
        if not hmac.compare_digest(self._icv(header, data, seq_hi), body[n:]):
            raise Dropped(Reason.BAD_ICV)
        return bytes(data)


def esp_context(suite: EspSuite, key: bytes, rng: Rng) -> EspContext:
    """Build the context for ``suite`` from key material laid out per RFC 7296 §2.17."""
    encr = suite.encr
    ek = key[: encr.key_len]
    if encr.kind == "gcm":
        return AeadContext(AESGCM(ek), key[encr.key_len : encr.key_len + 4])
    if encr.kind == "chacha":
        return AeadContext(ChaCha20Poly1305(ek), key[encr.key_len : encr.key_len + 4])
    integ = suite.integ
    assert integ is not None  # parse_esp_transform guarantees it for non-AEAD ciphers
    ik = key[encr.key_len :]
    if encr.kind == "cbc":
        return CbcHmacContext(ek, ik, integ.hash_name, integ.icv_len, rng)
    return NullHmacContext(ik, integ.hash_name, integ.icv_len)


class AhContext:
    """HMAC-SHA2 for AH (RFC 4302 §3.3.3, truncation per RFC 4868)."""

    __slots__ = ("_mac", "icv_len")

    def __init__(self, suite: AhSuite, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=suite.integ.hash_name)
        self.icv_len = suite.integ.icv_len

    def icv(self, *parts: bytes | bytearray) -> bytes:
        h = self._mac.copy()
        for p in parts:
            h.update(p)
        return h.digest()[: self.icv_len]
