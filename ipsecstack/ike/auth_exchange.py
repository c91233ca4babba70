"""IKE_AUTH in both roles (RFC 7296 §1.2, §2.15, §3.15).

Theory of operation: a layer of :class:`~ipsecstack.ike.session.IkeSa`. The initiator sends IDi,
CERT, CERTREQ, [IDr], AUTH, a configuration request and its first child; the responder picks the
connection that takes this peer among its candidates (:mod:`ipsecstack.ike.profiles`: by IDi, IDr and
the AUTH its credentials verify) and switches to it, leases a virtual IP from that connection's pool,
and answers with its own proof and the first child, or AUTHENTICATION_FAILED. Proofs:
:mod:`ipsecstack.ike.auth`; certificate paths: :mod:`ipsecstack.ike.certs`.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from cryptography import x509

from ipsecstack.ike import auth, profiles
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.certs import cert_has_id, subject, verify_path
from ipsecstack.ike.child_sa import ChildExchanges
from ipsecstack.ike.const import AuthMethod, Exchange, Notify, Protocol
from ipsecstack.ike.model import (
    AH_NAT,
    CFG_REPLY,
    CFG_REQUEST,
    CP_INTERNAL_IP4_ADDRESS,
    CP_INTERNAL_IP4_DNS,
    CP_INTERNAL_IP6_ADDRESS,
    CP_INTERNAL_IP6_DNS,
    PeerConfig,
    _notify_name,
    id_text,
    is_wildcard,
    match_identity,
    same_identity,
)
from ipsecstack.ike.state import Step
from ipsecstack.ike.ts import Range


class AuthExchange(ChildExchanges):
    def _send_auth(self, now: float) -> None:
        child = self.cfg.children[0] if self.cfg.children else None
        idi = m.Identification(*self.cfg.local_id, initiator=True)
        proof = self._prove(idi)
        inner: list[m.AnyPayload] = [idi, *proof[:-1], *self.cfg.creds.certreq()]
        if self.cfg.remote_id is not None and not is_wildcard(self.cfg.remote_id):
            inner.append(m.Identification(*self.cfg.remote_id, initiator=False))  # a pattern is no identity to ask for
        inner.append(proof[-1])
        if self.cfg.request_vip:
            inner.append(m.CP(CFG_REQUEST, [(CP_INTERNAL_IP4_ADDRESS, b"")]))
        if child is not None:
            self._child = child
            self._child_spi = self._new_child_spi()
            spi = self._child_spi.to_bytes(4, "big")
            inner.append(m.SA([p.without_dh().to_payload(i + 1, spi) for i, p in enumerate(child.proposals)]))
            inner.append(m.TS([r.to_payload() for r in child.local_ts], initiator=True))
            inner.append(m.TS([r.to_payload() for r in child.remote_ts], initiator=False))
            if child.mode == "transport":
                inner.append(m.Notify(Notify.USE_TRANSPORT_MODE))
        if self.send_initial_contact:
            inner.append(m.Notify(Notify.INITIAL_CONTACT))
        self._step(Step.SEND_AUTH)
        self._send_request(Exchange.IKE_AUTH, inner, now)

    def _on_auth_response(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> None:
        notes = [p for p in inner if isinstance(p, m.Notify)]
        for n in notes:
            if n.notify_type == Notify.AUTHENTICATION_FAILED:
                what = "PSK" if self.cfg.creds.local == "psk" else "certificate (is our CA in its cacerts?)"
                self._close(f"peer says AUTHENTICATION_FAILED: check the {what} and the identities on both sides")
                return
        idr = next((p for p in inner if isinstance(p, m.Identification) and not p.initiator), None)
        proof = next((p for p in inner if isinstance(p, m.Auth)), None)
        if idr is None or proof is None:
            self._close("IKE_AUTH response without IDr/AUTH")
            return
        why = None
        if not match_identity(self.cfg.remote_id, (idr.id_type, idr.data)):
            assert self.cfg.remote_id is not None
            why = f"identity mismatch: remote.id is {id_text(*self.cfg.remote_id)!r}"
        why = why or self._verify_peer(idr, proof, inner)
        if why is not None:
            self._count("auth_failed")
            # §2.21.2: the responder already considers the IKE SA up; tell it, once, in an INFORMATIONAL
            self._send_request(Exchange.INFORMATIONAL, [m.Notify(Notify.AUTHENTICATION_FAILED)], now)
            self._close(f"authentication of the responder {id_text(idr.id_type, idr.data)!r} failed: {why}")
            return
        self.peer_id = (idr.id_type, idr.data)
        reply = next((p for p in inner if isinstance(p, m.CP) and p.cfg_type == CFG_REPLY), None)
        for attr, value in reply.attributes if reply is not None else []:
            if attr == CP_INTERNAL_IP4_ADDRESS and len(value) == 4:
                self.virtual_ip = str(ipaddress.ip_address(value))
        self._established(now)
        child = self._child
        if child is None:
            return
        errors = [n for n in notes if n.notify_type < 16384]
        sas = [p for p in inner if isinstance(p, m.SA)]
        if errors or len(sas) != 1 or len(sas[0].proposals) != 1:
            why = _notify_name(errors[0].notify_type) if errors else "no SA payload"
            if self.nat and child.protocol == "ah":
                why += f" ({AH_NAT})"
            self._child_failed(f"child SA {child.name} refused: {why}")
            return
        chosen = props.check_choice(child.proposals, sas[0].proposals[0], child.ike_protocol, ignore_dh=True)
        tsi = next((p for p in inner if isinstance(p, m.TS) and p.initiator), None)
        tsr = next((p for p in inner if isinstance(p, m.TS) and not p.initiator), None)
        if chosen is None or tsi is None or tsr is None or len(chosen.spi) != 4:
            self._child_failed(f"child SA {child.name}: malformed or unoffered reply")
            return
        if self.nat and child.protocol == "ah":
            # the peer accepted AH across the NAT anyway: it cannot work; ask it to drop its half
            self._child_failed(f"child SA {child.name} not installed: {AH_NAT}")
            spi = self._child_spi.to_bytes(4, "big")
            self._enqueue(self._send_delete, m.Delete(Protocol.AH, [spi]))
        else:
            transport = any(n.notify_type == Notify.USE_TRANSPORT_MODE for n in notes)
            local = [Range.from_payload(t) for t in tsi.selectors]
            remote = [Range.from_payload(t) for t in tsr.selectors]
            self._child_up(child, chosen, "transport" if transport else "tunnel", local, remote,
                           spi_in=self._child_spi, spi_out=int.from_bytes(chosen.spi, "big"), now=now)  # fmt: skip
        for extra in self.cfg.children[1:]:
            self._enqueue(self._create_child, extra)
        self._next_queued(now)

    def _on_auth_request(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> None:
        idi = next((p for p in inner if isinstance(p, m.Identification) and p.initiator), None)
        proof = next((p for p in inner if isinstance(p, m.Auth)), None)
        if idi is None or proof is None:
            self._respond(msg, [m.Notify(Notify.INVALID_SYNTAX)])
            self._close("IKE_AUTH request without IDi/AUTH")
            return
        idr_asked = next((p for p in inner if isinstance(p, m.Identification) and not p.initiator), None)
        why = self._authenticate_peer(idi, idr_asked, proof, inner)
        if why is not None:
            self._count("auth_failed")
            self._respond(msg, [m.Notify(Notify.AUTHENTICATION_FAILED)])
            self._close(f"authentication of {id_text(idi.id_type, idi.data)!r} failed: {why}")
            return
        self.peer_id = (idi.id_type, idi.data)
        self.local_identity = self.cfg.local_id
        if idr_asked is not None and not same_identity(self.cfg.local_id, (idr_asked.id_type, idr_asked.data)):
            # profiles.rank accepted it, so it is in our certificate: answer as asked (RFC 7296 §3.5; strongSwan
            # insists on the identity it asked for)
            self.local_identity = (idr_asked.id_type, idr_asked.data)
        idr = m.Identification(*self.local_identity, initiator=False)
        out: list[m.AnyPayload] = [idr, *self._prove(idr)]
        vip_ts: list[Range] | None = None
        request = next((p for p in inner if isinstance(p, m.CP) and p.cfg_type == CFG_REQUEST), None)
        if request is not None and self.cfg.pools:
            vip = self._lease_address(request)
            if vip is None:
                # §3.15.4: no address for this client: the IKE SA stands, no child SA
                out.append(m.Notify(Notify.INTERNAL_ADDRESS_FAILURE))
                self._respond(msg, out)
                self._established(now)
                return
            out.append(self._config_reply(vip))
            vip_ts = [Range(vip, vip)]
        child_result = self._negotiate_child(inner, remote_override=vip_ts)
        if isinstance(child_result, int):
            out.append(m.Notify(child_result))
            self._respond(msg, out)
            self._established(now)
            return
        child, chosen, mode, tsi, tsr = child_result
        spi_in = self._new_child_spi()
        reply = props.Chosen(chosen.protocol, chosen.encr, chosen.integ, None, None, chosen.esn, chosen.number,
                             spi_in.to_bytes(4, "big"))  # fmt: skip
        out += [m.SA([reply.to_payload()]), m.TS([r.to_payload() for r in tsi], True),
                m.TS([r.to_payload() for r in tsr], False)]  # fmt: skip
        if mode == "transport":
            out.append(m.Notify(Notify.USE_TRANSPORT_MODE))
        self._respond(msg, out)
        self._established(now)
        self._child_up(child, chosen, mode, tsr, tsi, spi_in=spi_in, spi_out=int.from_bytes(chosen.spi, "big"), now=now)

    def _lease_address(self, request: m.CP) -> Any:
        """A virtual IP from the first pool of a family the client asked for (§3.15.1)."""
        wanted = {t for t, _ in request.attributes}
        assert self.peer_id is not None
        key = bytes([self.peer_id[0]]) + self.peer_id[1]
        for pool in self.cfg.pools:
            if (pool.first.version == 4 and CP_INTERNAL_IP4_ADDRESS in wanted) or (
                pool.first.version == 6 and CP_INTERNAL_IP6_ADDRESS in wanted
            ):
                addr = pool.acquire(key)
                if addr is not None:
                    self._lease = (pool, key)
                    self._count("addresses_leased")
                    return addr
        self._count("address_pool_exhausted")
        return None

    def _config_reply(self, vip: Any) -> m.CP:
        attrs: list[tuple[int, bytes]] = []
        if vip.version == 4:
            attrs.append((CP_INTERNAL_IP4_ADDRESS, vip.packed))
        else:
            attrs.append((CP_INTERNAL_IP6_ADDRESS, vip.packed + b"\x80"))  # address | prefix length 128
        pool = self._lease[0] if self._lease else None
        for dns in pool.dns if pool else []:
            attrs.append((CP_INTERNAL_IP4_DNS if dns.version == 4 else CP_INTERNAL_IP6_DNS, dns.packed))
        return m.CP(CFG_REPLY, attrs)

    def _octets(self, initiator_side: bool, ident: m.Identification) -> bytes:
        """RFC 7296 §2.15: what the initiator (or the responder) signs or MACs."""
        assert self.chosen is not None and self.chosen.prf is not None and self.keys is not None
        if initiator_side:
            return auth.signed_octets(self._init_request, self._nr, self.chosen.prf, self.keys.sk_pi, ident)
        return auth.signed_octets(self._init_response, self._ni, self.chosen.prf, self.keys.sk_pr, ident)

    def _prove(self, ident: m.Identification) -> list[m.AnyPayload]:
        """Our CERT payloads (certificate auth) and, last, our AUTH payload."""
        octets = self._octets(self.initiator, ident)
        creds = self.cfg.creds
        if creds.local == "pubkey":
            assert creds.key is not None, "connections.py guarantees a private key for local.auth = pubkey"
            return [*creds.cert_payloads(), auth.sign(creds.key, octets, self._peer_hashes)]
        assert self.chosen is not None and self.chosen.prf is not None
        return [m.Auth(AuthMethod.PSK, auth.psk_auth(self.chosen.prf, self.cfg.psk, octets))]

    def _authenticate_peer(self, idi: m.Identification, idr: m.Identification | None, proof: m.Auth,
                           inner: list[m.AnyPayload]) -> str | None:  # fmt: skip
        """Responder: find the connection that accepts this peer and switch to it (:mod:`profiles`); why none does.

        The candidates that fit IDi, IDr and the IKE proposal are tried best first; the first whose credentials
        verify AUTH becomes ``self.cfg`` (its PSK, its trust anchors)."""
        assert self.chosen is not None
        idr_id = None if idr is None else (idr.id_type, idr.data)
        ranked, why_not = profiles.rank(self.candidates, self.cfg, self.chosen, (idi.id_type, idi.data), idr_id,
                                        self.remote)  # fmt: skip
        for cfg in ranked:
            why = self._verify_peer(idi, proof, inner, cfg)
            if why is None:
                if cfg is not self.cfg:
                    self.switched_from, self.cfg = self.cfg.name, cfg
                    self._count("connection_switched")
                return None
            why_not.append((cfg.name, why))
        if len(self.candidates) == 1:
            return why_not[0][1]
        order = [c.name for c in self.candidates]
        why_not.sort(key=lambda w: order.index(w[0]))
        return "no connection accepts it: " + "; ".join(f"{name}: {why}" for name, why in why_not)

    def _verify_peer(self, ident: m.Identification, proof: m.Auth, inner: list[m.AnyPayload],
                     cfg: PeerConfig | None = None) -> str | None:  # fmt: skip
        """Why the peer's AUTH does not prove its identity with the credentials of ``cfg`` (ours by default)."""
        cfg = cfg or self.cfg
        creds = cfg.creds
        octets = self._octets(not self.initiator, ident)
        if creds.remote == "psk":
            if proof.method != AuthMethod.PSK:
                return f"it signed ({auth.describe(proof)}) but remote.auth = psk expects a pre-shared key"
            assert self.chosen is not None and self.chosen.prf is not None
            ok = hmac.compare_digest(proof.data, auth.psk_auth(self.chosen.prf, cfg.psk, octets))
            self.peer_auth = "psk" if ok else ""
            return None if ok else "AUTH does not verify: the PSK differs"
        if proof.method == AuthMethod.PSK:
            return "it used a pre-shared key but remote.auth = pubkey expects a certificate signature"
        try:
            sent = [x509.load_der_x509_certificate(p.data) for p in inner if isinstance(p, m.Certificate)
                    and not p.request and p.encoding == auth.CERT_X509_SIGNATURE]  # fmt: skip
        except ValueError:
            return "a CERT payload is not a valid DER X.509 certificate"
        pinned = [c for c in creds.peer_certs if cert_has_id(c, ident.id_type, ident.data)]
        if not sent and not pinned:
            return "it sent no certificate (strongSwan sends one when asked: keep send_certreq) and none is pinned"
        leaf = sent[0] if sent else pinned[0]
        if self.wallclock is None:
            return "no wall clock was given to check certificate validity"
        why = verify_path(leaf, sent[1:], list(creds.cacerts), list(creds.peer_certs), self.wallclock(), creds.crls)
        if why is not None:
            return why
        if not cert_has_id(leaf, ident.id_type, ident.data):
            return f"its identity is not in its certificate {subject(leaf)!r} (neither subject nor subjectAltName)"
        why = auth.verify(leaf, proof, octets)
        if why is None:
            self.peer_cert, self.peer_auth = leaf, auth.describe(proof)
        return why
