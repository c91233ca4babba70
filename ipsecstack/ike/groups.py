"""Key exchange groups for IKEv2 (RFC 7296 §3.4, IANA "Transform Type 4"): MODP, ECP, Curve25519/448.

Each group turns a private value into the public KE payload data and, with the peer's KE data, into
the shared secret g^ir used for SKEYSEED (§2.14). Private values come from the injected ``rng``, so
an exchange is reproducible in tests. Peer values are validated before use (RFC 7296 §5.12 points
at RFC 6989): MODP values must lie in [2, p-2]; ECP points must be on the curve (``cryptography``
checks while decoding); X25519/X448 shared secrets of all zeros are refused.

MODP arithmetic
---------------
Both modular exponentiations of a MODP group, the public value g^x mod p and the shared secret
y^x mod p, run in OpenSSL through ``cryptography``'s DH keys: OpenSSL's DH exponentiation is
constant-time in the private exponent (``BN_FLG_CONSTTIME``), unlike Python's ``pow()``. The private value is still
``x = rng(size) mod (p-3) + 2``, as it always was, so seeded runs keep their bytes; the public value
is OpenSSL's DH of x with the generator itself as the "peer" (g^x), the simplest way ``cryptography``
offers to compute g^x for an x chosen outside OpenSSL. x = q = (p-1)/2 would give g^x = 1 (2 lies in the
order-q subgroup of these safe primes) and is drawn again; it is the only x in [2, p-2] for which a
valid peer value could make y^x equal 1 or p-1, which OpenSSL refuses. Recent ``cryptography``
releases deprecate finite-field DH with a warning on every key built; IKEv2 still needs groups 14-16,
so that one warning is filtered here.

Cost per exchange (generate + shared, medians of runs on this project's 2-core machines, full-size
exponents as before): MODP2048 63 -> 5-6 ms, MODP3072 180-190 -> 18-20 ms, MODP4096 410-470 -> 38-42 ms,
against ECP256 0.15 ms, ECP384 1.0-1.2 ms, ECP521 0.8-1.0 ms, X25519 0.1 ms, X448 0.5 ms.
``cryptography`` holds the GIL during these calls, so a worker thread cannot run them alongside the
event loop (measured: a thread looping on them stalls the loop by a whole exponentiation at a time).
:class:`ipsecstack.runtime.kepool.KeyPairPool` therefore has a worker process compute g^x
(:meth:`Group.modp_public`) for exponents drawn on the loop, builds the keys from them
(:meth:`Group.modp_key`, no exponentiation) and hands these MODP key pairs (the generate half) to the
IKE SAs through the injected :data:`KeyPairSource`. An exchange then costs one exponentiation on the
loop, the shared secret, instead of two. Measured on a responder with the pool warm, an IKE_SA_INIT request holds the
loop for 4.6 / 11 / 25 ms (MODP 2048 / 3072 / 4096) instead of 8 / 22 / 48 ms. The sans-IO core only
sees the callable; without one (in tests) every pair is made from ``rng`` when it is needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import dh, ec, x448, x25519
from cryptography.utils import CryptographyDeprecationWarning

from ipsecstack.entropy import Rng

warnings.filterwarnings("ignore", message="Diffie-Hellman over finite fields", category=CryptographyDeprecationWarning)

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


KeyPair = tuple[object, bytes]  # (private value, public KE data)
KeyPairSource = Callable[["Group"], KeyPair | None]
"""A key pair for a group made ahead of time, or None (then the IKE SA makes one from its ``rng``)."""


@dataclass(frozen=True)
class Group:
    number: int
    keyword: str
    kind: str  # "modp" | "ecp" | "x"
    size: int  # bytes of KE data

    def generate(self, rng: Rng) -> KeyPair:
        """A fresh private value and the public KE data."""
        if self.kind == "modp":
            return self.modp_keypair(self.modp_exponent(rng))
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

    @property
    def prime(self) -> int:
        """p of a MODP group (KeyError for the others)."""
        return _MODP[self.number]

    def modp_exponent(self, rng: Rng) -> int:
        """A MODP private exponent from ``rng`` (cheap: no exponentiation)."""
        p = _MODP[self.number]
        while True:
            # RFC 7296 §5.12 / RFC 3526: private exponents of at least twice the security strength
            x = int.from_bytes(rng(self.size), "big") % (p - 3) + 2
            if x != p >> 1:  # q = (p-1)/2: g^q = 1 (see the module docstring)
                return x

    def modp_keypair(self, x: int) -> tuple[dh.DHPrivateKey, bytes]:
        """The OpenSSL key for exponent ``x`` and the public value g^x mod p (one exponentiation)."""
        public = self.modp_public(x)
        return self.modp_key(x, public), public

    def modp_public(self, x: int) -> bytes:
        """g^x mod p as KE data (the exponentiation: what the key-pair worker process computes)."""
        # g^x is x's DH with the generator as the peer
        y = dh.DHPrivateNumbers(x, _DH_GENERATOR[self.number]).private_key().exchange(_DH_G_KEY[self.number])
        return y.rjust(self.size, b"\0")

    def modp_key(self, x: int, public: bytes) -> dh.DHPrivateKey:
        """The OpenSSL key for exponent ``x`` whose public half is ``public`` = g^x (cheap: no exponentiation)."""
        y = dh.DHPublicNumbers(int.from_bytes(public, "big"), _DH_PARAMS[self.number])
        return dh.DHPrivateNumbers(x, y).private_key()

    def shared(self, private: object, peer: bytes) -> bytes:
        """g^ir from our private value and the peer's KE data (raises KeyExchangeError)."""
        if len(peer) != self.size:
            raise KeyExchangeError(f"group {self.number} KE data must be {self.size} bytes, got {len(peer)}")
        if self.kind == "modp":
            p = _MODP[self.number]
            y = int.from_bytes(peer, "big")
            if not 1 < y < p - 1:
                raise KeyExchangeError("MODP public value outside [2, p-2]")
            assert isinstance(private, dh.DHPrivateKey)
            try:
                secret = private.exchange(dh.DHPublicNumbers(y, _DH_PARAMS[self.number]).public_key())
            except ValueError as e:
                raise KeyExchangeError(f"OpenSSL refused the MODP public value: {e}") from None
            # §2.14: g^ir is as long as the prime, with its leading zeros
            return secret.rjust(self.size, b"\0")
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
_DH_PARAMS: Final = {n: dh.DHParameterNumbers(p, 2) for n, p in _MODP.items()}  # RFC 3526: generator 2
_DH_GENERATOR: Final = {n: dh.DHPublicNumbers(2, params) for n, params in _DH_PARAMS.items()}
_DH_G_KEY: Final = {n: g.public_key() for n, g in _DH_GENERATOR.items()}
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
