"""The native forwarder (Engine.fwd_start and friends) between two engines on loopback, without root.

A socketpair end stands in for each TUN device, a UDP socket on 127.0.0.1 is each outer plane; the
test plays Python's part (answering punts, teaching flows) the way the daemon does.
"""

from __future__ import annotations

import os
import random
import socket
import time

import pytest

from backends.udp import UdpEncapPort
from ipsecstack.sa import Lifetime
from ipsecstack.xform import esp as esp_xform
from tests.native.fwd_helpers import LOOP, SPI_AB, SPI_BA, Peer, make_peer, peers, readable, take, wait_until
from tests.native.native_helpers import needs_native, other_packets, udp_packet

pytestmark = needs_native

PKT = udp_packet(4, 100)


def teach_path(a: Peer, b: Peer, pkt: bytes) -> None:
    """First packet of a flow: punted on A, learned; then punted on B after decryption, learned."""
    a.send_inner(pkt)
    assert take(a, 1) == [("out", pkt)]
    a.engine.learn_out(pkt, SPI_AB)
    a.send_inner(pkt)
    assert take(b, 1) == [("in", SPI_AB, pkt)]
    b.engine.learn_in(SPI_AB, pkt)


def test_round_trip_learn_then_forward_byte_identical() -> None:
    with peers() as (a, b):
        teach_path(a, b, PKT)
        a.send_inner(PKT, 20)
        got = [b.recv_inner() for _ in range(20)]
        assert got == [PKT] * 20
        # and the other direction, with other protocols (TCP, ICMP, UDP without checksum)
        for pkt in other_packets(4):
            rev = pkt[:12] + pkt[16:20] + pkt[12:16] + pkt[20:]  # (checksums are not the engine's business)
            b.send_inner(rev)
            assert take(b, 1) == [("out", rev)]
            b.engine.learn_out(rev, SPI_BA)
            b.send_inner(rev)
            assert take(a, 1) == [("in", SPI_BA, rev)]
            a.engine.learn_in(SPI_BA, rev)
            b.send_inner(rev)
            assert a.recv_inner() == rev
        st_a, st_b = a.engine.fwd_stats(), b.engine.fwd_stats()
        assert st_a["running"] and st_b["running"]
        assert st_a["out_packets"] == 21 and st_b["in_packets"] == 20
        assert st_a["punts"] == {"out": 1, "in": 3, "outer": 0}
        assert st_b["punts"] == {"out": 3, "in": 1, "outer": 0}
        assert st_a["cache"]["out"]["entries"] == 1 and st_a["cache"]["out"]["hits"] == 21
        assert st_b["cache"]["in"]["hits"] == 20
        # charged where Engine.stats()/sa_stats() count (the Python mirror in native/link.py reads these)
        assert a.engine.stats()["out_packets"] == 21 and b.engine.stats()["in_packets"] == 21
        assert a.engine.sa_stats("out", SPI_AB)["packets"] == 21
        assert b.engine.sa_stats("in", SPI_AB)["packets"] == 21
        assert b.engine.sa_stats("in", SPI_AB)["replay_top"] == 21
        assert a.engine.sa_stats("out", SPI_AB)["bytes"] == 21 * len(PKT)
        assert st_a["drops"] == {} and st_b["drops"] == {}


def test_protected_bytes_decrypt_with_the_python_reference() -> None:
    with peers() as (a, b):
        b.engine.fwd_stop()  # B's socket is read here, as UdpEncapPort.read_batch reads it
        a.send_inner(PKT)
        take(a, 1)
        a.engine.learn_out(PKT, SPI_AB)
        pkts = [udp_packet(4, n, tos=0xB9) for n in (0, 1, 17, 500, 1400)]
        for p in pkts:
            a.send_inner(p)
        wait_until(lambda: readable(b.port.fileno(), 0), what="ESP at B")
        time.sleep(0.05)
        wire = b.port.read_batch(64)
        assert len(wire) == len(pkts)
        ref = b.sas["in"]
        for w, p in zip(wire, pkts, strict=True):
            assert w[1] & 0xFC == 0xB8  # DSCP copied to the outer header, carried with IP_TOS
            version, off, nh_field, end, udp = esp_xform.locate(w)
            assert udp
            assert esp_xform.unprotect_located(ref, w, version, off, nh_field, end, udp) == p


def test_discard_flows_are_dropped_and_counted() -> None:
    with peers() as (a, _b):
        a.send_inner(PKT)
        take(a, 1)
        a.engine.learn_out(PKT, None)
        a.send_inner(PKT, 5)
        wait_until(lambda: a.engine.fwd_stats()["drops"].get("policy_discard") == 5, what="5 discards")
        assert a.engine.take_punts() == []
        assert a.engine.stats()["drops"]["policy_discard"] == 5


def test_flush_and_sa_removal_make_flows_punt_again() -> None:
    with peers() as (a, b):
        teach_path(a, b, PKT)
        a.engine.flush()
        a.send_inner(PKT)
        assert take(a, 1) == [("out", PKT)]
        b.engine.flush()
        a.engine.learn_out(PKT, SPI_AB)
        a.send_inner(PKT)
        assert take(b, 1) == [("in", SPI_AB, PKT)]
        assert a.engine.fwd_stats()["cache"]["flushes"] == 1
        assert a.engine.fwd_stats()["cache"]["out"]["entries"] == 1
        assert a.engine.remove("out", SPI_AB)
        a.send_inner(PKT)
        assert take(a, 1) == [("out", PKT)]  # the cached SA is gone: Python decides
        assert b.engine.remove("in", SPI_AB)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        esp = (SPI_AB).to_bytes(4, "big") + bytes(40)
        sock.sendto(esp, (LOOP, b.port.port))
        (kind, pkt), = take(b, 1)  # fmt: skip
        assert kind == "outer" and pkt.endswith(esp)
        sock.close()


def expected_read_batch(sender: socket.socket, data: bytes, port: int) -> bytes:
    """What UdpEncapPort.read_batch returns for ``data`` from ``sender``: asked of a real port."""
    ref = UdpEncapPort(LOOP, 0)
    try:
        sender.sendto(data, (LOOP, ref.port))
        wait_until(lambda: readable(ref.fileno(), 0), what="the reference datagram")
        (pkt,) = ref.read_batch(4)
    finally:
        ref.close()
    return pkt[:22] + port.to_bytes(2, "big") + pkt[24:]  # (the bound port is the only difference)


def test_ike_unknown_spi_and_keepalive_on_the_udp_socket() -> None:
    with peers() as (_a, b):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind((LOOP, 0))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
        try:
            ike = bytes(4) + b"IKE message" * 5
            unknown = (0xDEAD).to_bytes(4, "big") + bytes(range(60))
            for d in (ike, unknown, b"\xff"):
                sender.sendto(d, (LOOP, b.port.port))
            got = take(b, 2)
            assert got == [
                ("outer", expected_read_batch(sender, ike, b.port.port)),
                ("outer", expected_read_batch(sender, unknown, b.port.port)),
            ]
            wait_until(lambda: b.engine.fwd_stats()["drops"].get("nat_keepalive") == 1, what="keepalive")
        finally:
            sender.close()


def test_punt_queue_overflow_is_counted_and_bounded() -> None:
    with peers(punt_capacity=8) as (a, _b):
        a.send_inner(PKT, 50)
        wait_until(lambda: a.engine.fwd_stats()["punt_dropped"] == 42, what="42 punts dropped")
        st = a.engine.fwd_stats()
        assert st["punt_waiting"] == 8 and st["punts"]["out"] == 8
        assert len(a.engine.take_punts(max=3)) == 3
        assert len(a.engine.take_punts()) == 5
        assert not readable(a.eventfd, 0)  # empty: the eventfd was read back


def test_eventfd_signals_once_per_burst_and_resets() -> None:
    with peers() as (a, _b):
        assert not readable(a.eventfd, 0)
        a.send_inner(PKT, 10)
        wait_until(lambda: a.engine.fwd_stats()["punt_waiting"] == 10, what="10 punts")
        assert readable(a.eventfd, 1)
        assert os.read(a.eventfd, 8) == (1).to_bytes(8, "little")  # one write for the burst
        assert len(a.engine.take_punts()) == 10
        assert not readable(a.eventfd, 0)


def test_garbage_is_counted_and_never_crashes() -> None:
    rnd = random.Random(7)
    with peers() as (a, b):
        teach_path(a, b, PKT)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(400):
                n = rnd.randrange(0, 200)
                data = bytearray(rnd.randbytes(n))
                if i % 3 == 0 and n >= 8:
                    data[:4] = SPI_AB.to_bytes(4, "big")  # a known SPI: into the crypto, refused there
                sender.sendto(bytes(data), (LOOP, b.port.port))
                a.app.send(rnd.randbytes(rnd.randrange(0, 100)))
            wait_until(lambda: b.engine.fwd_stats()["batches_in"] > 0, what="B reading")
            time.sleep(0.3)
            punts_a = a.engine.take_punts(max=10000)
            assert all(p[0] == "out" for p in punts_a)
            drops = b.engine.fwd_stats()["drops"]
            assert drops.get("bad_icv", 0) + drops.get("replay", 0) > 0
            # still forwarding
            a.send_inner(PKT)
            assert b.recv_inner() == PKT
        finally:
            sender.close()


def test_fwd_stop_is_bounded_and_idempotent() -> None:
    a = make_peer("A")
    try:
        a.start()
        t = time.monotonic()
        a.engine.fwd_stop()
        a.engine.fwd_stop()
        assert time.monotonic() - t < 1.0
        assert a.engine.fwd_stats()["running"] is False
        assert a.engine.take_punts() == []
        a.start()  # again, after a stop
        a.send_inner(PKT)
        assert take(a, 1) == [("out", PKT)]
        a.send_inner(PKT, 3)
        wait_until(lambda: a.engine.fwd_stats()["punt_waiting"] == 3, what="3 punts")
    finally:
        a.close()  # stops with punts pending: they are freed
    # dealloc of a running forwarder stops it
    c = make_peer("C")
    c.start()
    eng = c.engine
    c.engine = None
    t = time.monotonic()
    del eng
    assert time.monotonic() - t < 1.0
    c.port.close()
    c.tun.close()
    c.app.close()


def test_lifetime_events_wake_the_eventfd() -> None:
    with peers(out_kw={"hard": Lifetime(packets=3)}) as (a, _b):
        a.send_inner(PKT)
        take(a, 1)
        a.engine.learn_out(PKT, SPI_AB)
        a.send_inner(PKT, 5)
        wait_until(lambda: readable(a.eventfd, 0), what="the eventfd")
        wait_until(lambda: a.engine.fwd_stats()["drops"].get("sa_expired") == 2, what="2 refused")
        assert a.engine.poll_events() == [("hard", "out", SPI_AB, "packets")]
        assert a.engine.take_punts() == []
        assert not readable(a.eventfd, 0)
        assert a.engine.sa_stats("out", SPI_AB)["dead"]


def test_uncacheable_packets_always_punt_and_learning_them_is_a_no_op() -> None:
    frag = bytearray(PKT)
    frag[6] = 0x20  # MF
    with peers() as (a, _b):
        a.engine.learn_out(bytes(frag), SPI_AB)
        a.engine.learn_out(b"\x45", SPI_AB)
        assert a.engine.fwd_stats()["cache"]["out"]["entries"] == 0
        a.send_inner(bytes(frag), 2)
        assert take(a, 2) == [("out", bytes(frag))] * 2


def test_start_errors_are_clear() -> None:
    a = make_peer("A")
    try:
        fd = a.port.fileno()
        with pytest.raises(ValueError, match="kind 'udp5'"):
            a.engine.fwd_start(a.tun.fileno(), [("udp5", fd)])
        with pytest.raises(ValueError, match="second udp4"):
            a.engine.fwd_start(a.tun.fileno(), [("udp4", fd), ("udp4", fd)])
        with pytest.raises(ValueError, match="AF_INET6"):
            a.engine.fwd_start(a.tun.fileno(), [("udp6", fd)])
        with pytest.raises(OSError, match="tun_fd"):
            a.engine.fwd_start(10**6, [])
        os.set_blocking(a.app.fileno(), True)
        with pytest.raises(ValueError, match="blocking"):
            a.engine.fwd_start(a.app.fileno(), [])
        with pytest.raises(ValueError, match="batch"):
            a.engine.fwd_start(a.tun.fileno(), [], batch=0)
        with pytest.raises(TypeError):
            a.engine.fwd_start(a.tun.fileno(), ["udp4"])
        with pytest.raises(ValueError, match="SPI 0"):
            a.engine.learn_out(PKT, 0)
        a.start()
        with pytest.raises(ValueError, match="already running"):
            a.start()
    finally:
        a.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: raw ESP and IPPROTO_RAW sockets (CI runs as root)")
def test_raw_esp_send_and_receive_and_outer_punts_like_rawport() -> None:
    from backends.rawsock import RawPort
    from ipsecstack import SecurityAssociation
    from tests.native.native_helpers import key_for

    key = key_for("aes128gcm16", 5)
    spi = 0x0E5B0001
    a, b = make_peer("A"), make_peer("B")
    tx, rx4 = RawPort(4, protocols=(50,)), RawPort(4, local=LOOP, protocols=(50,))
    rx6, ref4, ref6 = RawPort(6, local="::1", protocols=(50,)), RawPort(4, protocols=(50,)), RawPort(6, protocols=(50,))
    try:
        for p, d in ((a, "out"), (b, "in")):
            sa = SecurityAssociation(
                spi, "esp", "tunnel", "aes128gcm16", key, direction=d, tunnel_src=LOOP, tunnel_dst=LOOP
            )
            p.engine.install_sa(sa)
        a.eventfd = a.engine.fwd_start(a.tun.fileno(), [("raw4", tx.send_fd())])
        esp4, esp6 = rx4.receive_fds()[0][1], rx6.receive_fds()[0][1]
        b.eventfd = b.engine.fwd_start(b.tun.fileno(), [("esp4", esp4), ("esp6", esp6)])
        a.engine.learn_out(PKT, spi)
        b.engine.learn_in(spi, PKT)
        a.send_inner(PKT, 3)
        assert [b.recv_inner() for _ in range(3)] == [PKT] * 3
        # A counts its round after the send, which B may have received first: wait for the counter
        wait_until(lambda: a.engine.fwd_stats()["out_packets"] == 3, what="A's round counted")
        # ESP for an SPI B does not hold: punted whole, as RawPort.read_batch gives it (v4 and v6)
        junk = (0xBEEF).to_bytes(4, "big") + bytes(range(30))
        for fam, dst in ((socket.AF_INET, LOOP), (socket.AF_INET6, "::1")):
            s = socket.socket(fam, socket.SOCK_RAW, 50)
            s.sendto(junk, (dst, 0))
            s.close()
        got = take(b, 2)
        wait_until(lambda: readable(ref6.receive_fds()[0][1], 0), what="the reference copy")
        ref = [p for p in ref4.read_batch(64) + ref6.read_batch(64) if p.endswith(junk)]
        assert sorted(got) == sorted(("outer", r) for r in ref)  # (the two sockets are read in either order)
    finally:
        a.close()
        b.close()
        for port in (tx, rx4, rx6, ref4, ref6):
            port.close()
