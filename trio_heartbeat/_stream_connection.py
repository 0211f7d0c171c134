"""``open_stream_connection``: one THB/1 connection for the length of an ``async with`` block.

The context manager owns the connection's nursery. Entering it starts the
reader (and, on demand, the writer) and waits for the handshake; leaving it
closes the connection (gracefully, or with 1001 when the block raised), leaves
the nursery, has the connection say its last words and close the stream, and
raises the one exception the caller is to see. The connection's own hooks
(``Connection._start`` to ``Connection._finish``) do the work; this module
only sequences them around the caller's block.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import final

import trio

from ._adaptive import AdaptiveDetector
from ._config import Config
from ._connection import Connection, EventListener
from ._frames import Role
from ._groups import only_cancelled, reraise_single
from ._options import ConnectionOptions
from ._protocol import HeartbeatProtocol

__all__ = ["open_stream_connection"]


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
            detector = options.detector() if options.detector is not None else AdaptiveDetector()
            core = HeartbeatProtocol(role, config, now=trio.current_time(), detector=detector)
            # A tuple is not copied again: a server's connections share one.
            conn = Connection(stream, core, options, tuple(listeners or ()), remote_address)
        except BaseException:
            # The stream is ours from the moment we are entered: closed on every path.
            await trio.aclose_forcefully(stream)
            raise
        self._conn = conn
        manager = self._nursery_manager = trio.open_nursery()
        conn._start(await manager.__aenter__())
        try:
            await conn._wait_open()
        except BaseException as exc:
            await self._leave(exc)
            raise  # the handshake did not end in order: _leave raised already
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        conn = self._conn
        assert conn is not None
        try:
            if exc is None:
                try:
                    await conn._close_at_exit()
                except BaseException as close_exc:
                    exc = close_exc
            elif not only_cancelled(exc):
                self._body_error = exc
                conn._abandon(exc)
            return await self._leave(exc)
        finally:
            # An exception leaving here carries this frame in its traceback:
            # the frame must not hold the exception (nor, through self, the
            # connection), or the two keep each other alive until a full
            # garbage collection.
            del exc_type, exc, traceback

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
        conn._leaving()
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
            # Neither this frame nor self keeps the exception (no cycle).
            exc = None
            raised_by_block = self._body_error is not None
            self._body_error = None
            outcome = await conn._finish()
        if outcome.failure and not raised_by_block:
            raise outcome.exception()
        return True
