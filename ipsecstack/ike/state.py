"""The IKE SA's lifecycle: its states, the steps that move it, and the table of legal moves.

Theory of operation
-------------------
An IKE SA is in one :class:`IkeState`. Only a :class:`Step` moves it, and only as :data:`TRANSITIONS`
lists: :func:`advance` is the one place a state changes, and a (state, step) pair the table does not
list raises :class:`IllegalTransition` (a bug in the exchange code, never something a peer can cause:
what a peer sends is checked against the state before any step is taken). :func:`mermaid` draws the
table for the docs (``docs/ike.md``, kept current by a test).

The states are strings (a ``StrEnum``) so that logs, ``list-sas`` and the control socket show them as
they always have.

The lifecycle (RFC 7296 §1.2, §1.3.2, §1.4.1, §2.8, §2.18):

- the initiator sends IKE_SA_INIT (INIT_SENT), then IKE_AUTH (AUTH_SENT), and is ESTABLISHED when the
  IKE_AUTH response authenticates the responder;
- the responder answers IKE_SA_INIT (INIT_DONE: half-open, RFC 7296 §2.6 counts these) and is
  ESTABLISHED once the IKE_AUTH request authenticates the initiator;
- an IKE SA made by rekeying another one (§2.18) is ESTABLISHED as soon as the CREATE_CHILD_SA exchange
  completes;
- DELETING: its DELETE is on the way (ours), or it was replaced by a rekey and waits for the DELETE that
  retires it (§2.8), or it lost a rekey collision and the peer deletes it (§2.8.2);
- CLOSED: gone (deleted, failed, timed out, or dead); nothing leaves it.
"""

from __future__ import annotations

from enum import StrEnum


class IkeState(StrEnum):
    NEW = "new"
    INIT_SENT = "init_sent"
    INIT_DONE = "init_done"
    AUTH_SENT = "auth_sent"
    ESTABLISHED = "established"
    DELETING = "deleting"
    CLOSED = "closed"


class Step(StrEnum):
    SEND_INIT = "send IKE_SA_INIT"
    ANSWER_INIT = "answer IKE_SA_INIT"
    SEND_AUTH = "send IKE_AUTH"
    AUTHENTICATED = "authenticated"
    REKEYED_IN = "made by an IKE rekey"
    DELETE = "delete"
    PEER_DELETES = "the peer deletes it"
    CLOSE = "close"


S = IkeState
TRANSITIONS: dict[tuple[IkeState, Step], IkeState] = {
    (S.NEW, Step.SEND_INIT): S.INIT_SENT,
    (S.INIT_SENT, Step.SEND_INIT): S.INIT_SENT,  # again, with a COOKIE or the group INVALID_KE_PAYLOAD asked for
    (S.NEW, Step.ANSWER_INIT): S.INIT_DONE,
    (S.NEW, Step.REKEYED_IN): S.ESTABLISHED,
    (S.INIT_SENT, Step.SEND_AUTH): S.AUTH_SENT,
    (S.AUTH_SENT, Step.AUTHENTICATED): S.ESTABLISHED,
    (S.INIT_DONE, Step.AUTHENTICATED): S.ESTABLISHED,
    (S.ESTABLISHED, Step.DELETE): S.DELETING,
    (S.DELETING, Step.DELETE): S.DELETING,  # a rekey of the peer's replaces an SA we are deleting already
    (S.ESTABLISHED, Step.PEER_DELETES): S.DELETING,
    **{(s, Step.CLOSE): S.CLOSED for s in IkeState if s is not S.CLOSED},
}


class IllegalTransition(RuntimeError):
    """A step the table does not allow in the current state: a bug in the exchange code."""


def advance(state: IkeState, step: Step) -> IkeState:
    """The state after ``step``, or IllegalTransition."""
    try:
        return TRANSITIONS[(state, step)]
    except KeyError:
        raise IllegalTransition(f"IKE SA in state {state.value!r}: {step.value!r} is not a legal step") from None


def mermaid() -> str:
    """The table as a Mermaid state diagram (docs/ike.md)."""
    lines = ["stateDiagram-v2", f"    [*] --> {S.NEW.value}"]
    for (src, step), dst in TRANSITIONS.items():
        if step is not Step.CLOSE:
            lines.append(f"    {src.value} --> {dst.value}: {step.value}")
    lines.append(f"    note right of {S.CLOSED.value}: every state but {S.CLOSED.value} may close")
    lines.append(f"    {S.CLOSED.value} --> [*]")
    return "\n".join(lines) + "\n"
