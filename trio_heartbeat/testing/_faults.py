"""The fault controls: what a test turns on and off, and the counters it reads.

Theory of operation
-------------------

A fault-injected connection is a *wire*: two *links*, one per direction (see
``_wire``). The faults of one direction live in a :class:`LinkFaults`:
settings the link reads each time it acts, so a change applies at once, and
every change wakes the links that use them, so blocked senders and receivers
look again. :class:`Faults` holds both directions plus the two terminal
events, reset and half-open, which change once and for good what each end's
operations do. Directions and sides are named from the *near* end: the first
stream of :func:`faulty_stream_pair`, the stream that
:func:`open_faulty_stream` hands you, or the client of a ``FaultProxy``.

The controls know their links and wires through weak sets only, so a
connection that has gone away is forgotten without unregistering; links and
wires attach themselves (:func:`attach_link`, :func:`attach_wire`),
and this module imports nothing of theirs. Byte counters are kept per link
(one connection's statistics) and per :class:`LinkFaults` (the sum over every
connection sharing the controls).

The rest of the kit, from the bottom up: ``_wire`` (the links that carry the
bytes), ``_streams`` (the ends of a wire, and the in-memory pair), ``_pumps``
(bytes between a wire and a real stream), ``_wrap`` (:func:`open_faulty_stream`)
and ``_proxy`` (the TCP proxy).
"""

from __future__ import annotations

import enum
import math
import operator
import random
import weakref
from dataclasses import dataclass
from typing import Literal, Protocol, final

__all__ = [
    "Direction",
    "FaultStatistics",
    "Faults",
    "LinkFaults",
    "LinkStatistics",
    "Side",
]


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


@final
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


@final
@dataclass(frozen=True, slots=True)
class FaultStatistics:
    """Byte counters for both directions."""

    outbound: LinkStatistics
    inbound: LinkStatistics


class ByteCounters:
    """Bytes sent, delivered, dropped and buffered: one link's, or the sum over many."""

    __slots__ = ("buffered", "delivered", "dropped", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.delivered = 0
        self.dropped = 0
        self.buffered = 0

    def count(self, *, sent: int = 0, delivered: int = 0, dropped: int = 0) -> None:
        """Add to the counters; what was sent and is neither delivered nor dropped is buffered."""
        self.sent += sent
        self.delivered += delivered
        self.dropped += dropped
        self.buffered += sent - delivered - dropped

    def snapshot(self) -> LinkStatistics:
        """The counters as a frozen :class:`LinkStatistics`."""
        return LinkStatistics(
            bytes_sent=self.sent,
            bytes_delivered=self.delivered,
            bytes_dropped=self.dropped,
            bytes_buffered=self.buffered,
        )


class _Wakeable(Protocol):
    """What a link is to its controls: something to wake when a setting changes."""

    def wake(self) -> None: ...


class _Terminable(Protocol):
    """What a wire is to its controls: something to reset or make half-open."""

    def reset(self) -> None: ...

    def half_open(self, side: Side, peer_sees: Literal["eof", "reset"]) -> None: ...


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
        self._links: weakref.WeakSet[_Wakeable] = weakref.WeakSet()
        #: Bytes summed over every connection that uses these controls.
        self.totals = ByteCounters()

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
        return self.totals.snapshot()

    def latency(self) -> float:
        """The trip time of a chunk sent now: ``delay`` plus a seeded ``uniform(0, jitter)``."""
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
        self._wires: weakref.WeakSet[_Terminable] = weakref.WeakSet()

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


def attach_link(faults: LinkFaults, link: _Wakeable) -> None:
    """Wake ``link`` whenever a setting of ``faults`` changes, for as long as it lives (weakly)."""
    faults._links.add(link)


def attach_wire(faults: Faults, wire: _Terminable) -> None:
    """Reach ``wire`` with the resets and half-opens of ``faults``, for as long as it lives (weakly)."""
    faults._wires.add(wire)
