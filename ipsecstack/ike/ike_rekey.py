"""Rekeying and reauthenticating the IKE SA (RFC 7296 §1.3.2, §2.8, §2.8.2, §2.18, §2.25.2).

Theory of operation: a layer of :class:`~ipsecstack.ike.session.IkeSa`. The IKE SA rekey is a
CREATE_CHILD_SA carrying an IKE proposal; it makes a new IKE SA with new SPIs and keys from SK_d
(§2.18), which the manager can reach at once (``spawned``). When the new SA takes over
(``_take_over``) it inherits the children, the reauthentication time and any lease, its rekey timer
starts, and ``IkeRekeyed`` is reported (once per rekey); the old SA is "deleting" from then on and
is deleted by the initiator of the rekey that survives.

Simultaneous rekeys (§2.8.2). A peer's rekey request that arrives while ours is outstanding is
answered as usual, but its new SA waits (``_peer_rekey``, "standby") until our exchange ends:

- our response makes a second new SA: the one whose exchange holds the lowest of the four nonces
  (octet by octet) is redundant and is deleted, over itself, by the end that initiated it; the
  other takes over; the initiator of the survivor deletes the old SA, the other end waits for that;
- our request fails (the peer finished its rekey before it saw ours and answers TEMPORARY_FAILURE,
  as this module does for a rekey request on a "deleting" SA, §2.25.2), or the peer deletes the old
  SA (it never saw our request): the peer's new SA takes over and our attempt is forgotten.

Waiting for the peer's DELETE (of the old SA, or of the redundant SA it made) is bounded by
``linger_until``, the time the peer retransmits one request (``_exchange_span``); then we delete it
ourselves. A redundant or standby SA closes with cause ``"rekeyed"`` and never carries children.
Timers are jittered (``rand_time``) so both ends rarely rekey at once; the reauthentication timer
only emits ``ReauthDue``: the manager makes the new IKE SA (§2.8.3, make-before-break).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike import sk
from ipsecstack.ike.const import Exchange, Notify, Protocol
from ipsecstack.ike.groups import KeyExchangeError
from ipsecstack.ike.keymat import ike_sa_keys
from ipsecstack.ike.model import (
    REAUTH_RETRY_DELAY,
    REAUTH_TRIES,
    IkeRekeyed,
    IkeUp,
)
from ipsecstack.ike.sa_core import DeleteOldIke, IkeSaCore, RekeyIke
from ipsecstack.ike.state import Step

if TYPE_CHECKING:
    from ipsecstack.ike.session import IkeSa


class IkeRekeying(IkeSaCore):
    # --- CREATE_CHILD_SA: rekeying the IKE SA (§1.3.2, §2.18) ---------------------------------------

    def _rekey_ike(self, now: float) -> None:
        assert self.chosen is not None and self.chosen.dh is not None
        self.rekey_at = None
        spi = self.rng(8)
        nonce = self.rng(32)
        group = self.chosen.dh
        priv, pub = self._keypair(group)
        sa = m.SA([p.to_payload(i + 1, spi) for i, p in enumerate(self.cfg.proposals)])
        self._pending = RekeyIke(spi, nonce, priv)
        self._count("ike_rekeys_started")
        self._send_request(Exchange.CREATE_CHILD_SA, [sa, m.Nonce(nonce), m.KE(group.number, pub)], now)

    @staticmethod
    def _is_ike_rekey(inner: list[m.AnyPayload]) -> bool:
        """A CREATE_CHILD_SA request rekeying the IKE SA: no REKEY_SA notify, one SA payload with an IKE proposal."""
        if any(isinstance(p, m.Notify) and p.notify_type == Notify.REKEY_SA for p in inner):
            return False
        sas = [p for p in inner if isinstance(p, m.SA)]
        return len(sas) == 1 and bool(sas[0].proposals) and sas[0].proposals[0].protocol == Protocol.IKE

    def _on_ike_rekey_response(self, inner: list[m.AnyPayload], req: RekeyIke, now: float) -> None:
        spi_i, ni, priv = req.spi, req.nonce, req.priv
        sas = [p for p in inner if isinstance(p, m.SA)]
        nonce = next((p for p in inner if isinstance(p, m.Nonce)), None)
        ke = next((p for p in inner if isinstance(p, m.KE)), None)
        chosen = None
        if len(sas) == 1 and len(sas[0].proposals) == 1:
            chosen = props.check_choice(self.cfg.proposals, sas[0].proposals[0], Protocol.IKE)
        if chosen is None or nonce is None or ke is None or chosen.dh is None or ke.group != chosen.dh.number \
                or len(chosen.spi) != 8:  # fmt: skip
            self._count("ike_rekey_failed")
            self._ike_rekey_refused(now)
            return
        try:
            shared = chosen.dh.shared(priv, ke.data)
        except KeyExchangeError:
            self._ike_rekey_refused(now)
            return
        new = self._rekeyed_sa(chosen, spi_i, chosen.spi, ni, nonce.data, shared, initiator=True, now=now)
        if self._peer_rekey is not None:
            self._ike_collision(new, now)
            return
        self._take_over(new, now)
        self._delete_old(now)

    def _ike_rekey_refused(self, now: float) -> None:
        if self._peer_rekey_wins(now):
            # §2.8.2: the peer finished rekeying before it saw our request (TEMPORARY_FAILURE): its new SA
            # took over, and the peer deletes this one
            self.linger_until = now + self._exchange_span()
            return
        self.rekey_at = now + 30.0

    def _on_ike_rekey_request(self, msg: m.Message, inner: list[m.AnyPayload], sa: m.SA, nonce: m.Nonce,
                              now: float) -> None:  # fmt: skip
        if self._peer_rekey is not None:
            # the peer's first rekey still waits for ours to end (§2.8.2): no third IKE SA (§2.25)
            self._count("ike_rekeys_refused")
            self._respond(msg, [m.Notify(Notify.TEMPORARY_FAILURE)])
            return
        chosen = props.select(self.cfg.proposals, sa.proposals, Protocol.IKE)
        ke = next((p for p in inner if isinstance(p, m.KE)), None)
        if chosen is None or chosen.dh is None or len(chosen.spi) != 8:
            self._respond(msg, [m.Notify(Notify.NO_PROPOSAL_CHOSEN)])
            return
        answer = self._answer_ke(msg, chosen.dh, ke)
        if answer is None:
            return
        pub, shared = answer
        spi_r = self.rng(8)
        nr = self.rng(32)
        reply = props.Chosen(chosen.protocol, chosen.encr, chosen.integ, chosen.prf, chosen.dh, False, chosen.number,
                             spi_r)  # fmt: skip
        self._respond(msg, [m.SA([reply.to_payload()]), m.Nonce(nr), m.KE(chosen.dh.number, pub)])
        new = self._rekeyed_sa(chosen, chosen.spi, spi_r, nonce.data, nr, shared, initiator=False, now=now)
        if isinstance(self._pending, RekeyIke):
            self._peer_rekey = new  # §2.8.2: both ends rekey this SA; decided once our own exchange ends
        else:
            self._take_over(new, now)

    def _rekeyed_sa(self, chosen: props.Chosen, spi_i: bytes, spi_r: bytes, ni: bytes, nr: bytes, shared: bytes,
                    *, initiator: bool, now: float) -> IkeSa:  # fmt: skip
        """The new IKE SA of a rekey exchange (§2.18), established but not (yet) in charge of anything."""
        from ipsecstack.ike.session import IkeSa  # the whole class (this module is one of its layers)

        assert self.keys is not None and self.chosen is not None and chosen.prf is not None
        new = IkeSa(self.cfg, initiator=initiator, rng=self.rng, now=now, wallclock=self.wallclock, remote=self.remote,
                    remote_port=self.remote_port, keypairs=self.keypairs)  # fmt: skip
        new.local_port = self.local_port
        new.nat = self.nat
        new.behind_nat = self.behind_nat
        new.peer_behind_nat = self.peer_behind_nat
        new.nat_fake = self.nat_fake
        new.peer_id = self.peer_id
        new.local_identity = self.local_identity
        new.spi_i, new.spi_r = spi_i, spi_r
        new._ni, new._nr = ni, nr
        encr_len = chosen.encr.key_len + chosen.encr.salt_len
        integ_len = 0 if chosen.encr.aead or chosen.integ is None else chosen.integ.key_len
        _, keys = ike_sa_keys(chosen.prf, shared, ni, nr, spi_i, spi_r, encr_len, integ_len,
                              old_sk_d=self.keys.sk_d, old_prf=self.chosen.prf)  # fmt: skip
        new.chosen = chosen
        new.keys = keys
        integ = None if chosen.encr.aead else chosen.integ
        i_keys = sk.SkKeys(chosen.encr, integ, keys.sk_ei, keys.sk_ai)
        r_keys = sk.SkKeys(chosen.encr, integ, keys.sk_er, keys.sk_ar)
        new.tx, new.rx = (i_keys, r_keys) if initiator else (r_keys, i_keys)
        new._next_mid = 0
        new._peer_mid = 0
        new._step(Step.REKEYED_IN)
        new.up_at = now
        new.last_heard = now
        new._standby = True
        self._spawned.append(new)
        return new

    def _take_over(self, new: IkeSa, now: float, *, collision: bool = False, redundant: IkeSa | None = None) -> None:
        """``new`` replaces this IKE SA: it gets the children (§2.18), the reauthentication time and the lease, and
        its lifetime starts now; this SA only waits for (or sends) its DELETE from here on."""
        new._standby = False
        new._lease = self._lease
        new.up_at = now
        new._schedule_ike_rekey(now)
        new.reauth_at, self.reauth_at = self.reauth_at, None  # rekeying is no reauthentication: the time stands
        new.children, self.children = self.children, []
        self.successor = new
        self.rekey_at = None
        self._step(Step.DELETE)
        self._delete_cause = "rekeyed"  # also if its DELETE goes unanswered
        self._count("ike_rekeys")
        self._events.append(IkeRekeyed(self._sa, new, collision, redundant))

    def _peer_rekey_wins(self, now: float) -> bool:
        """§2.8.2: only the peer's rekey of this SA made a new SA (it had not seen ours): that one takes over.
        False if there is none (or the peer deleted it already)."""
        new, self._peer_rekey = self._peer_rekey, None
        if new is None or new.state == "closed":
            return False
        self._count("ike_rekey_collisions")
        self._take_over(new, now, collision=True)
        return True

    def _ike_collision(self, ours: IkeSa, now: float) -> None:
        """§2.8.2: both rekeys of this SA made a new IKE SA. As for child SAs (§2.8.1), the one made by the
        exchange with the lowest of the four nonces is redundant and is deleted by the end that initiated it;
        the other takes over, and its initiator deletes this (old) SA."""
        theirs, self._peer_rekey = self._peer_rekey, None
        assert theirs is not None
        self._count("ike_rekey_collisions")
        ours_redundant = min(ours._ni, ours._nr) < min(theirs._ni, theirs._nr)  # bytes compare octet by octet
        if theirs.state == "closed":  # the peer deleted its own already (its DELETE overtook its response)
            ours_redundant = False
        survivor, redundant = (theirs, ours) if ours_redundant else (ours, theirs)
        self._take_over(survivor, now, collision=True, redundant=redundant)
        if ours_redundant:
            redundant.delete(now, "rekeyed")
            self.linger_until = now + self._exchange_span()  # the peer deletes this SA
        else:
            if redundant.state != "closed":
                redundant._step(Step.PEER_DELETES)  # the peer made it and deletes it
                redundant.linger_until = now + self._exchange_span()
            self._delete_old(now)

    def _delete_old(self, now: float) -> None:
        """The old IKE SA is retired by the initiator of the rekey that replaced it (§1.3.2, §2.8)."""
        self._pending = DeleteOldIke()
        self._send_request(Exchange.INFORMATIONAL, [m.Delete(Protocol.IKE, [])], now)

    def _exchange_span(self) -> float:
        """How long a request of the peer's may take to arrive: our whole retransmission schedule for one."""
        c = self.cfg
        return c.retransmit_timeout * sum(c.retransmit_base**k for k in range(c.retransmit_tries + 1))

    def _jitter(self, t: float) -> float:
        """How much earlier than ``t`` (rekey_time, reauth_time) to act: random, up to ``rand_time`` (strongSwan's
        meaning; 0: exactly on time) or, by default, up to ``rekey_jitter`` (10%) of ``t``."""
        frac = int.from_bytes(self.rng(2), "big") / 65535
        return frac * self.cfg.rand_time if self.cfg.rand_time is not None else frac * self.cfg.rekey_jitter * t

    def _schedule_ike_rekey(self, now: float) -> None:
        t = self.cfg.rekey_time
        if t:
            self.rekey_at = now + t - self._jitter(t)
            # strongSwan's over_time: if rekeying keeps failing, the IKE SA ends here (default 10% of rekey_time)
            over = self.cfg.over_time if self.cfg.over_time is not None else t / 10
            self.expire_at = now + t + over

    def reauth_failed(self, now: float) -> float | None:
        """The new IKE SA of our reauthentication failed: try again later, a bounded number of times.
        Returns when (None: no more tries)."""
        self._reauth_tries += 1
        self._count("reauths_failed")
        retry = now + REAUTH_RETRY_DELAY if self._reauth_tries < REAUTH_TRIES and self.established else None
        self.reauth_at = retry
        return retry

    def _established(self, now: float = 0.0) -> None:
        self._step(Step.AUTHENTICATED)
        self.up_at = now
        self._schedule_ike_rekey(now)
        t = self.cfg.reauth_time
        if t:
            # strongSwan's reauth_time: independent of rekey_time, a little early by a random amount, like rekeys
            self.reauth_at = now + t - self._jitter(t)
        self._events.append(IkeUp(self._sa))
