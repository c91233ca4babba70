"""One IKE SA as a sans-IO state machine (RFC 7296): IKE_SA_INIT, IKE_AUTH (PSK or certificates), the rest.

Theory of operation
-------------------
An :class:`IkeSa` never touches a socket or a clock. ``receive(data, src, src_port, dst_port, now)``
feeds it a datagram addressed to it (the manager demultiplexes by SPI), ``handle_timer(now)`` lets
it retransmit or give up, and the caller collects what it produced with ``datagrams()`` and
``events()``; ``get_timer()`` says when it next needs the clock. Randomness (SPIs, nonces, DH
private values, CBC IVs) comes from the injected ``rng``; KE key pairs may instead come ready-made from
the injected ``keypairs`` callable (the runtime's pool of MODP pairs, :mod:`ipsecstack.ike.groups`).

States: initiator ``init_sent`` -> ``auth_sent`` -> ``established``; responder ``init_done`` ->
``established``; either -> ``deleting`` -> ``closed``. A message that does not fit the state is
dropped and counted (§2.21); nothing is answered before it authenticates, except the unprotected
IKE_SA_INIT error notifies §2.21.1 allows.

Message IDs (§2.2): one outstanding request per direction (window 1). Our request is retransmitted
with exponential back-off until a response with the same Message ID arrives or the tries run out
(§2.4: then the IKE SA is declared dead). A retransmitted peer request (Message ID one below the
next expected) gets the cached response again, byte for byte, and is not processed twice.

Authentication (§2.15) is in :mod:`ipsecstack.ike.auth` (proofs) and :mod:`ipsecstack.ike.certs`
(certificate paths): IKE_SA_INIT carries SIGNATURE_HASH_ALGORITHMS (RFC 7427) both ways and the
responder's CERTREQ; IKE_AUTH carries CERT, CERTREQ and AUTH. Certificate validity needs the time of
day, which comes from the injected ``wallclock``.

NAT traversal (§2.23): both sides send NAT_DETECTION_*_IP in IKE_SA_INIT; if either hash differs
the SA moves to port 4500 for everything after IKE_SA_INIT and the child SAs are UDP-encapsulated.

The class is built in layers, each a module calling only the ones below it: :mod:`sa_core` (state,
Message IDs, sending, key derivation, closing), :mod:`ike_rekey` (IKE SA rekey and reauth timer),
:mod:`child_sa` (child SAs), :mod:`auth_exchange` (IKE_AUTH), and this module (IKE_SA_INIT, request
and response dispatch, timers, the public methods). Configuration and event types: :mod:`model`
(re-exported here).
"""

from __future__ import annotations

from ipsecstack.ike import auth
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.auth_exchange import AuthExchange
from ipsecstack.ike.const import Exchange, Flag, Notify, Protocol
from ipsecstack.ike.model import (
    AH_NAT,
    CFG_REPLY,
    CFG_REQUEST,
    CP_INTERNAL_IP4_ADDRESS,
    CP_INTERNAL_IP4_DNS,
    CP_INTERNAL_IP6_ADDRESS,
    CP_INTERNAL_IP6_DNS,
    NAT_T_PORT,
    REAUTH_RETRY_DELAY,
    REAUTH_TRIES,
    REDUNDANT,
    ChildConfig,
    ChildDown,
    ChildFailed,
    ChildUp,
    Datagram,
    Event,
    IkeDown,
    IkeReauthed,
    IkeRekeyed,
    IkeUp,
    PeerConfig,
    PeerMoved,
    ReauthDue,
    ReauthFailed,
    _hashes,
    _notify_name,
    id_text,
    identity,
    is_wildcard,
    match_identity,
    nat_hash,
    same_identity,
)
from ipsecstack.ike.sa_core import DeleteChild, DeleteOldIke, Dpd, NewChild, RekeyChild, RekeyIke
from ipsecstack.ike.state import Step


class IkeSa(AuthExchange):
    # --- the caller's side ---------------------------------------------------------------------

    def get_timer(self) -> float | None:
        if self.state == "closed":
            return None
        if self._outstanding is not None:
            if self.state == "established" and self.expire_at is not None:
                return min(self._outstanding[3], self.expire_at)
            return self._outstanding[3]
        if self.state == "init_done":
            return self.created + self.cfg.half_open_timeout
        if self.state == "deleting":
            return self.linger_until  # waiting for the peer's DELETE after a rekey (ike_rekey.py)
        if self.state != "established":
            return None
        times = [c.rekey_at for c in self.children if c.rekey_at is not None]
        if self.rekey_at is not None:
            times.append(self.rekey_at)
        if self.reauth_at is not None:
            times.append(self.reauth_at)
        if self.cfg.dpd_delay:
            times.append(self.last_heard + self.cfg.dpd_delay)
        if self.expire_at is not None:
            times.append(self.expire_at)
        return min(times) if times else None

    def heard(self, now: float) -> None:
        """The peer is alive (an authenticated message, or inbound ESP the runtime saw)."""
        self.last_heard = max(self.last_heard, now)

    def handle_timer(self, now: float) -> None:
        if self.state == "deleting" and self._outstanding is None and self.linger_until is not None \
                and now >= self.linger_until:  # fmt: skip
            # the peer did not delete it (RFC 7296 §2.8.2: the old SA, or a redundant one it made): we do
            self.close_now(REDUNDANT if self._standby else "rekeyed", now, "rekeyed")
            return
        if self.state == "init_done" and now >= self.created + self.cfg.half_open_timeout:
            self._close("half-open IKE SA timed out (no IKE_AUTH)")
            return
        if self.state == "established" and self.expire_at is not None and now >= self.expire_at:
            over = self.expire_at - (self.up_at or 0.0) - (self.cfg.rekey_time or 0.0)
            self.close_now(f"not rekeyed within its hard lifetime (rekey_time + over_time = "
                           f"{self.cfg.rekey_time:g}s + {over:g}s)", now, "expired")  # fmt: skip
            return
        if self.state == "established" and self.reauth_at is not None and self.reauth_at <= now:
            self.reauth_at = None  # the manager builds the new IKE SA; it needs no exchange in this one
            self._count("reauths_due")
            self._events.append(ReauthDue(self))
        if self.state == "established" and self._outstanding is None:
            if self.rekey_at is not None and self.rekey_at <= now:
                self._rekey_ike(now)
                return
            due = next((c for c in self.children if c.rekey_at is not None and c.rekey_at <= now), None)
            if due is not None:
                self._rekey_child(due, now)
                return
            if self.cfg.dpd_delay and now >= self.last_heard + self.cfg.dpd_delay:
                self._count("dpd_checks")
                self._pending = Dpd()
                self._send_request(Exchange.INFORMATIONAL, [], now)
                return
        if self._outstanding is None or now < self._outstanding[3]:
            return
        mid, data, tries, _ = self._outstanding
        if tries >= self.cfg.retransmit_tries:
            dpd = isinstance(self._pending, Dpd)
            # §2.4: no answer on an established IKE SA means the peer is dead (the DPD action applies)
            cause = "dead" if self.state == "established" else None
            self._close(("dead peer: no answer to liveness checks" if dpd else "peer did not answer")
                        + f" after {tries + 1} transmissions", cause)  # fmt: skip
            return
        self._count("retransmissions")
        delay = self.cfg.retransmit_timeout * self.cfg.retransmit_base ** (tries + 1)
        self._outstanding = (mid, data, tries + 1, now + delay)
        self._emit(data)

    # --- initiator ---------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Initiator: send IKE_SA_INIT."""
        assert self.initiator and self.state == "new"
        self.spi_i = self.rng(8)
        self._group = self.cfg.proposals[0].dh[0]
        self._send_init(now)

    def _send_init(self, now: float, fresh: bool = True) -> None:
        """Send IKE_SA_INIT; ``fresh=False`` (a COOKIE retry) keeps KE and nonce unchanged (§2.6)."""
        assert self._group is not None
        if fresh:
            self._dh, self._pub = self._keypair(self._group)
            self._ni = self.rng(32)
        pub = self._pub
        payloads: list[m.AnyPayload] = []
        if self._cookie:
            payloads.append(m.Notify(Notify.COOKIE, self._cookie))
        sa = m.SA([p.to_payload(i + 1, b"") for i, p in enumerate(self.cfg.proposals)])
        payloads += [sa, m.KE(self._group.number, pub), m.Nonce(self._ni), *self._nat_notifies(), auth.hash_notify()]
        msg = m.Message(self.spi_i, bytes(8), Exchange.IKE_SA_INIT, Flag.INITIATOR, 0, payloads)
        self._init_request = msg.encode()
        self._step(Step.SEND_INIT)
        self._next_mid = 1
        self._request(0, self._init_request, now)

    def _on_init_response(self, msg: m.Message, now: float) -> None:
        for n in msg.notifies():
            if n.notify_type == Notify.COOKIE and not self._cookie:
                self._cookie = n.data
                self._outstanding = None
                self._count("cookies_received")
                self._send_init(now, fresh=False)
                return
            if n.notify_type == Notify.INVALID_KE_PAYLOAD and len(n.data) == 2 and self._ke_retries < 2:
                want = int.from_bytes(n.data, "big")
                group = next((g for p in self.cfg.proposals for g in p.dh if g.number == want), None)
                if group is None:
                    self._close(f"peer wants key exchange group {want}, which we do not propose")
                    return
                self._ke_retries += 1
                self._group = group
                self._outstanding = None
                self._send_init(now)
                return
            if n.notify_type < 16384:
                self._close(f"peer refused IKE_SA_INIT: {_notify_name(n.notify_type)}")
                return
        sas = msg.get(m.SA)
        kes = msg.get(m.KE)
        nonces = msg.get(m.Nonce)
        if len(sas) != 1 or len(kes) != 1 or len(nonces) != 1 or len(sas[0].proposals) != 1:  # type: ignore[union-attr]
            self._drop("init_response_incomplete")
            return
        chosen = props.check_choice(self.cfg.proposals, sas[0].proposals[0], Protocol.IKE)  # type: ignore[union-attr]
        ke = kes[0]
        assert isinstance(ke, m.KE)
        if chosen is None or chosen.dh is None or chosen.dh.number != ke.group or ke.group != self._group.number:  # type: ignore[union-attr]
            self._close("peer chose a proposal we did not offer")
            return
        self.spi_r = msg.spi_r
        self._nr = nonces[0].data  # type: ignore[union-attr]
        self._init_response = msg.raw
        self._peer_hashes = _hashes(msg)
        if not self._derive(chosen, ke.data):
            return
        self._detect_nat(msg)
        self._send_auth(now)

    # --- responder ---------------------------------------------------------------------------

    def respond_init(self, msg: m.Message, now: float) -> bool:
        """Responder: answer an IKE_SA_INIT request. Returns False if no state should be kept."""
        self.spi_i = msg.spi_i
        self._init_request = msg.raw
        sas, kes, nonces = msg.get(m.SA), msg.get(m.KE), msg.get(m.Nonce)
        if len(sas) != 1 or len(kes) != 1 or len(nonces) != 1:
            self._reply_plain(msg, [m.Notify(Notify.INVALID_SYNTAX)])
            return False
        chosen = props.select(self.cfg.proposals, sas[0].proposals, Protocol.IKE)  # type: ignore[union-attr]
        if chosen is None:
            self._count("no_proposal_chosen")
            self._reply_plain(msg, [m.Notify(Notify.NO_PROPOSAL_CHOSEN)])
            theirs = ", ".join(props.describe_offer(p) for p in sas[0].proposals)  # type: ignore[union-attr]
            ours = ", ".join(p.text for p in self.cfg.proposals)
            self.failure = f"no IKE proposal in common: peer offered {theirs}; ours {ours}"
            return False
        ke = kes[0]
        assert isinstance(ke, m.KE) and chosen.dh is not None
        if ke.group != chosen.dh.number:
            self._reply_plain(msg, [m.Notify(Notify.INVALID_KE_PAYLOAD, chosen.dh.number.to_bytes(2, "big"))])
            return False
        self._ni = nonces[0].data  # type: ignore[union-attr]
        self._nr = self.rng(32)
        self.spi_r = self.rng(8)
        self._group = chosen.dh
        self._dh, pub = self._keypair(chosen.dh)
        if not self._derive(chosen, ke.data):
            return False
        self._detect_nat(msg)
        payloads: list[m.AnyPayload] = [m.SA([chosen.to_payload()]), m.KE(chosen.dh.number, pub), m.Nonce(self._nr)]
        payloads += [*self._nat_notifies(), auth.hash_notify(), *auth.certreqs([c.creds for c in self.candidates])]
        self._peer_hashes = _hashes(msg)
        resp = m.Message(self.spi_i, self.spi_r, Exchange.IKE_SA_INIT, Flag.RESPONSE, 0, payloads)
        self._init_response = resp.encode()
        self._peer_mid = 1
        self._cached_response = (0, self._init_response)
        self._emit(self._init_response, port=self.local_port)
        self._step(Step.ANSWER_INIT)
        return True

    # --- shared ------------------------------------------------------------------------------

    def receive(self, data: bytes, src: str, src_port: int, dst_port: int, now: float) -> None:
        """A datagram for this SA (non-ESP marker already removed)."""
        try:
            msg = m.decode(data)
        except m.ParseError as e:
            self._drop(f"parse_{e.reason}")
            return
        msg.raw = data
        if msg.is_response:
            self._on_response(msg, now)
        else:
            self._on_request(msg, src, src_port, dst_port, now)

    def _on_response(self, msg: m.Message, now: float) -> None:
        out = self._outstanding
        if out is None or msg.message_id != out[0]:
            self._drop("unexpected_response")
            return
        if msg.exchange == Exchange.IKE_SA_INIT:
            if self.state != "init_sent":
                self._drop("unexpected_response")
                return
            self._outstanding = None
            self._on_init_response(msg, now)
            return
        if self.rx is None:
            self._drop("unexpected_response")  # an encrypted exchange before we have keys
            return
        inner = self._open(msg)
        if inner is None:
            return
        self._outstanding = None
        self.heard(now)
        pending, self._pending = self._pending, None
        child_sa = msg.exchange == Exchange.CREATE_CHILD_SA
        informational = msg.exchange == Exchange.INFORMATIONAL
        if isinstance(pending, DeleteOldIke):
            self._close("rekeyed", "rekeyed")
        elif msg.exchange == Exchange.IKE_AUTH and self.state == "auth_sent":
            self._on_auth_response(msg, inner, now)
        elif informational and self.state == "deleting":
            why = "reauthenticated" if self._delete_cause == "reauth" else "deleted"
            self._close(REDUNDANT if self._standby else why)
        elif child_sa and isinstance(pending, RekeyChild):
            self._on_rekey_response(inner, pending, now)
        elif child_sa and isinstance(pending, RekeyIke):
            self._on_ike_rekey_response(inner, pending, now)
        elif informational and isinstance(pending, DeleteChild):
            self._child_gone(pending.child)
        elif child_sa and isinstance(pending, NewChild):
            self._on_new_child_response(inner, pending, now)
        self._next_queued(now)

    def _on_request(self, msg: m.Message, src: str, src_port: int, dst_port: int, now: float) -> None:
        if msg.exchange == Exchange.IKE_SA_INIT:
            if self._cached_response and self._cached_response[0] == 0 and msg.raw == self._init_request:
                self._emit(self._cached_response[1])
            else:
                self._drop("unexpected_request")
            return
        if self.rx is None:
            self._drop("unexpected_request")
            return
        if self._cached_response is not None and msg.message_id == self._cached_response[0]:
            if self._open(msg) is not None:  # only an authentic retransmission gets the cached answer
                self._count("retransmitted_requests")
                self._emit(self._cached_response[1])
            return
        if msg.message_id != self._peer_mid:
            self._drop("bad_message_id")
            return
        inner = self._open(msg)
        if inner is None:
            return
        # §2.23: follow the peer's address/port once a message authenticates (NAT mapping changed)
        if (src_port != self.remote_port or src != self.remote) and self.state == "established" and self.nat:
            self.remote, self.remote_port = src, src_port
            self._count("peer_moved")
            self._events.append(PeerMoved(self, src, src_port))
        elif src_port != self.remote_port or src != self.remote:
            self.remote, self.remote_port = src, src_port
        self.local_port = dst_port
        self._peer_mid += 1
        self.heard(now)
        if msg.exchange == Exchange.IKE_AUTH and self.state == "init_done":
            # §2.4: the peer says it has no other IKE SA with us (the manager's uniqueness policy reads it)
            self.initial_contact = any(isinstance(p, m.Notify) and p.notify_type == Notify.INITIAL_CONTACT
                                       for p in inner)  # fmt: skip
            self._on_auth_request(msg, inner, now)
        elif msg.exchange == Exchange.INFORMATIONAL and self.state in ("established", "deleting"):
            self._on_informational(msg, inner, now)
        elif msg.exchange == Exchange.CREATE_CHILD_SA and self.state == "established":
            self._on_create_child(msg, inner, now)
        elif msg.exchange == Exchange.CREATE_CHILD_SA and self.state == "deleting" and self._is_ike_rekey(inner):
            # RFC 7296 §2.8.2, §2.25.2: this IKE SA is already rekeyed (or being deleted): a peer's rekey that
            # crossed ours is refused, and our DELETE of this SA tells the peer that our rekey stands
            self._count("ike_rekeys_refused")
            self._respond(msg, [m.Notify(Notify.TEMPORARY_FAILURE)])
        else:
            self._respond(msg, [m.Notify(Notify.INVALID_SYNTAX)] if msg.exchange != Exchange.CREATE_CHILD_SA
                          else [m.Notify(Notify.NO_ADDITIONAL_SAS)])  # fmt: skip

    def _on_informational(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> None:
        reply: list[m.AnyPayload] = []
        closing = refused = False
        for p in inner:
            if isinstance(p, m.Delete):
                if p.protocol == Protocol.IKE:
                    closing = True
                elif p.protocol in (Protocol.ESP, Protocol.AH):
                    ours = []
                    for spi in p.spis:
                        for c in list(self.children):
                            # SPIs are per protocol (RFC 4301 §4.1): an AH delete names AH SAs only
                            if c.spi_out == int.from_bytes(spi, "big") and c.child.ike_protocol == p.protocol:
                                ours.append(c.spi_in.to_bytes(4, "big"))
                                self._child_gone(c, "peer")
                    if ours:
                        reply.append(m.Delete(p.protocol, ours))
            elif isinstance(p, m.Notify) and p.notify_type == Notify.AUTHENTICATION_FAILED:
                refused = True  # §2.21.2: the initiator did not accept our IKE_AUTH response
        self._respond(msg, reply)
        if refused:
            what = "PSK" if self.cfg.creds.local == "psk" else "certificate (is our CA in its cacerts?)"
            self._close(f"peer says AUTHENTICATION_FAILED: check the {what} and the identities on both sides")
        elif closing:
            if self.successor is None:
                # §2.8.2: if the peer rekeyed this SA before it saw our rekey request, its new SA takes over
                self._peer_rekey_wins(now)
            if self.successor is not None:
                self._close("rekeyed", "rekeyed")
            elif self._standby:
                self._close(REDUNDANT, "rekeyed")  # a redundant new SA of a simultaneous rekey (§2.8.2)
            else:
                self._close("peer deleted the IKE SA", "peer")

    def close_now(self, reason: str, now: float, cause: str = "local") -> None:
        """Send one DELETE for the IKE SA without waiting for (or retransmitting) it, and close at once:
        for an SA past its hard lifetime or replaced by the uniqueness policy, whose peer may be gone."""
        if self.state in ("established", "deleting") and self.tx is not None:
            self._send_request(Exchange.INFORMATIONAL, [m.Delete(Protocol.IKE, [])], now)
        self._close(reason, cause)

    def refuse_auth(self, reason: str) -> bool:
        """Responder, right after an IKE_AUTH request authenticated the peer and before its output was
        collected: answer AUTHENTICATION_FAILED instead and close (uniqueness policy ``keep``, as strongSwan).
        The IKE_AUTH response, IkeUp and ChildUp are withdrawn. False when it is too late for that."""
        cached = self._cached_response
        if self.initiator or self.state != "established" or cached is None \
                or not any(isinstance(e, IkeUp) for e in self._events):  # fmt: skip
            return False
        mid, data = cached
        self._out = [d for d in self._out if d.data != data]
        self._events = [e for e in self._events if not isinstance(e, IkeUp | ChildUp)]
        self.children.clear()
        self._queue.clear()
        self._respond(m.Message(self.spi_i, self.spi_r, Exchange.IKE_AUTH, 0, mid),
                      [m.Notify(Notify.AUTHENTICATION_FAILED)])  # fmt: skip
        self._count("refused_by_uniqueness")
        self._close(reason, "failed")
        return True

    @property
    def peer_virtual_ip(self) -> str | None:
        """The address we leased to the peer from a pool (§3.15), if any."""
        if self._lease is None:
            return None
        addr = self._lease[0].leases.get(self._lease[1])
        return None if addr is None else str(addr)

    def delete(self, now: float, cause: str = "local") -> None:
        """Start deleting the IKE SA (its children go with it, §1.4.1); ``cause`` is for its IkeDown."""
        if self.state != "established":
            self._close("deleted before establishment")
            return
        self._step(Step.DELETE)
        self._delete_cause = cause
        self._send_request(Exchange.INFORMATIONAL, [m.Delete(Protocol.IKE, [])], now)


__all__ = [
    "AH_NAT",
    "CFG_REPLY",
    "CFG_REQUEST",
    "CP_INTERNAL_IP4_ADDRESS",
    "CP_INTERNAL_IP4_DNS",
    "CP_INTERNAL_IP6_ADDRESS",
    "CP_INTERNAL_IP6_DNS",
    "NAT_T_PORT",
    "REAUTH_RETRY_DELAY",
    "REAUTH_TRIES",
    "ChildConfig",
    "ChildDown",
    "ChildFailed",
    "ChildUp",
    "Datagram",
    "Event",
    "IkeDown",
    "IkeReauthed",
    "IkeRekeyed",
    "IkeSa",
    "IkeUp",
    "PeerConfig",
    "PeerMoved",
    "ReauthDue",
    "ReauthFailed",
    "id_text",
    "identity",
    "is_wildcard",
    "match_identity",
    "nat_hash",
    "same_identity",
]
