"""The keys of an IKE SA from its key exchange (RFC 7296 §2.14, and §2.18 for an IKE SA made by a rekey).

SKEYSEED = prf(Ni | Nr, g^ir) (after a rekey: prf(SK_d (old), g^ir | Ni | Nr)), then
SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr), and the
two directions of the SK payload: the initiator sends with the ``*i`` keys. :func:`sa_keys` is a pure
function; :func:`derive` and :func:`install` write the result into an IKE SA (anything :class:`Keyed`).
"""

from __future__ import annotations

from typing import Any, Protocol

from ipsecstack.entropy import Rng
from ipsecstack.ike import proposals as props
from ipsecstack.ike import sk
from ipsecstack.ike.groups import Group, KeyExchangeError, KeyPair, KeyPairSource
from ipsecstack.ike.keymat import IkeKeys, Prf, ike_sa_keys


class Keyed(Protocol):
    """What of an IKE SA its keys are made from and go into."""

    initiator: bool
    rng: Rng
    keypairs: KeyPairSource | None
    chosen: props.Chosen | None
    keys: IkeKeys | None
    tx: sk.SkKeys | None
    rx: sk.SkKeys | None
    ni: bytes
    nr: bytes
    spi_i: bytes
    spi_r: bytes

    def close(self, reason: str, cause: str | None = None) -> None: ...


def sa_keys(chosen: props.Chosen, shared: bytes, ni: bytes, nr: bytes, spi_i: bytes, spi_r: bytes, *,
            initiator: bool, old: tuple[bytes, Prf] | None = None) -> tuple[IkeKeys, sk.SkKeys, sk.SkKeys]:  # fmt: skip
    """``(keys, ours, the peer's)``: the SK_* keys, and the SK payload keys we send and receive with.
    ``old``: the SK_d and prf of the IKE SA a rekey replaces."""
    assert chosen.prf is not None
    encr_len = chosen.encr.key_len + chosen.encr.salt_len
    integ_len = 0 if chosen.encr.aead or chosen.integ is None else chosen.integ.key_len
    old_sk_d, old_prf = old if old is not None else (None, None)
    _, keys = ike_sa_keys(chosen.prf, shared, ni, nr, spi_i, spi_r, encr_len, integ_len, old_sk_d=old_sk_d,
                          old_prf=old_prf)  # fmt: skip
    integ = None if chosen.encr.aead else chosen.integ
    i_keys = sk.SkKeys(chosen.encr, integ, keys.sk_ei, keys.sk_ai)
    r_keys = sk.SkKeys(chosen.encr, integ, keys.sk_er, keys.sk_ar)
    return (keys, i_keys, r_keys) if initiator else (keys, r_keys, i_keys)


def keypair(sa: Keyed, group: Group) -> KeyPair:
    """A KE private value and public data: made ahead of time by ``sa.keypairs`` if it has one, else now."""
    made = sa.keypairs(group) if sa.keypairs is not None else None
    return made if made is not None else group.generate(sa.rng)


def derive(sa: Keyed, chosen: props.Chosen, priv: Any, peer_ke: bytes) -> bool:
    """SKEYSEED and the SK_* keys of IKE_SA_INIT (§2.14); False (and ``sa`` closed) if the peer's KE is unusable."""
    assert chosen.dh is not None
    try:
        shared = chosen.dh.shared(priv, peer_ke)
    except KeyExchangeError as e:
        sa.close(f"unusable key exchange data: {e}")
        return False
    install(sa, chosen, shared)
    return True


def install(sa: Keyed, chosen: props.Chosen, shared: bytes, old: Keyed | None = None) -> None:
    """The keys of ``sa`` from the shared secret; ``old``: the IKE SA a rekey replaces (§2.18: SKEYSEED from
    its SK_d)."""
    prior = None
    if old is not None:
        assert old.keys is not None and old.chosen is not None and old.chosen.prf is not None
        prior = (old.keys.sk_d, old.chosen.prf)
    sa.chosen = chosen
    sa.keys, sa.tx, sa.rx = sa_keys(chosen, shared, sa.ni, sa.nr, sa.spi_i, sa.spi_r, initiator=sa.initiator,
                                    old=prior)  # fmt: skip
