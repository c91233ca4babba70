"""Reauthentication (RFC 7296 §2.8.3) as strongSwan does it: make-before-break.

Theory of operation
-------------------
When an IKE SA says ``ReauthDue``, :meth:`Reauths.due` has the manager initiate a new IKE SA of the same
connection (fresh IKE_SA_INIT and IKE_AUTH, no INITIAL_CONTACT since the old one still exists) and
remembers the pair. After every settle step :meth:`Reauths.progress` looks at the pairs: once the new SA
is established, idle (its CREATE_CHILD_SA for further children done) and carries a child SA of every
configuration the old one had, the old SA (or its IKE-rekeyed successor) is deleted with cause
``"reauth"`` and ``IkeReauthed`` is reported; its children go as ``ChildDown(cause="ike")`` after the new
ones are up, so traffic has no gap. If the new SA fails, or comes up without all children (it is then
deleted), the old one stays and tries again later (``ReauthFailed``, with the time of the next try).
"""

from __future__ import annotations

from collections.abc import Callable

from ipsecstack.ike.session import Event, IkeDown, IkeReauthed, IkeSa, ReauthFailed
from ipsecstack.ike.tasks import schedule


class Reauths:
    """The reauthentications under way: (new IKE SA, the one it replaces)."""

    def __init__(self, start: Callable[[str, float], IkeSa], count: Callable[[str], None],
                 touched: Callable[[IkeSa], None]) -> None:  # fmt: skip
        self._start = start  # the manager's: initiate an IKE SA of a connection
        self._count = count
        self._touched = touched  # the manager's: an SA's timer moved (its heap entry is refreshed)
        self._pairs: list[tuple[IkeSa, IkeSa]] = []
        self._why: dict[int, str] = {}  # id(new IKE SA) -> why it closed

    def due(self, old: IkeSa, now: float) -> None:
        """``old`` asked to be reauthenticated: start its replacement, unless one is under way."""
        if not old.established or any(o is old for _, o in self._pairs):
            return
        new = self._start(old.cfg.name, now)  # no INITIAL_CONTACT: ``old`` still exists
        self._pairs.append((new, old))
        self._count("reauths_started")

    def closed(self, ev: IkeDown[IkeSa]) -> None:
        """An IKE SA went down: if it was a replacement, its reason is the failed reauthentication's."""
        if any(n is ev.sa for n, _ in self._pairs):
            self._why[id(ev.sa)] = ev.reason

    def progress(self, now: float) -> list[Event]:
        """Retire the old IKE SA of every reauthentication whose new SA is up with all its children."""
        out: list[Event] = []
        for pair in list(self._pairs):
            new, old = pair
            while old.successor is not None:
                old = old.successor  # the old one was IKE-rekeyed meanwhile: retire its successor
            if new.state not in ("closed", "established") or (new.established and not new.idle):
                continue  # still negotiating
            missing = sorted({c.child.name for c in old.children} - {c.child.name for c in new.children})
            if new.established and not missing:
                if old.state != "established":
                    self._pairs.remove(pair)  # it went meanwhile (expired, deleted): nothing to retire
                elif old.idle:
                    self._pairs.remove(pair)
                    old.delete(now, "reauth")
                    self._count("reauths")
                    out.append(IkeReauthed(old, new))
                continue  # else: once the old one's outstanding request is done
            self._pairs.remove(pair)
            why = self._why.pop(id(new), "the new IKE SA failed")
            if new.established:
                why = f"child SA(s) {', '.join(missing)} not negotiated" + (f": {new.failure}" if new.failure else "")
                new.delete(now)
            self._count("reauths_failed")
            if old.state == "established":
                out.append(ReauthFailed(old, why, schedule.reauth_failed(old, now)))
                self._touched(old)
        return out
