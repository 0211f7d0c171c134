"""A wire: the two links of one fault-injected connection, timed by Trio's clock.

Theory of operation
-------------------

A link is one direction of a wire: a bounded queue of timestamped chunks. The
sending end stamps each chunk with the moment it may be read: now, plus the
time its bytes take to cross at the throughput limit, plus the delay and a
seeded jitter, but never earlier than the chunk before it, so order is kept
whatever the jitter. The receiving end takes the chunks whose moment has come.
Every wait is a Trio wait on Trio's clock, so under
``trio.testing.MockClock(autojump_threshold=0)`` each byte arrives at an exact
virtual time and no test sleeps for real. A link reads its
:class:`~trio_heartbeat.testing.LinkFaults` afresh each time it acts; the wire
applies the terminal events, reset and half-open, by setting for good the
*fate* of each link's sending and receiving end.

Nothing is buffered without bound: a link holds at most ``buffer_size`` bytes
(sent, not yet read), and a sender facing a full link waits, as a TCP sender
does when the window is full. A wire runs no tasks: the streams at its ends
(``_streams``) and the pumps (``_pumps``) call into it.
"""

from __future__ import annotations

import enum
import math
import operator
from collections import deque
from collections.abc import Callable
from typing import Literal

import trio

from ._faults import (
    ByteCounters,
    Faults,
    FaultStatistics,
    LinkFaults,
    Side,
    attach_link,
    attach_wire,
)

__all__ = ["DEFAULT_BUFFER_SIZE"]

#: Bytes that one direction of one connection holds (sent, not yet read) before
#: the sender has to wait.
DEFAULT_BUFFER_SIZE = 65536


class _SenderFate(enum.Enum):
    OPEN = enum.auto()
    SWALLOW = enum.auto()  # half-open: sends succeed and vanish
    BROKEN = enum.auto()


class _ReceiverFate(enum.Enum):
    OPEN = enum.auto()
    BLOCK = enum.auto()  # half-open survivor: nothing will ever come
    EOF = enum.auto()
    BROKEN = enum.auto()


class _Chunk:
    __slots__ = ("data", "deliver_at", "start")

    def __init__(self, data: bytes, deliver_at: float) -> None:
        self.data = data
        self.deliver_at = deliver_at
        self.start = 0  # bytes of data already read


class _Link:
    """One direction of a wire: a bounded queue of timestamped chunks.

    Operations checkpoint first and take or give bytes only after their last
    await, so a cancelled call has changed nothing, except a send cancelled
    after part of its bytes went in, which truncates the link (see send).
    """

    def __init__(self, faults: LinkFaults, capacity: int) -> None:
        self._faults = faults
        self._capacity = capacity
        self._queue: deque[_Chunk] = deque()
        self._buffered = 0
        self._last_deliver_at = -math.inf
        # Throughput: a busy period starts at _tx_origin; _tx_bytes have been
        # scheduled since. Deriving times from the origin, not by adding up
        # per-chunk durations, keeps them exact (500 B at 1000 B/s ends at 0.5).
        self._tx_origin = -math.inf
        self._tx_bytes = 0
        self._tx_rate: float | None = None
        self._tx_free_at = -math.inf
        # The end of the stream: EOF, or a break after a truncated send.
        self._end_at: float | None = None
        self._end_broken = False
        self._next_read_at = -math.inf
        self._sender_closed = False
        self._receiver_closed = False
        self._sender_fate = _SenderFate.OPEN
        self._receiver_fate = _ReceiverFate.OPEN
        self._changed = trio.Event()
        self._sender_dead_hooks: list[Callable[[], None]] = []
        self.counters = ByteCounters()
        attach_link(faults, self)

    # -- bookkeeping

    def wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if self._sender_dead() and self._sender_dead_hooks:
            hooks, self._sender_dead_hooks = self._sender_dead_hooks, []
            for hook in hooks:
                hook()

    async def _wait(self, deadline: float = math.inf) -> None:
        changed = self._changed
        with trio.move_on_at(deadline):
            await changed.wait()

    def _sender_dead(self) -> bool:
        if self._sender_fate is _SenderFate.SWALLOW:
            return False
        return self._sender_fate is _SenderFate.BROKEN or self._receiver_closed

    def on_sender_dead(self, hook: Callable[[], None]) -> None:
        """Call hook once nothing sent can ever be delivered (or swallowed)."""
        if self._sender_dead():
            hook()
        else:
            self._sender_dead_hooks.append(hook)

    def _count(self, *, sent: int = 0, delivered: int = 0, dropped: int = 0) -> None:
        buffered = sent - delivered - dropped
        self.counters.count(sent=sent, delivered=delivered, dropped=dropped)
        self._faults.totals.count(sent=sent, delivered=delivered, dropped=dropped)
        self._buffered += buffered

    def _discard(self) -> None:
        if self._buffered:
            self._count(dropped=self._buffered)
        self._queue.clear()

    def _stamp(self, nbytes: int) -> float:
        now = trio.current_time()
        ready = now
        rate = self._faults.rate
        if rate is None:
            self._tx_free_at = -math.inf
        else:
            if now > self._tx_free_at or rate != self._tx_rate:
                self._tx_origin = max(now, self._tx_free_at)
                self._tx_bytes = 0
                self._tx_rate = rate
            self._tx_bytes += nbytes
            self._tx_free_at = ready = self._tx_origin + self._tx_bytes / rate
        deliver_at = max(ready + self._faults.latency(), self._last_deliver_at)
        self._last_deliver_at = deliver_at
        return deliver_at

    # -- the sending end

    def _check_sendable(self) -> bool:
        """Raise if sending is over; return True if sent bytes are to be swallowed."""
        if self._sender_closed:
            raise trio.ClosedResourceError("this stream was already closed for sending")
        if self._sender_fate is _SenderFate.SWALLOW:
            return True
        if self._sender_fate is _SenderFate.BROKEN:
            raise trio.BrokenResourceError("the connection was reset")
        if self._receiver_closed:
            raise trio.BrokenResourceError("the receiving end was closed")
        return False

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue data, waiting for room as needed.

        If cancelled (or closed) after some but not all of data went in, the
        link is truncated: later sends raise BrokenResourceError, and the
        receiver gets the bytes that went in, then BrokenResourceError. A cut
        send can therefore never be mistaken for a complete one.
        """
        await trio.lowlevel.checkpoint()
        payload = bytes(data)
        offset = 0
        try:
            while True:
                if self._check_sendable():
                    self._count(sent=len(payload) - offset, dropped=len(payload) - offset)
                    return
                room = self._capacity - self._buffered
                if room > 0 and offset < len(payload):
                    piece = (
                        payload[offset : offset + room]
                        if offset or len(payload) > room
                        else payload
                    )
                    self._queue.append(_Chunk(piece, self._stamp(len(piece))))
                    self._count(sent=len(piece))
                    offset += len(piece)
                    self.wake()
                if offset == len(payload):
                    return
                await self._wait()
        except BaseException:
            # Cancelled, or the stream closed under us, halfway through.
            if 0 < offset < len(payload):
                self._truncate()
            raise

    def _truncate(self) -> None:
        self._sender_fate = _SenderFate.BROKEN
        self._end_broken = True  # even after an EOF: the stream was cut short
        if self._end_at is None:
            self._end_at = max(trio.current_time(), self._last_deliver_at)
        self.wake()

    async def wait_writable(self) -> None:
        await trio.lowlevel.checkpoint()
        while True:
            try:
                if self._check_sendable():
                    return
            except trio.BrokenResourceError:
                return  # the next send reports it
            if self._buffered < self._capacity:
                return
            await self._wait()

    def close_sender(self) -> None:
        """EOF: the receiver reads b"" after the bytes already sent."""
        if self._sender_closed:
            return
        self._sender_closed = True
        if self._sender_fate is _SenderFate.OPEN and self._end_at is None:
            self._end_at = self._stamp(0)
        self.wake()

    # -- the receiving end

    async def receive(self, max_bytes: int) -> bytes:
        data = await self._receive(max_bytes, give_up_if_blocked=False)
        assert data is not None
        return data

    async def receive_for_pump(self, max_bytes: int) -> bytes | None:
        """Like receive, but None instead of blocking forever (half-open survivor)."""
        return await self._receive(max_bytes, give_up_if_blocked=True)

    async def _receive(self, max_bytes: int, *, give_up_if_blocked: bool) -> bytes | None:
        await trio.lowlevel.checkpoint()
        while True:
            if self._receiver_closed:
                raise trio.ClosedResourceError("this stream was already closed")
            fate = self._receiver_fate
            if fate is _ReceiverFate.BROKEN:
                raise trio.BrokenResourceError("the connection was reset")
            if fate is _ReceiverFate.EOF:
                return b""
            deadline = math.inf
            if fate is _ReceiverFate.BLOCK:
                if give_up_if_blocked:
                    return None
            elif not self._faults.blackholed:
                now = trio.current_time()
                if self._queue:
                    ready_at = self._queue[0].deliver_at
                    if self._faults.read_limit is not None:
                        ready_at = max(ready_at, self._next_read_at)
                    if ready_at <= now:
                        return self._take(max_bytes, now)
                    deadline = ready_at
                elif self._end_at is not None:
                    if self._end_at <= now:
                        if self._end_broken:
                            raise trio.BrokenResourceError(
                                "the sender was cancelled in the middle of send_all"
                            )
                        return b""
                    deadline = self._end_at
            await self._wait(deadline)

    def _take(self, max_bytes: int, now: float) -> bytes:
        limit = max_bytes
        read_limit = self._faults.read_limit
        if read_limit is not None:
            limit = min(limit, read_limit)
            self._next_read_at = now + self._faults.read_interval
        parts: list[bytes] = []
        taken = 0
        while self._queue and taken < limit and self._queue[0].deliver_at <= now:
            head = self._queue[0]
            n = min(len(head.data) - head.start, limit - taken)
            if head.start == 0 and n == len(head.data):
                parts.append(head.data)
            else:
                parts.append(head.data[head.start : head.start + n])
            head.start += n
            taken += n
            if head.start == len(head.data):
                self._queue.popleft()
        self._count(delivered=taken)
        self.wake()  # there is room for the sender now
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close_receiver(self) -> None:
        """The receiver is gone: unread bytes are dropped, the sender gets BrokenResourceError."""
        if self._receiver_closed:
            return
        self._receiver_closed = True
        self._discard()
        self.wake()

    # -- terminal events

    def set_fates(self, sender: _SenderFate, receiver: _ReceiverFate) -> None:
        self._sender_fate = sender
        self._receiver_fate = receiver
        self._discard()
        self.wake()


class _Wire:
    """Both directions of one connection, and its terminal events."""

    def __init__(self, faults: Faults, capacity: int) -> None:
        capacity = operator.index(capacity)
        if capacity < 1:
            raise ValueError(f"buffer_size must be >= 1, not {capacity!r}")
        self.faults = faults
        self.outbound = _Link(faults.outbound, capacity)
        self.inbound = _Link(faults.inbound, capacity)
        self.terminal = False
        self.was_reset = False
        attach_wire(faults, self)

    def reset(self) -> None:
        if self.was_reset:
            return
        self.terminal = self.was_reset = True
        for link in (self.outbound, self.inbound):
            link.set_fates(_SenderFate.BROKEN, _ReceiverFate.BROKEN)

    def half_open(self, side: Side, peer_sees: Literal["eof", "reset"]) -> None:
        if self.terminal:
            return
        self.terminal = True
        if side is Side.NEAR:
            survivor_sends, survivor_receives = self.outbound, self.inbound
        else:
            survivor_sends, survivor_receives = self.inbound, self.outbound
        if peer_sees == "eof":
            survivor_sends.set_fates(_SenderFate.SWALLOW, _ReceiverFate.EOF)
            survivor_receives.set_fates(_SenderFate.SWALLOW, _ReceiverFate.BLOCK)
        else:
            survivor_sends.set_fates(_SenderFate.SWALLOW, _ReceiverFate.BROKEN)
            survivor_receives.set_fates(_SenderFate.BROKEN, _ReceiverFate.BLOCK)

    def discard(self) -> None:
        """Tear-down: count the bytes still in flight as dropped."""
        for link in (self.outbound, self.inbound):
            link._discard()
            link.wake()

    def transport_failed(self) -> None:
        """The real stream under one end broke: the whole connection is reset."""
        if not self.terminal:
            self.reset()

    def statistics(self) -> FaultStatistics:
        return FaultStatistics(self.outbound.counters.snapshot(), self.inbound.counters.snapshot())
