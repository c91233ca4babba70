"""Which connection a responder's IKE SA belongs to once IKE_AUTH names the peer (remote-access profiles).

Theory of operation
-------------------
IKE_SA_INIT tells a responder only the peer's address and its proposals, so several connections may
fit it (typically ``remote_addrs = ["%any"]`` for PSK clients, certificate clients, or groups of
clients with their own pools). The manager makes all of them *candidates* of the new IKE SA and
answers IKE_SA_INIT with the first whose proposals fit the offer (one with the peer's exact address
first). IKE_AUTH then brings what decides, as in strongSwan: the peer's identity (IDi), the identity
it wants us to have (IDr, optional, RFC 7296 §3.5) and its AUTH method (§3.8).

:func:`rank` keeps the candidates that can take this peer: ``remote.id`` matches IDi (see
:func:`~ipsecstack.ike.model.match_identity`: the same identity beats a pattern such as
``*@example.com``, which beats no ``remote.id``), ``local.id`` is the IDr asked for (or that IDr is
in our certificate), and the IKE proposal chosen in IKE_SA_INIT is one of its proposals too (the keys
are already derived from it). It orders them best first: identity match, then the peer's exact
address over ``%any``, then the order of the configuration. The IKE SA then verifies AUTH with each
one's credentials in that order (``remote.auth``: a PSK connection takes only a PSK AUTH, a pubkey
one only a signature with a certificate it trusts; the PSK is that connection's secret) and switches
to the first that accepts it: from then on its pools, children, traffic selectors, ``unique``,
lifetimes and name are the IKE SA's. Pure functions; no state.
"""

from __future__ import annotations

from ipsecstack.ike import proposals as props
from ipsecstack.ike.certs import cert_has_id
from ipsecstack.ike.const import Protocol
from ipsecstack.ike.model import PeerConfig, id_text, match_identity, same_identity

Identity = tuple[int, bytes]


def ike_proposal_fits(cfg: PeerConfig, chosen: props.Chosen) -> bool:
    """The IKE SA's negotiated suite is one that ``cfg``'s proposals would have chosen too."""
    return props.select(cfg.proposals, [chosen.to_payload()], Protocol.IKE) is not None


def local_id_fits(cfg: PeerConfig, idr: Identity) -> bool:
    """The IDr the initiator asked for is our ``local.id``, or an identity in our certificate (RFC 4945 §3.1)."""
    if same_identity(cfg.local_id, idr):
        return True
    certs = cfg.creds.certs if cfg.creds.local == "pubkey" else ()
    return bool(certs) and cert_has_id(certs[0], *idr)


def rank(candidates: list[PeerConfig], current: PeerConfig, chosen: props.Chosen, idi: Identity,
         idr: Identity | None, src: str) -> tuple[list[PeerConfig], list[tuple[str, str]]]:  # fmt: skip
    """The candidates that may take a peer with identity ``idi`` (asking us to be ``idr``), best first, and why
    each other one cannot (connection name, reason). ``current`` is the connection IKE_SA_INIT used."""
    fits: list[tuple[int, int, int, PeerConfig]] = []
    why_not: list[tuple[str, str]] = []
    for order, cfg in enumerate(candidates):
        score = match_identity(cfg.remote_id, idi)
        if not score:
            assert cfg.remote_id is not None
            why_not.append((cfg.name, f"identity mismatch: remote.id is {id_text(*cfg.remote_id)!r}"))
        elif idr is not None and not local_id_fits(cfg, idr):
            why_not.append((cfg.name, f"it asks for us as {id_text(*idr)!r} (IDr), local.id is "
                                      f"{id_text(*cfg.local_id)!r}"))  # fmt: skip
        elif cfg is not current and not ike_proposal_fits(cfg, chosen):
            why_not.append((cfg.name, f"the IKE proposal chosen in IKE_SA_INIT ({chosen.describe()}) is not in "
                                      "its proposals"))  # fmt: skip
        else:
            fits.append((-score, 0 if cfg.remote_addr == src else 1, order, cfg))
    return [f[3] for f in sorted(fits, key=lambda f: f[:3])], why_not
