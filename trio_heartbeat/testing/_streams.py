"""The streams at the two ends of a wire, and the in-memory pair.

Theory of operation
-------------------

A :class:`FaultyStream` is one end of a wire: it sends on one link and
receives from the other, so every fault is the links' doing. The stream adds
the rest of Trio's stream contract (guards against overlapping calls, the
``max_bytes`` check) and closes both its links on ``aclose``. The in-memory
pair, :func:`faulty_stream_pair`, is a wire with a stream at each end and no
tasks: every fault acts inside the streams' own calls, so the pair is exact
and deterministic in virtual time.
"""

from __future__ import annotations

import operator
from typing import final

import trio

from ._faults import Faults, FaultStatistics, Side
from ._wire import DEFAULT_BUFFER_SIZE, _Wire

__all__ = ["FaultyHalfCloseableStream", "FaultyStream", "faulty_stream_pair"]

# What receive_some(None) returns at most.
_DEFAULT_RECEIVE_SIZE = 65536


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
