"""UDP encapsulation of ESP (RFC 3948) and what may arrive on the encapsulation port.

On port 4500 three things share one UDP socket (RFC 3948 §2):
- a NAT-keepalive: a single 0xFF byte (§2.3), dropped silently;
- IKE: the payload starts with the 4-byte non-ESP marker (zeros) where an SPI would be (§2.2);
- ESP: anything else (a zero SPI is reserved, RFC 4303 §2.1, so there is no ambiguity).
"""

from __future__ import annotations

import struct
from typing import Final

UDP_HEADER_LEN: Final = 8
NON_ESP_MARKER: Final = b"\x00\x00\x00\x00"
NAT_KEEPALIVE: Final = b"\xff"
ENCAP_PORT: Final = 4500
UDP_HEADER = struct.Struct("!HHHH")

KIND_ESP: Final = 0
KIND_IKE: Final = 1
KIND_KEEPALIVE: Final = 2
KIND_MALFORMED: Final = 3


def classify(payload: bytes | bytearray | memoryview) -> int:
    """Which of ESP, IKE (non-ESP marker), keepalive or malformed a UDP-4500 payload is."""
    n = len(payload)
    if n == 1 and payload[0] == 0xFF:
        return KIND_KEEPALIVE
    if n >= 4 and payload[0] == 0 and payload[1] == 0 and payload[2] == 0 and payload[3] == 0:
        return KIND_IKE
    if n < 8:
        return KIND_MALFORMED
    return KIND_ESP


def build_header(sport: int, dport: int, payload_len: int, checksum: int = 0) -> bytes:
    """UDP header. Over IPv4 the checksum SHOULD be zero for ESP-in-UDP (RFC 3948 §2.1)."""
    return UDP_HEADER.pack(sport, dport, UDP_HEADER_LEN + payload_len, checksum)
