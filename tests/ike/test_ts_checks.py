"""Traffic selectors a peer cannot be allowed: ranges that select nothing, and answers beyond our offer.

RFC 7296 §3.13.1 writes a selector as a starting and an ending address; one whose start is above its end
selects no address (``ts.ranges`` leaves it out), so a request made only of such selectors is refused with
TS_UNACCEPTABLE (§2.9) and never raises out of the core. §2.9 has the responder narrow what the initiator
proposed: an answer that selects more is cut back to the offer, one that selects nothing of it fails the
child SA, and the peer is asked to delete the half it installed.
"""

from __future__ import annotations

import ipaddress

import pytest

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import message as m
from ipsecstack.ike import sk as skmod
from ipsecstack.ike.const import Notify
from ipsecstack.ike.session import ChildConfig, ChildFailed, ChildUp
from ipsecstack.ike.ts import Range, ranges
from tests.ike.helpers import A, B, Wire, ike_config, sa_events, ts_range

BACKWARDS = Range(ipaddress.ip_address("10.1.255.255"), ipaddress.ip_address("10.1.0.0"))


def _notifies(data: bytes, keys: skmod.SkKeys) -> list[int]:
    inner = skmod.open_(data, m.decode(data), keys)
    return [p.notify_type for p in inner if isinstance(p, m.Notify)]


def test_a_selector_whose_start_is_above_its_end_selects_nothing() -> None:
    ts = m.TS([BACKWARDS.to_payload(), ts_range("10.3.0.0/16").to_payload()])
    assert [str(r) for r in ranges(ts)] == ["10.3.0.0/16"]
    assert ranges(m.TS([BACKWARDS.to_payload()])) == []


def test_ike_auth_with_only_backward_selectors_gets_ts_unacceptable() -> None:
    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_i.children[0].local_ts = [BACKWARDS]
    w = Wire(cfg_i, ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.i.start(0.0)
    w.to_responder(w.i.datagrams(), 0.0)
    assert w.r is not None
    w.to_initiator(w.r.datagrams(), 0.0)
    w.to_responder(w.i.datagrams(), 0.0)  # IKE_AUTH with TSi 10.1.255.255-10.1.0.0
    (answer,) = w.r.datagrams()
    assert Notify.TS_UNACCEPTABLE in _notifies(answer.data, w.i.rx)  # type: ignore[arg-type]
    assert w.r.established and not w.r.children and w.r.stats["child_failed"] == 1
    w.to_initiator([answer], 0.0)
    assert w.i.established and not w.i.children


def test_create_child_sa_with_backward_selectors_is_refused_and_the_sa_keeps_working() -> None:
    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_i.children.append(ChildConfig("bad", [BACKWARDS], [ts_range("10.2.0.0/16")], cfg_i.children[0].proposals))
    cfg_i.dpd_delay = 30.0
    w = Wire(cfg_i, ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.run()  # IKE_AUTH brings up "net"; "bad" follows in its own CREATE_CHILD_SA
    assert w.r is not None
    assert w.r.stats["child_failed"] == 1 and len(w.r.children) == len(w.i.children) == 1
    sa_events(w.i), sa_events(w.r)
    assert w.i.create_child("bad", 1.0)  # and once more, asked for
    w.run(1.0)
    assert w.r.stats["child_failed"] == 2 and len(w.r.children) == len(w.i.children) == 1
    assert any(isinstance(e, ChildFailed) for e in sa_events(w.i))
    # the Message IDs are in step: a liveness check goes through
    w.i.handle_timer(40.0)
    w.run(40.0)
    assert w.i.established and w.i.stats["dpd_checks"] == 1 and w.i.tasks.window.outstanding is None


def _rewrite_auth_response(w: Wire, tsr: list[Range]) -> None:
    """Deliver the responder's IKE_AUTH response with its TSr replaced, sealed again with its keys (a
    responder that does not narrow as §2.9 says)."""
    assert w.r is not None and w.r.tx is not None and w.i.rx is not None
    (answer,) = w.r.datagrams()
    msg = m.decode(answer.data)
    inner = [m.TS([r.to_payload() for r in tsr], initiator=False) if isinstance(p, m.TS) and not p.initiator
             else p for p in skmod.open_(answer.data, msg, w.i.rx)]  # fmt: skip
    w.i.receive(skmod.seal(msg, inner, w.r.tx, seeded_rng(9)), B, 500, 500, 0.0)


def _to_auth_response(w: Wire) -> None:
    w.i.start(0.0)
    w.to_responder(w.i.datagrams(), 0.0)
    assert w.r is not None
    w.to_initiator(w.r.datagrams(), 0.0)
    w.to_responder(w.i.datagrams(), 0.0)


def test_an_answer_beyond_the_offer_is_cut_back_to_it() -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    _to_auth_response(w)
    _rewrite_auth_response(w, [ts_range("0.0.0.0/0")])  # everything, where we asked for 10.2.0.0/16
    ups = [e for e in sa_events(w.i) if isinstance(e, ChildUp)]
    assert len(ups) == 1 and [str(r) for r in ups[0].remote_ts] == ["10.2.0.0/16"]
    assert w.i.stats["ts_beyond_offer"] == 1


def test_an_answer_outside_the_offer_fails_the_child_and_deletes_the_peers_half() -> None:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    _to_auth_response(w)
    _rewrite_auth_response(w, [ts_range("192.168.0.0/16")])
    evs = sa_events(w.i)
    assert w.i.established and not w.i.children and not any(isinstance(e, ChildUp) for e in evs)
    assert w.i.stats["ts_unacceptable"] == 1
    (delete,) = w.i.datagrams()  # INFORMATIONAL with a Delete for the SPI the peer installed
    assert m.decode(delete.data).exchange == 37
    assert w.r is not None and w.r.children
    w.to_responder([delete], 0.0)
    assert not w.r.children


def test_an_exception_inside_an_exchange_fails_that_exchange_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The structural rule: nothing raised while a task handles a message leaves the core. The request is
    answered INVALID_SYNTAX (so the Message IDs stay in step), a response's task simply fails; both are
    counted, and the IKE SA goes on."""
    from ipsecstack.ike.tasks.child_create import ChildCreate

    cfg_i = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_i.children.append(ChildConfig("more", [ts_range("10.3.0.0/16")], [ts_range("10.4.0.0/16")],
                                      cfg_i.children[0].proposals))  # fmt: skip
    cfg_i.dpd_delay = 30.0
    cfg_r = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")
    w = Wire(cfg_i, cfg_r)

    def boom(*_args: object) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ChildCreate, "on_request", boom)
    w.run()  # the second child's CREATE_CHILD_SA meets the bug on the responder
    assert w.r is not None and w.r.established and w.r.stats["exchange_errors"] == 1
    assert w.i.established and len(w.i.children) == 1 and w.i.tasks.window.outstanding is None
    monkeypatch.undo()
    monkeypatch.setattr(ChildCreate, "on_response", boom)
    assert w.i.create_child("more", 1.0)
    w.run(1.0)  # now the initiator's handling of the answer meets it
    assert w.i.stats["exchange_errors"] == 1 and w.i.established and w.i.tasks.window.outstanding is None
    w.i.handle_timer(40.0)  # and the IKE SA still works
    w.run(40.0)
    assert w.i.stats["dpd_checks"] == 1 and w.i.established
