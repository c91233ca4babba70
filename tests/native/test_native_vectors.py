"""The RFC known-answer vectors of tests/vectors, pushed through the native engine.

draft-mcgrew-gcm-test-01 §4 (the RFC 4106 ESP packets, with and without ESN), RFC 7634 Appendix A
(ChaCha20-Poly1305 ESP, tunnel mode), RFC 3602 §4 case 5 (AES-CBC ESP, transport mode) and RFC 4868
§2.7.2 (HMAC-SHA-256/384 ICVs, through ESP with ENCR_NULL). The vectors are published by others; the
native engine must accept them byte for byte, refuse every tampered copy as ``bad_icv`` without moving
its window, and produce packets that `cryptography` and the stdlib open independently of ipsecstack.
"""

from __future__ import annotations

import hmac

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ipsecstack import native
from tests.native.native_helpers import needs_native, packed, udp_packet
from tests.vectors.test_known_answers import (
    GCM_CASES,
    INTEG_KEY,
    RFC3602_C5_DATA,
    RFC3602_C5_KEY,
    RFC3602_C5_ORIG_HEADER,
    RFC3602_C5_SPI,
    RFC4868_SIZES,
    RFC7634_ESP,
    RFC7634_INNER,
    RFC7634_KEY,
    RFC7634_OUTER_DST,
    RFC7634_OUTER_SRC,
    RFC7634_SALT,
    RFC7634_SPI,
    _gcm_id,
    _rfc3602_case5_packet,
    flip_bit,
    gcm_packet,
    ipv4_header,
    rfc7634_packet,
)

pytestmark = needs_native

GCM_PACKETS = [pytest.param(n, id=_gcm_id(n)) for n in sorted(GCM_CASES) if GCM_CASES[n].spi != 0]


def gcm_engine(n: int) -> native.Engine:
    c = GCM_CASES[n]
    eng = native.Engine()
    # the receiver stands where a peer would be after the previous packet (RFC 4303 Appendix A)
    top = c.seq - 1 if c.seq > 1 else 0
    eng.install(c.spi, "in", c.transform, c.key, mode="transport", esn=c.esn, replay_top=top,
                replay_seen=[top] if top else None)  # fmt: skip
    return eng


@pytest.mark.parametrize("n", GCM_PACKETS)
def test_gcm_vectors(n: int) -> None:
    c = GCM_CASES[n]
    pad_len, next_header = c.plaintext[-2], c.plaintext[-1]
    payload = c.plaintext[: len(c.plaintext) - 2 - pad_len]
    expected = ipv4_header(20 + len(payload), next_header, bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]), 0x1234)
    eng = gcm_engine(n)
    assert eng.unprotect([gcm_packet(c.esp)]) == [expected + payload]
    assert eng.sa_stats("in", c.spi)["replay_top"] == c.seq
    assert eng.unprotect([gcm_packet(c.esp)]) == ["replay"]


@pytest.mark.parametrize("n", GCM_PACKETS)
def test_gcm_vectors_tampered(n: int) -> None:
    c = GCM_CASES[n]
    eng = gcm_engine(n)
    tampered = [gcm_packet(flip_bit(c.esp, i, 0x80)) for i in (8, 16, len(c.esp) - 17, len(c.esp) - 1)]
    assert eng.unprotect(tampered) == ["bad_icv"] * 4  # IV, first/last ciphertext byte, ICV
    stats = eng.sa_stats("in", c.spi)
    assert stats["drops"] == {"bad_icv": 4} and stats["replay_top"] == max(c.seq - 1, 0)
    if c.esn:  # the high half is authenticated although never sent: a receiver one sub-space off refuses
        other = native.Engine()
        top = c.seq - (1 << 32) if c.seq >> 32 else c.seq + (1 << 32)
        other.install(c.spi, "in", c.transform, c.key, mode="transport", esn=True, replay_top=top)
        assert other.unprotect([gcm_packet(c.esp)]) == ["bad_icv"]


def rfc7634_engine() -> native.Engine:
    eng = native.Engine()
    eng.install(RFC7634_SPI, "in", "chacha20poly1305", RFC7634_KEY + RFC7634_SALT,
                tunnel_src=packed(RFC7634_OUTER_SRC), tunnel_dst=packed(RFC7634_OUTER_DST))  # fmt: skip
    return eng


def test_rfc7634_vector() -> None:
    eng = rfc7634_engine()
    assert eng.unprotect([rfc7634_packet(), rfc7634_packet()]) == [RFC7634_INNER, "replay"]


@pytest.mark.parametrize("index", [7, 8, 16, len(RFC7634_ESP) - 17, len(RFC7634_ESP) - 1])
def test_rfc7634_vector_tampered(index: int) -> None:
    eng = rfc7634_engine()
    got = eng.unprotect([rfc7634_packet(flip_bit(RFC7634_ESP, index)), rfc7634_packet()])
    assert got == ["bad_icv", RFC7634_INNER]  # the forgery did not move the window


@pytest.mark.parametrize("alg", list(RFC4868_SIZES))
def test_rfc3602_case5(alg: str) -> None:
    eng = native.Engine()
    eng.install(RFC3602_C5_SPI, "in", f"aes128-{alg}", RFC3602_C5_KEY + INTEG_KEY[alg], mode="transport")
    tampered = [_rfc3602_case5_packet(alg, tamper=i) for i in (8, 24, 104)]  # IV, ciphertext, ICV
    assert eng.unprotect(tampered) == ["bad_icv"] * 3
    assert eng.unprotect([_rfc3602_case5_packet(alg)]) == [RFC3602_C5_ORIG_HEADER + RFC3602_C5_DATA]


# RFC 4868 §2.7.2, AUTH256-2 and AUTH384-2: ESP's ICV is HMAC over header || payload (ENCR_NULL). The
# 28-byte data reads as an ESP header ("what do ") and a 20-byte payload whose trailer bytes "g?" claim
# 103 bytes of padding: with the right ICV the engine gets past the ICV and refuses the padding.
RFC4868_AUTH2 = {
    "sha256": (b"Jefe" * 8, "167f928588c5cc2eef8e3093caa0e87c9ff566a14794aa61648d81621a2a40c6"),
    "sha384": (
        b"Jefe" * 12,
        "2c7353974f1842fd66d53c452ca42122b28c0b594cfb184da86a368e9b8e16f5349524ca4e82400cbde0686d403371c9",
    ),
}


@pytest.mark.parametrize("alg", list(RFC4868_AUTH2))
def test_rfc4868_icv_through_esp_null(alg: str) -> None:
    key, full = RFC4868_AUTH2[alg]
    data = b"what do ya want for nothing?"
    icv = bytes.fromhex(full)[: RFC4868_SIZES[alg][1]]
    eng = native.Engine()
    eng.install(int.from_bytes(data[:4], "big"), "in", f"null-{alg}", key, mode="transport")

    def pkt(body: bytes) -> bytes:
        return ipv4_header(20 + len(body), 50, bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])) + body

    assert eng.unprotect([pkt(data + flip_bit(icv, 3)), pkt(data + icv)]) == ["bad_icv", "bad_padding"]


# --- the native engine's packets, opened by `cryptography` and the stdlib alone -------------------


@pytest.mark.parametrize("transform", ["aes128gcm16", "aes256gcm16", "chacha20poly1305", "aes192-sha384"])
@pytest.mark.parametrize("esn", [False, True])
def test_independent_open(transform: str, esn: bool) -> None:
    """RFC 4106 §3-5 / RFC 7634 §2-3 (nonce = salt || seq, AAD) and RFC 3602 + RFC 4868 (encrypt-then-MAC)."""
    key = bytes(range(1, 80))[: {"aes128gcm16": 20, "aes256gcm16": 36, "chacha20poly1305": 36}.get(transform, 72)]
    seq0 = (7 << 32) + 41 if esn else 41
    eng = native.Engine()
    eng.install(0xABCD, "out", transform, key, mode="transport", esn=esn, seq=seq0)
    inner = udp_packet(4, 77, transport=True)
    [wire] = eng.protect(0xABCD, [inner])
    assert isinstance(wire, bytes)
    esp = wire[20:]
    seq = seq0 + 1
    assert esp[:8] == (0xABCD).to_bytes(4, "big") + (seq & 0xFFFFFFFF).to_bytes(4, "big")
    hi = (seq >> 32).to_bytes(4, "big") if esn else b""
    if transform in ("aes128gcm16", "aes256gcm16", "chacha20poly1305"):
        assert esp[8:16] == seq.to_bytes(8, "big")  # RFC 4106 §3: the IV is the sequence counter
        aead = AESGCM(key[:-4]) if "gcm" in transform else ChaCha20Poly1305(key[:-4])
        plain = aead.decrypt(key[-4:] + esp[8:16], esp[16:], esp[:4] + hi + esp[4:8])
    else:
        ek, ik = key[:24], key[24:]
        body, icv = esp[:-24], esp[-24:]
        assert hmac.compare_digest(hmac.new(ik, body + hi, "sha384").digest()[:24], icv)
        dec = Cipher(algorithms.AES(ek), modes.CBC(esp[8:24])).decryptor()
        plain = dec.update(esp[24:-24]) + dec.finalize()
    pad, nh = plain[-2], plain[-1]
    assert plain[-2 - pad : -2] == bytes(range(1, pad + 1)) and nh == 17  # RFC 4303 §2.4
    assert plain[: -2 - pad] == inner[20:]
