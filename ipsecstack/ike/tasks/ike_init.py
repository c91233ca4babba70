"""IKE_SA_INIT in both roles (RFC 7296 §1.2, §2.6, §2.10, §2.23, RFC 7427 §4).

The initiator offers its proposals, a KE of its first group, a nonce, the NAT detection hashes and
SIGNATURE_HASH_ALGORITHMS; a COOKIE answer is echoed with the same KE and nonce (§2.6), an
INVALID_KE_PAYLOAD answer is retried with the group asked for (twice at most, §1.2): both are
NEED_MORE. The responder chooses a proposal and answers in kind, with CERTREQs for the CAs its
candidate connections trust; what it cannot accept is refused with an unprotected notify (§2.21.1)
and no state. Both derive SKEYSEED and the SK_* keys (``Context.derive``) and detect NAT; the
initiator then runs IKE_AUTH at once. The messages are sent in the clear: the IKE SA encodes them
and keeps them for the AUTH payloads (``init_request``, ``init_response``).
"""

from __future__ import annotations

from typing import Any

from ipsecstack.ike import auth, derive, nat
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import Exchange, Notify, Protocol
from ipsecstack.ike.groups import Group
from ipsecstack.ike.model import _hashes, _notify_name
from ipsecstack.ike.tasks.base import Context, Result, Task
from ipsecstack.ike.tasks.ike_auth import IkeAuth

KE_RETRIES = 2  # INVALID_KE_PAYLOAD answers we follow before giving up


class IkeInit(Task):
    exchange = Exchange.IKE_SA_INIT
    needs_established = False

    def __init__(self, ctx: Context, *, initiator: bool = True, cookie: bytes = b"") -> None:
        super().__init__(ctx, initiator=initiator)
        self.cookie = cookie
        self.group: Group | None = ctx.cfg.proposals[0].dh[0] if initiator else None
        self._fresh = True
        self._ke_retries = 0
        self._priv: Any = None
        self._pub = b""

    def request(self, now: float) -> list[m.AnyPayload] | None:
        ctx = self.ctx
        assert self.group is not None
        if self._fresh:  # a COOKIE retry keeps KE and nonce unchanged (§2.6)
            self._priv, self._pub = derive.keypair(ctx, self.group)
            ctx.ni = ctx.rng(32)
        payloads: list[m.AnyPayload] = []
        if self.cookie:
            payloads.append(m.Notify(Notify.COOKIE, self.cookie))
        sa = m.SA([p.to_payload(i + 1, b"") for i, p in enumerate(ctx.cfg.proposals)])
        payloads += [sa, m.KE(self.group.number, self._pub), m.Nonce(ctx.ni), *nat.notifies(ctx), auth.hash_notify()]
        return payloads

    def on_response(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        ctx = self.ctx
        for n in msg.notifies():
            if n.notify_type == Notify.COOKIE and not self.cookie:
                self.cookie, self._fresh = n.data, False
                ctx.count("cookies_received")
                return Result.NEED_MORE
            if n.notify_type == Notify.INVALID_KE_PAYLOAD and len(n.data) == 2 and self._ke_retries < KE_RETRIES:
                want = int.from_bytes(n.data, "big")
                group = next((g for p in ctx.cfg.proposals for g in p.dh if g.number == want), None)
                if group is None:
                    ctx.close(f"peer wants key exchange group {want}, which we do not propose")
                    return Result.FAILED
                self._ke_retries += 1
                self.group, self._fresh = group, True
                return Result.NEED_MORE
            if n.notify_type < 16384:
                ctx.close(f"peer refused IKE_SA_INIT: {_notify_name(n.notify_type)}")
                return Result.FAILED
        sas, kes, nonces = msg.get(m.SA), msg.get(m.KE), msg.get(m.Nonce)
        if len(sas) != 1 or len(kes) != 1 or len(nonces) != 1 or len(sas[0].proposals) != 1:  # type: ignore[union-attr]
            ctx.count("dropped_init_response_incomplete")
            return Result.FAILED
        chosen = props.check_choice(ctx.cfg.proposals, sas[0].proposals[0], Protocol.IKE)  # type: ignore[union-attr]
        ke = kes[0]
        assert isinstance(ke, m.KE) and self.group is not None
        if chosen is None or chosen.dh is None or chosen.dh.number != ke.group or ke.group != self.group.number:
            ctx.close("peer chose a proposal we did not offer")
            return Result.FAILED
        ctx.spi_r = msg.spi_r
        ctx.nr = nonces[0].data  # type: ignore[union-attr]
        ctx.init_response = msg.raw
        ctx.peer_hashes = _hashes(msg)
        if not derive.derive(ctx, chosen, self._priv, ke.data):
            return Result.FAILED
        nat.detect(ctx, msg)
        ctx.tasks.perform(IkeAuth(ctx), now)
        return Result.DONE

    def on_request(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        """Responder: choose and derive; ``reply`` is the response, or the unprotected refusal (no state kept)
        when it returns FAILED."""
        ctx = self.ctx
        ctx.spi_i = msg.spi_i
        ctx.init_request = msg.raw
        sas, kes, nonces = msg.get(m.SA), msg.get(m.KE), msg.get(m.Nonce)
        if len(sas) != 1 or len(kes) != 1 or len(nonces) != 1:
            self.reply = [m.Notify(Notify.INVALID_SYNTAX)]
            return Result.FAILED
        chosen = props.select(ctx.cfg.proposals, sas[0].proposals, Protocol.IKE)  # type: ignore[union-attr]
        if chosen is None:
            ctx.count("no_proposal_chosen")
            self.reply = [m.Notify(Notify.NO_PROPOSAL_CHOSEN)]
            theirs = ", ".join(props.describe_offer(p) for p in sas[0].proposals)  # type: ignore[union-attr]
            ours = ", ".join(p.text for p in ctx.cfg.proposals)
            ctx.failure = f"no IKE proposal in common: peer offered {theirs}; ours {ours}"
            return Result.FAILED
        ke = kes[0]
        assert isinstance(ke, m.KE) and chosen.dh is not None
        if ke.group != chosen.dh.number:
            self.reply = [m.Notify(Notify.INVALID_KE_PAYLOAD, chosen.dh.number.to_bytes(2, "big"))]
            return Result.FAILED
        ctx.ni = nonces[0].data  # type: ignore[union-attr]
        ctx.nr = ctx.rng(32)
        ctx.spi_r = ctx.rng(8)
        self.group = chosen.dh
        self._priv, self._pub = derive.keypair(ctx, chosen.dh)
        if not derive.derive(ctx, chosen, self._priv, ke.data):
            return Result.FAILED
        nat.detect(ctx, msg)
        ctx.peer_hashes = _hashes(msg)
        self.reply = [
            m.SA([chosen.to_payload()]),
            m.KE(chosen.dh.number, self._pub),
            m.Nonce(ctx.nr),
            *nat.notifies(ctx),
            auth.hash_notify(),
            *auth.certreqs([c.creds for c in ctx.candidates]),
        ]
        return Result.DONE
