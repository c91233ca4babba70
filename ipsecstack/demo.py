"""``ipsecstack demo``: two peers in one process, IKEv2 then ESP traffic over in-memory links.

Gateway A (192.0.2.1, LAN 10.1.0.0/16) and gateway B (192.0.2.2, LAN 10.2.0.0/16) share a PSK.
A initiates: IKE_SA_INIT and IKE_AUTH are printed as they cross the wire, the negotiated suites,
SPIs and key fingerprints (never the keys) are shown, the child SAs go into each side's datapath,
and then ICMP/TCP/UDP packets flow both ways through two asyncio Nodes over in-memory links with a
little loss and reordering; finally A deletes the IKE SA and B tears down too. Exit status 0 means
both sides agreed, every delivered packet was intact and no unexpected drops happened.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import struct
import time
from collections.abc import Callable

from backends.memory import MemoryLink
from ipsecstack.datapath import Datapath
from ipsecstack.entropy import system_rng
from ipsecstack.errors import ConfigError
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import Exchange, Protocol
from ipsecstack.ike.install import child_objects
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.session import ChildConfig, ChildDown, ChildUp, IkeDown, IkeSa, IkeUp, PeerConfig, identity
from ipsecstack.ike.ts import Range
from ipsecstack.runtime import logs
from ipsecstack.runtime.node import Node
from ipsecstack.wire import ip

GW_A, GW_B = "192.0.2.1", "192.0.2.2"
PSK = os.urandom(24)


def _range(cidr: str) -> Range:
    n = ipaddress.ip_network(cidr)
    return Range(n.network_address, n.broadcast_address)


def _peer(name: str, local: str, remote: str, lnet: str, rnet: str, ike: str, esp: str, mode: str) -> PeerConfig:
    child = ChildConfig("net", [_range(lnet)], [_range(rnet)], [props.parse(esp, Protocol.ESP)], mode)
    return PeerConfig(name, local, remote, [props.parse(ike, Protocol.IKE)], identity(f"{name}.example"),
                      identity(("b" if name == "a" else "a") + ".example"), PSK, [child])  # fmt: skip


def _describe(data: bytes) -> str:
    msg = m.decode(data)
    kind = "response" if msg.is_response else "request"
    names = []
    for p in msg.payloads:
        if isinstance(p, m.Encrypted):
            names.append("SK{encrypted}")
        elif isinstance(p, m.Notify):
            from ipsecstack.ike.const import Notify

            try:
                names.append(f"N({Notify(p.notify_type).name})")
            except ValueError:
                names.append(f"N({p.notify_type})")
        else:
            names.append(type(p).__name__)
    return f"{Exchange(msg.exchange).name} {kind} #{msg.message_id} ({len(data)} bytes): {', '.join(names)}"


def _fp(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:12]


def _exchange(
    a: IkeManager, b: IkeManager, out: Callable[[str], None]
) -> dict[str, list[ChildUp[IkeSa] | ChildDown[IkeSa]]]:
    """Move datagrams between the two managers until quiet (bounded), printing messages and events;
    returns the child SA events of each side."""
    now = time.monotonic()
    ups: dict[str, list[ChildUp[IkeSa] | ChildDown[IkeSa]]] = {"A": [], "B": []}
    for _ in range(20):
        moved = False
        for src_name, src, dst, src_addr in (("A", a, b, GW_A), ("B", b, a, GW_B)):
            for d in src.datagrams():
                moved = True
                out(f"  {src_name} -> {'B' if src_name == 'A' else 'A'}  {_describe(d.data)}")
                dst.receive(d.data, src_addr, d.src_port, d.dst_port, now)
            for ev in src.events():
                if isinstance(ev, IkeUp):
                    suite = ev.sa.chosen.describe() if ev.sa.chosen else "?"
                    out(f"  {src_name}: IKE SA established, {suite}, SPIs {ev.sa.spi_i.hex()}/{ev.sa.spi_r.hex()}")
                elif isinstance(ev, ChildDown):
                    ups[src_name].append(ev)
                    out(f"  {src_name}: child SA with SPI in 0x{ev.spi_in:08x} deleted")
                elif isinstance(ev, ChildUp):
                    ups[src_name].append(ev)
                    what = "rekeyed" if ev.replaces is not None else "up"
                    out(f"  {src_name}: child SA {ev.child.name} {what}: {ev.mode}, ESP {ev.transform}, "
                        f"SPI in 0x{ev.spi_in:08x} out 0x{ev.spi_out:08x}, "
                        f"{', '.join(map(str, ev.local_ts))} <-> {', '.join(map(str, ev.remote_ts))}, "
                        f"key fingerprints in {_fp(ev.key_in)} out {_fp(ev.key_out)}")  # fmt: skip
                elif isinstance(ev, IkeDown):
                    out(f"  {src_name}: IKE SA closed ({ev.reason})")
        if not moved:
            break
    return ups


def _packets(src: str, dst: str, n: int) -> list[bytes]:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    pkts = []
    for i in range(n):
        proto = (1, 6, 17)[i % 3]
        body = struct.pack("!I", i) + os.urandom(16 + (i * 37) % 1300)
        pkts.append(ip.build_ipv4(0, 20 + len(body), i, True, 64, proto, s, d) + body)
    return pkts


async def _traffic(
    dp_a: Datapath, dp_b: Datapath, n: int, host_a: str, host_b: str
) -> tuple[list[bytes], list[bytes], list[bytes], list[bytes], MemoryLink]:
    app_a, wire, app_b = MemoryLink(), MemoryLink(loss=0.01, reorder=0.02, seed=7), MemoryLink()
    node_a = Node(dp_a, app_a.b, wire.a, name="A")
    node_b = Node(dp_b, app_b.a, wire.b, name="B")
    node_a.start()
    node_b.start()
    ab, ba = _packets(host_a, host_b, n), _packets(host_b, host_a, n)
    for i in range(0, n, 32):
        app_a.a.write_batch(ab[i : i + 32])
        app_b.b.write_batch(ba[i : i + 32])
        await asyncio.sleep(0)
    for _ in range(200):  # bounded wait for the links to drain
        await asyncio.sleep(0.005)
        if not any(p.pending for p in (app_a.b, wire.a, wire.b, app_b.a)):
            break
    got_b, got_a = app_b.b.drain(), app_a.a.drain()
    node_a.stop()
    node_b.stop()
    return ab, ba, got_b, got_a, wire


def _traffic_round(dp_a: Datapath, dp_b: Datapath, packets: int, host_a: str, host_b: str,
                   out: Callable[[str], None]) -> bool:  # fmt: skip
    ab, ba, got_b, got_a, wire = asyncio.run(_traffic(dp_a, dp_b, packets, host_a, host_b))
    intact_b = set(got_b) <= set(ab)
    intact_a = set(got_a) <= set(ba)
    out(f"  A -> B: {len(got_b)}/{len(ab)} delivered intact" + ("" if intact_b else " (CORRUPTED)"))
    out(f"  B -> A: {len(got_a)}/{len(ba)} delivered intact" + ("" if intact_a else " (CORRUPTED)"))
    out(f"  lost on the wire: {wire.lost}, reordered: {wire.reordered}; datapath drops A {dp_a.drops or 'none'}, "
        f"B {dp_b.drops or 'none'}")  # fmt: skip
    for name, dp in (("A", dp_a), ("B", dp_b)):
        dp.refresh()
        for sa in dp.sad:
            out(f"  {name} SA {sa.direction:>3} spi 0x{sa.spi:08x}: {sa.packets} packets, {sa.bytes} bytes")
    complete = len(got_a) + len(got_b) + wire.lost == 2 * packets
    return intact_a and intact_b and complete and not dp_a.drops and not dp_b.drops


def _engine(datapath: str | None, out: Callable[[str], None]) -> Callable[[], Datapath]:
    """Datapaths on the engine asked for, or the native one where it was built."""
    from ipsecstack import native

    if datapath == "native" and not native.available:
        raise ConfigError("--datapath", "native", f"{native.why_not}; or use --datapath python")
    if datapath == "python" or not native.available:
        why = "" if datapath == "python" else f" ({native.why_not})"
        out(f"  ESP datapath: the Python reference engine{why}")
        return Datapath
    from ipsecstack.native import Engine, _engine

    out(f"  ESP datapath: the native engine ({_engine.OPENSSL_VERSION})")
    return lambda: Datapath(engine=Engine())


def run(mode: str = "tunnel", proposal: str = "aes128gcm16-prfsha256-x25519", esp: str = "aes128gcm16",
        packets: int = 300, out: Callable[[str], None] = print, *, datapath: str | None = None) -> int:  # fmt: skip
    logs.configure("console", "warning")
    lnet, rnet = ("10.1.0.0/16", "10.2.0.0/16") if mode == "tunnel" else (GW_A + "/32", GW_B + "/32")
    host_a, host_b = ("10.1.0.10", "10.2.0.20") if mode == "tunnel" else (GW_A, GW_B)
    peer_a = _peer("a", GW_A, GW_B, lnet, rnet, proposal, esp, mode)
    peer_b = _peer("b", GW_B, GW_A, rnet, lnet, proposal, esp, mode)
    a, b = IkeManager([peer_a], system_rng), IkeManager([peer_b], system_rng)
    out(f"ipsecstack demo: two gateways, IKEv2 with a pre-shared key, then ESP ({mode} mode)")
    out(f"  A {GW_A} protects {lnet}; B {GW_B} protects {rnet}; proposals IKE {proposal}, ESP {esp}")
    make_datapath = _engine(datapath, out)
    out("IKEv2:")
    a.initiate("a", time.monotonic())
    ups = _exchange(a, b, out)
    ups_a = [e for e in ups["A"] if isinstance(e, ChildUp)]
    ups_b = [e for e in ups["B"] if isinstance(e, ChildUp)]
    if len(ups_a) != 1 or len(ups_b) != 1:
        out("demo FAILED: no child SA was negotiated")
        return 1
    ua, ub = ups_a[0], ups_b[0]
    agree = ua.key_out == ub.key_in and ua.key_in == ub.key_out and ua.spi_out == ub.spi_in
    out(f"  both sides derived the same KEYMAT: {'yes' if agree else 'NO'}")
    dp_a, dp_b = make_datapath(), make_datapath()
    for dp, ev in ((dp_a, ua), (dp_b, ub)):
        inb, outb, pols = child_objects(ev, reqid=1)
        dp.install(inb, 0.0)
        dp.install(outb, 0.0)
        for p in pols:
            dp.spd.add(p)
    ok = agree
    for round_no in (1, 2):
        out(f"ESP traffic, {packets} packets each way (ICMP, TCP, UDP), over a link with 1% loss and 2% reordering:")
        ok = _traffic_round(dp_a, dp_b, packets, host_a, host_b, out) and ok
        if round_no == 2:
            break
        out("Rekey of the child SA (CREATE_CHILD_SA, new keys installed before the old ones go):")
        (ike_a,) = a.sas.values()
        now = time.monotonic()
        a.rekey(ike_a, now, ike_a.children[0].spi_in)
        events = _exchange(a, b, out)
        for dp, side in ((dp_a, "A"), (dp_b, "B")):
            for change in events[side]:
                if isinstance(change, ChildUp):
                    inb, outb, _ = child_objects(change, reqid=1)  # same reqid: the policies stay
                    dp.install(inb, now)
                    dp.install(outb, now)
                else:
                    for sa in list(dp.sad):
                        if sa.spi in (change.spi_in, change.spi_out):
                            dp.remove(sa)
        ok = ok and sum(isinstance(e, ChildUp) for e in events["A"] + events["B"]) == 2
    out("Teardown:")
    for ike_sa in list(a.sas.values()):
        a.delete(ike_sa, time.monotonic())
    _exchange(a, b, out)
    out("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
