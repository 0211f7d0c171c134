"""One THB/1 connection over a Trio stream: the public face, and how a connection ends.

Theory of operation
-------------------
A :class:`Connection` is what the application holds. It owns the sans-IO core
and two sides, the :class:`~trio_heartbeat._reader.Reader` (the reader task,
which is also the watchdog, and the inbound queue) and the
:class:`~trio_heartbeat._writer.Writer` (the send queue and the rule of who
writes), and passes itself to them: they keep no reference to it, so nothing
but the running tasks keeps a connection alive. ``_stream_connection`` runs
them and the caller's block in one nursery whose scope a failure cancels.

A connection ends in one place, :meth:`Connection._end`: it records how, as an
:class:`Outcome` (the first word wins), tells the listeners, wakes everyone who
waits and, for a failure, cancels the scope, so the tasks and the caller's
block unwind at once and the caller gets exactly one typed exception. The
causes are few: the core's :class:`ConnectionEnded`, a protocol error, a
transport failure, a write that made no progress, a shared buffer budget run
out, and the block left early.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Coroutine
from typing import Final, final

import trio
from trio.lowlevel import (
    Abort,
    ParkingLot,
    Task,
    checkpoint_if_cancelled,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

from ._config import Config
from ._errors import BrokenConnection, ConnectionClosed, HeartbeatTimeout, RemoteProtocolError
from ._events import (
    ConnectionEnded,
    Event,
    HandshakeComplete,
    Liveness,
    PeerHealthChanged,
    PongReceived,
)
from ._frames import CloseCode, HealthStatus, Hello, Role
from ._options import ConnectionOptions
from ._outcome import (
    OVER_BUDGET,
    WRITE_TIMEOUT,
    Outcome,
    from_ending,
    left_early,
    protocol_error,
    transport_failed,
)
from ._pings import ANNOUNCE_MARGIN
from ._protocol import HeartbeatProtocol
from ._reader import Reader
from ._state import State
from ._statistics import ConnectionStatistics
from ._writer import BEST_EFFORT_SECONDS, Writer, as_bytes

__all__ = ["Connection", "EventListener", "as_bytes"]

logger = logging.getLogger("trio_heartbeat")


#: The reader task's name, shared by every connection (Trio would build a string per task).
_READER_NAME: Final = "trio_heartbeat.Connection.reader"
#: Stands in for a connection's own ``_opened`` event once its block has begun.
_OPENED: Final = trio.Event()
_OPENED.set()

#: The close codes that, as the server's verdict on our HELLO, refuse us.
_REFUSALS: Final = (CloseCode.POLICY_VIOLATION, CloseCode.TRY_AGAIN_LATER, CloseCode.GOING_AWAY)

#: Called synchronously, from the reader, with every event but DATA.
EventListener = Callable[["Connection", Event], None]

#: What may change the peer's reported health: wait_peer_health looks again.
_HEALTH_NEWS: Final = (PeerHealthChanged, HandshakeComplete, ConnectionEnded)


@final
class Connection:
    """A live THB/1 connection. Get one from :func:`open_connection`,
    :func:`open_stream_connection` or a server's handler; do not construct it.

    Sending and receiving:

    >>> async def chat(conn: Connection) -> None:  # doctest: +SKIP
    ...     await conn.send(b"hello")
    ...     async for message in conn:
    ...         print(message)

    :meth:`send` waits while the send queue is full; :meth:`receive` for the next
    DATA; both raise :class:`ConnectionClosed` (or a subclass) once ended. The rest
    (state, peer, RTT, counters) is read without I/O.
    """

    __slots__ = (
        "__weakref__",
        "_core",
        "_end_waiter",
        "_listeners",
        "_more_end_waiters",
        "_opened",
        "_options",
        "_outcome",
        "_pings",
        "_reader",
        "_scope",
        "_writer",
        "opened_at",
        "remote_address",
        "stream",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: HeartbeatProtocol,
        options: ConnectionOptions,
        listeners: tuple[EventListener, ...],
        remote_address: str | None,
    ) -> None:
        self.stream = stream
        self._core = protocol
        self._options = options
        self._listeners = listeners
        self.remote_address = remote_address
        self.opened_at: float | None = None
        write_timeout = (
            options.write_timeout if options.write_timeout is not None else protocol.config.timeout
        )
        # The two sides keep no reference to their connection (it is passed
        # to them): nothing but the running tasks keeps a connection alive.
        self._writer = Writer(write_timeout)
        self._reader = Reader()
        # The scope around the tasks and the caller's block, cancelled on failure.
        self._scope: trio.CancelScope | None = None
        self._opened = trio.Event()
        # The task waiting for the end (a server's handler), and a lot for any more.
        self._end_waiter: Task | None = None
        self._more_end_waiters: ParkingLot | None = None
        self._outcome: Outcome | None = None
        # ping() calls waiting for their PONG: the event each waits on, and
        # the round trip once it has come.
        self._pings: dict[bytes, tuple[trio.Event, list[float]]] | None = None

    # -- facts ------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The protocol :class:`State`."""
        return self._core.state

    @property
    def role(self) -> Role:
        """Which side of the handshake we are."""
        return self._core.role

    @property
    def config(self) -> Config:
        """This side's THB/1 settings."""
        return self._core.config

    @property
    def peer(self) -> Hello | None:
        """The peer's HELLO, once the handshake is done."""
        return self._core.peer

    @property
    def peer_id(self) -> str | None:
        """The peer's instance id from its HELLO (may be ``""``), or ``None`` before the handshake."""
        peer = self._core.peer
        return None if peer is None else peer.instance_id

    @property
    def peer_health(self) -> HealthStatus | None:
        """The health status the peer last reported (:meth:`wait_peer_health` waits for one)."""
        return self._core.peer_health

    @property
    def health(self) -> HealthStatus:
        """The health status we report."""
        return self._core.health

    @property
    def rtt(self) -> float | None:
        """The last PING round trip, in seconds."""
        return self._core.rtt

    @property
    def srtt(self) -> float | None:
        """The smoothed round trip (exponential average, weight 1/8), in seconds."""
        return self._core.srtt

    @property
    def last_received(self) -> float | None:
        """``trio.current_time()`` when the last frame arrived."""
        return self._core.last_received

    @property
    def watchdog_deadline(self) -> float:
        """When the watchdog gives up if nothing comes: the handshake deadline, the detector's
        verdict (the timeout alone while we hold the reader up), the close timeout; or inf."""
        return self._core.abort_deadline

    @property
    def liveness(self) -> Liveness:
        """ALIVE, or SUSPECT while a heartbeat is overdue (:class:`PeerSuspected`)."""
        return self._reader.liveness

    @property
    def suspicion(self) -> float:
        """How suspicious the peer's silence is now: phi-like, 0 after a frame, rising."""
        return self._core.silence.suspicion(trio.current_time())

    @property
    def closed(self) -> ConnectionClosed | None:
        """How the connection ended, as the exception :meth:`receive` raises, or ``None`` while live."""
        return None if self._outcome is None else self._outcome.exception()

    def statistics(self) -> ConnectionStatistics:
        """Counters and timings of this connection; see :class:`ConnectionStatistics`."""
        return ConnectionStatistics.of(
            self._core,
            opened_at=self.opened_at,
            send_queue_used=self._writer.queued,
            receive_queue_used=self._reader.queued,
        )

    # -- application API ----------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Queue ``data`` as one DATA frame; waits while the send queue is full.

        Always a cancellation point; it yields only when it must wait for room, so
        a burst of sends goes out in one write. Raises :class:`ConnectionClosed`
        once closing or closed, :class:`LocalProtocolError` (1009) for a message
        over the peer's ``max_frame``, :exc:`TypeError` for anything but bytes (a
        ``bytearray`` or ``memoryview`` is copied, as it may change later).
        """
        await self._writer.send(self, data if type(data) is bytes else as_bytes(data))

    def send_nowait(self, data: bytes) -> None:
        """Like :meth:`send`, but raises :class:`trio.WouldBlock` when the queue is full."""
        self._writer.send_nowait(self, data if type(data) is bytes else as_bytes(data))

    async def receive(self) -> bytes:
        """Wait for the next DATA payload. Always a cancellation point; it yields only
        when no DATA waits. Raises :class:`ConnectionClosed` (or the subclass that
        says why) once the connection has ended and every DATA before is delivered."""
        return await self._reader.receive(self)

    def receive_nowait(self) -> bytes:
        """Like :meth:`receive`, but raises :class:`trio.WouldBlock` when no DATA is waiting
        (once ended: the DATA still queued, then :class:`ConnectionClosed`)."""
        return self._reader.receive_nowait(self)

    def take_unsent(self) -> list[bytes]:
        """Once ended: the messages :meth:`send` queued that were never written, oldest
        first, once (to send elsewhere); :class:`RuntimeError` while live."""
        if self._outcome is None:
            raise RuntimeError("take_unsent() is for a connection that has ended")
        return self._writer.take_unsent()

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> bytes:
        # Not an async generator: leaving ``async for`` early leaves nothing to finalize.
        # An orderly close (1000, 1001) ends it quietly; anything else raises.
        try:
            return await self._reader.receive(self)
        except ConnectionClosed as exc:
            if not isinstance(exc, (HeartbeatTimeout, BrokenConnection)) and exc.code in (
                CloseCode.NORMAL,
                CloseCode.GOING_AWAY,
            ):
                raise StopAsyncIteration from None
            raise

    async def ping(self) -> float:
        """Send a PING now (or as soon as the rate rule allows) and return its round trip.

        Calls are spaced 5/8 of the send interval apart (a quarter over the rate
        rule's half: jitter never turns a loop of ``ping()`` calls into strikes).
        The PING is written from the calling task (shielded, within the write
        timeout) unless the writer is at work. :class:`ConnectionClosed` if the
        connection ends first."""
        core = self._core
        await checkpoint_if_cancelled()
        while True:
            # The rate is checked again after every wait, since a concurrent
            # ping() may have gone out first.
            if (
                core.state is not State.OPEN
                or self._writer.close_request is not None
                or self._outcome is not None  # a broken transport leaves the core OPEN
            ):
                raise self._closed_error()
            next_at = core.earliest_ping + core.send_interval * ANNOUNCE_MARGIN
            if trio.current_time() >= next_at:
                break
            await trio.sleep_until(next_at)
        opaque = core.send_ping(trio.current_time())
        pings = self._pings
        if pings is None:
            pings = self._pings = {}
        done, result = pings[opaque] = (trio.Event(), [])
        try:
            await self._writer.write_now(self, shielded=True)
            self._reader.rearm(self)
            await done.wait()
        finally:
            del pings[opaque]
        if not result:
            raise self._closed_error()
        return result[0]

    async def wait_peer_health(self, *statuses: HealthStatus) -> HealthStatus:
        """Sleep until the peer reports one of ``statuses`` (in a HELLO, PING or PONG) and
        return it; :class:`ConnectionClosed` if the connection ends first."""
        if not statuses:
            raise ValueError("wait_peer_health needs at least one status")
        await trio.lowlevel.checkpoint()
        while (status := self._core.peer_health) not in statuses:
            if self._outcome is not None:
                raise self._outcome.exception()
            await self._health_news()
        assert status is not None
        return status

    async def _health_news(self) -> None:
        changed = trio.Event()

        def waker(_conn: Connection, event: Event) -> None:
            if type(event) in _HEALTH_NEWS:
                changed.set()

        self.add_listener(waker)
        try:
            await changed.wait()
        finally:
            self.remove_listener(waker)

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(connection, event)`` for every event but DATA from now on."""
        self._listeners = (*self._listeners, listener)  # a new tuple: never shared

    def remove_listener(self, listener: EventListener) -> None:
        """Stop calling ``listener``; :exc:`ValueError` if it was not added."""
        i = self._listeners.index(listener)
        self._listeners = self._listeners[:i] + self._listeners[i + 1 :]

    def set_health(self, status: HealthStatus) -> None:
        """Report a new health status; the peer learns it within one PING."""
        self._core.set_health(status, trio.current_time())
        self._reader.rearm(self)  # the timer fires when the rate rule lets the PING go

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection: flush queued DATA, send CLOSE, wait for the peer's CLOSE.

        Each step is bounded by the config's ``close_timeout``: queued DATA
        gets that long to go out (a write under way keeps its write timeout),
        then the CLOSE goes ahead of whatever is left, which is dropped; the
        peer's answer gets that long again. Idempotent; a no-op once the
        connection has ended. Safe to call from any task.
        """
        self.close_nowait(code, reason)
        await self._wait_ended()

    def close_nowait(
        self, code: int = CloseCode.NORMAL, reason: str = "", *, flush: bool = True
    ) -> None:
        """Start closing without waiting. With ``flush=True`` queued DATA goes first (for
        ``close_timeout`` at most); with ``flush=False`` the CLOSE jumps the send queue."""
        if self._outcome is None:
            self._writer.request_close(self, code, reason, flush=flush)

    async def wait_closed(self) -> ConnectionClosed:
        """Wait until the connection has ended and return how (without raising it)."""
        await self._wait_ended()
        assert self._outcome is not None
        return self._outcome.exception()

    def _wait_ended(self) -> Coroutine[object, object, object]:
        """Awaitable once ended; not a coroutine (a frame less per waiting handler)."""
        if self._outcome is not None:
            return trio.lowlevel.checkpoint()  # noqa: ASYNC105 - awaited by the caller
        if self._end_waiter is None:
            self._end_waiter = current_task()
            return wait_task_rescheduled(self._end_wait_aborted)  # noqa: ASYNC105 - as above
        if self._more_end_waiters is None:
            self._more_end_waiters = ParkingLot()
        return self._more_end_waiters.park()

    def _end_wait_aborted(self, _raise_cancel: object) -> Abort:
        self._end_waiter = None
        return Abort.SUCCEEDED

    def _closed_error(self) -> ConnectionClosed:
        if self._outcome is not None:
            return self._outcome.exception()
        close_request = self._writer.close_request
        if close_request is not None and self._core.close_code is None:
            code, reason = close_request  # asked for, not applied yet (flushing)
            return ConnectionClosed(code, reason, by_peer=False)
        core = self._core
        code = core.close_code if core.close_code is not None else CloseCode.NORMAL
        return ConnectionClosed(code, core.close_reason, by_peer=core.closed_by_peer)

    # -- what the reader hands over ----------------------------------------------------

    def _dispatch(self, event: Event) -> bool:
        """Act on an event other than DATA; true once the connection has ended."""
        kind = type(event)
        if kind is ConnectionEnded:
            assert isinstance(event, ConnectionEnded)
            self._ended_by(event)  # listeners hear it once it is recorded
            return True
        if kind is HandshakeComplete:
            self.opened_at = trio.current_time()
        if self._listeners:
            self._notify(event)
        if kind is PongReceived:
            assert isinstance(event, PongReceived)
            waiting = self._pings.get(event.opaque) if self._pings else None
            if waiting is not None and event.rtt is not None:
                done, result = waiting
                result.append(event.rtt)
                done.set()
        return False

    def _notify(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(self, event)
            except Exception:
                logger.exception("event listener %r failed on %r", listener, event)

    def _note_open(self) -> None:
        """Open the caller's block once our HELLO is on the wire and, for a client, the
        server's verdict (a frame after its HELLO, THB/1 §3.1) says we are in."""
        if self._opened is _OPENED:
            return  # the common case, once the block has begun: every frame asks
        core = self._core
        if (
            core.state is State.OPEN
            and self._writer.idle
            and not core.control_pending
            and (core.role is Role.SERVER or core.counters.frames_in > 1)
        ):
            self._opened.set()

    # -- the ending -----------------------------------------------------------------------

    def _end(self, outcome: Outcome, ending: ConnectionEnded | None = None) -> None:
        """Record how the connection ended, the one way every ending goes; failures cancel
        everything. The first word wins. Listeners hear a :class:`ConnectionEnded` for
        every ending once recorded (the core's ``ending``, or one made here)."""
        if self._outcome is not None:
            return
        self._outcome = outcome
        if self._listeners:
            if ending is None:
                ending = ConnectionEnded(outcome.code, outcome.reason, outcome.by_peer, False)
            self._notify(ending)
        self._writer.ended()  # everyone waiting on the queues finds out now
        self._reader.ended()
        # No PONG can come: a ping() waiting must raise now (a close does not cancel it).
        for done, _ in (self._pings or {}).values():
            done.set()
        if self._end_waiter is not None:
            reschedule(self._end_waiter)
            self._end_waiter = None
        if self._more_end_waiters:
            self._more_end_waiters.unpark_all()
        if outcome.failure:
            assert self._scope is not None  # failures come from the tasks, once started
            self._scope.cancel()
        elif self.opened_at is not None:
            # An orderly end right after the handshake (a CLOSE with the peer's HELLO):
            # open the block here, the writer may never; the caller finds it closed.
            self._opened.set()

    def _ended_by(self, event: ConnectionEnded) -> None:
        """The core says the connection has ended (a CLOSE, a timeout, end-of-file)."""
        core = self._core
        closed = core.state is State.CLOSED
        # A client is OPEN once its HELLO is out, before the server judged it: a
        # refusal as the server's first frame after its HELLO is that verdict.
        judged = (
            self.role is Role.CLIENT and core.counters.frames_in == 2 and event.code in _REFUSALS
        )
        refused = closed and event.by_peer and (self.opened_at is None or judged)
        outcome = from_ending(event, closed=closed, refused=refused)
        self._end(outcome, event)
        if closed:
            # CLOSED has no deadline: a stale one must not cancel the block after a close.
            self._reader.rearm(self)
            self._writer.wake(self)  # it flushes our answering CLOSE, then closes the stream

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        """The peer broke the protocol; the core has queued our CLOSE with the code."""
        self._end(protocol_error(exc))

    def _transport_failed(self, exc: BaseException, *, by_peer: bool) -> None:
        """The stream failed under us (its error translated at the edge, see ``_transport``)."""
        if self._core.state not in (State.CLOSED, State.ERROR):
            self._end(transport_failed(exc, by_peer=by_peer))

    def _hold(self, nbytes: int) -> None:
        """``nbytes`` more are queued; past a shared budget, the biggest holders are cut off."""
        budget = self._options.budget
        if budget is not None:
            for victim in budget.take(self, nbytes):
                assert isinstance(victim, Connection)
                victim._cut_off()

    def _free(self, nbytes: int) -> None:
        """``nbytes`` left the queues (written, or taken by the application)."""
        budget = self._options.budget
        if budget is not None:
            budget.give(self, nbytes)

    def _cut_off(self) -> None:
        """Over the shared budget: drop what is queued, CLOSE 1013 at once, end."""
        self._writer.take_unsent()
        self._reader.drop()
        budget = self._options.budget
        if budget is not None:
            budget.release(self)
        self._core.close(OVER_BUDGET.code, OVER_BUDGET.reason, now=trio.current_time())
        self._end(OVER_BUDGET)

    def _write_timed_out(self) -> None:
        """A write made no progress for the write timeout: the peer stopped reading."""
        self._end(WRITE_TIMEOUT)

    # -- the lifecycle, run by open_stream_connection (_stream_connection) ----------------

    def _start(self, nursery: trio.Nursery) -> None:
        """Run in ``nursery``, whose cancel scope a failure cancels: the tasks and the block at once."""
        self._scope = nursery.cancel_scope
        self._writer.start(nursery)
        # The reader writes a server's HELLO, already queued, first.
        nursery.start_soon(self._reader.run, self, name=_READER_NAME)

    async def _wait_open(self) -> None:
        """Wait until the handshake is done and our HELLO is out: the block may start."""
        await self._opened.wait()
        self._opened = _OPENED  # this one's job is done; spare its memory

    async def _close_at_exit(self) -> None:
        """The block ended in order: close gracefully and wait for the peer's answer."""
        self._reader.stop_receiving()
        await self.aclose()
        # Both tasks end by themselves once the close is done; a cancel now could cut
        # off the CLOSE the writer still sends in answer to the peer's: only a late one.
        assert self._scope is not None
        self._scope.deadline = trio.current_time() + BEST_EFFORT_SECONDS

    def _abandon(self, exc: BaseException) -> None:
        """The block raised ``exc``: CLOSE 1001 ahead of the send queue, without waiting."""
        self._reader.stop_receiving()
        self.close_nowait(CloseCode.GOING_AWAY, type(exc).__name__, flush=False)

    def _leaving(self) -> None:
        """The block is over: no writer task is started from now on (another task may
        still send or close; what is left goes out in the last words)."""
        self._writer.start(None)

    async def _finish(self) -> Outcome:
        """The block and the tasks are over: last words, close the stream, say how it ended."""
        if self._options.budget is not None:
            self._options.budget.release(self)
        if self._outcome is None:
            # Left mid-connection (cancelled from outside): say goodbye, no waiting.
            core = self._core
            core.close(CloseCode.GOING_AWAY, "cancelled", now=trio.current_time())
            self._end(left_early(core.close_code, core.close_reason, core.closed_by_peer))
        outcome = self._outcome
        assert outcome is not None
        linger = isinstance(outcome.cause, RemoteProtocolError)
        await self._writer.last_words(self, linger_after=linger)
        if outcome.cause is not None and outcome.cause.__traceback__ is not None:
            # Raised in our tasks, whose finished frames hold the connection: keep the
            # traceback, not the frames' variables (a cycle until a full collection).
            traceback.clear_frames(outcome.cause.__traceback__)
        return outcome
