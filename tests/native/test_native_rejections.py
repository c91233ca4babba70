"""Every way the native engine refuses a packet, with the Python engine's reason string, and the counters.

Inbound: bad ICV, replay, too old (window and ESN inference), unknown SPI, bad padding, truncated at
every layer, bad lengths, malformed headers, fragments, IP versions, NAT keepalives, IKE on the
encapsulation port, encapsulation mismatch, dummy packets, bad next header, expired SAs. Outbound:
what the inner side may hand over wrongly, sequence exhaustion, expiry. Each case asserts the native
result, the Python engine's result for the same packet and SA state, and the drop counters.
"""

from __future__ import annotations

import struct
from collections import Counter

import pytest

from ipsecstack import Dropped, Lifetime, protect
from ipsecstack.xform import esp as esp_xform
from tests.native.native_helpers import (
    GW,
    SPI,
    Pair,
    make_pair,
    needs_native,
    packed,
    reference_protect,
    reference_unprotect,
    udp_packet,
)
from tests.vectors.test_known_answers import ipv4_header

pytestmark = needs_native

INNER = udp_packet(4, 60)


def reaches_sa(pkt: bytes) -> bool:
    """Whether a packet gets as far as the SA (so its drop counts there as well as in the engine)."""
    try:
        _v, off, _nh, end, udp = esp_xform.locate(pkt)
    except Dropped:
        return False
    at = off + 8 if udp else off
    return end - at >= 8 and pkt[at : at + 4] == SPI.to_bytes(4, "big")


def check_in(pair: Pair, packets: list[bytes], expected: list[str]) -> None:
    """Native unprotect == the Python engine on the same state == ``expected`` ("ok" for a packet through)."""
    ref = [reference_unprotect({SPI: pair.rx}, p) for p in packets]
    got = pair.engine.unprotect(packets)
    assert got == ref
    assert [g if isinstance(g, str) else "ok" for g in got] == expected
    drops = [(g, reaches_sa(p)) for g, p in zip(got, packets, strict=True) if isinstance(g, str)]
    assert pair.engine.stats()["drops"] == dict(Counter(g for g, _ in drops))
    assert pair.engine.sa_stats("in", SPI)["drops"] == dict(Counter(g for g, at_sa in drops if at_sa))
    st = pair.engine.sa_stats("in", SPI)
    assert (st["replay_top"], st["packets"], st["bytes"]) == (pair.rx.replay.top, pair.rx.packets, pair.rx.bytes)


def wire(pair: Pair, inner: bytes = INNER, seq: int | None = None) -> bytes:
    if seq is not None:
        pair.tx.seq = seq - 1
    return protect(pair.tx, inner)


def craft(pair: Pair, plaintext: bytes, seq: int = 1, *, udp: bool = False, spi: int = SPI) -> bytes:
    """An ESP packet with a valid ICV around any plaintext (the Python context seals it), outer IPv4."""
    sa = pair.tx
    assert sa.ctx is not None
    header = struct.pack("!II", spi, seq & 0xFFFFFFFF)
    esp = sa.ctx.seal_packet(b"", header, seq, (seq >> 32).to_bytes(4, "big") if sa.esn else b"", plaintext)
    return outer(esp, udp=udp)


def outer(esp: bytes, *, udp: bool = False, proto: int | None = None) -> bytes:
    body = struct.pack("!HHHH", 4500, 4500, 8 + len(esp), 0) + esp if udp else esp
    src, dst = GW[4]
    return ipv4_header(20 + len(body), proto or (17 if udp else 50), packed(src), packed(dst)) + body


def trailer(payload: bytes, nh: int, block: int = 4) -> bytes:
    pad = (-(len(payload) + 2)) % block
    return payload + bytes(range(1, pad + 1)) + bytes((pad, nh))


@pytest.mark.parametrize("transform", ["aes128gcm16", "chacha20poly1305", "aes256-sha512", "null-sha256"])
@pytest.mark.parametrize("where", [-1, 20, 27, 30], ids=["icv", "spi-byte", "seq-byte", "body"])
def test_bad_icv(transform: str, where: int) -> None:
    pair = make_pair(transform)
    good = wire(pair)
    bad = bytearray(good)
    bad[where] ^= 0x10
    expected = "unknown_spi" if where == 20 else "bad_icv"
    check_in(pair, [bytes(bad), good], [expected, "ok"])  # a forgery does not move the window


def test_replay_and_too_old() -> None:
    pair = make_pair("aes128gcm16", replay_window=64)
    p200, p100, p137, p136 = (wire(pair, seq=s) for s in (200, 100, 137, 136))
    check_in(pair, [p200, p200, p100, p137, p136, p137], ["ok", "replay", "too_old", "ok", "too_old", "replay"])


def test_sequence_zero_is_too_old() -> None:
    pair = make_pair("aes128gcm16")
    check_in(pair, [craft(pair, trailer(INNER, 4), seq=0)], ["too_old"])


def test_esn_inference_before_the_sa_began() -> None:
    """RFC 4303 Appendix A2.2 case B near the start: a high low half would need a negative high half."""
    pair = make_pair("aes128gcm16", esn=True, tx_seq=0, rx_top=5)
    check_in(pair, [craft(pair, trailer(INNER, 4), seq=0xFFFFFFF0), wire(pair, seq=3)], ["too_old", "ok"])


def test_esn_window_across_a_subspace() -> None:
    """Packets from both sides of a 2^32 boundary, out of order, with the high half inferred each time."""
    pair = make_pair("aes256gcm16", esn=True, tx_seq=0, rx_top=(1 << 32) - 10, replay_window=128)
    seqs = [(1 << 32) - 5, (1 << 32) + 3, (1 << 32) - 7, (1 << 32) + 1, (1 << 32) - 5, (1 << 32) - 200]
    pkts = [wire(pair, seq=s) for s in seqs]
    # the last one is older than the window: Appendix A puts it in the next sub-space, where its ICV fails
    check_in(pair, pkts, ["ok", "ok", "ok", "ok", "replay", "bad_icv"])


def test_unknown_spi() -> None:
    pair = make_pair("aes128gcm16")
    check_in(pair, [craft(pair, trailer(INNER, 4), spi=SPI + 1)], ["unknown_spi"])


def test_bad_padding() -> None:
    pair = make_pair("aes128gcm16")
    wrong_bytes = INNER + b"\x01\x03\x02\x04"  # padding 1, 3 instead of 1, 2
    too_long = INNER[:20] + b"\x10\x04"  # pad length 16 > what precedes it
    check_in(pair, [craft(pair, wrong_bytes, 1), craft(pair, too_long, 2), wire(pair, seq=1)],
             ["bad_padding", "bad_padding", "replay"])  # fmt: skip


def test_truncated_everywhere() -> None:
    pair = make_pair("aes128gcm16", encap=None)
    good = wire(pair)
    esp = good[20:]
    v6_ext = bytes([0x60, 0, 0, 0, 0, 4, 0, 64]) + bytes(32) + b"\x32\x00\x00\x00"  # hop-by-hop cut short
    check_in(pair, [
        good[:12],  # IP header
        outer(esp[:6]),  # ESP header
        outer(esp[:8 + 25]),  # AEAD: shorter than IV + tag + trailer
        outer(b"\x00\x00", proto=17),  # UDP header
        outer(esp[:5], udp=True),  # ESP-in-UDP payload
        v6_ext,
    ], ["truncated"] * 6)  # fmt: skip


def test_truncated_cbc_and_bad_length() -> None:
    pair = make_pair("aes128-sha256")
    esp = wire(pair)[20:]
    short = esp[: 8 + 16 + 15] + esp[-16:]  # IV + less than one block + ICV
    ragged = esp[: 8 + 16 + 32 + 5] + esp[-16:]  # not whole blocks
    check_in(pair, [outer(short), outer(ragged)], ["truncated", "bad_length"])


def test_inner_length_and_next_header() -> None:
    pair = make_pair("aes128gcm16")
    long_claim = bytearray(INNER)
    long_claim[2:4] = (len(INNER) + 40).to_bytes(2, "big")  # claims more than was carried
    tiny_claim = bytearray(INNER)
    tiny_claim[2:4] = (12).to_bytes(2, "big")
    v6_as_v4 = udp_packet(6, 60)
    check_in(pair, [
        craft(pair, trailer(bytes(long_claim), 4), 1),
        craft(pair, trailer(bytes(tiny_claim), 4), 2),
        craft(pair, trailer(v6_as_v4, 4), 3),  # next header says IPv4, the packet is IPv6
        craft(pair, trailer(INNER[:19], 4), 4),  # too short for any IPv4 header
        craft(pair, trailer(INNER, 6), 5),  # TCP in tunnel mode
        craft(pair, trailer(INNER, 59), 6),  # RFC 4303 §2.6: a dummy packet
        craft(pair, trailer(INNER + b"tfc-padding!", 4), 7),  # RFC 4303 §2.4: TFC padding is trimmed
    ], ["bad_length", "bad_length", "malformed", "malformed", "bad_next_header", "dummy", "ok"])  # fmt: skip


def test_malformed_outer_headers() -> None:
    pair = make_pair("aes128gcm16")
    good = wire(pair)
    ihl4 = bytes([0x44]) + good[1:]
    longer = good[:2] + (len(good) + 1).to_bytes(2, "big") + good[4:]
    not_esp = outer(good[20:], proto=6)
    ike = outer(b"\x00\x00\x00\x00" + b"ike message", udp=True)
    v6_short_payload = bytes([0x60, 0, 0, 0, 0, 200, 50, 64]) + bytes(40)
    check_in(pair, [ihl4, longer, not_esp, ike, v6_short_payload], ["malformed"] * 5)


def test_fragments_versions_keepalives_encapsulation() -> None:
    pair = make_pair("aes128gcm16")
    good = wire(pair)
    mf = good[:6] + b"\x20\x00" + good[8:]
    offset = good[:6] + b"\x00\x10" + good[8:]
    v5 = bytes([0x55]) + good[1:]
    v6_frag = bytes([0x60, 0, 0, 0, 0, 16, 44, 64]) + bytes(32) + bytes([50, 0, 0, 1, 0, 0, 0, 1]) + bytes(8)
    keepalive = outer(b"\xff", udp=True)
    in_udp = outer(good[20:], udp=True)  # the SA is not UDP-encapsulated
    expected = ["fragment", "fragment", "bad_ip_version", "fragment", "nat_keepalive", "encap_mismatch", "ok"]
    check_in(pair, [mf, offset, v5, v6_frag, keepalive, in_udp, good], expected)
    udp_pair = make_pair("aes128gcm16", encap=(4500, 4500))
    check_in(udp_pair, [outer(wire(udp_pair)[28:])], ["encap_mismatch"])  # ESP where UDP was agreed


@pytest.mark.parametrize("which", ["packets", "bytes"])
def test_hard_lifetime_expires_the_sa(which: str) -> None:
    hard = Lifetime(packets=2) if which == "packets" else Lifetime(bytes=2 * 60)
    pair = make_pair("aes128gcm16", hard=hard)
    sender = make_pair("aes128gcm16")  # the same key, no lifetime
    pkts = [wire(sender) for _ in range(3)]
    check_in(pair, pkts, ["ok", "ok", "sa_expired"])
    assert pair.engine.take_events() == [("hard", "in", SPI, which)]


# --- outbound ------------------------------------------------------------------------------------


def check_out(pair: Pair, packets: list[bytes], expected: list[str]) -> None:
    ref = [reference_protect(pair.tx, p) for p in packets]
    got = pair.engine.protect(SPI, packets)
    assert got == ref
    assert [g if isinstance(g, str) else "ok" for g in got] == expected
    want = dict(Counter(g for g in got if isinstance(g, str)))
    assert pair.engine.stats()["drops"] == want == pair.engine.sa_stats("out", SPI)["drops"]
    stats = pair.engine.sa_stats("out", SPI)
    assert (stats["seq"], stats["packets"], stats["bytes"]) == (pair.tx.seq, pair.tx.packets, pair.tx.bytes)


def test_outbound_tunnel_refusals() -> None:
    pair = make_pair("aes128gcm16")
    check_out(pair, [b"", bytes([0x50]) + INNER[1:], INNER + b"x", INNER[:30], udp_packet(6, 10)[:-1], INNER],
              ["bad_ip_version", "bad_ip_version", "malformed", "malformed", "malformed", "ok"])  # fmt: skip


def test_outbound_transport_refusals() -> None:
    pair = make_pair("aes128gcm16", "transport")
    pkt = udp_packet(4, 60, transport=True)
    frag = pkt[:6] + b"\x20\x00" + pkt[8:]
    bad_ihl = bytes([0x43]) + pkt[1:]
    v6 = udp_packet(6, 10, transport=True)
    v6_hbh_cut = v6[:4] + b"\x00\x08\x00" + v6[7:40] + b"\x11\x05" + bytes(6)  # hop-by-hop claims 48 bytes
    check_out(pair, [pkt[:19], frag, bad_ihl, pkt[:2] + b"\xff\xff" + pkt[4:], v6_hbh_cut, pkt + b"junk", v6],
              ["truncated", "fragment", "malformed", "malformed", "truncated", "ok", "ok"])  # fmt: skip


@pytest.mark.parametrize("esn", [False, True])
def test_sequence_exhausted(esn: bool) -> None:
    top = (1 << 64) - 1 if esn else (1 << 32) - 1
    pair = make_pair("aes128gcm16", esn=esn, tx_seq=top - 2)
    check_out(pair, [INNER] * 4, ["ok", "ok", "seq_exhausted", "seq_exhausted"])


def test_outbound_hard_lifetime() -> None:
    pair = make_pair("aes128-sha256", hard=Lifetime(packets=1))
    check_out(pair, [INNER, INNER], ["ok", "sa_expired"])


def test_oversized_tunnel_packet() -> None:
    """An inner packet that cannot be carried in one outer datagram (the Python engine raises here)."""
    pair = make_pair("aes128gcm16")
    big = bytes([0x45, 0, 0xFF, 0xFF]) + INNER[4:20] + bytes(65535 - 20)
    assert pair.engine.protect(SPI, [big, INNER])[0] == "bad_length"
    assert pair.engine.sa_stats("out", SPI)["seq"] == 1  # no sequence number spent on it
