"""The NFQUEUE transport's firewall rules, planned from the SPD (pure: no system access).

Theory of operation
-------------------
``backends/nfqueue.py`` installs rules and moves packets; what to queue is a matter of the SPD and the
configuration, which a backend does not import. :func:`plan_rules` turns the SPD-O and SPD-I lists into
``iptables`` rules in policy order (BYPASS -> ``RETURN``, DISCARD -> ``DROP``, PROTECT -> ``NFQUEUE``),
behind the rules that let IKE, ESP/AH and our ESP in UDP pass and keep IPv6 neighbour discovery working
(the module docstring of ``backends/nfqueue.py`` says why each is there). :func:`transport_for` checks
the configuration for what NFQUEUE cannot do (tunnel mode), works out the MSS clamp per policy from the
SA's overhead and the link MTU towards the peer, and builds the backend with the plan.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from backends.esp_routes import MARK
from backends.nfq_engine_io import inject_name
from backends.nfqueue import (
    CHAIN_IN,
    CHAIN_MSS,
    CHAIN_OUT,
    DEFAULT_LINK_MTU,
    MAX_COPY,
    TOOLS,
    NfqueueTransport,
    Rule,
    Runner,
    link_mtu,
    run_tool,
)
from ipsecstack.config import Config
from ipsecstack.datapath import Datapath
from ipsecstack.runtime.io import BackendError
from ipsecstack.spd import Action, Policy, Selector

WORST_OVERHEAD = 100  # IPv6 + UDP + ESP + CBC IV + padding + trailer + 256-bit ICV, rounded up
TCP_HEADER = 20
_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 50: "esp", 51: "ah", 58: "icmpv6", 132: "sctp"}
_PORT_PROTOS = (6, 17, 132)
_ND_TYPES = ("router-solicitation", "router-advertisement", "neighbour-solicitation", "neighbour-advertisement")


def _families(sel: Selector) -> tuple[int, ...]:
    net = sel.src or sel.dst
    return (net.version,) if net is not None else (4, 6)


def _proto_arg(proto: int, family: int) -> list[str]:
    if proto == 51 and family == 6:
        return ["-m", "ah"]  # ip6tables' -p skips AH as an extension header; the ah match finds it
    if proto in (1, 58) and (proto == 58) != (family == 6):
        raise BackendError(f"protocol {proto} in an IPv{family} selector cannot be expressed for {TOOLS[family]}")
    return ["-p", _PROTO_NAMES.get(proto, str(proto))]


def _ports_arg(opt: str, ports: tuple[int, int] | None) -> list[str]:
    if ports is None:
        return []
    lo, hi = ports
    return [opt, str(lo) if lo == hi else f"{lo}:{hi}"]


def selector_matches(sel: Selector, family: int) -> list[list[str]]:
    """iptables match arguments for a selector (several rules when ports come without a protocol)."""
    base: list[str] = []
    if sel.src is not None:
        base += ["-s", str(sel.src)]
    if sel.dst is not None:
        base += ["-d", str(sel.dst)]
    has_ports = sel.sport is not None or sel.dport is not None
    if sel.proto is None:
        if not has_ports:
            return [base]
        protos: tuple[int, ...] = _PORT_PROTOS
    else:
        protos = (sel.proto,)
    out: list[list[str]] = []
    for proto in protos:
        args = base + _proto_arg(proto, family)
        if has_ports:
            if proto in (1, 58):
                # xfrm convention: for ICMP the "ports" are type (sport) and code (dport)
                t, c = sel.sport, sel.dport
                if t is None or t[0] != t[1] or (c is not None and c[0] != c[1]):
                    raise BackendError(f"selector {sel}: ICMP type/code ranges cannot be expressed in iptables")
                kind = "--icmpv6-type" if family == 6 else "--icmp-type"
                args += [kind, str(t[0]) if c is None else f"{t[0]}/{c[0]}"]
            elif proto in _PORT_PROTOS:
                args += _ports_arg("--sport", sel.sport) + _ports_arg("--dport", sel.dport)
            else:
                raise BackendError(f"selector {sel}: ports are only supported for tcp, udp, sctp and icmp")
        out.append(args)
    return out


def _tcp_of(match: list[str]) -> list[str] | None:
    """The TCP share of a rule's match: the match itself when it names TCP, it with ``-p tcp`` when it names
    no protocol, None when it names another one."""
    if "-p" in match:
        return match if match[match.index("-p") + 1] == "tcp" else None
    return None if "-m" in match else [*match, "-p", "tcp"]


def _queue_target(num: int, bypass: bool) -> list[str]:
    return ["-j", "NFQUEUE", "--queue-num", str(num), *(["--queue-bypass"] if bypass else [])]


def plan_rules(
    policies_out: Sequence[Policy],
    policies_in: Sequence[Policy],
    *,
    queue_out: int,
    queue_in: int,
    queue_tcp: int | None = None,
    inject_dev: str | None = None,
    bypass: bool = False,
    encap_ports: Iterable[int] = (),
    mss: Callable[[Policy, int], int | None] | None = None,
    ike_ports: Iterable[int] = (),
) -> list[Rule]:
    """All rules for these SPD lists, in order. ``mss(policy, family)`` gives the clamp value (None: none).

    ``ike_ports``: UDP ports of the agent's own IKE traffic, which bypasses IPsec in both directions
    (RFC 4301 §5.1: the key manager's packets must not need the SAs they negotiate).

    ``queue_tcp``: the native engine's TCP queue (whole super-packets, ``native/fwd_nfq_gso.c``). A PROTECT
    policy that admits TCP sends TCP there, in the same place of the policy order, and the rest to
    ``queue_out``; what the engine sends on its raw sockets carries ``MARK`` and returns at once.

    ``inject_dev``: the engine's inject TUN (``backends/nfq_engine_io.py``). The peers' ESP is accepted,
    not queued (the engine reads it from raw sockets), and what the TUN gives the host is accepted first:
    it is the plaintext the engine or Python decrypted and checked (RFC 4301 §5.2). ESP in UDP and AH stay
    queued.
    """
    encap = sorted(set(encap_ports))
    ike = sorted(set(ike_ports))
    families = sorted({f for p in [*policies_out, *policies_in] for f in _families(p.selector)})
    rules: list[Rule] = []
    for fam in families:

        def add(table: str, chain: str, *args: str, fam: int = fam) -> None:
            rules.append(Rule(fam, table, chain, tuple(args)))

        if inject_dev is not None:
            add("filter", CHAIN_IN, "-i", inject_dev, "-j", "ACCEPT")

        # IKE bypasses IPsec
        for port in ike:
            for chain in (CHAIN_OUT, CHAIN_IN):
                add("filter", chain, "-p", "udp", "--sport", str(port), "-j", "RETURN")
                add("filter", chain, "-p", "udp", "--dport", str(port), "-j", "RETURN")
        # outbound: never queue what is already protected, nor neighbour discovery
        if queue_tcp is not None:
            add("filter", CHAIN_OUT, "-m", "mark", "--mark", hex(MARK), "-j", "RETURN")  # the engine's own sends
        add("filter", CHAIN_OUT, "-p", "esp", "-j", "RETURN")
        add("filter", CHAIN_OUT, *_proto_arg(51, fam), "-j", "RETURN")
        for port in encap:
            # our ESP in UDP and IKE on the NAT-T port leave from it (to any port: a NAT maps the peer's)
            add("filter", CHAIN_OUT, "-p", "udp", "--sport", str(port), "-j", "RETURN")
        if fam == 6:
            for nd in _ND_TYPES:
                add("filter", CHAIN_OUT, "-p", "icmpv6", "--icmpv6-type", nd, "-j", "RETURN")
                add("filter", CHAIN_IN, "-p", "icmpv6", "--icmpv6-type", nd, "-j", "RETURN")
        # inbound: protected packets from the peers to us go to the inbound queue
        seen: set[tuple[str, ...]] = set()
        for pol in policies_in:
            t = pol.template
            if pol.action is not Action.PROTECT or t is None or fam not in _families(pol.selector):
                continue
            if t.tunnel_src is not None and ipaddress.ip_address(t.tunnel_src).version != fam:
                continue
            ends = [*(["-s", t.tunnel_src] if t.tunnel_src else []), *(["-d", t.tunnel_dst] if t.tunnel_dst else [])]
            matches = [_proto_arg(50 if t.protocol == "esp" else 51, fam)]
            if t.protocol == "esp":
                matches += [["-p", "udp", "--dport", str(port)] for port in encap]
            for m in matches:
                key = (*ends, *m)
                if key not in seen:
                    seen.add(key)
                    # ACCEPT, not RETURN: the firewall's later INPUT rules did not see queued ESP either
                    raw = inject_dev is not None and m[:2] == ["-p", "esp"]
                    add("filter", CHAIN_IN, *ends, *m, *(["-j", "ACCEPT"] if raw else _queue_target(queue_in, bypass)))
        # the SPDs in order
        for direction, chain, pols in (("out", CHAIN_OUT, policies_out), ("in", CHAIN_IN, policies_in)):
            for pol in pols:
                if fam not in _families(pol.selector):
                    continue
                if pol.action is Action.BYPASS:
                    target = ["-j", "RETURN"]
                elif pol.action is Action.DISCARD:
                    target = ["-j", "DROP"]
                else:
                    # inbound PROTECT: plaintext that should have been protected goes to the datapath, which
                    # drops and counts it (and with --queue-bypass and no agent, it passes like the rest)
                    target = _queue_target(queue_out if direction == "out" else queue_in, bypass)
                for m in selector_matches(pol.selector, fam):
                    if direction == "out" and queue_tcp is not None and pol.action is Action.PROTECT:
                        tcp = _tcp_of(m)
                        if tcp is not None:
                            add("filter", chain, *tcp, *_queue_target(queue_tcp, bypass))
                            if tcp is m:
                                continue
                    add("filter", chain, *m, *target)
        # MSS clamp for TCP SYNs we send to protected destinations
        if mss is not None:
            for pol in policies_out:
                sel = pol.selector
                if pol.action is not Action.PROTECT or fam not in _families(sel) or sel.proto not in (None, 6):
                    continue
                value = mss(pol, fam)
                if value is None:
                    continue
                tcp_sel = Selector(
                    str(sel.src) if sel.src else None, str(sel.dst) if sel.dst else None, 6, sel.sport, sel.dport
                )
                for m in selector_matches(tcp_sel, fam):
                    add(
                        "mangle",
                        CHAIN_MSS,
                        *m,
                        "--tcp-flags",
                        "SYN,RST",
                        "SYN",
                        "-j",
                        "TCPMSS",
                        "--set-mss",
                        str(value),
                    )
    return rules


def transport_for(cfg: Config, dp: Datapath, *, log: Any = None, runner: Runner = run_tool) -> NfqueueTransport:
    """The NFQUEUE backend for ``cfg`` (transport mode only), its rules planned from ``dp``'s SPD.

    With the native engine and ``[agent] offloads`` (the defaults), TCP gets a queue of its own that the
    kernel hands whole super-packets (``agent.nfqueue_tcp``), and the peers' ESP reaches the engine by raw
    sockets instead of the in queue (``backends/nfq_engine_io.py``)."""
    a = cfg.agent
    for c in cfg.manual:
        if c.mode != "transport":
            raise BackendError(
                f"manual.{c.name}: the nfqueue backend does transport mode only; tunnel mode uses inner_backend = 'tun'"
            )
    for peer in cfg.connections:
        for child in peer.children:
            if child.mode != "transport":
                raise BackendError(
                    f"connections.{peer.name}.children.{child.name}: the nfqueue backend does transport "
                    "mode only; tunnel mode uses inner_backend = 'tun'"
                )
    encap = {c.encap_port for c in cfg.manual if c.encap}
    ike_ports = {500} if cfg.connections else set()
    if cfg.connections:
        # RFC 7296 §2.23: IKE floats to 4500 across a NAT; ESP in UDP and IKE there are queued inbound
        # (the datapath hands IKE to the endpoint's socket, ipsecstack/agent/services.py attach_ike)
        encap.add(a.encap_port)
    queue_tcp = a.nfqueue_tcp if dp.native is not None and a.offloads else None
    rules = plan_rules(
        dp.spd.policies("out"), dp.spd.policies("in"), queue_out=a.nfqueue_out, queue_in=a.nfqueue_in,
        queue_tcp=queue_tcp, inject_dev=inject_name(a.nfqueue_in) if queue_tcp is not None else None,
        bypass=a.queue_bypass, encap_ports=encap, ike_ports=ike_ports,
        mss=(lambda pol, fam: mss_clamp(dp, pol, fam, runner)) if a.mss_clamp else None,
    )  # fmt: skip
    return NfqueueTransport(rules, queue_out=a.nfqueue_out, queue_in=a.nfqueue_in, queue_tcp=queue_tcp,
                            bypass=a.queue_bypass, log=log, runner=runner)  # fmt: skip


def mss_clamp(dp: Datapath, pol: Policy, fam: int, runner: Runner = run_tool) -> int:
    """The MSS for TCP SYNs to ``pol``'s destination: what keeps the protected segment within the link MTU."""
    t = pol.template
    sa = dp.sad.lookup_outbound(t) if t is not None else None
    # no SA yet (a trap policy waiting for IKE): assume the worst case of the transforms we support
    overhead = sa.overhead if sa is not None else max((s.overhead for s in dp.sad), default=WORST_OVERHEAD)
    peer = t.tunnel_dst if t is not None and t.tunnel_dst else None
    if peer is None and pol.selector.dst is not None:
        peer = str(pol.selector.dst.network_address)
    # never above what NetfilterQueue copies to us whole (jumbo frames)
    mtu = min(link_mtu(peer, runner) if peer else DEFAULT_LINK_MTU, MAX_COPY)
    value = mtu - (40 if fam == 6 else 20) - TCP_HEADER - overhead
    return value if value >= 536 else 536
