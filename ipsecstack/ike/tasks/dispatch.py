"""Which task answers a peer's request (RFC 7296 §1.2-§1.4, §2.21, §2.25): by exchange type, the IKE SA's
state and, for CREATE_CHILD_SA, what the request carries. A request that fits no task gets the error notify
to answer instead (the IKE SA sends it)."""

from __future__ import annotations

from ipsecstack.ike import message as m
from ipsecstack.ike.const import Exchange, Notify, Protocol
from ipsecstack.ike.state import IkeState
from ipsecstack.ike.tasks.base import Context, Task
from ipsecstack.ike.tasks.child_create import ChildCreate
from ipsecstack.ike.tasks.child_rekey import ChildRekey
from ipsecstack.ike.tasks.ike_auth import IkeAuth
from ipsecstack.ike.tasks.ike_rekey import IkeRekey, is_ike_rekey
from ipsecstack.ike.tasks.informational import Informational


def responder(ctx: Context, msg: m.Message, inner: list[m.AnyPayload]) -> Task | list[m.AnyPayload]:
    """The responder task for this (authenticated, in-window) request, or the response that refuses it."""
    state, exchange = ctx.state, msg.exchange
    if exchange == Exchange.IKE_AUTH and state is IkeState.INIT_DONE:
        return IkeAuth(ctx, initiator=False)
    if exchange == Exchange.INFORMATIONAL and state in (IkeState.ESTABLISHED, IkeState.DELETING):
        return Informational(ctx)
    if exchange == Exchange.CREATE_CHILD_SA and state is IkeState.ESTABLISHED:
        return _create_child_sa(ctx, inner)
    if exchange == Exchange.CREATE_CHILD_SA and state is IkeState.DELETING and is_ike_rekey(inner):
        # §2.8.2, §2.25.2: this IKE SA is already rekeyed (or being deleted): a peer's rekey that crossed
        # ours is refused, and our DELETE of this SA tells the peer that our rekey stands
        ctx.count("ike_rekeys_refused")
        return [m.Notify(Notify.TEMPORARY_FAILURE)]
    if exchange == Exchange.CREATE_CHILD_SA:
        return [m.Notify(Notify.NO_ADDITIONAL_SAS)]
    return [m.Notify(Notify.INVALID_SYNTAX)]


def _create_child_sa(ctx: Context, inner: list[m.AnyPayload]) -> Task | list[m.AnyPayload]:
    """§1.3: a rekey of the IKE SA (an IKE proposal, no REKEY_SA), a new child SA (no REKEY_SA), or the rekey
    of the child SA that REKEY_SA names."""
    rekey = next((p for p in inner if isinstance(p, m.Notify) and p.notify_type == Notify.REKEY_SA), None)
    sas = [p for p in inner if isinstance(p, m.SA)]
    nonce = next((p for p in inner if isinstance(p, m.Nonce)), None)
    if len(sas) != 1 or nonce is None:
        return [m.Notify(Notify.INVALID_SYNTAX)]
    if rekey is None and sas[0].proposals and sas[0].proposals[0].protocol == Protocol.IKE:
        return IkeRekey(ctx, initiator=False)
    if rekey is None:
        return ChildCreate(ctx, initiator=False)
    return ChildRekey(ctx, initiator=False)
