"""Child SAs: negotiation in IKE_AUTH and CREATE_CHILD_SA, rekeying, deleting (RFC 7296 §1.3, §2.8, §2.17).

Theory of operation: a layer of :class:`~ipsecstack.ike.session.IkeSa`. A child comes up in
IKE_AUTH (§1.2) or in a CREATE_CHILD_SA without REKEY_SA (§1.3.1); it is rekeyed
make-before-break with REKEY_SA (§1.3.3, §2.8): the new pair is installed, then the old deleted;
simultaneous rekeys are resolved by the lowest nonce (§2.8.1). Deletes are INFORMATIONAL exchanges
with the SPIs (§1.4.1). KEYMAT per §2.17. A refusal is a ``ChildFailed`` event naming both sides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import Exchange, Notify, Protocol
from ipsecstack.ike.groups import KeyExchangeError
from ipsecstack.ike.ike_rekey import IkeRekeying
from ipsecstack.ike.keymat import child_keymat
from ipsecstack.ike.model import (
    AH_NAT,
    ChildConfig,
    ChildDown,
    ChildUp,
    _notify_name,
)
from ipsecstack.ike.sa_core import DeleteChild, DeleteSpi, NewChild, RekeyChild
from ipsecstack.ike.ts import Range, narrow

if TYPE_CHECKING:
    pass


class ChildExchanges(IkeRekeying):
    def _negotiate_child(
        self, inner: list[m.AnyPayload], ignore_dh: bool = True, remote_override: list[Range] | None = None
    ) -> int | tuple[ChildConfig, props.Chosen, str, list[Range], list[Range]]:
        sas = [p for p in inner if isinstance(p, m.SA)]
        tsi = next((p for p in inner if isinstance(p, m.TS) and p.initiator), None)
        tsr = next((p for p in inner if isinstance(p, m.TS) and not p.initiator), None)
        if len(sas) != 1 or tsi is None or tsr is None:
            self._child_failed("child SA request without SA/TSi/TSr payloads")
            return Notify.NO_PROPOSAL_CHOSEN
        transport = any(isinstance(p, m.Notify) and p.notify_type == Notify.USE_TRANSPORT_MODE for p in inner)
        offered_i = [Range.from_payload(t) for t in tsi.selectors]
        offered_r = [Range.from_payload(t) for t in tsr.selectors]
        any_proposal = False
        ah_refused = ""
        for child in self.cfg.children:
            chosen = props.select(child.proposals, sas[0].proposals, child.ike_protocol, ignore_dh=ignore_dh)
            if chosen is None or len(chosen.spi) != 4:
                continue
            if self.nat and child.protocol == "ah":
                self._count("ah_behind_nat")
                ah_refused = child.name
                continue
            any_proposal = True
            if (child.mode == "transport") != transport:
                continue
            ni = narrow(offered_i, remote_override if remote_override is not None else child.remote_ts)
            nr = narrow(offered_r, child.local_ts)
            if ni and nr:
                return child, chosen, child.mode, ni, nr
        theirs = ", ".join(props.describe_offer(p) for p in sas[0].proposals)
        if any_proposal:
            ts = f"TSi {', '.join(map(str, offered_i))} TSr {', '.join(map(str, offered_r))}"
            ours = "; ".join(f"{c.name}: {c.mode} {', '.join(map(str, c.remote_ts))} === "
                             f"{', '.join(map(str, c.local_ts))}" for c in self.cfg.children)  # fmt: skip
            self._child_failed(f"child SA refused (TS_UNACCEPTABLE): peer proposed {ts} "
                               f"({'transport' if transport else 'tunnel'} mode); ours {ours}")  # fmt: skip
            return Notify.TS_UNACCEPTABLE
        ours = "; ".join(f"{c.name}: {', '.join(p.text for p in c.proposals)}" for c in self.cfg.children)
        if ah_refused:
            self._child_failed(f"child SA {ah_refused} refused (NO_PROPOSAL_CHOSEN): {AH_NAT}")
        else:
            self._child_failed(f"child SA refused (NO_PROPOSAL_CHOSEN): peer offered {theirs}; ours {ours}")
        return Notify.NO_PROPOSAL_CHOSEN

    def rekey_child_now(self, spi_in: int, now: float) -> bool:
        """A volume (soft) lifetime of a child SA was reached: rekey it as soon as the window allows."""
        c = next((c for c in self.children if c.spi_in == spi_in or c.spi_out == spi_in), None)
        if c is None or self.state != "established":
            return False
        c.rekey_at = now
        return True

    def child_expired(self, spi: int, now: float) -> bool:
        """A child SA hit its hard lifetime in the datapath: tell the peer and forget it (§1.4.1)."""
        c = next((c for c in self.children if spi in (c.spi_in, c.spi_out)), None)
        if c is None:
            return False
        if self.state == "established":
            self._delete_child(c, now)
        else:
            self._child_gone(c)
        return True

    def create_child(self, name: str, now: float) -> bool:
        """Negotiate the configured child ``name`` again over CREATE_CHILD_SA (§1.3.1), unless an SA of it
        is up or being negotiated. False if there is no such child or the IKE SA is not established."""
        child = next((c for c in self.cfg.children if c.name == name), None)
        if child is None or self.state != "established":
            return False
        busy = (
            any(c.child.name == name for c in self.children)
            or (isinstance(self._pending, NewChild) and self._pending.child.name == name)
            or any(q.subject is child for q in self._queue)
        )
        if not busy:
            self._enqueue(self._create_child, child)
            self._next_queued(now)
        return True

    def _child_up(self, child: ChildConfig, chosen: props.Chosen, mode: str, local: list[Range],
                  remote: list[Range], *, spi_in: int, spi_out: int, nonces: tuple[bytes, bytes] | None = None,
                  shared: bytes | None = None, we_initiated: bool | None = None, replaces: int | None = None,
                  now: float = 0.0) -> None:  # fmt: skip
        assert self.chosen is not None and self.chosen.prf is not None and self.keys is not None
        suite = chosen.child_suite
        ni, nr = nonces or (self._ni, self._nr)
        # §2.17: ESP takes encryption then integrity keys per direction; AH integrity keys only
        km_len = suite.key_len if chosen.protocol == Protocol.AH else chosen.esp_suite
        i2r, r2i = child_keymat(self.chosen.prf, self.keys.sk_d, ni, nr, km_len, shared)
        initiator = self.initiator if we_initiated is None else we_initiated
        key_in, key_out = (r2i, i2r) if initiator else (i2r, r2i)
        encap = (self.local_port, self.remote_port) if self.nat else None
        rekey_at = None
        if initiator and child.rekey_time:
            # §2.8: rekey before expiry, a little early by a random amount, so both ends rarely collide
            jitter = int.from_bytes(self.rng(2), "big") / 65535 * self.cfg.rekey_jitter * child.rekey_time
            rekey_at = now + child.rekey_time - jitter
        up = ChildUp(self._sa, child, mode, suite.keyword, chosen.esn, spi_in, spi_out, key_in, key_out, local, remote,
                     encap, replaces, rekey_at, "ah" if chosen.protocol == Protocol.AH else "esp",
                     initiator)  # fmt: skip
        self.children.append(up)
        self._events.append(up)

    def _child_gone(self, c: ChildUp, cause: str = "local") -> None:
        self._rekeys_done.pop(c.spi_in, None)
        if c in self.children:
            self.children.remove(c)
            if any(o.child.name == c.child.name for o in self.children):
                cause = "rekeyed"  # retired after a rekey (or a collision): its config still has an SA
            self._events.append(ChildDown(self._sa, c.spi_in, c.spi_out, c.child, cause))

    # --- CREATE_CHILD_SA: rekeying a child SA (§1.3.3, §2.8) --------------------------------------

    def _child_request(self, child: ChildConfig, local: list[Range], remote: list[Range], mode: str,
                       rekey_spi: int | None) -> tuple[list[m.AnyPayload], int, bytes, Any]:  # fmt: skip
        """Initiator side of CREATE_CHILD_SA for a child SA (new, or rekeying ``rekey_spi``): the payloads
        [N(REKEY_SA)], SA, Ni, [KEi when the proposal has a group: PFS], TSi, TSr; plus our SPI, Ni and the
        KE private value."""
        spi_in = self._new_child_spi()
        nonce = self.rng(32)
        spi = spi_in.to_bytes(4, "big")
        inner: list[m.AnyPayload] = []
        if rekey_spi is not None:
            # §3.10.1: the REKEY_SA notify names the protocol of the SA being rekeyed
            inner.append(m.Notify(Notify.REKEY_SA, b"", child.ike_protocol, rekey_spi.to_bytes(4, "big")))
        inner.append(m.SA([p.to_payload(i + 1, spi) for i, p in enumerate(child.proposals)]))
        inner.append(m.Nonce(nonce))
        group = child.proposals[0].dh[0] if child.proposals[0].dh else None
        dh = None
        if group is not None:
            dh, pub = self._keypair(group)
            inner.append(m.KE(group.number, pub))
        inner.append(m.TS([r.to_payload() for r in local], True))
        inner.append(m.TS([r.to_payload() for r in remote], False))
        if mode == "transport":
            inner.append(m.Notify(Notify.USE_TRANSPORT_MODE))
        return inner, spi_in, nonce, dh

    def _child_answer(self, child: ChildConfig, inner: list[m.AnyPayload],
                      dh: Any) -> tuple[props.Chosen, bytes, bytes | None] | str:  # fmt: skip
        """Initiator side: check a CREATE_CHILD_SA response; ``(chosen, Nr, g^ir)`` or why it failed."""
        errors = [p for p in inner if isinstance(p, m.Notify) and p.notify_type < 16384]
        sas = [p for p in inner if isinstance(p, m.SA)]
        nonce = next((p for p in inner if isinstance(p, m.Nonce)), None)
        if errors:
            return _notify_name(errors[0].notify_type)
        if len(sas) != 1 or len(sas[0].proposals) != 1 or nonce is None:
            return "malformed response"
        chosen = props.check_choice(child.proposals, sas[0].proposals[0], child.ike_protocol)
        if chosen is None or len(chosen.spi) != 4:
            return "the peer chose a proposal we did not offer"
        shared = None
        if chosen.dh is not None:
            ke = next((p for p in inner if isinstance(p, m.KE)), None)
            try:
                if ke is None or dh is None:
                    raise KeyExchangeError("no KE payload for PFS")
                shared = chosen.dh.shared(dh, ke.data)
            except KeyExchangeError as e:
                return str(e)
        return chosen, nonce.data, shared

    def _rekey_child(self, old: ChildUp, now: float) -> None:
        old.rekey_at = None
        inner, spi_in, nonce, dh = self._child_request(old.child, old.local_ts, old.remote_ts, old.mode, old.spi_in)
        self._pending = RekeyChild(old, spi_in, nonce, dh)
        self._count("child_rekeys_started")
        self._send_request(Exchange.CREATE_CHILD_SA, inner, now)

    def _on_rekey_response(self, inner: list[m.AnyPayload], req: RekeyChild, now: float) -> None:
        old, spi_in, nonce_i, dh = req.old, req.spi_in, req.nonce, req.dh
        answer = self._child_answer(old.child, inner, dh)
        if isinstance(answer, str):
            self._child_failed(f"rekey of child SA {old.child.name} refused: {answer}", "child_rekey_failed")
            old.rekey_at = now + 30.0  # try again later; the old SA keeps carrying traffic
            return
        chosen, nr, shared = answer
        self._child_up(old.child, chosen, old.mode, old.local_ts, old.remote_ts, spi_in=spi_in,
                       spi_out=int.from_bytes(chosen.spi, "big"), nonces=(nonce_i, nr), shared=shared,
                       we_initiated=True, replaces=old.spi_in, now=now)  # fmt: skip
        self._count("child_rekeys")
        if self._rekey_collision(old, nonce_i, nr, self.children[-1], True, now):
            return
        # make-before-break: the new pair is installed; now retire the old one (§2.8)
        self._delete_child(old, now)

    def _rekey_collision(
        self, old: ChildUp, ni: bytes, nr: bytes, new: ChildUp, we_initiated: bool, now: float
    ) -> bool:
        """§2.8.1: both ends rekeyed the same child SA. The new SA made with the lowest of the four nonces
        is redundant and is deleted by the end that initiated its exchange. True if this was a collision."""
        done = self._rekeys_done.setdefault(old.spi_in, [])
        done.append((ni, nr, new, we_initiated))
        if len(done) < 2:
            return False
        self._count("rekey_collisions")
        (a_ni, a_nr, a_new, a_ours), (b_ni, b_nr, b_new, b_ours) = done[:2]
        del self._rekeys_done[old.spi_in]
        redundant, ours = (a_new, a_ours) if min(a_ni, a_nr) < min(b_ni, b_nr) else (b_new, b_ours)

        if ours:
            self._enqueue(self._delete_child, redundant)
        if old in self.children and we_initiated:
            self._enqueue(self._delete_child, old)
        self._next_queued(now)
        return True

    def _delete_child(self, c: ChildUp, now: float) -> None:
        if c not in self.children:
            return
        if self._outstanding is not None:
            self._enqueue(self._delete_child, c)
            return
        self._pending = DeleteChild(c)
        self._send_request(Exchange.INFORMATIONAL, [m.Delete(c.child.ike_protocol, [c.spi_in.to_bytes(4, "big")])],
                           now)  # fmt: skip

    def _send_delete(self, delete: m.Delete, now: float) -> None:
        """An INFORMATIONAL with a Delete for SAs that are not (or no longer) among our children."""
        self._pending = DeleteSpi()
        self._send_request(Exchange.INFORMATIONAL, [delete], now)

    # --- CREATE_CHILD_SA: a new child SA (§1.3.1) ------------------------------------------------

    def _create_child(self, child: ChildConfig, now: float) -> None:
        """Initiator: another configured child SA over CREATE_CHILD_SA, with PFS if its proposal has a group."""
        if self.nat and child.protocol == "ah":
            self._child_failed(f"child SA {child.name} not proposed: {AH_NAT}")
            return
        inner, spi_in, nonce, dh = self._child_request(child, child.local_ts, child.remote_ts, child.mode, None)
        self._pending = NewChild(child, spi_in, nonce, dh)
        self._send_request(Exchange.CREATE_CHILD_SA, inner, now)

    def _on_new_child_response(self, inner: list[m.AnyPayload], req: NewChild, now: float) -> None:
        child, spi_in, nonce_i, dh = req.child, req.spi_in, req.nonce, req.dh
        answer = self._child_answer(child, inner, dh)
        tsi = next((p for p in inner if isinstance(p, m.TS) and p.initiator), None)
        tsr = next((p for p in inner if isinstance(p, m.TS) and not p.initiator), None)
        if isinstance(answer, str) or tsi is None or tsr is None:
            self._child_failed(f"child SA {child.name} refused: {answer if isinstance(answer, str) else 'no TS'}")
            return
        chosen, nr, shared = answer
        transport = any(isinstance(p, m.Notify) and p.notify_type == Notify.USE_TRANSPORT_MODE for p in inner)
        self._child_up(child, chosen, "transport" if transport else "tunnel",
                       [Range.from_payload(t) for t in tsi.selectors], [Range.from_payload(t) for t in tsr.selectors],
                       spi_in=spi_in, spi_out=int.from_bytes(chosen.spi, "big"), nonces=(nonce_i, nr),
                       shared=shared, we_initiated=True, now=now)  # fmt: skip

    def _on_new_child_request(self, msg: m.Message, inner: list[m.AnyPayload], nonce: m.Nonce, now: float) -> None:
        result = self._negotiate_child(inner, ignore_dh=False)
        if isinstance(result, int):
            self._respond(msg, [m.Notify(result)])
            return
        child, chosen, mode, tsi, tsr = result
        reply = self._child_reply(msg, inner, chosen, mode, tsi, tsr)
        if reply is not None:
            spi_in, nr, shared = reply
            self._child_up(child, chosen, mode, tsr, tsi, spi_in=spi_in, spi_out=int.from_bytes(chosen.spi, "big"),
                           nonces=(nonce.data, nr), shared=shared, we_initiated=False, now=now)  # fmt: skip

    def _child_reply(self, msg: m.Message, inner: list[m.AnyPayload], chosen: props.Chosen, mode: str,
                     tsi: list[Range], tsr: list[Range]) -> tuple[int, bytes, bytes | None] | None:  # fmt: skip
        """Responder: answer a CREATE_CHILD_SA request for a child SA (new or rekeyed) with SA, Nr, [KEr]
        (PFS when the chosen proposal has a group), TSi, TSr. Returns ``(our SPI, Nr, g^ir)``, or None
        after answering with an error notify."""
        ke = next((p for p in inner if isinstance(p, m.KE)), None)
        spi_in = self._new_child_spi()
        nr = self.rng(32)
        reply = props.Chosen(chosen.protocol, chosen.encr, chosen.integ, None, chosen.dh, chosen.esn, chosen.number,
                             spi_in.to_bytes(4, "big"))  # fmt: skip
        out: list[m.AnyPayload] = [m.SA([reply.to_payload()]), m.Nonce(nr)]
        shared = None
        if chosen.dh is not None:
            answer = self._answer_ke(msg, chosen.dh, ke)
            if answer is None:
                return None
            pub, shared = answer
            out.append(m.KE(chosen.dh.number, pub))
        out += [m.TS([r.to_payload() for r in tsi], True), m.TS([r.to_payload() for r in tsr], False)]
        if mode == "transport":
            out.append(m.Notify(Notify.USE_TRANSPORT_MODE))
        self._respond(msg, out)
        return spi_in, nr, shared

    def _on_create_child(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> None:
        rekey = next((p for p in inner if isinstance(p, m.Notify) and p.notify_type == Notify.REKEY_SA), None)
        sas = [p for p in inner if isinstance(p, m.SA)]
        nonce = next((p for p in inner if isinstance(p, m.Nonce)), None)
        if rekey is None and len(sas) == 1 and nonce is not None and sas[0].proposals \
                and sas[0].proposals[0].protocol == Protocol.IKE:  # fmt: skip
            self._on_ike_rekey_request(msg, inner, sas[0], nonce, now)
            return
        if rekey is None and len(sas) == 1 and nonce is not None:
            self._on_new_child_request(msg, inner, nonce, now)
            return
        if rekey is None or len(sas) != 1 or nonce is None:
            self._respond(msg, [m.Notify(Notify.INVALID_SYNTAX)])
            return
        spi = int.from_bytes(rekey.spi, "big") if len(rekey.spi) == 4 else -1
        old = next((c for c in self.children if spi in (c.spi_out, c.spi_in)
                    and c.child.ike_protocol == rekey.protocol), None)  # fmt: skip
        if old is None:
            self._respond(msg, [m.Notify(Notify.CHILD_SA_NOT_FOUND, b"", rekey.protocol, rekey.spi)])
            return
        chosen = props.select(old.child.proposals, sas[0].proposals, old.child.ike_protocol)
        if chosen is None or len(chosen.spi) != 4:
            self._respond(msg, [m.Notify(Notify.NO_PROPOSAL_CHOSEN)])
            return
        reply = self._child_reply(msg, inner, chosen, old.mode, old.remote_ts, old.local_ts)
        if reply is None:
            return
        spi_in, nr, shared = reply
        self._child_up(old.child, chosen, old.mode, old.local_ts, old.remote_ts, spi_in=spi_in,
                       spi_out=int.from_bytes(chosen.spi, "big"), nonces=(nonce.data, nr), shared=shared,
                       we_initiated=False, replaces=old.spi_in, now=now)  # fmt: skip
        self._count("child_rekeys")
        ours_pending = isinstance(self._pending, RekeyChild) and self._pending.old is old
        if ours_pending or old.spi_in in self._rekeys_done:
            self._rekey_collision(old, nonce.data, nr, self.children[-1], False, now)
