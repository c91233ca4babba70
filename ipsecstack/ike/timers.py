"""When an IKE SA next needs the clock, and what is due then (RFC 7296 §1.3.2, §2.4, §2.8, §2.8.3).

Theory of operation
-------------------
Functions of the task :class:`~ipsecstack.ike.tasks.base.Context`; the IKE SA calls them from
``get_timer`` and ``handle_timer``. An established IKE SA has up to five clocks running: its own
rekey (``rekey_at``, from ``rekey_time`` a little early by a random amount, ``rand_time`` or
``rekey_jitter``, so that both ends rarely rekey at once), its hard lifetime (``expire_at``: rekey_time
plus ``over_time``, strongSwan's default 10% of rekey_time), reauthentication (``reauth_at``: only
reported, the manager makes the new IKE SA, make-before-break), each child's rekey (and, for a rekey we
answered, how long its new outbound SA waits at most, §2.8), and the
liveness check (``dpd_delay`` after the peer was last heard from: an authenticated message or inbound
ESP the datapath saw). A half-open responder SA gives up after ``half_open_timeout``; a "deleting" SA
waits for the peer's DELETE until ``linger_until``. A task that is due runs only when the window is
free; the retransmission of the outstanding request has its own time (:mod:`window`).
"""

from __future__ import annotations

from ipsecstack.ike.children import ChildSa
from ipsecstack.ike.model import REDUNDANT
from ipsecstack.ike.state import IkeState
from ipsecstack.ike.tasks.base import Context, Task
from ipsecstack.ike.tasks.child_delete import Dpd
from ipsecstack.ike.tasks.child_rekey import ChildRekey
from ipsecstack.ike.tasks.ike_rekey import IkeRekey


def next_time(ctx: Context, retransmit_at: float | None) -> float | None:
    """When the IKE SA next needs ``handle_timer`` (``retransmit_at``: of the outstanding request, if any)."""
    state = ctx.state
    if state is IkeState.CLOSED:
        return None
    if retransmit_at is not None:
        if state is IkeState.ESTABLISHED and ctx.expire_at is not None:
            return min(retransmit_at, ctx.expire_at)
        return retransmit_at
    if state is IkeState.INIT_DONE:
        return ctx.created + ctx.cfg.half_open_timeout
    if state is IkeState.DELETING:
        return ctx.linger_until  # waiting for the peer's DELETE after a rekey (tasks/ike_rekey.py)
    if state is not IkeState.ESTABLISHED:
        return None
    times = [c.rekey_at for c in ctx.children if c.rekey_at is not None]
    times += [c.out_held_until for c in ctx.children if c.out_held_until is not None]
    times += [t for t in (ctx.rekey_at, ctx.reauth_at, ctx.expire_at) if t is not None]
    if ctx.cfg.dpd_delay:
        times.append(ctx.last_heard + ctx.cfg.dpd_delay)
    return min(times) if times else None


def ended(ctx: Context, now: float, *, window_free: bool) -> bool:
    """Close the IKE SA if one of its lifetimes ended; True if it did."""
    state = ctx.state
    if state is IkeState.DELETING and window_free and ctx.linger_until is not None and now >= ctx.linger_until:
        # the peer did not delete it (RFC 7296 §2.8.2: the old SA, or a redundant one it made): we do
        ctx.close_now(REDUNDANT if ctx.standby else "rekeyed", now, "rekeyed")
        return True
    if state is IkeState.INIT_DONE and now >= ctx.created + ctx.cfg.half_open_timeout:
        ctx.close("half-open IKE SA timed out (no IKE_AUTH)")
        return True
    if state is IkeState.ESTABLISHED and ctx.expire_at is not None and now >= ctx.expire_at:
        over = ctx.expire_at - (ctx.up_at or 0.0) - (ctx.cfg.rekey_time or 0.0)
        ctx.close_now(f"not rekeyed within its hard lifetime (rekey_time + over_time = "
                      f"{ctx.cfg.rekey_time:g}s + {over:g}s)", now, "expired")  # fmt: skip
        return True
    return False


def holds_due(ctx: Context, now: float) -> list[ChildSa]:
    """The children whose outbound SA was held back long enough (§2.8: then it is used anyway)."""
    return [c for c in ctx.children if c.out_held_until is not None and c.out_held_until <= now]


def due_task(ctx: Context, now: float) -> Task | None:
    """The exchange an established IKE SA with a free window starts now: its rekey, a child's rekey, or DPD."""
    if ctx.rekey_at is not None and ctx.rekey_at <= now:
        return IkeRekey(ctx)
    due = next((c for c in ctx.children if c.rekey_at is not None and c.rekey_at <= now), None)
    if due is not None:
        return ChildRekey(ctx, due)
    if ctx.cfg.dpd_delay and now >= ctx.last_heard + ctx.cfg.dpd_delay:
        return Dpd(ctx)
    return None
