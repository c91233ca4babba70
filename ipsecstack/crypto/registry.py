"""Registry of ESP/AH transforms, named by IANA id (RFC 7296 §3.3.2) and by strongSwan keyword.

A transform string is what a user writes in ``esp_proposals`` / ``ah_proposals`` minus the DH and ESN
parts: ``aes128gcm16``, ``chacha20poly1305``, ``aes256-sha256``, ``null-sha256`` for ESP; ``sha256`` for
AH. Key material is laid out as IKEv2 hands it over (RFC 7296 §2.17): encryption key first, then the
integrity key; for AEAD ciphers the 4-byte salt follows the cipher key (RFC 4106 §8.1, RFC 7634 §3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ipsecstack.errors import ConfigError

# IANA "Transform Type 1 - Encryption Algorithm Transform IDs"
ENCR_NULL: Final = 11
ENCR_AES_CBC: Final = 12
ENCR_AES_GCM_16: Final = 20
ENCR_CHACHA20_POLY1305: Final = 28
# IANA "Transform Type 3 - Integrity Algorithm Transform IDs"
AUTH_HMAC_SHA2_256_128: Final = 12
AUTH_HMAC_SHA2_384_192: Final = 13
AUTH_HMAC_SHA2_512_256: Final = 14


@dataclass(frozen=True, slots=True)
class EncrAlg:
    """An ESP encryption transform.

    ``block`` is the padding alignment (RFC 4303 §2.4: the cipher block size, at least 4);
    ``icv_len`` is the AEAD tag length (0 for non-AEAD ciphers).
    """

    keyword: str
    iana_id: int
    kind: str  # "gcm" | "chacha" | "cbc" | "null"
    key_len: int
    salt_len: int
    iv_len: int
    block: int
    icv_len: int

    @property
    def aead(self) -> bool:
        return self.icv_len > 0


@dataclass(frozen=True, slots=True)
class IntegAlg:
    """An HMAC-SHA2 integrity transform truncated per RFC 4868 §2.3."""

    keyword: str
    iana_id: int
    hash_name: str
    key_len: int
    icv_len: int


ENCR: Final[dict[str, EncrAlg]] = {
    "aes128gcm16": EncrAlg("aes128gcm16", ENCR_AES_GCM_16, "gcm", 16, 4, 8, 4, 16),
    "aes192gcm16": EncrAlg("aes192gcm16", ENCR_AES_GCM_16, "gcm", 24, 4, 8, 4, 16),
    "aes256gcm16": EncrAlg("aes256gcm16", ENCR_AES_GCM_16, "gcm", 32, 4, 8, 4, 16),
    "chacha20poly1305": EncrAlg("chacha20poly1305", ENCR_CHACHA20_POLY1305, "chacha", 32, 4, 8, 4, 16),
    "aes128": EncrAlg("aes128", ENCR_AES_CBC, "cbc", 16, 0, 16, 16, 0),
    "aes192": EncrAlg("aes192", ENCR_AES_CBC, "cbc", 24, 0, 16, 16, 0),
    "aes256": EncrAlg("aes256", ENCR_AES_CBC, "cbc", 32, 0, 16, 16, 0),
    "null": EncrAlg("null", ENCR_NULL, "null", 0, 0, 0, 4, 0),
}
# strongSwan spells the 16-byte-ICV GCM variants both ways.
_ENCR_ALIASES: Final = {
    "aes128gcm128": "aes128gcm16",
    "aes192gcm128": "aes192gcm16",
    "aes256gcm128": "aes256gcm16",
}

INTEG: Final[dict[str, IntegAlg]] = {
    "sha256": IntegAlg("sha256", AUTH_HMAC_SHA2_256_128, "sha256", 32, 16),
    "sha384": IntegAlg("sha384", AUTH_HMAC_SHA2_384_192, "sha384", 48, 24),
    "sha512": IntegAlg("sha512", AUTH_HMAC_SHA2_512_256, "sha512", 64, 32),
}
_INTEG_ALIASES: Final = {"sha2_256": "sha256", "sha2_384": "sha384", "sha2_512": "sha512"}


@dataclass(frozen=True, slots=True)
class EspSuite:
    """An ESP transform: an encryption algorithm plus, unless it is an AEAD, an integrity algorithm."""

    encr: EncrAlg
    integ: IntegAlg | None

    @property
    def keyword(self) -> str:
        return self.encr.keyword if self.integ is None else f"{self.encr.keyword}-{self.integ.keyword}"

    @property
    def key_len(self) -> int:
        """Bytes of key material (RFC 7296 §2.17 order: encryption key, salt, integrity key)."""
        return self.encr.key_len + self.encr.salt_len + (self.integ.key_len if self.integ else 0)

    @property
    def icv_len(self) -> int:
        return self.encr.icv_len if self.integ is None else self.integ.icv_len

    def describe_key(self) -> str:
        parts = []
        if self.encr.key_len:
            parts.append(f"{self.encr.key_len}-byte {self.encr.keyword} key")
        if self.encr.salt_len:
            parts.append(f"{self.encr.salt_len}-byte salt")
        if self.integ:
            parts.append(f"{self.integ.key_len}-byte HMAC-{self.integ.hash_name.upper()} key")
        return " + ".join(parts)


@dataclass(frozen=True, slots=True)
class AhSuite:
    """An AH transform: one integrity algorithm."""

    integ: IntegAlg

    @property
    def keyword(self) -> str:
        return self.integ.keyword

    @property
    def key_len(self) -> int:
        return self.integ.key_len

    @property
    def icv_len(self) -> int:
        return self.integ.icv_len

    def describe_key(self) -> str:
        return f"{self.integ.key_len}-byte HMAC-{self.integ.hash_name.upper()} key"


def _known(table: Mapping[str, object], aliases: Mapping[str, str]) -> str:
    return ", ".join(sorted(set(table) | set(aliases)))


def parse_esp_transform(text: str, field: str = "transform") -> EspSuite:
    """Parse ``aes128gcm16`` / ``aes256-sha256`` / ``null-sha256`` into an :class:`EspSuite`."""
    parts = text.strip().lower().split("-")
    name = _ENCR_ALIASES.get(parts[0], parts[0])
    encr = ENCR.get(name)
    if encr is None:
        raise ConfigError(field, text, f"unknown ESP encryption algorithm; use one of {_known(ENCR, _ENCR_ALIASES)}")
    if encr.aead:
        if len(parts) != 1:
            raise ConfigError(field, text, f"{encr.keyword} is an AEAD and takes no integrity algorithm")
        return EspSuite(encr, None)
    if len(parts) != 2:
        raise ConfigError(
            field, text, f"{encr.keyword} needs an integrity algorithm, e.g. '{encr.keyword}-sha256' (RFC 8221)"
        )
    iname = _INTEG_ALIASES.get(parts[1], parts[1])
    integ = INTEG.get(iname)
    if integ is None:
        raise ConfigError(field, text, f"unknown integrity algorithm; use one of {_known(INTEG, _INTEG_ALIASES)}")
    return EspSuite(encr, integ)


def parse_ah_transform(text: str, field: str = "transform") -> AhSuite:
    """Parse ``sha256`` / ``sha384`` / ``sha512`` into an :class:`AhSuite`."""
    name = text.strip().lower()
    integ = INTEG.get(_INTEG_ALIASES.get(name, name))
    if integ is None:
        raise ConfigError(field, text, f"unknown AH integrity algorithm; use one of {_known(INTEG, _INTEG_ALIASES)}")
    return AhSuite(integ)
