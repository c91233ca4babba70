"""What an exchange task is, and the part of its IKE SA it may use.

Theory of operation
-------------------
Every IKE exchange (RFC 7296 §1) is one :class:`Task`: ``IkeInit``, ``IkeAuth``, ``ChildCreate``,
``ChildRekey``, ``ChildDelete``, ``IkeRekey``, ``IkeDelete``, ``Dpd`` and the responder's
``Informational``. A task is made for one exchange in one role and forgotten when it ends.

- The initiator **builds** the request (``build`` returns its payloads, or None when there is
  nothing to send after all), the IKE SA seals and sends it and keeps it outstanding (window 1,
  §2.3); the response goes to ``process``, which returns :class:`Result`: ``DONE``, ``FAILED``, or
  ``NEED_MORE``, and the IKE SA then sends ``build`` again in the same task (a COOKIE or
  INVALID_KE_PAYLOAD retry of IKE_SA_INIT; EAP's extra IKE_AUTH rounds will use this too).
- The responder **processes** the request, then **builds** the response; ``sent`` runs once the
  response is on its way (what the exchange brings about: the IKE SA established, a child SA up).

A task sees its IKE SA only through :class:`Context`: the shared state of the SA (SPIs, keys,
nonces, NAT, children, timers) and the operations that belong to the SA as a whole (sending
another request, closing, reporting). It never sees the datagrams, the Message IDs or the
retransmission, and it never imports the IKE SA's class; the IKE SA (``session.IkeSa``) imports
the tasks, so imports flow one way.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar, Protocol

from ipsecstack.entropy import Rng
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike import sk
from ipsecstack.ike.children import ChildSa
from ipsecstack.ike.const import Exchange
from ipsecstack.ike.groups import KeyPairSource
from ipsecstack.ike.keymat import IkeKeys
from ipsecstack.ike.model import PeerConfig
from ipsecstack.ike.pools import Lease
from ipsecstack.ike.state import IkeState, Step


class Result(Enum):
    DONE = "done"
    NEED_MORE = "need more"  # the initiator sends build() again in the same task
    FAILED = "failed"


class Task:
    """One exchange in one role (see the module docstring)."""

    exchange: ClassVar[int] = Exchange.INFORMATIONAL
    needs_established: ClassVar[bool] = True  # may run from the queue only on an established IKE SA

    def __init__(self, ctx: Context, *, initiator: bool = True) -> None:
        self.ctx = ctx
        self.initiator = initiator
        self.reply: list[m.AnyPayload] = []  # responder: the response, set by on_request

    def build(self, now: float) -> list[m.AnyPayload] | None:
        """The request (initiator: ``request``) or the response (responder: what ``on_request`` set)."""
        return self.request(now) if self.initiator else self.reply

    def process(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        """The response (initiator: ``on_response``) or the request (responder: ``on_request``), decrypted."""
        return self.on_response(msg, inner, now) if self.initiator else self.on_request(msg, inner, now)

    def request(self, now: float) -> list[m.AnyPayload] | None:
        """Initiator: the request's payloads; None: nothing to send after all."""
        return []

    def on_response(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        return Result.DONE

    def on_request(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        """Responder: decide, and set ``reply``."""
        return Result.DONE

    def sent(self, now: float) -> None:
        """Responder: the response is sealed and on its way."""

    def about(self, subject: object) -> bool:
        """This task is for ``subject`` (a ChildConfig or a ChildSa): it is queued or running already."""
        return False


class TaskQueue(Protocol):
    """The IKE SA's exchange engine (``exchanges.Exchanges``) as tasks use it."""

    @property
    def active(self) -> Task | None: ...

    def perform(self, task: Task, now: float) -> None:
        """Run ``task`` now if the window is free, else after the queued ones."""

    def queue(self, task: Task) -> None: ...
    def next_queued(self, now: float) -> None: ...

    def send_request(self, exchange: int, inner: list[m.AnyPayload], now: float) -> None:
        """A request no task waits for (its response is only acknowledged)."""


class Context(Protocol):
    """The IKE SA as its tasks see it (``session.IkeSa`` is the one implementation)."""

    # what the SA is
    cfg: PeerConfig
    candidates: list[PeerConfig]
    switched_from: str | None
    initiator: bool
    rng: Rng
    wallclock: Callable[[], float] | None
    state: IkeState
    spi_i: bytes
    spi_r: bytes
    chosen: props.Chosen | None
    keys: IkeKeys | None
    tx: sk.SkKeys | None
    rx: sk.SkKeys | None
    keypairs: KeyPairSource | None
    ni: bytes
    nr: bytes
    init_request: bytes
    init_response: bytes
    peer_hashes: frozenset[int] | None
    # the peer and the path
    remote: str
    remote_port: int
    local_port: int
    nat: bool
    behind_nat: bool
    peer_behind_nat: bool
    nat_fake: bool
    peer_id: tuple[int, bytes] | None
    local_identity: tuple[int, bytes]
    peer_cert: Any
    peer_auth: str
    send_initial_contact: bool
    initial_contact: bool
    virtual_ip: str | None
    lease: Lease | None
    failure: str
    # children and timers
    children: list[ChildSa]
    rekeys_done: dict[int, list[tuple[bytes, bytes, ChildSa, bool]]]
    rekey_at: float | None
    reauth_at: float | None
    up_at: float | None
    expire_at: float | None
    created: float
    last_heard: float
    reauth_tries: int
    linger_until: float | None
    delete_cause: str
    # IKE SA rekeying (tasks/ike_rekey.py)
    peer_rekey: Context | None
    standby: bool

    @property
    def tasks(self) -> TaskQueue: ...
    @property
    def established(self) -> bool: ...
    @property
    def successor(self) -> Context | None: ...

    def replaced_by(self, new: Context) -> None: ...

    def count(self, key: str) -> None: ...
    def step(self, step: Step) -> None: ...
    def close(self, reason: str, cause: str | None = None) -> None: ...
    def close_now(self, reason: str, now: float, cause: str = "local") -> None: ...
    def child_failed(self, reason: str, counter: str = "child_failed") -> None: ...
    def child_up(self, rec: ChildSa) -> None: ...
    def child_gone(self, rec: ChildSa, cause: str = "local") -> None: ...
    def set_established(self, now: float) -> None: ...
    def exchange_span(self) -> float: ...
    def delete(self, now: float, cause: str = "local") -> None: ...
    def sibling(self, *, initiator: bool, now: float) -> Context: ...
    def report_rekeyed(self, new: Context, collision: bool, redundant: Context | None) -> None: ...
