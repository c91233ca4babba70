"""The IKE endpoint: UDP port 500, IKE on the 4500 encapsulation socket, and child SAs into the datapath.

Theory of operation
-------------------
The sans-IO :class:`~ipsecstack.ike.manager.IkeManager` does the protocol; this module moves its
datagrams and acts on its events, and gives it MODP key pairs made ahead of time in a worker process
(:mod:`ipsecstack.runtime.kepool`). Port 500 is a UDP socket of its own per local address; IKE on
port 4500 shares the ESP-in-UDP socket (the outer ``udp`` backend), where the datapath hands
non-ESP-marker datagrams back through ``Node.on_ike``. After every input (datagram or timer) the
endpoint sends what the manager queued, applies its events and re-arms its single timer.

``ChildUp``, ``OutboundReady`` and ``ChildDown`` go to :mod:`ipsecstack.runtime.child_install`, which
installs and removes the SA pairs and their policies (with the reqid the core gave them). The datapath
(either engine) reports each inbound SA's first packet since it was last re-armed (``Node.on_seen``,
``Datapath.take_seen``); the endpoint passes those SPIs straight to the core (``IkeManager.inbound_seen``:
DPD and the hold-back decide on it) and re-arms them ``SEEN_REARM`` seconds later, so a busy SA costs one
report per period and an idle one nothing.
An IKE SA rekey (``IkeRekeyed``: one per rekey and end, for the IKE SA that carries the children on, also when
both ends rekeyed at once, RFC 7296 §2.8.2) keeps every child SA as it is; the old IKE SA and a redundant new one
close quietly (cause ``rekeyed``). Connections with ``start_action = start`` are initiated at launch and, while
that fails, again every ``RETRY_DELAY`` seconds. What happens once an SA goes away (``close_action``,
``dpd_action``) is decided in :mod:`ipsecstack.runtime.actions`; children's ``updown`` scripts run through
:mod:`ipsecstack.runtime.updown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any

from ipsecstack.datapath import Datapath, IkeDatagram
from ipsecstack.entropy import Rng, system_rng
from ipsecstack.ike import nat
from ipsecstack.ike.dn import dn_text
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.session import (
    ChildDown,
    ChildFailed,
    ChildUp,
    Datagram,
    IkeDown,
    IkeReauthed,
    IkeRekeyed,
    IkeSa,
    IkeUp,
    OutboundReady,
    PeerConfig,
    PeerMoved,
    ReauthDue,
    ReauthFailed,
    id_text,
)
from ipsecstack.runtime import actions
from ipsecstack.runtime.child_install import ChildInstaller
from ipsecstack.runtime.io import BackendError
from ipsecstack.runtime.kepool import KeyPairPool
from ipsecstack.runtime.node import Node
from ipsecstack.runtime.updown import Updown

RETRY_DELAY = 5.0
SEEN_REARM = 1.0  # how long the datapath stays quiet about an SA it reported traffic on (DPD resolution)
KEEPALIVE_INTERVAL = 20.0  # RFC 3948 §2.3: keep the NAT mapping of ESP-in-UDP alive
IKE_PORT = 500
ERROR_LOG_INTERVAL = 10.0  # an error escaping a callback is logged (with its traceback) at most this often


class IkeEndpoint:
    def __init__(self, node: Node, peers: list[PeerConfig], start: list[str], *, encap: Any = None,
                 rng: Rng = system_rng, log: Any, clock: Any = time.monotonic,
                 traps: dict[tuple[str, str], int] | None = None,
                 acquire_names: list[str] | None = None) -> None:  # fmt: skip
        self.node = node
        self.dp: Datapath = node.datapath
        # MODP key pairs made ahead of time in a worker process (runtime/kepool.py); other groups are cheap
        algs = [a for p in peers for a in p.proposals] + [a for p in peers for c in p.children for a in c.proposals]
        self.keypairs = KeyPairPool({g for a in algs for g in a.dh}, rng, log=log)
        self.manager = IkeManager(peers, rng, wallclock=time.time, keypairs=self.keypairs.take)
        self.start_names = start
        self.encap = encap
        self.log = log
        self.clock = clock
        self._socks: dict[str, socket.socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._rearm: set[int] = set()  # inbound SPIs reported seen, re-armed at _rearm_handle
        self._rearm_handle: asyncio.TimerHandle | None = None
        self.manager.reqids.traps = dict(traps or {})  # the core gives the trap's reqid to its child SAs
        self._trap_names = {reqid: key for key, reqid in self.traps.items()}
        self.acquire_names = set(acquire_names or start)
        self._armed: set[tuple[str, str]] = set()  # (conn, child) traps armed by close_action/dpd_action = trap
        self._restarting: set[str] = set()  # connections restarted by an action: retried until up again
        inner = getattr(node, "inner", None)
        self.updown = Updown(log, interface=getattr(inner, "name", None) if inner is not None else None)
        self.children = ChildInstaller(self.dp, self.updown, log=log, clock=clock, traps=lambda: self.traps,
                                       changed=node.notify_sas_changed)  # fmt: skip
        self._closing = False
        self.errors: dict[str, int] = {}  # exceptions that escaped a callback, by callback (status: ike.errors)
        self._error_logged = -ERROR_LOG_INTERVAL
        self._keepalive_handle: asyncio.TimerHandle | None = None
        for addr in sorted({p.local_addr for p in peers}):
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.setblocking(False)
            try:
                s.bind((addr, IKE_PORT))
            except OSError as e:
                s.close()
                self.close()
                raise BackendError(f"cannot bind IKE port {addr}:{IKE_PORT}: {e.strerror} "
                                   "(is another IKE daemon running? are we root?)") from None  # fmt: skip
            self._socks[addr] = s

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.keypairs.start(self._loop)
        for s in self._socks.values():
            self._loop.add_reader(s.fileno(), self._readable, s)
        self.node.on_ike = self._on_encap_ike
        self.node.on_acquire = self._on_acquire
        self.node.on_event = self._on_sa_event
        self.node.on_seen = self._on_seen
        now = self.clock()
        for name in self.start_names:
            self._initiate(name, now)
        self._pump()
        self._keepalive_handle = self._loop.call_later(KEEPALIVE_INTERVAL, self._keepalives)

    def _keepalives(self) -> None:
        """NAT-keepalives from the side behind a NAT (or forcing encapsulation) on every established SA."""
        if self._closing or self._loop is None:
            return
        for sa in self.manager.sas.values():
            if sa.established and (sa.behind_nat or sa.cfg.encap) and self.encap is not None:
                self.encap.send_keepalive(sa.remote, sa.remote_port)
        self._keepalive_handle = self._loop.call_later(KEEPALIVE_INTERVAL, self._keepalives)

    def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        if self._rearm_handle is not None:
            self._rearm_handle.cancel()
        now = self.clock()
        for sa in list(self.manager.sas.values()):
            if sa.established:
                self.manager.delete(sa, now)
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._send(self.manager.datagrams())
        self.keypairs.close()
        self.updown.close()  # the down scripts of the children still up (bounded, synchronous at shutdown)
        for s in self._socks.values():
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(s.fileno())
            s.close()
        self._socks.clear()

    @property
    def traps(self) -> dict[tuple[str, str], int]:
        """The trap reqids by (connection, child) (kept by the core, which assigns them)."""
        return self.manager.reqids.traps

    def set_traps(self, traps: dict[tuple[str, str], int]) -> None:
        """The trap reqids by (connection, child), after a reload."""
        self.manager.reqids.traps = dict(traps)
        self._trap_names = {reqid: key for key, reqid in self.traps.items()}

    def initiate(self, name: str) -> None:
        """Start a connection now (the CLI's ``initiate``)."""
        self._initiate(name, self.clock())
        self._pump()

    def terminate(self, name: str) -> int:
        """Delete every IKE SA of a connection (the CLI's ``terminate``); returns how many. Traps armed by
        close/DPD actions are disarmed: the operator wants it down."""
        now = self.clock()
        self._armed = {k for k in self._armed if k[0] != name}
        self._restarting.discard(name)
        n = 0
        for sa in self.manager.by_name(name):
            if sa.state != "closed":
                self.manager.delete(sa, now)
                n += 1
        self._pump()
        return n

    def _initiate(self, name: str, now: float) -> None:
        sa = self.manager.initiate(name, now)
        self.log.info("ike initiating", conn=name, peer=sa.remote, proposals=[p.text for p in sa.cfg.proposals])

    # --- input -----------------------------------------------------------------------------------

    def _guard(self, where: str, fn: Callable[[], None]) -> None:
        """Run a callback's work, then send what is queued and re-arm the timer (``_pump``). An exception in
        either is counted, logged (rate-limited, with its traceback) and swallowed: the endpoint keeps serving."""
        for name, step in ((where, fn), ("pump", self._pump)):
            try:
                step()
            except Exception:
                self.errors[name] = self.errors.get(name, 0) + 1
                now = self.clock()
                if now - self._error_logged >= ERROR_LOG_INTERVAL:
                    self._error_logged = now
                    self.log.error("ike endpoint error; serving on", where=name, count=self.errors[name], exc_info=True)

    def _readable(self, s: socket.socket) -> None:
        self._guard("receive", lambda: self._read(s))

    def _read(self, s: socket.socket) -> None:
        for _ in range(64):
            try:
                data, addr = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            self.manager.receive(data, addr[0], addr[1], IKE_PORT, self.clock())

    def _on_encap_ike(self, d: IkeDatagram) -> None:
        src = str(ipaddress.ip_address(d.src))
        self._guard("receive", lambda: self.manager.receive(d.message, src, d.sport, d.dport, self.clock()))

    def _on_sa_event(self, ev: Any) -> None:
        """Datapath lifetime events of negotiated SAs: soft -> rekey now, hard -> delete the child SA."""
        if ev.sa.reqid is None or self._closing:
            return

        def apply() -> None:
            if self.manager.child_lifetime(ev.sa.spi, ev.kind != "soft", self.clock()):
                self.log.info("child sa lifetime", kind=ev.kind, trigger=ev.trigger, spi=f"0x{ev.sa.spi:08x}")

        self._guard("lifetime", apply)

    def _on_acquire(self, acq: Any) -> None:
        """A packet hit a trap policy with no SA (xfrm's acquire): negotiate its connection."""
        self._guard("acquire", lambda: self._acquire(acq))

    def _acquire(self, acq: Any) -> None:
        t = acq.policy.template
        key = self._trap_names.get(t.reqid) if t is not None else None
        if key is None or self._closing or (key[0] not in self.acquire_names and key not in self._armed):
            return
        name = key[0]
        now = self.clock()
        sas = [sa for sa in self.manager.by_name(name) if sa.state != "closed"]
        up = next((sa for sa in sas if sa.established), None)
        if up is not None and key in self._armed and not any(c.child.name == key[1] for c in up.children):
            # close_action = trap after the peer deleted only this child: negotiate it in the IKE SA (§1.3.1)
            self.log.info("acquire", conn=name, child=key[1], ike_sa=up.spi_i.hex())
            self.manager.create_child(up, key[1], now)
            return
        if sas:
            return  # already negotiating or up
        self.log.info("acquire", conn=name, child=key[1])
        self._initiate(name, now)

    def _on_seen(self, spis: list[int]) -> None:
        """The datapath saw traffic on these child SAs (inbound SPIs): the core hears of it now (DPD, the
        §2.8 hold-back), and the datapath again about them once ``SEEN_REARM`` has passed."""
        if self._closing:
            return
        self._rearm.update(spis)
        if self._rearm_handle is None and self._loop is not None:
            self._rearm_handle = self._loop.call_later(SEEN_REARM, self._rearm_seen)
        self._guard("seen", lambda: self.manager.inbound_seen(spis, self.clock()))

    def _rearm_seen(self) -> None:
        self._rearm_handle = None
        spis, self._rearm = list(self._rearm), set()
        self.dp.rearm_seen(spis)

    def _on_timer(self) -> None:
        self._timer = None
        self.node.report_seen()  # anything seen in a batch not reported yet, before DPD decides
        self._guard("timer", lambda: self.manager.handle_timer(self.clock()))

    # --- output ----------------------------------------------------------------------------------

    def _pump(self) -> None:
        try:
            self._send(self.manager.datagrams())
            for name, why in self.manager.failures:
                self.log.warning("ike proposal mismatch", conn=name, reason=why)
            self.manager.failures.clear()
            for ev in self.manager.events():
                self._event(ev)
            self._send(self.manager.datagrams())
        finally:
            self._arm()  # whatever happened above, the manager's next timer is armed

    def _send(self, dgs: list[Datagram]) -> None:
        for d in dgs:
            if d.src_port == IKE_PORT or self.encap is None:
                sock = self._sock_for(d.dst)
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.sendto(d.data, (d.dst, d.dst_port))
            else:
                self.encap.send_ike(d.data, d.dst, d.dst_port)

    def _sock_for(self, dst: str) -> socket.socket | None:
        want_v6 = ":" in dst
        return next((s for a, s in self._socks.items() if (":" in a) == want_v6), None)

    def _arm(self) -> None:
        if self._loop is None or self._closing:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.manager.get_timer()
        if when is not None:
            self._timer = self._loop.call_later(max(0.0, when - self.clock()), self._on_timer)

    # --- events ----------------------------------------------------------------------------------

    def _event(self, ev: object) -> None:
        if isinstance(ev, IkeUp):
            sa = ev.sa
            peer = id_text(*sa.peer_id) if sa.peer_id else "?"
            suite = sa.chosen.describe() if sa.chosen else "?"
            extra = {"peer_cert_issuer": dn_text(sa.peer_cert.issuer.public_bytes())} if sa.peer_cert else {}
            if sa.switched_from is not None:
                extra["switched_from"] = sa.switched_from  # IKE_AUTH chose this connection (profiles.py)
            self.log.info("ike sa established", conn=sa.cfg.name, peer=sa.remote, peer_id=peer, proposal=suite,
                          peer_auth=sa.peer_auth, spi_i=sa.spi_i.hex(), spi_r=sa.spi_r.hex(), **nat.report(sa),
                          **extra)  # fmt: skip
            self._restarting.discard(sa.cfg.name)
        elif isinstance(ev, ChildUp):
            self.children.install(ev)
        elif isinstance(ev, OutboundReady):
            self.children.activate_out(ev.spi_in, ev.why)
        elif isinstance(ev, ChildFailed):
            self.log.warning("child sa failed", conn=ev.sa.cfg.name, peer=ev.sa.remote, reason=ev.reason)
        elif isinstance(ev, ChildDown):
            self.children.uninstall(ev.spi_in)
            self._react(ev.sa, actions.after_child_down(ev), ev.cause)
        elif isinstance(ev, PeerMoved):
            for c in ev.sa.children:
                pair = self.children.pairs.get(c.spi_in)
                if pair is not None:
                    self.dp.move_peer(pair[1], ev.addr, ev.port if pair[1].udp_encap else None)
            self.log.info("peer moved", conn=ev.sa.cfg.name, addr=ev.addr, port=ev.port)
        elif isinstance(ev, IkeRekeyed):
            new = ev.new
            self.children.rekeyed(ev.old, new)
            self.log.info("ike sa rekeyed", conn=new.cfg.name, old_spi_i=ev.old.spi_i.hex(), spi_i=new.spi_i.hex(),
                          spi_r=new.spi_r.hex(), children=len(new.children))  # fmt: skip
            if ev.collision:
                # RFC 7296 §2.8.2: both ends rekeyed at once; this SA survives (the one IkeRekeyed of the rekey)
                red = ev.redundant
                self.log.info("ike sa rekey collision resolved", conn=new.cfg.name, spi_i=new.spi_i.hex(),
                              spi_r=new.spi_r.hex(), redundant_spi_i=red.spi_i.hex() if red else None,
                              redundant_spi_r=red.spi_r.hex() if red else None,
                              old_deleted_by="us" if new.initiator else "peer")  # fmt: skip
        elif isinstance(ev, ReauthDue):
            sa = ev.sa
            self.log.info("ike sa reauthenticating", conn=sa.cfg.name, spi_i=sa.spi_i.hex(), spi_r=sa.spi_r.hex())
        elif isinstance(ev, IkeReauthed):
            old, new = ev.old, ev.new
            self.log.info("ike sa reauthenticated", conn=new.cfg.name, old_spi_i=old.spi_i.hex(),
                          old_spi_r=old.spi_r.hex(), spi_i=new.spi_i.hex(), spi_r=new.spi_r.hex(),
                          children=len(new.children))  # fmt: skip
        elif isinstance(ev, ReauthFailed):
            sa = ev.sa
            retry = None if ev.retry_at is None else round(max(0.0, ev.retry_at - self.clock()), 1)
            self.log.warning("ike sa reauthentication failed", conn=sa.cfg.name, spi_i=sa.spi_i.hex(),
                             reason=ev.reason, retry_in=retry)  # fmt: skip
        elif isinstance(ev, IkeDown):
            sa = ev.sa
            self.children.forget(sa)
            if sa.successor is not None:
                self.log.info("old ike sa closed after rekey", conn=sa.cfg.name, spi_i=sa.spi_i.hex())
                return
            if ev.cause == "rekeyed":
                # a new IKE SA made redundant by a simultaneous rekey (§2.8.2): it never carried anything
                self.log.info("redundant ike sa closed", conn=sa.cfg.name, spi_i=sa.spi_i.hex(), spi_r=sa.spi_r.hex(),
                              reason=ev.reason)  # fmt: skip
                return
            if ev.cause == "reauth":
                # make-before-break: a newer IKE SA with the same peer carries the children on
                self.log.info("old ike sa closed after reauthentication", conn=sa.cfg.name, spi_i=sa.spi_i.hex(),
                              spi_r=sa.spi_r.hex(), reason=ev.reason)  # fmt: skip
                return
            self.log.warning("ike sa down", conn=sa.cfg.name, peer=sa.remote, reason=ev.reason, cause=ev.cause)
            name = sa.cfg.name
            keeps_up = name in self.start_names or name in self._restarting
            self._react(sa, actions.after_ike_down(sa, ev.cause, keeps_up), ev.cause)

    def _react(self, sa: IkeSa, r: actions.Reaction, cause: str) -> None:
        """Carry out a close/DPD action (runtime/actions.py) for the connection of ``sa``."""
        name = sa.cfg.name
        if not r or self._closing or name not in self.manager.peers:
            return
        fields = dict(conn=name, cause=cause)
        for child in r.trap:
            self._armed.add((name, child))
            self.log.info("trap armed", child=child, **fields)
        now = self.clock()
        for child in r.create:
            self.log.info("child sa negotiated again (close_action = start)", child=child, **fields)
            self.manager.create_child(sa, child, now)
        if r.restart and not any(s.state != "closed" for s in self.manager.by_name(name)):
            self.log.info("connection restarted", **fields)
            self._restarting.add(name)
            self._initiate(name, now)
        if r.retry and self._loop is not None:
            self._loop.call_later(RETRY_DELAY, self._retry, name)

    def _retry(self, name: str) -> None:
        if self._closing or name not in self.manager.peers:
            return
        if any(sa.state != "closed" for sa in self.manager.by_name(name)):
            return
        if name not in self.start_names and name not in self._restarting:
            return  # terminated meanwhile
        self._initiate(name, self.clock())
        self._pump()
