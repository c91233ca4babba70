"""CREATE_CHILD_SA with REKEY_SA: rekeying a child SA make-before-break (RFC 7296 §1.3.3, §2.8, §2.8.1).

The initiator proposes a new pair for an old one; once the answer installs the new pair it deletes
the old one (``ChildDelete``). The responder answers for the child SA the REKEY_SA notify names (SPIs
are per protocol, RFC 4301 §4.1), with the old one's mode and traffic selectors.

Simultaneous rekeys (§2.8.1): when both ends rekey the same child SA, both new pairs come up; each
end notes every rekey of an old SA it saw complete (``Context.rekeys_done``), and once there are two,
the new SA made with the lowest of the four nonces is redundant and is deleted by the end that
initiated its exchange, which also deletes the old one.
"""

from __future__ import annotations

from typing import Any

from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.children import ChildSa
from ipsecstack.ike.const import Exchange, Notify
from ipsecstack.ike.tasks import child_common as cc
from ipsecstack.ike.tasks.base import Context, Result, Task
from ipsecstack.ike.tasks.child_delete import ChildDelete

RETRY = 30.0  # a refused rekey is tried again this much later; the old SA keeps carrying traffic


class ChildRekey(Task):
    exchange = Exchange.CREATE_CHILD_SA

    def __init__(self, ctx: Context, old: ChildSa | None = None, *, initiator: bool = True) -> None:
        super().__init__(ctx, initiator=initiator)
        self.old = old
        self._spi_in = 0
        self._nonce = b""
        self._dh: Any = None
        self._up: tuple[ChildSa, props.Chosen, int, bytes, bytes, bytes | None] | None = None

    def about(self, subject: object) -> bool:
        return subject is self.old

    def request(self, now: float) -> list[m.AnyPayload] | None:
        old = self.old
        assert old is not None
        old.rekey_at = None
        inner, self._spi_in, self._nonce, self._dh = cc.request(self.ctx, old.child, old.local_ts, old.remote_ts,
                                                                old.mode, old.spi_in)  # fmt: skip
        self.ctx.count("child_rekeys_started")
        return inner

    def on_response(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        old, ctx = self.old, self.ctx
        assert old is not None
        answer = cc.check_answer(old.child, inner, self._dh)
        if isinstance(answer, str):
            ctx.child_failed(f"rekey of child SA {old.child.name} refused: {answer}", "child_rekey_failed")
            old.rekey_at = now + RETRY
            return Result.FAILED
        chosen, nr, shared = answer
        new = cc.child_up(ctx, old.child, chosen, old.mode, old.local_ts, old.remote_ts, spi_in=self._spi_in,
                          spi_out=int.from_bytes(chosen.spi, "big"), nonces=(self._nonce, nr), shared=shared,
                          we_initiated=True, replaces=old.spi_in, now=now)  # fmt: skip
        ctx.count("child_rekeys")
        if not collision(ctx, old, self._nonce, nr, new, True, now):
            ctx.tasks.perform(
                ChildDelete(ctx, old), now
            )  # make-before-break: the new pair is in; retire the old (§2.8)
        return Result.DONE

    def on_request(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        ctx = self.ctx
        rekey = next(p for p in inner if isinstance(p, m.Notify) and p.notify_type == Notify.REKEY_SA)
        sa = next(p for p in inner if isinstance(p, m.SA))
        nonce = next(p for p in inner if isinstance(p, m.Nonce))  # dispatch.py checked all three are there
        spi = int.from_bytes(rekey.spi, "big") if len(rekey.spi) == 4 else -1
        old = next((c for c in ctx.children if spi in (c.spi_out, c.spi_in)
                    and c.child.ike_protocol == rekey.protocol), None)  # fmt: skip
        if old is None:
            self.reply = [m.Notify(Notify.CHILD_SA_NOT_FOUND, b"", rekey.protocol, rekey.spi)]
            return Result.FAILED
        chosen = props.select(old.child.proposals, sa.proposals, old.child.ike_protocol)
        if chosen is None or len(chosen.spi) != 4:
            self.reply = [m.Notify(Notify.NO_PROPOSAL_CHOSEN)]
            return Result.FAILED
        self.reply, made = cc.reply(ctx, inner, chosen, old.mode, old.remote_ts, old.local_ts)
        if made is None:
            return Result.FAILED
        spi_in, nr, shared = made
        self._up = (old, chosen, spi_in, nonce.data, nr, shared)
        return Result.DONE

    def sent(self, now: float) -> None:
        if self._up is None:
            return
        ctx = self.ctx
        old, chosen, spi_in, ni, nr, shared = self._up
        new = cc.child_up(ctx, old.child, chosen, old.mode, old.local_ts, old.remote_ts, spi_in=spi_in,
                          spi_out=int.from_bytes(chosen.spi, "big"), nonces=(ni, nr), shared=shared,
                          we_initiated=False, replaces=old.spi_in, now=now)  # fmt: skip
        ctx.count("child_rekeys")
        ours = ctx.tasks.active
        if (isinstance(ours, ChildRekey) and ours.old is old) or old.spi_in in ctx.rekeys_done:
            collision(ctx, old, ni, nr, new, False, now)


def collision(ctx: Context, old: ChildSa, ni: bytes, nr: bytes, new: ChildSa, we_initiated: bool,
              now: float) -> bool:  # fmt: skip
    """§2.8.1: note a completed rekey of ``old``; on the second one, both ends rekeyed it. The new SA made with
    the lowest of the four nonces is redundant and is deleted by the end that initiated its exchange, which
    deletes the old one too. True if this was a collision."""
    done = ctx.rekeys_done.setdefault(old.spi_in, [])
    done.append((ni, nr, new, we_initiated))
    if len(done) < 2:
        return False
    ctx.count("rekey_collisions")
    (a_ni, a_nr, a_new, a_ours), (b_ni, b_nr, b_new, b_ours) = done[:2]
    del ctx.rekeys_done[old.spi_in]
    redundant, ours = (a_new, a_ours) if min(a_ni, a_nr) < min(b_ni, b_nr) else (b_new, b_ours)
    if ours:
        ctx.tasks.queue(ChildDelete(ctx, redundant))
    if old in ctx.children and we_initiated:
        ctx.tasks.queue(ChildDelete(ctx, old))
    ctx.tasks.next_queued(now)
    return True
