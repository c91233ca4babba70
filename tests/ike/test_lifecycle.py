"""Sans-IO: uniqueness (``unique``), the IKE SA hard lifetime (``over_time``), and why SAs go away.

The runtime's close/DPD actions (``runtime/actions.py``) act on ``IkeDown.cause`` and ``ChildDown.cause``;
these tests pin those causes down, then the actions chosen for them.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import message as m
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.session import ChildDown, ChildUp, IkeDown, IkeSa, IkeUp, PeerConfig
from ipsecstack.runtime import actions
from tests.ike.helpers import A, B, Wire, ike_config


def _exchange(initiators: Iterable[IkeManager], responder: IkeManager, now: float, events: list[object]) -> None:
    """Move datagrams until quiet: every initiator sends from A; the responder's answers reach all of them
    (each drops what is not for one of its SAs). ``events`` collects the responder's events."""
    inits = list(initiators)
    for _ in range(20):
        moved = False
        for a in inits:
            for d in a.datagrams():
                moved = True
                responder.receive(d.data, A, d.src_port, d.dst_port, now)
        for d in responder.datagrams():
            moved = True
            for a in inits:
                a.receive(d.data, B, d.src_port, d.dst_port, now)
        events += responder.events()
        if not moved:
            return


def _pair(unique: str) -> tuple[PeerConfig, IkeManager]:
    cfg_b = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")
    cfg_b.unique = unique
    return cfg_b, IkeManager([cfg_b], seeded_rng(70))


def _connect(b: IkeManager, seed: int, now: float, ev_b: list[object], others: Iterable[IkeManager] = (),
             initial_contact: bool = True) -> tuple[IkeManager, list[object]]:  # fmt: skip
    """A fresh initiator (same identity, e.g. the peer rebooted) connects to B; returns it and its events.
    ``others`` (earlier initiators at the same address) receive B's datagrams too; ``initial_contact=False``:
    a peer that never sends INITIAL_CONTACT (IKE_AUTH is built after the IKE_SA_INIT answer, so it counts)."""
    a = IkeManager([ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")], seeded_rng(seed))
    a.initiate("conn", now).send_initial_contact = initial_contact
    _exchange([a, *others], b, now, ev_b)
    return a, list[object](a.events())


@pytest.mark.parametrize(("unique", "initial_contact", "replaced"), [
    ("no", True, True),  # RFC 7296 §2.4: INITIAL_CONTACT says the peer lost its other IKE SAs
    ("no", False, False),
    ("never", True, False),
    ("replace", False, True),
])  # fmt: skip
def test_unique_policy_on_the_responder(unique: str, initial_contact: bool, replaced: bool) -> None:
    _cfg_b, b = _pair(unique)
    ev_b: list[object] = []
    a1, ev_a1 = _connect(b, 71, 0.0, ev_b, initial_contact=initial_contact)
    (old,) = b.sas.values()
    assert old.established and any(isinstance(e, IkeUp) for e in ev_a1)
    assert old.initial_contact is initial_contact  # what the peer sent is what the manager sees
    old_child = old.children[0].spi_in
    ev_b.clear()
    _a2, ev_a2 = _connect(b, 72, 10.0, ev_b, [a1], initial_contact)
    assert any(isinstance(e, IkeUp) for e in ev_a2), "the new IKE SA is always accepted under this policy"
    downs = [e for e in ev_b if isinstance(e, IkeDown)]
    if replaced:
        assert list(b.sas.values()) != [old] and len(b.sas) == 1 and old.state == "closed"
        assert [e.sa for e in downs] == [old] and downs[0].cause == "local"
        assert "replaced by a new IKE SA of '172.31.0.1'" in downs[0].reason
        assert ("unique = replace" if unique == "replace" else "INITIAL_CONTACT") in downs[0].reason
        assert [(e.spi_in, e.cause) for e in ev_b if isinstance(e, ChildDown)] == [(old_child, "ike")]
        # the new child is reported up before the old one down: shared policies never disappear in between
        order = [type(e).__name__ for e in ev_b if isinstance(e, ChildUp | ChildDown)]
        assert order == ["ChildUp", "ChildDown"], order
        # the old peer state is told (one DELETE, not waited for): a1 sees the peer delete it
        assert [e.cause for e in a1.events() if isinstance(e, IkeDown)] == ["peer"]
        assert b.stats["unique_replaced"] == 1
    else:
        assert not downs and len(b.sas) == 2 and old.established
        assert "unique_replaced" not in b.stats


def test_unique_keep_refuses_the_new_ike_sa_with_authentication_failed() -> None:
    _cfg_b, b = _pair("keep")
    ev_b: list[object] = []
    a1, _ = _connect(b, 81, 0.0, ev_b)
    (old,) = b.sas.values()
    ev_b.clear()
    a2, ev_a2 = _connect(b, 82, 5.0, ev_b, [a1])
    assert not any(isinstance(e, IkeUp | ChildUp) for e in ev_a2)
    (down,) = [e for e in ev_a2 if isinstance(e, IkeDown)]
    assert "AUTHENTICATION_FAILED" in down.reason and down.cause == "failed"
    # B never announced the refused IKE SA or its child (nothing was installed), and kept the old one
    assert not any(isinstance(e, IkeUp | ChildUp) for e in ev_b)
    (refused,) = [e for e in ev_b if isinstance(e, IkeDown)]
    assert "unique = keep" in refused.reason and refused.sa is not old
    assert list(b.sas.values()) == [old] and old.established and b.stats["unique_refused"] == 1
    assert not a2.sas and not a1.events()  # the refused initiator forgot it; the first one saw nothing


def _run_timers(sa: IkeSa, until: float) -> list[object]:
    """Fire ``sa``'s timers up to ``until`` with nobody answering; returns its events."""
    evs: list[object] = []
    for _ in range(100):
        t = sa.get_timer()
        if t is None or t > until:
            break
        sa.handle_timer(t)
        sa.datagrams()
        evs += sa.events()
    return evs


def test_over_time_closes_an_ike_sa_that_cannot_rekey() -> None:
    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_i.rekey_time, cfg_i.over_time, cfg_i.retransmit_tries = 100.0, 20.0, 50  # the peer never says it is dead
    w = Wire(cfg_i, ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.run()
    w.i.events()
    assert w.i.expire_at == 120.0 and w.i.rekey_at is not None and 90.0 <= w.i.rekey_at <= 100.0
    assert _run_timers(w.i, 119.9) == [] and w.i.established  # rekey requests go unanswered
    assert w.i.stats["ike_rekeys_started"] == 1 and w.i.get_timer() == 120.0
    w.i.handle_timer(120.0)
    evs = w.i.events()
    (down,) = [e for e in evs if isinstance(e, IkeDown)]
    assert down.cause == "expired" and "not rekeyed within its hard lifetime" in down.reason
    assert "100s + 20s" in down.reason and w.i.state == "closed"
    assert [type(e) for e in evs] == [ChildDown, IkeDown]
    (delete,) = w.i.datagrams()  # the peer is told, once
    assert m.decode(delete.data).exchange == 37


def test_over_time_defaults_to_a_tenth_of_rekey_time_and_a_rekey_moves_it() -> None:
    cfg_a = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_a.rekey_time = 1000.0
    cfg_b = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")
    cfg_b.rekey_time = None  # B never rekeys and has no hard lifetime
    a, b = IkeManager([cfg_a], seeded_rng(91)), IkeManager([cfg_b], seeded_rng(92))
    a.initiate("conn", 0.0)
    ev_b: list[object] = []
    _exchange([a], b, 0.0, ev_b)
    (sa_a,) = a.sas.values()
    (sa_b,) = b.sas.values()
    assert sa_a.expire_at == 1100.0 and sa_b.expire_at is None
    assert sa_a.rekey_at is not None
    t = sa_a.rekey_at
    a.handle_timer(t)
    _exchange([a], b, t, ev_b)
    assert [e.cause for e in a.events() if isinstance(e, IkeDown)] == ["rekeyed"]
    (new_a,) = a.sas.values()
    assert new_a is not sa_a and new_a.expire_at == t + 1100.0  # the successor has its own hard lifetime


def _established() -> Wire:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.run()
    w.i.events()
    assert w.r is not None
    w.r.events()
    return w


def test_causes_when_the_peer_deletes_the_ike_sa() -> None:
    w = _established()
    assert w.r is not None
    w.r.delete(1.0)
    w.run(1.0)
    ev_i, ev_r = w.i.events(), w.r.events()
    assert [(type(e).__name__, e.cause) for e in ev_i if isinstance(e, IkeDown | ChildDown)] == [
        ("ChildDown", "ike"), ("IkeDown", "peer")]  # fmt: skip
    assert [e.cause for e in ev_r if isinstance(e, IkeDown)] == ["local"]
    child = next(e for e in ev_i if isinstance(e, ChildDown)).child
    assert child is not None and child.name == "net"


def test_causes_when_the_peer_deletes_one_child_and_it_is_created_again() -> None:
    w = _established()
    assert w.r is not None
    spi = w.r.children[0].spi_in
    assert w.r.child_expired(spi, 1.0)  # B deletes the child SA alone (§1.4.1)
    w.run(1.0)
    ev_i, ev_r = w.i.events(), w.r.events()
    (down_i,) = [e for e in ev_i if isinstance(e, ChildDown)]
    (down_r,) = [e for e in ev_r if isinstance(e, ChildDown)]
    assert (down_i.cause, down_r.cause) == ("peer", "local") and w.i.established and not w.i.children
    # close_action = start: the child is negotiated again inside the IKE SA
    assert w.i.create_child("net", 2.0) and not w.i.create_child("nope", 2.0)
    w.run(2.0)
    assert [type(e) for e in w.i.events()] == [ChildUp] and len(w.i.children) == 1
    assert w.i.create_child("net", 3.0) and w.i.datagrams() == []  # already up: nothing sent


def test_a_rekeyed_child_is_not_a_close() -> None:
    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_i.children[0].rekey_time = 100.0
    w = Wire(cfg_i, ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.run()
    w.i.events()
    assert w.r is not None
    w.r.events()
    w.i.handle_timer(100.0)
    w.run(100.0)
    downs = [e for e in w.i.events() + w.r.events() if isinstance(e, ChildDown)]
    assert len(downs) == 2 and {e.cause for e in downs} == {"rekeyed"}  # the peer's DELETE of the old SA too


def test_causes_for_a_dead_peer_and_a_failed_initiation() -> None:
    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_i.dpd_delay = 10.0
    w = Wire(cfg_i, ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.run()
    w.i.events()
    downs = [e for e in _run_timers(w.i, 1000.0) if isinstance(e, IkeDown)]
    assert [(d.cause, "dead peer" in d.reason) for d in downs] == [("dead", True)]
    lone = IkeSa(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), initiator=True, rng=seeded_rng(3), now=0.0)
    lone.start(0.0)
    assert [e.cause for e in _run_timers(lone, 1000.0) if isinstance(e, IkeDown)] == ["failed"]


def test_actions_follow_strongswan() -> None:
    w = _established()
    child = w.i.cfg.children[0]
    sa = w.i
    assert not actions.after_ike_down(sa, "peer", False)  # defaults: close_action none
    assert not actions.after_ike_down(sa, "dead", True)  # ... dpd_action clear, even for start_action = start
    child.close_action, child.dpd_action = "trap", "restart"
    assert actions.after_ike_down(sa, "peer", False) == actions.Reaction(trap=["net"])
    assert actions.after_ike_down(sa, "dead", False) == actions.Reaction(restart=True)
    child.close_action, child.dpd_action = "start", "trap"
    assert actions.after_ike_down(sa, "peer", False) == actions.Reaction(restart=True)
    assert actions.after_ike_down(sa, "dead", False) == actions.Reaction(trap=["net"])
    for cause in ("local", "expired", "rekeyed"):
        assert not actions.after_ike_down(sa, cause, True)
    assert actions.after_ike_down(sa, "failed", True) == actions.Reaction(retry=True)
    assert not actions.after_ike_down(sa, "failed", False)
    c = sa.children[0]
    peer_close = ChildDown(sa, c.spi_in, c.spi_out, child, "peer")
    assert actions.after_child_down(peer_close) == actions.Reaction(create=["net"])
    child.close_action = "trap"
    assert actions.after_child_down(peer_close) == actions.Reaction(trap=["net"])
    for cause in ("rekeyed", "ike", "local"):
        assert not actions.after_child_down(ChildDown(sa, c.spi_in, c.spi_out, child, cause))


def test_refuse_auth_is_only_possible_right_after_ike_auth() -> None:
    w = _established()
    assert w.r is not None
    assert not w.r.refuse_auth("too late: IkeUp was collected")
    assert not w.i.refuse_auth("an initiator cannot")
    assert w.r.established and w.i.established and not w.r.datagrams()


def test_a_second_initiation_does_not_send_initial_contact() -> None:
    # RFC 7296 §2.4: INITIAL_CONTACT only when we hold no other IKE SA with the peer, so that a second
    # `ipsecstack initiate` does not make a unique = no peer delete the first IKE SA
    _cfg_b, b = _pair("no")
    ev_b: list[object] = []
    a = IkeManager([ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")], seeded_rng(80))
    first = a.initiate("conn", 0.0)
    _exchange([a], b, 0.0, ev_b)
    second = a.initiate("conn", 1.0)
    _exchange([a], b, 1.0, ev_b)
    assert first.send_initial_contact and not second.send_initial_contact
    assert first.established and second.established and len(b.sas) == 2
    assert not [e for e in ev_b if isinstance(e, IkeDown)]
