"""The read side of one connection: the reader task, which is also the watchdog.

Theory of operation
-------------------
The :class:`Reader` runs one task for the whole life of a connection. It
reads inside a timer cancel scope, and the timer is the watchdog: its deadline
is the earliest of the core's PING deadline, its abort deadline (the handshake
deadline, then the failure detector's verdict on a silent peer, then the close
timeout), a close's flush deadline and, while a write is under way, the write
deadline. Every received frame and every write moves it (:meth:`Reader.rearm`).

It feeds received bytes to the sans-IO core and hands out the events: DATA
into the bounded inbound queue that :meth:`Reader.receive` takes from, every
other event to the connection (:meth:`Connection._dispatch`). Control frames
the core queues in answer (a PONG, a client's HELLO) it writes itself, ahead
of everything else, through :meth:`Writer.write_now`. When the timer fires it
queues the PING that is due, or convicts: the core ends the connection and
the connection cancels its whole scope, so the tasks and the caller's block
all unwind at once. Trio wakes a task for its input before it expires
deadlines, so a frame that arrived before a stall of our own event loop is
read before the verdict: the peer is not convicted for our lateness.

Our own stalls are not the peer's silence. Each time the timer fires, how
late it fired is reported to the run's :class:`~trio_heartbeat.LocalHealth`
(``_local_health``). A timer that fires a stall late (our process was stopped,
our loop blocked) restarts the silence clock instead of convicting: the
peer's frames that waited in the socket are read first, and a peer that
really died is convicted one verdict later. Once per silence: if the next
verdict is late again with nothing heard, the conviction says "we were
stalled". A peer one and a half send intervals overdue is SUSPECT
(:class:`~trio_heartbeat.PeerSuspected`, reported to the listeners) until its
next frame (:class:`~trio_heartbeat.PeerRecovered`).

A slow *application* must not make a healthy *peer* look dead, nor blind us
to a dead one. When the inbound queue is full the reader goes on reading,
holding the DATA that arrives in a reserve of as many bytes again
(``receive_queue_bytes``, each message counted with :data:`HELD_OVERHEAD`
bytes more), so the peer's PINGs and PONGs are still heard and answered. Only
when the reserve is full too does it stop reading (backpressure reaches the
peer through TCP) and tell the core, which then holds the peer to its
configured timeout alone: past it, nothing heard, the conviction says "we were
stalled". The timeout bounds detection whatever the application does.

On a plain socket it waits with :func:`trio.lowlevel.wait_readable` and reads
with :func:`~trio_heartbeat._transport.read_nowait`; on other streams it uses
``receive_some``, which must keep its data when cancelled (the timer cancels
it whenever a PING falls due), as Trio's own streams do.
"""

from __future__ import annotations

import logging
from collections import deque
from math import inf
from typing import TYPE_CHECKING, final

import trio
from trio.lowlevel import ParkingLot, checkpoint_if_cancelled, wait_readable

from ._errors import RemoteProtocolError
from ._events import (
    NEED_DATA,
    ConnectionEnded,
    DataReceived,
    Liveness,
    PeerRecovered,
    PeerSuspected,
)
from ._groups import forget_frames
from ._local_health import LocalHealth, local_health
from ._state import State
from ._transport import RECEIVE_SIZE, read_nowait, socket_fd

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["Reader"]

logger = logging.getLogger("trio_heartbeat")

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

#: While a write is stuck or the peer is SUSPECT, the timer also fires this often, so that a
#: stall of ours shows as a late firing before any verdict (a verdict's own firing can be
#: late by less than a stall, after a stall that began long before it).
PULSE = 0.25

#: Bytes each message in the reserve counts for beyond its payload (its object and slot),
#: so that a flood of tiny messages is bounded as surely as one of big ones.
HELD_OVERHEAD = 64


@final
class Reader:
    """The read side of a :class:`~trio_heartbeat.Connection`; see the module docstring."""

    __slots__ = (
        "_bytes",
        "_counted",
        "_excused",
        "_fired_at",
        "_health",
        "_held",
        "_held_bytes",
        "_inbox",
        "_receivers",
        "_room",
        "_stopped",
        "_suspect",
        "_timer",
        "_timer_at",
        "_undelivered",
    )

    def __init__(self) -> None:
        # DATA waiting for the application, tasks waiting for it, and the
        # reader itself waiting for room: made on first use.
        self._inbox: deque[bytes] | None = None
        self._bytes = 0  # in the inbox
        self._counted = 0  # held outside it: see _count_pending
        self._receivers: ParkingLot | None = None
        self._room: ParkingLot | None = None
        # DATA that came while the queue was full (the reserve), and its bytes
        # with HELD_OVERHEAD each.
        self._held: deque[bytes] | None = None
        self._held_bytes = 0
        # The caller's block is over: DATA that finds the queue full is dropped.
        self._stopped = False
        # DATA the reader holds while the application's queue is full.
        self._undelivered: bytes | None = None
        # The watchdog: the timer scope the reader reads in, and its deadline
        # (kept here to spare Trio's property on the per-frame path).
        self._timer = trio.CancelScope()
        self._timer_at = inf
        # Our loop's punctuality (the run's, set when the task starts); when
        # the timer last fired; the last frame's time when we last excused a
        # stall of ours, and when the peer became SUSPECT (None: it is not).
        self._health: LocalHealth | None = None
        self._fired_at = -inf
        self._excused: float | None = None
        self._suspect: float | None = None

    @property
    def queued(self) -> int:
        """DATA messages waiting for the application (the reserve included)."""
        return len(self._inbox or ()) + len(self._held or ())

    @property
    def liveness(self) -> Liveness:
        """SUSPECT while the peer is overdue, else ALIVE."""
        return Liveness.ALIVE if self._suspect is None else Liveness.SUSPECT

    # -- the application's side ------------------------------------------------------

    async def receive(self, conn: Connection) -> bytes:
        """The next DATA payload; see :meth:`Connection.receive`."""
        await checkpoint_if_cancelled()
        while not (inbox := self._inbox):
            outcome = conn._outcome
            if outcome is not None:
                raise outcome.exception()
            if self._receivers is None:
                self._receivers = ParkingLot()
            await self._receivers.park()
        return self._take(conn, inbox)

    def _take(self, conn: Connection, inbox: deque[bytes]) -> bytes:
        data = inbox.popleft()
        self._bytes -= len(data)
        conn._free(len(data))
        if self._held:
            self._refill(conn, inbox)
        if self._room:
            self._room.unpark()  # the reader was waiting for this room
        return data

    def receive_nowait(self, conn: Connection) -> bytes:
        """The next DATA payload if one is waiting; see :meth:`Connection.receive_nowait`."""
        inbox = self._inbox
        if not inbox:
            outcome = conn._outcome
            if outcome is not None:
                raise outcome.exception()
            raise trio.WouldBlock
        return self._take(conn, inbox)

    def stop_receiving(self) -> None:
        """The caller's block is over: DATA that finds the queue full is dropped.

        Otherwise the peer's CLOSE, which may sit behind DATA nobody will read,
        could not get through, and every close would end at the close timeout.
        What is already queued stays readable.
        """
        self._stopped = True
        if self._room:
            self._room.unpark_all()

    def drop(self) -> None:
        """Let go of the received DATA nobody took (the connection was cut off)."""
        self._inbox = self._held = None
        self._undelivered = None
        self._bytes = self._held_bytes = 0

    def ended(self) -> None:
        """The connection has ended: receivers, and the reader waiting for room, find out now."""
        for lot in (self._receivers, self._room):
            if lot:
                lot.unpark_all()

    # -- the watchdog ---------------------------------------------------------------

    def _deadline(self, conn: Connection) -> float:
        """When the timer must fire: a PING due, a verdict due, a flush over, a write too slow."""
        core = conn._core
        writer = conn._writer
        if writer.writing:
            # No PING can go out before the write is over. (A write of the reader's
            # own is cancelled by this timer: no pulse for it.)
            deadline = min(core.abort_deadline, writer.write_deadline)
            if writer._running:
                deadline = min(deadline, max(self._fired_at, writer.since) + PULSE)
            return deadline
        deadline = core.next_deadline
        if core.state is State.OPEN:
            if self._suspect is None:
                deadline = min(deadline, core.silence.suspect_deadline)
            else:
                deadline = min(deadline, self._fired_at + PULSE)
        flush = writer.flush_deadline
        if flush == inf:
            return deadline  # the per-frame case: no flush to bound
        return min(deadline, flush)

    def rearm(self, conn: Connection) -> None:
        """Move the timer to ``conn``'s current deadlines (after frames, writes, settings)."""
        deadline = self._deadline(conn)
        if deadline != self._timer_at:
            self._timer.deadline = self._timer_at = deadline

    # -- the task ---------------------------------------------------------------------

    async def run(self, conn: Connection) -> None:
        """The reader, which is also the watchdog: see the module docstring.

        It acts on what the core has, then reads more, inside a timer scope.
        The hot path of every heartbeat: kept to the fewest calls, awaits and
        frames. The timer may cut it short at any await; it picks up where it
        stopped (DATA it could not deliver is kept in ``_undelivered``).
        """
        core = conn._core
        writer = conn._writer
        stream = conn.stream
        direct = socket_fd(stream) >= 0
        self._health = local_health()
        try:
            while True:
                self._timer_at = self._deadline(conn)
                self._timer = trio.CancelScope(deadline=self._timer_at)
                with self._timer:
                    while True:
                        # Answers first (a PONG, a PING the timer queued), even
                        # while the application holds us up: our heartbeat must
                        # keep flowing. (Left to the writer if it is at work.)
                        if core.control_pending:
                            await writer.write_now(conn, shielded=False)
                        if self._undelivered is not None and await self._deliver_slowly(conn):
                            return
                        while (event := core.next_event()) is not NEED_DATA:
                            if type(event) is DataReceived:
                                if conn._outcome is not None:
                                    return  # the connection was finished meanwhile
                                if not self._deliver(conn, event.data):
                                    self._undelivered = event.data
                                    break
                            elif conn._dispatch(event):
                                return
                        if self._undelivered is not None or (
                            core.control_pending and not (writer.writing or writer._running)
                        ):
                            continue  # deliver, or answer, before reading more
                        if self._counted or core.receiving:
                            self._count_pending(conn)
                        if self._suspect is not None and core.last_received != self._suspect:
                            self._recovered(conn)
                        self.rearm(conn)
                        conn._note_open()
                        try:
                            if direct:
                                # A plain socket: wait for input, then read it
                                # ourselves. Three coroutines fewer than
                                # receive_some() for every idle connection to
                                # keep alive, and less work per read.
                                assert isinstance(stream, trio.SocketStream)
                                await wait_readable(stream.socket)
                                data = read_nowait(stream.socket.fileno())
                                if data is None:
                                    continue  # woken for nothing
                            else:
                                data = bytes(await stream.receive_some(RECEIVE_SIZE))
                        except _STREAM_ERRORS as exc:
                            if core.state is not State.CLOSING:
                                conn._transport_failed(exc, by_peer=True)
                                return
                            # Our close was under way and the peer hung up
                            # without its CLOSE, with a reset rather than a FIN,
                            # say. That ends the close as an EOF does: not
                            # cleanly, but not a failure of the block that
                            # closed either.
                            data = b""
                        core.receive_data(data, trio.current_time())
                if self._on_timer(conn):
                    return
        except RemoteProtocolError as exc:
            logger.debug(
                "protocol error from peer %s: %s (close %d)", conn.remote_address, exc, exc.code
            )
            conn._protocol_error(exc)
        except BaseException as exc:
            forget_frames(exc)
            raise
        finally:
            writer.unwatched()  # nobody watches its write any more
            del self, conn, core, writer, stream  # see forget_frames

    def _deliver(self, conn: Connection, data: bytes) -> bool:
        """Queue received DATA for the application, or hold it in the reserve while the
        queue is full; false if the reserve is full too.

        Full at either bound, messages or bytes; an empty queue takes any message.
        """
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = deque()
        elif inbox:
            options = conn._options
            if (
                self._held
                or len(inbox) >= options.receive_queue
                or self._bytes + len(data) > options.receive_queue_bytes
            ):
                return self._hold(conn, data)
        inbox.append(data)
        self._bytes += len(data)
        conn._hold(len(data))
        if self._receivers:
            self._receivers.unpark()
        return True

    def _hold(self, conn: Connection, data: bytes) -> bool:
        """Keep DATA in the reserve while the queue is full; false if the reserve is full too
        (or nobody will read it: the caller's block is over). A shared budget counts it
        with its overhead, as the reserve does."""
        size = len(data) + HELD_OVERHEAD
        if self._stopped or self._held_bytes + size > conn._options.receive_queue_bytes:
            return False
        held = self._held
        if held is None:
            held = self._held = deque()
        held.append(data)
        self._held_bytes += size
        conn._hold(size)
        return True

    def _refill(self, conn: Connection, inbox: deque[bytes]) -> None:
        # The application took a message: the reserve moves up into the queue,
        # oldest first, as far as the queue's bounds allow. (Counted against a
        # budget when it arrived: in the queue, only its payload counts.)
        held = self._held
        assert held is not None
        options = conn._options
        while held and (
            not inbox
            or (
                len(inbox) < options.receive_queue
                and self._bytes + len(held[0]) <= options.receive_queue_bytes
            )
        ):
            data = held.popleft()
            self._held_bytes -= len(data) + HELD_OVERHEAD
            conn._free(HELD_OVERHEAD)
            inbox.append(data)
            self._bytes += len(data)

    async def _deliver_slowly(self, conn: Connection) -> bool:
        """Wait for room for ``_undelivered``; true if the connection ended meanwhile.

        The application is not keeping up, and the reserve is full. Stop
        reading (TCP pushes back on the peer) and tell the core, which holds
        the peer to its timeout alone until the DATA is delivered: the timer
        (our PINGs must keep flowing) does not count as reading again.
        """
        core = conn._core
        core.pause_liveness(trio.current_time())  # kept from the first wait to delivery
        self.rearm(conn)
        data = self._undelivered
        assert data is not None
        self._count_pending(conn)
        while conn._outcome is None and not self._deliver(conn, data):
            if self._stopped:
                break  # nobody will read it
            if self._room is None:
                self._room = ParkingLot()
            await self._room.park()
        if conn._outcome is not None:
            # Ended meanwhile: the DATA we hold is not delivered. (Cut off, the
            # connection has dropped its queue: put into it now, the DATA
            # would come back, and count against the budget again.)
            return True
        self._undelivered = None
        self._count_pending(conn)  # it counts in the inbox now (for a moment, twice)
        core.resume_liveness(trio.current_time())
        self.rearm(conn)
        return False

    def _count_pending(self, conn: Connection) -> None:
        # What we hold outside the inbox counts against a shared budget as the
        # queues do: a frame still arriving (up to max_frame: a peer that
        # sends all but its last byte would hold it for free) and the DATA
        # waiting for room.
        if conn._outcome is not None:
            return  # ended: it holds nothing any more (the budget has let go of it)
        pending = conn._core.receiving
        if self._undelivered is not None:
            pending += len(self._undelivered)
        change = pending - self._counted
        self._counted = pending
        if change > 0:
            conn._hold(change)
        elif change < 0:
            conn._free(-change)

    def _on_timer(self, conn: Connection) -> bool:
        """The timer fired: convict, or queue the PING that is due; true once the reader is done.

        A PING queued here goes out as the reader goes round again, inside its
        next timer scope (a plain socket), or through the writer task (any
        other stream, whose write may block).
        """
        core = conn._core
        writer = conn._writer
        now = trio.current_time()
        health = self._health
        assert health is not None
        # How late we are: from the deadline, or from the last firing if the
        # timer was set to a moment already past. A stall is half a second late,
        # or half the peer's send interval if that is shorter.
        scheduled = max(self._timer_at, self._fired_at)
        stalled = health.timer_fired(scheduled, now, stall=core.peer_send_interval / 2)
        self._fired_at = now
        core.silence.stretch = health.multiplier(now)
        if stalled:
            writer.excuse_stall(now)  # nor is our stall the peer's slowness to read
        if writer.cut and not writer.writing:
            # A write was cut short by the timer: the stream is unusable,
            # whatever arrives now.
            if now >= core.abort_deadline:
                self._convict(conn, now, stalled)
            else:
                conn._write_timed_out()
            return True
        if writer.writing and now >= writer.write_deadline:
            conn._write_timed_out()  # the writer's (or a ping()'s) write is stuck
            return True
        if (
            stalled
            and core.state is State.OPEN
            and self._undelivered is None  # reading (else only the timeout applies)
            and core.last_received != self._excused
        ):
            # Our loop was away (once per silence): the silence restarts from now.
            core.pause_liveness(self._timer_at)
            core.resume_liveness(now)
            self._excused = core.last_received
        if now >= core.abort_deadline:
            # Frames waiting: take them in first, then judge again. (Not past the
            # reserve: we are not reading, and would pull in a flood without bound.)
            if self._undelivered is None and self._heard_meanwhile(conn, now):
                return False
            # Not reading (the reserve is full), we cannot hear the peer: ours is the fault.
            self._convict(conn, now, stalled or self._undelivered is not None)
            # A failure has cancelled everything, and the last words carry the
            # CLOSE; a close timeout has ended the connection in order, and the
            # writer closes the stream.
            return True
        if self._suspect is None and core.state is State.OPEN:
            silence = core.silence
            if now >= silence.suspect_deadline and not self._heard_meanwhile(conn, now):
                self._suspected(conn, now)
        writer.end_long_flush(conn, now)
        if core.ping_deadline <= now and not writer.writing and core.state is State.OPEN:
            core.send_ping(now)
            if socket_fd(conn.stream) < 0:
                # A write to this stream may block, and the reader must go on
                # reading meanwhile (the peer may be alive but not reading): the
                # writer sends it. A plain socket's write never blocks the
                # reader, which sends it as it goes round.
                writer.wake(conn)
        return False

    def _heard_meanwhile(self, conn: Connection, now: float) -> bool:
        """Read what is already waiting on a plain socket; true if anything was.

        After a stall of our own (a blocked event loop, a stopped process),
        the operating system may hand Trio the expired deadline before the
        input that arrived in time, so the peer's frames, or its verdict on
        us, are still in the socket. They are heard before anyone is judged.
        """
        fd = socket_fd(conn.stream)
        if fd < 0:
            return False
        try:
            data = read_nowait(fd)
        except _STREAM_ERRORS:
            return False  # judged as it stands; the reader finds the failure next
        if data is None:
            return False
        conn._core.receive_data(data, now)
        return True

    def _suspected(self, conn: Connection, now: float) -> None:
        """The peer is overdue: SUSPECT until its next frame (the listeners hear of both)."""
        core = conn._core
        last = core.last_received
        assert last is not None
        self._suspect = last
        conn._dispatch(PeerSuspected(now - last, core.silence.suspicion(now)))

    def _recovered(self, conn: Connection) -> None:
        suspect = self._suspect
        last = conn._core.last_received
        assert suspect is not None
        assert last is not None
        self._suspect = None
        conn._dispatch(PeerRecovered(last - suspect))

    def _convict(self, conn: Connection, now: float, stalled: bool) -> None:
        """Let the core act on its abort deadline, and report how the connection ended."""
        core = conn._core
        core.handle_timeout(now, stalled=stalled)
        while (event := core.next_event()) is not NEED_DATA:
            if type(event) is ConnectionEnded:
                conn._dispatch(event)
