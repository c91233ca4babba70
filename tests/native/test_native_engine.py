"""The native engine's control surface: install/remove, state transfer, lifetimes and events, batch
arguments, and threads (the GIL is released around the crypto loop; concurrent calls stay correct)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from ipsecstack import ConfigError, Lifetime, Reason, SecurityAssociation, Selector, native, protect, unprotect
from ipsecstack.sa import SEQ_SOFT_MARGIN
from tests.native.native_helpers import (
    SPI,
    key_for,
    make_pair,
    needs_native,
    packed,
    reference_protect,
    reference_unprotect,
    udp_packet,
)

pytestmark = needs_native

INNER = udp_packet(4, 100)
GCM_KEY = key_for("aes128gcm16")
V4 = dict(tunnel_src=packed("192.0.2.1"), tunnel_dst=packed("192.0.2.2"))


def test_reasons_are_the_python_engines() -> None:
    from ipsecstack.native import _engine

    python_reasons = {v for k, v in vars(Reason).items() if k.isupper()}
    assert set(_engine.REASONS) <= python_reasons
    assert len(set(_engine.REASONS)) == len(_engine.REASONS)
    assert _engine.OPENSSL_VERSION.startswith("OpenSSL")


# --- install / remove ------------------------------------------------------------------------------

BAD_INSTALLS = [
    pytest.param(dict(spi=0), "spi = 0: use 1..4294967295", id="spi-0"),
    pytest.param(dict(spi=1 << 32), "spi = 4294967296", id="spi-big"),
    pytest.param(dict(direction="sideways"), "use 'in' or 'out'", id="direction"),
    pytest.param(dict(transform="aes128"), "transform = 'aes128'", id="cbc-without-integrity"),
    pytest.param(dict(transform="3des-sha1"), "transform = '3des-sha1'", id="unknown-transform"),
    pytest.param(dict(key=GCM_KEY[:16]), "aes128gcm16 needs 20 bytes", id="key-length"),
    pytest.param(dict(mode="beet"), "mode = 'beet'", id="mode"),
    pytest.param(dict(tunnel_src=None), "tunnel_src = None: tunnel mode needs", id="no-tunnel-src"),
    pytest.param(dict(tunnel_dst=packed("2001:db8::2")), "same IP family", id="mixed-families"),
    pytest.param(dict(tunnel_src=b"\x01\x02\x03"), "packed address", id="address-length"),
    pytest.param(dict(replay_window=16), "at least 32", id="window-small"),
    pytest.param(dict(replay_window=(1 << 20) + 1), "use 0 (disabled) or 32..1048576", id="window-big"),
    pytest.param(dict(udp_encap=(0, 4500)), "udp_encap", id="encap-port-0"),
    pytest.param(dict(udp_encap=(4500,)), "give (source_port, destination_port)", id="encap-shape"),
    pytest.param(dict(ttl=0), "ttl = 0: use 1..255", id="ttl"),
    pytest.param(dict(ecn="always"), "ecn = 'always'", id="ecn"),
    pytest.param(dict(df="maybe"), "df = 'maybe'", id="df"),
    pytest.param(dict(seq=1 << 32), "seq = 4294967296", id="seq-without-esn"),
    pytest.param(dict(replay_top=-1), "replay_top = -1", id="replay-top"),
    pytest.param(dict(replay_top=10, replay_seen=[11]), "replay_seen = 11", id="seen-above-top"),
    pytest.param(dict(replay_top=1000, replay_seen=[900]), "replay_seen = 900", id="seen-below-window"),
    pytest.param(dict(hard_bytes=-5), "hard_bytes = -5", id="lifetime-negative"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INSTALLS)
def test_install_refuses_with_the_field_and_the_fix(change: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = dict(spi=SPI, direction="out", transform="aes128gcm16", key=GCM_KEY, **V4)
    args.update(change)
    eng = native.Engine()
    with pytest.raises(ValueError) as exc:
        eng.install(args.pop("spi"), args.pop("direction"), args.pop("transform"), args.pop("key"), **args)
    assert message in str(exc.value)
    assert eng.sas() == []


def test_install_type_errors() -> None:
    eng = native.Engine()
    with pytest.raises(TypeError):
        eng.install("1", "out", "aes128gcm16", GCM_KEY, **V4)
    with pytest.raises(TypeError):
        eng.install(1, "out", "aes128gcm16", GCM_KEY.hex(), **V4)
    with pytest.raises(TypeError):
        eng.install(1, "out", "aes128gcm16", GCM_KEY, soft_packets="3", **V4)
    with pytest.raises(TypeError):
        native.Engine(1)  # type: ignore[call-arg]


def test_install_remove_and_lookup() -> None:
    eng = native.Engine()
    eng.install(5, "out", "aes128gcm16", GCM_KEY, **V4)
    eng.install(5, "in", "aes128gcm16", GCM_KEY, **V4)  # the same SPI in the other direction is another SA
    with pytest.raises(ValueError, match="an outbound SA with this SPI is installed"):
        eng.install(5, "out", "aes128gcm16", GCM_KEY, **V4)
    for spi in range(6, 200):  # the table grows past its first size
        eng.install(spi, "in", "chacha20poly1305", key_for("chacha20poly1305"), mode="transport")
    assert sorted(eng.sas())[:2] == [("in", 5), ("in", 6)] and len(eng.sas()) == 196
    assert eng.stats()["sas"] == 196
    assert eng.remove("in", 5) and not eng.remove("in", 5)
    assert eng.remove("out", 5)
    with pytest.raises(KeyError, match="no outbound SA with SPI 0x00000005"):
        eng.protect(5, [INNER])
    with pytest.raises(KeyError):
        eng.sa_stats("out", 5)
    assert eng.unprotect([make_pair("aes128gcm16").engine.protect(SPI, [INNER])[0]]) == ["unknown_spi"]
    assert all(eng.remove("in", spi) for spi in range(6, 200)) and eng.sas() == []


def sa(direction: str, **kw: Any) -> SecurityAssociation:
    return SecurityAssociation(SPI, "esp", "tunnel", "aes128gcm16", GCM_KEY, direction=direction,  # type: ignore[arg-type]
                               tunnel_src="192.0.2.1", tunnel_dst="192.0.2.2", **kw)  # fmt: skip


def test_install_sa_refuses_what_the_engine_does_not_do() -> None:
    eng = native.Engine()
    ah = SecurityAssociation(SPI, "ah", "transport", "sha256", bytes(32), direction="out")
    cases: list[tuple[SecurityAssociation, str]] = [
        (ah, "protocol"),
        (sa("out", tfc_padding=16), "tfc_padding"),
        (sa("in", selectors=[Selector("10.1.0.0/16", "10.2.0.0/16")]), "selectors"),
        (SecurityAssociation(SPI, "esp", "transport", "aes128gcm16", GCM_KEY), "direction"),
    ]
    dead = sa("out", hard=Lifetime(packets=1))
    protect(dead, INNER)
    cases.append((dead, "hard lifetime expired"))
    for bad, field in cases:
        with pytest.raises(ConfigError, match=field):
            eng.install_sa(bad)
    assert eng.sas() == []
    eng.install_sa(sa("out", selectors=[Selector("10.1.0.0/16", "10.2.0.0/16")]))  # outbound: the SPD chose it


def test_install_sa_carries_the_state_over() -> None:
    """An SA moved from the Python engine continues its sequence numbers, window and lifetimes."""
    soft = Lifetime(packets=7)
    py_a = (sa("out", soft=soft), sa("in", soft=soft))  # these move to the native engine
    py_b = (sa("out", soft=soft), sa("in", soft=soft))  # these stay, to say what should happen
    seen = []
    for i in range(5):
        for tx, rx in (py_a, py_b):
            w = protect(tx, udp_packet(4, 10 + i))
            if i != 2:  # one packet was lost: its number stays free in the window
                assert unprotect(rx, w) == udp_packet(4, 10 + i)
        seen.append(w)
    eng = native.Engine()
    eng.install_sa(py_a[0])
    eng.install_sa(py_a[1])
    nxt = [udp_packet(4, 50), udp_packet(4, 51)]
    assert eng.protect(SPI, nxt) == [protect(py_b[0], p) for p in nxt]
    assert eng.sa_stats("out", SPI)["seq"] == py_b[0].seq == 7
    # the window came along: old packets are replays, the lost one is still welcome
    assert eng.unprotect([seen[0], seen[4], seen[2]]) == [
        reference_unprotect({SPI: py_b[1]}, seen[0]),
        reference_unprotect({SPI: py_b[1]}, seen[4]),
        reference_unprotect({SPI: py_b[1]}, seen[2]),
    ]
    assert eng.unprotect([seen[0], seen[4]]) == ["replay", "replay"]
    # 5 + 2 packets: the soft limit of 7 fired in the native engine, as it did in the Python one
    assert eng.take_events() == [("soft", "out", SPI, "packets")]
    assert [(e.kind, e.trigger) for e in py_b[0].take_events()] == [("soft", "packets")]


# --- lifetimes and events --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["packets", "bytes"])
@pytest.mark.parametrize("direction", ["out", "in"])
def test_soft_then_hard_events_as_python_fires_them(direction: str, which: str) -> None:
    n = len(INNER)
    soft = Lifetime(packets=3) if which == "packets" else Lifetime(bytes=3 * n - 10)
    hard = Lifetime(packets=5) if which == "packets" else Lifetime(bytes=5 * n - 10)
    pair = make_pair("aes256-sha256", soft=soft, hard=hard)
    sender = make_pair("aes256-sha256")
    pkts = [INNER] * 7 if direction == "out" else [protect(sender.tx, INNER) for _ in range(7)]
    ref_sa = pair.tx if direction == "out" else pair.rx
    for p in pkts:
        if direction == "out":
            ref, got = reference_protect(pair.tx, p), pair.engine.protect(SPI, [p])[0]
        else:
            ref, got = reference_unprotect({SPI: pair.rx}, p), pair.engine.unprotect([p])[0]
        assert got == ref
    events = pair.engine.take_events()
    assert [(e.kind, e.trigger) for e in events] == [(e.kind, e.trigger) for e in ref_sa.take_events()]
    assert [(e.kind, e.direction, e.spi) for e in events] == [("soft", direction, SPI), ("hard", direction, SPI)]
    assert [e.trigger for e in events] == [which, which]
    assert pair.engine.sa_stats(direction, SPI)["dead"] is True
    assert pair.engine.take_events() == []


@pytest.mark.parametrize("esn", [False, True])
def test_sequence_number_nearly_exhausted(esn: bool) -> None:
    seq_max = (1 << 64) - 1 if esn else (1 << 32) - 1
    pair = make_pair("chacha20poly1305", esn=esn, tx_seq=seq_max - SEQ_SOFT_MARGIN - 2)
    for _ in range(3):
        assert pair.engine.protect(SPI, [INNER]) == [reference_protect(pair.tx, INNER)]
        if pair.engine.sa_stats("out", SPI)["seq"] < seq_max - SEQ_SOFT_MARGIN:
            assert pair.engine.take_events() == []
    assert pair.engine.take_events() == [("soft", "out", SPI, "seq")]
    assert [(e.kind, e.trigger) for e in pair.tx.take_events()] == [("soft", "seq")]


def test_expire_time_lifetimes() -> None:
    pair = make_pair("aes128gcm16")
    assert pair.engine.expire("out", SPI, False) and pair.engine.expire("out", SPI, False)  # soft fires once
    assert pair.engine.take_events() == [("soft", "out", SPI, "seconds")]
    assert pair.engine.expire("out", SPI, True)
    assert pair.engine.protect(SPI, [INNER]) == ["sa_expired"]
    assert pair.engine.expire("in", SPI, True) and pair.engine.expire("out", SPI, False)  # no soft once dead
    assert pair.engine.take_events() == [("hard", "out", SPI, "seconds"), ("hard", "in", SPI, "seconds")]
    assert not pair.engine.expire("in", SPI + 1, True)


def test_move_follows_the_peer_under_the_sa_lock() -> None:
    """RFC 7296 §2.23: a new outer destination and NAT port for an outbound SA, nothing else changes."""
    pair = make_pair("aes128gcm16", encap=(4500, 4500))
    (first,) = pair.engine.protect(SPI, [INNER])
    assert isinstance(first, bytes) and first[16:20] == packed("192.0.2.2")
    pair.engine.move(SPI, packed("198.51.100.7"), 40000)
    (moved,) = pair.engine.protect(SPI, [INNER])
    assert isinstance(moved, bytes) and moved[16:20] == packed("198.51.100.7") and moved[22:24] == b"\x9c\x40"
    assert moved[12:16] == first[12:16] and moved[32:36] == (2).to_bytes(4, "big")
    pair.engine.move(SPI, dport=4500)  # the port alone
    (back,) = pair.engine.protect(SPI, [INNER])
    assert isinstance(back, bytes) and back[16:20] == packed("198.51.100.7") and back[22:24] == b"\x11\x94"
    with pytest.raises(ValueError, match="address family"):
        pair.engine.move(SPI, packed("2001:db8::1"))
    with pytest.raises(ValueError, match="UDP port"):
        pair.engine.move(SPI, dport=0)
    with pytest.raises(KeyError):
        pair.engine.move(SPI + 1, dport=4500)
    with pytest.raises(TypeError):
        pair.engine.move(SPI, "198.51.100.7")  # type: ignore[arg-type]


def test_event_queue_is_bounded() -> None:
    from ipsecstack.native import _engine

    eng = native.Engine()
    n = _engine.EVENT_QUEUE + 3
    for spi in range(1, n + 1):
        eng.install(spi, "out", "aes128gcm16", GCM_KEY, hard_packets=0, **V4)
        assert eng.protect(spi, [INNER])[0] != "sa_expired"  # the packet crossing the hard limit leaves
    events = eng.take_events()
    assert len(events) == _engine.EVENT_QUEUE and events[0] == ("hard", "out", 1, "packets")
    assert eng.stats()["events_lost"] == 3
    assert eng.protect(1, [INNER]) == ["sa_expired"]


# --- batch arguments -------------------------------------------------------------------------------


def test_batch_arguments() -> None:
    pair = make_pair("aes128gcm16")
    a, b = make_pair("aes128gcm16"), make_pair("aes128gcm16")
    as_bytes = a.engine.protect(SPI, [INNER, INNER])
    assert b.engine.protect(SPI, (bytearray(INNER), memoryview(INNER))) == as_bytes
    assert pair.engine.protect(SPI, []) == [] and pair.engine.unprotect(()) == []
    with pytest.raises(TypeError, match="list or tuple"):
        pair.engine.protect(SPI, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"packets\[1\] is not a bytes-like object"):
        pair.engine.unprotect([INNER, 5])
    with pytest.raises(ValueError, match="16 per packet"):
        pair.engine.protect(SPI, [INNER], rand=b"x" * 15)
    assert pair.engine.stats()["out_packets"] == 0  # refused calls touch nothing


def test_datagrams_longer_than_ip_allows() -> None:
    """Bytes past any IP length are never copied, but charged, as the Python engine charges them."""
    pair = make_pair("aes128gcm16", "transport")
    pkt = udp_packet(4, 60, transport=True) + bytes(70000)
    assert pair.engine.protect(SPI, [pkt]) == [reference_protect(pair.tx, pkt)]
    assert pair.engine.sa_stats("out", SPI)["bytes"] == pair.tx.bytes == len(pkt)
    wire = protect(make_pair("aes128gcm16", "transport").tx, udp_packet(4, 60, transport=True))
    assert pair.engine.unprotect([wire + bytes(70000)]) == [udp_packet(4, 60, transport=True)]


def test_cbc_ivs_differ_without_an_injected_rng() -> None:
    """Without test-mode seeds the CBC IVs come from OpenSSL's CSPRNG: fresh per packet and per SA."""
    eng = native.Engine()
    key = key_for("aes128-sha256")
    for spi in (1, 2):
        eng.install(spi, "out", "aes128-sha256", key, **V4)
    ivs = [w[28:44] for spi in (1, 2) for w in eng.protect(spi, [INNER] * 50)]
    assert len(set(ivs)) == 100


# --- threads ---------------------------------------------------------------------------------------


def test_gil_is_released_during_the_crypto_loop() -> None:
    """While one thread protects a long batch, another runs Python code in the middle of that call."""
    pair = make_pair("aes256-sha512")
    batch = [udp_packet(4, 1400)] * 4000

    def work(span: list[int], batch: list[bytes]) -> None:
        span.append(time.perf_counter_ns())
        pair.engine.protect(SPI, batch)
        span.append(time.perf_counter_ns())

    for _attempt in range(5):
        ticks: list[int] = []
        span: list[int] = []
        t = threading.Thread(target=work, args=(span, batch))
        t.start()
        while t.is_alive():
            ticks.append(time.perf_counter_ns())
        t.join()
        start, end = span
        quarter = (end - start) // 4
        if sum(start + quarter < x < end - quarter for x in ticks) > 10:
            return
        batch = batch * 2  # a loaded machine: a longer call makes the middle of it easier to see
    pytest.fail("no Python code ran in the middle of a protect call: the GIL stays held")


def test_concurrent_batches_installs_and_reads() -> None:
    """Protect, unprotect, install/remove of other SAs and counter reads from four threads at once."""
    pair = make_pair("aes128gcm16", replay_window=4096)
    sender = make_pair("aes128gcm16")
    inbound = [protect(sender.tx, udp_packet(4, i % 300)) for i in range(2000)]
    errors: list[BaseException] = []
    results: dict[str, list[Any]] = {"out": [], "in": []}

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                errors.append(e)

        return run

    def outbound() -> None:
        for _ in range(40):
            results["out"].extend(pair.engine.protect(SPI, [INNER] * 50))

    def inbound_() -> None:
        for i in range(0, 2000, 50):
            results["in"].extend(pair.engine.unprotect(inbound[i : i + 50]))

    def churn() -> None:
        for spi in range(10_000, 10_300):
            pair.engine.install(spi, "in", "aes128gcm16", GCM_KEY, **V4)
            pair.engine.sa_stats("in", spi)
            pair.engine.stats()
            assert pair.engine.remove("in", spi)

    threads = [threading.Thread(target=guarded(f)) for f in (outbound, inbound_, churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results["out"]) == 2000 and all(isinstance(w, bytes) for w in results["out"])
    assert pair.engine.sa_stats("out", SPI)["seq"] == 2000
    assert results["in"] == [udp_packet(4, i % 300) for i in range(2000)]
    rx = make_pair("aes128gcm16", replay_window=4096).rx
    assert sorted(int.from_bytes(w[24:28], "big") for w in results["out"]) == list(range(1, 2001))
    assert all(unprotect(rx, w) == INNER for w in sorted(results["out"], key=lambda w: w[24:28]))


# --- "seen" reports ---------------------------------------------------------------------------------


def _inbound_sas(n: int) -> tuple[Any, list[SecurityAssociation]]:
    """An engine with ``n`` inbound tunnel SAs (SPIs 1..n), and the Python outbound SAs that feed them."""
    from ipsecstack.native import Engine

    eng, senders = Engine(), []
    for spi in range(1, n + 1):
        opts: dict[str, Any] = dict(key=GCM_KEY, tunnel_src="192.0.2.1", tunnel_dst="192.0.2.2")
        eng.install_sa(SecurityAssociation(spi, "esp", "tunnel", "aes128gcm16", direction="in", **opts))
        senders.append(SecurityAssociation(spi, "esp", "tunnel", "aes128gcm16", direction="out", **opts))
    return eng, senders


def _send(senders: list[SecurityAssociation]) -> list[bytes]:
    return [protect(sa, INNER) for sa in senders]


def test_seen_once_per_sa_until_rearmed() -> None:
    eng, senders = _inbound_sas(2)
    assert eng.take_events() == [] and eng.take_seen() == []
    assert all(isinstance(r, bytes) for r in eng.unprotect(_send(senders) + _send(senders[:1])))
    assert eng.take_events() == []  # seen events are not lifetime events
    assert eng.take_seen() == [1, 2] and eng.take_seen() == []
    eng.rearm_seen([1, 99])  # an SPI not installed is skipped
    eng.rearm_seen(())
    eng.unprotect(_send(senders))
    eng.take_events()
    assert eng.take_seen() == [1]
    for bad in ([0], [1 << 32], ["1"], 5):
        with pytest.raises((ValueError, TypeError, OverflowError)):
            eng.rearm_seen(bad)


def test_seen_events_leave_room_for_lifetime_events() -> None:
    """Seen events may fill only half the engine's queue: a lifetime event still gets in, and the SAs that
    found no room report with their next packet instead."""
    from ipsecstack.native import _engine

    half = _engine.EVENT_QUEUE // 2
    eng, senders = _inbound_sas(half + 20)
    eng.unprotect(_send(senders))
    assert eng.expire("in", 1, False)
    assert eng.take_events() == [("soft", "in", 1, "seconds")]
    assert eng.take_seen() == list(range(1, half + 1))
    assert eng.stats()["events_lost"] == 0
    eng.unprotect(_send(senders))
    eng.take_events()
    assert eng.take_seen() == list(range(half + 1, half + 21))
