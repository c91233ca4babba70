"""The native engine's Python face: SAs from :class:`SecurityAssociation`, typed events, test-mode IVs.

Theory of operation
-------------------
:class:`Engine` is the C type ``ipsecstack.native._engine.Engine`` (see ``engine.h`` beside this file
for how it works) plus what is easier in Python:

- :meth:`Engine.install_sa` installs a validated :class:`~ipsecstack.sa.SecurityAssociation` (the
  control plane builds those anyway): its SPI, direction, transform and key bytes, mode, tunnel
  endpoints, ESN, window, UDP encapsulation, byte/packet lifetimes, header rules, and its current
  state (sequence counter, window top and the numbers the window has marked, what is left of each
  byte/packet limit), so an SA can move from the Python engine to the native one without reusing a
  sequence number or accepting a replay. The native counters start from zero.
  What the native engine does not implement is refused with a :class:`ConfigError` naming the field:
  AH, TFC padding, inbound selector checks (RFC 4301 §5.2).
- Time lifetimes stay with the owner, which has the clock: it calls ``expire(direction, spi, hard)``
  when one is due (trigger ``seconds``), as :meth:`SecurityAssociation.check_time` does.
- ``protect(spi, packets)`` / ``unprotect(packets)`` return, per packet, the resulting bytes or the
  drop reason (a :class:`~ipsecstack.errors.Reason` string); counters are in ``sa_stats`` and
  ``stats``, lifetime events in :meth:`take_events`; the inbound SAs that accepted a packet since they were
  installed or re-armed (``rearm_seen``) in :meth:`take_seen`, one event per SA and re-arm.
- AES-CBC IVs come from OpenSSL's CSPRNG. For byte-for-byte comparison with the Python engine, an SA
  may be installed with an ``rng`` (a copy of the Python SA's injected one): protect draws ``rng(16)``
  per packet of the batch before the GIL is released, the engine feeds one to its CBC stream per
  packet it seals, exactly as ``CbcHmacContext`` does, and the seeds of refused packets are kept for
  the next ones, so both engines turn the same bytes into the same IVs. For tests and reproducible
  demos only, like ``seeded_rng``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

from ipsecstack.entropy import Rng
from ipsecstack.errors import ConfigError, Reason
from ipsecstack.native import _engine
from ipsecstack.sa import SecurityAssociation

Buffer = bytes | bytearray | memoryview


def _left(limit: int | None, used: int) -> int | None:
    return None if limit is None else max(0, limit - used)


class NativeEvent(NamedTuple):
    """A lifetime event: ``soft`` (rekey now) or ``hard`` (the SA is dead and refuses everything)."""

    kind: Literal["soft", "hard"]
    direction: Literal["in", "out"]
    spi: int
    trigger: Literal["seconds", "bytes", "packets", "seq"]


class _Seeds:
    """Test-mode CBC IV seeds of one outbound SA: the injected rng and bytes drawn but not used yet."""

    __slots__ = ("pool", "rng")

    def __init__(self, rng: Rng) -> None:
        self.rng = rng
        self.pool = b""


class Engine(_engine.Engine):
    """The native ESP engine; see the module docstring."""

    __slots__ = ("_rngs", "_seen")

    def __init__(self) -> None:
        super().__init__()
        self._rngs: dict[int, _Seeds] = {}
        self._seen: list[int] = []

    def install_sa(self, sa: SecurityAssociation, *, rng: Rng | None = None) -> None:
        """Install ``sa`` (with its current state). ``rng``: CBC IV seeds for tests, see the module docstring."""
        if sa.protocol != "esp":
            raise ConfigError(
                "protocol", sa.protocol, "the native engine implements ESP; AH stays on the Python datapath"
            )
        if sa.direction is None:
            raise ConfigError("direction", None, f"{sa!r}: set direction='in' or 'out' before installing it")
        if sa.tfc_padding:
            raise ConfigError("tfc_padding", sa.tfc_padding, "the native engine sends no TFC padding; use 0")
        if sa.dead:
            raise ConfigError("sa", repr(sa), "its hard lifetime expired: it cannot be installed")
        if sa.direction == "in" and sa.selectors:
            raise ConfigError(
                "selectors",
                "<selectors>",
                "the native engine does not check inbound selectors yet (RFC 4301 §5.2); keep this SA on the "
                "Python datapath",
            )
        self.install(
            sa.spi,
            sa.direction,
            sa.transform,
            sa.key_material,
            mode=sa.mode,
            tunnel_src=sa.outer_src if sa.tunnel else None,
            tunnel_dst=sa.outer_dst if sa.tunnel else None,
            esn=sa.esn,
            replay_window=sa.replay.size,
            udp_encap=sa.udp_encap,
            # the limits carry what is left of them: the native counters start from zero
            soft_bytes=None if sa.soft_fired else _left(sa.soft.bytes, sa.bytes),
            soft_packets=None if sa.soft_fired else _left(sa.soft.packets, sa.packets),
            hard_bytes=_left(sa.hard.bytes, sa.bytes),
            hard_packets=_left(sa.hard.packets, sa.packets),
            seq=sa.seq,
            replay_top=sa.replay.top,
            replay_seen=sa.replay.snapshot() if sa.replay.top else None,
            ttl=sa.ttl,
            copy_dscp=sa.copy_dscp,
            ecn=sa.ecn,
            df=sa.df,
        )
        if rng is not None and sa.direction == "out" and sa.ctx is not None and sa.ctx.iv_len == 16:
            self._rngs[sa.spi] = _Seeds(rng)

    def remove(self, direction: str, spi: int) -> bool:
        if direction == "out":
            self._rngs.pop(spi, None)
        return super().remove(direction, spi)

    def protect(self, spi: int, packets: Sequence[Buffer], rand: bytes | None = None) -> list[bytes | str]:
        """Protect ``packets`` with the outbound SA ``spi``: per packet the ESP packet or the drop reason."""
        seeds = self._rngs.get(spi) if rand is None and self._rngs else None
        if seeds is None:
            return super().protect(spi, packets, rand)
        want = 16 * len(packets)
        rand = seeds.pool[:want]
        rest = seeds.pool[want:]
        rand += b"".join([seeds.rng(16) for _ in range((want - len(rand)) // 16)])
        out = super().protect(spi, packets, rand)
        # only packets that reached the cipher used their 16 bytes; the others' go to the next packets,
        # so the seeds meet the cipher in the order the Python engine draws them (one per sealed packet)
        used = sum(1 for r in out if not isinstance(r, str) or r == Reason.CRYPTO_ERROR)
        seeds.pool = rand[16 * used :] + rest
        return out

    def take_events(self) -> list[NativeEvent]:
        """Lifetime events since the last call, oldest first (``poll_events`` typed; its ``seen`` events
        wait for :meth:`take_seen`)."""
        out: list[NativeEvent] = []
        for kind, direction, spi, trigger in super().poll_events():
            if kind == "seen":
                self._seen.append(spi)
            else:
                out.append(NativeEvent(kind, direction, spi, trigger))
        return out

    def take_seen(self) -> list[int]:
        """Inbound SPIs whose SA accepted a packet since it was installed or re-armed (``rearm_seen``), each
        once, oldest first, as far as :meth:`take_events` has read the engine's queue."""
        out, self._seen = self._seen, []
        return out
