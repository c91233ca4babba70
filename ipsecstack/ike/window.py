"""The IKE SA's Message IDs, retransmission and cached response (RFC 7296 §2.1, §2.2, §2.3, §2.4).

Theory of operation
-------------------
One outstanding request per direction (window size 1). Our request keeps its Message ID and bytes
until the response with that ID arrives; it is sent again after ``retransmit_timeout`` (t), ``t * base``,
``t * base**2``, ... and after ``tries`` retransmissions the exchange has failed (§2.4: on an
established IKE SA, the peer is dead). The peer's request is in order when its Message ID is the
next expected; the response to the latest one is kept so that a retransmission of that request
gets the same bytes again (§2.1) instead of being processed twice. Times come from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Retry(Protocol):
    """Where the schedule comes from (a connection's PeerConfig; it may change when IKE_AUTH switches it)."""

    @property
    def retransmit_timeout(self) -> float: ...
    @property
    def retransmit_base(self) -> float: ...
    @property
    def retransmit_tries(self) -> int: ...


@dataclass
class Outstanding:
    mid: int
    data: bytes
    tries: int  # retransmissions so far
    due: float  # when to retransmit (or, after the last try, give up)


class Window:
    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self.next_mid = 0  # our next request's Message ID
        self.peer_mid = 0  # the Message ID of the peer's next request
        self.outstanding: Outstanding | None = None
        self.cached: tuple[int, bytes] | None = None  # (Message ID, response) to the peer's latest request

    def sent(self, mid: int, data: bytes, now: float) -> None:
        """Our request ``mid`` is on its way: it is outstanding from now."""
        self.outstanding = Outstanding(mid, data, 0, now + self.retry.retransmit_timeout)

    def take(self) -> int:
        """The Message ID for our next request."""
        mid = self.next_mid
        self.next_mid += 1
        return mid

    def retransmit(self, now: float) -> bytes | None:
        """The request to send again now, if its time has come and tries are left (None otherwise)."""
        out = self.outstanding
        if out is None or now < out.due or self.exhausted:
            return None
        delay = self.retry.retransmit_timeout * self.retry.retransmit_base ** (out.tries + 1)
        out.tries += 1
        out.due = now + delay
        return out.data

    @property
    def exhausted(self) -> bool:
        return self.outstanding is not None and self.outstanding.tries >= self.retry.retransmit_tries

    def span(self) -> float:
        """How long one request may take to arrive: the whole retransmission schedule."""
        r = self.retry
        return r.retransmit_timeout * sum(r.retransmit_base**k for k in range(r.retransmit_tries + 1))
