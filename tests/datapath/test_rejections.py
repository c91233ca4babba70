"""Every rejection path of the batch datapath, each with its own drop reason.

For each way a packet can be refused, inbound or outbound, the tests check that the packet comes back
in ``Result.dropped`` with the exact reason string, that ``Datapath.drops`` counts it (and the SA's
``drops`` when the SA is known), and that nothing raises out of ``Datapath.inbound`` / ``outbound``.
Packets with bad padding, wrong next header or bad inner lengths but a *valid* ICV are built here by
sealing a hand-made ESP plaintext with a separate sender SA's crypto context. A Hypothesis fuzz test
mutates valid protected packets (and feeds random bytes) and checks that every input ends up in
exactly one of ``to_inner`` / ``dropped`` / ``to_ike`` with a known reason.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecstack import (
    Action,
    Datapath,
    IkeDatagram,
    Lifetime,
    Policy,
    Reason,
    Result,
    SAEvent,
    SecurityAssociation,
    Selector,
    Template,
    protect,
    seeded_rng,
)
from ipsecstack.crypto.registry import parse_ah_transform, parse_esp_transform
from ipsecstack.errors import SILENT_REASONS
from ipsecstack.wire import ip
from ipsecstack.wire.udp_encap import NON_ESP_MARKER
from ipsecstack.wire.udp_encap import build_header as udp_header
from tests.packets import icmp4, tcp4, tcp6_ext, udp4, udp6

NOW = 1000.0
GW_A, GW_B = "192.0.2.1", "192.0.2.2"
GW6_A, GW6_B = "2001:db8::1", "2001:db8::2"
NET_A, NET_B = "10.1.0.0/16", "10.2.0.0/16"
SPI = 0x1001
OTHER_SPI = 0x2002
ALL_REASONS = frozenset(v for k, v in vars(Reason).items() if not k.startswith("_") and isinstance(v, str))

# (protocol, transform) for the three ICV families: AEAD, CBC + HMAC, AH
ICV_SUITES = [("esp", "aes128gcm16"), ("esp", "aes128-sha256"), ("esp", "chacha20poly1305"), ("ah", "sha256")]
ESP_SUITES = ["aes128gcm16", "aes128-sha256"]


def _ids(suites: list[tuple[str, str]]) -> list[str]:
    return [f"{p}-{t}" for p, t in suites]


# --- helpers ---------------------------------------------------------------------------------------


def _key(protocol: str, transform: str) -> bytes:
    suite = parse_esp_transform(transform) if protocol == "esp" else parse_ah_transform(transform)
    return bytes((i * 7 + 3) & 0xFF for i in range(suite.key_len))


def make_pair(
    protocol: str = "esp",
    transform: str = "aes128gcm16",
    mode: str = "tunnel",
    *,
    v6: bool = False,
    spi: int = SPI,
    tx_kw: dict[str, Any] | None = None,
    rx_kw: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[SecurityAssociation, SecurityAssociation]:
    """A sender ("out") and a receiver ("in") SA with the same key: two independent objects."""
    src, dst = (GW6_A, GW6_B) if v6 else (GW_A, GW_B)
    base: dict[str, Any] = {"key": _key(protocol, transform), "rng": seeded_rng(spi)}
    if mode == "tunnel":
        base.update(tunnel_src=src, tunnel_dst=dst)
    base.update(kw)
    tx = SecurityAssociation(spi, protocol, mode, transform, direction="out", **{**base, **(tx_kw or {})})  # type: ignore[arg-type]
    rx = SecurityAssociation(spi, protocol, mode, transform, direction="in", **{**base, **(rx_kw or {})})  # type: ignore[arg-type]
    return tx, rx


def receiver(*sas: SecurityAssociation, policies: tuple[Policy, ...] = ()) -> Datapath:
    dp = Datapath()
    for sa in sas:
        dp.install(sa, NOW)
    for pol in policies:
        dp.spd.add(pol)
    return dp


def reasons(res: Result) -> list[str]:
    return [r for r, _ in res.dropped]


def expect_inbound_drop(
    dp: Datapath, packets: list[bytes], reason: str, sa: SecurityAssociation | None = None, now: float = NOW
) -> Result:
    """Feed ``packets``; every one must be dropped as ``reason`` and counted (per SA too when given)."""
    before = dp.drops.get(reason, 0)
    sa_before = dict(sa.drops) if sa is not None else {}
    res = dp.inbound(packets, now)
    assert reasons(res) == [reason] * len(packets)
    assert [p for _, p in res.dropped] == packets
    assert res.to_inner == [] and res.to_ike == []
    assert dp.drops[reason] == before + len(packets)
    if sa is not None:
        assert sa.drops == {**sa_before, reason: sa_before.get(reason, 0) + len(packets)}
    return res


def _addr(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def outer4(payload: bytes, proto: int, src: str = GW_A, dst: str = GW_B, *, tos: int = 0, ident: int = 1) -> bytes:
    return ip.build_ipv4(tos, 20 + len(payload), ident, True, 64, proto, _addr(src), _addr(dst)) + payload


def outer6(payload: bytes, nh: int, src: str = GW6_A, dst: str = GW6_B) -> bytes:
    return ip.build_ipv6(0, 0, len(payload), nh, 64, _addr(src), _addr(dst)) + payload


def udp4500(body: bytes, sport: int = 4500, dport: int = 4500) -> bytes:
    return udp_header(sport, dport, len(body)) + body


def cut_ipv4(pkt: bytes, n: int) -> bytes:
    """The first ``n`` bytes of an IPv4 packet (20-byte header) with total length and checksum fixed."""
    hdr = bytearray(pkt[:20])
    ip.fix_ipv4_header(hdr, n, pkt[9])
    return bytes(hdr) + pkt[20:n]


def patch_ipv4(pkt: bytes, offset: int, value: int) -> bytes:
    """Set one byte of an IPv4 packet and recompute the header checksum."""
    b = bytearray(pkt)
    b[offset] = value
    hdr = bytearray(b[:20])
    ip.fix_ipv4_header(hdr, (hdr[2] << 8) | hdr[3], hdr[9])
    return bytes(hdr) + bytes(b[20:])


def flip(pkt: bytes, index: int, mask: int = 0x01) -> bytes:
    b = bytearray(pkt)
    b[index] ^= mask
    return bytes(b)


def with_outer_tc(pkt: bytes, tc: int) -> bytes:
    b = bytearray(pkt)
    ip.set_traffic_class(b, tc)
    return bytes(b)


def esp_plaintext(payload: bytes, nh: int, block: int, *, padding: bytes | None = None) -> bytes:
    """payload || padding || pad length || next header; default padding is RFC 4303's 1, 2, 3, ..."""
    if padding is None:
        padding = bytes(range(1, (-(len(payload) + 2)) % block + 1))
    return payload + padding + bytes((len(padding), nh))


def craft_esp(tx: SecurityAssociation, plaintext: bytes, *, seq: int | None = None, tos: int = 0) -> bytes:
    """An ESP-in-IPv4 packet sealing ``plaintext`` exactly as given (valid ICV, any content)."""
    assert tx.ctx is not None
    seq = tx.next_seq() if seq is None else seq
    header = tx.spi_bytes + seq.to_bytes(4, "big")
    esp = header + tx.ctx.seal(header, seq, b"", plaintext)
    return outer4(esp, ip.PROTO_ESP, tos=tos, ident=seq)


def ipv6_frag_esp(esp: bytes) -> bytes:
    # fragment header: next header ESP, offset 0, M=1, identification 1
    return outer6(bytes((ip.PROTO_ESP, 0, 0, 1)) + struct.pack("!I", 1) + esp, ip.PROTO_FRAGMENT)


# --- integrity -------------------------------------------------------------------------------------


def _flip_position(protocol: str, sa: SecurityAssociation, where: str) -> tuple[int, int]:
    """(index, mask) of a bit to flip in a tunnel-mode IPv4 packet protected by ``sa``."""
    if protocol == "esp":
        assert sa.ctx is not None
        return {"payload": (20 + 8 + sa.ctx.iv_len + 4, 0x10), "icv": (-1, 0x01), "seq": (24, 0x80)}[where]
    # AH: outer 20 | next hdr, len, reserved, SPI (4), seq (4), ICV | inner packet
    assert sa.ah_ctx is not None
    return {"payload": (-5, 0x10), "icv": (32, 0x01), "seq": (28, 0x80)}[where]


@pytest.mark.parametrize("where", ["payload", "icv", "seq"])
@pytest.mark.parametrize(("protocol", "transform"), ICV_SUITES, ids=_ids(ICV_SUITES))
def test_bad_icv(protocol: str, transform: str, where: str) -> None:
    tx, rx = make_pair(protocol, transform)
    dp = receiver(rx)
    inner = tcp4(size=200)
    wire = protect(tx, inner)
    index, mask = _flip_position(protocol, tx, where)
    expect_inbound_drop(dp, [flip(wire, index, mask)], Reason.BAD_ICV, rx)
    assert dp.replay_top(rx) == 0
    # the untouched packet is still accepted: the forgery changed no state (window, CBC stream)
    assert dp.inbound([wire], NOW).to_inner == [inner]
    assert rx.drops == {Reason.BAD_ICV: 1}


@pytest.mark.parametrize(("protocol", "transform"), ICV_SUITES, ids=_ids(ICV_SUITES))
def test_forged_high_sequence_number_does_not_move_the_window(protocol: str, transform: str) -> None:
    tx, rx = make_pair(protocol, transform)
    dp = receiver(rx)
    inner = udp4()
    assert dp.inbound([protect(tx, inner) for _ in range(3)], NOW).to_inner == [inner] * 3
    tx.seq = 1_000_000
    forged = flip(protect(tx, inner), -1)  # ESP: last ICV byte; AH: last payload byte
    expect_inbound_drop(dp, [forged], Reason.BAD_ICV, rx)
    # RFC 4303 §3.4.3 / RFC 4302 §3.4.3: the window moves only after the ICV verified
    assert dp.replay_top(rx) == 3
    tx.seq = 3
    assert dp.inbound([protect(tx, inner)], NOW).to_inner == [inner]
    assert dp.replay_top(rx) == 4


def test_bad_icv_with_esn_high_bits() -> None:
    """With ESN the ICV covers the (untransmitted) high half; a packet for another epoch fails it."""
    tx, rx = make_pair("esp", "aes128-sha256", esn=True)
    tx.seq = (1 << 32) + 10
    rx.replay.top = 5  # the receiver is still in epoch 0: the low half 11 is inferred as 11, not 2^32 + 11
    dp = receiver(rx)
    expect_inbound_drop(dp, [protect(tx, tcp4())], Reason.BAD_ICV, rx)
    assert dp.replay_top(rx) == 5


# --- padding ---------------------------------------------------------------------------------------


def _padlen_at_least_2(n: int, block: int) -> int:
    p = (-(n + 2)) % block
    return p if p >= 2 else p + block


@pytest.mark.parametrize("transform", ESP_SUITES)
def test_crafted_packet_with_correct_padding_is_accepted(transform: str) -> None:
    """Control for the padding tests: the hand-made packets are otherwise valid."""
    tx, rx = make_pair("esp", transform)
    dp = receiver(rx)
    inner = tcp4(size=77)
    assert tx.ctx is not None
    pl = _padlen_at_least_2(len(inner), tx.ctx.block)
    pkt = craft_esp(tx, esp_plaintext(inner, ip.PROTO_IPIP, tx.ctx.block, padding=bytes(range(1, pl + 1))))
    res = dp.inbound([pkt], NOW)
    assert res.to_inner == [inner] and not res.dropped


@pytest.mark.parametrize("transform", ESP_SUITES)
def test_padding_bytes_not_monotonic(transform: str) -> None:
    tx, rx = make_pair("esp", transform)
    dp = receiver(rx)
    inner = tcp4(size=77)
    assert tx.ctx is not None
    pl = _padlen_at_least_2(len(inner), tx.ctx.block)
    padding = bytearray(range(1, pl + 1))
    padding[0], padding[1] = padding[1], padding[0]  # 2, 1, 3, ...
    pkt = craft_esp(tx, esp_plaintext(inner, ip.PROTO_IPIP, tx.ctx.block, padding=bytes(padding)))
    expect_inbound_drop(dp, [pkt], Reason.BAD_PADDING, rx)
    zeros = craft_esp(tx, esp_plaintext(inner, ip.PROTO_IPIP, tx.ctx.block, padding=bytes(pl)))
    expect_inbound_drop(dp, [zeros], Reason.BAD_PADDING, rx)
    # the ICV verified, so the window moved (RFC 4303 §3.4.3): the same packet again is a replay
    expect_inbound_drop(dp, [pkt], Reason.REPLAY, rx)


@pytest.mark.parametrize("excess", ["one_byte", "maximum"])
@pytest.mark.parametrize("transform", ESP_SUITES)
def test_pad_length_larger_than_payload(transform: str, excess: str) -> None:
    tx, rx = make_pair("esp", transform)
    dp = receiver(rx)
    assert tx.ctx is not None
    # a plaintext of one block (16 bytes for CBC, 4 for GCM): the pad length byte claims more than exists
    size = tx.ctx.block
    padlen = size - 1 if excess == "one_byte" else 255  # pad length + 2 trailer bytes > plaintext length
    plaintext = bytes(range(1, size - 1)) + bytes((padlen, ip.PROTO_IPIP))
    expect_inbound_drop(dp, [craft_esp(tx, plaintext)], Reason.BAD_PADDING, rx)


# --- anti-replay -----------------------------------------------------------------------------------


REPLAY_SUITES = [("esp", "aes128gcm16"), ("esp", "aes128-sha256"), ("ah", "sha256")]


@pytest.mark.parametrize("window", [32, 64, 256])
@pytest.mark.parametrize(("protocol", "transform"), REPLAY_SUITES, ids=_ids(REPLAY_SUITES))
def test_replay_and_too_old_are_distinct(protocol: str, transform: str, window: int) -> None:
    tx, rx = make_pair(protocol, transform, replay_window=window)
    dp = receiver(rx)
    inner = icmp4()
    pkts = [protect(tx, inner) for _ in range(window + 6)]  # sequence numbers 1 .. window + 6
    top = window + 6
    assert dp.inbound([*pkts[:3], pkts[-1]], NOW).to_inner == [inner] * 4
    # inside the window and never seen: accepted out of order, including the oldest still inside
    oldest = top - window + 1
    assert dp.inbound([pkts[10], pkts[oldest - 1]], NOW).to_inner == [inner] * 2
    expect_inbound_drop(dp, [pkts[10], pkts[-1], pkts[oldest - 1]], Reason.REPLAY, rx)
    # one behind the window: too old, whether it was received (seq 1) or not (seq top - window)
    expect_inbound_drop(dp, [pkts[top - window - 1], pkts[0], pkts[3]], Reason.TOO_OLD, rx)
    assert rx.drops == {Reason.REPLAY: 3, Reason.TOO_OLD: 3}
    assert dp.drops == {Reason.REPLAY: 3, Reason.TOO_OLD: 3}


def test_replay_in_the_same_batch() -> None:
    tx, rx = make_pair()
    dp = receiver(rx)
    pkt = protect(tx, tcp4())
    res = dp.inbound([pkt, pkt, pkt], NOW)
    assert len(res.to_inner) == 1 and reasons(res) == [Reason.REPLAY] * 2
    assert rx.drops == {Reason.REPLAY: 2}


def test_esn_packet_from_before_the_sa_began_is_too_old() -> None:
    """ESN (RFC 4303 Appendix A2.2): a low half just below 2^32 while the window is at its start would
    belong to epoch -1, so it can only be an old packet."""
    tx, rx = make_pair(esn=True)
    dp = receiver(rx)
    assert dp.inbound([protect(tx, tcp4()) for _ in range(10)], NOW).to_inner == [tcp4()] * 10
    tx.seq = 0xFFFFFFF0
    expect_inbound_drop(dp, [protect(tx, tcp4())], Reason.TOO_OLD, rx)
    assert dp.replay_top(rx) == 10


def test_esn_replay_across_the_2_32_boundary() -> None:
    tx, rx = make_pair("esp", "aes128-sha256", esn=True)
    tx.seq = (1 << 32) - 3
    rx.replay.top = (1 << 32) - 4
    dp = receiver(rx)
    pkts = [protect(tx, tcp4()) for _ in range(4)]  # 2^32 - 2 .. 2^32 + 1: the high half changes
    assert dp.inbound(pkts, NOW).to_inner == [tcp4()] * 4
    assert dp.replay_top(rx) == (1 << 32) + 1
    expect_inbound_drop(dp, pkts, Reason.REPLAY, rx)


def test_sequence_number_zero_is_never_valid() -> None:
    tx, rx = make_pair()
    dp = receiver(rx)
    assert tx.ctx is not None
    pkt = craft_esp(tx, esp_plaintext(tcp4(), ip.PROTO_IPIP, tx.ctx.block), seq=0)
    expect_inbound_drop(dp, [pkt], Reason.TOO_OLD, rx)


# --- SA lookup, truncation, malformed headers ------------------------------------------------------


def test_unknown_spi() -> None:
    rx_esp = make_pair()[1]
    rx_ah = make_pair("ah", "sha256", spi=SPI + 1)[1]
    rx_udp = make_pair(spi=SPI + 2, udp_encap=(4500, 4500))[1]
    dp = receiver(rx_esp, rx_ah, rx_udp)
    tx_esp = make_pair(spi=OTHER_SPI)[0]
    tx_ah = make_pair("ah", "sha256", spi=OTHER_SPI)[0]
    tx_udp = make_pair(spi=OTHER_SPI, udp_encap=(4500, 4500))[0]
    # an AH SA's SPI used with ESP (and vice versa) is not a match either: the SAD key is (SPI, protocol)
    tx_esp_as_ah = make_pair("ah", "sha256", spi=SPI)[0]
    pkts = [protect(tx_esp, tcp4()), protect(tx_ah, tcp4()), protect(tx_udp, tcp4()), protect(tx_esp_as_ah, tcp4())]
    expect_inbound_drop(dp, pkts, Reason.UNKNOWN_SPI)
    assert rx_esp.drops == rx_ah.drops == rx_udp.drops == {}


def _esp4() -> tuple[SecurityAssociation, SecurityAssociation, bytes]:
    tx, rx = make_pair()
    return tx, rx, protect(tx, tcp4())


def test_truncated_ip_headers() -> None:
    _, rx, wire = _esp4()
    tx6, rx6 = make_pair(v6=True, spi=SPI + 1)
    wire6 = protect(tx6, udp6())
    dp = receiver(rx, rx6)
    # IPv6 with a hop-by-hop header announced but only 4 bytes of it present
    hbh_cut = outer6(bytes((ip.PROTO_ESP, 0, 0, 0)), ip.PROTO_HOPOPTS)
    expect_inbound_drop(dp, [b"", b"\x45", wire[:12], wire[:19], wire6[:39], hbh_cut], Reason.TRUNCATED)
    assert rx.drops == rx6.drops == {}


def test_truncated_esp_and_ah_headers() -> None:
    _, rx, wire = _esp4()
    tx_ah, rx_ah = make_pair("ah", "sha256", spi=SPI + 1)
    ah_wire = protect(tx_ah, tcp4())
    dp = receiver(rx, rx_ah)
    pkts = [cut_ipv4(wire, 20), cut_ipv4(wire, 24), cut_ipv4(wire, 27), cut_ipv4(ah_wire, 31)]
    expect_inbound_drop(dp, pkts, Reason.TRUNCATED)
    assert rx.drops == rx_ah.drops == {}


@pytest.mark.parametrize(
    ("transform", "keep"),
    [
        ("aes128gcm16", 0),  # header only
        ("aes128gcm16", 8),  # IV only
        ("aes128gcm16", 8 + 16 + 1),  # IV + tag, one byte short of the 2-byte trailer
        ("aes128-sha256", 16 + 16),  # IV + ICV, no ciphertext block
        ("aes128-sha256", 16 + 16 + 15),  # IV + ICV + a partial block: still less than IV + block + ICV
        ("null-sha256", 17),  # ICV + 1 byte: the trailer does not fit
    ],
)
def test_truncated_esp_body(transform: str, keep: int) -> None:
    tx, rx = make_pair("esp", transform)
    dp = receiver(rx)
    wire = protect(tx, tcp4(size=300))
    expect_inbound_drop(dp, [cut_ipv4(wire, 28 + keep)], Reason.TRUNCATED, rx)
    assert dp.replay_top(rx) == 0


def test_truncated_esp_in_udp_payload() -> None:
    _, rx = make_pair(udp_encap=(4500, 4500))
    dp = receiver(rx)
    # neither a keepalive (exactly one 0xFF), nor IKE (4 zero bytes), nor long enough for an ESP header
    pkts = [outer4(udp4500(b), ip.PROTO_UDP) for b in (b"", b"\xff\xff", b"\x00\x00\x00", b"\x01\x02\x03\x04\x05")]
    expect_inbound_drop(dp, pkts, Reason.TRUNCATED)


def test_malformed_outer_headers() -> None:
    _, rx, wire = _esp4()
    tx6, rx6 = make_pair(v6=True, spi=SPI + 1)
    wire6 = protect(tx6, udp6())
    dp = receiver(rx, rx6)
    pkts = [
        patch_ipv4(wire, 0, 0x44),  # IHL 4 (< 5)
        patch_ipv4(wire, 0, 0x40),  # IHL 0
        cut_ipv4(patch_ipv4(wire, 0, 0x4F), 40),  # IHL 15: a 60-byte header in a 40-byte datagram
        wire[:-1],  # total length larger than the buffer
        patch_ipv4(patch_ipv4(wire, 2, 0), 3, 12),  # total length 12 (< IHL)
        wire6[:-1],  # IPv6 payload length larger than the buffer
    ]
    expect_inbound_drop(dp, pkts, Reason.MALFORMED)
    assert rx.drops == rx6.drops == {}


@pytest.mark.parametrize("version", [0, 1, 5, 7, 15])
def test_bad_ip_version(version: int) -> None:
    _, rx, wire = _esp4()
    dp = receiver(rx)
    pkt = bytes((version << 4 | 5,)) + wire[1:]
    expect_inbound_drop(dp, [pkt, bytes((version << 4,)) + bytes(47)], Reason.BAD_IP_VERSION)


def test_fragments_are_dropped() -> None:
    _, rx, wire = _esp4()
    dp = receiver(rx)
    mf = patch_ipv4(wire, 6, wire[6] | 0x20)  # more fragments
    offset = patch_ipv4(wire, 7, 0x01)  # offset 8, MF clear (last fragment)
    offset_hi = patch_ipv4(patch_ipv4(wire, 6, 0x1F), 7, 0xFF)  # the largest offset, DF cleared
    esp = wire[20:]
    v6 = ipv6_frag_esp(esp)
    plain = patch_ipv4(udp4(), 6, 0x20)  # a plaintext fragment never reaches the SPD
    expect_inbound_drop(dp, [mf, offset, offset_hi, v6, plain], Reason.FRAGMENT)
    assert rx.drops == {}
    assert dp.inbound([wire], NOW).to_inner == [tcp4()]


# --- dummy packets, UDP encapsulation --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tunnel", "transport"])
@pytest.mark.parametrize("transform", ESP_SUITES)
def test_dummy_packet(transform: str, mode: str) -> None:
    assert Reason.DUMMY in SILENT_REASONS
    tx, rx = make_pair("esp", transform, mode)
    dp = receiver(rx)
    assert tx.ctx is not None
    pkts = [craft_esp(tx, esp_plaintext(bytes(range(n)), ip.PROTO_NONE, tx.ctx.block)) for n in (0, 1, 40)]
    expect_inbound_drop(dp, pkts, Reason.DUMMY, rx)
    assert dp.replay_top(rx) == 3  # authenticated, so counted by the window


def test_nat_keepalive() -> None:
    assert Reason.NAT_KEEPALIVE in SILENT_REASONS
    _, rx = make_pair(udp_encap=(4500, 4500))
    dp = receiver(rx)
    ka4 = outer4(udp4500(b"\xff", sport=31337), ip.PROTO_UDP, "198.51.100.7", GW_B)
    ka6 = outer6(udp4500(b"\xff"), ip.PROTO_UDP)
    expect_inbound_drop(dp, [ka4, ka6], Reason.NAT_KEEPALIVE)
    assert rx.drops == {}


def test_ike_on_the_encapsulation_port_goes_to_ike() -> None:
    _, rx = make_pair(udp_encap=(4500, 4500))
    dp = receiver(rx)
    msg = bytes(range(8)) + bytes(8) + b"\x2e\x20\x22\x08" + struct.pack("!II", 0, 28)  # an IKE header
    pkt4 = outer4(udp4500(NON_ESP_MARKER + msg, sport=31337), ip.PROTO_UDP, "198.51.100.7", GW_B)
    pkt6 = outer6(udp4500(NON_ESP_MARKER + msg), ip.PROTO_UDP)
    res = dp.inbound([pkt4, pkt6], NOW)
    assert res.dropped == [] and res.to_inner == []
    assert res.to_ike == [
        IkeDatagram(_addr("198.51.100.7"), _addr(GW_B), 31337, 4500, msg),
        IkeDatagram(_addr(GW6_A), _addr(GW6_B), 4500, 4500, msg),
    ]
    assert dp.drops == {}


def test_encap_mismatch() -> None:
    tx_udp, _ = make_pair(udp_encap=(4500, 4500))
    _, rx_plain = make_pair()
    dp = receiver(rx_plain)
    inner = tcp4()
    udp_wire = protect(tx_udp, inner)
    assert udp_wire[9] == ip.PROTO_UDP
    expect_inbound_drop(dp, [udp_wire], Reason.ENCAP_MISMATCH, rx_plain)

    tx_plain, _ = make_pair(spi=OTHER_SPI)
    _, rx_udp = make_pair(spi=OTHER_SPI, udp_encap=(4500, 4500))
    dp2 = receiver(rx_udp)
    plain_wire = protect(tx_plain, inner)
    assert plain_wire[9] == ip.PROTO_ESP
    expect_inbound_drop(dp2, [plain_wire], Reason.ENCAP_MISMATCH, rx_udp)
    # neither moved the window: the right encapsulation is still accepted
    assert dp.replay_top(rx_plain) == dp2.replay_top(rx_udp) == 0
    tx_udp2, _ = make_pair(spi=OTHER_SPI, udp_encap=(4500, 4500))
    assert dp2.inbound([protect(tx_udp2, inner)], NOW).to_inner == [inner]


# --- tunnel-mode inner packet checks ---------------------------------------------------------------


@pytest.mark.parametrize("nh", [ip.PROTO_TCP, ip.PROTO_UDP, ip.PROTO_ICMP, ip.PROTO_ESP, 0, 255])
@pytest.mark.parametrize("transform", ESP_SUITES)
def test_tunnel_bad_next_header(transform: str, nh: int) -> None:
    tx, rx = make_pair("esp", transform)
    dp = receiver(rx)
    assert tx.ctx is not None
    pkt = craft_esp(tx, esp_plaintext(tcp4(), nh, tx.ctx.block))
    expect_inbound_drop(dp, [pkt], Reason.BAD_NEXT_HEADER, rx)


@pytest.mark.parametrize("transform", ESP_SUITES)
def test_tunnel_inner_length_larger_than_payload(transform: str) -> None:
    tx, rx = make_pair("esp", transform)
    dp = receiver(rx)
    assert tx.ctx is not None
    inner = bytearray(tcp4(size=60))
    struct.pack_into("!H", inner, 2, len(inner) + 1)
    inner6 = bytearray(udp6())
    struct.pack_into("!H", inner6, 4, len(inner6) - 40 + 8)
    short4 = bytearray(tcp4())
    struct.pack_into("!H", short4, 2, 19)  # shorter than an IPv4 header
    pkts = [
        craft_esp(tx, esp_plaintext(bytes(inner), ip.PROTO_IPIP, tx.ctx.block)),
        craft_esp(tx, esp_plaintext(bytes(inner6), ip.PROTO_IPV6, tx.ctx.block)),
        craft_esp(tx, esp_plaintext(bytes(short4), ip.PROTO_IPIP, tx.ctx.block)),
    ]
    expect_inbound_drop(dp, pkts, Reason.BAD_LENGTH, rx)


def test_tunnel_inner_shorter_length_trims_tfc_padding() -> None:
    """Control: an inner length *smaller* than the payload is TFC padding (RFC 4303 §2.4), not an error."""
    tx, rx = make_pair()
    dp = receiver(rx)
    assert tx.ctx is not None
    inner = tcp4()
    pkt = craft_esp(tx, esp_plaintext(inner + bytes(37), ip.PROTO_IPIP, tx.ctx.block))
    assert dp.inbound([pkt], NOW).to_inner == [inner]


def test_tunnel_inner_version_does_not_match_next_header() -> None:
    tx, rx = make_pair()
    dp = receiver(rx)
    assert tx.ctx is not None
    pkts = [
        craft_esp(tx, esp_plaintext(udp6(), ip.PROTO_IPIP, tx.ctx.block)),
        craft_esp(tx, esp_plaintext(tcp4(), ip.PROTO_IPV6, tx.ctx.block)),
        craft_esp(tx, esp_plaintext(tcp4()[:19], ip.PROTO_IPIP, tx.ctx.block)),
    ]
    expect_inbound_drop(dp, pkts, Reason.MALFORMED, rx)


def test_cbc_ciphertext_not_whole_blocks_is_bad_length() -> None:
    tx, rx = make_pair("esp", "aes128-sha256")
    dp = receiver(rx)
    wire = protect(tx, tcp4(size=300))
    expect_inbound_drop(dp, [cut_ipv4(wire, len(wire) - 8)], Reason.BAD_LENGTH, rx)


@pytest.mark.parametrize(("plen", "reason"), [(1, Reason.BAD_LENGTH), (200, Reason.BAD_LENGTH), (5, Reason.MALFORMED)])
def test_ah_length_field(plen: int, reason: str) -> None:
    """AH Payload Len too small for the ICV or past the end; over IPv6 not a multiple of 8 (RFC 4302 §2.2)."""
    tx, rx = make_pair("ah", "sha256", "transport")
    dp = receiver(rx)
    wire = bytearray(protect(tx, udp6(src=GW6_A, dst=GW6_B)))
    assert wire[6] == ip.PROTO_AH and wire[41] == 6
    wire[41] = plen
    expect_inbound_drop(dp, [bytes(wire)], reason, rx)


def test_sa_selectors_refuse_other_inner_packets() -> None:
    tx, rx = make_pair(rx_kw={"selectors": [Selector(NET_A, NET_B), Selector(NET_A, "10.3.0.0/16", "udp", dport=53)]})
    dp = receiver(rx)
    ok = [tcp4(), udp4(dst="10.3.0.1")]
    assert dp.inbound([protect(tx, p) for p in ok], NOW).to_inner == ok
    bad = [tcp4(src="10.9.0.1"), tcp4(dst="10.3.0.1"), udp4(dst="10.3.0.1", dport=54), udp6()]
    expect_inbound_drop(dp, [protect(tx, p) for p in bad], Reason.POLICY_MISMATCH, rx)


def test_spd_in_policy_bound_to_another_sa() -> None:
    """SA without selectors: the SPD-I PROTECT entry covering the inner packet must name this SA."""
    tx, rx = make_pair()
    policies = (
        Policy(Selector(NET_A, NET_B), Action.PROTECT, "in", Template("esp", "tunnel", spi=OTHER_SPI)),
        Policy(Selector(NET_A, "10.3.0.0/16"), Action.PROTECT, "in", Template("ah", "tunnel", spi=SPI)),
        Policy(Selector(NET_A, "10.4.0.0/16"), Action.PROTECT, "in", Template("esp", "tunnel", spi=SPI)),
    )
    dp = receiver(rx, policies=policies)
    bad = [tcp4(), tcp4(dst="10.3.0.1")]  # other SPI; right SPI but AH
    expect_inbound_drop(dp, [protect(tx, p) for p in bad], Reason.POLICY_MISMATCH, rx)
    good = [tcp4(dst="10.4.0.1"), tcp4(src="10.9.0.1")]  # bound to this SA; no SPD-I entry at all
    assert dp.inbound([protect(tx, p) for p in good], NOW).to_inner == good


def test_spd_in_policy_bound_by_reqid() -> None:
    tx, rx = make_pair(rx_kw={"reqid": 7})
    pol = Policy(Selector(NET_A, NET_B), Action.PROTECT, "in", Template(reqid=7))
    other = Policy(Selector(NET_A, "10.3.0.0/16"), Action.PROTECT, "in", Template(reqid=8))
    dp = receiver(rx, policies=(pol, other))
    assert dp.inbound([protect(tx, tcp4())], NOW).to_inner == [tcp4()]
    expect_inbound_drop(dp, [protect(tx, tcp4(dst="10.3.0.1"))], Reason.POLICY_MISMATCH, rx)


# --- plaintext on the outer side -------------------------------------------------------------------


def test_plaintext_inbound_policy() -> None:
    dp = receiver(
        policies=(
            Policy(Selector(NET_A, NET_B), Action.PROTECT, "in", Template("esp", "tunnel", spi=SPI)),
            Policy(Selector("10.3.0.0/16", NET_B), Action.DISCARD, "in"),
            Policy(Selector("10.4.0.0/16", NET_B), Action.BYPASS, "in"),
        )
    )
    expect_inbound_drop(dp, [tcp4(), udp4(), icmp4()], Reason.POLICY_REQUIRES_PROTECTION)
    expect_inbound_drop(dp, [tcp4(src="10.3.0.1")], Reason.POLICY_DISCARD)
    expect_inbound_drop(dp, [tcp4(src="10.5.0.1"), udp6()], Reason.NO_POLICY)
    # UDP to the encapsulation port but too short for a UDP header is plaintext as well
    expect_inbound_drop(dp, [outer4(b"\x11\x94\x11\x94", ip.PROTO_UDP, "10.5.0.1", "10.2.0.1")], Reason.NO_POLICY)
    bypass = tcp4(src="10.4.0.1")
    res = dp.inbound([bypass], NOW)
    assert res.to_inner == [bypass] and not res.dropped
    assert dp.drops == {Reason.POLICY_REQUIRES_PROTECTION: 3, Reason.POLICY_DISCARD: 1, Reason.NO_POLICY: 3}


# --- outbound --------------------------------------------------------------------------------------


def _out_policy(spi: int = SPI) -> Policy:
    return Policy(Selector(NET_A, NET_B), Action.PROTECT, "out", Template("esp", "tunnel", spi=spi))


def test_outbound_no_policy_and_discard() -> None:
    dp = Datapath()
    dp.spd.add(Policy(Selector("10.3.0.0/16", NET_B), Action.DISCARD, "out"))
    dp.spd.add(Policy(Selector("10.4.0.0/16", NET_B), Action.BYPASS, "out"))
    res = dp.outbound([tcp4(), tcp4(src="10.3.0.1"), udp6(), tcp4(src="10.4.0.1")], NOW)
    assert reasons(res) == [Reason.NO_POLICY, Reason.POLICY_DISCARD, Reason.NO_POLICY]
    assert res.to_network == [tcp4(src="10.4.0.1")] and res.acquires == []
    assert dp.drops == {Reason.NO_POLICY: 2, Reason.POLICY_DISCARD: 1}
    assert dp.out_packets == 4


def test_outbound_unparseable_packets() -> None:
    dp = Datapath()
    dp.spd.add(Policy(Selector(), Action.BYPASS, "out"))
    res = dp.outbound([b"", tcp4()[:10], bytes((0x55,)) + bytes(39), patch_ipv4(tcp4(), 0, 0x44)], NOW)
    assert reasons(res) == [Reason.TRUNCATED, Reason.TRUNCATED, Reason.BAD_IP_VERSION, Reason.MALFORMED]
    assert res.to_network == []


def test_outbound_malformed_inner_for_tunnel() -> None:
    tx, _ = make_pair()
    dp = Datapath()
    dp.spd.add(_out_policy())
    dp.install(tx, NOW)
    bad = tcp4() + b"trailing junk"  # the IPv4 total length does not cover the buffer
    res = dp.outbound([bad], NOW)
    assert reasons(res) == [Reason.MALFORMED] and tx.drops == {Reason.MALFORMED: 1}
    assert tx.seq == 0  # no sequence number consumed


def test_outbound_transport_mode_fragment() -> None:
    """Transport mode applies to whole datagrams only (RFC 4303 §3.3.4)."""
    tx, _ = make_pair("esp", "aes128gcm16", "transport")
    dp = Datapath()
    dp.spd.add(
        Policy(Selector(f"{GW_A}/32", f"{GW_B}/32"), Action.PROTECT, "out", Template("esp", "transport", spi=SPI))
    )
    dp.install(tx, NOW)
    frag = patch_ipv4(tcp4(src=GW_A, dst=GW_B), 6, 0x20)
    res = dp.outbound([frag], NOW)
    assert reasons(res) == [Reason.FRAGMENT] and res.to_network == []
    assert dp.drops == tx.drops == {Reason.FRAGMENT: 1}
    assert tx.seq == 0


def test_outbound_acquire_once_per_timeout() -> None:
    dp = Datapath(acquire_timeout=5.0)
    pol = _out_policy()
    dp.spd.add(pol)
    pkts = [tcp4(), udp4(), icmp4()]
    res = dp.outbound(pkts, NOW)
    assert reasons(res) == [Reason.NO_SA] * 3 and res.to_network == []
    assert len(res.acquires) == 1
    acq = res.acquires[0]
    assert acq.policy == pol and acq.packet == pkts[0] and acq.flow == ip.flow_of(pkts[0])
    res = dp.outbound(pkts, NOW + 4.999)
    assert reasons(res) == [Reason.NO_SA] * 3 and res.acquires == []
    res = dp.outbound(pkts, NOW + 5.0)
    assert reasons(res) == [Reason.NO_SA] * 3 and len(res.acquires) == 1 and res.acquires[0].packet == pkts[0]
    assert dp.outbound(pkts[:1], NOW + 9.0).acquires == []
    assert dp.drops == {Reason.NO_SA: 10}
    # once the SA is there, traffic flows and no acquire is pending
    tx, _ = make_pair()
    dp.install(tx, NOW + 9.5)
    res = dp.outbound(pkts, NOW + 9.5)
    assert len(res.to_network) == 3 and not res.dropped and not res.acquires


def test_outbound_acquire_timeout_via_handle_timer() -> None:
    dp = Datapath(acquire_timeout=5.0)
    dp.spd.add(_out_policy())
    assert len(dp.outbound([tcp4()], NOW).acquires) == 1
    dp.handle_timer(NOW + 5.0)
    assert len(dp.outbound([tcp4()], NOW + 5.0).acquires) == 1


@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize(("protocol", "transform"), REPLAY_SUITES, ids=_ids(REPLAY_SUITES))
def test_outbound_sequence_number_exhausted(protocol: str, transform: str, esn: bool) -> None:
    tx, rx = make_pair(protocol, transform, esn=esn)
    dp = Datapath()
    dp.spd.add(Policy(Selector(NET_A, NET_B), Action.PROTECT, "out", Template(protocol, "tunnel", spi=SPI)))  # type: ignore[arg-type]
    assert tx.seq_max == ((1 << 64) - 1 if esn else (1 << 32) - 1)
    tx.seq = tx.seq_max - 1
    dp.install(tx, NOW)
    res = dp.outbound([tcp4(), tcp4(), udp4()], NOW)
    assert len(res.to_network) == 1  # the last number, seq_max itself, is still used (RFC 4303 §3.3.3)
    assert reasons(res) == [Reason.SEQ_EXHAUSTED] * 2
    dp.refresh()
    assert dp.drops == tx.drops == {Reason.SEQ_EXHAUSTED: 2}
    assert tx.seq == tx.seq_max
    assert res.acquires == [] and tx in dp.sad
    # the receiver accepts the last packet
    rx.replay.top = tx.seq_max - 2
    assert receiver(rx).inbound(res.to_network, NOW).to_inner == [tcp4()]


@pytest.mark.parametrize(("protocol", "transform"), REPLAY_SUITES, ids=_ids(REPLAY_SUITES))
def test_outbound_hard_packet_lifetime(protocol: str, transform: str) -> None:
    tx, _ = make_pair(protocol, transform, tx_kw={"hard": Lifetime(packets=3)})
    dp = Datapath()
    pol = Policy(Selector(NET_A, NET_B), Action.PROTECT, "out", Template(protocol, "tunnel", spi=SPI))  # type: ignore[arg-type]
    dp.spd.add(pol)
    dp.install(tx, NOW)
    res = dp.outbound([tcp4(), tcp4()], NOW)
    assert len(res.to_network) == 2 and res.events == [] and tx in dp.sad
    res = dp.outbound([tcp4(), tcp4(), udp4()], NOW)
    assert len(res.to_network) == 1
    assert res.events == [SAEvent("hard", tx, "packets")]
    assert tx not in dp.sad and tx.dead
    # the policy now has no SA: the remaining packets trigger an acquire
    assert reasons(res) == [Reason.NO_SA] * 2 and len(res.acquires) == 1 and res.acquires[0].policy == pol


def test_outbound_expired_sa_still_installed() -> None:
    tx, _ = make_pair()
    dp = Datapath()
    dp.spd.add(_out_policy())
    dp.install(tx, NOW)
    dp.expire(tx, hard=True)  # marked dead by its owner, the timer has not run yet
    res = dp.outbound([tcp4()], NOW)
    assert reasons(res) == [Reason.SA_EXPIRED] and tx.drops == {Reason.SA_EXPIRED: 1}
    assert res.events == [SAEvent("hard", tx, "seconds")] and tx not in dp.sad


# --- inbound lifetimes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "transform"), REPLAY_SUITES, ids=_ids(REPLAY_SUITES))
def test_inbound_hard_packet_lifetime(protocol: str, transform: str) -> None:
    tx, rx = make_pair(protocol, transform, rx_kw={"hard": Lifetime(packets=2)})
    dp = receiver(rx)
    pkts = [protect(tx, tcp4()) for _ in range(3)]
    res = dp.inbound(pkts, NOW)
    assert res.to_inner == [tcp4()] * 2
    assert res.events == [SAEvent("hard", rx, "packets")] and rx not in dp.sad
    assert reasons(res) == [Reason.UNKNOWN_SPI]


def test_inbound_expired_sa_still_installed() -> None:
    tx, rx = make_pair()
    dp = receiver(rx)
    dp.expire(rx, hard=True)
    pkt = protect(tx, tcp4())
    res = expect_inbound_drop(dp, [pkt], Reason.SA_EXPIRED, rx)
    assert res.events == [SAEvent("hard", rx, "seconds")] and rx not in dp.sad
    expect_inbound_drop(dp, [pkt], Reason.UNKNOWN_SPI)


def test_inbound_hard_time_lifetime_via_timer() -> None:
    tx, rx = make_pair(rx_kw={"hard": Lifetime(seconds=10)})
    dp = receiver(rx)
    assert dp.get_timer() == NOW + 10
    assert dp.handle_timer(NOW + 9.9) == []
    assert dp.handle_timer(NOW + 10) == [SAEvent("hard", rx, "seconds")]
    assert rx not in dp.sad
    expect_inbound_drop(dp, [protect(tx, tcp4())], Reason.UNKNOWN_SPI)


# --- ECN (RFC 6040) --------------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize(("protocol", "transform"), [("esp", "aes128gcm16"), ("ah", "sha256")], ids=["esp", "ah"])
def test_ecn_outer_ce_on_not_ect_inner(protocol: str, transform: str, v6: bool) -> None:
    tx, rx = make_pair(protocol, transform, v6=v6)
    dp = receiver(rx)
    not_ect = tcp4(tos=0x20)  # DSCP 8, Not-ECT
    wire = protect(tx, not_ect)
    assert ip.traffic_class(wire) == 0x20
    expect_inbound_drop(dp, [with_outer_tc(wire, 0x23)], Reason.ECN_DROP, rx)
    # controls: outer ECT(0) over Not-ECT passes unchanged; outer CE over ECT(0) marks the inner CE
    assert dp.inbound([with_outer_tc(protect(tx, not_ect), 0x22)], NOW).to_inner == [not_ect]
    got = dp.inbound([with_outer_tc(protect(tx, tcp4(tos=0x22)), 0x23)], NOW).to_inner
    assert len(got) == 1 and got[0][1] == 0x23
    assert rx.drops == {Reason.ECN_DROP: 1}


# --- one batch, many reasons -----------------------------------------------------------------------


def test_mixed_batch_is_counted_per_reason() -> None:
    tx, rx = make_pair()
    tx_udp, rx_udp = make_pair(spi=SPI + 1, udp_encap=(4500, 4500))
    dp = receiver(rx, rx_udp)
    assert tx.ctx is not None
    good = protect(tx, tcp4())
    batch = [
        (good, None),
        (flip(protect(tx, tcp4()), -1), Reason.BAD_ICV),
        (good, Reason.REPLAY),
        (protect(make_pair(spi=OTHER_SPI)[0], tcp4()), Reason.UNKNOWN_SPI),
        (good[:15], Reason.TRUNCATED),
        (patch_ipv4(good, 0, 0x43), Reason.MALFORMED),
        (bytes((0x95,)) + good[1:], Reason.BAD_IP_VERSION),
        (patch_ipv4(good, 6, 0x20), Reason.FRAGMENT),
        (craft_esp(tx, esp_plaintext(b"", ip.PROTO_NONE, 4)), Reason.DUMMY),
        (craft_esp(tx, esp_plaintext(tcp4(), ip.PROTO_IPIP, 4, padding=b"\x00")), Reason.BAD_PADDING),
        (craft_esp(tx, esp_plaintext(tcp4(), ip.PROTO_TCP, 4)), Reason.BAD_NEXT_HEADER),
        (outer4(udp4500(b"\xff"), ip.PROTO_UDP), Reason.NAT_KEEPALIVE),
        (outer4(udp4500(NON_ESP_MARKER + b"ike"), ip.PROTO_UDP), None),
        (protect(tx_udp, tcp4()), None),
        (with_outer_tc(protect(tx, tcp4()), 0x03), Reason.ECN_DROP),
        (tcp4(), Reason.NO_POLICY),
    ]
    res = dp.inbound([p for p, _ in batch], NOW)
    expected = [r for _, r in batch if r is not None]
    assert reasons(res) == expected
    assert [p for _, p in res.dropped] == [p for p, r in batch if r is not None]
    assert len(res.to_inner) == 2 and len(res.to_ike) == 1
    assert dp.drops == dict(Counter(expected))
    sa_reasons = {Reason.BAD_ICV, Reason.REPLAY, Reason.DUMMY, Reason.BAD_PADDING}
    sa_reasons |= {Reason.BAD_NEXT_HEADER, Reason.ECN_DROP}
    assert rx.drops == {r: 1 for r in sa_reasons}
    assert rx_udp.drops == {}
    assert dp.in_packets == len(batch)


# --- fuzzing ---------------------------------------------------------------------------------------

FUZZ_SPI_V4, FUZZ_SPI_V6, FUZZ_SPI_UDP, FUZZ_SPI_AH = 0x101, 0x102, 0x103, 0x104


def _fuzz_sas() -> list[tuple[SecurityAssociation, SecurityAssociation]]:
    return [
        make_pair("esp", "aes128gcm16", spi=FUZZ_SPI_V4),
        make_pair("esp", "aes128-sha256", v6=True, spi=FUZZ_SPI_V6, tfc_padding=32),
        make_pair(
            "esp",
            "chacha20poly1305",
            spi=FUZZ_SPI_UDP,
            udp_encap=(4500, 4500),
            rx_kw={"selectors": [Selector(NET_A, NET_B), Selector("fd00:1::/64", "fd00:2::/64")]},
        ),
        make_pair("ah", "sha256", "transport", spi=FUZZ_SPI_AH),
    ]


def _fuzz_receiver() -> Datapath:
    policies = (
        Policy(Selector(NET_A, NET_B), Action.PROTECT, "in", Template("esp", "tunnel", spi=FUZZ_SPI_V4)),
        Policy(
            Selector("fd00:1::/64", "fd00:2::/64"), Action.PROTECT, "in", Template("esp", "tunnel", spi=FUZZ_SPI_V6)
        ),
        Policy(Selector("198.51.100.0/24", None), Action.BYPASS, "in"),
        Policy(Selector("203.0.113.0/24", None), Action.DISCARD, "in"),
    )
    return receiver(*(rx for _, rx in _fuzz_sas()), policies=policies)


@cache
def fuzz_corpus() -> tuple[bytes, ...]:
    (v4, _), (v6, _), (udp, _), (ah, _) = _fuzz_sas()
    pkts = [protect(v4, p) for p in (tcp4(size=150), icmp4(), udp4())]
    pkts += [protect(v6, p) for p in (udp6(), tcp6_ext())]
    pkts += [protect(udp, p) for p in (tcp4(size=40), udp6())]
    pkts += [protect(ah, p) for p in (udp4(src=GW_A, dst=GW_B), tcp4(src=GW_A, dst=GW_B, size=10))]
    pkts += [
        outer4(udp4500(b"\xff"), ip.PROTO_UDP),
        outer4(udp4500(NON_ESP_MARKER + bytes(28)), ip.PROTO_UDP),
        udp4(src="198.51.100.1"),
        tcp4(src="203.0.113.9"),
    ]
    return tuple(pkts)


def fix_length(pkt: bytes) -> bytes:
    """Make the IP length field match the buffer, so mutated packets get past the outer header checks."""
    b = bytearray(pkt)
    if len(b) >= 20 and b[0] >> 4 == 4:
        struct.pack_into("!H", b, 2, min(len(b), 0xFFFF))
    elif len(b) >= 40 and b[0] >> 4 == 6:
        struct.pack_into("!H", b, 4, min(len(b) - 40, 0xFFFF))
    return bytes(b)


Mutation = tuple[str, int, int, bytes]
#: (kind, position, bit, inserted bytes); "fixlen" makes the IP length field agree with the buffer again
MUTATION = st.tuples(
    st.sampled_from(["truncate", "flip", "insert", "fixlen"]),
    st.integers(0, 2000),
    st.integers(0, 7),
    st.binary(min_size=1, max_size=16),
)


def mutate(pkt: bytes, ops: list[Mutation]) -> bytes:
    for kind, pos, bit, data in ops:
        if kind == "truncate":
            pkt = pkt[: pos % (len(pkt) + 1)]
        elif kind == "flip" and pkt:
            i = pos % len(pkt)
            pkt = pkt[:i] + bytes((pkt[i] ^ (1 << bit),)) + pkt[i + 1 :]
        elif kind == "insert":
            i = pos % (len(pkt) + 1)
            pkt = pkt[:i] + data + pkt[i:]
        elif kind == "fixlen":
            pkt = fix_length(pkt)
    return pkt


def check_each_packet_accounted(dp: Datapath, packets: list[bytes]) -> None:
    """Feed packets one by one (state carries over) and check where each one ended up."""
    for pkt in packets:
        before = dict(dp.drops)
        sa_before = {id(sa): dict(sa.drops) for sa in dp.sad}
        res = dp.inbound([pkt], NOW)  # must not raise
        assert len(res.to_inner) + len(res.dropped) + len(res.to_ike) == 1
        assert res.to_network == [] and res.acquires == []
        if res.dropped:
            reason, dropped = res.dropped[0]
            assert dropped == pkt
            assert reason in ALL_REASONS
            assert dp.drops == {**before, reason: before.get(reason, 0) + 1}
            for sa in dp.sad:
                old = sa_before.get(id(sa), {})
                if sa.drops != old:
                    assert sa.drops == {**old, reason: old.get(reason, 0) + 1}
        else:
            assert dp.drops == before
        for inner in res.to_inner:
            assert inner[0] >> 4 in (4, 6)
    # no protected packet was accepted twice: each one charged to an SA marked its own sequence number
    for sa in dp.sad:
        assert sa.packets == len(sa.replay.snapshot())


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(fuzz_corpus()) - 1), st.lists(MUTATION, max_size=4)),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_mutated_protected_packets(cases: list[tuple[int, list[Mutation]]]) -> None:
    corpus = fuzz_corpus()
    packets = [mutate(corpus[i], ops) for i, ops in cases]
    check_each_packet_accounted(_fuzz_receiver(), packets)
    # and the same inputs as one batch on a fresh receiver
    dp = _fuzz_receiver()
    res = dp.inbound(packets, NOW)
    assert len(res.to_inner) + len(res.dropped) + len(res.to_ike) == len(packets)
    assert {r for r, _ in res.dropped} <= ALL_REASONS
    assert dp.drops == dict(Counter(r for r, _ in res.dropped))


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=3))
def test_fuzz_random_bytes(blobs: list[bytes]) -> None:
    check_each_packet_accounted(_fuzz_receiver(), blobs)


def _fuzz_prefixes() -> list[bytes]:
    ah_spi = FUZZ_SPI_AH.to_bytes(4, "big")
    return [
        ip.build_ipv4(0, 20, 0, True, 64, ip.PROTO_ESP, _addr(GW_A), _addr(GW_B)) + FUZZ_SPI_V4.to_bytes(4, "big"),
        ip.build_ipv4(0, 20, 0, True, 64, ip.PROTO_AH, _addr(GW_A), _addr(GW_B)) + bytes((4, 7, 0, 0)) + ah_spi,
        ip.build_ipv4(0, 20, 0, True, 64, ip.PROTO_UDP, _addr(GW_A), _addr(GW_B)) + udp_header(4500, 4500, 0),
        ip.build_ipv6(0, 0, 0, ip.PROTO_ESP, 64, _addr(GW6_A), _addr(GW6_B)) + FUZZ_SPI_V6.to_bytes(4, "big"),
        ip.build_ipv6(0, 0, 0, ip.PROTO_HOPOPTS, 64, _addr(GW6_A), _addr(GW6_B)),
        ip.build_ipv6(0, 0, 0, ip.PROTO_DSTOPTS, 64, _addr(GW6_A), _addr(GW6_B)),
    ]


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(_fuzz_prefixes()), st.binary(max_size=200), st.booleans())
def test_fuzz_random_bytes_behind_valid_headers(prefix: bytes, tail: bytes, fix: bool) -> None:
    pkt = prefix + tail
    check_each_packet_accounted(_fuzz_receiver(), [fix_length(pkt) if fix else pkt])
