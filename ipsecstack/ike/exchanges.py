"""The exchange engine of one IKE SA: its tasks, its Message-ID window, and the messages in and out.

Theory of operation
-------------------
:class:`Exchanges` holds the active task (the one whose request is outstanding, RFC 7296 §2.3:
window 1) and the tasks queued behind it, and moves messages between the wire and the tasks:

- an initiator task is run (``perform``, or from the queue once the window is free, on an
  established IKE SA): its ``build`` is sealed in an SK payload (§3.14; IKE_SA_INIT goes in the
  clear) with the next Message ID and kept for retransmission (:mod:`window`); the response with
  that ID is opened and given to the task's ``process`` (NEED_MORE: ``build`` again);
- a peer's request in order (Message ID as expected) is opened and handed to the responder task
  :mod:`tasks.dispatch` picks, which processes it and builds the response; the response is cached
  so that a retransmission of the request gets the same bytes (§2.1) without being processed again.

Nothing is answered before it authenticates (an SK payload that does not open is dropped and
counted), except the unprotected IKE_SA_INIT notifies §2.21.1 allows. §2.23: once a request
authenticates, the IKE SA follows the peer's address and port (a NAT mapping changed). The SA it
serves (:class:`Host`) supplies the keys and SPIs and hears what happened.
"""

from __future__ import annotations

from typing import Protocol

from ipsecstack.ike import message as m
from ipsecstack.ike import sk
from ipsecstack.ike.const import Exchange, Flag, Notify
from ipsecstack.ike.model import Datagram, PeerConfig
from ipsecstack.ike.state import Step
from ipsecstack.ike.tasks import dispatch
from ipsecstack.ike.tasks.base import Context, Result, Task
from ipsecstack.ike.tasks.child_delete import Dpd
from ipsecstack.ike.tasks.ike_delete import IkeDelete, deleted
from ipsecstack.ike.tasks.ike_init import IkeInit
from ipsecstack.ike.window import Window


class Host(Context, Protocol):
    """The IKE SA as its exchange engine needs it: the task Context, its SK keys, and two reports."""

    tx: sk.SkKeys | None
    rx: sk.SkKeys | None

    def heard(self, now: float) -> None: ...
    def wake(self) -> None: ...
    def report_peer_moved(self, addr: str, port: int) -> None: ...


class Exchanges:
    def __init__(self, sa: Host, cfg: PeerConfig) -> None:
        self.sa = sa
        self.window = Window(cfg)
        self.out: list[Datagram] = []
        self._active: Task | None = None
        self._queue: list[Task] = []

    @property
    def active(self) -> Task | None:
        """The task whose request is outstanding."""
        return self._active

    @property
    def idle(self) -> bool:
        """No request of ours outstanding or queued (the window is free)."""
        return self.window.outstanding is None and not self._queue

    def busy_with(self, subject: object) -> bool:
        """A task for ``subject`` (a ChildConfig, a ChildSa) runs or waits."""
        return any(t.about(subject) for t in ([self._active] if self._active else []) + self._queue)

    def answer_again(self, exchange: int, inner: list[m.AnyPayload]) -> bool:
        """Replace the response to the peer's latest request, not yet collected, by another one (and forget the
        queued requests): the uniqueness policy's late refusal of an IKE_AUTH. False if there is none."""
        cached = self.window.cached
        if cached is None:
            return False
        mid, data = cached
        self.out = [d for d in self.out if d.data != data]
        self._queue.clear()
        self.respond(m.Message(self.sa.spi_i, self.sa.spi_r, exchange, 0, mid), inner)
        return True

    def perform(self, task: Task, now: float) -> None:
        """Run ``task`` now if the window is free, else after the queued ones."""
        if self.window.outstanding is None:
            self.run(task, now)
        else:
            self._queue.append(task)

    def queue(self, task: Task) -> None:
        self._queue.append(task)

    def next_queued(self, now: float) -> None:
        """Run queued tasks while the window is free (an established IKE SA only, for the tasks that need one)."""
        sa = self.sa
        while self._queue and self.window.outstanding is None and sa.state == "established":
            self.run(self._queue.pop(0), now)

    def run(self, task: Task, now: float) -> None:
        sa = self.sa
        inner = task.build(now)
        if inner is None:
            return  # nothing to send after all (the task said why)
        self._active = task
        if task.exchange == Exchange.IKE_SA_INIT:
            msg = m.Message(sa.spi_i, bytes(8), Exchange.IKE_SA_INIT, Flag.INITIATOR, 0, inner)
            sa.init_request = msg.encode()
            sa.step(Step.SEND_INIT)
            self.window.next_mid = 1
            self._request(0, sa.init_request, now)
        else:
            self._send(task.exchange, inner, now)

    def send_request(self, exchange: int, inner: list[m.AnyPayload], now: float) -> None:
        """Send a request that no task waits for (its response is only acknowledged): AUTHENTICATION_FAILED
        after IKE_AUTH (§2.21.2), the DELETE of ``close_now``. Also the tests' hook for a hand-made request."""
        self._active = None
        self._send(exchange, inner, now)

    def _send(self, exchange: int, inner: list[m.AnyPayload], now: float) -> None:
        sa = self.sa
        assert sa.tx is not None
        flags = Flag.INITIATOR if sa.initiator else 0
        msg = m.Message(sa.spi_i, sa.spi_r, exchange, flags, self.window.next_mid)
        data = sk.seal(msg, inner, sa.tx, sa.rng)
        self._request(self.window.take(), data, now)

    def _request(self, mid: int, data: bytes, now: float) -> None:
        self.window.sent(mid, data, now)
        self.emit(data)

    def respond(self, req: m.Message, inner: list[m.AnyPayload]) -> None:
        sa = self.sa
        assert sa.tx is not None
        flags = Flag.RESPONSE | (Flag.INITIATOR if sa.initiator else 0)
        msg = m.Message(sa.spi_i, sa.spi_r, req.exchange, flags, req.message_id)
        data = sk.seal(msg, inner, sa.tx, sa.rng)
        self.window.cached = (req.message_id, data)
        self.emit(data)

    def reply_plain(self, req: m.Message, payloads: list[m.AnyPayload]) -> None:
        """Unprotected IKE_SA_INIT error response (§2.21.1); no state is kept."""
        resp = m.Message(req.spi_i, bytes(8), req.exchange, Flag.RESPONSE, req.message_id, payloads)
        self.emit(resp.encode())

    def _open(self, msg: m.Message) -> list[m.AnyPayload] | None:
        sa = self.sa
        assert sa.rx is not None
        try:
            return sk.open_(msg.raw, msg, sa.rx)
        except sk.SkError:
            sa.count("dropped_sk_invalid")
            return None

    def emit(self, data: bytes, port: int | None = None) -> None:
        sa = self.sa
        # Only the initiator moves to port 4500 (§2.23); the responder answers wherever requests come from.
        self.out.append(Datagram(data, sa.remote, sa.remote_port, port if port is not None else sa.local_port))
        self.sa.wake()

    # --- receiving ----------------------------------------------------------------------------

    def respond_init(self, msg: m.Message, now: float) -> bool:
        """Responder: answer an IKE_SA_INIT request (in the clear, and cached for its retransmissions); False if
        it was refused (with an unprotected notify, §2.21.1, or none) and no state should be kept."""
        sa, task = self.sa, IkeInit(self.sa, initiator=False)
        if task.process(msg, msg.payloads, now) is not Result.DONE:
            if task.reply:
                self.reply_plain(msg, task.reply)
            return False
        resp = m.Message(sa.spi_i, sa.spi_r, Exchange.IKE_SA_INIT, Flag.RESPONSE, 0, task.build(now) or [])
        sa.init_response = resp.encode()
        self.window.peer_mid = 1
        self.window.cached = (0, sa.init_response)
        self.emit(sa.init_response, port=sa.local_port)
        sa.step(Step.ANSWER_INIT)
        return True

    def receive(self, data: bytes, src: str, src_port: int, dst_port: int, now: float) -> None:
        """A datagram for this SA (non-ESP marker already removed)."""
        sa = self.sa
        try:
            msg = m.decode(data)
        except m.ParseError as e:
            sa.count(f"dropped_parse_{e.reason}")
            return
        msg.raw = data
        if msg.is_response:
            self._on_response(msg, now)
        else:
            self._on_request(msg, src, src_port, dst_port, now)

    def _on_response(self, msg: m.Message, now: float) -> None:
        sa = self.sa
        out = self.window.outstanding
        if out is None or msg.message_id != out.mid:
            sa.count("dropped_unexpected_response")
            return
        if msg.exchange == Exchange.IKE_SA_INIT:
            if sa.state != "init_sent" or not isinstance(self._active, IkeInit):
                sa.count("dropped_unexpected_response")
                return
            out, self.window.outstanding = self.window.outstanding, None
            init, self._active = self._active, None
            res = init.process(msg, msg.payloads, now)
            if res is Result.NEED_MORE and sa.state == "init_sent":
                self.run(init, now)  # again, with the COOKIE or the KE group the responder asked for
            elif res is Result.FAILED and sa.state == "init_sent":
                # §2.21.1: an unprotected answer that cannot be used may be forged; it was counted, and the
                # request stays outstanding (retransmitted, then given up) for the real one
                self.window.outstanding, self._active = out, init
            return
        if sa.rx is None:
            sa.count("dropped_unexpected_response")  # an encrypted exchange before we have keys
            return
        inner = self._open(msg)
        if inner is None:
            return
        task = self._active
        deleting = isinstance(task, IkeDelete) or (msg.exchange == Exchange.INFORMATIONAL and sa.state == "deleting")
        if task is not None and msg.exchange != task.exchange and not deleting:
            # §1.2, §2.21: a response answers the request of its Message ID, of the same exchange type; one
            # that does not is dropped, and the request stays outstanding (retransmitted, then given up)
            sa.count("dropped_wrong_exchange")
            return
        self.window.outstanding = None
        sa.heard(now)
        self._active = None
        if isinstance(task, IkeDelete):
            self._process_response(task, msg, inner, now)
        elif deleting:  # an INFORMATIONAL answer while our DELETE of the SA is on its way
            deleted(sa)
        elif task is not None and self._process_response(task, msg, inner, now) is Result.NEED_MORE:
            self.run(task, now)  # another round of the same exchange
        self.next_queued(now)

    def _process_response(self, task: Task, msg: m.Message, inner: list[m.AnyPayload], now: float) -> Result:
        try:
            return task.process(msg, inner, now)
        except Exception:  # a bug in one exchange fails that exchange, never the SA nor its caller
            self.sa.count("exchange_errors")
            return Result.FAILED

    def _on_request(self, msg: m.Message, src: str, src_port: int, dst_port: int, now: float) -> None:
        sa = self.sa
        cached = self.window.cached
        if msg.exchange == Exchange.IKE_SA_INIT:
            if cached and cached[0] == 0 and msg.raw == sa.init_request:
                self.emit(cached[1])
            else:
                sa.count("dropped_unexpected_request")
            return
        if sa.rx is None:
            sa.count("dropped_unexpected_request")
            return
        if cached is not None and msg.message_id == cached[0]:
            if self._open(msg) is not None:  # only an authentic retransmission gets the cached answer
                sa.count("retransmitted_requests")
                self.emit(cached[1])
            return
        if msg.message_id != self.window.peer_mid:
            sa.count("dropped_bad_message_id")
            return
        inner = self._open(msg)
        if inner is None:
            return
        # §2.23: follow the peer's address/port once a message authenticates (NAT mapping changed)
        if (src_port != sa.remote_port or src != sa.remote) and sa.state == "established" and sa.nat:
            sa.remote, sa.remote_port = src, src_port
            sa.count("peer_moved")
            sa.report_peer_moved(src, src_port)
        elif src_port != sa.remote_port or src != sa.remote:
            sa.remote, sa.remote_port = src, src_port
        sa.local_port = dst_port
        self.window.peer_mid += 1
        sa.heard(now)
        try:
            task = dispatch.responder(sa, msg, inner)
            if isinstance(task, list):
                self.respond(msg, task)
                return
            task.process(msg, inner, now)
            reply = task.build(now) or []
        except Exception:  # a bug in one exchange fails that exchange, never the SA nor its caller
            sa.count("exchange_errors")
            self.respond(msg, [m.Notify(Notify.INVALID_SYNTAX)])  # §2.21, §3.10.1: the request fails, IDs stay in step
            return
        self.respond(msg, reply)
        try:
            task.sent(now)
        except Exception:  # the response is out: the exchange's outcome is lost, the SA goes on
            sa.count("exchange_errors")

    def retransmit(self, now: float) -> None:
        """Send the outstanding request again if its time has come, or give up after the last try (§2.4: on an
        established IKE SA the peer is dead, and the DPD action applies)."""
        sa, out = self.sa, self.window.outstanding
        if out is None or now < out.due:
            return
        if self.window.exhausted:
            dpd = isinstance(self._active, Dpd)
            cause = "dead" if sa.state == "established" else None
            sa.close(("dead peer: no answer to liveness checks" if dpd else "peer did not answer")
                     + f" after {out.tries + 1} transmissions", cause)  # fmt: skip
            return
        data = self.window.retransmit(now)
        if data is not None:
            sa.count("retransmissions")
            self.emit(data)
