"""Shared pieces of the IKE tests: two peers' configurations, a wire that moves datagrams between two IKE
SAs by hand (seeded rng, fake clock: DESIGN.md §6 layer 2), and a pump for two IkeManagers."""

from __future__ import annotations

import ipaddress

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import Protocol
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.session import ChildConfig, Datagram, IkeSa, PeerConfig, identity
from ipsecstack.ike.ts import Range

A, B = "172.31.0.1", "172.31.0.2"


def ts_range(cidr: str) -> Range:
    n = ipaddress.ip_network(cidr)
    return Range(n.network_address, n.broadcast_address)


def ike_config(local: str, remote: str, lnet: str, rnet: str, *, ike: str = "aes128gcm16-prfsha256-x25519",
               esp: str = "aes128gcm16", psk: bytes = b"correct horse", mode: str = "tunnel",
               remote_id: str | None = None) -> PeerConfig:  # fmt: skip
    child = ChildConfig("net", [ts_range(lnet)], [ts_range(rnet)], [props.parse(esp, Protocol.ESP)], mode)
    return PeerConfig(
        "conn", local, remote, [props.parse(p, Protocol.IKE) for p in ike.split(",")], identity(local),
        identity(remote_id) if remote_id else None, psk, [child],
    )  # fmt: skip


class Wire:
    """Moves datagrams between an initiator and a responder, creating the responder on first contact."""

    def __init__(self, cfg_i: PeerConfig, cfg_r: PeerConfig, seed: int = 1) -> None:
        self.cfg_r = cfg_r
        self.i = IkeSa(cfg_i, initiator=True, rng=seeded_rng(seed), now=0.0)
        self.r: IkeSa | None = None
        self.rng_r = seeded_rng(seed + 1000)
        self.src_seen_by_r = A
        self.log: list[tuple[str, Datagram]] = []

    def to_responder(self, dgs: list[Datagram], now: float) -> None:
        for d in dgs:
            self.log.append(("i->r", d))
            msg = m.decode(d.data)
            if self.r is None or (msg.exchange == 34 and not msg.is_response and self.r.state == "new"):
                self.r = IkeSa(self.cfg_r, initiator=False, rng=self.rng_r, now=now, remote=self.src_seen_by_r,
                               remote_port=d.src_port)  # fmt: skip
                if not self.r.respond_init(msg, now):
                    pass
            else:
                self.r.receive(d.data, self.src_seen_by_r, d.src_port, d.dst_port, now)

    def to_initiator(self, dgs: list[Datagram], now: float) -> None:
        for d in dgs:
            self.log.append(("r->i", d))
            self.i.receive(d.data, B, d.src_port, d.dst_port, now)

    def run(self, now: float = 0.0, rounds: int = 10) -> None:
        if self.i.state == "new":
            self.i.start(now)
        for _ in range(rounds):
            out_i = self.i.datagrams()
            self.to_responder(out_i, now)
            out_r = self.r.datagrams() if self.r else []
            self.to_initiator(out_r, now)
            if not out_i and not out_r:
                return


def sa_events(sa: IkeSa | None) -> list[object]:
    return sa.events() if sa else []


def child_events(sa: IkeSa | None) -> list[object]:
    return [e for e in sa_events(sa) if type(e).__name__ in ("ChildUp", "ChildDown")]


def pump_managers(a: object, b: object, now: float) -> tuple[list[object], list[object]]:
    """Move datagrams between two IkeManagers until quiet; returns (events of a, events of b)."""
    assert isinstance(a, IkeManager) and isinstance(b, IkeManager)
    ev_a: list[object] = []
    ev_b: list[object] = []
    for _ in range(20):
        moved = False
        for src, dst, addr, evs in ((a, b, A, ev_a), (b, a, B, ev_b)):
            for d in src.datagrams():
                moved = True
                dst.receive(d.data, addr, d.src_port, d.dst_port, now)
            evs += src.events()
        if not moved:
            break
    ev_a += a.events()
    ev_b += b.events()
    return ev_a, ev_b
