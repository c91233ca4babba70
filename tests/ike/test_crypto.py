"""IKEv2 key exchange groups, prf+, key derivation and the SK payload."""

from __future__ import annotations

import hmac
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import dh

from ipsecstack.crypto.registry import ENCR, INTEG, parse_esp_transform
from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import message as m
from ipsecstack.ike import sk
from ipsecstack.ike.const import Exchange, Flag
from ipsecstack.ike.groups import GROUPS, MODP_2048, MODP_3072, MODP_4096, KeyExchangeError
from ipsecstack.ike.keymat import PRFS, child_keymat, ike_sa_keys, prf_plus


@pytest.mark.parametrize("number", sorted(GROUPS))
def test_groups_agree(number: int) -> None:
    g = GROUPS[number]
    rng = seeded_rng(number)
    a, pub_a = g.generate(rng)
    b, pub_b = g.generate(rng)
    assert len(pub_a) == g.size
    assert g.shared(a, pub_b) == g.shared(b, pub_a)
    with pytest.raises(KeyExchangeError):
        g.shared(a, pub_b[:-1])


def test_modp_2048_is_the_rfc3526_prime() -> None:
    p = MODP_2048
    assert p.bit_length() == 2048
    assert hex(p).upper().startswith("0XFFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1")
    assert p & 0xFFFFFFFFFFFFFFFF == 0xFFFFFFFFFFFFFFFF
    q = (p - 1) // 2
    assert pow(2, p - 1, p) == 1 and pow(3, q - 1, q) == 1  # Fermat checks: p and (p-1)/2 prime


@pytest.mark.parametrize("bad", [b"\x00" * 256, (1).to_bytes(256, "big"), (MODP_2048 - 1).to_bytes(256, "big")])
def test_modp_rejects_degenerate_values(bad: bytes) -> None:
    g = GROUPS[14]
    priv, _ = g.generate(seeded_rng(1))
    with pytest.raises(KeyExchangeError):
        g.shared(priv, bad)


@pytest.mark.parametrize("number", [14, 15, 16])
def test_modp_runs_in_openssl_with_the_exponent_from_rng(number: int) -> None:
    """The private value is still ``rng(size) mod (p-3) + 2`` (seeded runs keep their bytes); OpenSSL computes
    g^x and y^x, which must equal the RFC 3526 definitions; g^ir keeps its leading zeros (§2.14)."""
    g = GROUPS[number]
    p = {14: MODP_2048, 15: MODP_3072, 16: MODP_4096}[number]
    raw = seeded_rng(number)(g.size)
    x = int.from_bytes(raw, "big") % (p - 3) + 2
    priv, pub = g.generate(seeded_rng(number))
    assert isinstance(priv, dh.DHPrivateKey) and priv.private_numbers().x == x
    assert pub == pow(2, x, p).to_bytes(g.size, "big")
    _, peer = g.generate(seeded_rng(number + 100))
    assert g.shared(priv, peer) == pow(int.from_bytes(peer, "big"), x, p).to_bytes(g.size, "big")
    # a peer value whose g^ir is 2^100 (g = 2 generates the order-q subgroup): 8 * size - 101 leading zero bits
    q = (p - 1) // 2
    small = pow(2, 100 * pow(x, -1, q) % q, p).to_bytes(g.size, "big")
    assert g.shared(priv, small) == (2**100).to_bytes(g.size, "big")


def test_modp_never_uses_the_exponent_q() -> None:
    """x = (p-1)/2 would make g^x = 1 (and OpenSSL refuse the key): such a draw is drawn again."""
    g = GROUPS[14]
    q = (MODP_2048 - 1) // 2
    draws = [(q - 2).to_bytes(256, "big"), (5).to_bytes(256, "big")]  # x = raw mod (p-3) + 2: q, then 7
    priv, pub = g.generate(lambda n: draws.pop(0))
    assert not draws and pub == pow(2, 7, MODP_2048).to_bytes(256, "big")
    assert isinstance(priv, dh.DHPrivateKey) and priv.private_numbers().x == 7


def test_ecp_rejects_points_off_the_curve() -> None:
    g = GROUPS[19]
    priv, pub = g.generate(seeded_rng(2))
    with pytest.raises(KeyExchangeError):
        g.shared(priv, pub[:32] + bytes(32))


def test_x25519_rejects_the_zero_point() -> None:
    g = GROUPS[31]
    priv, _ = g.generate(seeded_rng(3))
    with pytest.raises(KeyExchangeError):
        g.shared(priv, bytes(32))


def test_prf_plus_is_the_rfc_construction() -> None:
    prf = PRFS[5]
    key, seed = os.urandom(32), os.urandom(40)
    t1 = hmac.digest(key, seed + b"\x01", "sha256")
    t2 = hmac.digest(key, t1 + seed + b"\x02", "sha256")
    t3 = hmac.digest(key, t2 + seed + b"\x03", "sha256")
    assert prf_plus(prf, key, seed, 80) == (t1 + t2 + t3)[:80]
    with pytest.raises(ValueError):
        prf_plus(prf, key, seed, 255 * 32 + 1)


def test_ike_sa_keys_layout_and_rekey() -> None:
    prf = PRFS[5]
    ni, nr, spi_i, spi_r, gir = os.urandom(32), os.urandom(32), os.urandom(8), os.urandom(8), os.urandom(32)
    skeyseed, keys = ike_sa_keys(prf, gir, ni, nr, spi_i, spi_r, encr_key_len=20, integ_key_len=0)
    assert skeyseed == hmac.digest(ni + nr, gir, "sha256")
    stream = prf_plus(prf, skeyseed, ni + nr + spi_i + spi_r, 32 * 3 + 40)
    assert keys.sk_d == stream[:32] and keys.sk_ei == stream[32:52] and keys.sk_er == stream[52:72]
    assert keys.sk_pi == stream[72:104] and keys.sk_pr == stream[104:136] and keys.sk_ai == b""
    assert "secret" in repr(keys) and keys.sk_d.hex() not in repr(keys)
    new_seed, _ = ike_sa_keys(prf, gir, ni, nr, spi_i, spi_r, 20, 0, old_sk_d=keys.sk_d)
    assert new_seed == hmac.digest(keys.sk_d, gir + ni + nr, "sha256")  # RFC 7296 §2.18


def test_child_keymat_order() -> None:
    prf = PRFS[6]
    sk_d, ni, nr = os.urandom(48), os.urandom(32), os.urandom(32)
    suite = parse_esp_transform("aes256-sha256")
    i2r, r2i = child_keymat(prf, sk_d, ni, nr, suite)
    stream = prf_plus(prf, sk_d, ni + nr, 2 * suite.key_len)
    assert i2r == stream[: suite.key_len] and r2i == stream[suite.key_len :]
    pfs_i2r, _ = child_keymat(prf, sk_d, ni, nr, suite, shared=b"g" * 32)
    assert pfs_i2r == prf_plus(prf, sk_d, b"g" * 32 + ni + nr, suite.key_len)


@pytest.mark.parametrize(
    ("encr", "integ", "key_len"),
    [("aes128gcm16", None, 20), ("aes256gcm16", None, 36), ("chacha20poly1305", None, 36), ("aes256", "sha256", 32)],
)
def test_sk_round_trip_and_tamper(encr: str, integ: str | None, key_len: int) -> None:
    keys = sk.SkKeys(ENCR[encr], INTEG[integ] if integ else None, os.urandom(key_len), os.urandom(32))
    msg = m.Message(os.urandom(8), os.urandom(8), Exchange.IKE_AUTH, Flag.INITIATOR, 1)
    inner: list[m.AnyPayload] = [m.Identification(2, b"a.example"), m.Auth(2, os.urandom(32)), m.Nonce(os.urandom(16))]
    data = sk.seal(msg, inner, keys, seeded_rng(1))
    decoded = m.decode(data)
    assert sk.open_(data, decoded, keys) == inner
    for i in (0, 20, 30, len(data) - 1):
        bad = bytearray(data)
        bad[i] ^= 1
        try:
            dmsg = m.decode(bytes(bad))
        except m.ParseError:
            continue
        with pytest.raises(sk.SkError):
            sk.open_(bytes(bad), dmsg, keys)
