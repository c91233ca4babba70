"""The proofs of IKE_AUTH (RFC 7296 §2.15, RFC 7427) and the responder's choice of connection (profiles).

What each side signs or MACs, our CERT and AUTH payloads, and the verification of the peer's: a PSK
MAC with the connection's secret, or a signature with a certificate whose path to a trusted CA
(:mod:`ipsecstack.ike.certs`) holds at the injected wall-clock time. Functions of a task
:class:`~ipsecstack.ike.tasks.base.Context`; no state of their own.
"""

from __future__ import annotations

import hmac

from cryptography import x509

from ipsecstack.ike import auth, profiles
from ipsecstack.ike import message as m
from ipsecstack.ike.certs import cert_has_id, subject, verify_path
from ipsecstack.ike.const import AuthMethod
from ipsecstack.ike.model import PeerConfig
from ipsecstack.ike.tasks.base import Context


def octets(ctx: Context, initiator_side: bool, ident: m.Identification) -> bytes:
    """RFC 7296 §2.15: what the initiator (or the responder) signs or MACs."""
    assert ctx.chosen is not None and ctx.chosen.prf is not None and ctx.keys is not None
    if initiator_side:
        return auth.signed_octets(ctx.init_request, ctx.nr, ctx.chosen.prf, ctx.keys.sk_pi, ident)
    return auth.signed_octets(ctx.init_response, ctx.ni, ctx.chosen.prf, ctx.keys.sk_pr, ident)


def prove(ctx: Context, ident: m.Identification) -> list[m.AnyPayload]:
    """Our CERT payloads (certificate auth) and, last, our AUTH payload."""
    data = octets(ctx, ctx.initiator, ident)
    creds = ctx.cfg.creds
    if creds.local == "pubkey":
        assert creds.key is not None, "connections.py guarantees a private key for local.auth = pubkey"
        return [*creds.cert_payloads(), auth.sign(creds.key, data, ctx.peer_hashes)]
    assert ctx.chosen is not None and ctx.chosen.prf is not None
    return [m.Auth(AuthMethod.PSK, auth.psk_auth(ctx.chosen.prf, ctx.cfg.psk, data))]


def authenticate_peer(ctx: Context, idi: m.Identification, idr: m.Identification | None, proof: m.Auth,
                      inner: list[m.AnyPayload]) -> str | None:  # fmt: skip
    """Responder: find the connection that accepts this peer and switch to it (:mod:`profiles`); why none does.

    The candidates that fit IDi, IDr and the IKE proposal are tried best first; the first whose credentials
    verify AUTH becomes ``ctx.cfg`` (its PSK, its trust anchors)."""
    assert ctx.chosen is not None
    idr_id = None if idr is None else (idr.id_type, idr.data)
    ranked, why_not = profiles.rank(ctx.candidates, ctx.cfg, ctx.chosen, (idi.id_type, idi.data), idr_id,
                                    ctx.remote)  # fmt: skip
    for cfg in ranked:
        why = verify_peer(ctx, idi, proof, inner, cfg)
        if why is None:
            if cfg is not ctx.cfg:
                ctx.switched_from, ctx.cfg = ctx.cfg.name, cfg
                ctx.count("connection_switched")
            return None
        why_not.append((cfg.name, why))
    if len(ctx.candidates) == 1:
        return why_not[0][1]
    order = [c.name for c in ctx.candidates]
    why_not.sort(key=lambda w: order.index(w[0]))
    return "no connection accepts it: " + "; ".join(f"{name}: {why}" for name, why in why_not)


def verify_peer(ctx: Context, ident: m.Identification, proof: m.Auth, inner: list[m.AnyPayload],
                cfg: PeerConfig | None = None) -> str | None:  # fmt: skip
    """Why the peer's AUTH does not prove its identity with the credentials of ``cfg`` (ours by default)."""
    cfg = cfg or ctx.cfg
    creds = cfg.creds
    data = octets(ctx, not ctx.initiator, ident)
    if creds.remote == "psk":
        if proof.method != AuthMethod.PSK:
            return f"it signed ({auth.describe(proof)}) but remote.auth = psk expects a pre-shared key"
        assert ctx.chosen is not None and ctx.chosen.prf is not None
        ok = hmac.compare_digest(proof.data, auth.psk_auth(ctx.chosen.prf, cfg.psk, data))
        ctx.peer_auth = "psk" if ok else ""
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
    if ctx.wallclock is None:
        return "no wall clock was given to check certificate validity"
    why = verify_path(leaf, sent[1:], list(creds.cacerts), list(creds.peer_certs), ctx.wallclock(), creds.crls)
    if why is not None:
        return why
    if not cert_has_id(leaf, ident.id_type, ident.data):
        return f"its identity is not in its certificate {subject(leaf)!r} (neither subject nor subjectAltName)"
    why = auth.verify(leaf, proof, data)
    if why is None:
        ctx.peer_cert, ctx.peer_auth = leaf, auth.describe(proof)
    return why
