"""Child SAs into the datapath: what the IKE endpoint does with ChildUp, OutboundReady and ChildDown.

Theory of operation
-------------------
A ``ChildUp`` installs an inbound and an outbound SA with the ``reqid`` the core gave it, plus the SPD
policies for the negotiated traffic selectors (PROTECT bound to that reqid). A child SA whose reqid
other installed SAs carry already (a rekey, or a reauthentication on either side: the core reuses
reqids for identical selectors, as strongSwan does) continues them: the policies stay, the newest
outbound SA takes over, no updown script runs, and removing the old pair later leaves the policies
alone. A child SA rekeyed by the peer (``ChildUp.hold_out``, RFC 7296 §2.8) gets its inbound SA at once
and its outbound SA at the core's ``OutboundReady``. ``ChildDown`` removes the pair, and the policies
and the down script with the last pair of its reqid. Trap policies (``start_action = trap``) are the
agent's: a child that fills a trap installs SAs only.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import Any

from ipsecstack.datapath import Datapath
from ipsecstack.ike.install import child_objects
from ipsecstack.ike.session import ChildUp, IkeSa
from ipsecstack.runtime.updown import Updown
from ipsecstack.sa import SecurityAssociation
from ipsecstack.spd import Policy


def _fp(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:12]


class ChildInstaller:
    """The installed child SA pairs of one IKE endpoint, by inbound SPI (see the module docstring)."""

    def __init__(self, dp: Datapath, updown: Updown, *, log: Any, clock: Callable[[], float],
                 traps: Callable[[], dict[tuple[str, str], int]], changed: Callable[[], None]) -> None:  # fmt: skip
        self.dp = dp
        self.updown = updown
        self.log = log
        self.clock = clock
        self._traps = traps  # the trap reqids by (connection, child), as they are now (a reload changes them)
        self._changed = changed  # the SAD changed: the node flushes what it cached (Node.notify_sas_changed)
        # §2.8: outbound SAs of rekeys we answered, held back until the core says OutboundReady: spi_in -> SA
        self._pending_out: dict[int, SecurityAssociation] = {}
        self._spi_reqid: dict[int, int] = {}  # inbound SPI of an installed pair -> its reqid
        self.pairs: dict[int, tuple[SecurityAssociation, SecurityAssociation]] = {}  # inbound SPI -> (in, out)
        self._policies: dict[int, list[Policy]] = {}
        self._unique_ids: dict[int, int] = {}  # id(IkeSa) -> PLUTO_UNIQUEID, kept across IKE SA rekeys
        self._next_unique = 0

    def rekeyed(self, old: IkeSa, new: IkeSa) -> None:
        """An IKE SA rekey: the new IKE SA keeps the old one's unique id."""
        if id(old) in self._unique_ids:
            self._unique_ids[id(new)] = self._unique_ids.pop(id(old))

    def forget(self, sa: IkeSa) -> None:
        self._unique_ids.pop(id(sa), None)

    def _unique_id(self, sa: IkeSa) -> int:
        """strongSwan's IKE SA unique id (``PLUTO_UNIQUEID``); a rekeyed IKE SA keeps it."""
        if id(sa) not in self._unique_ids:
            self._next_unique += 1
            self._unique_ids[id(sa)] = self._next_unique
        return self._unique_ids[id(sa)]

    def install(self, ev: ChildUp[IkeSa]) -> None:
        sa = ev.sa
        rekey = ev.replaces is not None and ev.replaces in self._spi_reqid
        trap = self._traps().get((sa.cfg.name, ev.child.name))
        reqid = ev.reqid  # the manager's (a rekey keeps it, a trap's, or the one a reauthentication shares)
        # already carried by another SA pair (reauthentication, or a second IKE SA): make-before-break as a rekey
        continues = rekey or reqid in self._spi_reqid.values()
        inb, out, pols = child_objects(ev, reqid)
        now = self.clock()
        self.dp.install(inb, now)
        if ev.hold_out:
            # §2.8 (the core decides): the responder of a rekey sends on the new SA only once the initiator is
            # surely ready; until OutboundReady (traffic on the new inbound SA, or the core's timer), the old one
            # carries on
            self._pending_out[ev.spi_in] = out
        else:
            self.dp.install(out, now)
        self._spi_reqid[ev.spi_in] = reqid
        self.pairs[ev.spi_in] = (inb, out)
        if continues:
            self.updown.rekeyed(ev, reqid)  # strongSwan does not run the script for a rekey either
        else:
            self.updown.up(ev, reqid, self._unique_id(sa))
        if not continues and trap is None:
            for p in pols:
                self.dp.spd.add(p)
            self._policies[reqid] = pols
        self._changed()
        extra = {"reqid": reqid, "continues": True} if continues and not rekey else {}
        self.log.info("child sa rekeyed" if rekey else "child sa installed", conn=sa.cfg.name, child=ev.child.name,
                      mode=out.mode, transform=ev.transform, spi_in=f"0x{ev.spi_in:08x}", spi_out=f"0x{ev.spi_out:08x}",
                      encap=bool(ev.encap), local_ts=[str(r) for r in ev.local_ts],
                      remote_ts=[str(r) for r in ev.remote_ts], key_in_fp=_fp(ev.key_in),
                      key_out_fp=_fp(ev.key_out), **extra)  # fmt: skip

    def activate_out(self, spi_in: int, why: str) -> None:
        """Start sending on the outbound SA the core held back (§2.8, ``OutboundReady``)."""
        pending = self._pending_out.pop(spi_in, None)
        if pending is not None and spi_in in self.pairs:
            self.dp.install(pending, self.clock())
            self._changed()
            self.log.info("child sa outbound switched", spi_in=f"0x{spi_in:08x}", spi_out=f"0x{pending.spi:08x}",
                          why=why)  # fmt: skip

    def uninstall(self, spi_in: int) -> None:
        self._pending_out.pop(spi_in, None)
        reqid = self._spi_reqid.pop(spi_in, None)
        pair = self.pairs.pop(spi_in, None)
        if reqid is None or pair is None:
            return
        for s in pair:
            self.dp.remove(s)  # an outbound SA still held back was never installed: removing it is a no-op
        if reqid not in self._spi_reqid.values():
            for p in self._policies.pop(reqid, []):
                with contextlib.suppress(ValueError):
                    self.dp.spd.remove(p)
            self.updown.down(reqid)  # the child is gone, not just rekeyed
        self.log.info("child sa removed", spi_in=f"0x{spi_in:08x}", reqid=reqid)
