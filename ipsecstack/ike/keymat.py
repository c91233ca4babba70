"""IKEv2 pseudo-random functions and key derivation (RFC 7296 §2.13, §2.14, §2.17, §2.18).

- ``prf_plus(prf, key, seed, n)``: T1 = prf(K, S | 0x01), Tk = prf(K, Tk-1 | S | k), concatenated and
  cut to ``n`` bytes (§2.13; at most 255 blocks).
- :func:`ike_sa_keys`: SKEYSEED = prf(Ni | Nr, g^ir), then SK_d, SK_ai, SK_ar, SK_ei, SK_er, SK_pi,
  SK_pr = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr) (§2.14). For a rekeyed IKE SA SKEYSEED =
  prf(SK_d(old), g^ir(new) | Ni | Nr) (§2.18).
- :func:`child_keymat`: KEYMAT = prf+(SK_d, [g^ir(new) |] Ni | Nr); the initiator-to-responder SA
  takes its encryption then integrity key first, then the responder-to-initiator SA (§2.17).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final

from ipsecstack.crypto.registry import EspSuite

# IANA "Transform Type 2 - Pseudorandom Function Transform IDs"
PRF_HMAC_SHA2_256: Final = 5
PRF_HMAC_SHA2_384: Final = 6
PRF_HMAC_SHA2_512: Final = 7


@dataclass(frozen=True)
class Prf:
    iana_id: int
    keyword: str
    hash_name: str
    size: int

    def __call__(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self.hash_name)


PRFS: Final = {
    p.iana_id: p
    for p in (
        Prf(PRF_HMAC_SHA2_256, "prfsha256", "sha256", 32),
        Prf(PRF_HMAC_SHA2_384, "prfsha384", "sha384", 48),
        Prf(PRF_HMAC_SHA2_512, "prfsha512", "sha512", 64),
    )
}
PRF_KEYWORDS: Final = {p.keyword: p for p in PRFS.values()}


def prf_plus(prf: Prf, key: bytes, seed: bytes, length: int) -> bytes:
    """RFC 7296 §2.13."""
    if length > 255 * prf.size:
        raise ValueError("prf+ can produce at most 255 blocks")
    out = b""
    t = b""
    i = 1
    while len(out) < length:
        t = prf(key, t + seed + bytes((i,)))
        out += t
        i += 1
    return out[:length]


@dataclass(frozen=True)
class IkeKeys:
    """The seven IKE SA secrets (§2.14). ``repr`` never shows them."""

    sk_d: bytes
    sk_ai: bytes
    sk_ar: bytes
    sk_ei: bytes
    sk_er: bytes
    sk_pi: bytes
    sk_pr: bytes

    def __repr__(self) -> str:
        return "IkeKeys(<secret>)"


def ike_sa_keys(
    prf: Prf,
    shared: bytes,
    ni: bytes,
    nr: bytes,
    spi_i: bytes,
    spi_r: bytes,
    encr_key_len: int,
    integ_key_len: int,
    old_sk_d: bytes | None = None,
    old_prf: Prf | None = None,
) -> tuple[bytes, IkeKeys]:
    """``(SKEYSEED, keys)`` for a new IKE SA, or for a rekeyed one when ``old_sk_d`` is given.

    ``encr_key_len`` includes the salt of AEAD ciphers (RFC 5282 §7.1: 4 bytes for GCM). When
    rekeying, SKEYSEED is computed with the *old* IKE SA's PRF, since the rekeying exchange belongs
    to the old SA (§2.18); the new PRF expands it.
    """
    if old_sk_d is None:
        skeyseed = prf(ni + nr, shared)
    else:
        skeyseed = (old_prf or prf)(old_sk_d, shared + ni + nr)
    n = prf.size
    total = 3 * n + 2 * integ_key_len + 2 * encr_key_len
    km = prf_plus(prf, skeyseed, ni + nr + spi_i + spi_r, total)
    parts = []
    off = 0
    for size in (n, integ_key_len, integ_key_len, encr_key_len, encr_key_len, n, n):
        parts.append(km[off : off + size])
        off += size
    return skeyseed, IkeKeys(*parts)


def child_keymat(
    prf: Prf, sk_d: bytes, ni: bytes, nr: bytes, suite: EspSuite | int, shared: bytes | None = None
) -> tuple[bytes, bytes]:
    """Key material of the two child SAs: ``(initiator->responder, responder->initiator)``.

    ``suite`` is the ESP suite (or, for AH, the integrity key length in bytes). Each half is laid out
    as the SA wants it: encryption key (with AEAD salt), then integrity key (§2.17); AH has no
    encryption key, so its KEYMAT is the two integrity keys, initiator->responder first.
    """
    per_sa = suite if isinstance(suite, int) else suite.key_len
    km = prf_plus(prf, sk_d, (shared or b"") + ni + nr, 2 * per_sa)
    return km[:per_sa], km[per_sa:]
