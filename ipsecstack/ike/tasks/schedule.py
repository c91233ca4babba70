"""The IKE SA's own clocks: rekey, hard lifetime and reauthentication times (RFC 7296 §1.3.2, §2.8, §2.8.3).

Rekey and reauthentication come a little early by a random amount (``rand_time``, or ``rekey_jitter``
of the time) so that both ends rarely act at once; the hard lifetime is rekey_time plus ``over_time``
(strongSwan's default: 10% of rekey_time). Functions of a task Context; :mod:`ipsecstack.ike.timers`
reads the times.
"""

from __future__ import annotations

from ipsecstack.ike.model import REAUTH_RETRY_DELAY, REAUTH_TRIES
from ipsecstack.ike.tasks.base import Context


def jitter(ctx: Context, t: float) -> float:
    """How much earlier than ``t`` (rekey_time, reauth_time) to act: random, up to ``rand_time`` (strongSwan's
    meaning; 0: exactly on time) or, by default, up to ``rekey_jitter`` (10%) of ``t``."""
    frac = int.from_bytes(ctx.rng(2), "big") / 65535
    return frac * ctx.cfg.rand_time if ctx.cfg.rand_time is not None else frac * ctx.cfg.rekey_jitter * t


def schedule_ike_rekey(ctx: Context, now: float) -> None:
    t = ctx.cfg.rekey_time
    if t:
        ctx.rekey_at = now + t - jitter(ctx, t)
        # strongSwan's over_time: if rekeying keeps failing, the IKE SA ends here (default 10% of rekey_time)
        over = ctx.cfg.over_time if ctx.cfg.over_time is not None else t / 10
        ctx.expire_at = now + t + over


def established(ctx: Context, now: float) -> None:
    """The clocks of a newly established IKE SA."""
    ctx.up_at = now
    schedule_ike_rekey(ctx, now)
    t = ctx.cfg.reauth_time
    if t:
        # strongSwan's reauth_time: independent of rekey_time, a little early by a random amount, like rekeys
        ctx.reauth_at = now + t - jitter(ctx, t)


def reauth_failed(ctx: Context, now: float) -> float | None:
    """The new IKE SA of our reauthentication failed: try again later, a bounded number of times.
    Returns when (None: no more tries)."""
    ctx.reauth_tries += 1
    ctx.count("reauths_failed")
    retry = now + REAUTH_RETRY_DELAY if ctx.reauth_tries < REAUTH_TRIES and ctx.established else None
    ctx.reauth_at = retry
    return retry
