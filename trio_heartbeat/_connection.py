"""One THB/1 connection over a Trio stream: a nursery with a reader and a writer,
inside a watchdog cancel scope.

Theory of operation
-------------------
:func:`open_stream_connection` runs the whole connection inside one cancel
scope, the *watchdog*, whose deadline is the sans-IO core's
:attr:`~trio_heartbeat.HeartbeatProtocol.abort_deadline`: the handshake
deadline first, then the failure detector's verdict on a silent peer, then the
close timeout. The reader moves that deadline forward after every batch of
frames it receives. When the deadline passes, Trio cancels everything in the
scope at once: the reader, the writer and the caller's own code in the
``async with`` block. Cleanup needs no bookkeeping: the scope unwinds, the
stream is closed, and the caller gets one :class:`HeartbeatTimeout`.

Inside the scope a nursery runs two tasks:

* the **reader** feeds received bytes to the core and dispatches its events:
  DATA into a bounded inbound channel, PONGs to waiting :meth:`Connection.ping`
  calls, everything to the observers. When the inbound channel is full the
  reader stops reading (backpressure reaches the peer through TCP) and tells
  the core, which suspends conviction meanwhile: a slow *application* must not
  make a healthy *peer* look dead.
* the **writer** sleeps until there is something to send or a PING is due,
  then takes every queued DATA message (up to a batch limit), asks the core for
  the bytes (control frames such as PONG and CLOSE ahead of DATA) and writes
  them with one ``send_all``. The write has its own deadline: a peer that stops
  reading is convicted like a silent one.

Neither task ever lets an exception escape: each records the outcome and
cancels the watchdog scope, so the context manager raises exactly one typed
exception, never an ExceptionGroup.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from math import inf
from typing import Final, final

import trio

from ._detectors import FailureDetector
from ._errors import (
    BrokenConnection,
    ConnectionClosed,
    ConnectionRejected,
    HeartbeatTimeout,
    LocalProtocolError,
    RemoteProtocolError,
)
from ._frames import CloseCode, HealthStatus, Hello, Role
from ._groups import BaseExceptionGroup, only_cancelled, single_exception
from ._protocol import (
    NEED_DATA,
    Config,
    ConnectionEnded,
    DataReceived,
    Event,
    HandshakeComplete,
    HeartbeatProtocol,
    PongReceived,
    State,
)

__all__ = [
    "Connection",
    "ConnectionOptions",
    "ConnectionStatistics",
    "EventListener",
    "open_stream_connection",
]

logger = logging.getLogger("trio_heartbeat")

#: Bytes asked of the transport per read.
_RECEIVE_SIZE: Final = 65536
#: The writer stops collecting queued DATA for one ``send_all`` past this many bytes.
_BATCH_BYTES: Final = 256 * 1024
#: Extra spacing of :meth:`Connection.ping` calls beyond the rate rule, as a
#: fraction of the send interval (the rule itself asks for half of it).
_PING_MARGIN: Final = 0.125
#: How long a last CLOSE may take to go out when the connection is being torn down.
_BEST_EFFORT_SECONDS: Final = 0.1

#: Called synchronously, from the reader, with every protocol event but DATA.
EventListener = Callable[["Connection", Event], None]


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Runtime settings of a connection, beyond the THB/1 :class:`Config`.

    ``send_queue`` and ``receive_queue`` bound the DATA messages waiting to be
    written and waiting to be received (backpressure at both ends).
    ``write_timeout`` bounds one ``send_all``: a write that makes no progress
    for that long convicts the peer (``None``: the config's ``timeout``).
    ``detector`` picks the failure detector (default: a fixed timeout).
    """

    send_queue: int = 64
    receive_queue: int = 64
    write_timeout: float | None = None
    detector: Callable[[], FailureDetector] | None = None

    def __post_init__(self) -> None:
        if self.send_queue < 1 or self.receive_queue < 1:
            raise ValueError("send_queue and receive_queue must be at least 1")
        if self.write_timeout is not None and self.write_timeout <= 0:
            raise ValueError("write_timeout must be positive")


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of one connection, taken without I/O. Times are ``trio.current_time()`` values."""

    state: State
    role: Role
    peer_id: str | None
    peer_health: HealthStatus | None
    health: HealthStatus
    opened_at: float | None
    last_received: float | None
    last_sent: float
    rtt: float | None
    srtt: float | None
    send_interval: float
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    data_frames_in: int
    data_frames_out: int
    pings_sent: int
    pongs_received: int
    send_queue_used: int
    receive_queue_used: int


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How the connection ended, kept as data so each raise gets a fresh exception."""

    kind: type[ConnectionClosed]
    code: int
    reason: str
    by_peer: bool
    failure: bool
    cause: BaseException | None = None

    def exception(self) -> ConnectionClosed:
        exc = self.kind(self.code, self.reason, by_peer=self.by_peer)
        exc.__cause__ = self.cause
        return exc


@final
class Connection:
    """A live THB/1 connection. Get one from :func:`open_connection`,
    :func:`open_stream_connection` or a server's handler; do not construct it.

    Sending and receiving:

    >>> async def chat(conn: Connection) -> None:  # doctest: +SKIP
    ...     await conn.send(b"hello")
    ...     async for message in conn:
    ...         print(message)

    :meth:`send` waits while the send queue is full; :meth:`receive` waits for
    the next DATA. Both raise :class:`ConnectionClosed` (or a subclass) once the
    connection has ended. Everything else (state, peer, RTT, counters) is read
    without I/O.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: HeartbeatProtocol,
        options: ConnectionOptions,
        listeners: list[EventListener],
        remote_address: str | None,
    ) -> None:
        self.stream = stream
        self._core = protocol
        self._options = options
        self._listeners = listeners
        self.remote_address = remote_address
        self._write_timeout = (
            options.write_timeout if options.write_timeout is not None else protocol.config.timeout
        )
        self._out_send, self._out_receive = trio.open_memory_channel[bytes](options.send_queue)
        self._in_send, self._in_receive = trio.open_memory_channel[bytes](options.receive_queue)
        self._wake = trio.Event()
        # The scope around the whole connection (tasks and the caller's block):
        # cancelled on failure. The watchdog task's timer is a scope of its own
        # whose deadline the reader moves with every frame.
        self._scope = trio.CancelScope()
        self._timer = trio.CancelScope(deadline=protocol.abort_deadline)
        self._opened = trio.Event()
        self._ended = trio.Event()
        self._outcome: _Outcome | None = None
        self._close_request: tuple[int, str] | None = None
        self._send_broken = False
        self._ping_waiters: dict[bytes, trio.Event] = {}
        self._receiving_stopped = False
        self._delivery = trio.CancelScope()  # around a reader waiting for queue room
        self._ping_results: dict[bytes, float] = {}
        self.opened_at: float | None = None

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
        """The health status the peer last reported."""
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
        """When the watchdog gives up on the connection if nothing arrives before.

        The handshake deadline, then the failure detector's verdict on a silent
        peer (``inf`` while our application holds the reader up), then the
        close timeout.
        """
        return self._timer.deadline

    @property
    def closed(self) -> ConnectionClosed | None:
        """How the connection ended, as the exception :meth:`receive` raises, or ``None`` while live."""
        return None if self._outcome is None else self._outcome.exception()

    def statistics(self) -> ConnectionStatistics:
        """Counters and timings of this connection; see :class:`ConnectionStatistics`."""
        core = self._core
        counters = core.counters
        return ConnectionStatistics(
            state=core.state,
            role=core.role,
            peer_id=self.peer_id,
            peer_health=core.peer_health,
            health=core.health,
            opened_at=self.opened_at,
            last_received=core.last_received,
            last_sent=core.last_sent,
            rtt=core.rtt,
            srtt=core.srtt,
            send_interval=core.send_interval,
            frames_in=counters.frames_in,
            frames_out=counters.frames_out,
            bytes_in=counters.bytes_in,
            bytes_out=counters.bytes_out,
            data_frames_in=counters.data_frames_in,
            data_frames_out=counters.data_frames_out,
            pings_sent=counters.pings_sent,
            pongs_received=counters.pongs_received,
            send_queue_used=self._out_send.statistics().current_buffer_used,
            receive_queue_used=self._in_send.statistics().current_buffer_used,
        )

    # -- application API ----------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Queue ``data`` as one DATA frame; waits while the send queue is full.

        Raises :class:`ConnectionClosed` once the connection is closing or
        closed, and :class:`LocalProtocolError` (code 1009) for a message over
        the peer's ``max_frame``.
        """
        self._check_can_send(data)
        try:
            await self._out_send.send(data)
        except trio.ClosedResourceError:
            raise self._closed_error() from None
        self._wake.set()

    def send_nowait(self, data: bytes) -> None:
        """Like :meth:`send`, but raises :class:`trio.WouldBlock` when the queue is full."""
        self._check_can_send(data)
        try:
            self._out_send.send_nowait(data)
        except trio.ClosedResourceError:
            raise self._closed_error() from None
        self._wake.set()

    def _check_can_send(self, data: bytes) -> None:
        core = self._core
        if core.state is not State.OPEN or self._close_request is not None:
            raise self._closed_error()
        assert core.peer is not None
        if len(data) > core.peer.max_frame:
            raise LocalProtocolError(
                f"DATA of {len(data)} bytes exceeds the peer's limit of {core.peer.max_frame}",
                CloseCode.TOO_BIG,
            )

    async def receive(self) -> bytes:
        """Wait for the next DATA payload.

        Raises :class:`ConnectionClosed` (or the subclass that says why) once
        the connection has ended and every DATA received before is delivered.
        """
        try:
            return await self._in_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._closed_error() from None

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> bytes:
        # Not an async generator: leaving ``async for`` early (return, break,
        # an exception) must leave nothing behind to finalize.
        # Iteration ends quietly on an orderly close (1000, 1001), as with
        # websockets; anything else raises so that it cannot go unnoticed.
        try:
            return await self.receive()
        except ConnectionClosed as exc:
            if not isinstance(exc, (HeartbeatTimeout, BrokenConnection)) and exc.code in (
                CloseCode.NORMAL,
                CloseCode.GOING_AWAY,
            ):
                raise StopAsyncIteration from None
            raise

    async def ping(self) -> float:
        """Send a PING now (or as soon as the rate rule allows) and return its round trip.

        Back-to-back calls are spaced at least 5/8 of the send interval apart,
        a quarter more than the rate rule's half: the peer judges the spacing
        as the PINGs *arrive*, and network jitter must not turn a loop of
        ``ping()`` calls into strikes (and a 1008).

        Raises :class:`ConnectionClosed` if the connection ends first.
        """
        core = self._core
        while True:
            # Always at least one checkpoint; the rate is checked again after
            # every wait, since a concurrent ping() may have gone out first.
            live = core.state is State.OPEN and self._close_request is None
            await trio.sleep_until(self._next_ping_at() if live else -inf)
            if core.state is not State.OPEN or self._close_request is not None:
                raise self._closed_error()
            if trio.current_time() >= self._next_ping_at():
                break
        opaque = core.send_ping(trio.current_time())
        done = self._ping_waiters[opaque] = trio.Event()
        self._wake.set()
        try:
            await done.wait()
        finally:
            self._ping_waiters.pop(opaque, None)
        rtt = self._ping_results.pop(opaque, None)
        if rtt is None:
            raise self._closed_error()
        return rtt

    def _stop_receiving(self) -> None:
        """The caller's block is over: DATA that finds the queue full is dropped.

        Otherwise the peer's CLOSE, which may sit behind DATA nobody will read,
        could not get through, and every close would end at the close timeout.
        What is already queued stays readable.
        """
        self._receiving_stopped = True
        self._delivery.cancel()

    def _next_ping_at(self) -> float:
        core = self._core
        return core.earliest_ping + core.send_interval * _PING_MARGIN

    def set_health(self, status: HealthStatus) -> None:
        """Report a new health status; the peer learns it within one PING."""
        core = self._core
        core.set_health(status, trio.current_time())
        self._wake.set()

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection: flush queued DATA, send CLOSE, wait for the peer's CLOSE.

        The wait is bounded by the config's ``close_timeout``. Idempotent; a
        no-op once the connection has ended. Safe to call from any task.
        """
        self.close_nowait(code, reason)
        await self._ended.wait()

    def close_nowait(
        self, code: int = CloseCode.NORMAL, reason: str = "", *, flush: bool = True
    ) -> None:
        """Start closing without waiting. With ``flush=False`` the CLOSE jumps the send queue."""
        if self._close_request is not None or self._outcome is not None:
            return
        self._close_request = (code, reason)
        if not flush:
            self._apply_close(trio.current_time())
        self._wake.set()

    async def wait_closed(self) -> ConnectionClosed:
        """Wait until the connection has ended and return how (without raising it)."""
        await self._ended.wait()
        assert self._outcome is not None
        return self._outcome.exception()

    def _closed_error(self) -> ConnectionClosed:
        if self._outcome is not None:
            return self._outcome.exception()
        core = self._core
        code = core.close_code if core.close_code is not None else CloseCode.NORMAL
        return ConnectionClosed(code, core.close_reason, by_peer=core.closed_by_peer)

    # -- the tasks --------------------------------------------------------------

    def _rearm(self) -> None:
        self._timer.deadline = self._core.abort_deadline

    async def _watchdog(self) -> None:
        """Sleep until the core's abort deadline; if it still stands then, act on it.

        The reader moves the timer's deadline with every frame, so the sleep
        only ends when the peer really has been silent that long (or the
        handshake or close took too long). The verdict is recorded *before*
        the connection's scope is cancelled, so everything that unwinds, the
        caller's block included, can already see why.
        """
        core = self._core
        while not self._ended.is_set():
            self._timer = trio.CancelScope(deadline=core.abort_deadline)
            with self._timer:
                await trio.sleep_forever()
            if self._ended.is_set():
                return  # ended meanwhile: _finish() woke us to leave
            if trio.current_time() < core.abort_deadline:
                continue  # moved by a frame that arrived in the same tick
            # The local-stall guard: before a verdict, let the reader take in
            # whatever already arrived. A frame waiting in our buffer proves
            # the peer alive; only our own lateness (a busy or stalled event
            # loop) kept it from us. Two rounds: one for Trio to notice the
            # input and wake the reader, one for the reader to run.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            now = trio.current_time()
            if now < core.abort_deadline:
                continue
            core.handle_timeout(now)
            while (event := core.next_event()) is not NEED_DATA:
                if type(event) is ConnectionEnded:
                    self._notify(event)
                    self._on_ended(event)
            if core.state in (State.CLOSED, State.ERROR):
                self._wake.set()  # the writer sends any last CLOSE, then closes the stream
                return

    async def _reader(self) -> None:
        core = self._core
        stream = self.stream
        try:
            while True:
                try:
                    data = await stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    if self._outcome is None and core.state not in (State.CLOSED, State.ERROR):
                        self._finish(
                            _Outcome(
                                BrokenConnection,
                                CloseCode.ABNORMAL_CLOSURE,
                                f"transport failed: {exc!r}",
                                True,
                                True,
                                exc,
                            )
                        )
                    return
                core.receive_data(data, trio.current_time())
                if await self._dispatch_events():
                    return
                self._rearm()
                if core.control_pending:
                    self._wake.set()
        except RemoteProtocolError as exc:
            logger.debug(
                "protocol error from peer %s: %s (close %d)", self.remote_address, exc, exc.code
            )
            self._finish(_Outcome(ConnectionClosed, exc.code, str(exc), False, True, exc))

    async def _dispatch_events(self) -> bool:
        """Hand out every event of the bytes just received; true once the connection ended."""
        core = self._core
        while True:
            event = core.next_event()
            if event is NEED_DATA:
                return False
            if type(event) is DataReceived:
                try:
                    self._in_send.send_nowait(event.data)
                except trio.WouldBlock:
                    await self._deliver_slowly(event.data)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return True  # the connection was finished meanwhile
                continue
            if type(event) is HandshakeComplete:
                self.opened_at = trio.current_time()
            self._notify(event)
            if type(event) is PongReceived:
                waiter = self._ping_waiters.get(event.opaque)
                if waiter is not None and event.rtt is not None:
                    self._ping_results[event.opaque] = event.rtt
                    waiter.set()
            elif type(event) is HandshakeComplete:
                self._wake.set()  # the writer sends our HELLO (client) and opens the block
            elif type(event) is ConnectionEnded:
                self._on_ended(event)
                return True

    async def _deliver_slowly(self, data: bytes) -> None:
        # The application is not keeping up. Stop reading (TCP pushes back on
        # the peer) and do not hold the resulting silence against the peer.
        if self._receiving_stopped:
            return  # the block is over and the queue is full: nobody will read it
        core = self._core
        core.pause_liveness(trio.current_time())
        self._rearm()
        self._delivery = trio.CancelScope()
        try:
            with self._delivery:
                await self._in_send.send(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the connection was finished meanwhile; the reader stops on its next turn
        finally:
            core.resume_liveness(trio.current_time())
            self._rearm()

    def _on_ended(self, event: ConnectionEnded) -> None:
        if self._core.state is State.CLOSED:
            # A client is OPEN once it has sent its HELLO, before the server
            # has judged it: a refusal code as the server's first frame after
            # its HELLO is the verdict on ours (bad credentials, say).
            judged = (
                self.role is Role.CLIENT
                and self._core.counters.frames_in == 2
                and event.code in (CloseCode.POLICY_VIOLATION, CloseCode.TRY_AGAIN_LATER)
            )
            if event.by_peer and (self.opened_at is None or judged):
                kind: type[ConnectionClosed] = ConnectionRejected
            else:
                kind = ConnectionClosed
            failure = kind is ConnectionRejected
            self._finish(
                _Outcome(kind, event.code, event.reason, event.by_peer, failure), cancel=failure
            )
            # CLOSED has no deadline: a stale liveness or close deadline must
            # not cancel the caller's block after an orderly close.
            self._rearm()
            self._wake.set()  # the writer flushes our answering CLOSE, then closes the stream
        elif event.code == CloseCode.HEARTBEAT_TIMEOUT:
            self._finish(_Outcome(HeartbeatTimeout, event.code, event.reason, False, True))
        else:
            self._finish(_Outcome(BrokenConnection, event.code, event.reason, event.by_peer, True))

    async def _writer(self) -> None:
        core = self._core
        stream = self.stream
        receive_nowait = self._out_receive.receive_nowait
        try:
            while True:
                with trio.move_on_at(core.ping_deadline):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self._let_the_burst_finish()
                now = trio.current_time()
                if core.state is State.OPEN:
                    # Only the watchdog convicts; the writer just keeps the PINGs
                    # going, and sends none once the peer is due to be convicted
                    # (a send cut short by the verdict would cost us the CLOSE).
                    if core.ping_deadline <= now < core.abort_deadline:
                        core.send_ping(now)
                    batch = 0
                    while batch < _BATCH_BYTES and core.state is State.OPEN:
                        try:
                            message = receive_nowait()
                        except trio.WouldBlock:
                            if self._close_request is not None:
                                self._apply_close(now)
                            break
                        except trio.EndOfChannel:
                            break  # _finish() ran since we woke (a failure): its cancel is due
                        core.send_data(message, now)
                        batch += len(message)
                    else:
                        self._wake.set()  # more queued than one batch: go round again
                    self._rearm()
                # Woken just before a cancel (say the reader hit a protocol error
                # right after waking us): stop here, so that the CLOSE stays in
                # the core for _teardown instead of dying in a cancelled send_all.
                await trio.lowlevel.checkpoint_if_cancelled()
                data = core.data_to_send()
                if data:
                    self._send_broken = True
                    # Last words (our answer to the peer's CLOSE) must not die
                    # in a send cancelled by the block ending at the same
                    # moment: they go out shielded, for a short while at most.
                    last_words = core.state in (State.CLOSED, State.ERROR)
                    with trio.move_on_after(self._write_timeout) as write_scope:
                        with trio.CancelScope(shield=last_words) as words_scope:
                            if last_words:
                                words_scope.deadline = trio.current_time() + _BEST_EFFORT_SECONDS
                            await stream.send_all(data)
                            self._send_broken = False
                    if write_scope.cancelled_caught:
                        self._finish(
                            _Outcome(
                                HeartbeatTimeout,
                                CloseCode.HEARTBEAT_TIMEOUT,
                                "write timeout: the peer stopped reading",
                                False,
                                True,
                            )
                        )
                        return
                if core.state is State.OPEN and not self._opened.is_set():
                    # Our HELLO (a client's) is on the wire: the caller's block
                    # may start, and whatever it does, the peer has heard us.
                    self._opened.set()
                if core.state in (State.CLOSED, State.ERROR) and not core.control_pending:
                    with trio.CancelScope(
                        shield=True, deadline=trio.current_time() + _BEST_EFFORT_SECONDS
                    ):
                        await stream.aclose()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if self._outcome is None:
                self._finish(
                    _Outcome(
                        BrokenConnection,
                        CloseCode.ABNORMAL_CLOSURE,
                        f"transport failed: {exc!r}",
                        False,
                        True,
                        exc,
                    )
                )

    async def _let_the_burst_finish(self) -> None:
        """Coalescing: while the application is still adding to the send queue,
        give it one more scheduling round before writing, so that a burst goes
        out in one ``send_all`` rather than one per message. Costs nothing in
        virtual time and one round (microseconds) for a lone message."""
        queue = self._out_send.statistics
        queued = queue().current_buffer_used
        while 0 < queued < self._options.send_queue:
            await trio.lowlevel.checkpoint()
            now_queued = queue().current_buffer_used
            if now_queued <= queued:
                return
            queued = now_queued

    def _apply_close(self, now: float) -> None:
        assert self._close_request is not None
        code, reason = self._close_request
        self._core.close(code, reason, now=now)
        self._rearm()

    def _notify(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(self, event)
            except Exception:
                logger.exception("event listener %r failed on %r", listener, event)

    def _finish(self, outcome: _Outcome, *, cancel: bool | None = None) -> None:
        """Record how the connection ended; failures cancel everything.

        The first word wins: a later one (a write failing after an orderly
        close, say) neither replaces it nor cancels the caller's block.
        """
        if self._outcome is not None:
            return
        self._outcome = outcome
        self._timer.cancel()  # nothing left to watch: the watchdog task returns
        self._out_send.close()
        self._in_send.close()
        # No PONG can come any more: a ping() waiting for one must raise now,
        # not when the block is left (an orderly close does not cancel it).
        for waiter in self._ping_waiters.values():
            waiter.set()
        self._ended.set()
        if outcome.failure if cancel is None else cancel:
            self._scope.cancel()
        elif self.opened_at is not None:
            # An orderly end right after the handshake (a CLOSE that came with
            # the peer's HELLO): the writer may never get to open the block,
            # so open it here; the caller finds the connection closed.
            self._opened.set()

    def _wrap_up(self) -> None:
        if self._outcome is not None:
            return  # _finish() already released everything
        core = self._core
        # Cancelled from outside mid-connection: say goodbye without waiting.
        core.close(CloseCode.GOING_AWAY, "cancelled", now=trio.current_time())
        code = core.close_code if core.close_code is not None else CloseCode.ABNORMAL_CLOSURE
        self._finish(
            _Outcome(ConnectionClosed, code, core.close_reason, core.closed_by_peer, False),
            cancel=False,
        )

    async def _teardown(self) -> None:
        """Best-effort last words (a CLOSE the core queued), then close the stream. Shielded."""
        with trio.CancelScope(shield=True):
            leftover = self._core.data_to_send()
            if leftover and not self._send_broken:
                with trio.move_on_after(_BEST_EFFORT_SECONDS):
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await self.stream.send_all(leftover)
            await trio.aclose_forcefully(self.stream)


@asynccontextmanager
async def open_stream_connection(
    stream: trio.abc.Stream,
    *,
    role: Role = Role.CLIENT,
    config: Config | None = None,
    options: ConnectionOptions | None = None,
    listeners: list[EventListener] | None = None,
    remote_address: str | None = None,
) -> AsyncIterator[Connection]:
    """Run THB/1 over a stream you already have, for as long as the ``async with`` block.

    >>> async def main(stream: trio.abc.Stream) -> None:  # doctest: +SKIP
    ...     async with open_stream_connection(stream) as conn:
    ...         await conn.send(b"hello")
    ...         print(await conn.receive())

    The handshake completes before the block is entered. Leaving the block
    closes the connection gracefully (CLOSE 1000, bounded by ``close_timeout``);
    leaving it with an exception sends CLOSE 1001 without waiting. The stream
    is always closed on the way out.

    If the connection fails, by a heartbeat timeout, a protocol error or a
    broken transport, the block is cancelled and exactly one
    :class:`ConnectionClosed` subclass is raised: :class:`HeartbeatTimeout`,
    :class:`BrokenConnection`, :class:`ConnectionRejected`, or
    :class:`ConnectionClosed` itself for a protocol error (with the
    :class:`RemoteProtocolError` as ``__cause__``). An orderly CLOSE from the
    peer does not cancel the block: :meth:`Connection.receive` reports it.
    """
    try:
        options = options if options is not None else ConnectionOptions()
        detector = options.detector() if options.detector is not None else None
        core = HeartbeatProtocol(role, config, now=trio.current_time(), detector=detector)
        conn = Connection(stream, core, options, list(listeners or ()), remote_address)
    except BaseException:
        # The stream is ours from the moment we are called: closed on every path.
        await trio.aclose_forcefully(stream)
        raise
    body_error: BaseException | None = None
    try:
        with conn._scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn._reader)
                    nursery.start_soon(conn._writer)
                    nursery.start_soon(conn._watchdog)
                    conn._wake.set()  # a server's HELLO is already queued
                    await conn._opened.wait()
                    try:
                        yield conn
                    except BaseException as exc:
                        if not only_cancelled(exc):
                            body_error = exc
                            conn._stop_receiving()
                            conn.close_nowait(CloseCode.GOING_AWAY, type(exc).__name__, flush=False)
                        raise
                    conn._stop_receiving()
                    await conn.aclose()
                    # Both tasks end by themselves once the close is done; a
                    # cancel now could cut off the CLOSE the writer is still
                    # sending in answer to the peer's, so it only comes late.
                    nursery.cancel_scope.deadline = trio.current_time() + _BEST_EFFORT_SECONDS
            except BaseExceptionGroup as group:
                # The watchdog may have cancelled the reader while the block
                # raised an error of its own: that error is the news. A
                # cancellation dropped here is raised again at the next checkpoint.
                errors = group.split(trio.Cancelled)[1]
                if errors is None:
                    # Nothing but cancellations (a scope outside reached the
                    # block and both tasks at once): one Cancelled stands for
                    # all, so the caller's scope never sees a group.
                    leaf: BaseException = group
                    while isinstance(leaf, BaseExceptionGroup):
                        leaf = leaf.exceptions[0]
                else:
                    leaf = single_exception(errors)
                raise leaf from leaf.__cause__  # keep the leaf's own cause, hide the group
    finally:
        conn._wrap_up()
        await conn._teardown()
    outcome = conn._outcome
    assert outcome is not None
    if outcome.failure and body_error is None:
        raise outcome.exception()
