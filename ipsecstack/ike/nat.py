"""NAT detection and UDP encapsulation (RFC 7296 §2.23, RFC 3948).

Both ends send NAT_DETECTION_SOURCE_IP and NAT_DETECTION_DESTINATION_IP in IKE_SA_INIT: SHA-1 of the
SPIs and the address and port as the sender sees them (``model.nat_hash``). A destination hash that
differs means our own address was translated (we are behind a NAT and keep its mapping open with
NAT-keepalives, RFC 3948 §2.3); a source hash that differs means the peer's was. Either way ESP goes
in UDP, and the initiator moves to port 4500 for everything after IKE_SA_INIT. ``encap = yes`` fakes
the source hash (§2.23 allows it) to force encapsulation. Functions of a task Context.
"""

from __future__ import annotations

from ipsecstack.ike import message as m
from ipsecstack.ike.const import Notify
from ipsecstack.ike.model import NAT_T_PORT, nat_hash
from ipsecstack.ike.tasks.base import Context


def detect(ctx: Context, msg: m.Message) -> None:
    """Compare the peer's NAT_DETECTION hashes in IKE_SA_INIT (either direction) with what we see."""
    src = msg.notify(Notify.NAT_DETECTION_SOURCE_IP)
    dst = msg.notify(Notify.NAT_DETECTION_DESTINATION_IP)
    if src is None or dst is None:
        return
    # the peer's view: its source is (remote, remote_port); our address is its destination
    spi_r = msg.spi_r if msg.is_response else bytes(8)
    want_src = nat_hash(msg.spi_i, spi_r, ctx.remote, ctx.remote_port)
    want_dst = nat_hash(msg.spi_i, spi_r, ctx.cfg.local_addr, ctx.local_port)
    # §2.23: a different destination hash means *our* address was translated: we are behind the NAT
    # and keep its mapping open with NAT-keepalives (RFC 3948 §2.3)
    if dst.data != want_dst:
        ctx.behind_nat = True
    if src.data != want_src:
        ctx.peer_behind_nat = True
    if src.data != want_src or dst.data != want_dst or ctx.nat:
        ctx.nat = True
        if ctx.initiator:
            ctx.local_port = NAT_T_PORT
            ctx.remote_port = NAT_T_PORT


def notifies(ctx: Context) -> list[m.AnyPayload]:
    """Our NAT_DETECTION_SOURCE_IP and NAT_DETECTION_DESTINATION_IP notifies for IKE_SA_INIT."""
    if ctx.cfg.encap:
        # RFC 7296 §2.23 allows faking the source hash to force UDP encapsulation
        ctx.nat = ctx.nat_fake = True
        src_hash = ctx.rng(20)
    else:
        src_hash = nat_hash(ctx.spi_i, ctx.spi_r, ctx.cfg.local_addr, ctx.local_port)
    dst_hash = nat_hash(ctx.spi_i, ctx.spi_r, ctx.remote, ctx.remote_port)
    return [
        m.Notify(Notify.NAT_DETECTION_SOURCE_IP, src_hash),
        m.Notify(Notify.NAT_DETECTION_DESTINATION_IP, dst_hash),
    ]


def report(ctx: Context) -> dict[str, bool]:
    """What NAT detection found (§2.23), and encapsulation forced by config, reported separately (for
    ``list-sas`` and the logs)."""
    return {"nat_local": ctx.behind_nat, "nat_remote": ctx.peer_behind_nat, "encap_forced": ctx.nat_fake,
            "encap": ctx.nat}  # fmt: skip
