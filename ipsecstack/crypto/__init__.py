"""Cryptographic transforms: a typed registry by IANA id and strongSwan keyword, and per-SA contexts."""

from ipsecstack.crypto.registry import (
    ENCR,
    INTEG,
    AhSuite,
    EncrAlg,
    EspSuite,
    IntegAlg,
    parse_ah_transform,
    parse_esp_transform,
)

__all__ = [
    "ENCR",
    "INTEG",
    "AhSuite",
    "EncrAlg",
    "EspSuite",
    "IntegAlg",
    "parse_ah_transform",
    "parse_esp_transform",
]
