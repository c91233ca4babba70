"""What the child SA exchanges share: choosing a child from an offer, the CREATE_CHILD_SA payloads in both
roles, checking an answer, and the keys and record of a new child SA (RFC 7296 §1.3, §2.9, §2.17).

Functions of a task :class:`~ipsecstack.ike.tasks.base.Context`; no state of their own.
"""

from __future__ import annotations

from typing import Any

from ipsecstack.ike import derive
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.children import ChildSa
from ipsecstack.ike.const import Notify, Protocol
from ipsecstack.ike.groups import Group, KeyExchangeError
from ipsecstack.ike.keymat import child_keymat
from ipsecstack.ike.model import AH_NAT, ChildConfig, _notify_name
from ipsecstack.ike.tasks.base import Context
from ipsecstack.ike.tasks.child_delete import SpiDelete
from ipsecstack.ike.ts import Range, narrow, ranges

OUT_HOLD = 5.0  # §2.8: how long a rekey's responder waits for traffic on the new inbound SA at most
Negotiated = tuple[ChildConfig, props.Chosen, str, list[Range], list[Range]]


def new_child_spi(ctx: Context) -> int:
    """A random SPI for our half of a new child SA (1..255 are reserved, RFC 4303 §2.1)."""
    while True:
        spi = int.from_bytes(ctx.rng(4), "big")
        if spi >= 256:
            return spi


def negotiate(ctx: Context, inner: list[m.AnyPayload], ignore_dh: bool = True,
              remote_override: list[Range] | None = None) -> int | Negotiated:  # fmt: skip
    """Responder: the configured child that takes the peer's SA/TSi/TSr offer (with the narrowed selectors,
    §2.9), or the error notify to answer (the refusal is reported as ChildFailed naming both sides)."""
    sas = [p for p in inner if isinstance(p, m.SA)]
    tsi = next((p for p in inner if isinstance(p, m.TS) and p.initiator), None)
    tsr = next((p for p in inner if isinstance(p, m.TS) and not p.initiator), None)
    if len(sas) != 1 or tsi is None or tsr is None:
        ctx.child_failed("child SA request without SA/TSi/TSr payloads")
        return Notify.NO_PROPOSAL_CHOSEN
    transport = any(isinstance(p, m.Notify) and p.notify_type == Notify.USE_TRANSPORT_MODE for p in inner)
    offered_i, offered_r = ranges(tsi), ranges(tsr)
    any_proposal = False
    ah_refused = ""
    for child in ctx.cfg.children:
        chosen = props.select(child.proposals, sas[0].proposals, child.ike_protocol, ignore_dh=ignore_dh)
        if chosen is None or len(chosen.spi) != 4:
            continue
        if ctx.nat and child.protocol == "ah":
            ctx.count("ah_behind_nat")
            ah_refused = child.name
            continue
        any_proposal = True
        if (child.mode == "transport") != transport:
            continue
        ni = narrow(offered_i, remote_override if remote_override is not None else child.remote_ts)
        nr = narrow(offered_r, child.local_ts)
        if ni and nr:
            return child, chosen, child.mode, ni, nr
    theirs = ", ".join(props.describe_offer(p) for p in sas[0].proposals)
    if any_proposal:
        ts = f"TSi {', '.join(map(str, offered_i))} TSr {', '.join(map(str, offered_r))}"
        ours = "; ".join(f"{c.name}: {c.mode} {', '.join(map(str, c.remote_ts))} === "
                         f"{', '.join(map(str, c.local_ts))}" for c in ctx.cfg.children)  # fmt: skip
        ctx.child_failed(f"child SA refused (TS_UNACCEPTABLE): peer proposed {ts} "
                         f"({'transport' if transport else 'tunnel'} mode); ours {ours}")  # fmt: skip
        return Notify.TS_UNACCEPTABLE
    ours = "; ".join(f"{c.name}: {', '.join(p.text for p in c.proposals)}" for c in ctx.cfg.children)
    if ah_refused:
        ctx.child_failed(f"child SA {ah_refused} refused (NO_PROPOSAL_CHOSEN): {AH_NAT}")
    else:
        ctx.child_failed(f"child SA refused (NO_PROPOSAL_CHOSEN): peer offered {theirs}; ours {ours}")
    return Notify.NO_PROPOSAL_CHOSEN


def request(ctx: Context, child: ChildConfig, local: list[Range], remote: list[Range], mode: str,
            rekey_spi: int | None) -> tuple[list[m.AnyPayload], int, bytes, Any]:  # fmt: skip
    """Initiator side of CREATE_CHILD_SA for a child SA (new, or rekeying ``rekey_spi``): the payloads
    [N(REKEY_SA)], SA, Ni, [KEi when the proposal has a group: PFS], TSi, TSr; plus our SPI, Ni and the
    KE private value."""
    spi_in = new_child_spi(ctx)
    nonce = ctx.rng(32)
    spi = spi_in.to_bytes(4, "big")
    inner: list[m.AnyPayload] = []
    if rekey_spi is not None:
        # §3.10.1: the REKEY_SA notify names the protocol of the SA being rekeyed
        inner.append(m.Notify(Notify.REKEY_SA, b"", child.ike_protocol, rekey_spi.to_bytes(4, "big")))
    inner.append(m.SA([p.to_payload(i + 1, spi) for i, p in enumerate(child.proposals)]))
    inner.append(m.Nonce(nonce))
    group = child.proposals[0].dh[0] if child.proposals[0].dh else None
    dh = None
    if group is not None:
        dh, pub = derive.keypair(ctx, group)
        inner.append(m.KE(group.number, pub))
    inner.append(m.TS([r.to_payload() for r in local], True))
    inner.append(m.TS([r.to_payload() for r in remote], False))
    if mode == "transport":
        inner.append(m.Notify(Notify.USE_TRANSPORT_MODE))
    return inner, spi_in, nonce, dh


def check_answer(child: ChildConfig, inner: list[m.AnyPayload],
                 dh: Any) -> tuple[props.Chosen, bytes, bytes | None] | str:  # fmt: skip
    """Initiator side: check a CREATE_CHILD_SA response; ``(chosen, Nr, g^ir)`` or why it failed."""
    errors = [p for p in inner if isinstance(p, m.Notify) and p.notify_type < 16384]
    sas = [p for p in inner if isinstance(p, m.SA)]
    nonce = next((p for p in inner if isinstance(p, m.Nonce)), None)
    if errors:
        return _notify_name(errors[0].notify_type)
    if len(sas) != 1 or len(sas[0].proposals) != 1 or nonce is None:
        return "malformed response"
    chosen = props.check_choice(child.proposals, sas[0].proposals[0], child.ike_protocol)
    if chosen is None or len(chosen.spi) != 4:
        return "the peer chose a proposal we did not offer"
    shared = None
    if chosen.dh is not None:
        ke = next((p for p in inner if isinstance(p, m.KE)), None)
        try:
            if ke is None or dh is None:
                raise KeyExchangeError("no KE payload for PFS")
            shared = chosen.dh.shared(dh, ke.data)
        except KeyExchangeError as e:
            return str(e)
    return chosen, nonce.data, shared


def answer_ke(ctx: Context, group: Group, ke: m.KE | None) -> tuple[bytes, bytes] | list[m.AnyPayload]:
    """Responder's key exchange in CREATE_CHILD_SA (§1.3, §1.2): (our KE data, the shared secret), or the
    response to send instead: INVALID_KE_PAYLOAD (the group we want) or INVALID_SYNTAX (a bad public value)."""
    if ke is None or ke.group != group.number:
        return [m.Notify(Notify.INVALID_KE_PAYLOAD, group.number.to_bytes(2, "big"))]
    priv, pub = derive.keypair(ctx, group)
    try:
        return pub, group.shared(priv, ke.data)
    except KeyExchangeError:
        return [m.Notify(Notify.INVALID_SYNTAX)]


def reply(ctx: Context, inner: list[m.AnyPayload], chosen: props.Chosen, mode: str, tsi: list[Range],
          tsr: list[Range]) -> tuple[list[m.AnyPayload], tuple[int, bytes, bytes | None] | None]:  # fmt: skip
    """Responder: the CREATE_CHILD_SA response for a child SA (new or rekeyed): SA, Nr, [KEr] (PFS when the
    chosen proposal has a group), TSi, TSr; and ``(our SPI, Nr, g^ir)``, or None when it is an error notify."""
    ke = next((p for p in inner if isinstance(p, m.KE)), None)
    spi_in = new_child_spi(ctx)
    nr = ctx.rng(32)
    chosen_reply = props.Chosen(chosen.protocol, chosen.encr, chosen.integ, None, chosen.dh, chosen.esn,
                                chosen.number, spi_in.to_bytes(4, "big"))  # fmt: skip
    out: list[m.AnyPayload] = [m.SA([chosen_reply.to_payload()]), m.Nonce(nr)]
    shared = None
    if chosen.dh is not None:
        answer = answer_ke(ctx, chosen.dh, ke)
        if isinstance(answer, list):
            return answer, None
        pub, shared = answer
        out.append(m.KE(chosen.dh.number, pub))
    out += [m.TS([r.to_payload() for r in tsi], True), m.TS([r.to_payload() for r in tsr], False)]
    if mode == "transport":
        out.append(m.Notify(Notify.USE_TRANSPORT_MODE))
    return out, (spi_in, nr, shared)


def child_up(ctx: Context, child: ChildConfig, chosen: props.Chosen, mode: str, local: list[Range],
             remote: list[Range], *, spi_in: int, spi_out: int, nonces: tuple[bytes, bytes] | None = None,
             shared: bytes | None = None, we_initiated: bool | None = None, replaces: int | None = None,
             now: float = 0.0) -> ChildSa:  # fmt: skip
    """The keys (§2.17) and record of a new child SA, added to the IKE SA's children and reported."""
    assert ctx.chosen is not None and ctx.chosen.prf is not None and ctx.keys is not None
    suite = chosen.child_suite
    ni, nr = nonces or (ctx.ni, ctx.nr)
    # §2.17: ESP takes encryption then integrity keys per direction; AH integrity keys only
    km_len = suite.key_len if chosen.protocol == Protocol.AH else chosen.esp_suite
    i2r, r2i = child_keymat(ctx.chosen.prf, ctx.keys.sk_d, ni, nr, km_len, shared)
    initiator = ctx.initiator if we_initiated is None else we_initiated
    key_in, key_out = (r2i, i2r) if initiator else (i2r, r2i)
    encap = (ctx.local_port, ctx.remote_port) if ctx.nat else None
    rekey_at = None
    if initiator and child.rekey_time:
        # §2.8: rekey before expiry, a little early by a random amount, so both ends rarely collide
        jitter = int.from_bytes(ctx.rng(2), "big") / 65535 * ctx.cfg.rekey_jitter * child.rekey_time
        rekey_at = now + child.rekey_time - jitter
    # §2.8: as the responder of a rekey, hold the new outbound SA back until the initiator surely has the pair
    held = now + OUT_HOLD if replaces is not None and not initiator else None
    rec = ChildSa(child, mode, suite.keyword, chosen.esn, spi_in, spi_out, key_in, key_out, local, remote, encap,
                  replaces, rekey_at, "ah" if chosen.protocol == Protocol.AH else "esp", initiator,
                  out_held_until=held)  # fmt: skip
    ctx.child_up(rec)
    return rec


def answered_ts(
    ctx: Context, child: ChildConfig, spi_in: int, offered: tuple[list[Range], list[Range]], tsi: m.TS, tsr: m.TS
) -> tuple[list[Range], list[Range]] | None:
    """Initiator: the responder's TSi/TSr, which RFC 7296 §2.9 has it narrow from what we ``offered``; kept
    to that offer (a selector beyond it is cut back to the part we proposed). None when nothing we proposed
    is left: the child SA fails, and the peer is asked to delete its half (it installed it)."""
    got_i, got_r = ranges(tsi), ranges(tsr)
    local, remote = narrow(got_i, offered[0]), narrow(got_r, offered[1])
    if local and remote:
        if (local, remote) != (got_i, got_r):
            ctx.count("ts_beyond_offer")
        return local, remote
    ctx.child_failed(
        f"child SA {child.name}: the peer's traffic selectors TSi {', '.join(map(str, got_i))} "
        f"TSr {', '.join(map(str, got_r))} are outside what we proposed",
        "ts_unacceptable",
    )
    protocol = Protocol.AH if child.protocol == "ah" else Protocol.ESP
    ctx.tasks.queue(SpiDelete(ctx, m.Delete(protocol, [spi_in.to_bytes(4, "big")])))
    return None


def selectors(inner: list[m.AnyPayload]) -> tuple[m.TS | None, m.TS | None]:
    """The TSi and TSr payloads of a message, if it has them."""
    tsi = next((p for p in inner if isinstance(p, m.TS) and p.initiator), None)
    tsr = next((p for p in inner if isinstance(p, m.TS) and not p.initiator), None)
    return tsi, tsr
