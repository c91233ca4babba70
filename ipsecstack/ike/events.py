"""What an IKE SA reports to its caller (``IkeSa.events()``, ``IkeManager.events()``).

The events name the IKE SA they are about; they are generic in its type (``S``) so that this module
needs nothing from the module that defines it: :mod:`ipsecstack.ike.session` re-exports them with
``Event = events.Event[IkeSa]``, and annotations name the SA type (``ChildUp[IkeSa]``). No state, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Generic, Self, TypeVar

from ipsecstack.ike.children import ChildSa
from ipsecstack.ike.model import ChildConfig

S = TypeVar("S")


@dataclass
class IkeUp(Generic[S]):
    sa: S


@dataclass
class PeerMoved(Generic[S]):
    """The peer's NAT mapping changed: its IKE (and ESP-in-UDP) now come from ``addr``:``port``."""

    sa: S
    addr: str
    port: int


@dataclass
class IkeRekeyed(Generic[S]):
    """``new`` took over from ``old`` (its children, §2.18); reported once per rekey, for the IKE SA that survives.
    ``collision``: both ends rekeyed ``old`` at once (RFC 7296 §2.8.2); ``redundant`` is then the other new IKE SA
    when one was made (it carries nothing and closes with cause ``"rekeyed"``)."""

    old: S
    new: S
    collision: bool = False
    redundant: S | None = None


@dataclass
class ReauthDue(Generic[S]):
    """``reauth_time`` has come for this IKE SA: the manager starts a new IKE SA with the same peer and
    children (fresh IKE_SA_INIT and IKE_AUTH, RFC 7296 §2.8.3) and retires this one once it is up."""

    sa: S


@dataclass
class IkeReauthed(Generic[S]):
    """Reauthentication done (make-before-break): ``new`` and its child SAs are up, ``old`` is being deleted."""

    old: S
    new: S


@dataclass
class ChildFailed(Generic[S]):
    """A child SA could not be negotiated (either role) or rekeyed; ``reason`` names both sides' offers."""

    sa: S
    reason: str


@dataclass
class ReauthFailed(Generic[S]):
    """The new IKE SA of a reauthentication failed; ``sa`` stays and tries again at ``retry_at`` (None: no more
    tries; it stays until it expires or is deleted)."""

    sa: S
    reason: str
    retry_at: float | None


@dataclass
class IkeDown(Generic[S]):
    """The IKE SA is gone. ``cause`` says who ended it, for the runtime's close/DPD actions: ``"peer"`` (it
    sent a DELETE, §1.4.1), ``"dead"`` (no answer while established: DPD or any other request, §2.4),
    ``"failed"`` (never established), ``"expired"`` (not rekeyed within its hard lifetime, over_time),
    ``"rekeyed"`` (replaced by its successor, §2.18, or a new IKE SA made redundant by a simultaneous rekey,
    §2.8.2), ``"reauth"`` (replaced by a newer IKE SA with the same peer: our reauthentication, or the peer
    deleted it while its newer one stays; the manager decides) or ``"local"`` (we deleted it)."""

    sa: S
    reason: str
    cause: str = "local"


@dataclass
class ChildUp(ChildSa, Generic[S]):
    """A child SA is up: its record (a copy: the IKE SA keeps its own in ``children``) and its IKE SA."""

    sa: S = field(kw_only=True)

    @classmethod
    def of(cls, sa: S, rec: ChildSa) -> Self:
        values: dict[str, Any] = {f.name: getattr(rec, f.name) for f in fields(ChildSa)}
        return cls(**values, sa=sa)


@dataclass
class OutboundReady(Generic[S]):
    """Send on the outbound SA of child SA ``spi_in`` from now on (RFC 7296 §2.8: it was held back since we
    answered the rekey that made it). ``why``: the peer sends on the new pair, the peer deleted the SA it
    replaces, or no traffic came in time (then the new one is used anyway)."""

    sa: S
    spi_in: int
    why: str


@dataclass
class ChildDown(Generic[S]):
    """A child SA is gone. ``cause``: ``"peer"`` (the peer deleted it and no other SA of its config remains
    in this IKE SA), ``"rekeyed"`` (a newer SA of the same config carries on), ``"ike"`` (its IKE SA went: see
    that IkeDown) or ``"local"`` (we deleted it)."""

    sa: S
    spi_in: int
    spi_out: int
    child: ChildConfig | None = None
    cause: str = "local"


Event = (
    IkeUp[S]
    | IkeRekeyed[S]
    | PeerMoved[S]
    | IkeDown[S]
    | ChildUp[S]
    | ChildDown[S]
    | OutboundReady[S]
    | ChildFailed[S]
    | ReauthDue[S]
    | IkeReauthed[S]
    | ReauthFailed[S]
)
