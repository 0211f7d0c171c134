"""Fault injection around any Trio stream, for the duration of a block.

Theory of operation
-------------------

:func:`open_faulty_stream` puts a wire between you and the stream you hand
it: your end is a :class:`FaultyStream`, the far end is the wrapped stream,
which one :func:`splice` (two pump tasks) connects to the wire. Because the
pumps are tasks, it is an async context manager that owns a nursery. Leaving
the block closes both ends at once and drops the bytes still in flight; the
pumps raise nothing, so an exception from the block comes out as itself, not
wrapped in an exception group.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import overload

import trio

from .._groups import reraise_single
from ._faults import Faults, Side
from ._pumps import splice
from ._streams import FaultyHalfCloseableStream, FaultyStream
from ._wire import DEFAULT_BUFFER_SIZE, _Wire

__all__ = ["open_faulty_stream"]


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
    own: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(splice, inner, wire.inbound, wire.outbound, wire)
            try:
                yield stream
            except BaseException as exc:
                own = exc
                raise
            finally:
                stream._close()
                wire.discard()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The pumps raise nothing, so a group here holds the block's own
        # exception; hand that back as it was raised.
        try:
            reraise_single(group, own)
        finally:
            own = None  # no cycle through this frame
