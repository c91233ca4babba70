"""Two IKE SAs in one process, seeded rng, fake clock, datagrams moved by hand (DESIGN.md §6 layer 2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecstack import SecurityAssociation, protect, unprotect
from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import Protocol
from ipsecstack.ike.session import ChildConfig, ChildUp, IkeDown, IkeSa, IkeUp, identity
from tests.ike.helpers import A, B, Wire, child_events, ike_config, pump_managers, sa_events, ts_range
from tests.packets import tcp4


@pytest.mark.parametrize(
    ("ike", "esp", "chosen"),
    [
        ("aes128gcm16-prfsha256-x25519", "aes128gcm16", "aes128gcm16-prfsha256-curve25519"),
        ("aes256-sha256-modp2048", "aes256-sha256", "aes256-sha256-prfsha256-modp2048"),
        ("chacha20poly1305-prfsha512-ecp256", "chacha20poly1305", "chacha20poly1305-prfsha512-ecp256"),
        ("aes256gcm16-prfsha384-ecp384", "aes256gcm16-esn", "aes256gcm16-prfsha384-ecp384"),
    ],
)
def test_handshake_installs_matching_child_sas(ike: str, esp: str, chosen: str) -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16", ike=ike, esp=esp),
             ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16", ike=ike, esp=esp))  # fmt: skip
    w.run()
    ev_i, ev_r = sa_events(w.i), sa_events(w.r)
    assert [type(e) for e in ev_i] == [IkeUp, ChildUp] and [type(e) for e in ev_r] == [IkeUp, ChildUp]
    ci, cr = ev_i[1], ev_r[1]
    assert isinstance(ci, ChildUp) and isinstance(cr, ChildUp)
    assert (ci.spi_out, ci.spi_in) == (cr.spi_in, cr.spi_out)
    assert ci.key_out == cr.key_in and ci.key_in == cr.key_out and ci.key_in != ci.key_out
    assert ci.transform == cr.transform and ci.esn == cr.esn == esp.endswith("esn")
    assert [str(r) for r in ci.local_ts] == ["10.1.0.0/16"] and [str(r) for r in cr.local_ts] == ["10.2.0.0/16"]
    assert w.i.chosen is not None and w.i.chosen.describe() == chosen
    # the negotiated keys really carry traffic: A protects, B unprotects
    sa_out = SecurityAssociation(ci.spi_out, "esp", "tunnel", ci.transform, ci.key_out, tunnel_src=A, tunnel_dst=B,
                                 esn=ci.esn)  # fmt: skip
    sa_in = SecurityAssociation(cr.spi_in, "esp", "tunnel", cr.transform, cr.key_in, tunnel_src=A, tunnel_dst=B,
                                esn=cr.esn)  # fmt: skip
    pkt = tcp4("10.1.0.5", "10.2.0.9")
    assert unprotect(sa_in, protect(sa_out, pkt)) == pkt


def test_responder_narrows_traffic_selectors() -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.0.0.0/8"), ike_config(B, A, "10.2.0.0/24", "10.1.0.0/16"))
    w.run()
    ci = next(e for e in sa_events(w.i) if isinstance(e, ChildUp))
    assert [str(r) for r in ci.remote_ts] == ["10.2.0.0/24"]


def test_wrong_psk_fails_on_both_sides() -> None:
    w = Wire(
        ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16", psk=b"one"),
        ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16", psk=b"two"),
    )
    w.run()
    down_i = [e for e in sa_events(w.i) if isinstance(e, IkeDown)]
    down_r = [e for e in sa_events(w.r) if isinstance(e, IkeDown)]
    assert down_i and "AUTHENTICATION_FAILED" in down_i[0].reason
    assert down_r and "PSK" in down_r[0].reason
    assert w.r is not None and w.r.stats.get("auth_failed") == 1


def test_identity_mismatch() -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"),
             ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16", remote_id="someone@else.example"))  # fmt: skip
    w.run()
    assert any(isinstance(e, IkeDown) and "identity" in e.reason for e in sa_events(w.r))


def test_no_proposal_chosen() -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16", ike="aes128gcm16-prfsha256-x25519"),
             ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16", ike="aes256-sha512-modp4096"))  # fmt: skip
    w.run()
    downs = [e for e in sa_events(w.i) if isinstance(e, IkeDown)]
    assert downs and "NO_PROPOSAL_CHOSEN" in downs[0].reason
    assert w.r is not None and "no IKE proposal in common" in w.r.failure
    assert (
        "peer offered aes128gcm16-prfsha256-curve25519" in w.r.failure and "ours aes256-sha512-modp4096" in w.r.failure
    )


def test_invalid_ke_payload_retry() -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16", ike="aes128gcm16-prfsha256-x25519-ecp256"),
             ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16", ike="aes128gcm16-prfsha256-ecp256"))  # fmt: skip
    w.run()
    assert any(isinstance(e, ChildUp) for e in sa_events(w.i))
    assert w.i.chosen is not None and w.i.chosen.dh is not None and w.i.chosen.dh.number == 19
    assert len([d for way, d in w.log if way == "i->r" and m.decode(d.data).exchange == 34]) == 2


def test_transport_mode_child() -> None:
    w = Wire(
        ike_config(A, B, A + "/32", B + "/32", mode="transport"),
        ike_config(B, A, B + "/32", A + "/32", mode="transport"),
    )
    w.run()
    ci = next(e for e in sa_events(w.i) if isinstance(e, ChildUp))
    assert ci.mode == "transport"


def test_retransmission_and_cached_response() -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.i.start(0.0)
    w.to_responder(w.i.datagrams(), 0.0)
    w.to_initiator(w.r.datagrams(), 0.0)  # type: ignore[union-attr]
    auth_req = w.i.datagrams()
    w.to_responder(auth_req, 0.1)
    lost = w.r.datagrams()  # type: ignore[union-attr]  # the IKE_AUTH response is lost
    assert w.i.get_timer() == pytest.approx(2.0)
    w.i.handle_timer(2.0)
    again = w.i.datagrams()
    assert [d.data for d in again] == [d.data for d in auth_req]
    w.to_responder(again, 2.0)
    resent = w.r.datagrams()  # type: ignore[union-attr]
    assert [d.data for d in resent] == [d.data for d in lost]  # byte-identical cached response
    assert [type(e) for e in sa_events(w.r)].count(ChildUp) == 1  # processed once
    w.to_initiator(resent, 2.1)
    assert any(isinstance(e, ChildUp) for e in sa_events(w.i))
    assert w.i.stats["retransmissions"] == 1


def test_gives_up_when_the_peer_is_silent() -> None:
    sa = IkeSa(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), initiator=True, rng=seeded_rng(5), now=0.0)
    sa.start(0.0)
    sent = len(sa.datagrams())
    for _ in range(20):
        t = sa.get_timer()
        if t is None:
            break
        sa.handle_timer(t)
        sent += len(sa.datagrams())
    assert sent == 6  # first transmission + 5 retransmissions, with exponential back-off
    downs = [e for e in sa.events() if isinstance(e, IkeDown)]
    assert downs and "did not answer" in downs[0].reason


def test_half_open_responder_times_out() -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.i.start(0.0)
    w.to_responder(w.i.datagrams(), 0.0)
    assert w.r is not None and w.r.get_timer() == 30.0
    w.r.handle_timer(30.0)
    assert any(isinstance(e, IkeDown) and "half-open" in e.reason for e in sa_events(w.r))


def test_delete_closes_both_sides() -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.run()
    sa_events(w.i), sa_events(w.r)
    w.i.delete(5.0)
    w.run(5.0)
    assert w.i.state == "closed" and w.r is not None and w.r.state == "closed"
    kinds_r = [type(e).__name__ for e in sa_events(w.r)]
    assert kinds_r == ["ChildDown", "IkeDown"]


def test_nat_moves_to_port_4500_and_encapsulates() -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.src_seen_by_r = "198.51.100.7"  # a NAT rewrote the initiator's address
    w.cfg_r.remote_addr = None
    w.run()
    auth = [d for way, d in w.log if m.decode(d.data).exchange == 35]
    assert auth and all(d.src_port == 4500 and d.dst_port == 4500 for d in auth)
    ci = next(e for e in sa_events(w.i) if isinstance(e, ChildUp))
    assert ci.encap == (4500, 4500)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 400), st.binary(max_size=12)), max_size=6))
def test_garbage_in_any_state_never_raises(mutations: list[tuple[int, int, bytes]]) -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.run()
    pool = [d.data for _, d in w.log]
    for idx, cut, noise in mutations:
        base = pool[idx % len(pool)]
        bad = base[:cut] + noise + base[cut + len(noise) :]
        for sa in (w.i, w.r):
            assert sa is not None
            sa.receive(bad, B, 500, 500, 1.0)
            sa.datagrams()
    assert w.i.state in ("established", "closed")


@pytest.mark.parametrize("esp", ["aes128gcm16", "aes256-sha256-ecp256"])  # the second one with PFS
def test_child_rekey_make_before_break(esp: str) -> None:
    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16", esp=esp)
    cfg_i.children[0].rekey_time = 100.0
    w = Wire(cfg_i, ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16", esp=esp))
    w.run()
    old_i = next(e for e in sa_events(w.i) if isinstance(e, ChildUp))
    old_r = next(e for e in sa_events(w.r) if isinstance(e, ChildUp))
    assert old_i.rekey_at is not None and 90.0 <= old_i.rekey_at <= 100.0  # up to 10% early (jitter)
    t = w.i.get_timer()
    assert t == old_i.rekey_at
    w.i.handle_timer(t)
    w.run(t)
    ev_i, ev_r = child_events(w.i), child_events(w.r)
    # new pair up first, then the old one retired (make-before-break, RFC 7296 §2.8)
    assert [type(e).__name__ for e in ev_i] == ["ChildUp", "ChildDown"]
    assert [type(e).__name__ for e in ev_r] == ["ChildUp", "ChildDown"]
    new_i, new_r = ev_i[0], ev_r[0]
    assert isinstance(new_i, ChildUp) and isinstance(new_r, ChildUp)
    assert new_i.replaces == old_i.spi_in and new_r.replaces == old_r.spi_in
    # §2.8: the runtime holds back the responder's new outbound SA until the initiator is surely ready
    assert new_i.initiated and not new_r.initiated
    assert new_i.key_out == new_r.key_in and new_i.key_in == new_r.key_out
    assert new_i.key_out != old_i.key_out and new_i.spi_out == new_r.spi_in
    assert ev_i[1].spi_in == old_i.spi_in and ev_r[1].spi_in == old_r.spi_in  # type: ignore[attr-defined]
    assert [c.spi_in for c in w.i.children] == [new_i.spi_in]
    assert w.i.stats["child_rekeys"] == 1 and w.r is not None and w.r.stats["child_rekeys"] == 1


def test_dpd_detects_a_dead_peer_and_a_live_one_answers() -> None:
    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_i.dpd_delay = 10.0
    w = Wire(cfg_i, ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.run()
    sa_events(w.i)
    assert w.i.get_timer() == 10.0
    w.i.handle_timer(10.0)
    w.run(10.0)  # the responder answers the empty INFORMATIONAL
    assert w.i.established and w.i.stats["dpd_checks"] == 1
    w.i.heard(15.0)  # inbound ESP seen by the runtime
    assert w.i.get_timer() == 25.0
    # now the peer dies: nothing answers
    w.i.handle_timer(25.0)
    for _ in range(10):
        t = w.i.get_timer()
        if t is None:
            break
        w.i.handle_timer(t)
        w.i.datagrams()
    downs = [e for e in sa_events(w.i) if isinstance(e, IkeDown)]
    assert downs and "dead peer" in downs[0].reason


def test_ike_sa_rekey_moves_children_and_retires_the_old_sa() -> None:
    from ipsecstack.ike.manager import IkeManager
    from ipsecstack.ike.session import IkeRekeyed

    cfg_a = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16", ike="aes128gcm16-prfsha256-x25519,aes256-sha384-ecp384")
    cfg_b = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16", ike="aes128gcm16-prfsha256-x25519")
    a, b = IkeManager([cfg_a], seeded_rng(11)), IkeManager([cfg_b], seeded_rng(12))
    a.initiate("conn", 0.0)
    pump_managers(a, b, 0.0)
    (old_a,) = a.sas.values()
    (old_b,) = b.sas.values()
    assert old_a.rekey_at is not None and 14400 * 0.9 <= old_a.rekey_at <= 14400
    assert a.rekey(old_a, 50.0)
    ev_a, ev_b = pump_managers(a, b, 50.0)
    assert any(isinstance(e, IkeRekeyed) for e in ev_a) and any(isinstance(e, IkeRekeyed) for e in ev_b)
    assert [e.reason for e in ev_a + ev_b if isinstance(e, IkeDown)] == ["rekeyed", "rekeyed"]
    assert not any(type(e).__name__ == "ChildDown" for e in ev_a + ev_b)  # children survive the rekey
    (new_a,) = a.sas.values()
    (new_b,) = b.sas.values()
    assert (
        new_a is not old_a
        and new_b is not old_b
        and new_a.spi_i != old_a.spi_i
        and (new_a.spi_i, new_a.spi_r) == (new_b.spi_i, new_b.spi_r)
    )
    assert new_a.keys is not None and old_a.keys is not None and new_a.keys.sk_d != old_a.keys.sk_d
    assert new_a.keys.sk_d == new_b.keys.sk_d  # type: ignore[union-attr]
    assert len(new_a.children) == 1 and len(new_b.children) == 1
    # the new IKE SA works: a child rekey over it, then a delete
    assert a.rekey(new_a, 60.0, new_a.children[0].spi_in)
    ev_a, ev_b = pump_managers(a, b, 60.0)
    assert [type(e).__name__ for e in ev_a if type(e).__name__.startswith("Child")] == ["ChildUp", "ChildDown"]
    a.delete(new_a, 70.0)
    pump_managers(a, b, 70.0)
    assert not a.sas and not b.sas


def _modp_run(a_source: object, b_source: object) -> tuple[object, object, list[bytes]]:
    """IKE_SA_INIT + IKE_AUTH, an IKE SA rekey and a child rekey with PFS, all MODP2048, between two managers
    given KE key pair sources; returns (a, b, every datagram in order)."""
    from ipsecstack.ike.manager import IkeManager

    ike, esp = "aes128-sha256-modp2048", "aes128gcm16-modp2048"
    cfg_a = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16", ike=ike, esp=esp)
    cfg_b = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16", ike=ike, esp=esp)
    a = IkeManager([cfg_a], seeded_rng(41), keypairs=a_source)  # type: ignore[arg-type]
    b = IkeManager([cfg_b], seeded_rng(42), keypairs=b_source)  # type: ignore[arg-type]
    wire: list[bytes] = []

    def pump(now: float) -> None:
        for _ in range(20):
            moved = False
            for src, dst, addr in ((a, b, A), (b, a, B)):
                for d in src.datagrams():  # before events(): that forgets closed SAs, with what they queued
                    moved = True
                    wire.append(d.data)
                    dst.receive(d.data, addr, d.src_port, d.dst_port, now)
                src.events()
            if not moved:
                return

    a.initiate("conn", 0.0)
    pump(0.0)
    (sa_a,) = a.sas.values()
    assert a.rekey(sa_a, 50.0)
    pump(50.0)
    (sa_a,) = a.sas.values()
    assert sa_a.established and sa_a.stats.get("ike_rekeys_started") is None and len(sa_a.children) == 1
    assert a.rekey(sa_a, 60.0, sa_a.children[0].spi_in)
    pump(60.0)
    return a, b, wire


def test_ke_key_pairs_can_come_ready_made() -> None:
    """The runtime's pool (runtime/kepool.py) hands IKE SAs MODP pairs through ``keypairs``: IKE_SA_INIT, the IKE SA
    rekey (also in the successor) and PFS in a child rekey use them, on both sides; None falls back to the rng."""
    from ipsecstack.ike.groups import GROUPS, Group, KeyPair
    from ipsecstack.ike.manager import IkeManager

    made = {side: [GROUPS[14].generate(seeded_rng(seed)) for _ in range(3)] for side, seed in (("a", 7), ("b", 8))}
    handed: dict[str, list[KeyPair]] = {"a": [], "b": []}

    def source(side: str) -> object:
        def take(group: Group) -> KeyPair | None:
            assert group.number == 14
            pair = made[side].pop(0)
            handed[side].append(pair)
            return pair

        return take

    a, b, wire = _modp_run(source("a"), source("b"))
    assert isinstance(a, IkeManager) and isinstance(b, IkeManager)
    assert made == {"a": [], "b": []}  # 3 pairs each: IKE_SA_INIT, IKE SA rekey, child rekey with PFS
    (sa_a,), (sa_b,) = a.sas.values(), b.sas.values()
    assert sa_a.established and sa_b.established and sa_a.keys == sa_b.keys  # the pairs agree with the peer's
    assert sa_a.children[0].key_in == sa_b.children[0].key_out
    assert sa_a.stats.get("child_rekeys") == 1 and sa_b.stats.get("child_rekeys") == 1
    init_i, init_r = m.decode(wire[0]), m.decode(wire[1])
    assert init_i.get(m.KE)[0].data == handed["a"][0][1]  # type: ignore[union-attr]
    assert init_r.get(m.KE)[0].data == handed["b"][0][1]  # type: ignore[union-attr]
    # a source with nothing ready changes nothing: the same bytes as without one
    assert _modp_run(lambda g: None, lambda g: None)[2] == _modp_run(None, None)[2]


def test_cookies_under_half_open_pressure() -> None:
    from ipsecstack.ike.manager import IkeManager

    b = IkeManager([ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")], seeded_rng(21), cookie_threshold=2)
    b.peers["conn"].remote_addr = None  # a responder for anyone
    # a flood of IKE_SA_INIT from spoofed initiators: two half-open SAs, then only stateless COOKIE replies
    for i in range(50):
        flood = IkeSa(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), initiator=True, rng=seeded_rng(100 + i), now=0.0)
        flood.start(0.0)
        for d in flood.datagrams():
            b.receive(d.data, f"198.51.100.{i + 1}", 500, 500, 0.0)
    assert len(b.sas) == 2 and b.stats["cookies_sent"] == 48
    replies = b.datagrams()
    assert sum(1 for d in replies if m.decode(d.data).notify(16390) is not None) == 48
    # a real initiator completes the exchange by echoing the cookie (same nonce and KE, §2.6)
    a = IkeManager([ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")], seeded_rng(22))
    a.initiate("conn", 1.0)
    ev_a, ev_b = pump_managers(a, b, 1.0)
    assert any(isinstance(e, ChildUp) for e in ev_a) and any(isinstance(e, ChildUp) for e in ev_b)
    assert b.stats["cookies_accepted"] == 1
    (sa_a,) = a.sas.values()
    assert sa_a.stats["cookies_received"] == 1
    # a forged cookie is refused
    forged = IkeSa(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), initiator=True, rng=seeded_rng(7), now=2.0)
    forged.start(2.0, cookie=b"\x00\x00" + bytes(32))
    before = len(b.sas)
    for d in forged.datagrams():
        b.receive(d.data, "198.51.100.200", 500, 500, 2.0)
    assert len(b.sas) == before and b.stats["cookies_rejected"] == 1


def test_responder_follows_a_nat_rebinding() -> None:
    from ipsecstack.ike.session import PeerMoved

    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_i.dpd_delay = 5.0
    w = Wire(cfg_i, ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.src_seen_by_r = "198.51.100.7"  # the initiator is behind a NAT
    w.cfg_r.remote_addr = None
    w.run()
    assert w.i.behind_nat and w.r is not None and not w.r.behind_nat
    sa_events(w.r)
    # the NAT forgets the mapping and picks a new address and port; the next authenticated request moves the SA
    w.i.handle_timer(5.0)  # a liveness check
    for d in w.i.datagrams():
        w.r.receive(d.data, "198.51.100.99", 40001, d.dst_port, 5.0)
    moved = [e for e in sa_events(w.r) if isinstance(e, PeerMoved)]
    assert [(e.addr, e.port) for e in moved] == [("198.51.100.99", 40001)]
    assert (w.r.remote, w.r.remote_port) == ("198.51.100.99", 40001)
    assert [d.dst_port for d in w.r.datagrams()] == [40001]
    # a forged datagram from elsewhere does not move anything
    w.r.receive(b"\x00" * 40, "203.0.113.5", 1, 4500, 6.0)
    assert w.r.remote == "198.51.100.99"


def test_additional_children_over_create_child_sa() -> None:
    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_r = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")
    for cfg, lnet, rnet in ((cfg_i, "10.11.0.0/16", "10.22.0.0/16"), (cfg_r, "10.22.0.0/16", "10.11.0.0/16")):
        cfg.children.append(ChildConfig("second", [ts_range(lnet)], [ts_range(rnet)],
                                        [props.parse("aes256gcm16-x25519", Protocol.ESP)]))  # fmt: skip
    w = Wire(cfg_i, cfg_r)
    w.run()
    ups_i = [e for e in sa_events(w.i) if isinstance(e, ChildUp)]
    ups_r = [e for e in sa_events(w.r) if isinstance(e, ChildUp)]
    assert [u.child.name for u in ups_i] == ["net", "second"] and [u.child.name for u in ups_r] == ["net", "second"]
    second_i, second_r = ups_i[1], ups_r[1]
    assert second_i.key_out == second_r.key_in and second_i.transform == "aes256gcm16"
    assert [str(r) for r in second_i.remote_ts] == ["10.22.0.0/16"]
    exchanges = [m.decode(d.data).exchange for _, d in w.log]
    assert exchanges.count(36) == 2  # one CREATE_CHILD_SA request and its response


def test_simultaneous_child_rekey_collision() -> None:
    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    w = Wire(cfg_i, ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.run()
    sa_events(w.i), sa_events(w.r)
    assert w.r is not None
    w.i.children[0].rekey_at = 50.0
    w.r.children[0].rekey_at = 50.0
    w.i.handle_timer(50.0)
    w.r.handle_timer(50.0)
    req_i, req_r = w.i.datagrams(), w.r.datagrams()
    w.to_responder(req_i, 50.0)  # both requests cross on the wire
    w.to_initiator(req_r, 50.0)
    w.run(50.0)  # responses, then the deletes the collision rules call for
    assert w.i.stats.get("rekey_collisions") == 1 and w.r.stats.get("rekey_collisions") == 1
    assert len(w.i.children) == 1 and len(w.r.children) == 1, (w.i.children, w.r.children)
    ci, cr = w.i.children[0], w.r.children[0]
    assert ci.spi_out == cr.spi_in and ci.spi_in == cr.spi_out and ci.key_out == cr.key_in
    assert ci.replaces is not None  # it is one of the two rekeyed pairs, not the original


def test_concentrator_assigns_virtual_ips_from_a_pool() -> None:
    from ipsecstack.ike.manager import IkeManager
    from ipsecstack.ike.pools import Pool

    pool = Pool.parse("rw", "10.9.0.0/30", ["10.1.0.53"], "pools.rw")  # two client addresses: .1 and .2
    gw = ike_config(B, A, "10.1.0.0/16", "0.0.0.0/0")
    gw.remote_addr = None
    gw.remote_id = None
    gw.pools = [pool]
    mgr = IkeManager([gw], seeded_rng(31))

    def connect(n: int, now: float) -> tuple[IkeManager, list[object]]:
        addr = f"198.51.100.{n + 1}"
        client = ike_config(addr, B, "0.0.0.0/0", "10.1.0.0/16")
        client.local_id = identity(f"client{n}@example.org")
        client.request_vip = True
        cm = IkeManager([client], seeded_rng(40 + n))
        cm.initiate("conn", now)
        exchange(cm, addr, now)
        return cm, [e for e in mgr.events() if isinstance(e, ChildUp)]

    def exchange(cm: IkeManager, addr: str, now: float) -> None:
        for _ in range(6):  # bounded
            for d in cm.datagrams():
                mgr.receive(d.data, addr, 500, 500, now)
            for d in mgr.datagrams():
                cm.receive(d.data, B, 500, 500, now)

    clients = [connect(n, 0.0) for n in range(3)]
    vips = [next(iter(cm.sas.values())).virtual_ip for cm, _ in clients]
    assert vips == ["10.9.0.1", "10.9.0.2", None]  # the third finds the pool exhausted
    for (_cm, ups), vip in zip(clients, vips, strict=True):
        if vip is None:
            assert not ups  # IKE SA without a child (INTERNAL_ADDRESS_FAILURE)
        else:
            assert [str(r) for r in ups[0].remote_ts] == [f"{vip}/32"]  # narrowed to the lease
    assert mgr.stats.get("init_refused") is None
    # the first client leaves: its address goes back to the pool and the next client gets it
    cm0 = clients[0][0]
    cm0.delete(next(iter(cm0.sas.values())), 1.0)
    exchange(cm0, "198.51.100.1", 1.0)
    mgr.events()
    assert pool.leases == {b"\x03client1@example.org": pool.leases[b"\x03client1@example.org"]}
    cm3, ups3 = connect(3, 2.0)
    assert next(iter(cm3.sas.values())).virtual_ip == "10.9.0.1" and ups3


def test_child_failures_are_events_naming_both_sides() -> None:
    from ipsecstack.ike.session import ChildFailed

    # traffic selectors that do not overlap: the IKE SA comes up, the child is refused, both say why
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.9.0.0/16", "10.1.0.0/16"))
    w.run()
    assert w.i.established and w.r is not None and w.r.established
    (fr,) = [e for e in sa_events(w.r) if isinstance(e, ChildFailed)]
    assert "TS_UNACCEPTABLE" in fr.reason and "10.2.0.0/16" in fr.reason and "10.9.0.0/16" in fr.reason, fr.reason
    (fi,) = [e for e in sa_events(w.i) if isinstance(e, ChildFailed)]
    assert "TS_UNACCEPTABLE" in fi.reason, fi.reason
    # no ESP proposal in common
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16", esp="aes256gcm16"),
             ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16", esp="aes128-sha256"))  # fmt: skip
    w.run()
    (fr,) = [e for e in sa_events(w.r) if isinstance(e, ChildFailed)]
    assert "NO_PROPOSAL_CHOSEN" in fr.reason and "aes256gcm16" in fr.reason and "aes128-sha256" in fr.reason, fr.reason
