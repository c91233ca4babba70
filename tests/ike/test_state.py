"""The IKE SA's lifecycle table (ike/state.py): complete, closed under CLOSE, what docs/ike.md draws, and what
an IKE SA does with every kind of message in every state."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike import sk as skmod
from ipsecstack.ike.const import Protocol
from ipsecstack.ike.session import ChildUp
from ipsecstack.ike.state import TRANSITIONS, IkeState, IllegalTransition, Step, advance, mermaid
from tests.ike.helpers import A, B, Wire, ike_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "ike.md"


@pytest.mark.parametrize("state", list(IkeState))
@pytest.mark.parametrize("step", list(Step))
def test_every_pair_is_a_move_or_a_refusal(state: IkeState, step: Step) -> None:
    if (state, step) in TRANSITIONS:
        assert advance(state, step) is TRANSITIONS[(state, step)]
    else:
        with pytest.raises(IllegalTransition, match=state.value):
            advance(state, step)


def _reachable(start: IkeState) -> set[IkeState]:
    seen, todo = {start}, [start]
    while todo:
        s = todo.pop()
        for (src, _step), dst in TRANSITIONS.items():
            if src is s and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


def test_every_state_is_reachable_and_every_one_can_end() -> None:
    assert _reachable(IkeState.NEW) == set(IkeState)
    assert all(TRANSITIONS.get((s, Step.CLOSE)) is IkeState.CLOSED for s in IkeState if s is not IkeState.CLOSED)
    assert not [k for k in TRANSITIONS if k[0] is IkeState.CLOSED]  # nothing leaves CLOSED


def test_the_states_are_the_strings_logs_and_listings_show() -> None:
    assert [s.value for s in IkeState] == ["new", "init_sent", "init_done", "auth_sent", "established", "deleting",
                                            "closed"]  # fmt: skip
    assert IkeState.ESTABLISHED == "established" and f"{IkeState.INIT_DONE}" == "init_done"


def test_the_docs_draw_the_table() -> None:
    text = DOC.read_text()
    assert "```mermaid\n" + mermaid() + "```" in text, (
        "regenerate: python -c 'from ipsecstack.ike.state import mermaid; print(mermaid())'"
    )


# --- every (state, message type, role) pair, driven through a real IKE SA ----------------------------------

_POOL: list[m.AnyPayload] = [
    m.Notify(16390, b"\x00\x01" + bytes(32)),
    m.Notify(17, b"\x00\x13"),
    m.Notify(14),
    m.Notify(24),
    m.Notify(16393, b"", 3, b"\x00\x00\x10\x00"),
    m.Notify(16391),
    m.Nonce(bytes(32)),
    m.KE(31, bytes(32)),
    m.KE(14, bytes(256)),
    m.Identification(1, bytes(4)),
    m.Identification(2, b"b.example", initiator=False),
    m.Auth(2, bytes(32)),
    m.Delete(1, []),
    m.Delete(3, [b"\x00\x00\x10\x00"]),
    m.TS([m.TrafficSelector(7, 0, 0, 65535, bytes(4), b"\xff" * 4)]),
    m.TS([m.TrafficSelector(7, 6, 80, 80, bytes([10, 2, 0, 0]), bytes([10, 2, 255, 255]))], initiator=False),
    m.SA([props.parse("aes128gcm16-prfsha256-x25519", Protocol.IKE).to_payload(1, bytes(8))]),
    m.SA([props.parse("aes128gcm16", Protocol.ESP).to_payload(1, b"\x00\x00\x20\x00")]),
    m.Vendor(b"x"),
    m.Unknown(99, b"?", critical=True),
    # selectors whose start is above their end (RFC 7296 §3.13.1: they select nothing)
    m.TS([m.TrafficSelector(7, 0, 0, 65535, bytes([10, 1, 255, 255]), bytes([10, 1, 0, 0]))]),
    m.TS([m.TrafficSelector(8, 0, 0, 65535, b"\xff" * 16, bytes(16))], initiator=False),
]

# each stage: how far the exchange has gone, and the states (initiator, responder) it leaves; together they
# put an IKE SA in every state of the table
_STAGES = [
    ("new", None),
    ("init_sent", None),
    ("init_sent", "init_done"),
    ("auth_sent", "init_done"),
    ("established", "established"),
    ("deleting", "established"),
    ("closed", "closed"),
]
# the four exchanges of RFC 7296 §1, IKE_INTERMEDIATE (RFC 9242, not negotiated here) and an unassigned one
_EXCHANGES = [34, 35, 36, 37, 43, 250]
# (stage, exchange, response?, to the initiator?): before the responder exists only the initiator can get one
_PAIRS = [
    (stage, exchange, response, to_initiator)
    for stage, (_i, r) in enumerate(_STAGES)
    for exchange in _EXCHANGES
    for response in (False, True)
    for to_initiator in ((True, False) if r is not None else (True,))
]


def test_the_pairs_cover_every_state_exchange_and_role() -> None:
    states = {IkeState(s) for st_ in _STAGES for s in st_ if s is not None}
    assert states == set(IkeState)
    roles = {(IkeState(_STAGES[p[0]][0 if p[3] else 1] or "new"), p[1], p[2], p[3]) for p in _PAIRS}
    for state in IkeState:
        for exchange in _EXCHANGES:
            for response in (False, True):
                assert (state, exchange, response, True) in roles or (state, exchange, response, False) in roles


@pytest.mark.parametrize(("stage", "exchange", "response", "to_initiator"), _PAIRS)
@settings(max_examples=12, deadline=None)
@given(mid=st.integers(0, 4), picks=st.lists(st.integers(0, len(_POOL) - 1), max_size=6), authentic=st.booleans())
def test_every_message_type_in_every_state(stage: int, exchange: int, response: bool, to_initiator: bool, mid: int,
                                           picks: list[int], authentic: bool) -> None:  # fmt: skip
    """Well-formed but unexpected messages, authentic or not, of every exchange type, as request and as
    response, to either role in every state of the lifecycle: nothing raises; the state afterwards is one
    the table reaches from the state before (every move goes through it: IllegalTransition otherwise), and
    one half-way through has a timer to finish or give up (retransmission, the half-open timeout);
    the message is either taken (the peer was heard, the SA answered, moved or reported) or refused with
    a counter naming why, never dropped silently; and nothing unauthenticated creates a child SA."""
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    steps = [lambda: None, lambda: w.i.start(0.0), lambda: w.to_responder(w.i.datagrams(), 0.0),
             lambda: w.to_initiator(w.r.datagrams() if w.r else [], 0.0), lambda: w.run(0.0),
             lambda: (w.i.delete(1.0),), lambda: w.run(1.0)]  # fmt: skip
    for step in steps[: stage + 1]:
        step()
    assert (w.i.state, w.r.state if w.r else None) == _STAGES[stage]
    target = w.i if to_initiator else w.r
    assert target is not None
    sender = w.r if to_initiator else w.i
    payloads = [_POOL[i] for i in picks]
    flags = (0x20 if response else 0) | (0 if to_initiator else 0x08)
    msg = m.Message(target.spi_i or bytes(8), target.spi_r, exchange, flags, mid)
    before_children = len(target.children)
    target.events()  # what the set-up stages produced
    target.datagrams()
    state, stats, heard = target.state, dict(target.stats), target.last_heard
    outstanding = target.tasks.window.outstanding
    if authentic and sender is not None and sender.tx is not None and exchange != 34:
        data = skmod.seal(msg, payloads, sender.tx, seeded_rng(5))
    else:
        msg.payloads = payloads
        data = msg.encode()
    target.receive(data, B if to_initiator else A, 500, 500, 2.0)
    out, events = target.datagrams(), target.events()
    assert isinstance(target.state, IkeState) and target.state in _reachable(state)
    taken = (target.state is not state or out or events or target.last_heard != heard
             or target.tasks.window.outstanding is not outstanding)  # fmt: skip
    counted = {k for k, v in target.stats.items() if v > stats.get(k, 0)}
    assert taken or counted, "dropped without a counter saying why"
    if not taken:
        assert all(k.startswith("dropped_") for k in counted), counted
    if target.state not in (IkeState.NEW, IkeState.ESTABLISHED, IkeState.CLOSED):  # NEW: not started yet
        assert target.get_timer() is not None, "left half-way with nothing to move it on"
    if not authentic:
        assert len(target.children) <= before_children
        assert not any(isinstance(e, ChildUp) for e in events)


def test_an_unusable_init_response_is_counted_and_the_request_stays_outstanding() -> None:
    """RFC 7296 §2.21.1: an IKE_SA_INIT response without SA, KE and Nonce may be forged; the initiator
    counts it and keeps retransmitting its request, and the real answer still completes the exchange."""
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.i.start(0.0)
    request = w.i.datagrams()
    forged = m.Message(w.i.spi_i, bytes(range(1, 9)), 34, 0x20, 0, [m.Vendor(b"x")])
    w.i.receive(forged.encode(), B, 500, 500, 0.1)
    assert w.i.stats["dropped_init_response_incomplete"] == 1 and w.i.state is IkeState.INIT_SENT
    due = w.i.get_timer()
    assert due is not None
    w.i.handle_timer(due)
    again = w.i.datagrams()
    assert [d.data for d in again] == [d.data for d in request]  # the same request, byte for byte
    w.to_responder(again, due)
    w.run(due)
    assert w.i.state is IkeState.ESTABLISHED and w.r is not None and w.r.state is IkeState.ESTABLISHED


def test_a_response_of_another_exchange_type_is_counted_and_the_request_stays_outstanding() -> None:
    """§1.2: the response to IKE_AUTH is an IKE_AUTH; an authentic INFORMATIONAL with its Message ID is
    dropped and counted, and the IKE_AUTH request is retransmitted until its real answer comes."""
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.i.start(0.0)
    w.to_responder(w.i.datagrams(), 0.0)
    assert w.r is not None and w.r.tx is not None
    w.to_initiator(w.r.datagrams(), 0.0)
    assert w.i.state is IkeState.AUTH_SENT
    auth = w.i.datagrams()
    wrong = m.Message(w.i.spi_i, w.i.spi_r, 37, 0x20, 1)
    w.i.receive(skmod.seal(wrong, [], w.r.tx, seeded_rng(9)), B, 500, 500, 0.1)
    assert w.i.stats["dropped_wrong_exchange"] == 1 and w.i.state is IkeState.AUTH_SENT
    due = w.i.get_timer()
    assert due is not None
    w.i.handle_timer(due)
    again = w.i.datagrams()
    assert [d.data for d in again] == [d.data for d in auth]
    w.to_responder(again, due)
    w.run(due)
    assert w.i.state is IkeState.ESTABLISHED
