"""INFORMATIONAL exchanges we start that delete child SAs (RFC 7296 §1.4.1), and the liveness check (§1.4).

``ChildDelete`` deletes one of our children (the peer answers with the SPIs of its half, §1.4.1);
``SpiDelete`` deletes SAs that are not, or no longer, among our children (the half of an AH child
the peer installed across a NAT); ``Dpd`` is the empty INFORMATIONAL request whose answer proves the
peer alive (§2.4: no answer makes the IKE SA dead, which the IKE SA's retransmission decides).
"""

from __future__ import annotations

from ipsecstack.ike import message as m
from ipsecstack.ike.children import ChildSa
from ipsecstack.ike.const import Exchange
from ipsecstack.ike.tasks.base import Context, Result, Task


class ChildDelete(Task):
    exchange = Exchange.INFORMATIONAL

    def __init__(self, ctx: Context, child: ChildSa) -> None:
        super().__init__(ctx)
        self.child = child

    def about(self, subject: object) -> bool:
        return subject is self.child

    def request(self, now: float) -> list[m.AnyPayload] | None:
        c = self.child
        if c not in self.ctx.children:
            return None  # gone meanwhile (the peer deleted it, or its IKE SA was rekeyed away)
        return [m.Delete(c.child.ike_protocol, [c.spi_in.to_bytes(4, "big")])]

    def on_response(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        self.ctx.child_gone(self.child)
        return Result.DONE


class SpiDelete(Task):
    exchange = Exchange.INFORMATIONAL

    def __init__(self, ctx: Context, delete: m.Delete) -> None:
        super().__init__(ctx)
        self.delete = delete

    def request(self, now: float) -> list[m.AnyPayload] | None:
        return [self.delete]


class Dpd(Task):
    exchange = Exchange.INFORMATIONAL

    def request(self, now: float) -> list[m.AnyPayload] | None:
        self.ctx.count("dpd_checks")
        return []
