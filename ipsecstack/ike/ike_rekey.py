"""Rekeying and reauthenticating the IKE SA (RFC 7296 §1.3.2, §2.8, §2.18).

Theory of operation: a layer of :class:`~ipsecstack.ike.session.IkeSa`. The IKE SA rekey is a
CREATE_CHILD_SA carrying an IKE proposal; the successor takes new SPIs and keys from SK_d
(§2.18), inherits the children, and the old SA is deleted by the rekey's initiator. Timers are
jittered so both ends rarely rekey at once; the reauthentication timer only emits ``ReauthDue``:
the manager makes the new IKE SA (§2.8.3, make-before-break).
"""

from __future__ import annotations

from typing import Any

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
from ipsecstack.ike.sa_core import IkeSaCore


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
        self._pending = ("rekey_ike", (spi, nonce, priv))
        self._count("ike_rekeys_started")
        self._send_request(Exchange.CREATE_CHILD_SA, [sa, m.Nonce(nonce), m.KE(group.number, pub)], now)

    def _on_ike_rekey_response(self, inner: list[m.AnyPayload], state: Any, now: float) -> None:
        spi_i, ni, priv = state
        sas = [p for p in inner if isinstance(p, m.SA)]
        nonce = next((p for p in inner if isinstance(p, m.Nonce)), None)
        ke = next((p for p in inner if isinstance(p, m.KE)), None)
        chosen = None
        if len(sas) == 1 and len(sas[0].proposals) == 1:
            chosen = props.check_choice(self.cfg.proposals, sas[0].proposals[0], Protocol.IKE)
        if chosen is None or nonce is None or ke is None or chosen.dh is None or ke.group != chosen.dh.number \
                or len(chosen.spi) != 8:  # fmt: skip
            self._count("ike_rekey_failed")
            self.rekey_at = now + 30.0
            return
        try:
            shared = chosen.dh.shared(priv, ke.data)
        except KeyExchangeError:
            self.rekey_at = now + 30.0
            return
        self._successor(chosen, spi_i, chosen.spi, ni, nonce.data, shared, initiator=True, now=now)
        # the old IKE SA is retired by its rekey initiator (§1.3.2)
        self._pending = ("delete_old_ike", None)
        self._send_request(Exchange.INFORMATIONAL, [m.Delete(Protocol.IKE, [])], now)

    def _on_ike_rekey_request(self, msg: m.Message, inner: list[m.AnyPayload], sa: m.SA, nonce: m.Nonce,
                              now: float) -> None:  # fmt: skip
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
        self._successor(chosen, chosen.spi, spi_r, nonce.data, nr, shared, initiator=False, now=now)

    def _successor(self, chosen: props.Chosen, spi_i: bytes, spi_r: bytes, ni: bytes, nr: bytes, shared: bytes,
                   *, initiator: bool, now: float) -> None:  # fmt: skip
        """Create the rekeyed IKE SA and move the child SAs to it (§2.18)."""
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
        new._lease = self._lease
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
        new.state = "established"
        new.up_at = now
        new._schedule_ike_rekey(now)
        new.reauth_at, self.reauth_at = self.reauth_at, None  # rekeying is no reauthentication: the time stands
        new.children, self.children = self.children, []
        new.last_heard = now
        self.successor = new
        self.rekey_at = None
        self.state = "deleting"  # the old SA only waits for (or sends) its DELETE now
        self._count("ike_rekeys")
        self._events.append(IkeRekeyed(self._sa, new))

    def _schedule_ike_rekey(self, now: float) -> None:
        t = self.cfg.rekey_time
        if t:
            jitter = int.from_bytes(self.rng(2), "big") / 65535 * self.cfg.rekey_jitter * t
            self.rekey_at = now + t - jitter
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
        self.state = "established"
        self.up_at = now
        self._schedule_ike_rekey(now)
        t = self.cfg.reauth_time
        if t:
            # strongSwan's reauth_time: independent of rekey_time, a little early by a random amount, like rekeys
            jitter = int.from_bytes(self.rng(2), "big") / 65535 * self.cfg.rekey_jitter * t
            self.reauth_at = now + t - jitter
        self._events.append(IkeUp(self._sa))
