"""Serving THB/1: accepting, limits, the liveness registry and graceful drain.

Theory of operation
-------------------
A :class:`Server` owns two cancel scopes inside its nursery: one around the
accept loops and one, the nursery's own, around every connection. Each
accepted stream becomes one task that runs :func:`open_stream_connection` with
the user's handler inside, so everything a connection owns (its reader, writer,
the handler, the socket, its registry entry) lives and dies in that one task.

Limits apply before a peer can cost us much: a connection counts against
``max_connections`` from the moment it is accepted, not from the end of its
handshake, so a crowd of clients that never say HELLO cannot crowd out the
rest; at capacity a newcomer gets CLOSE 1013 instead of HELLO. The handshake
timeout, frame limits, HELLO ranges and PING strikes are the protocol core's,
enforced per connection.

:meth:`Server.drain` stops accepting, sends CLOSE 1001 to every peer at once
(ahead of any queued DATA), waits for the connections to end up to a bound, and
then cancels whatever is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, final

import trio

from ._budget import BufferBudget
from ._config import Config
from ._connection import Connection, EventListener
from ._endpoints import peer_address
from ._errors import ConnectionClosed
from ._events import (
    ConnectionEnded,
    Event,
    HandshakeComplete,
    PeerHealthChanged,
    PeerRecovered,
    PeerSuspected,
)
from ._frames import CloseCode, HealthStatus, Role, encode_close
from ._groups import forget_frames, reraise_single
from ._keepalive import KeepaliveOptions, resolve_keepalive, try_apply_keepalive
from ._options import ConnectionOptions
from ._registry import LivenessRegistry
from ._stream_connection import open_stream_connection

__all__ = ["Handler", "Server", "ServerStatistics", "serve_tcp"]

logger = logging.getLogger("trio_heartbeat.server")

#: What a server runs for each connection once its handshake is done.
Handler = Callable[[Connection], Awaitable[object]]

#: What all of a server's connections may hold in their queues together, by default.
DEFAULT_BUFFER_BUDGET: Final = 256 << 20
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
#: How long to keep trying to tell a refused client why, before closing on it.
_REFUSAL_SECONDS: Final = 1.0
#: The name of every accepted connection's task (one string, not one per task).
_CONNECTION_TASK: Final = "trio_heartbeat.Server.connection"


@final
@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """Counters of a :class:`Server` since it started."""

    active: int
    handshaking: int
    accepted: int
    refused: int
    completed_handshakes: int
    closed_by_code: dict[int, int]


def _describe_ending(ending: ConnectionClosed) -> str:
    reason = f" ({ending.reason})" if ending.reason else ""
    who = "the peer" if ending.by_peer else "us"
    return f"ended with {ending.code}{reason}, closed by {who}"


@final
class Server:
    """A THB/1 server: runs ``handler(conn)`` for every client that completes the handshake.

    >>> async def echo(conn: Connection) -> None:
    ...     async for message in conn:
    ...         await conn.send(message)
    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with trio.open_nursery() as nursery:
    ...         server = await nursery.start(serve_tcp, echo, 9000)
    ...         print(len(server.registry), "peers")

    ``config`` is the server's THB/1 side (interval, timeout, limits, secret);
    ``options`` the runtime settings of each connection. ``max_buffered_bytes``
    bounds the bytes all connections hold in their queues together (256 MiB
    by default): past it, the connections that hold the most are cut off with
    CLOSE 1013 rather than let the server grow (see :class:`BufferBudget`;
    ``options`` with a ``budget`` of their own keep it). ``keepalive`` sets TCP
    keepalive on accepted sockets (derived from the heartbeat settings by
    default; ``None`` leaves the OS defaults). ``ssl_context`` turns on TLS;
    require client certificates in it for mutual TLS.

    A handler's exception is logged and ends its own connection with CLOSE
    1001; it never affects other connections or the server.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        config: Config | None = None,
        options: ConnectionOptions | None = None,
        max_connections: int = 4096,
        max_buffered_bytes: int = DEFAULT_BUFFER_BUDGET,
        drain_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        keepalive: KeepaliveOptions | bool | None = True,
        listeners: list[EventListener] | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.handler = handler
        self.config = config if config is not None else Config()
        options = options if options is not None else ConnectionOptions()
        if options.budget is None:
            options = dataclasses.replace(options, budget=BufferBudget(max_buffered_bytes))
        self.options = options
        self.max_connections = max_connections
        self.drain_timeout = drain_timeout
        self.ssl_context = ssl_context
        self.keepalive = resolve_keepalive(keepalive, self.config.interval, self.config.timeout)
        self.registry = LivenessRegistry()
        self.listeners: list[trio.SocketListener] = []
        self._port: int | None = None
        self._event_listeners = (self._on_event, *(listeners or ()))
        self._accept_scope = trio.CancelScope()
        self._connections_scope: trio.CancelScope | None = None
        # One per handle_stream call, so that drain() can cancel streams that
        # custom transports and tests serve outside our nursery too.
        self._stream_scopes: set[trio.CancelScope] = set()
        self._draining = False
        self._drain_begun = trio.Event()
        self._active = 0
        # The connections being served, those the registry no longer lists
        # (replaced by a newer one, still closing) included: drain waits for them.
        self._serving: dict[Connection, None] = {}
        self._handshaking = 0
        self._handshake_settled = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._accepted = 0
        self._refused = 0
        self._completed = 0
        self._closed_by_code: Counter[int] = Counter()

    # -- facts ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The first listener's port (useful after asking for port 0)."""
        if self._port is None:
            raise RuntimeError("the server is not listening on TCP")
        return self._port

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` has begun."""
        return self._draining

    async def wait_draining(self) -> None:
        """Sleep until :meth:`drain` begins (at once if it has)."""
        await self._drain_begun.wait()

    def statistics(self) -> ServerStatistics:
        """Counters since the server started; see :class:`ServerStatistics`."""
        return ServerStatistics(
            active=self._active,
            handshaking=self._handshaking,
            accepted=self._accepted,
            refused=self._refused,
            completed_handshakes=self._completed,
            closed_by_code=dict(self._closed_by_code),
        )

    def set_health(self, status: HealthStatus) -> None:
        """Report ``status`` to every connected peer now, and to every later one in its HELLO."""
        self.config = dataclasses.replace(self.config, status=HealthStatus(status))
        for conn in self.registry.connections():
            conn.set_health(status)

    # -- serving ----------------------------------------------------------------

    async def serve_tcp(
        self,
        port: int,
        host: str | None = "127.0.0.1",
        *,
        backlog: int | None = None,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until drained or cancelled.

        ``host`` is loopback by default, as on the command line, so that
        nothing is served beyond this machine by accident: pass ``"0.0.0.0"``,
        ``"::"`` or ``None`` (every interface) to serve other machines.
        """
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
        await self.serve_listeners(listeners, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on listeners you opened; they are closed when this returns.

        A server whose serving ended with an error may serve again (on new
        listeners: a service supervisor restarting it, say); one that was
        drained stays drained.

        Returns after :meth:`drain` has finished; cancelling it instead tears
        every connection down at once (each still sends CLOSE 1001 if it can).
        An ``accept`` error that is not about capacity (EMFILE and the like
        are retried) ends serving: the connections are torn down and that
        :class:`OSError` is raised, on its own rather than in an exception group.
        """
        self.listeners = listeners
        if listeners:
            self._port = listeners[0].socket.getsockname()[1]
        try:
            await self._serve(listeners, task_status)
        except BaseExceptionGroup as group:
            # Connection tasks never raise: besides cancellations, a group holds
            # the one accept error.
            reraise_single(group)

    async def _serve(
        self, listeners: list[trio.SocketListener], task_status: trio.TaskStatus[Server]
    ) -> None:
        # A scope is entered once: a server served again gets another.
        self._accept_scope = trio.CancelScope()
        if self._draining:
            self._accept_scope.cancel()
        async with trio.open_nursery() as connections:
            self._connections_scope = connections.cancel_scope
            try:
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self._accept_loop, listener, connections)
                        task_status.started(self)
            finally:
                # Closed as soon as accepting stops, not when the last
                # connection is gone: during a drain, a newcomer is refused
                # by the kernel at once rather than left waiting for a HELLO.
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                # Out of file descriptors or memory: back off instead of spinning;
                # connections that end meanwhile free what we need.
                logger.error("accept failed (%s); retrying in 100 ms", errno.errorcode[exc.errno])
                await trio.sleep(0.1)
                continue
            if self.keepalive is not None:
                try_apply_keepalive(stream.socket, self.keepalive)
            # Not handle_stream: drain reaches these through the connections
            # nursery's scope, so each needs no scope (nor task frame) of its own.
            connections.start_soon(self._serve_stream, stream, None, name=_CONNECTION_TASK)

    async def handle_stream(self, stream: trio.abc.Stream, address: str | None = None) -> None:
        """Serve one already-accepted stream to its end (for custom transports and tests).

        Applies the capacity limit, TLS, the handshake, the id takeover rule,
        and runs the handler; never raises for anything the peer or the handler did.
        :meth:`drain` cancels it at its bound, whichever nursery runs it.
        """
        with trio.CancelScope() as scope:
            self._stream_scopes.add(scope)
            try:
                await self._serve_stream(stream, address)
            finally:
                self._stream_scopes.discard(scope)

    async def _serve_stream(self, stream: trio.abc.Stream, address: str | None) -> None:
        self._accepted += 1
        address = address if address is not None else peer_address(stream)
        if self.ssl_context is not None:
            # Before any refusal too: a TLS client can only read a CLOSE sent over TLS.
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        if self._draining:
            await self._refuse(stream, CloseCode.GOING_AWAY, "server draining", address)
            return
        if self._active >= self.max_connections:
            await self._refuse(stream, CloseCode.TRY_AGAIN_LATER, "server at capacity", address)
            return
        self._active += 1
        self._handshaking += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        handshaking = True
        conn: Connection | None = None
        replaced: Connection | None = None
        try:
            async with open_stream_connection(
                stream,
                role=Role.SERVER,
                config=self.config,
                options=self.options,
                listeners=self._event_listeners,
                remote_address=address,
            ) as conn:
                handshaking = False
                self._handshaking -= 1
                self._settle_handshake()
                self._completed += 1
                self._serving[conn] = None
                replaced = self.registry.add(conn)
                if conn.health is not self.config.status:
                    # set_health() ran during this handshake, after our HELLO.
                    conn.set_health(self.config.status)
                if replaced is not None:
                    logger.info(
                        "%s: id %r taken over by %s", replaced.remote_address, conn.peer_id, address
                    )
                    replaced.close_nowait(
                        CloseCode.REPLACED, "replaced by a newer connection", flush=False
                    )
                if self.draining:  # drain() began during the handshake
                    conn.close_nowait(CloseCode.GOING_AWAY, "server draining", flush=False)
                await self.handler(conn)
        except ConnectionClosed:
            pass  # counted and logged the moment it ended (_on_event)
        except Exception as exc:
            logger.exception("%s: handler failed", address)
            # Trio may keep the error alive in a cycle of its own (with the
            # cancellations its nursery sent): without the variables of the
            # frames it passed through, the connection among them.
            forget_frames(exc)
        finally:
            if handshaking:
                self._handshaking -= 1
                self._settle_handshake()
            if conn is not None:
                self.registry.remove(conn)
                self._serving.pop(conn, None)
            self._active -= 1
            if self._active == 0:
                self._idle.set()
            # Trio may keep a handler's error alive for a while, and its
            # traceback holds this frame: hold no connection.
            conn = replaced = None

    def _settle_handshake(self) -> None:
        self._handshake_settled.set()
        self._handshake_settled = trio.Event()

    async def _refuse(
        self, stream: trio.abc.Stream, code: int, reason: str, address: str | None
    ) -> None:
        self._refused += 1
        logger.info("%s: refused with %d (%s)", address, code, reason)
        try:
            with trio.move_on_after(_REFUSAL_SECONDS):
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await stream.send_all(encode_close(code, reason))
        finally:
            await trio.aclose_forcefully(stream)  # even when cancelled

    def _on_event(self, conn: Connection, event: Event) -> None:
        if type(event) is PeerHealthChanged:
            logger.info(
                "%s: peer %r health %s -> %s",
                conn.remote_address,
                conn.peer_id,
                event.previous.name,
                event.status.name,
            )
            self.registry.health_changed(conn)
        elif type(event) is PeerSuspected or type(event) is PeerRecovered:
            logger.debug("%s: peer %r %s", conn.remote_address, conn.peer_id, event)
            self.registry.health_changed(conn)
        elif type(event) is HandshakeComplete:
            name = event.peer.instance_id
            logger.info("%s: connected%s", conn.remote_address, f", id '{name}'" if name else "")
        elif type(event) is ConnectionEnded:
            # Counted, logged (one line per connection, however it ended) and
            # unlisted the moment it ends, not when its handler returns: the
            # registry lists the live connections, and a handler may run on.
            ending = conn.closed
            assert ending is not None  # recorded before listeners hear of it
            self._closed_by_code[ending.code] += 1
            if (
                conn.opened_at is None
                and not ending.by_peer
                and ending.code == CloseCode.POLICY_VIOLATION
            ):
                self._refused += 1  # its HELLO was refused (credentials, values)
            logger.info("%s: %s", conn.remote_address, _describe_ending(ending))
            self.registry.remove(conn)

    # -- draining ---------------------------------------------------------------

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting, say GOING_AWAY (1001) to every peer, and wait for them to go.

        Waits up to ``grace`` seconds (default: ``drain_timeout``) for every
        connection to end: peers answer the CLOSE, and a connection still in
        its handshake is closed as soon as that completes. Then it cancels
        whatever is left, handlers still busy with a connection that has
        already ended included, and returns once the server holds no
        connection at all. Safe to call more than once.
        """
        self._draining = True
        self._drain_begun.set()
        self._accept_scope.cancel()
        for conn in list(self._serving):
            conn.close_nowait(CloseCode.GOING_AWAY, "server draining", flush=False)
        with trio.move_on_after(self.drain_timeout if grace is None else grace) as bound:
            await self._connections_ended()
        if self._active:
            if bound.cancelled_caught:
                logger.warning(
                    "drain timed out with %d connection(s) left; cancelling them", self._active
                )
            for scope in self._stream_scopes:
                scope.cancel()
            if self._connections_scope is not None:
                self._connections_scope.cancel()
        await self._idle.wait()

    async def _connections_ended(self) -> None:
        while True:
            live = [conn for conn in self._serving if conn.closed is None]
            if live:
                await live[0].wait_closed()
            elif self._handshaking:
                await self._handshake_settled.wait()
            else:
                return


async def serve_tcp(
    handler: Handler,
    port: int,
    *,
    host: str | None = "127.0.0.1",
    config: Config | None = None,
    options: ConnectionOptions | None = None,
    max_connections: int = 4096,
    max_buffered_bytes: int = DEFAULT_BUFFER_BUDGET,
    drain_timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    keepalive: KeepaliveOptions | bool | None = True,
    listeners: list[EventListener] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve THB/1 on a TCP port; with ``nursery.start`` you get the :class:`Server` back.

    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with trio.open_nursery() as nursery:
    ...         server = await nursery.start(serve_tcp, echo, 0)
    ...         print("listening on", server.port)

    All keyword arguments are those of :class:`Server`.
    """
    server = Server(
        handler,
        config=config,
        options=options,
        max_connections=max_connections,
        max_buffered_bytes=max_buffered_bytes,
        drain_timeout=drain_timeout,
        ssl_context=ssl_context,
        keepalive=keepalive,
        listeners=listeners,
    )
    await server.serve_tcp(port, host, task_status=task_status)
