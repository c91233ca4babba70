"""INFORMATIONAL with a Delete for the IKE SA (RFC 7296 §1.4.1), which takes its children with it.

``IkeDelete()`` is ours (``IkeSa.delete``): the SA is "deleting" while it is outstanding and closed by
the answer (or by the retransmission giving up). ``IkeDelete(retire=True)`` retires the old IKE SA a
rekey replaced (§2.8): the initiator of the surviving rekey sends it, and its answer closes the old
SA with cause ``"rekeyed"``.
"""

from __future__ import annotations

from ipsecstack.ike import message as m
from ipsecstack.ike.const import Exchange, Protocol
from ipsecstack.ike.model import REDUNDANT
from ipsecstack.ike.tasks.base import Context, Result, Task


class IkeDelete(Task):
    exchange = Exchange.INFORMATIONAL

    def __init__(self, ctx: Context, *, retire: bool = False) -> None:
        super().__init__(ctx)
        self.retire = retire

    def request(self, now: float) -> list[m.AnyPayload] | None:
        return [m.Delete(Protocol.IKE, [])]

    def on_response(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        if self.retire:
            self.ctx.close("rekeyed", "rekeyed")
        else:
            deleted(self.ctx)
        return Result.DONE


def deleted(ctx: Context) -> None:
    """The peer answered an INFORMATIONAL while this SA was being deleted: it is gone."""
    why = "reauthenticated" if ctx.delete_cause == "reauth" else "deleted"
    ctx.close(REDUNDANT if ctx.standby else why)
