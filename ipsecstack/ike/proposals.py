"""Proposals in strongSwan's keyword syntax, their SA payload form, and selection (RFC 7296 §2.7, §3.3).

A proposal string lists algorithms of each transform type in any order, e.g.
``aes128gcm16-prfsha256-x25519`` (IKE, AEAD), ``aes256-sha256-modp2048`` (IKE: the PRF defaults to
the integrity algorithm's hash), ``aes128gcm16-x25519-esn`` (ESP with PFS and ESN),
``sha256-x25519`` (AH: integrity only, RFC 4302, here with PFS; protocol ID 2 in the SA payload,
§3.3.1). Several algorithms of one type make a proposal that accepts any of them
(``aes128gcm16-aes256gcm16-...``).

Selection (responder, §2.7): walk *our* proposals in order of preference; for each, take the first
of the peer's proposals of the same protocol for which every transform type has an algorithm both
sides list (ours in our preference order); the answer carries exactly one algorithm per type and
the peer's proposal number. Nothing in common: NO_PROPOSAL_CHOSEN.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipsecstack.crypto.registry import ENCR, INTEG, AhSuite, EncrAlg, EspSuite, IntegAlg
from ipsecstack.errors import ConfigError
from ipsecstack.ike import message as m
from ipsecstack.ike.const import Protocol, TransformType
from ipsecstack.ike.groups import GROUPS, KEYWORDS, Group
from ipsecstack.ike.keymat import PRF_KEYWORDS, Prf

_ENCR_ALIASES = {"aes128gcm128": "aes128gcm16", "aes192gcm128": "aes192gcm16", "aes256gcm128": "aes256gcm16"}
_INTEG_ALIASES = {"sha2_256": "sha256", "sha2_384": "sha384", "sha2_512": "sha512"}
_PRF_FOR_INTEG = {"sha256": "prfsha256", "sha384": "prfsha384", "sha512": "prfsha512"}


@dataclass(frozen=True)
class Algorithms:
    """One proposal: candidate algorithms per transform type, in preference order."""

    protocol: int
    encr: tuple[EncrAlg, ...]
    integ: tuple[IntegAlg, ...] = ()
    prf: tuple[Prf, ...] = ()
    dh: tuple[Group, ...] = ()
    esn: tuple[bool, ...] = (False,)
    text: str = ""

    def without_dh(self) -> Algorithms:
        """The proposal as sent in IKE_AUTH: the first child SA has no key exchange of its own (§1.2)."""
        return Algorithms(self.protocol, self.encr, self.integ, self.prf, (), self.esn, self.text)

    def to_payload(self, num: int, spi: bytes) -> m.Proposal:
        ts: list[m.Transform] = []
        for e in () if self.protocol == Protocol.AH else self.encr:  # RFC 7296 §3.3.3: AH has no ENCR
            keylen = None if e.kind == "chacha" else e.key_len * 8
            ts.append(m.Transform(TransformType.ENCR, e.iana_id, keylen))
        ts += [m.Transform(TransformType.PRF, p.iana_id) for p in self.prf]
        ts += [m.Transform(TransformType.INTEG, i.iana_id) for i in self.integ]
        ts += [m.Transform(TransformType.DH, g.number) for g in self.dh]
        if self.protocol != Protocol.IKE:
            ts += [m.Transform(TransformType.ESN, int(x)) for x in self.esn]
        return m.Proposal(num, self.protocol, spi, ts)


@dataclass(frozen=True)
class Chosen:
    """The negotiated suite: one algorithm per type."""

    protocol: int
    encr: EncrAlg
    integ: IntegAlg | None
    prf: Prf | None
    dh: Group | None
    esn: bool
    number: int
    spi: bytes

    @property
    def esp_suite(self) -> EspSuite:
        return EspSuite(self.encr, None if self.encr.aead else self.integ)

    @property
    def ah_suite(self) -> AhSuite:
        """AH (``encr`` is the unused ENCR_NULL placeholder): the integrity algorithm alone."""
        assert self.protocol == Protocol.AH and self.integ is not None
        return AhSuite(self.integ)

    @property
    def child_suite(self) -> EspSuite | AhSuite:
        """The child SA's transform: what ``SecurityAssociation`` and KEYMAT (§2.17) need."""
        return self.ah_suite if self.protocol == Protocol.AH else self.esp_suite

    def describe(self) -> str:
        parts = [] if self.protocol == Protocol.AH else [self.encr.keyword]
        if self.integ and (self.protocol == Protocol.AH or not self.encr.aead):
            parts.append(self.integ.keyword)
        if self.prf:
            parts.append(self.prf.keyword)
        if self.dh:
            parts.append(self.dh.keyword)
        if self.protocol != Protocol.IKE and self.esn:
            parts.append("esn")
        return "-".join(parts)

    def to_payload(self) -> m.Proposal:
        ah = self.protocol == Protocol.AH
        alg = Algorithms(self.protocol, () if ah else (self.encr,),
                         (self.integ,) if self.integ and (ah or not self.encr.aead) else (),
                         (self.prf,) if self.prf else (), (self.dh,) if self.dh else (), (self.esn,))  # fmt: skip
        return alg.to_payload(self.number, self.spi)


def parse(text: str, protocol: int, field: str = "proposals") -> Algorithms:
    """Parse one proposal string for ``protocol`` (IKE or ESP/AH)."""
    encr: list[EncrAlg] = []
    integ: list[IntegAlg] = []
    prf: list[Prf] = []
    dh: list[Group] = []
    esn: list[bool] = []
    for tok in text.strip().lower().split("-"):
        tok = _ENCR_ALIASES.get(tok, _INTEG_ALIASES.get(tok, tok))
        if tok in ENCR and tok != "null":
            encr.append(ENCR[tok])
        elif tok in INTEG:
            integ.append(INTEG[tok])
        elif tok in PRF_KEYWORDS:
            prf.append(PRF_KEYWORDS[tok])
        elif tok in KEYWORDS:
            dh.append(KEYWORDS[tok])
        elif tok in ("esn", "noesn") and protocol != Protocol.IKE:
            esn.append(tok == "esn")
        elif tok == "none" and protocol != Protocol.IKE:
            continue
        else:
            if protocol == Protocol.AH:
                known = sorted({*INTEG, *KEYWORDS, "esn", "noesn"})
            else:
                known = sorted({*ENCR, *INTEG, *PRF_KEYWORDS, *KEYWORDS} - {"null"})
            raise ConfigError(field, text, f"unknown algorithm {tok!r}; known: {', '.join(known)}")
    if protocol == Protocol.AH:
        if encr:
            raise ConfigError(field, text, f"AH authenticates only (RFC 4302): remove {encr[0].keyword}, e.g. "
                              "sha256 or sha256-x25519; for encryption use esp_proposals instead")  # fmt: skip
        if not integ:
            raise ConfigError(field, text, "name an integrity algorithm (sha256, sha384 or sha512), e.g. sha256")
    else:
        if not encr:
            raise ConfigError(field, text, "name an encryption algorithm, e.g. aes128gcm16 or aes256-sha256")
        aead = {e.aead for e in encr}
        if len(aead) > 1:
            raise ConfigError(field, text, "do not mix AEAD and non-AEAD ciphers in one proposal; write two")
        if not encr[0].aead and not integ:
            raise ConfigError(
                field, text, f"{encr[0].keyword} needs an integrity algorithm, e.g. {encr[0].keyword}-sha256"
            )
        if encr[0].aead:
            integ = []
    if protocol == Protocol.IKE:
        if not dh:
            raise ConfigError(field, text, "IKE proposals need a key exchange group, e.g. x25519, ecp256, modp2048")
        if not prf:
            if not integ:
                raise ConfigError(field, text, "AEAD IKE proposals need a PRF, e.g. aes128gcm16-prfsha256-x25519")
            prf = [PRF_KEYWORDS[_PRF_FOR_INTEG[i.keyword]] for i in integ]
    elif prf:
        raise ConfigError(field, text, "ESP/AH proposals take no PRF")
    return Algorithms(protocol, tuple(encr), tuple(integ), tuple(prf), tuple(dh), tuple(esn) or (False,), text)


def _algos(p: m.Proposal, ttype: int) -> list[m.Transform]:
    return [t for t in p.transforms if t.type == ttype]


def _encr_match(e: EncrAlg, t: m.Transform) -> bool:
    if t.id != e.iana_id:
        return False
    return e.kind == "chacha" or t.key_length == e.key_len * 8


def select(ours: list[Algorithms], theirs: list[m.Proposal], protocol: int, ignore_dh: bool = False) -> Chosen | None:
    """Pick a proposal per §2.7 (our preference first); ``None`` means NO_PROPOSAL_CHOSEN.

    ``ignore_dh``: the first child SA, negotiated in IKE_AUTH, has no key exchange of its own; key
    exchange transforms in either side's proposals are disregarded (§1.2).
    """
    for alg in ours:
        if alg.protocol != protocol:
            continue
        if ignore_dh:
            alg = alg.without_dh()
        for p in theirs:
            if p.protocol != protocol:
                continue
            if ignore_dh:
                p = m.Proposal(p.num, p.protocol, p.spi, [t for t in p.transforms if t.type != TransformType.DH])
            got = _match(alg, p)
            if got is not None:
                return got
    return None


def _match(alg: Algorithms, p: m.Proposal) -> Chosen | None:
    known_types = {TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH, TransformType.ESN}
    if any(t.type not in known_types for t in p.transforms):
        return None  # §3.3.6: a proposal with an unknown transform type is unacceptable
    if alg.protocol != p.protocol:
        return None
    if alg.protocol == Protocol.AH and (_algos(p, TransformType.ENCR) or _algos(p, TransformType.PRF)):
        return None  # §3.3.3: AH has integrity, KE and ESN transforms only
    encr = None
    if alg.protocol != Protocol.AH:
        encr = next((e for e in alg.encr for t in _algos(p, TransformType.ENCR) if _encr_match(e, t)), None)
        if encr is None:
            return None
    their_integ = {t.id for t in _algos(p, TransformType.INTEG)} - {0}
    integ = None
    if alg.integ:
        integ = next((i for i in alg.integ if i.iana_id in their_integ), None)
        if integ is None:
            return None
    elif their_integ:
        return None
    prf = None
    if alg.protocol == Protocol.IKE:
        their_prf = {t.id for t in _algos(p, TransformType.PRF)}
        prf = next((x for x in alg.prf if x.iana_id in their_prf), None)
        if prf is None:
            return None
    their_dh = {t.id for t in _algos(p, TransformType.DH)} - {0}
    dh = None
    if alg.dh:
        dh = next((g for g in alg.dh if g.number in their_dh), None)
        if dh is None:
            return None
    elif their_dh:
        return None
    esn = False
    if alg.protocol != Protocol.IKE:
        their_esn = {t.id for t in _algos(p, TransformType.ESN)} or {0}
        pick = next((x for x in alg.esn if int(x) in their_esn), None)
        if pick is None:
            return None
        esn = pick
    if encr is None:
        # AH: the registry's EncrAlg slot is not used; represent "no encryption" by ENCR null
        encr = ENCR["null"]
    return Chosen(alg.protocol, encr, integ, prf, dh, esn, p.num, p.spi)


def check_choice(offered: list[Algorithms], reply: m.Proposal, protocol: int, ignore_dh: bool = False) -> Chosen | None:
    """Initiator side: the responder's single-algorithm proposal must be one we offered (§2.7)."""
    per_type: dict[int, int] = {}
    for t in reply.transforms:
        if t.type in per_type:
            return None  # more than one algorithm of a type in a reply
        per_type[t.type] = t.id
    if not 1 <= reply.num <= len(offered) or reply.protocol != protocol:
        return None
    alg = offered[reply.num - 1]
    if ignore_dh:
        alg = alg.without_dh()
        reply = m.Proposal(
            reply.num, reply.protocol, reply.spi, [t for t in reply.transforms if t.type != TransformType.DH]
        )
    return _match(alg, reply)


def group(number: int) -> Group | None:
    return GROUPS.get(number)


_TYPE_NAMES = {1: "ENCR", 2: "PRF", 3: "INTEG", 4: "KE", 5: "ESN"}


def describe_offer(p: m.Proposal) -> str:
    """A peer's proposal in strongSwan-like words, for logs (unknown algorithms by number)."""
    from ipsecstack.crypto.registry import ENCR, INTEG
    from ipsecstack.ike.groups import GROUPS
    from ipsecstack.ike.keymat import PRFS

    words = []
    for t in p.transforms:
        name = None
        if t.type == TransformType.ENCR:
            name = next((e.keyword for e in ENCR.values() if _encr_match(e, t)), None)
        elif t.type == TransformType.INTEG:
            name = next((i.keyword for i in INTEG.values() if i.iana_id == t.id), None)
        elif t.type == TransformType.PRF:
            name = PRFS[t.id].keyword if t.id in PRFS else None
        elif t.type == TransformType.DH:
            name = GROUPS[t.id].keyword if t.id in GROUPS else None
        elif t.type == TransformType.ESN:
            name = "esn" if t.id else "noesn"
        words.append(name or f"{_TYPE_NAMES.get(t.type, t.type)}#{t.id}")
    return "-".join(words)
