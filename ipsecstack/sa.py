"""Security Associations (RFC 4301 §4.1, §4.4.2): one direction of protected traffic.

Theory of operation
-------------------
An SA is one-way: the peers hold two (or more) of them, possibly with different algorithms in each
direction. It carries what RFC 4301 §4.4.2.1 lists for a SAD entry: SPI, protocol, mode, transform and
keys, tunnel endpoints, optional UDP encapsulation ports (RFC 3948), the sequence counter (outbound)
or anti-replay window (inbound), ESN, lifetimes and counters.

Sequence numbers (RFC 4303 §3.3.3): the first packet is 1; the counter never wraps. When the next
number would pass 2^32 - 1 (2^64 - 1 with ESN) the SA is exhausted and refuses to send; a soft event
fires ``SEQ_SOFT_MARGIN`` packets earlier so the key manager can rekey in time.

Lifetimes (RFC 4301 §4.4.2.1): soft and hard limits in seconds, bytes and packets. Crossing a soft
limit emits one ``soft`` event; crossing a hard limit marks the SA dead (it drops everything from
then on) and emits a ``hard`` event. Byte and packet limits are charged by the transforms per packet;
time limits are checked by the owner (the Datapath's timer) with the ``now`` it is given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from ipsecstack.crypto.contexts import AhContext, EspContext, esp_context
from ipsecstack.crypto.registry import AhSuite, EspSuite, parse_ah_transform, parse_esp_transform
from ipsecstack.entropy import Rng, system_rng
from ipsecstack.errors import ConfigError, Dropped, Reason
from ipsecstack.replay import DEFAULT_WINDOW, ReplayWindow
from ipsecstack.spd import Selector

SEQ_SOFT_MARGIN: Final = 1 << 20
_INF: Final = float("inf")


@dataclass(frozen=True, slots=True)
class Lifetime:
    """A set of limits; ``None`` means unlimited."""

    seconds: float | None = None
    bytes: int | None = None
    packets: int | None = None


@dataclass(frozen=True, slots=True)
class SAEvent:
    """A lifetime event: ``kind`` is ``soft`` (rekey now) or ``hard`` (the SA is dead)."""

    kind: Literal["soft", "hard"]
    sa: SecurityAssociation
    trigger: Literal["seconds", "bytes", "packets", "seq"]


def _addr(value: str | None, field: str) -> bytes | None:
    if value is None:
        return None
    try:
        return ipaddress.ip_address(value).packed
    except ValueError:
        raise ConfigError(field, value, "give an IPv4 or IPv6 address, e.g. 192.0.2.1 or 2001:db8::1") from None


def _key(value: bytes | str, suite: EspSuite | AhSuite, transform: str) -> bytes:
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value.replace(":", "").replace(" ", "").removeprefix("0x"))
        except ValueError:
            raise ConfigError("key", "<secret>", "give the key as bytes or as a hex string") from None
    if len(value) != suite.key_len:
        raise ConfigError(
            "key",
            f"<{len(value)} bytes>",
            f"{transform} needs {suite.key_len} bytes of key material ({suite.describe_key()})",
        )
    return bytes(value)


class SecurityAssociation:
    """One direction of an IPsec SA. See the module docstring for the model."""

    __slots__ = (
        "added_at",
        "ah_ctx",
        "bytes",
        "copy_dscp",
        "ctx",
        "dead",
        "df",
        "df_flags",
        "direction",
        "drops",
        "ecn",
        "esn",
        "hard",
        "key_material",
        "mode",
        "name",
        "native",
        "next_bytes",
        "next_packets",
        "outer_dst",
        "outer_proto",
        "outer_src",
        "outer_version",
        "packets",
        "pending",
        "proto_num",
        "protocol",
        "replay",
        "reqid",
        "rng",
        "seen",
        "selectors",
        "seq",
        "seq_max",
        "seq_soft",
        "soft",
        "soft_fired",
        "spi",
        "spi_bytes",
        "suite",
        "tfc_padding",
        "tos_mask",
        "transform",
        "ttl",
        "tunnel",
        "tunnel_dst",
        "tunnel_src",
        "udp_encap",
        "v4_sum_base",
)  # fmt: skip

    def __init__(
        self,
        spi: int,
        protocol: Literal["esp", "ah"] = "esp",
        mode: Literal["tunnel", "transport"] = "tunnel",
        transform: str = "aes128gcm16",
        key: bytes | str = b"",
        *,
        direction: Literal["out", "in"] | None = None,
        tunnel_src: str | None = None,
        tunnel_dst: str | None = None,
        esn: bool = False,
        replay_window: int = DEFAULT_WINDOW,
        udp_encap: tuple[int, int] | None = None,
        soft: Lifetime | None = None,
        hard: Lifetime | None = None,
        selectors: Iterable[Selector] = (),
        reqid: int | None = None,
        tfc_padding: int = 0,
        copy_dscp: bool = True,
        ecn: Literal["normal", "compat"] = "normal",
        df: Literal["copy", "set", "clear"] = "copy",
        ttl: int = 64,
        rng: Rng = system_rng,
        name: str = "",
    ) -> None:
        if not isinstance(spi, int) or not 0 < spi <= 0xFFFFFFFF:
            raise ConfigError("spi", spi, "use 1..4294967295; SPI 0 is reserved (RFC 4303 §2.1)")
        if protocol not in ("esp", "ah"):
            raise ConfigError("protocol", protocol, "use 'esp' or 'ah'")
        if mode not in ("tunnel", "transport"):
            raise ConfigError("mode", mode, "use 'tunnel' or 'transport'")
        if direction not in (None, "out", "in"):
            raise ConfigError("direction", direction, "use 'out' or 'in'")
        suite: EspSuite | AhSuite = (
            parse_esp_transform(transform) if protocol == "esp" else parse_ah_transform(transform)
        )
        self.spi = spi
        self.protocol = protocol
        self.mode = mode
        self.transform = suite.keyword
        self.suite = suite
        self.direction = direction
        self.name = name
        self.reqid = reqid
        self.tunnel_src = tunnel_src
        self.tunnel_dst = tunnel_dst
        self.outer_src = _addr(tunnel_src, "tunnel_src")
        self.outer_dst = _addr(tunnel_dst, "tunnel_dst")
        if mode == "tunnel":
            if self.outer_src is None or self.outer_dst is None:
                raise ConfigError(
                    "tunnel_dst" if self.outer_src else "tunnel_src",
                    None,
                    "tunnel mode needs tunnel_src and tunnel_dst (the gateways' outer addresses)",
                )
            if len(self.outer_src) != len(self.outer_dst):
                raise ConfigError("tunnel_dst", tunnel_dst, "tunnel_src and tunnel_dst must be the same IP family")
        self.outer_version = 0 if self.outer_src is None else (4 if len(self.outer_src) == 4 else 6)
        if udp_encap is not None:
            if protocol != "esp":
                raise ConfigError("udp_encap", udp_encap, "UDP encapsulation (RFC 3948) applies to ESP only")
            if len(udp_encap) != 2 or not all(isinstance(p, int) and 0 < p < 65536 for p in udp_encap):
                raise ConfigError("udp_encap", udp_encap, "give (source_port, destination_port), e.g. (4500, 4500)")
            udp_encap = (udp_encap[0], udp_encap[1])
        self.udp_encap = udp_encap
        if tfc_padding and (protocol != "esp" or mode != "tunnel"):
            raise ConfigError(
                "tfc_padding",
                tfc_padding,
                "TFC padding needs ESP in tunnel mode (RFC 4303 §2.4: the inner header gives the length)",
            )
        if not 0 <= tfc_padding <= 1024:
            raise ConfigError("tfc_padding", tfc_padding, "use 0..1024 bytes")
        if ecn not in ("normal", "compat"):
            raise ConfigError("ecn", ecn, "use 'normal' (RFC 6040 §4.1) or 'compat' (RFC 6040 §4.1.2)")
        if df not in ("copy", "set", "clear"):
            raise ConfigError("df", df, "use 'copy', 'set' or 'clear' (RFC 4301 §8.1)")
        if not 1 <= ttl <= 255:
            raise ConfigError("ttl", ttl, "use 1..255")
        self.esn = bool(esn)
        self.soft = soft or Lifetime()
        self.hard = hard or Lifetime()
        self.selectors = tuple(selectors)
        self.tfc_padding = tfc_padding
        self.copy_dscp = copy_dscp
        self.ecn = ecn
        self.df = df
        self.ttl = ttl
        self.rng = rng
        self.spi_bytes = spi.to_bytes(4, "big")
        self.proto_num = 50 if protocol == "esp" else 51
        self.tunnel = mode == "tunnel"
        # Tunnel-mode outer header: protocol, and the checksum contribution of its constant words
        # (version/IHL, TTL/protocol, addresses) so each packet adds only the variable ones.
        self.outer_proto = 17 if udp_encap is not None else self.proto_num
        # RFC 4301 §5.1.2.1 / RFC 6040 §4.1: which bits of the inner DS byte reach the outer header
        self.tos_mask = (0xFC if copy_dscp else 0) | (0x03 if ecn == "normal" else 0)
        # RFC 4301 §8.1: -1 = copy DF from the inner IPv4 header (set for inner IPv6)
        self.df_flags = -1 if df == "copy" else (0x4000 if df == "set" else 0)
        self.v4_sum_base = 0
        if self.outer_version == 4 and self.outer_src is not None and self.outer_dst is not None:
            words = self.outer_src + self.outer_dst
            self.v4_sum_base = (
                0x4500 + (ttl << 8 | self.outer_proto) + sum((words[i] << 8) | words[i + 1] for i in range(0, 8, 2))
            )
        key_bytes = _key(key, suite, self.transform)
        self.key_material = key_bytes  # only for the explicit key export (ipsecstack keys); never logged
        self.ctx: EspContext | None = None
        self.ah_ctx: AhContext | None = None
        if isinstance(suite, EspSuite):
            self.ctx = esp_context(suite, key_bytes, rng)
        else:
            self.ah_ctx = AhContext(suite, key_bytes)
        # outbound state
        self.seq = 0
        self.seq_max = (1 << 64) - 1 if self.esn else (1 << 32) - 1
        self.seq_soft = self.seq_max - SEQ_SOFT_MARGIN
        # inbound state
        self.replay = ReplayWindow(replay_window)
        # counters and lifetime state
        self.packets = 0
        self.bytes = 0
        self.drops: dict[str, int] = {}
        self.added_at: float | None = None
        self.soft_fired = False
        self.dead = False
        self.pending: list[SAEvent] = []
        # True while a native engine holds this SA's state (ipsecstack/native/link.py): seq, packets, bytes and
        # the engine's drop reasons here are then a mirror that the datapath refreshes
        self.native = False
        # inbound: accepted a packet that the datapath reported (Datapath.take_seen) and not re-armed since; a
        # native SA keeps it set, as the engine reports for it
        self.seen = False
        self._arm_limits()

    def _precompute_outer(self) -> None:
        self.v4_sum_base = 0
        if self.outer_version == 4 and self.outer_src is not None and self.outer_dst is not None:
            words = self.outer_src + self.outer_dst
            self.v4_sum_base = (
                0x4500
                + (self.ttl << 8 | self.outer_proto)
                + sum((words[i] << 8) | words[i + 1] for i in range(0, 8, 2))
            )

    def __repr__(self) -> str:
        d = f" {self.direction}" if self.direction else ""
        return f"<SA{d} {self.protocol} spi=0x{self.spi:08x} {self.mode} {self.transform}>"

    @property
    def overhead(self) -> int:
        """Worst-case bytes added to an inner packet (for MTU computations)."""
        hdr = 40 if self.outer_version == 6 else 20
        outer = hdr if self.mode == "tunnel" else 0
        if self.ctx is not None:
            ctx = self.ctx
            encap = 8 if self.udp_encap else 0
            return outer + encap + 8 + ctx.iv_len + (ctx.block - 1) + 2 + ctx.icv_len + self.tfc_padding
        assert self.ah_ctx is not None
        return outer + 12 + self.ah_ctx.icv_len + 4

    def move_peer(self, tunnel_dst: str | None, encap_dport: int | None) -> None:
        """Follow a peer whose NAT mapping changed (RFC 7296 §2.23): new outer destination and/or
        UDP encapsulation port for an outbound SA."""
        if tunnel_dst is not None and self.mode == "tunnel":
            dst = _addr(tunnel_dst, "tunnel_dst")
            assert dst is not None
            if len(dst) != len(self.outer_dst or b""):
                raise ConfigError("tunnel_dst", tunnel_dst, "the peer cannot change address family")
            self.tunnel_dst = tunnel_dst
            self.outer_dst = dst
            self._precompute_outer()
        if encap_dport is not None and self.udp_encap is not None:
            self.udp_encap = (self.udp_encap[0], encap_dport)

    # --- sequence numbers ------------------------------------------------------------------------

    def next_seq(self) -> int:
        """Allocate the next outbound sequence number (RFC 4303 §3.3.3: it never wraps)."""
        if self.dead:
            raise Dropped(Reason.SA_EXPIRED)
        seq = self.seq + 1
        if seq > self.seq_max:
            raise Dropped(Reason.SEQ_EXHAUSTED, "rekey: the sequence number would wrap")
        self.seq = seq
        if seq == self.seq_soft:
            self.expire_soft("seq")
        return seq

    def inbound_seq(self, seq_low: int) -> tuple[int, bytes]:
        """Full sequence number and ESN high bytes for a received low half, after the replay check.

        Raises ``Dropped`` (``replay``/``too_old``/``sa_expired``) for packets the window refuses.
        """
        if self.dead:
            raise Dropped(Reason.SA_EXPIRED)
        replay = self.replay
        if self.esn:
            seq = replay.infer(seq_low)
            if seq < 0:
                raise Dropped(Reason.TOO_OLD)
            seq_hi = (seq >> 32).to_bytes(4, "big")
        else:
            seq = seq_low
            seq_hi = b""
        why = replay.check(seq)
        if why is not None:
            raise Dropped(why)
        return seq, seq_hi

    # --- lifetimes -------------------------------------------------------------------------------

    def _arm_limits(self) -> None:
        soft, hard = self.soft, self.hard
        cand_p = [x for x in (None if self.soft_fired else soft.packets, hard.packets) if x is not None]
        cand_b = [x for x in (None if self.soft_fired else soft.bytes, hard.bytes) if x is not None]
        self.next_packets = min(cand_p) if cand_p else _INF
        self.next_bytes = min(cand_b) if cand_b else _INF

    def charge(self, nbytes: int) -> None:
        """Count one packet of ``nbytes`` and fire byte/packet lifetime events it crosses."""
        self.packets += 1
        self.bytes += nbytes
        if self.packets >= self.next_packets or self.bytes >= self.next_bytes:
            self.limits_crossed()

    def limits_crossed(self) -> None:
        """A byte or packet counter reached ``next_bytes``/``next_packets``: fire what is due."""
        hard = self.hard
        if (hard.packets is not None and self.packets >= hard.packets) or (
            hard.bytes is not None and self.bytes >= hard.bytes
        ):
            trigger: Literal["bytes", "packets"] = (
                "packets" if hard.packets is not None and self.packets >= hard.packets else "bytes"
            )
            self.expire_hard(trigger)
            return
        if not self.soft_fired:
            soft = self.soft
            trig: Literal["bytes", "packets"] = (
                "packets" if soft.packets is not None and self.packets >= soft.packets else "bytes"
            )
            self.expire_soft(trig)

    def expire_soft(self, trigger: Literal["seconds", "bytes", "packets", "seq"]) -> None:
        if self.soft_fired or self.dead:
            return
        self.soft_fired = True
        self._arm_limits()
        self.pending.append(SAEvent("soft", self, trigger))

    def expire_hard(self, trigger: Literal["seconds", "bytes", "packets", "seq"]) -> None:
        if self.dead:
            return
        self.dead = True
        self.next_packets = self.next_bytes = _INF
        self.pending.append(SAEvent("hard", self, trigger))

    def deadlines(self) -> tuple[float | None, float | None]:
        """Absolute times of the soft and hard time limits, given ``added_at``."""
        if self.added_at is None:
            return None, None
        s = None if self.soft.seconds is None or self.soft_fired else self.added_at + self.soft.seconds
        h = None if self.hard.seconds is None or self.dead else self.added_at + self.hard.seconds
        return s, h

    def check_time(self, now: float) -> None:
        """Fire time-based lifetime events that are due at ``now``."""
        soft_at, hard_at = self.deadlines()
        if hard_at is not None and now >= hard_at:
            self.expire_hard("seconds")
        elif soft_at is not None and now >= soft_at:
            self.expire_soft("seconds")

    def count_drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def take_events(self) -> list[SAEvent]:
        ev, self.pending = self.pending, []
        return ev
