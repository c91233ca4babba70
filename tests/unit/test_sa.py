"""SecurityAssociation: configuration errors, sequence numbers, lifetimes (RFC 4301 §4.4.2.1)."""

from __future__ import annotations

import pytest

from ipsecstack import Dropped, Lifetime, Reason, SecurityAssociation, protect, seeded_rng
from ipsecstack.errors import ConfigError
from ipsecstack.sa import SEQ_SOFT_MARGIN
from tests.packets import tcp4

TUN = {"tunnel_src": "192.0.2.1", "tunnel_dst": "192.0.2.2"}


def _sa(**kw: object) -> SecurityAssociation:
    args: dict[str, object] = {"spi": 0x100, "key": bytes(20), **TUN}
    args.update(kw)
    return SecurityAssociation(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"spi": 0}, "spi", "reserved"),
        ({"spi": 1 << 32}, "spi", "4294967295"),
        ({"key": bytes(16)}, "key", "20 bytes"),
        ({"transform": "aes256-sha384", "key": bytes(32)}, "key", "80 bytes"),
        ({"transform": "aes128"}, "transform", "integrity"),
        ({"transform": "aes128gcm16-sha256"}, "transform", "AEAD"),
        ({"transform": "des-md5"}, "transform", "unknown"),
        ({"protocol": "ah", "transform": "md5", "key": bytes(16)}, "transform", "sha256"),
        ({"tunnel_src": None}, "tunnel_src", "tunnel mode needs"),
        ({"tunnel_dst": "2001:db8::1"}, "tunnel_dst", "same IP family"),
        ({"tunnel_dst": "not-an-ip"}, "tunnel_dst", "IPv4 or IPv6"),
        ({"mode": "transport", "tfc_padding": 100}, "tfc_padding", "tunnel mode"),
        ({"protocol": "ah", "transform": "sha256", "key": bytes(32), "udp_encap": (4500, 4500)}, "udp_encap", "ESP"),
        ({"udp_encap": (4500, 0)}, "udp_encap", "source_port"),
        ({"replay_window": 8}, "replay_window", "32"),
        ({"ecn": "full"}, "ecn", "RFC 6040"),
        ({"df": "maybe"}, "df", "copy"),
        ({"key": "zz"}, "key", "hex"),
    ],
)
def test_config_errors_name_field_and_fix(kwargs: dict[str, object], field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as e:
        _sa(**kwargs)
    assert e.value.field == field
    assert hint in str(e.value)


def test_key_never_appears_in_errors_or_repr() -> None:
    secret = "5ec2e75ec2e75ec2e75ec2e75ec2e7"  # 15 bytes: wrong length for aes128gcm16
    with pytest.raises(ConfigError) as e:
        _sa(key=secret)
    assert secret not in str(e.value)
    sa = _sa(key=bytes.fromhex("ab" * 20))
    assert "abab" not in repr(sa)


def test_key_as_hex_string() -> None:
    sa = _sa(key="00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:01:02:03:04")
    assert sa.transform == "aes128gcm16"


def test_aliases_are_normalised() -> None:
    assert _sa(transform="aes128gcm128").transform == "aes128gcm16"
    assert _sa(transform="aes256-sha2_256", key=bytes(64)).transform == "aes256-sha256"


def test_sequence_numbers_start_at_one_and_never_wrap() -> None:
    sa = _sa()
    out = protect(sa, tcp4())
    assert int.from_bytes(out[24:28], "big") == 1
    sa.seq = sa.seq_max - 1
    protect(sa, tcp4())
    with pytest.raises(Dropped) as e:
        protect(sa, tcp4())
    assert e.value.reason == Reason.SEQ_EXHAUSTED
    assert sa.seq == sa.seq_max


def test_esn_sender_goes_past_32_bits() -> None:
    sa = _sa(esn=True)
    sa.seq = (1 << 32) - 1
    out = protect(sa, tcp4())
    assert int.from_bytes(out[24:28], "big") == 0  # low half on the wire
    assert sa.seq == 1 << 32
    assert sa.seq_max == (1 << 64) - 1


def test_soft_event_before_sequence_exhaustion() -> None:
    sa = _sa()
    sa.seq = sa.seq_max - SEQ_SOFT_MARGIN - 1
    protect(sa, tcp4())
    events = sa.take_events()
    assert [(e.kind, e.trigger) for e in events] == [("soft", "seq")]


def test_packet_and_byte_lifetimes() -> None:
    pkt = tcp4(size=60)
    sa = _sa(soft=Lifetime(packets=3), hard=Lifetime(packets=5))
    for _ in range(2):
        protect(sa, pkt)
    assert sa.take_events() == []
    protect(sa, pkt)
    assert [(e.kind, e.trigger) for e in sa.take_events()] == [("soft", "packets")]
    protect(sa, pkt)
    protect(sa, pkt)
    assert [(e.kind, e.trigger) for e in sa.take_events()] == [("hard", "packets")]
    with pytest.raises(Dropped) as e:
        protect(sa, pkt)
    assert e.value.reason == Reason.SA_EXPIRED

    sb = _sa(soft=Lifetime(bytes=len(pkt) * 2), hard=Lifetime(bytes=len(pkt) * 10))
    protect(sb, pkt)
    protect(sb, pkt)
    assert [(e.kind, e.trigger) for e in sb.take_events()] == [("soft", "bytes")]
    assert sb.bytes == 2 * len(pkt) and sb.packets == 2


def test_time_lifetimes() -> None:
    sa = _sa(soft=Lifetime(seconds=50), hard=Lifetime(seconds=60))
    sa.added_at = 1000.0
    assert sa.deadlines() == (1050.0, 1060.0)
    sa.check_time(1049.9)
    assert sa.take_events() == []
    sa.check_time(1050.0)
    assert [(e.kind, e.trigger) for e in sa.take_events()] == [("soft", "seconds")]
    assert sa.deadlines() == (None, 1060.0)
    sa.check_time(1061.0)
    assert [(e.kind, e.trigger) for e in sa.take_events()] == [("hard", "seconds")]
    assert sa.dead


def test_cbc_output_is_reproducible_with_a_seeded_rng() -> None:
    """Randomness is injected: the same seed gives the same bytes (the sans-IO contract)."""
    a = _sa(transform="aes128-sha256", key=bytes(48), rng=seeded_rng(7))
    b = _sa(transform="aes128-sha256", key=bytes(48), rng=seeded_rng(7))
    c = _sa(transform="aes128-sha256", key=bytes(48), rng=seeded_rng(8))
    pkt = tcp4()
    pa, pb, pc = protect(a, pkt), protect(b, pkt), protect(c, pkt)
    assert pa == pb
    assert pa != pc
    # the IV differs packet to packet even for identical plaintext
    assert protect(a, pkt)[28:44] != pa[28:44]


def test_overhead_covers_the_real_growth() -> None:
    for kw in ({}, {"udp_encap": (4500, 4500)}, {"transform": "aes256-sha512", "key": bytes(96)},
               {"protocol": "ah", "transform": "sha384", "key": bytes(48)}):  # fmt: skip
        sa = _sa(**kw)
        for size in range(0, 64):
            pkt = tcp4(size=size)
            assert len(protect(sa, pkt)) - len(pkt) <= sa.overhead


def test_move_peer_changes_outer_destination_and_port() -> None:
    from scapy.layers.inet import IP, UDP

    sa = _sa(udp_encap=(4500, 4500))
    sa.move_peer("192.0.2.99", 40001)
    out = IP(protect(sa, tcp4()))
    assert out.dst == "192.0.2.99" and out[UDP].dport == 40001 and out[UDP].sport == 4500
    fresh = out.copy()
    del fresh.chksum
    assert IP(bytes(fresh)).chksum == out.chksum
    with pytest.raises(ConfigError):
        sa.move_peer("2001:db8::1", None)
