"""The keys of an IKE SA from its key exchange (RFC 7296 §2.14, and §2.18 for an IKE SA made by a rekey).

SKEYSEED = prf(Ni | Nr, g^ir) (after a rekey: prf(SK_d (old), g^ir | Ni | Nr)), then
SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr), and the
two directions of the SK payload: the initiator sends with the ``*i`` keys. Pure functions.
"""

from __future__ import annotations

from ipsecstack.ike import proposals as props
from ipsecstack.ike import sk
from ipsecstack.ike.keymat import IkeKeys, Prf, ike_sa_keys


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
