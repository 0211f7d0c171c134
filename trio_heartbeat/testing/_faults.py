"""Fault injection for Trio streams: the controls, an in-memory pair, a wrapper.

Theory of operation
-------------------

A fault-injected connection is a *wire*: two *links*, one per direction. A link
is a bounded queue of timestamped chunks. The sending end stamps each chunk with
the moment it may be read: now, plus the time its bytes take to cross at the
throughput limit, plus the delay and a seeded jitter, but never earlier than the
chunk before it, so order is kept whatever the jitter. The receiving end takes
the chunks whose moment has come. Every wait is a Trio wait on Trio's clock, so
under ``trio.testing.MockClock(autojump_threshold=0)`` each byte arrives at an
exact virtual time and no test sleeps for real.

The faults of one direction live in a :class:`LinkFaults` (settings the link
reads each time it acts), and :class:`Faults` holds both directions plus the
two terminal events, reset and half-open, which change once and for good what
each end's operations do. Directions and sides are named from the *near* end:
the first stream of :func:`faulty_stream_pair`, the stream that
:func:`open_faulty_stream` hands you, or the client of a ``FaultProxy``.

The in-memory pair is a wire with a stream at each end and no tasks. Wrapping
some other stream takes two pump tasks between the wire and that stream,
because a delayed byte must still arrive after ``send_all`` has returned, so
:func:`open_faulty_stream` is an async context manager that owns a nursery. The
TCP proxy runs the same pumps on both sides of each connection.

Nothing is buffered without bound: a link holds at most ``buffer_size`` bytes
(sent, not yet read), and a sender facing a full link waits, as a TCP sender
does when the window is full.
"""

from __future__ import annotations

import enum
import math
import operator
import random
import socket
import struct
import sys
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Literal, final, overload

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "Direction",
    "FaultStatistics",
    "Faults",
    "FaultyHalfCloseableStream",
    "FaultyStream",
    "LinkFaults",
    "LinkStatistics",
    "Side",
    "faulty_stream_pair",
    "open_faulty_stream",
]

#: Bytes that one direction of one connection holds (sent, not yet read) before
#: the sender has to wait.
DEFAULT_BUFFER_SIZE = 65536

# What receive_some(None) returns at most, and what a pump moves per step.
_DEFAULT_RECEIVE_SIZE = 65536
_PUMP_CHUNK = 16384


class Direction(enum.Enum):
    """Which way traffic flows, seen from the near end."""

    #: From the near end to the far end: what the near end sends.
    OUTBOUND = "outbound"
    #: From the far end to the near end: what the near end receives.
    INBOUND = "inbound"
    #: Both directions at once.
    BOTH = "both"


class Side(enum.Enum):
    """An end of a connection.

    The near end is the first stream of :func:`faulty_stream_pair`, the stream
    yielded by :func:`open_faulty_stream`, or the client of a ``FaultProxy``.
    """

    #: The end you hold (or the proxy's client).
    NEAR = "near"
    #: The other end (the second stream of a pair, the peer behind the wrapped
    #: stream, or the proxy's target).
    FAR = "far"


@dataclass(frozen=True, slots=True)
class LinkStatistics:
    """Byte counters for one direction."""

    #: Bytes the sending end handed over. Always equal to
    #: ``bytes_delivered + bytes_dropped + bytes_buffered``.
    bytes_sent: int
    #: Bytes the receiving end has read: the bytes that got through.
    bytes_delivered: int
    #: Bytes that vanished: swallowed while half-open, or discarded, still
    #: unread, by a reset, a half-open or the receiver closing.
    bytes_dropped: int
    #: Bytes sent but not yet read (in flight or held back by a blackhole).
    bytes_buffered: int


@dataclass(frozen=True, slots=True)
class FaultStatistics:
    """Byte counters for both directions."""

    outbound: LinkStatistics
    inbound: LinkStatistics


class _Counters:
    __slots__ = ("buffered", "delivered", "dropped", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.delivered = 0
        self.dropped = 0
        self.buffered = 0

    def snapshot(self) -> LinkStatistics:
        return LinkStatistics(
            bytes_sent=self.sent,
            bytes_delivered=self.delivered,
            bytes_dropped=self.dropped,
            bytes_buffered=self.buffered,
        )


def _non_negative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    return value


# ---------------------------------------------------------------------------
# The controls


@final
class LinkFaults:
    """The fault settings of one direction; every attribute can change at any time.

    A change applies at once to every connection that uses these controls:
    blocked senders and receivers wake up and look again. Timing settings
    (``delay``, ``jitter``, ``rate``) apply to bytes sent after the change;
    bytes already in flight keep the arrival time they were given.

    Attributes:

    * ``blackholed``: deliver nothing. Reads block; sent bytes are *held back*,
      not lost, and sends keep succeeding until ``buffer_size`` bytes are held,
      then block until the blackhole is lifted. Lifting it delivers the held
      bytes at once (or when their delay is up).
    * ``delay`` and ``jitter`` (seconds): each chunk can be read
      ``delay + uniform(0, jitter)`` after it was sent, never before the chunk
      sent before it. The random draws come from the seed given to
      :class:`Faults`.
    * ``rate`` (bytes per second, or ``None``): chunks cross one after the other
      at this rate, and a chunk becomes readable once all of it has crossed.
    * ``read_limit`` and ``read_interval``: a slow reader. Each read at the
      receiving end returns at most ``read_limit`` bytes and comes at least
      ``read_interval`` seconds after the previous read, so the link fills and
      the sender's ``send_all`` blocks.

    Created by :class:`Faults`; not constructed directly.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._blackholed = False
        self._delay = 0.0
        self._jitter = 0.0
        self._rate: float | None = None
        self._read_limit: int | None = None
        self._read_interval = 0.0
        self._links: weakref.WeakSet[_Link] = weakref.WeakSet()
        self._counters = _Counters()

    @property
    def blackholed(self) -> bool:
        """Whether delivery is stopped (sent bytes are held back, up to the bound)."""
        return self._blackholed

    @blackholed.setter
    def blackholed(self, value: bool) -> None:
        self._blackholed = bool(value)
        self._notify()

    @property
    def delay(self) -> float:
        """Seconds added to every chunk's trip."""
        return self._delay

    @delay.setter
    def delay(self, value: float) -> None:
        self._delay = _non_negative("delay", value)
        self._notify()

    @property
    def jitter(self) -> float:
        """Up to this many more seconds, drawn per chunk from the seeded generator."""
        return self._jitter

    @jitter.setter
    def jitter(self, value: float) -> None:
        self._jitter = _non_negative("jitter", value)
        self._notify()

    @property
    def rate(self) -> float | None:
        """Throughput limit in bytes per second, or ``None`` for no limit."""
        return self._rate

    @rate.setter
    def rate(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"rate must be a finite number > 0 or None, not {value!r}")
        self._rate = value
        self._notify()

    @property
    def read_limit(self) -> int | None:
        """At most this many bytes per read at the receiving end, or ``None``."""
        return self._read_limit

    @read_limit.setter
    def read_limit(self, value: int | None) -> None:
        if value is not None:
            value = operator.index(value)
            if value < 1:
                raise ValueError(f"read_limit must be >= 1 or None, not {value!r}")
        self._read_limit = value
        self._notify()

    @property
    def read_interval(self) -> float:
        """With ``read_limit`` set, the minimum time between two reads."""
        return self._read_interval

    @read_interval.setter
    def read_interval(self, value: float) -> None:
        self._read_interval = _non_negative("read_interval", value)
        self._notify()

    def heal(self) -> None:
        """Turn every setting of this direction off (bytes held back flow again)."""
        self._blackholed = False
        self._delay = self._jitter = self._read_interval = 0.0
        self._rate = None
        self._read_limit = None
        self._notify()

    def statistics(self) -> LinkStatistics:
        """Counters summed over every connection that uses these controls."""
        return self._counters.snapshot()

    def _latency(self) -> float:
        if self._jitter > 0:
            return self._delay + self._rng.uniform(0.0, self._jitter)
        return self._delay

    def _notify(self) -> None:
        for link in list(self._links):
            link.wake()


@final
class Faults:
    """Run-time fault controls for a connection, or for every proxied connection.

    ``outbound`` and ``inbound`` hold the settings of each direction (see
    :class:`LinkFaults`); the methods below set one or both at once. A
    :class:`Faults` may be shared: give the same one to several pairs or
    wrappers and every setting, reset and half-open applies to all of them.
    Use it from the Trio run that carries the traffic.

    ``seed`` seeds the jitter draws, so a run is reproducible; the default is
    the fixed seed 0, and ``None`` draws a fresh seed from the OS.

    Example::

        client, server, faults = faulty_stream_pair()
        faults.set_delay(0.25)                   # both directions
        faults.blackhole(Direction.OUTBOUND)     # a one-way partition
        faults.heal()                            # all settings off again
        faults.reset()                           # both ends: BrokenResourceError
    """

    def __init__(self, *, seed: int | None = 0) -> None:
        self._outbound = LinkFaults(random.Random(None if seed is None else f"{seed}/outbound"))
        self._inbound = LinkFaults(random.Random(None if seed is None else f"{seed}/inbound"))
        self._wires: weakref.WeakSet[_Wire] = weakref.WeakSet()

    @property
    def outbound(self) -> LinkFaults:
        """Settings for traffic from the near end to the far end."""
        return self._outbound

    @property
    def inbound(self) -> LinkFaults:
        """Settings for traffic from the far end to the near end."""
        return self._inbound

    def _select(self, direction: Direction) -> tuple[LinkFaults, ...]:
        if direction is Direction.OUTBOUND:
            return (self._outbound,)
        if direction is Direction.INBOUND:
            return (self._inbound,)
        if direction is Direction.BOTH:
            return (self._outbound, self._inbound)
        raise TypeError(f"expected a Direction, not {direction!r}")

    def blackhole(self, direction: Direction = Direction.BOTH) -> None:
        """Stop delivery in ``direction``; one direction alone is a one-way partition.

        Sent bytes are held back (up to the buffer bound, then ``send_all``
        blocks) and delivered when :meth:`heal` or ``blackholed = False`` lifts
        the blackhole.
        """
        for link in self._select(direction):
            link.blackholed = True

    def set_delay(
        self, delay: float, jitter: float = 0.0, direction: Direction = Direction.BOTH
    ) -> None:
        """Deliver each chunk ``delay + uniform(0, jitter)`` seconds after it was sent."""
        for link in self._select(direction):
            link.delay = delay
            link.jitter = jitter

    def limit_rate(
        self, bytes_per_second: float | None, direction: Direction = Direction.BOTH
    ) -> None:
        """Let bytes cross at most this fast (``None``: no limit)."""
        for link in self._select(direction):
            link.rate = bytes_per_second

    def slow_reader(
        self, nbytes: int | None, interval: float = 1.0, direction: Direction = Direction.BOTH
    ) -> None:
        """Make the receiving end of ``direction`` read ``nbytes`` per ``interval`` at most.

        The link then fills and the sender's ``send_all`` blocks, which is how
        write timeouts get tested. ``nbytes=None`` turns it off.
        """
        for link in self._select(direction):
            link.read_limit = nbytes
            link.read_interval = interval

    def heal(self, direction: Direction = Direction.BOTH) -> None:
        """Turn every setting off. A reset or half-open connection stays dead."""
        for link in self._select(direction):
            link.heal()

    def reset(self) -> None:
        """Reset every connection using these controls, as a TCP RST would.

        On both ends, the operation in progress and every later one except
        ``aclose`` raise :exc:`trio.BrokenResourceError`; bytes in flight are
        dropped. A wrapped TCP stream is closed with an RST, any other wrapped
        stream is closed forcefully. Connections made later are not affected.
        """
        for wire in list(self._wires):
            wire.reset()

    def half_open(
        self, side: Side = Side.NEAR, *, peer_sees: Literal["eof", "reset"] = "reset"
    ) -> None:
        """Make every current connection half-open, for good.

        ``side`` keeps believing the connection is up: its sends succeed and the
        bytes vanish, its reads block forever. The other end sees the
        connection end: its reads return EOF (``peer_sees="eof"``, and its own
        sends then vanish too) or its operations raise
        :exc:`trio.BrokenResourceError` (``"reset"``). Bytes in flight are dropped.
        """
        if peer_sees not in ("eof", "reset"):
            raise ValueError(f'peer_sees must be "eof" or "reset", not {peer_sees!r}')
        for wire in list(self._wires):
            wire.half_open(side, peer_sees)

    def statistics(self) -> FaultStatistics:
        """Counters summed over every connection that uses these controls."""
        return FaultStatistics(self._outbound.statistics(), self._inbound.statistics())


# ---------------------------------------------------------------------------
# One direction


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
        self.counters = _Counters()
        faults._links.add(self)

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
        for counters in (self.counters, self._faults._counters):
            counters.sent += sent
            counters.delivered += delivered
            counters.dropped += dropped
            counters.buffered += buffered
        self._buffered += buffered

    def _discard(self) -> None:
        if self._buffered:
            self._count(dropped=self._buffered)
        self._queue.clear()

    def _stamp(self, nbytes: int) -> float:
        now = trio.current_time()
        ready = now
        rate = self._faults._rate
        if rate is None:
            self._tx_free_at = -math.inf
        else:
            if now > self._tx_free_at or rate != self._tx_rate:
                self._tx_origin = max(now, self._tx_free_at)
                self._tx_bytes = 0
                self._tx_rate = rate
            self._tx_bytes += nbytes
            self._tx_free_at = ready = self._tx_origin + self._tx_bytes / rate
        deliver_at = max(ready + self._faults._latency(), self._last_deliver_at)
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
            elif not self._faults._blackholed:
                now = trio.current_time()
                if self._queue:
                    ready_at = self._queue[0].deliver_at
                    if self._faults._read_limit is not None:
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
        read_limit = self._faults._read_limit
        if read_limit is not None:
            limit = min(limit, read_limit)
            self._next_read_at = now + self._faults._read_interval
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
        faults._wires.add(self)

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


# ---------------------------------------------------------------------------
# The streams


class _Guard:
    """Raise BusyResourceError on overlapping calls (trio's stream contract)."""

    __slots__ = ("_busy", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._busy = False

    def __enter__(self) -> None:
        if self._busy:
            raise trio.BusyResourceError(self._message)
        self._busy = True

    def __exit__(self, *exc_info: object) -> None:
        self._busy = False


class FaultyStream(trio.abc.Stream):
    """One end of a fault-injected connection; a :class:`trio.abc.Stream`.

    Get one from :func:`faulty_stream_pair` or :func:`open_faulty_stream`; it is
    not constructed directly. It behaves as Trio's stream contract says:
    overlapping sends or receives raise :exc:`trio.BusyResourceError`, using it
    after ``aclose`` raises :exc:`trio.ClosedResourceError`, and the faults
    surface as :exc:`trio.BrokenResourceError` (reset) or as waiting
    (blackhole, delay, rate, a slow reader at the other end, a full buffer).

    Cancellation: a cancelled ``receive_some`` has taken nothing. A cancelled
    ``send_all`` has sent nothing, unless some of its bytes already went in
    (the buffer was too full for all of them); then the direction is broken
    for good: later sends raise :exc:`trio.BrokenResourceError` and the
    receiver reads the bytes that went in, then gets
    :exc:`trio.BrokenResourceError`. A stream is never silently cut short.

    ``aclose`` is graceful for what was already sent (the peer reads it, then
    EOF) and drops what this end had not read yet; the peer's later sends raise
    :exc:`trio.BrokenResourceError`.
    """

    def __init__(self, wire: _Wire, side: Side) -> None:
        self._wire = wire
        if side is Side.NEAR:
            self._send_link, self._receive_link = wire.outbound, wire.inbound
        else:
            self._send_link, self._receive_link = wire.inbound, wire.outbound
        self._send_guard = _Guard("another task is already sending on this stream")
        self._receive_guard = _Guard("another task is already receiving on this stream")
        self._closed = False

    @property
    def faults(self) -> Faults:
        """The controls of this stream's connection (perhaps shared with others)."""
        return self._wire.faults

    def statistics(self) -> FaultStatistics:
        """Counters of this connection alone, from the near end's point of view."""
        return self._wire.statistics()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Hand data to the connection; returns once it is all in the buffer."""
        with self._send_guard:
            await self._send_link.send(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the buffer has room (or sending has failed)."""
        with self._send_guard:
            await self._send_link.wait_writable()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return the bytes that have arrived, at most max_bytes; b"" at EOF."""
        if max_bytes is None:
            max_bytes = _DEFAULT_RECEIVE_SIZE
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        with self._receive_guard:
            return await self._receive_link.receive(max_bytes)

    async def aclose(self) -> None:
        """Close both directions; idempotent, and closes even if cancelled."""
        self._close()
        await trio.lowlevel.checkpoint()

    def _close(self) -> None:
        self._closed = True
        self._send_link.close_sender()
        self._receive_link.close_receiver()


@final
class FaultyHalfCloseableStream(FaultyStream, trio.abc.HalfCloseableStream):
    """A :class:`FaultyStream` that can also send EOF alone (``send_eof``)."""

    async def send_eof(self) -> None:
        """Close the sending direction; the peer reads the bytes sent, then b""."""
        with self._send_guard:
            if self._closed:
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError("this stream was already closed")
            self._send_link.close_sender()
            await trio.lowlevel.checkpoint()


def faulty_stream_pair(
    faults: Faults | None = None, *, buffer_size: int = DEFAULT_BUFFER_SIZE
) -> tuple[FaultyHalfCloseableStream, FaultyHalfCloseableStream, Faults]:
    """Make two connected in-memory streams and the controls of their faults.

    Returns ``(client, server, faults)``; ``client`` is the near end, so
    :attr:`Direction.OUTBOUND` is client to server. Both streams are
    :class:`trio.abc.HalfCloseableStream`. No tasks are involved: every fault
    acts inside the streams' own calls, timed by Trio's clock, so the pair is
    exact and deterministic under ``MockClock(autojump_threshold=0)``.

    Each direction holds at most ``buffer_size`` bytes that were sent and not
    yet read; a ``send_all`` that does not fit waits until the receiver makes
    room (backpressure). Pass ``faults`` to share one set of controls among
    several pairs.

    Example::

        client, server, faults = faulty_stream_pair()
        faults.set_delay(0.25)
        await client.send_all(b"x")              # at t=0, returns at once
        assert await server.receive_some() == b"x"
        assert trio.current_time() == 0.25       # under an autojump MockClock
    """
    faults = Faults() if faults is None else faults
    wire = _Wire(faults, buffer_size)
    return (
        FaultyHalfCloseableStream(wire, Side.NEAR),
        FaultyHalfCloseableStream(wire, Side.FAR),
        faults,
    )


# ---------------------------------------------------------------------------
# Pumps between a wire and a real stream (used by the wrapper and the proxy)


async def abort_stream(stream: trio.abc.AsyncResource) -> None:
    """Close stream at once; a TCP stream (under TLS or not) sends an RST.

    The RST makes the peer's next operation raise BrokenResourceError instead
    of reading a clean EOF. Any other stream is closed forcefully.
    """
    transport: object = stream
    while isinstance(transport, trio.SSLStream):
        transport = transport.transport_stream
    if isinstance(transport, trio.SocketStream):
        with suppress(OSError):
            # Linger on, timeout 0: close() discards unsent data and sends RST.
            transport.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


async def _feed(source: trio.abc.ReceiveStream, link: _Link, wire: _Wire) -> None:
    with trio.CancelScope() as scope:
        # Stop reading the real stream as soon as nothing read could be
        # delivered; otherwise an idle source would keep this task alive.
        link.on_sender_dead(scope.cancel)
        while True:
            try:
                data = await source.receive_some(_PUMP_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                wire.transport_failed()
                return
            if not data:
                link.close_sender()
                return
            try:
                await link.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def _drain(link: _Link, sink: trio.abc.SendStream, wire: _Wire) -> None:
    while True:
        try:
            data = await link.receive_for_pump(_PUMP_CHUNK)
        except trio.BrokenResourceError:
            await abort_stream(sink)
            return
        except trio.ClosedResourceError:  # pragma: no cover - pumps own their links
            return
        if data is None:
            return  # half-open: nothing will ever be written to this end again
        if not data:
            if isinstance(sink, trio.abc.HalfCloseableStream):
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await sink.send_eof()
            return
        try:
            await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            wire.transport_failed()
            return


async def splice(transport: trio.abc.Stream, into: _Link, out_of: _Link, wire: _Wire) -> None:
    """Pump transport's bytes into ``into`` and ``out_of``'s bytes into transport.

    Returns when both pumps are done, and always closes transport: with an RST
    if the wire was reset, plainly otherwise.
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, transport, into, wire)
            nursery.start_soon(_drain, out_of, transport, wire)
    finally:
        if wire.was_reset:
            await abort_stream(transport)
        else:
            await trio.aclose_forcefully(transport)


@overload
def open_faulty_stream(
    inner: trio.abc.HalfCloseableStream,
    faults: Faults | None = None,
    *,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
) -> AbstractAsyncContextManager[FaultyHalfCloseableStream]: ...
@overload
def open_faulty_stream(
    inner: trio.abc.Stream,
    faults: Faults | None = None,
    *,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
) -> AbstractAsyncContextManager[FaultyStream]: ...
def open_faulty_stream(
    inner: trio.abc.Stream,
    faults: Faults | None = None,
    *,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
) -> AbstractAsyncContextManager[FaultyStream]:
    """Wrap any Trio stream in fault injection, for the duration of a block.

    Yields a :class:`FaultyStream` (a :class:`FaultyHalfCloseableStream` when
    ``inner`` is half-closeable) that you use instead of ``inner``; the near end
    is yours, the far end is whoever is behind ``inner``. Its controls are
    ``faults`` (a fresh :class:`Faults` if not given), also at
    ``stream.faults``.

    Two pump tasks, in a nursery the block owns, move bytes between the wire and
    ``inner``: that is what lets a delayed or held-back byte reach ``inner``
    after ``send_all`` has returned. The faults act between your stream and
    ``inner``, so timings are exact for what you send and for what ``inner``
    delivers. Closing the yielded stream flushes what you sent (with its faults)
    and then closes ``inner``; a reset closes ``inner`` abruptly (an RST on
    TCP); if ``inner`` fails, your stream raises
    :exc:`trio.BrokenResourceError`. Leaving the block closes both at once and
    drops bytes still in flight. An exception from the block propagates as
    itself, not wrapped in an exception group.

    Example::

        async with open_faulty_stream(await trio.open_tcp_stream(host, port)) as stream:
            stream.faults.blackhole(Direction.INBOUND)
            await stream.send_all(b"ping")       # gets through
            ...                                  # replies are held back
    """
    return _open_faulty_stream(inner, Faults() if faults is None else faults, buffer_size)


@asynccontextmanager
async def _open_faulty_stream(
    inner: trio.abc.Stream, faults: Faults, buffer_size: int
) -> AsyncIterator[FaultyStream]:
    wire = _Wire(faults, buffer_size)
    if isinstance(inner, trio.abc.HalfCloseableStream):
        stream: FaultyStream = FaultyHalfCloseableStream(wire, Side.NEAR)
    else:
        stream = FaultyStream(wire, Side.NEAR)
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(splice, inner, wire.inbound, wire.outbound, wire)
            try:
                yield stream
            finally:
                stream._close()
                wire.discard()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The pumps raise nothing, so a group here holds the block's own
        # exception; hand that back as it was raised.
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
    if error is not None:
        try:
            raise error
        finally:
            del error
