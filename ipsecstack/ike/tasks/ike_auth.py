"""IKE_AUTH in both roles (RFC 7296 §1.2, §2.15, §3.15), with the first child SA.

The initiator sends IDi, CERT, CERTREQ, [IDr], AUTH, a configuration request and its first child;
the responder picks the connection that takes this peer among its candidates (:mod:`auth_proof`,
:mod:`ipsecstack.ike.profiles`: by IDi, IDr and the AUTH its credentials verify) and switches to it,
leases a virtual IP from that connection's pool, and answers with its own proof and the first child,
or AUTHENTICATION_FAILED. The IKE SA is established once the response is on its way (responder) or
has authenticated the responder (initiator); the initiator then queues its other children. A refused
first child leaves the IKE SA up (§2.21.3). EAP's extra rounds (RFC 7296 §2.16) will be NEED_MORE here.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import Exchange, Notify, Protocol
from ipsecstack.ike.model import (
    AH_NAT,
    CFG_REPLY,
    CFG_REQUEST,
    CP_INTERNAL_IP4_ADDRESS,
    CP_INTERNAL_IP4_DNS,
    CP_INTERNAL_IP6_ADDRESS,
    CP_INTERNAL_IP6_DNS,
    ChildConfig,
    _notify_name,
    id_text,
    is_wildcard,
    match_identity,
    same_identity,
)
from ipsecstack.ike.pools import Lease
from ipsecstack.ike.state import Step
from ipsecstack.ike.tasks import auth_proof
from ipsecstack.ike.tasks import child_common as cc
from ipsecstack.ike.tasks.base import Context, Result, Task
from ipsecstack.ike.tasks.child_create import ChildCreate
from ipsecstack.ike.tasks.child_delete import SpiDelete
from ipsecstack.ike.tasks.informational import auth_refused
from ipsecstack.ike.ts import Range


class IkeAuth(Task):
    exchange = Exchange.IKE_AUTH
    needs_established = False

    def __init__(self, ctx: Context, *, initiator: bool = True) -> None:
        super().__init__(ctx, initiator=initiator)
        self._child: ChildConfig | None = None
        self._child_spi = 0
        self._failed = ""  # responder: why the IKE SA closes once the refusal is sent
        self._up = False  # responder: established once the response is sent ...
        self._first: tuple[cc.Negotiated, int] | None = None  # ... with this child SA

    # --- initiator ----------------------------------------------------------------------------

    def request(self, now: float) -> list[m.AnyPayload] | None:
        ctx = self.ctx
        child = ctx.cfg.children[0] if ctx.cfg.children else None
        idi = m.Identification(*ctx.cfg.local_id, initiator=True)
        proof = auth_proof.prove(ctx, idi)
        inner: list[m.AnyPayload] = [idi, *proof[:-1], *ctx.cfg.creds.certreq()]
        if ctx.cfg.remote_id is not None and not is_wildcard(ctx.cfg.remote_id):
            inner.append(m.Identification(*ctx.cfg.remote_id, initiator=False))  # a pattern is no identity to ask
        inner.append(proof[-1])
        if ctx.cfg.request_vip:
            inner.append(m.CP(CFG_REQUEST, [(CP_INTERNAL_IP4_ADDRESS, b"")]))
        if child is not None:
            self._child = child
            self._child_spi = cc.new_child_spi(ctx)
            spi = self._child_spi.to_bytes(4, "big")
            inner.append(m.SA([p.without_dh().to_payload(i + 1, spi) for i, p in enumerate(child.proposals)]))
            inner.append(m.TS([r.to_payload() for r in child.local_ts], initiator=True))
            inner.append(m.TS([r.to_payload() for r in child.remote_ts], initiator=False))
            if child.mode == "transport":
                inner.append(m.Notify(Notify.USE_TRANSPORT_MODE))
        if ctx.send_initial_contact:
            inner.append(m.Notify(Notify.INITIAL_CONTACT))
        ctx.step(Step.SEND_AUTH)
        return inner

    def on_response(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        ctx = self.ctx
        notes = [p for p in inner if isinstance(p, m.Notify)]
        if any(n.notify_type == Notify.AUTHENTICATION_FAILED for n in notes):
            auth_refused(ctx)
            return Result.FAILED
        idr = next((p for p in inner if isinstance(p, m.Identification) and not p.initiator), None)
        proof = next((p for p in inner if isinstance(p, m.Auth)), None)
        if idr is None or proof is None:
            ctx.close("IKE_AUTH response without IDr/AUTH")
            return Result.FAILED
        why = None
        if not match_identity(ctx.cfg.remote_id, (idr.id_type, idr.data)):
            assert ctx.cfg.remote_id is not None
            why = f"identity mismatch: remote.id is {id_text(*ctx.cfg.remote_id)!r}"
        why = why or auth_proof.verify_peer(ctx, idr, proof, inner)
        if why is not None:
            ctx.count("auth_failed")
            # §2.21.2: the responder already considers the IKE SA up; tell it, once, in an INFORMATIONAL
            ctx.tasks.send_request(Exchange.INFORMATIONAL, [m.Notify(Notify.AUTHENTICATION_FAILED)], now)
            ctx.close(f"authentication of the responder {id_text(idr.id_type, idr.data)!r} failed: {why}")
            return Result.FAILED
        ctx.peer_id = (idr.id_type, idr.data)
        reply = next((p for p in inner if isinstance(p, m.CP) and p.cfg_type == CFG_REPLY), None)
        for attr, value in reply.attributes if reply is not None else []:
            if attr == CP_INTERNAL_IP4_ADDRESS and len(value) == 4:
                ctx.virtual_ip = str(ipaddress.ip_address(value))
        ctx.set_established(now)
        if self._child is not None and self._first_child(self._child, notes, inner, now):
            for extra in ctx.cfg.children[1:]:
                ctx.tasks.queue(ChildCreate(ctx, extra))
        return Result.DONE

    def _first_child(self, child: ChildConfig, notes: list[m.Notify], inner: list[m.AnyPayload],
                     now: float) -> bool:  # fmt: skip
        """The first child SA from the IKE_AUTH response; False if it was refused (no others are tried)."""
        ctx = self.ctx
        errors = [n for n in notes if n.notify_type < 16384]
        sas = [p for p in inner if isinstance(p, m.SA)]
        if errors or len(sas) != 1 or len(sas[0].proposals) != 1:
            why = _notify_name(errors[0].notify_type) if errors else "no SA payload"
            if ctx.nat and child.protocol == "ah":
                why += f" ({AH_NAT})"
            ctx.child_failed(f"child SA {child.name} refused: {why}")
            return False
        chosen = props.check_choice(child.proposals, sas[0].proposals[0], child.ike_protocol, ignore_dh=True)
        tsi, tsr = cc.selectors(inner)
        if chosen is None or tsi is None or tsr is None or len(chosen.spi) != 4:
            ctx.child_failed(f"child SA {child.name}: malformed or unoffered reply")
            return False
        if ctx.nat and child.protocol == "ah":
            # the peer accepted AH across the NAT anyway: it cannot work; ask it to drop its half
            ctx.child_failed(f"child SA {child.name} not installed: {AH_NAT}")
            ctx.tasks.queue(SpiDelete(ctx, m.Delete(Protocol.AH, [self._child_spi.to_bytes(4, "big")])))
        elif (ts := cc.answered_ts(ctx, child, self._child_spi, (child.local_ts, child.remote_ts), tsi, tsr)) is None:
            return False
        else:
            transport = any(n.notify_type == Notify.USE_TRANSPORT_MODE for n in notes)
            cc.child_up(ctx, child, chosen, "transport" if transport else "tunnel", ts[0], ts[1],
                        spi_in=self._child_spi, spi_out=int.from_bytes(chosen.spi, "big"), now=now)  # fmt: skip
        return True

    # --- responder ----------------------------------------------------------------------------

    def on_request(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        ctx = self.ctx
        # §2.4: the peer says it has no other IKE SA with us (the manager's uniqueness policy reads it)
        ctx.initial_contact = any(isinstance(p, m.Notify) and p.notify_type == Notify.INITIAL_CONTACT for p in inner)
        idi = next((p for p in inner if isinstance(p, m.Identification) and p.initiator), None)
        proof = next((p for p in inner if isinstance(p, m.Auth)), None)
        if idi is None or proof is None:
            self.reply, self._failed = [m.Notify(Notify.INVALID_SYNTAX)], "IKE_AUTH request without IDi/AUTH"
            return Result.FAILED
        idr_asked = next((p for p in inner if isinstance(p, m.Identification) and not p.initiator), None)
        why = auth_proof.authenticate_peer(ctx, idi, idr_asked, proof, inner)
        if why is not None:
            ctx.count("auth_failed")
            self.reply = [m.Notify(Notify.AUTHENTICATION_FAILED)]
            self._failed = f"authentication of {id_text(idi.id_type, idi.data)!r} failed: {why}"
            return Result.FAILED
        ctx.peer_id = (idi.id_type, idi.data)
        ctx.local_identity = ctx.cfg.local_id
        if idr_asked is not None and not same_identity(ctx.cfg.local_id, (idr_asked.id_type, idr_asked.data)):
            # profiles.rank accepted it, so it is in our certificate: answer as asked (RFC 7296 §3.5; strongSwan
            # insists on the identity it asked for)
            ctx.local_identity = (idr_asked.id_type, idr_asked.data)
        idr = m.Identification(*ctx.local_identity, initiator=False)
        self.reply = [idr, *auth_proof.prove(ctx, idr)]
        self._up = True
        vip_ts: list[Range] | None = None
        request = next((p for p in inner if isinstance(p, m.CP) and p.cfg_type == CFG_REQUEST), None)
        if request is not None and ctx.cfg.pools:
            vip = _lease_address(ctx, request)
            if vip is None:
                # §3.15.4: no address for this client: the IKE SA stands, no child SA
                self.reply.append(m.Notify(Notify.INTERNAL_ADDRESS_FAILURE))
                return Result.DONE
            self.reply.append(_config_reply(ctx, vip))
            vip_ts = [Range(vip, vip)]
        child_result = cc.negotiate(ctx, inner, remote_override=vip_ts)
        if isinstance(child_result, int):
            self.reply.append(m.Notify(child_result))
            return Result.DONE
        _child, chosen, mode, tsi, tsr = child_result
        spi_in = cc.new_child_spi(ctx)
        reply = props.Chosen(chosen.protocol, chosen.encr, chosen.integ, None, None, chosen.esn, chosen.number,
                             spi_in.to_bytes(4, "big"))  # fmt: skip
        self.reply += [m.SA([reply.to_payload()]), m.TS([r.to_payload() for r in tsi], True),
                        m.TS([r.to_payload() for r in tsr], False)]  # fmt: skip
        if mode == "transport":
            self.reply.append(m.Notify(Notify.USE_TRANSPORT_MODE))
        self._first = (child_result, spi_in)
        return Result.DONE

    def sent(self, now: float) -> None:
        ctx = self.ctx
        if self._failed:
            ctx.close(self._failed)
            return
        if not self._up:
            return
        ctx.set_established(now)
        if self._first is not None:
            (child, chosen, mode, tsi, tsr), spi_in = self._first
            cc.child_up(ctx, child, chosen, mode, tsr, tsi, spi_in=spi_in, spi_out=int.from_bytes(chosen.spi, "big"),
                        now=now)  # fmt: skip


def _lease_address(ctx: Context, request: m.CP) -> Any:
    """A virtual IP from the first pool of a family the client asked for (§3.15.1)."""
    wanted = {t for t, _ in request.attributes}
    assert ctx.peer_id is not None
    key = bytes([ctx.peer_id[0]]) + ctx.peer_id[1]
    for pool in ctx.cfg.pools:
        if (pool.first.version == 4 and CP_INTERNAL_IP4_ADDRESS in wanted) or (
            pool.first.version == 6 and CP_INTERNAL_IP6_ADDRESS in wanted
        ):
            addr = pool.acquire(key)
            if addr is not None:
                ctx.lease = Lease(pool, key)
                ctx.count("addresses_leased")
                return addr
    ctx.count("address_pool_exhausted")
    return None


def _config_reply(ctx: Context, vip: Any) -> m.CP:
    attrs: list[tuple[int, bytes]] = []
    if vip.version == 4:
        attrs.append((CP_INTERNAL_IP4_ADDRESS, vip.packed))
    else:
        attrs.append((CP_INTERNAL_IP6_ADDRESS, vip.packed + b"\x80"))  # address | prefix length 128
    pool = ctx.lease.pool if ctx.lease else None
    for dns in pool.dns if pool else []:
        attrs.append((CP_INTERNAL_IP4_DNS if dns.version == 4 else CP_INTERNAL_IP6_DNS, dns.packed))
    return m.CP(CFG_REPLY, attrs)
