"""What the daemon does when SAs go away: strongSwan's ``close_action`` and ``dpd_action``, and retries.

Theory of operation
-------------------
The sans-IO session says *why* an SA went (``IkeDown.cause``, ``ChildDown.cause``); these pure
functions turn that and the children's configuration into a :class:`Reaction`, which the IKE endpoint
(``runtime/ike.py``) carries out:

- the peer deleted the IKE SA (RFC 7296 §1.4.1), or one child SA while the IKE SA stays: each child's
  ``close_action`` applies: ``none`` (default) nothing, ``trap`` arms its trap policies so matching
  traffic negotiates it again (acquire), ``start`` negotiates it again at once (the whole connection
  when the IKE SA went, only that child over CREATE_CHILD_SA otherwise);
- the peer is dead (§2.4: DPD or any request unanswered on an established IKE SA): each child's
  ``dpd_action``: ``clear`` (default) nothing, ``trap`` as above, ``restart`` initiates the
  connection again at once;
- an initiation failed (never established): retried after ``RETRY_DELAY`` while the connection is one
  that keeps itself up: ``start_action = start``, or one being restarted by an action above (like
  strongSwan with ``keyingtries = 0``), until it is up again;
- we deleted it (``terminate``, shutdown, reload, uniqueness), it expired (``over_time``), it was
  rekeyed, or it was reauthenticated (``"reauth"``: a newer IKE SA with the same peer carries on): nothing.

The trap policies of every child with a known peer are installed at start (``install_traps``), so
"arming" only decides whether an acquire on them starts a negotiation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ipsecstack.ike.session import ChildDown, IkeSa


@dataclass
class Reaction:
    restart: bool = False  # initiate the connection again now
    create: list[str] = field(default_factory=list)  # children to negotiate again in the still-established IKE SA
    trap: list[str] = field(default_factory=list)  # children whose trap policies now start negotiations
    retry: bool = False  # initiate again after RETRY_DELAY

    def __bool__(self) -> bool:
        return self.restart or self.retry or bool(self.create or self.trap)


def after_ike_down(sa: IkeSa, cause: str, keeps_itself_up: bool) -> Reaction:
    """The IKE SA ``sa`` closed for ``cause`` (see ``IkeDown``)."""
    r = Reaction()
    if cause in ("peer", "dead"):
        for child in sa.cfg.children:
            action = child.close_action if cause == "peer" else child.dpd_action
            if action in ("start", "restart"):
                r.restart = True
            elif action == "trap":
                r.trap.append(child.name)
    elif cause == "failed":
        r.retry = sa.initiator and keeps_itself_up
    return r


def after_child_down(ev: ChildDown[IkeSa]) -> Reaction:
    """One child SA went while its IKE SA stays: only a peer's DELETE calls for its ``close_action``."""
    r = Reaction()
    if ev.cause != "peer" or ev.child is None or not ev.sa.established:
        return r
    if ev.child.close_action == "start":
        r.create.append(ev.child.name)
    elif ev.child.close_action == "trap":
        r.trap.append(ev.child.name)
    return r
