"""Key exchange groups for IKEv2 (RFC 7296 §3.4, IANA "Transform Type 4"): MODP, ECP, Curve25519/448.

Each group turns a private value into the public KE payload data and, with the peer's KE data, into
the shared secret g^ir used for SKEYSEED (§2.14). Private values come from the injected ``rng``, so
an exchange is reproducible in tests. Peer values are validated before use (RFC 7296 §5.12 points
at RFC 6989): MODP values must lie in [2, p-2]; ECP points must be on the curve (``cryptography``
checks while decoding); X25519/X448 shared secrets of all zeros are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, x448, x25519

from ipsecstack.entropy import Rng

# RFC 3526 §3: 2048-bit MODP group 14, generator 2
MODP_2048 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)

# RFC 3526 §4: 3072-bit MODP group 15, generator 2
MODP_3072 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200C"
    "BBE117577A615D6C770988C0BAD946E208E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
    16,
)

# RFC 3526 §5: 4096-bit MODP group 16, generator 2
MODP_4096 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200C"
    "BBE117577A615D6C770988C0BAD946E208E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D7"
    "88719A10BDBA5B2699C327186AF4E23C1A946834B6150BDA2583E9CA2AD44CE8DBBBC2DB04DE8EF92E8EFC141FBECAA6"
    "287C59474E6BC05D99B2964FA090C3A2233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA9"
    "93B4EA988D8FDDC186FFB7DC90A6C08F4DF435C934063199FFFFFFFFFFFFFFFF",
    16,
)


class KeyExchangeError(ValueError):
    """The peer's KE data is unusable (wrong length, not on the curve, degenerate)."""


@dataclass(frozen=True)
class Group:
    number: int
    keyword: str
    kind: str  # "modp" | "ecp" | "x"
    size: int  # bytes of KE data

    def generate(self, rng: Rng) -> tuple[object, bytes]:
        """A fresh private value and the public KE data."""
        if self.kind == "modp":
            p = _MODP[self.number]
            # RFC 7296 §5.12 / RFC 3526: private exponents of at least twice the security strength
            x = int.from_bytes(rng(self.size), "big") % (p - 3) + 2
            return x, pow(2, x, p).to_bytes(self.size, "big")
        if self.kind == "ecp":
            curve = _CURVES[self.number]
            order = _ORDERS[self.number]
            d = int.from_bytes(rng(self.size // 2 + 8), "big") % (order - 1) + 1
            key = ec.derive_private_key(d, curve)
            pub = key.public_key().public_numbers()
            half = self.size // 2
            # RFC 5903 §7: KE data is x || y, each padded to the field size
            return key, pub.x.to_bytes(half, "big") + pub.y.to_bytes(half, "big")
        if self.number == 31:
            k25 = x25519.X25519PrivateKey.from_private_bytes(rng(32))
            return k25, k25.public_key().public_bytes_raw()
        k448 = x448.X448PrivateKey.from_private_bytes(rng(56))
        return k448, k448.public_key().public_bytes_raw()

    def shared(self, private: object, peer: bytes) -> bytes:
        """g^ir from our private value and the peer's KE data (raises KeyExchangeError)."""
        if len(peer) != self.size:
            raise KeyExchangeError(f"group {self.number} KE data must be {self.size} bytes, got {len(peer)}")
        if self.kind == "modp":
            p = _MODP[self.number]
            y = int.from_bytes(peer, "big")
            if not 1 < y < p - 1:
                raise KeyExchangeError("MODP public value outside [2, p-2]")
            assert isinstance(private, int)
            return pow(y, private, p).to_bytes(self.size, "big")
        if self.kind == "ecp":
            assert isinstance(private, ec.EllipticCurvePrivateKey)
            try:
                pub = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[self.number], b"\x04" + peer)
            except ValueError:
                raise KeyExchangeError("ECP public value is not a point on the curve") from None
            # RFC 5903 §7: the shared secret is the x coordinate
            return private.exchange(ec.ECDH(), pub)
        try:
            if self.number == 31:
                assert isinstance(private, x25519.X25519PrivateKey)
                secret = private.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
            else:
                assert isinstance(private, x448.X448PrivateKey)
                secret = private.exchange(x448.X448PublicKey.from_public_bytes(peer))
        except ValueError:
            raise KeyExchangeError("degenerate Curve25519/448 shared secret") from None
        return secret


_MODP: Final = {14: MODP_2048, 15: MODP_3072, 16: MODP_4096}
_CURVES: Final[dict[int, ec.EllipticCurve]] = {19: ec.SECP256R1(), 20: ec.SECP384R1(), 21: ec.SECP521R1()}
_ORDERS: Final = {
    19: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    20: int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16),
    21: int(
        "1FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B"
        "8899C47AEBB6FB71E91386409",
        16,
    ),
}

GROUPS: Final = {
    g.number: g
    for g in (
        Group(14, "modp2048", "modp", 256),
        Group(15, "modp3072", "modp", 384),
        Group(16, "modp4096", "modp", 512),
        Group(19, "ecp256", "ecp", 64),
        Group(20, "ecp384", "ecp", 96),
        Group(21, "ecp521", "ecp", 132),
        Group(31, "curve25519", "x", 32),
        Group(32, "curve448", "x", 56),
    )
}
KEYWORDS: Final = {g.keyword: g for g in GROUPS.values()} | {"x25519": GROUPS[31], "x448": GROUPS[32]}
