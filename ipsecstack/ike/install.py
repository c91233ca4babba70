"""From a negotiated child SA (``ChildUp``) to datapath objects: two one-way SAs and their policies.

The inbound and outbound SA share a ``reqid``; the SPD gets, for every pair of negotiated local and
remote selectors, an outbound PROTECT policy and its inbound mirror, both bound to that reqid, so a
rekeyed SA with the same reqid takes over without touching the policies (make-before-break).
The SAs and templates are ESP, or AH for a child negotiated from ``ah_proposals`` (RFC 4302).
"""

from __future__ import annotations

from typing import Any, Literal

from ipsecstack.ike.session import ChildConfig, ChildUp, IkeSa
from ipsecstack.ike.ts import to_selectors
from ipsecstack.sa import Lifetime, SecurityAssociation
from ipsecstack.spd import Action, Policy, Template


def child_objects(ev: ChildUp[IkeSa], reqid: int) -> tuple[SecurityAssociation, SecurityAssociation, list[Policy]]:
    """``(inbound SA, outbound SA, policies)`` for a ChildUp event."""
    sa = ev.sa
    local, remote = sa.cfg.local_addr, sa.remote
    mode: Literal["tunnel", "transport"] = "transport" if ev.mode == "transport" else "tunnel"
    c = ev.child
    common: dict[str, Any] = dict(esn=ev.esn, udp_encap=ev.encap, reqid=reqid, name=f"{sa.cfg.name}/{c.name}",
                                  replay_window=c.replay_window,
                                  soft=Lifetime(bytes=c.rekey_bytes, packets=c.rekey_packets),
                                  hard=Lifetime(seconds=c.life_time))  # fmt: skip
    proto = ev.protocol
    out = SecurityAssociation(ev.spi_out, proto, mode, ev.transform, ev.key_out, direction="out",
                              tunnel_src=local, tunnel_dst=remote, **common)  # fmt: skip
    inb = SecurityAssociation(ev.spi_in, proto, mode, ev.transform, ev.key_in, direction="in",
                              tunnel_src=remote, tunnel_dst=local, **common)  # fmt: skip
    tmpl = Template(proto, mode, reqid=reqid, tunnel_src=local, tunnel_dst=remote)
    pols: list[Policy] = []
    for sel_out, sel_in in to_selectors(ev.local_ts, ev.remote_ts):
        pols.append(Policy(sel_out, Action.PROTECT, "out", tmpl, name=out.name))
        pols.append(Policy(sel_in, Action.PROTECT, "in", tmpl, name=out.name))
    return inb, out, pols


def trap_policies(peer_name: str, local: str, remote: str, child: ChildConfig, reqid: int) -> list[Policy]:
    """Policies installed before negotiation for a child that starts itself (``start_action`` trap or
    start), like xfrm's trap policies: matching packets raise an Acquire until the child SA is up, and
    the negotiated SAs bind to them through ``reqid``."""
    mode: Literal["tunnel", "transport"] = "transport" if child.mode == "transport" else "tunnel"
    tmpl = Template(child.protocol, mode, reqid=reqid, tunnel_src=local, tunnel_dst=remote)
    name = f"{peer_name}/{child.name}"
    pols: list[Policy] = []
    for sel_out, sel_in in to_selectors(child.local_ts, child.remote_ts):
        pols.append(Policy(sel_out, Action.PROTECT, "out", tmpl, name=name))
        pols.append(Policy(sel_in, Action.PROTECT, "in", tmpl, name=name))
    return pols
