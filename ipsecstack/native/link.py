"""The Datapath's side of a native engine: which SAs live there, their events, counters and moves.

Theory of operation
-------------------
A :class:`~ipsecstack.datapath.Datapath` built with a native :class:`~ipsecstack.native.engine.Engine`
keeps its SPD, SAD, acquires and policy checks in Python and hands the ESP work of every SA the engine
accepts to the engine. :class:`NativeLink` is that hand-over:

- :meth:`adopt` installs an SA into the engine when it enters the SAD. The engine refuses what it does
  not implement (AH, TFC padding, inbound selectors, a second inbound SA with the same SPI): such an SA
  stays on the Python transforms, and ``refused`` says why (``status`` shows it). An adopted SA has
  ``sa.native = True``; from then on the engine alone owns its sequence counter, replay window, byte and
  packet lifetimes and crypto drop counters, so that packets the engine's own threads carry and packets
  the Python datapath carries share one sequence space (no number is ever sent twice).
- The Python SA object becomes a mirror: :meth:`refresh` copies the engine's ``seq``, ``packets``,
  ``bytes`` and per-reason drops into it (added to what the object held when it was adopted). Reasons the
  Python side decides (``policy_mismatch``, say) are counted on the object directly, as before.
- Lifetimes: byte, packet and sequence limits fire inside the engine; :meth:`events` turns the engine's
  events into the SA's own ``expire_soft``/``expire_hard`` calls, so ``soft_fired``/``dead`` and the
  :class:`~ipsecstack.sa.SAEvent` objects are exactly those of the Python engine. Time limits are fired
  by the owner, which has the clock (:meth:`sync_time`): it tells the engine, whose echo of the event is
  then a no-op on the object (``expire_*`` are idempotent).
- :meth:`release` takes the SA's last counters and state into the object and removes it from the
  engine; the object is then a whole Python SA again (installing it anew carries its state over).
- "Seen": the engine raises one ``seen`` event when an inbound SA accepts a packet, then stays quiet for
  that SA until :meth:`rearm` (engine ``rearm_seen``); the Datapath hands those SPIs on
  (``Datapath.take_seen``). The SA object keeps ``seen`` set while adopted, so the Python engine's path
  never reports it twice.
- :meth:`move` makes an outbound SA follow its peer (RFC 7296 §2.23) in the engine under the SA's lock.
- Drops the engine returns to a Python batch call are counted by the Datapath in its ``drops`` and by the
  engine in ``stats()``; ``engine_refused`` keeps the former so that what the engine dropped on its own
  (its threads, :mod:`ipsecstack.native` forwarder) is the difference (:meth:`own_drops`).
"""

from __future__ import annotations

from typing import cast

from ipsecstack.errors import ConfigError
from ipsecstack.native.engine import Engine
from ipsecstack.sa import SecurityAssociation


class _Base:
    """What an SA object had counted before the engine took it over."""

    __slots__ = ("bytes", "drops", "packets")

    def __init__(self, sa: SecurityAssociation) -> None:
        self.packets = sa.packets
        self.bytes = sa.bytes
        self.drops = dict(sa.drops)


class NativeLink:
    """See the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sas: dict[tuple[str, int], SecurityAssociation] = {}
        self._base: dict[tuple[str, int], _Base] = {}
        self.refused: dict[int, tuple[SecurityAssociation, str]] = {}  # id(sa) -> (sa, why it stays on Python)
        self.engine_refused: dict[str, int] = {}

    def adopt(self, sa: SecurityAssociation) -> bool:
        """Install ``sa`` into the engine; False (and ``refused`` says why) when it stays on Python."""
        if sa.native:
            return True
        try:
            self.engine.install_sa(sa)
        except (ConfigError, ValueError, RuntimeError) as e:
            self.refused[id(sa)] = (sa, str(e))
            return False
        assert sa.direction is not None
        key = (sa.direction, sa.spi)
        self._base[key] = _Base(sa)
        self.sas[key] = sa
        sa.native = True
        sa.seen = True  # the engine reports this SA's traffic from now on
        return True

    def release(self, sa: SecurityAssociation) -> None:
        """``sa`` left the SAD: take its last counters, then remove it from the engine."""
        self.refused.pop(id(sa), None)
        if not sa.native or sa.direction is None:
            return
        key = (sa.direction, sa.spi)
        if self.sas.get(key) is not sa:
            return
        self._refresh_one(key, sa)
        self.engine.remove(sa.direction, sa.spi)
        del self.sas[key]
        del self._base[key]
        sa.native = False  # the object holds the whole state again: installing it anew carries it over
        sa.seen = False

    # --- packets (one at a time: the Datapath's batches keep their per-packet policy logic) -------

    def protect(self, sa: SecurityAssociation, pkt: bytes) -> bytes | str:
        return self.engine.protect(sa.spi, (pkt,))[0]

    def unprotect(self, pkt: bytes) -> bytes | str:
        return self.engine.unprotect((pkt,))[0]

    def refused_by_engine(self, reason: str) -> None:
        self.engine_refused[reason] = self.engine_refused.get(reason, 0) + 1

    # --- lifetimes ---------------------------------------------------------------------------------

    def events(self) -> list[SecurityAssociation]:
        """Apply the engine's lifetime events to the SA objects; the SAs that now have pending events."""
        touched: list[SecurityAssociation] = []
        for ev in self.engine.take_events():
            sa = self.sas.get((ev.direction, ev.spi))
            if sa is None:
                continue  # removed since (its hard event was fired by the owner's clock, say)
            if ev.kind == "hard":
                sa.expire_hard(ev.trigger)
            else:
                sa.expire_soft(ev.trigger)
            if sa.pending and sa not in touched:
                touched.append(sa)
        return touched

    def sync_time(self, sa: SecurityAssociation, was_soft: bool, was_dead: bool) -> None:
        """The owner's clock fired a time lifetime on ``sa``: the engine must refuse or report alike."""
        if not sa.native or sa.direction is None:
            return
        if sa.dead and not was_dead:
            self.engine.expire(sa.direction, sa.spi, True)
        elif sa.soft_fired and not was_soft:
            self.engine.expire(sa.direction, sa.spi, False)

    def take_seen(self) -> list[int]:
        return self.engine.take_seen()

    def rearm(self, spis: list[int]) -> None:
        """The next packet of each of these inbound SAs raises one ``seen`` event again."""
        self.engine.rearm_seen(spis)

    # --- peers and counters ------------------------------------------------------------------------

    def move(self, sa: SecurityAssociation) -> None:
        """``sa.move_peer`` changed an outbound SA's endpoint: the engine's copy follows (RFC 7296 §2.23)."""
        if sa.native and sa.direction == "out" and self.sas.get(("out", sa.spi)) is sa:
            dport = sa.udp_encap[1] if sa.udp_encap is not None else None
            self.engine.move(sa.spi, sa.outer_dst if sa.tunnel else None, dport)

    def replay_top(self, sa: SecurityAssociation) -> int:
        assert sa.direction is not None
        try:
            return cast(int, self.engine.sa_stats(sa.direction, sa.spi)["replay_top"])
        except KeyError:
            return sa.replay.top

    def refresh(self) -> None:
        """Copy the engine's counters of every adopted SA into its Python object."""
        for key, sa in self.sas.items():
            self._refresh_one(key, sa)

    def refresh_sa(self, sa: SecurityAssociation) -> None:
        if sa.direction is not None and self.sas.get((sa.direction, sa.spi)) is sa:
            self._refresh_one((sa.direction, sa.spi), sa)

    def _refresh_one(self, key: tuple[str, int], sa: SecurityAssociation) -> None:
        try:
            st = self.engine.sa_stats(*key)
        except KeyError:
            return
        base = self._base[key]
        sa.packets = base.packets + cast(int, st["packets"])
        sa.bytes = base.bytes + cast(int, st["bytes"])
        sa.seq = max(sa.seq, cast(int, st["seq"]))
        for reason, n in cast(dict[str, int], st["drops"]).items():
            sa.drops[reason] = base.drops.get(reason, 0) + n

    def own_drops(self) -> dict[str, int]:
        """Drops the engine made without a Python batch call seeing them (its forwarder threads)."""
        out: dict[str, int] = {}
        for reason, n in cast(dict[str, int], self.engine.stats()["drops"]).items():
            left = n - self.engine_refused.get(reason, 0)
            if left > 0:
                out[reason] = left
        return out
