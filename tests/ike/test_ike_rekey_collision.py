"""Both ends rekey the IKE SA at once (RFC 7296 §2.8.2): two IkeManagers, seeded rng, datagrams moved by hand.

Whatever the order in which the two rekey requests and their responses arrive, both ends must end up
with one IKE SA, the same one at both ends, carrying the child SA; the old and the redundant IKE SAs
gone; one IkeRekeyed per end, for that SA; and the SA must still work (a child rekey, a delete).
"""

from __future__ import annotations

import pytest

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import message as m
from ipsecstack.ike import sk
from ipsecstack.ike.const import Exchange, Notify
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.session import ChildDown, ChildUp, Datagram, IkeDown, IkeRekeyed, IkeSa
from tests.ike.helpers import A, B, ike_config, pump_managers

T = 50.0  # when both ends rekey
Seen = dict[tuple[bytes, bytes], tuple[bytes, bool]]  # new IKE SA (SPIs) -> (lowest nonce of its exchange, A made it)


class Run:
    """Two managers with an IKE SA and its child; both start rekeying the IKE SA at T."""

    def __init__(self, seed: int) -> None:
        self.a = IkeManager([ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")], seeded_rng(seed))
        self.b = IkeManager([ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")], seeded_rng(seed + 1000))
        self.a.initiate("conn", 0.0)
        pump_managers(self.a, self.b, 0.0)
        (self.old_a,) = self.a.sas.values()
        (self.old_b,) = self.b.sas.values()
        assert len(self.old_a.children) == len(self.old_b.children) == 1
        self.ev_a: list[object] = []
        self.ev_b: list[object] = []
        self.seen: Seen = {}
        assert self.a.rekey(self.old_a, T) and self.b.rekey(self.old_b, T)
        self.req_a, self.req_b = self.a.datagrams(), self.b.datagrams()
        assert len(self.req_a) == len(self.req_b) == 1

    def give(self, dst: IkeManager, dgs: list[Datagram], now: float = T) -> None:
        for d in dgs:
            dst.receive(d.data, A if dst is self.b else B, d.src_port, d.dst_port, now)
            self._note()

    def _note(self) -> None:
        """Every new IKE SA A holds (the manager knows them as soon as they exist; the SPIs are the same at B)."""
        for sa in self.a.sas.values():
            if sa is not self.old_a:
                self.seen[(sa.spi_i, sa.spi_r)] = (min(sa.ni, sa.nr), sa.initiator)

    def pump(self, now: float = T) -> None:
        """Move datagrams until quiet (bounded), noting the new IKE SAs after each one."""
        for _ in range(20):
            out_a = self.a.datagrams()
            self.give(self.b, out_a, now)
            self.ev_a += self.a.events()
            out_b = self.b.datagrams()
            self.give(self.a, out_b, now)
            self.ev_b += self.b.events()
            if not out_a and not out_b:
                break
        self.ev_a += self.a.events()
        self.ev_b += self.b.events()

    def settled(self, noticed: str = "ab") -> tuple[IkeSa, IkeSa]:
        """One established IKE SA per end, the same one, with the child; one IkeRekeyed per end for it, saying
        "collision" at the ends in ``noticed``."""
        a, b = self.a, self.b
        assert len(a.sas) == 1 and len(b.sas) == 1, (a.sas, b.sas)
        (sa_a,) = a.sas.values()
        (sa_b,) = b.sas.values()
        assert sa_a.established and sa_b.established
        assert (sa_a.spi_i, sa_a.spi_r) == (sa_b.spi_i, sa_b.spi_r) != (self.old_a.spi_i, self.old_a.spi_r)
        assert sa_a.initiator != sa_b.initiator
        assert sa_a.keys is not None and sa_b.keys is not None and sa_a.keys.sk_d == sa_b.keys.sk_d
        assert len(sa_a.children) == len(sa_b.children) == 1
        ca, cb = sa_a.children[0], sa_b.children[0]
        assert (ca.spi_in, ca.spi_out) == (cb.spi_out, cb.spi_in) and ca.key_out == cb.key_in
        assert self.old_a.state == self.old_b.state == "closed"
        for end, sa, evs in (("a", sa_a, self.ev_a), ("b", sa_b, self.ev_b)):
            rekeyed = [e for e in evs if isinstance(e, IkeRekeyed)]
            assert len(rekeyed) == 1 and rekeyed[0].new is sa and rekeyed[0].collision == (end in noticed), rekeyed
            downs = [e for e in evs if isinstance(e, IkeDown)]
            assert downs and all(e.cause == "rekeyed" for e in downs), downs  # the old SA, a redundant one
            assert not any(isinstance(e, ChildDown | ChildUp) for e in evs)  # the child SA is untouched
        return sa_a, sa_b

    def still_works(self, sa_a: IkeSa, sa_b: IkeSa) -> None:
        """A child rekey (by B) and then a delete (by A) over the surviving IKE SA."""
        old_child = sa_b.children[0]
        assert self.b.rekey(sa_b, 60.0, old_child.spi_in)
        for evs in pump_managers(self.a, self.b, 60.0):
            assert [type(e).__name__ for e in evs if isinstance(e, ChildUp | ChildDown)] == ["ChildUp", "ChildDown"]
        assert len(sa_a.children) == len(sa_b.children) == 1 and sa_b.children[0] is not old_child
        assert sa_a.children[0].spi_out == sa_b.children[0].spi_in
        self.a.delete(sa_a, 70.0)
        pump_managers(self.a, self.b, 70.0)
        assert not self.a.sas and not self.b.sas


def _both_notice(seed: int, order: str) -> Run:
    r = Run(seed)
    if order == "a_first":  # A's request reaches B before B's reaches A (each still before its own response)
        r.give(r.b, r.req_a)
        r.give(r.a, r.req_b)
    else:
        r.give(r.a, r.req_b)
        r.give(r.b, r.req_a)
    r.pump()
    return r


@pytest.mark.parametrize("order", ["a_first", "b_first"])
@pytest.mark.parametrize("winner", ["a", "b"])
def test_both_ends_notice_the_collision_and_keep_the_same_sa(order: str, winner: str) -> None:
    """Each end answers the other's request while its own is out: three IKE SAs at each end; the new one whose
    exchange has the lowest of the four nonces goes, the other inherits the child SA (seed picked for ``winner``)."""
    for seed in range(1, 40):  # bounded search for a seed whose nonces let ``winner``'s rekey survive
        r = _both_notice(seed, order)
        assert len(r.seen) == 2, r.seen  # both rekeys made a new IKE SA
        keep = max(r.seen, key=lambda k: r.seen[k][0])  # the other one holds the lowest nonce
        if r.seen[keep][1] == (winner == "a"):
            break
    else:
        pytest.fail(f"no seed lets {winner}'s rekey win")
    sa_a, sa_b = r.settled()
    assert (sa_a.spi_i, sa_a.spi_r) == keep  # the nonce rule decided, the same way at both ends
    assert sa_a.initiator == (winner == "a")
    assert r.old_a.stats["ike_rekey_collisions"] == r.old_b.stats["ike_rekey_collisions"] == 1
    r.still_works(sa_a, sa_b)


@pytest.mark.parametrize("finisher", ["a", "b"])
@pytest.mark.parametrize("first", ["refusal", "delete"])
def test_one_request_crosses_the_other_response(finisher: str, first: str) -> None:
    """§2.8.2's special case: the finisher gets its response before it sees the noticer's request (which had
    answered the finisher's while its own was out); the finisher refuses that with TEMPORARY_FAILURE and deletes
    the old SA. Only the finisher's new IKE SA exists; the noticer takes it over, learning it from the refusal
    or from the DELETE, whichever comes first."""
    r = Run(7)
    fin, noticer = (r.a, r.b) if finisher == "a" else (r.b, r.a)
    req_fin, req_noticer = (r.req_a, r.req_b) if finisher == "a" else (r.req_b, r.req_a)
    old_fin, old_noticer = (r.old_a, r.old_b) if finisher == "a" else (r.old_b, r.old_a)
    r.give(noticer, req_fin)  # the noticer answers while its own request is out
    r.give(fin, noticer.datagrams())  # the finisher gets its response: its rekey is done, it deletes the old SA
    r.give(fin, req_noticer)  # and only now sees the noticer's request
    out = fin.datagrams()
    assert sorted(m.decode(d.data).exchange for d in out) == [Exchange.CREATE_CHILD_SA, Exchange.INFORMATIONAL]
    refusal = next(d for d in out if m.decode(d.data).exchange == Exchange.CREATE_CHILD_SA)
    msg = m.decode(refusal.data)
    assert old_noticer.rx is not None
    inner = sk.open_(refusal.data, msg, old_noticer.rx)
    assert [p.notify_type for p in inner if isinstance(p, m.Notify)] == [Notify.TEMPORARY_FAILURE]
    want = Exchange.CREATE_CHILD_SA if first == "refusal" else Exchange.INFORMATIONAL
    r.give(noticer, sorted(out, key=lambda d: m.decode(d.data).exchange != want))
    r.pump()
    sa_a, sa_b = r.settled(noticed="b" if finisher == "a" else "a")
    assert sa_a.initiator == (finisher == "a")  # the finisher's rekey survives
    assert len(r.seen) == 1  # no redundant IKE SA was made
    assert old_noticer.stats["ike_rekey_collisions"] == 1 and old_fin.stats["ike_rekeys_refused"] == 1
    r.still_works(sa_a, sa_b)


def _responses(dgs: list[Datagram]) -> list[Datagram]:
    """The CREATE_CHILD_SA responses only, not the DELETEs sent after them."""
    return [d for d in dgs if m.decode(d.data).exchange == Exchange.CREATE_CHILD_SA]


def test_deletes_that_never_come_are_waited_for_a_bounded_time() -> None:
    """The DELETEs the collision rules call for are lost: the winner's redundant SA (made by the peer) and the
    loser's old SA each close on their own once the peer's retransmissions would be over, quietly."""
    r = Run(1)
    r.give(r.b, r.req_a)
    r.give(r.a, r.req_b)
    r.give(r.b, _responses(r.a.datagrams()))
    r.give(r.a, _responses(r.b.datagrams()))
    r.ev_a += r.a.events()
    r.ev_b += r.b.events()
    for mgr in (r.a, r.b):
        mgr.datagrams()  # the DELETEs are lost
    assert len(r.a.sas) == len(r.b.sas) == 3
    now = T
    for _ in range(50):  # bounded: every SA gives up or lingers at most one retransmission schedule
        t = min(x for x in (r.a.get_timer(), r.b.get_timer()) if x is not None)
        if t > T + 1000:
            break
        now = t
        r.a.handle_timer(now)
        r.b.handle_timer(now)
        r.a.datagrams(), r.b.datagrams()
        r.ev_a += r.a.events()
        r.ev_b += r.b.events()
    assert now < T + 200  # the default schedule: 2 s, then x1.8, 5 retransmissions
    r.settled()
    reasons = [e.reason for e in r.ev_a + r.ev_b if isinstance(e, IkeDown)]
    assert "rekeyed" in reasons, reasons  # the loser's old SA, closed after waiting for the winner's DELETE
    assert any(x.startswith("redundant after a simultaneous rekey") for x in reasons), reasons  # the winner's


def _crossing(mgrs: tuple[IkeManager, IkeManager], now: float) -> None:
    """Fire both managers' timers at ``now``, cross their requests on the wire, then move everything until quiet."""
    a, b = mgrs
    a.handle_timer(now)
    b.handle_timer(now)
    out_a, out_b = a.datagrams(), b.datagrams()
    for d in out_a:
        b.receive(d.data, A, d.src_port, d.dst_port, now)
    for d in out_b:
        a.receive(d.data, B, d.src_port, d.dst_port, now)


def test_rand_time_zero_with_equal_rekey_times_collides_every_round_and_settles() -> None:
    """rand_time = 0 (strongSwan's meaning: no random part subtracted): both ends rekey exactly at rekey_time,
    so with equal rekey_time the rekeys collide, round after round; each round ends with one shared IKE SA."""
    cfgs = [ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")]
    for cfg in cfgs:
        cfg.rekey_time, cfg.rand_time = 100.0, 0.0
    a, b = IkeManager([cfgs[0]], seeded_rng(5)), IkeManager([cfgs[1]], seeded_rng(6))
    a.initiate("conn", 0.0)
    pump_managers(a, b, 0.0)
    winners = []
    for rnd in range(1, 5):
        (sa_a,) = a.sas.values()
        (sa_b,) = b.sas.values()
        t = 100.0 * rnd
        assert sa_a.rekey_at == sa_b.rekey_at == t  # exactly on time: no jitter
        assert a.get_timer() == b.get_timer() == t
        _crossing((a, b), t)
        ev_a, ev_b = pump_managers(a, b, t)
        assert len(a.sas) == len(b.sas) == 1, (a.sas, b.sas)
        (new_a,) = a.sas.values()
        (new_b,) = b.sas.values()
        assert (new_a.spi_i, new_a.spi_r) == (new_b.spi_i, new_b.spi_r) != (sa_a.spi_i, sa_a.spi_r)
        assert len(new_a.children) == len(new_b.children) == 1
        assert new_a.children[0].spi_out == new_b.children[0].spi_in
        for evs in (ev_a, ev_b):
            (rekeyed,) = [e for e in evs if isinstance(e, IkeRekeyed)]
            assert rekeyed.collision and rekeyed.redundant is not None and rekeyed.redundant.state == "closed"
            assert not any(isinstance(e, ChildDown | ChildUp) for e in evs)
        assert sa_a.stats["ike_rekey_collisions"] == sa_b.stats["ike_rekey_collisions"] == 1
        winners.append("a" if new_a.initiator else "b")
    assert set(winners) == {"a", "b"}, winners  # the nonces decide: here each end wins at least once


def test_rand_time_bounds_the_random_part_of_rekey_and_reauth_times() -> None:
    cfg_a = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_a.rekey_time, cfg_a.reauth_time, cfg_a.rand_time = 1000.0, 2000.0, 5.0
    a, b = (
        IkeManager([cfg_a], seeded_rng(3)),
        IkeManager([ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")], seeded_rng(4)),
    )
    a.initiate("conn", 0.0)
    pump_managers(a, b, 0.0)
    (sa,) = a.sas.values()
    assert sa.rekey_at is not None and 995.0 <= sa.rekey_at <= 1000.0 and sa.rekey_at != 1000.0
    assert sa.reauth_at is not None and 1995.0 <= sa.reauth_at <= 2000.0


@pytest.mark.parametrize("b_wins", [False, True])
def test_what_follows_a_response_overtakes_it(b_wins: bool) -> None:
    """B resolves first; what it sends next (the DELETE of its redundant SA, or of the old SA) reaches A before
    B's response to A's request. A still ends on the same IKE SA as B: the peer's redundant SA simply goes; or,
    the old SA deleted, A takes B's new SA and forgets its own attempt (whose SA B then drops after a while)."""
    for seed in range(1, 40):  # bounded search for a seed with the wanted outcome at B
        r = Run(seed)
        r.give(r.b, r.req_a)
        r.give(r.a, r.req_b)
        r.give(r.b, r.a.datagrams())  # B gets its response and resolves
        out_b = r.b.datagrams()  # B's response to A, then its DELETE
        assert [m.decode(d.data).exchange for d in out_b] == [Exchange.CREATE_CHILD_SA, Exchange.INFORMATIONAL]
        deletes_old = m.decode(out_b[1].data).spi_i == r.old_b.spi_i
        if deletes_old == b_wins:
            break
    else:
        pytest.fail("no seed gives the wanted winner")
    r.give(r.a, out_b[::-1])
    r.pump()
    now = T
    for _ in range(20):  # B waits (bounded) for a DELETE of A's new SA, which A never made when B won
        t = min(x for x in (r.a.get_timer(), r.b.get_timer()) if x is not None)
        if t > T + 1000:
            break
        now = t
        r.a.handle_timer(now)
        r.b.handle_timer(now)
        r.pump(now)
    sa_a, _ = r.settled()
    assert sa_a.initiator == (not b_wins)
