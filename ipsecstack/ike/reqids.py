"""Reqids: what binds a child SA's SAs to their policies (strongSwan's meaning), decided in the core.

A rekey keeps the reqid of the SA it replaces (RFC 7296 §2.8: the policies stay and the newest
outbound SA takes over); a child with a trap policy (``traps``, by connection and child, the runtime's
reqids from a range of their own) takes the trap's; a child whose connection, child config, peer, mode
and traffic selectors are already up in another IKE SA (a reauthentication, §2.8.3, on either side)
takes that reqid, as strongSwan reuses reqids for identical selectors; else a fresh one from 1. A reqid
is free again once no child SA holds it. The manager calls ``assign`` for every ChildUp and ``release``
for every ChildDown, in the order it reports them.
"""

from __future__ import annotations

from ipsecstack.ike.session import ChildUp, IkeSa


class Reqids:
    def __init__(self) -> None:
        self.traps: dict[tuple[str, str], int] = {}  # (connection, child) -> the reqid of its trap policy
        self._last = 0  # the last reqid handed out
        self._by_spi: dict[int, int] = {}  # inbound SPI of a child SA up -> its reqid
        self._keys: dict[int, tuple[object, ...]] = {}  # reqid -> what its policies cover

    def assign(self, ev: ChildUp[IkeSa]) -> None:
        """Set the reqid of a child SA that came up, on its event and its record."""
        sa = ev.sa
        reqid = self._by_spi.get(ev.replaces) if ev.replaces is not None else None
        if reqid is None:
            reqid = self.traps.get((sa.cfg.name, ev.child.name))
        if reqid is None:
            peer = sa.peer_id if sa.peer_id is not None else sa.remote
            key = (sa.cfg.name, ev.child.name, peer, ev.mode, tuple(map(str, ev.local_ts)),
                   tuple(map(str, ev.remote_ts)))  # fmt: skip
            in_use = set(self._by_spi.values())
            reqid = next((r for r, k in self._keys.items() if k == key and r in in_use), None)
            if reqid is None:
                self._last += 1
                reqid = self._last
                self._keys[reqid] = key
        ev.reqid = reqid
        rec = next((c for c in sa.children if c.spi_in == ev.spi_in), None)
        if rec is not None:
            rec.reqid = reqid
        self._by_spi[ev.spi_in] = reqid

    def release(self, spi_in: int) -> None:
        """The child SA with this inbound SPI is gone."""
        reqid = self._by_spi.pop(spi_in, None)
        if reqid is not None and reqid not in self._by_spi.values():
            self._keys.pop(reqid, None)
