"""One THB/1 connection over a Trio stream: a reader that is also the watchdog,
and a writer when there is something to write, in a nursery inside one cancel
scope that failure cancels.

Theory of operation
-------------------
:func:`open_stream_connection` runs the whole connection, the caller's
``async with`` block included, inside one cancel scope (the nursery's). In it:

* the **reader** is also the **watchdog**. It reads inside a timer cancel
  scope whose deadline is the earliest of the core's PING deadline, its
  :attr:`~trio_heartbeat.HeartbeatProtocol.abort_deadline` (the handshake
  deadline, then the failure detector's verdict on a silent peer, then the
  close timeout) and, while a write is under way, the write timeout; every
  received frame and every write moves it. It feeds received bytes to the
  sans-IO core and hands out its events: DATA into a bounded inbound queue,
  PONGs to waiting :meth:`Connection.ping` calls, everything to the observers.
  Control frames the core queues in answer (a PONG, a client's HELLO) it
  writes itself. When the timer fires it queues the PING that is due, or
  convicts: it records the verdict and cancels the connection's scope, so the
  tasks and the caller's block all unwind at once and the caller gets one
  :class:`HeartbeatTimeout`. Trio wakes a task for its input before it expires
  deadlines, so a frame that arrived before a stall of our own event loop is
  read before the verdict: the peer is not convicted for our lateness. When
  the inbound queue is full the reader stops reading (backpressure reaches the
  peer through TCP) and tells the core, which suspends conviction meanwhile: a
  slow *application* must not make a healthy *peer* look dead. Its PINGs and
  PONGs still go out.
* the **writer** is started when there is something the reader does not
  write itself (queued DATA, a close to flush or to answer, a write the socket
  did not take at once, a PING due on a stream whose writes may block, a
  write it stood back for) and ends when nothing is left, so an idle
  connection keeps no task for it. It takes every queued message (up to a
  batch limit), asks the core for the bytes (control frames ahead of DATA) and
  writes them with one ``send_all``, bounded by the write timeout.

On a plain TCP stream (:class:`trio.SocketStream`, outside Windows) the reader
waits with :func:`trio.lowlevel.wait_readable` and reads with ``os.read``, and
answers with a non-blocking ``os.write``; what the socket does not take at once
goes to the writer. The reader therefore never blocks on a write: a peer that
sends but does not read is judged by the write timeout while its frames are
still read. On other streams (TLS, memory streams, your own) the reader uses
``receive_some`` and ``send_all``, and leaves the PINGs it queues to the
writer. Their ``receive_some`` must keep its data when it is cancelled (the
timer cancels it whenever a PING falls due), as Trio's own streams do: a
stream that drops it would lose DATA without an error. A write cut short
leaves a partial frame on the stream, so after one nothing more is written.

Only one task writes at a time (the reader, a :meth:`Connection.ping` caller
or the writer); whoever finishes a write and finds more queued wakes the
writer. No task lets an exception escape: each records the outcome and
cancels the scope, so the context manager raises exactly one typed exception,
never an ExceptionGroup. On the way out the stream is closed; after a peer's
protocol error, only once our CLOSE and EOF are out and the peer has had a
moment to stop sending (a reset could destroy the CLOSE unread).

:meth:`Connection.send` and :meth:`Connection.receive` are always
cancellation points, but they yield to the scheduler only when they must wait
(the send queue is full, or no DATA has arrived). A burst of sends therefore
fills the queue before the writer runs, and goes out in one ``send_all``; a
burst of received messages is consumed without a task switch per message.
Both queues are bounded, so neither can starve other tasks for longer than
one queue's worth of messages.

An idle server connection is two tasks (the handler's and the reader), one
nursery, one timer scope and about 60 objects for the garbage collector: under
10 KiB of memory.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass
from math import inf
from types import TracebackType
from typing import Final, final

import trio
from trio.lowlevel import (
    Abort,
    ParkingLot,
    Task,
    checkpoint_if_cancelled,
    current_task,
    reschedule,
    wait_readable,
    wait_task_rescheduled,
)

from ._config import Config
from ._detectors import FailureDetector
from ._errors import (
    BrokenConnection,
    ConnectionClosed,
    ConnectionRejected,
    HeartbeatTimeout,
    LocalProtocolError,
    RemoteProtocolError,
)
from ._events import (
    NEED_DATA,
    ConnectionEnded,
    DataReceived,
    Event,
    HandshakeComplete,
    PongReceived,
)
from ._frames import CloseCode, HealthStatus, Hello, Role
from ._groups import BaseExceptionGroup, only_cancelled, reraise_single
from ._protocol import HeartbeatProtocol
from ._state import State

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

#: Plain TCP streams are read and written through their descriptor (os.read,
#: os.write) where those work on sockets.
_DIRECT_IO: Final = sys.platform != "win32"
#: Task names, shared by every connection (Trio would build a string per task).
_READER_NAME: Final = "trio_heartbeat.Connection._reader"
_WRITER_NAME: Final = "trio_heartbeat.Connection._writer"

#: Stands in for a connection's own ``_opened`` event once its block has begun.
_OPENED: Final = trio.Event()
_OPENED.set()

#: Called synchronously, from the reader, with every protocol event but DATA.
EventListener = Callable[["Connection", Event], None]


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Runtime settings of a connection, beyond the THB/1 :class:`Config`.

    ``send_queue`` and ``receive_queue`` bound the DATA messages waiting to be
    written and waiting to be received (backpressure at both ends).
    ``write_timeout`` bounds each ``send_all`` as a whole (the writer's can
    carry a batch of up to 256 KiB): a write not done after that long convicts
    the peer as one that stopped reading (``None``: the config's ``timeout``).
    Allow for the slowest reader you mean to keep.
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

    __slots__ = (
        "_close_request",
        "_core",
        "_end_waiter",
        "_flush_deadline",
        "_inbox",
        "_listeners",
        "_more_end_waiters",
        "_nursery",
        "_opened",
        "_options",
        "_outbox",
        "_outcome",
        "_ping_results",
        "_ping_waiters",
        "_receivers",
        "_receiving_stopped",
        "_room",
        "_scope",
        "_send_broken",
        "_senders",
        "_timer",
        "_timer_at",
        "_undelivered",
        "_unsent",
        "_wake_pending",
        "_write_started",
        "_write_timeout",
        "_writer_deferred",
        "_writer_running",
        "_writing",
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
        self._write_timeout = (
            options.write_timeout if options.write_timeout is not None else protocol.config.timeout
        )
        # DATA waiting for the writer, and tasks waiting for room in it; DATA
        # waiting for the application, tasks waiting for it, and the reader
        # waiting for room. All made on first use: a server holds thousands of
        # connections that only ever heartbeat.
        self._outbox: deque[bytes] | None = None
        self._senders: ParkingLot | None = None
        self._inbox: deque[bytes] | None = None
        self._receivers: ParkingLot | None = None
        self._room: ParkingLot | None = None
        self._receiving_stopped = False
        # The writer is started when there is something to write and ends when
        # there is nothing left: an idle connection keeps no task for it.
        self._nursery: trio.Nursery | None = None
        self._writer_running = False
        self._wake_pending = False
        # The part of a direct write the socket did not take; the writer sends it.
        self._unsent: bytes | None = None
        # DATA the reader holds while the application's queue is full.
        self._undelivered: bytes | None = None
        # Set while the writer stood back because another task was writing.
        self._writer_deferred = False
        # One task writes at a time: the writer, the reader or a ping() caller.
        self._writing = False
        self._write_started = inf
        self._send_broken = False
        # While closing with a flush: when the flush must stop.
        self._flush_deadline = inf
        # The scope around the whole connection (tasks and the caller's block),
        # cancelled on failure; and the reader's current timer scope (the watchdog).
        # Set to the nursery's scope once the tasks start.
        self._scope: trio.CancelScope | None = None
        self._timer = trio.CancelScope()
        self._timer_at = inf  # the timer's deadline, kept here to spare Trio's property
        self._opened = trio.Event()
        # The task waiting for the end (a server's handler, say), and a lot
        # for any more, made when a second one waits.
        self._end_waiter: Task | None = None
        self._more_end_waiters: ParkingLot | None = None
        self._outcome: _Outcome | None = None
        self._close_request: tuple[int, str] | None = None
        # ping() calls waiting for their PONG, and the round trips they get.
        self._ping_waiters: dict[bytes, trio.Event] | None = None
        self._ping_results: dict[bytes, float] | None = None

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
        close timeout; ``inf`` once the connection has ended.
        """
        return self._core.abort_deadline

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
            send_queue_used=len(self._outbox or ()),
            receive_queue_used=len(self._inbox or ()),
        )

    # -- application API ----------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Queue ``data`` as one DATA frame; waits while the send queue is full.

        Always a cancellation point; it yields to other tasks only when it has
        to wait for room, so that a burst of sends goes out in one write.

        Raises :class:`ConnectionClosed` once the connection is closing or
        closed, and :class:`LocalProtocolError` (code 1009) for a message over
        the peer's ``max_frame``.
        """
        self._check_can_send(data)
        await checkpoint_if_cancelled()
        while len(self._outbox or ()) >= self._options.send_queue:
            if self._senders is None:
                self._senders = ParkingLot()
            await self._senders.park()
            self._check_can_send(data)
        self._queue_data(data)

    def send_nowait(self, data: bytes) -> None:
        """Like :meth:`send`, but raises :class:`trio.WouldBlock` when the queue is full."""
        self._check_can_send(data)
        if len(self._outbox or ()) >= self._options.send_queue:
            raise trio.WouldBlock
        self._queue_data(data)

    def _queue_data(self, data: bytes) -> None:
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        outbox.append(data)
        self._wake_writer()

    def _check_can_send(self, data: bytes) -> None:
        core = self._core
        if (
            core.state is not State.OPEN
            or self._close_request is not None
            or self._outcome is not None
        ):
            raise self._closed_error()
        assert core.peer is not None
        if len(data) > core.peer.max_frame:
            raise LocalProtocolError(
                f"DATA of {len(data)} bytes exceeds the peer's limit of {core.peer.max_frame}",
                CloseCode.TOO_BIG,
            )

    async def receive(self) -> bytes:
        """Wait for the next DATA payload.

        Always a cancellation point; it yields to other tasks only when no
        DATA is waiting. Raises :class:`ConnectionClosed` (or the subclass
        that says why) once the connection has ended and every DATA received
        before is delivered.
        """
        await checkpoint_if_cancelled()
        while not (inbox := self._inbox):
            if self._outcome is not None:
                raise self._outcome.exception()
            if self._receivers is None:
                self._receivers = ParkingLot()
            await self._receivers.park()
        data = inbox.popleft()
        if self._room:
            self._room.unpark()  # the reader was waiting for this room
        return data

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

        Unless the writer is at work (then it sends the PING), the PING is
        written from the calling task: on plain TCP with a non-blocking write,
        elsewhere shielded from the caller's cancellation and bounded by the
        write timeout.
        Raises :class:`ConnectionClosed` if the connection ends first.
        """
        core = self._core
        await checkpoint_if_cancelled()
        while True:
            # The rate is checked again after every wait, since a concurrent
            # ping() may have gone out first.
            if (
                core.state is not State.OPEN
                or self._close_request is not None
                or self._outcome is not None  # a broken transport leaves the core OPEN
            ):
                raise self._closed_error()
            next_at = self._next_ping_at()
            if trio.current_time() >= next_at:
                break
            await trio.sleep_until(next_at)
        opaque = core.send_ping(trio.current_time())
        waiters = self._ping_waiters
        if waiters is None:
            waiters = self._ping_waiters = {}
        done = waiters[opaque] = trio.Event()
        try:
            await self._write_inline(shielded=True)
            self._rearm()
            await done.wait()
        finally:
            waiters.pop(opaque, None)
        rtt = self._ping_results.pop(opaque, None) if self._ping_results else None
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
        if self._room:
            self._room.unpark_all()

    def _next_ping_at(self) -> float:
        core = self._core
        return core.earliest_ping + core.send_interval * _PING_MARGIN

    def set_health(self, status: HealthStatus) -> None:
        """Report a new health status; the peer learns it within one PING."""
        self._core.set_health(status, trio.current_time())
        self._rearm()  # the timer fires when the rate rule lets the PING go

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
        """Start closing without waiting. With ``flush=False`` the CLOSE jumps the send queue.

        With ``flush=True`` queued DATA goes first, for ``close_timeout`` at most.
        """
        if self._close_request is not None or self._outcome is not None:
            return
        self._close_request = (code, reason)
        if self._senders:
            self._senders.unpark_all()  # they will not get room: they raise now
        now = trio.current_time()
        if flush:
            self._flush_deadline = now + self._core.config.close_timeout
            self._rearm()
        else:
            self._apply_close(now)
        self._wake_writer()

    async def wait_closed(self) -> ConnectionClosed:
        """Wait until the connection has ended and return how (without raising it)."""
        await self._wait_ended()
        assert self._outcome is not None
        return self._outcome.exception()

    def _wait_ended(self) -> Coroutine[object, object, object]:
        """An awaitable that returns once the connection has ended.

        Not a coroutine function: the caller awaits Trio's trap directly, one
        frame and no event object less for each of the thousands of handlers
        a server may have waiting here.
        """
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
        if self._close_request is not None and self._core.close_code is None:
            code, reason = self._close_request  # asked for, not applied yet (flushing)
            return ConnectionClosed(code, reason, by_peer=False)
        core = self._core
        code = core.close_code if core.close_code is not None else CloseCode.NORMAL
        return ConnectionClosed(code, core.close_reason, by_peer=core.closed_by_peer)

    # -- timing -----------------------------------------------------------------

    def _timer_deadline(self) -> float:
        """When the reader's timer must fire: a PING due, a verdict due, a write too slow."""
        core = self._core
        if self._writing:
            # No PING can go out before the write is over.
            return min(core.abort_deadline, self._write_started + self._write_timeout)
        if self._close_request is None:
            return core.next_deadline  # the per-frame case: no flush to bound
        return min(core.next_deadline, self._flush_deadline)

    def _rearm(self) -> None:
        """Move the timer to the core's current deadlines (after frames, writes, settings)."""
        deadline = self._timer_deadline()
        if deadline != self._timer_at:
            self._timer.deadline = self._timer_at = deadline

    # -- writing ----------------------------------------------------------------

    def _wake_writer(self) -> None:
        """Have the writer go round (again), starting it if it is not running."""
        self._wake_pending = True
        if not self._writer_running and self._nursery is not None:
            self._writer_running = True
            self._nursery.start_soon(self._writer, name=_WRITER_NAME)

    async def _write_inline(self, *, shielded: bool) -> None:
        """Write what the core has queued from the calling task, unless a writer is at work.

        Used by the reader (PONGs, PINGs, a client's HELLO) and by :meth:`ping`,
        so that an answer costs no task switch. If another task is writing,
        the bytes stay queued and the writer sends them next. On a plain
        socket this never waits: what the socket does not take at once is left
        to the writer. Failures are recorded, never raised (a cancellation of
        an unshielded write is).
        """
        if self._writing or self._writer_running:
            self._wake_writer()
            return
        fd = self._socket_fd()
        if fd >= 0:
            self._write_direct(fd)
        else:
            if not shielded:
                # If the reader's timer has fired meanwhile, let its
                # cancellation come now, with the bytes still in the core,
                # rather than in send_all, where it would look like a write
                # cut short.
                await checkpoint_if_cancelled()
            await self._write_rest(memoryview(self._core.data_to_send()), shielded=shielded)
        self._note_open()
        if self._writer_deferred or self._outbox or self._core.control_pending:
            self._writer_deferred = False
            self._wake_writer()

    def _write_direct(self, fd: int) -> None:
        """Write to a plain socket without waiting; the writer sends what it does not take."""
        data = self._core.data_to_send()  # never empty: every caller has just queued a frame
        if self._send_broken:
            return  # a write was cut short: a partial frame ends the stream
        if self._unsent is not None:
            self._unsent += data  # the writer has not sent the rest yet: keep the order
            self._wake_writer()
            return
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._transport_failed(exc, by_peer=False)
            return
        if sent < len(data):
            self._unsent = data[sent:]
            self._wake_writer()

    async def _write_rest(self, data: memoryview, *, shielded: bool) -> None:
        """One ``send_all`` from the calling task, judged by the write timeout."""
        if self._send_broken:
            return  # a write was cut short: a partial frame ends the stream
        now = trio.current_time()
        self._writing = True
        self._write_started = now
        self._send_broken = True
        self._rearm()  # while it blocks, the timer watches the write (not the PING due)
        try:
            if shielded:
                with trio.CancelScope(shield=True, deadline=now + self._write_timeout):
                    await self.stream.send_all(data)
                    self._send_broken = False
            else:
                await self.stream.send_all(data)
                self._send_broken = False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._transport_failed(exc, by_peer=False)
        finally:
            self._writing = False
            self._write_started = inf
        self._rearm()
        if self._send_broken and self._outcome is None:
            self._write_timed_out()

    def _socket_fd(self) -> int:
        """The descriptor of a plain TCP stream, for writes and reads without a task switch; else -1.

        -1 too once the socket is closed (a closed socket's descriptor may
        already belong to someone else: it is asked for afresh every time).
        """
        stream = self.stream
        if _DIRECT_IO and type(stream) is trio.SocketStream:
            return stream.socket.fileno()
        return -1

    async def _writer(self) -> None:
        """Send what is queued, round after round, until nothing is left; then end."""
        try:
            while self._wake_pending:
                self._wake_pending = False
                if await self._write_round():
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._transport_failed(exc, by_peer=False)
        finally:
            self._writer_running = False

    async def _write_round(self) -> bool:
        """Send what is queued; true once the stream is closed and the writer is done."""
        core = self._core
        if self._stand_back():
            return False
        self._end_a_long_flush()
        await self._let_the_burst_finish()
        if self._stand_back():
            return False
        now = trio.current_time()
        if core.state is State.OPEN:
            if core.ping_deadline <= now < core.abort_deadline:
                core.send_ping(now)
            outbox = self._outbox or deque()
            taken = batch = 0
            while outbox and batch < _BATCH_BYTES:
                message = outbox.popleft()
                core.send_data(message, now)
                batch += len(message)
                taken += 1
            if outbox:
                self._wake_pending = True  # more queued than one batch: go round again
            elif self._close_request is not None:
                self._apply_close(now)
            if taken and self._senders:
                self._senders.unpark(count=taken)
        # Woken just before a cancel (say the reader hit a protocol error right
        # after waking us): stop here, so that the CLOSE stays in the core for
        # _teardown instead of dying in a cancelled send_all.
        await checkpoint_if_cancelled()
        data = core.data_to_send()
        if self._unsent is not None:
            data, self._unsent = self._unsent + data, None  # the rest of a direct write
        if data and not await self._write(data):
            return True  # given up: the connection has ended
        self._note_open()
        if core.state in (State.CLOSED, State.ERROR) and not core.control_pending:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + _BEST_EFFORT_SECONDS):
                await self.stream.aclose()
            return True
        return False

    def _end_a_long_flush(self) -> None:
        if self._flush_deadline <= trio.current_time() and self._core.state is State.OPEN:
            self._apply_close(trio.current_time())  # the CLOSE goes ahead of what is left

    def _stand_back(self) -> bool:
        """True if another task is writing; it wakes the writer when it is done."""
        if self._writing:
            self._writer_deferred = True
            return True
        return False

    async def _write(self, data: bytes) -> bool:
        """One ``send_all`` from the writer, bounded by the write timeout.

        False if the write was given up, which ends the connection: a write
        that makes no progress for the write timeout convicts the peer (the
        reader's timer watches it too, but the reader may be gone), and last
        words get a short while at most.
        """
        # Last words (our answer to the peer's CLOSE) must not die in a send
        # cancelled by the block ending at the same moment: they go out
        # shielded.
        if self._send_broken:
            return False  # a write was cut short: a partial frame ends the stream
        last_words = self._core.state in (State.CLOSED, State.ERROR)
        now = trio.current_time()
        self._writing = True
        self._write_started = now
        self._send_broken = True
        self._rearm()
        try:
            with trio.CancelScope(
                shield=last_words,
                deadline=now + (_BEST_EFFORT_SECONDS if last_words else self._write_timeout),
            ):
                await self.stream.send_all(data)
                self._send_broken = False
        finally:
            self._writing = False
            self._write_started = inf
        self._rearm()
        if not self._send_broken:
            return True
        if not last_words:
            self._write_timed_out()
        return False

    async def _let_the_burst_finish(self) -> None:
        """Coalescing: while the application is still adding to the send queue,
        give it one more scheduling round before writing, so that a burst goes
        out in one ``send_all`` rather than one per message. Costs nothing in
        virtual time and one round (microseconds) for a lone message."""
        limit = self._options.send_queue
        queued = len(self._outbox or ())
        while 0 < queued < limit:
            await trio.lowlevel.checkpoint()
            if len(self._outbox or ()) <= queued:
                return
            queued = len(self._outbox or ())

    def _on_timer(self) -> bool:
        """The reader's timer fired: convict, or queue the PING that is due.

        True once the reader is done. A PING queued here goes out as the
        reader goes round again, inside its next timer scope (a plain socket),
        or through the writer (any other stream, whose write may block).
        """
        core = self._core
        now = trio.current_time()
        if self._send_broken and not self._writing:
            # A write was cut short by the timer: the stream is unusable,
            # whatever arrives now.
            if now >= core.abort_deadline:
                self._convict(now)
            else:
                self._write_timed_out()
            return True
        if self._writing and now >= self._write_started + self._write_timeout:
            self._write_timed_out()  # the writer's (or a ping()'s) write is stuck
            return True
        if now >= core.abort_deadline:
            self._convict(now)
            # A failure has cancelled everything, and the teardown sends the
            # CLOSE; a close timeout has ended the connection in order, and the
            # writer closes the stream.
            return True
        self._end_a_long_flush()
        if core.ping_deadline <= now and not self._writing and core.state is State.OPEN:
            core.send_ping(now)
            if self._socket_fd() < 0:
                # A write to this stream may block, and the reader must go
                # on reading meanwhile (the peer may be alive but not
                # reading): the writer sends it. A plain socket's write
                # never blocks the reader, which sends it as it goes round.
                self._wake_writer()
        return False

    def _convict(self, now: float) -> None:
        """Let the core act on its abort deadline and report how the connection ended."""
        core = self._core
        core.handle_timeout(now)
        while (event := core.next_event()) is not NEED_DATA:
            if type(event) is ConnectionEnded:
                self._notify(event)
                self._on_ended(event)

    def _write_timed_out(self) -> None:
        self._finish(
            _Outcome(
                HeartbeatTimeout,
                CloseCode.HEARTBEAT_TIMEOUT,
                "write timeout: the peer stopped reading",
                False,
                True,
            )
        )

    def _transport_failed(self, exc: BaseException, *, by_peer: bool) -> None:
        if self._outcome is None and self._core.state not in (State.CLOSED, State.ERROR):
            if not isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
                # An error of our own os.read or os.write: say it as the
                # stream would have, so that every transport reports alike.
                broken = trio.BrokenResourceError(f"socket connection broken: {exc}")
                broken.__cause__ = exc
                exc = broken
            self._finish(
                _Outcome(
                    BrokenConnection,
                    CloseCode.ABNORMAL_CLOSURE,
                    f"transport failed: {exc!r}",
                    by_peer,
                    True,
                    exc,
                )
            )

    def _note_open(self) -> None:
        # Our HELLO (a client's) is on the wire once OPEN with nothing left to
        # write: the caller's block may start, and whatever it does, the peer
        # has heard us.
        if self._opened.is_set():
            return
        if (
            self._core.state is State.OPEN
            and not self._writing
            and not self._core.control_pending
            and self._unsent is None
        ):
            self._opened.set()

    def _apply_close(self, now: float) -> None:
        assert self._close_request is not None
        code, reason = self._close_request
        self._core.close(code, reason, now=now)
        self._flush_deadline = inf
        self._rearm()

    # -- reading ------------------------------------------------------------------

    async def _reader(self) -> None:
        """The reader, which is also the watchdog: see the module docstring.

        It acts on what the core has, then reads more, inside a timer scope.
        The hot path of every heartbeat: kept to the fewest calls, awaits and
        frames. The timer may cut it short at any await; it picks up where it
        stopped (DATA it could not deliver is kept in ``_undelivered``).
        """
        core = self._core
        stream = self.stream
        direct = _DIRECT_IO and type(stream) is trio.SocketStream
        try:
            while True:
                self._timer_at = self._timer_deadline()
                self._timer = trio.CancelScope(deadline=self._timer_at)
                with self._timer:
                    while True:
                        # Answers first (a PONG, a PING the timer queued), even
                        # while the application holds us up: our heartbeat must
                        # keep flowing. (Left to the writer if it is at work.)
                        if core.control_pending:
                            await self._write_inline(shielded=False)
                        if self._undelivered is not None and await self._deliver_slowly():
                            return
                        while (event := core.next_event()) is not NEED_DATA:
                            if type(event) is DataReceived:
                                if self._outcome is not None:
                                    return  # the connection was finished meanwhile
                                if not self._deliver(event.data):
                                    self._undelivered = event.data
                                    break
                            elif self._handle_event(event):
                                return
                        if self._undelivered is not None or (
                            core.control_pending and not (self._writing or self._writer_running)
                        ):
                            continue  # deliver, or answer, before reading more
                        self._rearm()
                        if not self._opened.is_set():
                            self._note_open()
                        try:
                            if direct:
                                # A plain socket: wait for input, then read it
                                # ourselves. Three coroutines fewer than
                                # receive_some() for every idle connection to
                                # keep alive, and less work per read.
                                assert isinstance(stream, trio.SocketStream)
                                await wait_readable(stream.socket)
                                try:
                                    data = os.read(stream.socket.fileno(), _RECEIVE_SIZE)
                                except BlockingIOError:
                                    continue  # woken for nothing
                            else:
                                data = bytes(await stream.receive_some(_RECEIVE_SIZE))
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                            if core.state is not State.CLOSING:
                                self._transport_failed(exc, by_peer=True)
                                return
                            # Our close was under way and the peer hung up
                            # without its CLOSE, with a reset rather than a FIN,
                            # say. That ends the close as an EOF does: not
                            # cleanly, but not a failure of the block that
                            # closed either.
                            data = b""
                        core.receive_data(data, trio.current_time())
                if self._on_timer():
                    return
        except RemoteProtocolError as exc:
            logger.debug(
                "protocol error from peer %s: %s (close %d)", self.remote_address, exc, exc.code
            )
            self._finish(_Outcome(ConnectionClosed, exc.code, str(exc), False, True, exc))

    def _deliver(self, data: bytes) -> bool:
        """Queue received DATA for the application; false if the queue is full."""
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = deque()
        if len(inbox) >= self._options.receive_queue:
            return False
        inbox.append(data)
        if self._receivers:
            self._receivers.unpark()
        return True

    def _handle_event(self, event: Event) -> bool:
        """Act on an event other than DATA; true once the connection has ended."""
        kind = type(event)
        if kind is HandshakeComplete:
            self.opened_at = trio.current_time()
        if self._listeners:
            self._notify(event)
        if kind is PongReceived:
            assert isinstance(event, PongReceived)
            waiter = self._ping_waiters.get(event.opaque) if self._ping_waiters else None
            if waiter is not None and event.rtt is not None:
                if self._ping_results is None:
                    self._ping_results = {}
                self._ping_results[event.opaque] = event.rtt
                waiter.set()
        elif kind is ConnectionEnded:
            assert isinstance(event, ConnectionEnded)
            self._on_ended(event)
            return True
        return False

    async def _deliver_slowly(self) -> bool:
        """Wait for room for ``_undelivered``; true if the connection ended meanwhile.

        The application is not keeping up. Stop reading (TCP pushes back on
        the peer) and do not hold the resulting silence against the peer,
        until the DATA is delivered: the timer (our PINGs must keep flowing)
        does not count as reading again.
        """
        core = self._core
        core.pause_liveness(trio.current_time())  # kept from the first wait to delivery
        self._rearm()
        data = self._undelivered
        assert data is not None
        while not self._deliver(data):
            if self._outcome is not None:
                return True
            if self._receiving_stopped:
                break  # nobody will read it
            if self._room is None:
                self._room = ParkingLot()
            await self._room.park()
        self._undelivered = None
        core.resume_liveness(trio.current_time())
        self._rearm()
        return False

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
            self._wake_writer()  # it flushes our answering CLOSE, then closes the stream
        elif event.code == CloseCode.HEARTBEAT_TIMEOUT:
            self._finish(_Outcome(HeartbeatTimeout, event.code, event.reason, False, True))
        else:
            self._finish(_Outcome(BrokenConnection, event.code, event.reason, event.by_peer, True))

    def _notify(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(self, event)
            except Exception:
                logger.exception("event listener %r failed on %r", listener, event)

    # -- endings ------------------------------------------------------------------

    def _finish(self, outcome: _Outcome, *, cancel: bool | None = None) -> None:
        """Record how the connection ended; failures cancel everything.

        The first word wins: a later one (a write failing after an orderly
        close, say) neither replaces it nor cancels the caller's block.
        """
        if self._outcome is not None:
            return
        self._outcome = outcome
        # Everyone waiting on the queues finds out now.
        for lot in (self._senders, self._receivers, self._room):
            if lot:
                lot.unpark_all()
        # No PONG can come any more: a ping() waiting for one must raise now,
        # not when the block is left (an orderly close does not cancel it).
        for waiter in (self._ping_waiters or {}).values():
            waiter.set()
        if self._end_waiter is not None:
            reschedule(self._end_waiter)
            self._end_waiter = None
        if self._more_end_waiters:
            self._more_end_waiters.unpark_all()
        if outcome.failure if cancel is None else cancel:
            assert self._scope is not None  # failures come from the tasks, once started
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
            leftover = (self._unsent or b"") + self._core.data_to_send()
            if leftover and not self._send_broken and not self._writing:
                with (
                    trio.move_on_after(_BEST_EFFORT_SECONDS),
                    suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
                ):
                    await self.stream.send_all(leftover)
                    outcome = self._outcome
                    if outcome is not None and isinstance(outcome.cause, RemoteProtocolError):
                        await self._linger()
            await trio.aclose_forcefully(self.stream)

    async def _linger(self) -> None:
        """After the CLOSE for a peer's protocol error: end our side, discard what still comes.

        The peer broke the protocol mid-stream, so bytes of its may still be
        unread. Closing a TCP socket with unread input sends a reset, and a
        reset can destroy our CLOSE in the peer's receive buffer before the
        peer reads it: the one frame that says what went wrong. So send EOF
        and read until the peer's EOF (bounded by the caller), as HTTP
        servers do with a lingering close.
        """
        stream = self.stream
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        while await stream.receive_some(_RECEIVE_SIZE):
            pass


def open_stream_connection(
    stream: trio.abc.Stream,
    *,
    role: Role = Role.CLIENT,
    config: Config | None = None,
    options: ConnectionOptions | None = None,
    listeners: Sequence[EventListener] | None = None,
    remote_address: str | None = None,
) -> AbstractAsyncContextManager[Connection]:
    """Run THB/1 over a stream you already have, for as long as the ``async with`` block.

    >>> async def main(stream: trio.abc.Stream) -> None:  # doctest: +SKIP
    ...     async with open_stream_connection(stream) as conn:
    ...         await conn.send(b"hello")
    ...         print(await conn.receive())

    The handshake completes before the block is entered. Leaving the block
    closes the connection gracefully (CLOSE 1000; queued DATA gets
    ``close_timeout`` to go out, and the peer's answer as long again);
    leaving it with an exception sends CLOSE 1001 without waiting. The stream
    is always closed on the way out.

    If the connection fails, by a heartbeat timeout, a protocol error or a
    broken transport, the block is cancelled and exactly one
    :class:`ConnectionClosed` subclass is raised: :class:`HeartbeatTimeout`,
    :class:`BrokenConnection`, :class:`ConnectionRejected`, or
    :class:`ConnectionClosed` itself for a protocol error (with the
    :class:`RemoteProtocolError` as ``__cause__``). An orderly CLOSE from the
    peer does not cancel the block: :meth:`Connection.receive` reports it.

    Any :class:`trio.abc.Stream` will do whose ``receive_some`` keeps the
    data when it is cancelled (the watchdog's timer cancels it when a PING is
    due): Trio's socket, TLS and memory streams all do.
    """
    return _StreamConnection(stream, role, config, options, listeners, remote_address)


@final
class _StreamConnection:
    """What :func:`open_stream_connection` returns.

    A class rather than an ``@asynccontextmanager`` generator: a server holds
    one per connection, thousands of them, and a suspended generator with its
    frame and wrapper costs half a kilobyte more. It enters the connection's
    nursery in ``__aenter__`` and leaves it in ``__aexit__``, in the one task
    that runs the ``async with`` block, as Trio allows.
    """

    __slots__ = ("_args", "_body_error", "_conn", "_nursery_manager")

    def __init__(
        self,
        stream: trio.abc.Stream,
        role: Role,
        config: Config | None,
        options: ConnectionOptions | None,
        listeners: Sequence[EventListener] | None,
        remote_address: str | None,
    ) -> None:
        self._args: (
            tuple[
                trio.abc.Stream,
                Role,
                Config | None,
                ConnectionOptions | None,
                Sequence[EventListener] | None,
                str | None,
            ]
            | None
        ) = (stream, role, config, options, listeners, remote_address)
        self._conn: Connection | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._body_error: BaseException | None = None

    async def __aenter__(self) -> Connection:
        if self._args is None:
            raise RuntimeError("open_stream_connection() can be entered only once")
        stream, role, config, options, listeners, remote_address = self._args
        self._args = None
        try:
            options = options if options is not None else ConnectionOptions()
            detector = options.detector() if options.detector is not None else None
            core = HeartbeatProtocol(role, config, now=trio.current_time(), detector=detector)
            # A tuple is not copied again: a server's connections share one.
            conn = Connection(stream, core, options, tuple(listeners or ()), remote_address)
        except BaseException:
            # The stream is ours from the moment we are entered: closed on every path.
            await trio.aclose_forcefully(stream)
            raise
        self._conn = conn
        manager = self._nursery_manager = trio.open_nursery()
        nursery = await manager.__aenter__()
        # Cancelled on failure: the tasks and the caller's block at once.
        conn._scope = nursery.cancel_scope
        conn._nursery = nursery
        # The reader writes a server's HELLO, already queued, first.
        nursery.start_soon(conn._reader, name=_READER_NAME)
        try:
            await conn._opened.wait()
        except BaseException as exc:
            await self._leave(exc)
            raise  # the handshake did not end in order: _leave raised already
        conn._opened = _OPENED  # this one's job is done; spare its memory
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        conn = self._conn
        assert conn is not None
        assert conn._scope is not None
        if exc is None:
            try:
                conn._stop_receiving()
                await conn.aclose()
                # Both tasks end by themselves once the close is done; a
                # cancel now could cut off the CLOSE the writer is still
                # sending in answer to the peer's, so it only comes late.
                conn._scope.deadline = trio.current_time() + _BEST_EFFORT_SECONDS
            except BaseException as close_exc:
                exc = close_exc
        elif not only_cancelled(exc):
            self._body_error = exc
            conn._stop_receiving()
            conn.close_nowait(CloseCode.GOING_AWAY, type(exc).__name__, flush=False)
        return await self._leave(exc)

    async def _leave(self, exc: BaseException | None) -> bool:
        """Leave the nursery with ``exc``, close the stream, and report the outcome.

        Raises the one exception the caller is to see; returns true when
        ``exc`` is dealt with (the connection's own cancellation, absorbed
        by its scope).
        """
        conn = self._conn
        manager = self._nursery_manager
        assert conn is not None
        assert manager is not None
        # The block is over: no writer is started from now on (the nursery
        # closes as soon as its last task ends, and another task may still
        # send or close meanwhile). What is left goes out in the teardown.
        conn._nursery = None
        try:
            try:
                await manager.__aexit__(
                    None if exc is None else type(exc),
                    exc,
                    None if exc is None else exc.__traceback__,
                )
            except BaseExceptionGroup as group:
                # The watchdog may have cancelled the reader while the block
                # raised an error of its own: that error is the news.
                reraise_single(group, self._body_error)
        finally:
            conn._wrap_up()
            await conn._teardown()
        outcome = conn._outcome
        assert outcome is not None
        if outcome.failure and self._body_error is None:
            raise outcome.exception()
        return True
