"""The native engine against the Python engine, byte for byte, in both directions.

For every transform, both modes, IPv4/IPv6 inner and outer, ESN on/off, UDP encapsulation on/off, and
a batch of inner packets whose UDP payloads take every size residue modulo 16 up to 1500 bytes (plus
TCP, ICMP, IPv4 UDP without checksum, IPv6 extension headers): the native engine produces exactly the
bytes the Python engine produces from the same SA state (same sequence numbers, padding, AEAD IVs, and
the same CBC IV seeds); each engine unprotects what the other protected; the counters agree.
"""

from __future__ import annotations

import pytest

from ipsecstack import protect, unprotect
from tests.native.native_helpers import (
    SPI,
    TRANSFORMS,
    batch_for,
    make_pair,
    needs_native,
    reference_unprotect,
    udp_packet,
)

pytestmark = needs_native

CONFIGS = [
    pytest.param("tunnel", 4, 4, id="tunnel-v4-in-v4"),
    pytest.param("tunnel", 6, 4, id="tunnel-v6-in-v4"),
    pytest.param("tunnel", 4, 6, id="tunnel-v4-in-v6"),
    pytest.param("tunnel", 6, 6, id="tunnel-v6-in-v6"),
    pytest.param("transport", 4, 4, id="transport-v4"),
    pytest.param("transport", 6, 6, id="transport-v6"),
]


@pytest.mark.parametrize("encap", [None, (4500, 4500)], ids=["esp", "udp-encap"])
@pytest.mark.parametrize("esn", [False, True], ids=["no-esn", "esn"])
@pytest.mark.parametrize(("mode", "inner", "outer"), CONFIGS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_same_bytes_both_directions(
    transform: str, mode: str, inner: int, outer: int, esn: bool, encap: tuple[int, int] | None
) -> None:
    batch = batch_for(inner, transport=mode == "transport")
    py = make_pair(transform, mode, outer=outer, esn=esn, encap=encap)
    nat = make_pair(transform, mode, outer=outer, esn=esn, encap=encap)  # the same state, separately

    py_wire = [protect(py.tx, p) for p in batch]
    nat_wire = nat.engine.protect(SPI, batch)
    assert nat_wire == py_wire

    # each engine unprotects what the other protected
    assert py.engine.unprotect(py_wire) == batch
    assert [unprotect(nat.rx, w) for w in nat_wire] == batch

    # the counters agree, and the sequence numbers moved in step
    out = nat.engine.sa_stats("out", SPI)
    assert (out["packets"], out["bytes"], out["seq"]) == (py.tx.packets, py.tx.bytes, py.tx.seq)
    inb = py.engine.sa_stats("in", SPI)
    assert (inb["packets"], inb["bytes"], inb["replay_top"]) == (nat.rx.packets, nat.rx.bytes, nat.rx.replay.top)
    assert out["drops"] == inb["drops"] == {}


RULES = [
    pytest.param(dict(ttl=9), id="ttl9"),
    pytest.param(dict(copy_dscp=False), id="no-dscp"),
    pytest.param(dict(ecn="compat"), id="ecn-compat"),
    pytest.param(dict(df="set"), id="df-set"),
    pytest.param(dict(df="clear"), id="df-clear"),
]


@pytest.mark.parametrize("outer", [4, 6])
@pytest.mark.parametrize("inner", [4, 6])
@pytest.mark.parametrize("rules", RULES)
def test_outer_header_rules(rules: dict[str, object], inner: int, outer: int) -> None:
    """TTL, DSCP copy, ECN mode and DF (RFC 4301 §5.1.2.1, §8.1; RFC 6040 §4.1) as the Python engine applies them."""
    batch = batch_for(inner, transport=False)
    py = make_pair("aes128gcm16", "tunnel", outer=outer, **rules)
    nat = make_pair("aes128gcm16", "tunnel", outer=outer, **rules)
    assert nat.engine.protect(SPI, batch) == [protect(py.tx, p) for p in batch]


def _set_outer_ecn(pkt: bytes, ecn: int) -> bytes:
    """Rewrite the outer header's ECN field (not covered by the ICV), as a router on the path does."""
    buf = bytearray(pkt)
    if buf[0] >> 4 == 4:
        buf[1] = (buf[1] & 0xFC) | ecn
        buf[10:12] = b"\x00\x00"
        s = sum(int.from_bytes(buf[i : i + 2], "big") for i in range(0, 20, 2))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        buf[10:12] = (~s & 0xFFFF).to_bytes(2, "big")
    else:
        buf[1] = (buf[1] & 0xCF) | (ecn << 4)
    return bytes(buf)


# RFC 6040 §4.2: the inner ECN field after decapsulation, by [inner][outer]; None = drop
RFC6040 = {0: [0, 0, 0, None], 1: [1, 1, 1, 3], 2: [2, 1, 2, 3], 3: [3, 3, 3, 3]}


@pytest.mark.parametrize("outer", [4, 6])
@pytest.mark.parametrize("inner", [4, 6])
def test_ecn_decapsulation(inner: int, outer: int) -> None:
    """Every (inner, outer) ECN pair: the RFC 6040 table, and the same bytes or reason as the Python engine."""
    sender = make_pair("aes256gcm16", "tunnel", outer=outer, ecn="compat")  # outer starts Not-ECT
    for i_ecn in range(4):
        wire = protect(sender.tx, udp_packet(inner, 40, tos=0x28 | i_ecn))
        for o_ecn in range(4):
            w = _set_outer_ecn(wire, o_ecn)
            rx = make_pair("aes256gcm16", "tunnel", outer=outer, ecn="compat")  # fresh windows each time
            [got] = rx.engine.unprotect([w])
            assert got == reference_unprotect({SPI: rx.rx}, w)
            want = RFC6040[i_ecn][o_ecn]
            if want is None:
                assert got == "ecn_drop"
            else:
                assert isinstance(got, bytes)
                assert (got[1] & 3 if inner == 4 else (got[1] >> 4) & 3) == want
