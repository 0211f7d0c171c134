"""The write side of one connection: its send queue, and the one rule for who writes.

Theory of operation
-------------------
Everything a connection writes goes through its :class:`Writer`: DATA the
application queues with :meth:`Writer.send`, and the control frames the
protocol core queues (a PONG, a PING, a client's HELLO, a CLOSE).

**The single-writer rule.** At most one task writes to the stream at a time,
and only through :meth:`Writer.write_now` or the writer task: a write is under
way exactly while :attr:`Writer.writing` is true. A task that wants to write
while another is writing (or while the writer task is running, which may hold
bytes of its own) leaves its bytes in the core and asks for another round
with :meth:`Writer.wake`; whoever finishes a write and finds a round wanted
wakes the writer task, so nothing waits for a write that nobody will make.

* The reader and :meth:`~trio_heartbeat.Connection.ping` write *now*, from
  their own task, so that an answer costs no task switch. On a plain socket
  that write never waits: the socket takes what it takes
  (:func:`~trio_heartbeat._transport.write_nowait`) and the rest goes to the
  writer task. On any other stream it is one ``send_all``.
* The writer task is started when there is something the reader does not
  write itself (queued DATA, a close to flush or to answer, the rest of a
  direct write) and ends when nothing is left, so an idle connection keeps
  no task for it. Each round takes the queued DATA (up to a batch of 256
  KiB), asks the core for the bytes (control frames ahead of DATA) and writes
  them with one ``send_all``.

**The write deadline.** Every ``send_all`` is judged by the write timeout: a
write not done after that long convicts the peer as one that stopped
reading. The reader's timer watches the write under way (:attr:`write_deadline`);
a shielded write carries the deadline itself. A write cut short leaves a
partial frame on the stream, so after one nothing more is written
(:attr:`Writer.cut`).

**Closing.** :meth:`Writer.request_close` asks for a CLOSE: after the queued
DATA (for ``close_timeout`` at most, then ahead of what is left), or at once.
"""

from __future__ import annotations

from collections import deque
from contextlib import suppress
from math import inf
from typing import TYPE_CHECKING, Final, final

import trio
from trio.lowlevel import ParkingLot, checkpoint_if_cancelled

from ._errors import LocalProtocolError
from ._frames import CloseCode
from ._groups import forget_frames
from ._state import TERMINAL, State
from ._transport import linger, socket_fd, write_nowait

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["BEST_EFFORT_SECONDS", "Writer", "as_bytes"]

#: The writer stops collecting queued DATA for one ``send_all`` past this many bytes.
_BATCH_BYTES: Final = 256 * 1024
#: How long last words (a CLOSE when the connection is torn down, the answer to
#: the peer's CLOSE) may take to go out.
BEST_EFFORT_SECONDS: Final = 0.1
#: The writer task's name, shared by every connection (Trio would build a string per task).
_TASK_NAME: Final = "trio_heartbeat.Connection.writer"
_STREAM_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@final
class Writer:
    """The write side of a :class:`~trio_heartbeat.Connection`; see the module docstring."""

    __slots__ = (
        "_after_reader",
        "_again",
        "_bytes",
        "_close_request",
        "_excused",
        "_nursery",
        "_outbox",
        "_running",
        "_senders",
        "_since",
        "_timeout",
        "_unsent",
        "_watched",
        "cut",
        "flush_deadline",
    )

    def __init__(self, write_timeout: float) -> None:
        self._timeout = write_timeout
        # DATA waiting to be written, and tasks waiting for room in it; made on
        # first use: a server holds thousands of connections that only heartbeat.
        self._outbox: deque[bytes] | None = None
        self._bytes = 0  # in the outbox
        self._senders: ParkingLot | None = None
        # Where the writer task is started; None once the block is over.
        self._nursery: trio.Nursery | None = None
        self._running = False
        # A round is wanted: the task goes round again, or is started for it.
        self._again = False
        # When the write under way began; inf while nobody writes.
        self._since = inf
        # The scope of a write under way that the reader's timer watches (it
        # has no deadline of its own: the reader tells our stalls apart).
        self._watched: trio.CancelScope | None = None
        self._after_reader = False  # the reader is done: writes bound themselves
        self._excused = False  # the write under way was given its time again
        # The part of a direct write the socket did not take; the task sends it.
        self._unsent: bytes | None = None
        self._close_request: tuple[int, str] | None = None
        #: While a close waits for the queued DATA: when it stops waiting (else inf).
        self.flush_deadline = inf
        #: A write was cut short: a partial frame ends the stream, nothing more is written.
        self.cut = False

    def start(self, nursery: trio.Nursery | None) -> None:
        """Start writer tasks in ``nursery`` from now on; ``None`` once the block is over."""
        self._nursery = nursery

    # -- facts -------------------------------------------------------------------

    @property
    def writing(self) -> bool:
        """True while a write is under way (by any task)."""
        return self._since != inf

    @property
    def write_deadline(self) -> float:
        """When the write under way must be done (``inf`` while nobody writes)."""
        return self._since + self._timeout

    @property
    def since(self) -> float:
        """When the write under way began (``inf`` while nobody writes)."""
        return self._since

    def excuse_stall(self, now: float) -> None:
        """Our own loop was stalled: the write under way gets its whole time again from ``now``
        (once: a write that stalls on and on behind our stalls is the peer's after all)."""
        if self._since != inf and not self._excused:
            self._since = now
            self._excused = True

    def unwatched(self) -> None:
        """The reader is done: a write under way is bounded by its own deadline from now on."""
        self._after_reader = True
        if self._watched is not None:
            self._watched.deadline = self.write_deadline

    @property
    def idle(self) -> bool:
        """Nothing is being written, and nothing of a direct write is left over."""
        return self._since == inf and self._unsent is None

    @property
    def queued(self) -> int:
        """DATA messages waiting to be written."""
        return len(self._outbox or ())

    @property
    def close_request(self) -> tuple[int, str] | None:
        """The close asked for (code and reason), or ``None``."""
        return self._close_request

    # -- the application's side ------------------------------------------------------

    async def send(self, conn: Connection, data: bytes) -> None:
        """Queue ``data``; wait while the send queue is full. See :meth:`Connection.send`."""
        self._check_can_send(conn, data)
        await checkpoint_if_cancelled()
        while self._full(conn, len(data)):
            if self._senders is None:
                self._senders = ParkingLot()
            await self._senders.park()
            self._check_can_send(conn, data)
        self._queue(conn, data)

    def send_nowait(self, conn: Connection, data: bytes) -> None:
        """Queue ``data``, or raise :class:`trio.WouldBlock` when the send queue is full."""
        self._check_can_send(conn, data)
        if self._full(conn, len(data)):
            raise trio.WouldBlock
        self._queue(conn, data)

    def _full(self, conn: Connection, size: int) -> bool:
        # Full at either bound; an empty queue takes any message.
        if not self._outbox:
            return False
        options = conn._options
        return (
            len(self._outbox) >= options.send_queue or self._bytes + size > options.send_queue_bytes
        )

    def _queue(self, conn: Connection, data: bytes) -> None:
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        outbox.append(data)
        self._bytes += len(data)
        conn._hold(len(data))
        self.wake(conn)

    def _check_can_send(self, conn: Connection, data: bytes) -> None:
        core = conn._core
        if (
            core.state is not State.OPEN
            or self._close_request is not None
            or conn._outcome is not None
        ):
            raise conn._closed_error()
        assert core.peer is not None
        if len(data) > core.peer.max_frame:
            raise LocalProtocolError(
                f"DATA of {len(data)} bytes exceeds the peer's limit of {core.peer.max_frame}",
                CloseCode.TOO_BIG,
            )

    def request_close(self, conn: Connection, code: int, reason: str, *, flush: bool) -> None:
        """Close: after the queued DATA (``close_timeout`` at most), or at once.

        Senders waiting for room raise now. Only the first request counts.
        """
        if self._close_request is not None:
            return
        self._close_request = (code, reason)
        if self._senders:
            self._senders.unpark_all()  # they will not get room: they raise now
        now = trio.current_time()
        if flush:
            self.flush_deadline = now + conn._core.config.close_timeout
            conn._reader.rearm(conn)
        else:
            self._apply_close(conn, now)
        self.wake(conn)

    def end_long_flush(self, conn: Connection, now: float) -> None:
        """The flush deadline has passed: the CLOSE goes ahead of the DATA still queued."""
        if self.flush_deadline <= now and conn._core.state is State.OPEN:
            self._apply_close(conn, now)

    def _apply_close(self, conn: Connection, now: float) -> None:
        assert self._close_request is not None
        code, reason = self._close_request
        conn._core.close(code, reason, now=now)
        self.flush_deadline = inf
        conn._reader.rearm(conn)

    def take_unsent(self) -> list[bytes]:
        """The queued DATA messages no write has taken yet, oldest first; the queue is left empty."""
        outbox, self._outbox = self._outbox, None
        self._bytes = 0
        return list(outbox or ())

    def ended(self) -> None:
        """The connection has ended: senders waiting for room find out now."""
        if self._senders:
            self._senders.unpark_all()

    # -- writing -------------------------------------------------------------------

    def wake(self, conn: Connection) -> None:
        """Ask for a round of the writer task, starting it if nobody is writing."""
        self._again = True
        if self._running or self._since != inf or self._nursery is None:
            return  # the task goes round again, or whoever writes wakes it
        self._running = True
        self._nursery.start_soon(self._run, conn, name=_TASK_NAME)

    async def write_now(self, conn: Connection, *, shielded: bool) -> None:
        """Write what the core has queued from the calling task, unless another writes.

        Used by the reader (PONGs, PINGs, a client's HELLO) and by
        :meth:`Connection.ping`. On a plain socket this never waits; elsewhere
        it is one ``send_all``, shielded from the caller's cancellation and
        bounded by the write timeout if ``shielded``. Failures are recorded,
        never raised (a cancellation of an unshielded write is).
        """
        if self._running or self._since != inf:
            self.wake(conn)
            return
        core = conn._core
        fd = socket_fd(conn.stream)
        if fd >= 0:
            self._write_direct(conn, fd, core.data_to_send())
        else:
            if not shielded:
                # If the reader's timer has fired meanwhile, let its
                # cancellation come now, with the bytes still in the core,
                # rather than in send_all, where it would look like a write
                # cut short.
                await checkpoint_if_cancelled()
            deadline = trio.current_time() + self._timeout if shielded else inf
            await self._send_all(conn, core.data_to_send(), shield=shielded, deadline=deadline)
        conn._note_open()
        if self._again or self._outbox or core.control_pending:
            self.wake(conn)

    def _write_direct(self, conn: Connection, fd: int, data: bytes) -> None:
        # Every caller has just queued a frame, so data is never empty.
        if self.cut:
            return  # a write was cut short: a partial frame ends the stream
        if self._unsent is not None:
            self._unsent += data  # the task has not sent the rest yet: keep the order
            self.wake(conn)
            return
        try:
            sent = write_nowait(fd, data)
        except _STREAM_ERRORS as exc:
            conn._transport_failed(exc, by_peer=False)
            return
        if sent < len(data):
            self._unsent = data[sent:]
            self.wake(conn)

    async def _send_all(
        self, conn: Connection, data: bytes, *, shield: bool, deadline: float
    ) -> bool:
        """One ``send_all``: the only place bytes reach the stream but a direct write.

        False if it was given up, which ends the connection: cut short by its
        deadline (the peer stopped reading) or by a transport failure.
        """
        if self.cut:
            return False
        self._since = trio.current_time()
        self._excused = False
        self.cut = True  # until send_all returns: a cancellation leaves it set
        reader = conn._reader
        reader.rearm(conn)  # while it blocks, the timer watches the write, not the PING due
        if deadline == inf and self._after_reader:
            deadline = self.write_deadline
        scope = trio.CancelScope(shield=shield, deadline=deadline)
        if deadline == inf:
            self._watched = scope
        try:
            with scope:
                await conn.stream.send_all(data)
                self.cut = False
        except _STREAM_ERRORS as exc:
            conn._transport_failed(exc, by_peer=False)
        finally:
            self._since = inf
            self._watched = None
        reader.rearm(conn)
        if self.cut:
            conn._write_timed_out()  # the first word wins: nothing if already ended
        return not self.cut

    async def _run(self, conn: Connection) -> None:
        """The writer task: round after round, while a round is wanted and nobody else writes."""
        try:
            while self._again and self._since == inf:
                self._again = False
                if await self._round(conn):
                    return
        except _STREAM_ERRORS as exc:
            conn._transport_failed(exc, by_peer=False)
        except BaseException as exc:
            forget_frames(exc)
            raise
        finally:
            self._running = False
            del self, conn  # see forget_frames

    async def _round(self, conn: Connection) -> bool:
        """Send what is queued; true once the writer is done for good."""
        core = conn._core
        self.end_long_flush(conn, trio.current_time())
        # Nobody else writes meanwhile: while this task runs, write_now() only
        # wakes it (the single-writer rule).
        await self._let_the_burst_finish(conn._options.send_queue)
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
            self._bytes -= batch
            conn._free(batch)
            if outbox:
                self._again = True  # more queued than one batch: go round again
            elif self._close_request is not None:
                self._apply_close(conn, now)
            if taken and self._senders:
                self._senders.unpark(count=taken)
        # Woken just before a cancel (say the reader hit a protocol error right
        # after waking us): stop here, so that the CLOSE stays in the core for
        # the last words instead of dying in a cancelled send_all.
        await checkpoint_if_cancelled()
        data = core.data_to_send()
        if self._unsent is not None:
            data, self._unsent = self._unsent + data, None  # the rest of a direct write
        if data:
            # Last words (our answer to the peer's CLOSE) must not die in a send
            # cancelled by the block ending at the same moment: they go out
            # shielded, for a short while at most.
            # Other writes are watched by the reader's timer (write_deadline),
            # which knows a stall of our own loop from a peer that stopped reading.
            last_words = core.state in TERMINAL
            deadline = now + BEST_EFFORT_SECONDS if last_words else inf
            if not await self._send_all(conn, data, shield=last_words, deadline=deadline):
                return True
        conn._note_open()
        if core.state in TERMINAL and not core.control_pending:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + BEST_EFFORT_SECONDS):
                await conn.stream.aclose()
            return True
        return False

    async def _let_the_burst_finish(self, limit: int) -> None:
        """Coalescing: while the application is still adding to the send queue,
        give it one more scheduling round before writing, so that a burst goes
        out in one ``send_all`` rather than one per message. Costs nothing in
        virtual time and one round (microseconds) for a lone message."""
        queued = len(self._outbox or ())
        while 0 < queued < limit:
            await trio.lowlevel.checkpoint()
            if len(self._outbox or ()) <= queued:
                return
            queued = len(self._outbox or ())

    async def last_words(self, conn: Connection, *, linger_after: bool) -> None:
        """Best effort for what is still unwritten (a CLOSE the core queued), then close the stream.

        Shielded, and bounded by a short while. With ``linger_after`` (the
        CLOSE is for the peer's protocol error) it lingers before closing, so
        that a reset cannot destroy the CLOSE unread.
        """
        with trio.CancelScope(shield=True):
            leftover = (self._unsent or b"") + conn._core.data_to_send()
            self._unsent = None
            if leftover and not self.cut and self._since == inf:
                with (
                    trio.move_on_after(BEST_EFFORT_SECONDS),
                    suppress(*_STREAM_ERRORS),
                ):
                    await conn.stream.send_all(leftover)
                    if linger_after:
                        await linger(conn.stream)
            await trio.aclose_forcefully(conn.stream)


def as_bytes(data: object) -> bytes:
    """``data`` as a message, checked at the call (not later, in a task): a str is the usual slip."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"a message must be bytes, not {type(data).__name__}")
