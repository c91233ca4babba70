"""The responder's side of an INFORMATIONAL exchange (RFC 7296 §1.4, §1.4.1, §2.21.2).

Deletes of child SAs are answered with the SPIs of our halves (SPIs are per protocol, RFC 4301 §4.1:
an AH delete names AH SAs only); a Delete of the IKE SA closes it once the (empty) answer is on its
way, unless a rekey of the peer's takes over first (§2.8.2); AUTHENTICATION_FAILED says the initiator
did not accept our IKE_AUTH response (§2.21.2). An empty request is a liveness check (§1.4): the
empty answer is all it needs.
"""

from __future__ import annotations

from ipsecstack.ike import message as m
from ipsecstack.ike.const import Exchange, Notify, Protocol
from ipsecstack.ike.model import REDUNDANT
from ipsecstack.ike.tasks.base import Context, Result, Task
from ipsecstack.ike.tasks.ike_rekey import peer_rekey_wins


def auth_refused(ctx: Context) -> None:
    """The peer says AUTHENTICATION_FAILED: close, naming what to check."""
    what = "PSK" if ctx.cfg.creds.local == "psk" else "certificate (is our CA in its cacerts?)"
    ctx.close(f"peer says AUTHENTICATION_FAILED: check the {what} and the identities on both sides")


class Informational(Task):
    exchange = Exchange.INFORMATIONAL

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, initiator=False)
        self._closing = self._refused = False

    def on_request(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        ctx = self.ctx
        for p in inner:
            if isinstance(p, m.Delete):
                if p.protocol == Protocol.IKE:
                    self._closing = True
                elif p.protocol in (Protocol.ESP, Protocol.AH):
                    ours = []
                    for spi in p.spis:
                        for c in list(ctx.children):
                            if c.spi_out == int.from_bytes(spi, "big") and c.child.ike_protocol == p.protocol:
                                ours.append(c.spi_in.to_bytes(4, "big"))
                                ctx.child_gone(c, "peer")
                    if ours:
                        self.reply.append(m.Delete(p.protocol, ours))
            elif isinstance(p, m.Notify) and p.notify_type == Notify.AUTHENTICATION_FAILED:
                self._refused = True
        return Result.DONE

    def sent(self, now: float) -> None:
        ctx = self.ctx
        if self._refused:
            auth_refused(ctx)
        elif self._closing:
            if ctx.successor is None:
                # §2.8.2: if the peer rekeyed this SA before it saw our rekey request, its new SA takes over
                peer_rekey_wins(ctx, now)
            if ctx.successor is not None:
                ctx.close("rekeyed", "rekeyed")
            elif ctx.standby:
                ctx.close(REDUNDANT, "rekeyed")  # a redundant new SA of a simultaneous rekey (§2.8.2)
            else:
                ctx.close("peer deleted the IKE SA", "peer")
