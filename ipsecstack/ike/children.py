"""A child SA as its IKE SA keeps it (RFC 7296 §1.3, §2.17): a record of its own, not an event.

:class:`ChildSa` holds what was negotiated for one pair of ESP or AH SAs: the configuration it came from,
the SPIs and keys of both directions, the traffic selectors, the encapsulation ports, and when its
initiator rekeys it. The IKE SA lists its records (``IkeSa.children``); ``ChildUp`` (:mod:`events`)
announces one to the runtime, with the IKE SA it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ipsecstack.ike.model import ChildConfig
from ipsecstack.ike.ts import Range


@dataclass
class ChildSa:
    child: ChildConfig
    mode: str
    transform: str
    esn: bool
    spi_in: int
    spi_out: int
    key_in: bytes = field(repr=False)
    key_out: bytes = field(repr=False)
    local_ts: list[Range]
    remote_ts: list[Range]
    encap: tuple[int, int] | None
    replaces: int | None = None  # inbound SPI of the child SA this one rekeys (make-before-break)
    rekey_at: float | None = None
    protocol: Literal["esp", "ah"] = "esp"  # the child's IPsec protocol (ah_proposals: AH, RFC 4302)
    initiated: bool = True  # we initiated the exchange that created it (for a rekey: §2.8's "initiator")
    reqid: int = 0  # what binds its SAs to their policies (IkeManager assigns it when the child comes up)
    # RFC 7296 §2.8: the responder of a rekey sends on the new outbound SA only once the initiator is surely
    # ready: until then (at most this long) the old one carries on; OutboundReady says when
    out_held_until: float | None = None

    @property
    def hold_out(self) -> bool:
        """Its outbound SA waits (§2.8): install only the inbound one until OutboundReady."""
        return self.out_held_until is not None


def by_spi(children: list[ChildSa], spi: int) -> ChildSa | None:
    """The child SA with this SPI, inbound or outbound (the datapath names SAs by either)."""
    return next((c for c in children if spi in (c.spi_in, c.spi_out)), None)
