"""CREATE_CHILD_SA rekeying the IKE SA (RFC 7296 §1.3.2, §2.8, §2.8.2, §2.18, §2.25.2), both roles.

The exchange makes a new IKE SA with new SPIs and keys from SK_d (§2.18): ``rekeyed_sa``
builds it, established but in charge of nothing, and the manager demultiplexes to it at once. When
it takes over (:func:`take_over`) it inherits the children, the reauthentication time and any lease,
its rekey timer starts, and ``IkeRekeyed`` is reported (once per rekey); the old SA is "deleting" from
then on and is deleted by the initiator of the rekey that survives (``IkeDelete(retire=True)``).

Simultaneous rekeys (§2.8.2). A peer's rekey request that arrives while ours is outstanding is
answered as usual, but its new SA waits (``Context.peer_rekey``, "standby") until our exchange ends:

- our response makes a second new SA: the one whose exchange holds the lowest of the four nonces
  (octet by octet) is redundant and is deleted, over itself, by the end that initiated it; the
  other takes over; the initiator of the survivor deletes the old SA, the other end waits for that;
- our request fails (the peer finished its rekey before it saw ours and answers TEMPORARY_FAILURE,
  as the IKE SA does for a rekey request on a "deleting" SA, §2.25.2), or the peer deletes the old
  SA (it never saw our request): the peer's new SA takes over and our attempt is forgotten.

Waiting for the peer's DELETE (of the old SA, or of the redundant SA it made) is bounded by
``linger_until``, the time the peer retransmits one request (``exchange_span``); then we delete it
ourselves. A redundant or standby SA closes with cause ``"rekeyed"`` and never carries children.
"""

from __future__ import annotations

from typing import Any

from ipsecstack.ike import derive
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import Exchange, Notify, Protocol
from ipsecstack.ike.groups import KeyExchangeError
from ipsecstack.ike.state import Step
from ipsecstack.ike.tasks import child_common as cc
from ipsecstack.ike.tasks import schedule
from ipsecstack.ike.tasks.base import Context, Result, Task
from ipsecstack.ike.tasks.ike_delete import IkeDelete

RETRY = 30.0  # a refused IKE rekey is tried again this much later


class IkeRekey(Task):
    exchange = Exchange.CREATE_CHILD_SA

    def __init__(self, ctx: Context, *, initiator: bool = True) -> None:
        super().__init__(ctx, initiator=initiator)
        self._spi = b""
        self._nonce = b""
        self._priv: Any = None
        self._new: tuple[props.Chosen, bytes, bytes, bytes, bytes, bytes] | None = None

    def request(self, now: float) -> list[m.AnyPayload] | None:
        ctx = self.ctx
        assert ctx.chosen is not None and ctx.chosen.dh is not None
        ctx.rekey_at = None
        self._spi = ctx.rng(8)
        self._nonce = ctx.rng(32)
        group = ctx.chosen.dh
        self._priv, pub = derive.keypair(ctx, group)
        sa = m.SA([p.to_payload(i + 1, self._spi) for i, p in enumerate(ctx.cfg.proposals)])
        ctx.count("ike_rekeys_started")
        return [sa, m.Nonce(self._nonce), m.KE(group.number, pub)]

    def on_response(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        ctx = self.ctx
        sas = [p for p in inner if isinstance(p, m.SA)]
        nonce = next((p for p in inner if isinstance(p, m.Nonce)), None)
        ke = next((p for p in inner if isinstance(p, m.KE)), None)
        chosen = None
        if len(sas) == 1 and len(sas[0].proposals) == 1:
            chosen = props.check_choice(ctx.cfg.proposals, sas[0].proposals[0], Protocol.IKE)
        if chosen is None or nonce is None or ke is None or chosen.dh is None or ke.group != chosen.dh.number \
                or len(chosen.spi) != 8:  # fmt: skip
            ctx.count("ike_rekey_failed")
            self._refused(now)
            return Result.FAILED
        try:
            shared = chosen.dh.shared(self._priv, ke.data)
        except KeyExchangeError:
            self._refused(now)
            return Result.FAILED
        new = rekeyed_sa(ctx, chosen, self._spi, chosen.spi, self._nonce, nonce.data, shared, initiator=True, now=now)
        if ctx.peer_rekey is not None:
            _collision(ctx, new, now)
        else:
            take_over(ctx, new, now)
            ctx.tasks.perform(IkeDelete(ctx, retire=True), now)
        return Result.DONE

    def _refused(self, now: float) -> None:
        if peer_rekey_wins(self.ctx, now):
            # §2.8.2: the peer finished rekeying before it saw our request (TEMPORARY_FAILURE): its new SA
            # took over, and the peer deletes this one
            self.ctx.linger_until = now + self.ctx.exchange_span()
            return
        self.ctx.rekey_at = now + RETRY

    def on_request(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        ctx = self.ctx
        if ctx.peer_rekey is not None:
            # the peer's first rekey still waits for ours to end (§2.8.2): no third IKE SA (§2.25)
            ctx.count("ike_rekeys_refused")
            self.reply = [m.Notify(Notify.TEMPORARY_FAILURE)]
            return Result.FAILED
        sa = next(p for p in inner if isinstance(p, m.SA))
        nonce = next(p for p in inner if isinstance(p, m.Nonce))  # dispatch.py checked both are there
        chosen = props.select(ctx.cfg.proposals, sa.proposals, Protocol.IKE)
        ke = next((p for p in inner if isinstance(p, m.KE)), None)
        if chosen is None or chosen.dh is None or len(chosen.spi) != 8:
            self.reply = [m.Notify(Notify.NO_PROPOSAL_CHOSEN)]
            return Result.FAILED
        answer = cc.answer_ke(ctx, chosen.dh, ke)
        if isinstance(answer, list):
            self.reply = answer
            return Result.FAILED
        pub, shared = answer
        spi_r = ctx.rng(8)
        nr = ctx.rng(32)
        reply = props.Chosen(chosen.protocol, chosen.encr, chosen.integ, chosen.prf, chosen.dh, False, chosen.number,
                             spi_r)  # fmt: skip
        self.reply = [m.SA([reply.to_payload()]), m.Nonce(nr), m.KE(chosen.dh.number, pub)]
        self._new = (chosen, chosen.spi, spi_r, nonce.data, nr, shared)
        return Result.DONE

    def sent(self, now: float) -> None:
        if self._new is None:
            return
        ctx = self.ctx
        chosen, spi_i, spi_r, ni, nr, shared = self._new
        new = rekeyed_sa(ctx, chosen, spi_i, spi_r, ni, nr, shared, initiator=False, now=now)
        if isinstance(ctx.tasks.active, IkeRekey):
            ctx.peer_rekey = new  # §2.8.2: both ends rekey this SA; decided once our own exchange ends
        else:
            take_over(ctx, new, now)


def rekeyed_sa(ctx: Context, chosen: props.Chosen, spi_i: bytes, spi_r: bytes, ni: bytes, nr: bytes, shared: bytes,
               *, initiator: bool, now: float) -> Context:  # fmt: skip
    """The new IKE SA of a rekey exchange (§2.18), established but not (yet) in charge of anything: the
    same peer, path, NAT state and identities, new SPIs and nonces, keys from the old SA's SK_d."""
    new = ctx.sibling(initiator=initiator, now=now)
    new.local_port = ctx.local_port
    new.nat, new.behind_nat, new.peer_behind_nat = ctx.nat, ctx.behind_nat, ctx.peer_behind_nat
    new.nat_fake = ctx.nat_fake
    new.peer_id = ctx.peer_id
    new.local_identity = ctx.local_identity
    new.spi_i, new.spi_r, new.ni, new.nr = spi_i, spi_r, ni, nr
    derive.install(new, chosen, shared, old=ctx)
    new.step(Step.REKEYED_IN)
    new.up_at = now
    new.last_heard = now
    new.standby = True
    return new


def is_ike_rekey(inner: list[m.AnyPayload]) -> bool:
    """A CREATE_CHILD_SA request rekeying the IKE SA: no REKEY_SA notify, one SA payload with an IKE proposal."""
    if any(isinstance(p, m.Notify) and p.notify_type == Notify.REKEY_SA for p in inner):
        return False
    sas = [p for p in inner if isinstance(p, m.SA)]
    return len(sas) == 1 and bool(sas[0].proposals) and sas[0].proposals[0].protocol == Protocol.IKE


def take_over(old: Context, new: Context, now: float, *, collision: bool = False,
              redundant: Context | None = None) -> None:  # fmt: skip
    """``new`` replaces ``old``: it gets the children (§2.18), the reauthentication time and the lease, and its
    lifetime starts now; ``old`` only waits for (or sends) its DELETE from here on."""
    new.standby = False
    new.lease = old.lease
    new.up_at = now
    schedule.schedule_ike_rekey(new, now)
    new.reauth_at, old.reauth_at = old.reauth_at, None  # rekeying is no reauthentication: the time stands
    new.children, old.children = old.children, []
    old.replaced_by(new)
    old.rekey_at = None
    old.step(Step.DELETE)
    old.delete_cause = "rekeyed"  # also if its DELETE goes unanswered
    old.count("ike_rekeys")
    old.report_rekeyed(new, collision, redundant)


def peer_rekey_wins(ctx: Context, now: float) -> bool:
    """§2.8.2: only the peer's rekey of this SA made a new SA (it had not seen ours): that one takes over.
    False if there is none (or the peer deleted it already)."""
    new, ctx.peer_rekey = ctx.peer_rekey, None
    if new is None or new.state == "closed":
        return False
    ctx.count("ike_rekey_collisions")
    take_over(ctx, new, now, collision=True)
    return True


def _collision(ctx: Context, ours: Context, now: float) -> None:
    """§2.8.2: both rekeys of this SA made a new IKE SA. As for child SAs (§2.8.1), the one made by the
    exchange with the lowest of the four nonces is redundant and is deleted by the end that initiated it;
    the other takes over, and its initiator deletes this (old) SA."""
    theirs, ctx.peer_rekey = ctx.peer_rekey, None
    assert theirs is not None
    ctx.count("ike_rekey_collisions")
    ours_redundant = min(ours.ni, ours.nr) < min(theirs.ni, theirs.nr)  # bytes compare octet by octet
    if theirs.state == "closed":  # the peer deleted its own already (its DELETE overtook its response)
        ours_redundant = False
    survivor, redundant = (theirs, ours) if ours_redundant else (ours, theirs)
    take_over(ctx, survivor, now, collision=True, redundant=redundant)
    if ours_redundant:
        redundant.delete(now, "rekeyed")
        ctx.linger_until = now + ctx.exchange_span()  # the peer deletes this SA
    else:
        if redundant.state != "closed":
            redundant.step(Step.PEER_DELETES)  # the peer made it and deletes it
            redundant.linger_until = now + redundant.exchange_span()
        ctx.tasks.perform(IkeDelete(ctx, retire=True), now)
