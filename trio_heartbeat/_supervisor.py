"""The reconnect supervisor: a client that keeps coming back, without stampeding.

Theory of operation
-------------------
:func:`open_reconnecting_client` runs one task, the *supervisor loop*, beside
the caller's ``async with`` block. The loop picks an endpoint, connects with
:func:`open_connection` under an attempt deadline, and while the connection
lives it runs two helpers inside the connection's own scope: a *pump* that
moves messages from the supervisor's send buffer into the connection, and a
*forwarder* that moves received messages into the supervisor's inbound
channel. When the connection ends, its scope takes both helpers with it; the
loop classifies the ending by its close code and either stops or waits out the
next backoff delay and starts over.

The caller talks only to :class:`ReconnectingClient`, never to a particular
connection, so its ``send`` and ``receive`` carry on across reconnects:

* ``send`` appends to one bounded buffer, and only the pump takes from it, in
  order. A message the pump could not hand to a connection stays at the head
  of the buffer for the next one, so nothing accepted by ``send`` while
  disconnected is lost or reordered. (A message already handed to a connection
  that then dies may be lost with it: THB/1 has no acknowledgements.)
* ``receive`` reads one bounded channel that every connection's forwarder
  feeds in turn.

The backoff iterator restarts only after a connection has stayed up for
``healthy_after`` seconds, so a server that accepts and dies at once gets an
ever slower client, not a tight loop. :meth:`ReconnectingClient.nudge` cuts the
current wait short. Every step is reported to listeners as a
:class:`SupervisorEvent` and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from math import inf
from typing import Any, Final, Literal, TypeAlias, final

import trio

from ._backoff import DEFAULT_BACKOFF
from ._client import open_connection
from ._config import Config
from ._connection import Connection, EventListener, as_bytes
from ._endpoints import EndpointCycle, EndpointSource, format_endpoint
from ._errors import (
    BrokenConnection,
    ConnectionClosed,
    HeartbeatTimeout,
    NoEndpointLeft,
    ReconnectFailed,
    UndeliveredMessages,
    describe_os_error,
)
from ._frames import CloseCode, HealthStatus
from ._groups import forget_frames, only_cancelled, reraise_single
from ._keepalive import KeepaliveOptions
from ._mailbox import Mailbox
from ._options import ConnectionOptions
from ._reconnect_events import (
    AttemptFailed,
    AttemptStarted,
    BackingOff,
    Connected,
    Disconnected,
    Stopped,
    SupervisorEvent,
    SupervisorListener,
    SupervisorState,
    describe,
)
from ._stream_connection import open_stream_connection

__all__ = [
    "DEFAULT_STOP_CODES",
    "Connector",
    "ReconnectingClient",
    "open_reconnecting_client",
]

logger = logging.getLogger("trio_heartbeat.supervisor")

#: Close codes after which the supervisor stops instead of reconnecting
#: (THB/1 §5): refused credentials or policy, and replacement by a newer
#: connection with the same id.
DEFAULT_STOP_CODES: Final = frozenset({CloseCode.POLICY_VIOLATION, CloseCode.REPLACED})


#: Opens the transport to ``(host, port)``; replaces TCP, e.g. with in-memory
#: streams in virtual-time tests (see :mod:`trio_heartbeat.testing`).
Connector: TypeAlias = Callable[[str, int], Awaitable[trio.abc.Stream]]


@asynccontextmanager
async def _open_with_connector(
    connector: Connector, host: str, port: int, endpoint: str, **kwargs: Any
) -> AsyncIterator[Connection]:
    try:
        stream = await connector(host, port)
    except (OSError, trio.BrokenResourceError) as exc:
        raise BrokenConnection(
            CloseCode.ABNORMAL_CLOSURE, f"cannot connect to {endpoint}: {describe_os_error(exc)}"
        ) from exc
    async with open_stream_connection(stream, remote_address=endpoint, **kwargs) as conn:
        yield conn


@final
class ReconnectingClient:
    """A THB/1 client that reconnects until you leave its ``async with`` block.

    Get one from :func:`open_reconnecting_client`. ``send`` and ``receive``
    work across reconnects; ``state``, :meth:`wait_state` and
    :meth:`wait_connected` say where it stands.
    """

    def __init__(
        self,
        endpoints: EndpointSource,
        *,
        config: Config | None,
        options: ConnectionOptions | None,
        backoff: Iterable[float],
        connect_timeout: float,
        healthy_after: float,
        buffer_size: int,
        when_full: Literal["wait", "fail"],
        receive_buffer: int,
        stop_codes: frozenset[int],
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        keepalive: KeepaliveOptions | bool | None,
        connection_listeners: list[EventListener] | None,
        listeners: list[SupervisorListener] | None,
        connector: Connector | None = None,
    ) -> None:
        if buffer_size < 1 or receive_buffer < 1:
            raise ValueError("buffer_size and receive_buffer must be at least 1")
        if connect_timeout <= 0 or healthy_after < 0:
            raise ValueError("connect_timeout must be positive and healthy_after not negative")
        if when_full not in ("wait", "fail"):
            raise ValueError("when_full must be 'wait' or 'fail'")
        self._endpoints = EndpointCycle(endpoints)
        self.config = config if config is not None else Config()
        self._options = options
        self._backoff = backoff
        self.connect_timeout = connect_timeout
        self.healthy_after = healthy_after
        self._mailbox = Mailbox(buffer_size, when_full, receive_buffer)
        self._stop_codes = stop_codes
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._keepalive = keepalive
        self._connection_listeners = connection_listeners
        self._listeners = list(listeners or ())
        self._connector = connector
        self._state = SupervisorState.DISCONNECTED
        self._state_changed = trio.Event()
        self._connection: Connection | None = None
        self._nudge_scope: trio.CancelScope | None = None
        self._nudged = False
        self._error: ReconnectFailed | None = None
        self._last_error: ConnectionClosed | None = None
        self._closing = False
        self._run_scope = trio.CancelScope()
        self.attempts = 0
        self.connections = 0

    # -- facts -------------------------------------------------------------------

    @property
    def state(self) -> SupervisorState:
        """The current :class:`SupervisorState`."""
        return self._state

    @property
    def connection(self) -> Connection | None:
        """The open connection, if there is one right now."""
        return self._connection if self._state is SupervisorState.CONNECTED else None

    @property
    def error(self) -> ReconnectFailed | None:
        """Why the supervisor gave up, once it has."""
        return self._error

    @property
    def buffered(self) -> int:
        """Messages accepted by :meth:`send` and not yet handed to a connection."""
        return self._mailbox.buffered

    def add_listener(self, listener: SupervisorListener) -> None:
        """Call ``listener(event)`` for every :class:`SupervisorEvent` from now on."""
        self._listeners.append(listener)

    def remove_listener(self, listener: SupervisorListener) -> None:
        """Stop calling ``listener``; :exc:`ValueError` if it was not added."""
        self._listeners.remove(listener)

    def set_health(self, status: HealthStatus) -> None:
        """Report ``status`` on the open connection and every later one."""
        self.config = dataclasses.replace(self.config, status=HealthStatus(status))
        if self._connection is not None:
            self._connection.set_health(self.config.status)

    # -- waiting -------------------------------------------------------------------

    async def wait_state(self, *states: SupervisorState) -> SupervisorState:
        """Wait until the state is one of ``states``; returns it."""
        while self._state not in states:
            await self._state_changed.wait()
        return self._state

    async def wait_connected(self) -> Connection:
        """Wait for an open connection and return it.

        Raises :class:`ReconnectFailed` if the supervisor gives up first.
        """
        while True:
            state = await self.wait_state(SupervisorState.CONNECTED, SupervisorState.CLOSED)
            if state is SupervisorState.CLOSED:
                raise self._stopped_error()
            assert self._connection is not None
            return self._connection

    # -- sending and receiving ----------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Send ``data`` now, or as soon as a connection is open, in order.

        While disconnected the message waits in a buffer of ``buffer_size``
        messages; when that is full, ``send`` waits (``when_full="wait"``) or
        raises :class:`trio.WouldBlock` (``"fail"``). A cancelled ``send`` has
        accepted nothing. Raises :class:`ReconnectFailed` once the client is
        closing or has stopped, and :exc:`TypeError` for anything but bytes.
        """
        await self._mailbox.send(data if type(data) is bytes else as_bytes(data), self._refusal)

    def _refusal(self) -> ReconnectFailed | None:
        if self._closing or self._state is SupervisorState.CLOSED:
            return self._stopped_error()
        return None

    async def receive(self) -> bytes:
        """The next message from whichever connection is open; waits across reconnects.

        A cancelled ``receive`` loses nothing. Raises :class:`ReconnectFailed`
        once the supervisor has stopped and every message received before is
        delivered.
        """
        return await self._mailbox.receive(self._end_of_messages)

    def _end_of_messages(self) -> ReconnectFailed | None:
        return self._stopped_error() if self._state is SupervisorState.CLOSED else None

    def __aiter__(self) -> ReconnectingClient:
        return self

    async def __anext__(self) -> bytes:
        # Not an async generator: leaving ``async for`` early must leave
        # nothing behind to finalize.
        try:
            return await self.receive()
        except ReconnectFailed:
            if self._error is None:
                raise StopAsyncIteration from None  # closed by the caller
            raise

    def nudge(self) -> None:
        """Skip the rest of the current backoff wait and try again now. During an attempt,
        skips the wait after it if it fails; while connected, does nothing."""
        if self._state is SupervisorState.CONNECTED:
            return
        self._nudged = True
        if self._nudge_scope is not None:
            self._nudge_scope.cancel()

    def _stopped_error(self) -> ReconnectFailed:
        if self._error is not None:
            return self._error
        return ReconnectFailed("the reconnecting client is closed", None, self.attempts)

    # -- the loop ----------------------------------------------------------------------

    def _set_state(self, state: SupervisorState) -> None:
        if state is not self._state:
            self._state = state
            self._state_changed.set()
            self._state_changed = trio.Event()

    def _emit(self, event: SupervisorEvent) -> None:
        logger.info("%s", describe(event))
        for listener in list(self._listeners):  # a listener may remove itself
            try:
                listener(event)
            except Exception:
                logger.exception("supervisor listener %r failed on %r", listener, event)

    async def _run(self) -> None:
        try:
            with self._run_scope:
                await self._loop()
        except ReconnectFailed as exc:
            self._error = exc
            exc.undelivered = self._mailbox.take_all()  # the caller's, not lost in silence
            if exc.undelivered:
                count = len(exc.undelivered)
                exc.add_note(f"{count} message(s) accepted by send() were not delivered")
            raise
        finally:
            if self._state is not SupervisorState.CLOSED:
                self._finish(self._error)

    async def _loop(self) -> None:
        delays: Iterator[float] = iter(self._backoff)
        attempt = 0
        wait_first = False  # the first attempt ever goes at once
        went_away = False  # a 1001 came since the last healthy connection
        last_error: ConnectionClosed | None = None
        while True:
            if wait_first:
                delay = next(delays, None)
                if delay is None:
                    raise ReconnectFailed(
                        f"gave up after {attempt} attempt(s): the backoff policy ran out",
                        last_error,
                        attempt,
                    )
                await self._back_off(self.attempts + 1, delay)
            wait_first = True
            try:
                host, port = await self._endpoints.next()
            except NoEndpointLeft as exc:
                raise ReconnectFailed(
                    f"gave up after {attempt} attempt(s): {exc}", last_error, attempt
                ) from None
            attempt += 1
            self.attempts += 1
            endpoint = format_endpoint(host, port)
            self._set_state(SupervisorState.CONNECTING)
            # Events number the attempts over the client's life, as a person
            # counts them; ``attempt`` counts those since the last healthy one.
            self._emit(AttemptStarted(self.attempts, endpoint))
            error, uptime = await self._attempt(host, port, endpoint, self.attempts)
            last_error = self._last_error = error
            if self._closing and not self._mailbox.buffered:
                return  # closing, and everything accepted was handed over
            if uptime is None:
                self._endpoints.failed()
                self._emit(AttemptFailed(self.attempts, endpoint, error))
            else:
                self._emit(Disconnected(endpoint, error, uptime))
                if uptime >= self.healthy_after:
                    delays = iter(self._backoff)
                    attempt = 0
            if error.code in self._stop_codes:
                raise ReconnectFailed(
                    f"not reconnecting after close code {error.code} ({error.reason})",
                    error,
                    attempt,
                )
            if uptime is not None and uptime >= self.healthy_after:
                went_away = False  # a healthy spell: the next 1001 is a first one again
            if error.code == CloseCode.GOING_AWAY and uptime is not None:
                self._endpoints.failed()  # the server asked us to come back, perhaps elsewhere
                # At once, the first time since the last healthy connection;
                # a server that sends every newcomer away gets backoff instead.
                wait_first = went_away
                went_away = True

    async def _back_off(self, attempt: int, delay: float) -> None:
        if self._nudged:
            self._nudged = False
            return
        self._set_state(SupervisorState.BACKING_OFF)
        self._emit(BackingOff(attempt, delay))
        with trio.CancelScope() as self._nudge_scope:
            await trio.sleep(delay)
        self._nudge_scope = None
        self._nudged = False

    async def _attempt(
        self, host: str, port: int, endpoint: str, attempt: int
    ) -> tuple[ConnectionClosed, float | None]:
        """One attempt and, if it opens, the connection's whole life: how it ended and,
        if it reached OPEN, for how long it was up."""
        connected_at: float | None = None
        opened: Connection | None = None
        try:
            with trio.CancelScope(deadline=trio.current_time() + self.connect_timeout) as deadline:
                async with self._open(host, port, endpoint) as conn:
                    opened = conn
                    deadline.deadline = inf
                    connected_at = trio.current_time()
                    self.connections += 1
                    self._connection = conn
                    if conn.health is not self.config.status:
                        conn.set_health(self.config.status)  # set_health() during the handshake
                    self._set_state(SupervisorState.CONNECTED)
                    self._emit(Connected(attempt, endpoint, conn))
                    self._nudged = False  # a nudge skips a wait under way, not the next one
                    async with trio.open_nursery() as helpers:
                        # Both are cancellation-safe: what the connection still
                        # holds when it ends is collected below.
                        helpers.start_soon(self._mailbox.forward, conn)
                        helpers.start_soon(self._mailbox.pump, conn)
                        closed = await conn.wait_closed()
                        helpers.cancel_scope.cancel()
                    self._connection = None
                    self._set_state(SupervisorState.DISCONNECTED)
                    return closed, trio.current_time() - connected_at
            return (
                HeartbeatTimeout(
                    CloseCode.HEARTBEAT_TIMEOUT,
                    f"no connection to {endpoint} within {self.connect_timeout} s",
                ),
                None,
            )
        except ConnectionClosed as exc:
            uptime = None if connected_at is None else trio.current_time() - connected_at
            # Kept as a record (events, last_error, ReconnectFailed) without the traceback,
            # whose frames would keep the ended connection and its buffers alive.
            return exc.with_traceback(None), uptime
        except trio.Cancelled as exc:
            # Trio may keep a Cancelled in a cycle of its own for a while; the
            # finished frames it passed through (the connection's context
            # managers) must not keep the connection alive with it.
            forget_frames(exc)
            raise
        finally:
            self._connection = None
            conn = None  # type: ignore[assignment]  # nor this frame, which the traceback holds
            if opened is not None:
                # Nothing accepted is lost: what it never wrote goes out on the next
                # connection, what it received and nobody took goes to the inbox.
                self._mailbox.recover(opened)
                self._mailbox.collect(opened)
                opened = None

    def _open(self, host: str, port: int, endpoint: str) -> AbstractAsyncContextManager[Connection]:
        if self._connector is not None:
            return _open_with_connector(
                self._connector,
                host,
                port,
                endpoint,
                config=self.config,
                options=self._options,
                listeners=self._connection_listeners,
            )
        return open_connection(
            host,
            port,
            config=self.config,
            options=self._options,
            ssl_context=self._ssl_context,
            server_hostname=self._server_hostname,
            connect_timeout=self.connect_timeout,
            keepalive=self._keepalive,
            listeners=self._connection_listeners,
        )

    def _stop(self) -> None:
        # Closed by the caller: CLOSED at once, whatever the loop is doing.
        if self._state is not SupervisorState.CLOSED:
            self._finish(None)

    def _finish(self, error: ReconnectFailed | None) -> None:
        self._set_state(SupervisorState.CLOSED)
        self._mailbox.changed()
        self._emit(Stopped(error))

    async def aclose(self) -> None:
        """Stop reconnecting, deliver what :meth:`send` accepted, and close (CLOSE 1000).

        Messages still waiting for a connection get the config's
        ``close_timeout`` to be handed to one (reconnecting meanwhile, if need
        be, without the backoff wait under way); the connection's own close then
        flushes its queue, as :meth:`Connection.aclose` does. Whatever could not
        be delivered is never dropped in silence: :class:`UndeliveredMessages`
        is raised with it. ``send`` raises :class:`ReconnectFailed` from the
        moment the close begins. Idempotent.
        """
        if self._state is SupervisorState.CLOSED:
            return
        self._closing = True
        self._mailbox.changed()  # a send waiting for room refuses now
        self.nudge()  # deliver now rather than after the wait under way
        with trio.move_on_after(self.config.close_timeout):
            await self._mailbox.wait_sent()
        conn = self._connection
        if conn is not None:
            await conn.aclose()
            self._mailbox.recover(conn)
        self._run_scope.cancel()
        self._stop()
        undelivered = self._mailbox.take_all()
        if undelivered:
            if conn is not None:  # connected, but not fast enough
                reason = f"not written within the close timeout ({self.config.close_timeout:g} s)"
            elif self._last_error is not None:
                reason = str(self._last_error)
            else:
                reason = "never connected"
            raise UndeliveredMessages(undelivered, reason)


@asynccontextmanager
async def open_reconnecting_client(
    endpoints: EndpointSource,
    *,
    config: Config | None = None,
    options: ConnectionOptions | None = None,
    backoff: Iterable[float] = DEFAULT_BACKOFF,
    connect_timeout: float = 10.0,
    healthy_after: float = 10.0,
    buffer_size: int = 1024,
    when_full: Literal["wait", "fail"] = "wait",
    receive_buffer: int = 64,
    stop_codes: Iterable[int] = DEFAULT_STOP_CODES,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    keepalive: KeepaliveOptions | bool | None = True,
    connection_listeners: list[EventListener] | None = None,
    listeners: list[SupervisorListener] | None = None,
    connector: Connector | None = None,
) -> AsyncIterator[ReconnectingClient]:
    """Keep a THB/1 client connected for as long as the ``async with`` block runs.

    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with open_reconnecting_client(["10.0.0.1:9000", "10.0.0.2:9000"]) as client:
    ...         await client.send(b"hello")         # buffered until connected
    ...         async for message in client:        # carries on across reconnects
    ...             print(message)

    Connects at once, then after every ending worth retrying waits the next
    delay of ``backoff`` (any iterable of seconds; the default is full-jitter
    exponential, 0-2 s growing to a 30 s cap) and connects again, moving to the
    next endpoint after a failure. ``connect_timeout`` bounds each attempt
    (TCP, TLS and the THB/1 handshake together). The backoff starts over only
    once a connection has stayed up ``healthy_after`` seconds.

    Close codes steer it (THB/1 §5): after 1001 it reconnects to the next
    endpoint, at once the first time since the last healthy connection and
    after the backoff wait when it happens again; after a code in
    ``stop_codes`` (1008 and 4000 by default) it stops. When it stops, or the
    backoff runs out, the block is cancelled and :class:`ReconnectFailed` is
    raised, with the messages it could not deliver. Leaving the block delivers
    what :meth:`~ReconnectingClient.send` accepted (for ``close_timeout`` at
    most; what is left is raised as :class:`UndeliveredMessages`) and closes
    the connection with CLOSE 1000.

    ``connector`` replaces TCP (and TLS and keepalive) with your own transport:
    an async function ``(host, port) -> trio.abc.Stream``.
    """
    client = ReconnectingClient(
        endpoints,
        config=config,
        options=options,
        backoff=backoff,
        connect_timeout=connect_timeout,
        healthy_after=healthy_after,
        buffer_size=buffer_size,
        when_full=when_full,
        receive_buffer=receive_buffer,
        stop_codes=frozenset(stop_codes),
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        keepalive=keepalive,
        connection_listeners=connection_listeners,
        listeners=listeners,
        connector=connector,
    )
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run)
            try:
                yield client
            except BaseException as exc:
                raised = exc
                if client.buffered and not only_cancelled(exc):
                    exc.add_note(
                        f"{client.buffered} message(s) accepted by send() were not delivered"
                    )
                raise
            await client.aclose()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        reraise_single(group, raised)  # the block's own error as it was raised
    finally:
        raised = None  # no cycle through this frame
        if client._state is not SupervisorState.CLOSED:
            client._finish(None)
