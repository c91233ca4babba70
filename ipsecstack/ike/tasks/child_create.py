"""CREATE_CHILD_SA for another child SA (RFC 7296 §1.3.1), both roles.

The initiator proposes a configured child (with PFS when its proposal has a group); the responder
picks the child that takes the offer (:func:`child_common.negotiate`) and answers with the narrowed
traffic selectors. AH across a NAT is refused before anything is sent (RFC 4302 authenticates the
outer header).
"""

from __future__ import annotations

from typing import Any

from ipsecstack.ike import message as m
from ipsecstack.ike.const import Exchange, Notify
from ipsecstack.ike.model import AH_NAT, ChildConfig
from ipsecstack.ike.tasks import child_common as cc
from ipsecstack.ike.tasks.base import Context, Result, Task


class ChildCreate(Task):
    exchange = Exchange.CREATE_CHILD_SA

    def __init__(self, ctx: Context, child: ChildConfig | None = None, *, initiator: bool = True) -> None:
        super().__init__(ctx, initiator=initiator)
        self.child = child
        self._spi_in = 0
        self._nonce = b""
        self._dh: Any = None
        self._up: tuple[cc.Negotiated, int, bytes, bytes, bytes | None] | None = None

    def about(self, subject: object) -> bool:
        return subject is self.child

    def request(self, now: float) -> list[m.AnyPayload] | None:
        child = self.child
        assert child is not None
        if self.ctx.nat and child.protocol == "ah":
            self.ctx.child_failed(f"child SA {child.name} not proposed: {AH_NAT}")
            return None
        inner, self._spi_in, self._nonce, self._dh = cc.request(self.ctx, child, child.local_ts, child.remote_ts,
                                                                child.mode, None)  # fmt: skip
        return inner

    def on_response(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        child = self.child
        assert child is not None
        answer = cc.check_answer(child, inner, self._dh)
        tsi, tsr = cc.selectors(inner)
        if isinstance(answer, str) or tsi is None or tsr is None:
            self.ctx.child_failed(f"child SA {child.name} refused: {answer if isinstance(answer, str) else 'no TS'}")
            return Result.FAILED
        chosen, nr, shared = answer
        ts = cc.answered_ts(self.ctx, child, self._spi_in, (child.local_ts, child.remote_ts), tsi, tsr)
        if ts is None:
            return Result.FAILED
        transport = any(isinstance(p, m.Notify) and p.notify_type == Notify.USE_TRANSPORT_MODE for p in inner)
        cc.child_up(self.ctx, child, chosen, "transport" if transport else "tunnel", ts[0], ts[1],
                    spi_in=self._spi_in, spi_out=int.from_bytes(chosen.spi, "big"), nonces=(self._nonce, nr),
                    shared=shared, we_initiated=True, now=now)  # fmt: skip
        return Result.DONE

    def on_request(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        nonce = next(p for p in inner if isinstance(p, m.Nonce))  # dispatch.py checked it is there
        result = cc.negotiate(self.ctx, inner, ignore_dh=False)
        if isinstance(result, int):
            self.reply = [m.Notify(result)]
            return Result.FAILED
        _child, chosen, mode, tsi, tsr = result
        self.reply, made = cc.reply(self.ctx, inner, chosen, mode, tsi, tsr)
        if made is None:
            return Result.FAILED
        spi_in, nr, shared = made
        self._up = (result, spi_in, nonce.data, nr, shared)
        return Result.DONE

    def sent(self, now: float) -> None:
        if self._up is None:
            return
        (child, chosen, mode, tsi, tsr), spi_in, ni, nr, shared = self._up
        cc.child_up(self.ctx, child, chosen, mode, tsr, tsi, spi_in=spi_in, spi_out=int.from_bytes(chosen.spi, "big"),
                    nonces=(ni, nr), shared=shared, we_initiated=False, now=now)  # fmt: skip
