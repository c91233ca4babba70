"""The answers an IKE endpoint gives without keeping state: cookies (RFC 7296 §2.6) and
INVALID_MAJOR_VERSION (§2.5, §1.5).

Cookies: once enough half-open IKE SAs exist (the manager decides), an IKE_SA_INIT request must carry
a COOKIE notify equal to <version> | SHA-256(Ni | IPi | SPIi | secret); without one it gets a COOKIE
answer and no state at all. The secret is drawn from the injected rng and rotated every
``COOKIE_LIFETIME`` seconds of ``now``; cookies made with the previous secret stay valid for one more
period.

Unknown major version: a request whose header says a major version above 2 (and whose header length
is the datagram's) gets an unauthenticated response: the SPIs, exchange type and Message ID copied,
the Response flag, version 2.0 in the header, and one N(INVALID_MAJOR_VERSION) without data; never a
response to a response (§2.21.1). The answers share a token bucket of ``MAJOR_VERSION_BURST`` that
refills at ``MAJOR_VERSION_RATE`` per second, so they cannot be turned into a flood.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable

from ipsecstack.entropy import Rng
from ipsecstack.ike import message as m
from ipsecstack.ike.const import Exchange, Flag, Notify
from ipsecstack.ike.model import Datagram

COOKIE_LIFETIME = 120.0
MAJOR_VERSION_BURST = 10  # INVALID_MAJOR_VERSION answers at once ...
MAJOR_VERSION_RATE = 2.0  # ... and then per second


class Stateless:
    def __init__(self, rng: Rng, count: Callable[[str], None]) -> None:
        self.rng = rng
        self._count = count
        self._secrets: list[tuple[int, bytes]] = []  # (version, secret), newest first
        self._secret_at = -1e18
        self._version_tokens = float(MAJOR_VERSION_BURST)
        self._version_tokens_at = 0.0

    def major_version(self, data: bytes, src: str, src_port: int, dst_port: int, now: float) -> Datagram | None:
        """§2.5: the message is dropped; a request is answered with INVALID_MAJOR_VERSION (§1.5), rate-limited."""
        spi_i, spi_r, _np, _v, exchange, flags, mid, length = m.decode_header(data)
        self._count("dropped_major_version")
        if flags & Flag.RESPONSE or length != len(data):
            return None  # never answer a response (§2.21.1), nor what is not one whole message
        elapsed = max(0.0, now - self._version_tokens_at)
        self._version_tokens = min(float(MAJOR_VERSION_BURST), self._version_tokens + elapsed * MAJOR_VERSION_RATE)
        self._version_tokens_at = max(self._version_tokens_at, now)
        if self._version_tokens < 1.0:
            self._count("invalid_major_version_limited")
            return None
        self._version_tokens -= 1.0
        # §1.5: a response with the request's SPIs, exchange type and Message ID; no notification data
        reply = m.Message(spi_i, spi_r, exchange, Flag.RESPONSE, mid, [m.Notify(Notify.INVALID_MAJOR_VERSION)])
        self._count("invalid_major_version_sent")
        return Datagram(reply.encode(), src, src_port, dst_port)

    def _rotate(self, now: float) -> None:
        if now - self._secret_at >= COOKIE_LIFETIME or not self._secrets:
            version = (self._secrets[0][0] + 1) & 0xFFFF if self._secrets else 0
            self._secrets = [(version, self.rng(32)), *self._secrets[:1]]
            self._secret_at = now

    def _cookie(self, version: int, secret: bytes, msg: m.Message, src: str) -> bytes:
        nonce = next((p.data for p in msg.payloads if isinstance(p, m.Nonce)), b"")
        ip = ipaddress.ip_address(src).packed
        return version.to_bytes(2, "big") + hashlib.sha256(nonce + ip + msg.spi_i + secret).digest()

    def cookie_ok(self, msg: m.Message, src: str, now: float) -> bool:
        """The IKE_SA_INIT request starts with a COOKIE we made for it (this period's secret or the last)."""
        self._rotate(now)
        first = msg.payloads[0] if msg.payloads else None
        if not isinstance(first, m.Notify) or first.notify_type != Notify.COOKIE or len(first.data) < 2:
            return False
        version = int.from_bytes(first.data[:2], "big")
        for v, secret in self._secrets:
            if v == version and hmac.compare_digest(first.data, self._cookie(v, secret, msg, src)):
                self._count("cookies_accepted")
                return True
        self._count("cookies_rejected")
        return False

    def cookie(self, msg: m.Message, src: str, src_port: int, dst_port: int, now: float) -> Datagram:
        """The COOKIE answer to an IKE_SA_INIT request (§2.6)."""
        self._rotate(now)
        v, secret = self._secrets[0]
        reply = m.Message(msg.spi_i, bytes(8), Exchange.IKE_SA_INIT, Flag.RESPONSE, 0,
                          [m.Notify(Notify.COOKIE, self._cookie(v, secret, msg, src))])  # fmt: skip
        self._count("cookies_sent")
        return Datagram(reply.encode(), src, src_port, dst_port)
