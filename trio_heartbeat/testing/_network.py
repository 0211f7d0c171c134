"""An in-memory network: servers and clients in one process, in virtual time.

Theory of operation
-------------------
A :class:`MemoryNetwork` is a table of *hosts*, one per ``(host, port)``
address, and a nursery that runs their servers. :meth:`MemoryNetwork.connect`
has the shape of the reconnecting client's ``connector=``: it looks the address
up, makes a :func:`faulty_stream_pair`, starts the host's server on the far end
in the network's nursery and returns the near end. Where nothing listens, or the
host is down, it raises :exc:`ConnectionRefusedError` (``ECONNREFUSED``), as
TCP would.

Each host owns one :class:`Faults`, shared by every connection made to it, so
the fault controls of the other half of this package apply to a whole host at
once: ``host.faults.set_delay(0.05)`` slows every connection to it, and
``host.faults.blackhole()`` partitions them. On top of that a host can be
*killed* (every current connection reset, as by a crash: both ends see
:exc:`trio.BrokenResourceError`, never a CLOSE, and the server's tasks for those
connections are cancelled), taken *down* (new attempts refused, or left hanging
as at an unreachable address) and brought *up* again, perhaps with a new server.

There is no real I/O and no task of its own beside the servers, so under
``trio.testing.MockClock(autojump_threshold=0)`` every connection, failure and
reconnection happens at an exact virtual time.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, final

import trio

from .._endpoints import Endpoint, format_endpoint, parse_endpoint
from .._groups import reraise_single
from .._server import Handler, Server
from .._supervisor import ReconnectingClient, open_reconnecting_client
from ._faults import Faults
from ._streams import faulty_stream_pair
from ._wire import DEFAULT_BUFFER_SIZE

__all__ = [
    "Fleet",
    "HostState",
    "MemoryHost",
    "MemoryNetwork",
    "StreamHandler",
    "open_memory_network",
    "run_clients",
    "run_server_and_clients",
]

#: Serves one raw connection: ``handler(stream, address)``. The network closes
#: the stream once the handler returns.
StreamHandler = Callable[[trio.abc.Stream, str], Awaitable[object]]


class HostState(Enum):
    """Whether a :class:`MemoryHost` takes new connections."""

    #: Accepting: every attempt gets a connection to the host's server.
    UP = "up"
    #: Down: attempts fail at once with ``ECONNREFUSED``.
    REFUSING = "refusing"
    #: Down and unreachable: attempts hang until the host is up again (or the
    #: caller's own timeout cancels them), like a SYN that is never answered.
    UNREACHABLE = "unreachable"


def _as_server(server: Server | Handler, server_kwargs: Mapping[str, Any]) -> Server:
    if isinstance(server, Server):
        if server_kwargs:
            raise TypeError("server settings go to Server(...), not with a Server instance")
        return server
    return Server(server, **server_kwargs)


@final
class MemoryHost:
    """One listening address of a :class:`MemoryNetwork`; get it from ``listen``.

    The host's server, or raw stream handler, runs once per accepted
    connection, in the network's nursery. Counters: ``accepted`` and
    ``refused`` connection attempts so far, ``active`` connections whose
    server side is still running.
    """

    def __init__(
        self,
        address: tuple[str, int],
        handler: StreamHandler,
        server: Server | None,
        faults: Faults,
    ) -> None:
        self.address = address
        #: ``"host:port"``, as the reconnecting client names it.
        self.endpoint = format_endpoint(*address)
        #: The THB/1 server behind this address (``None`` for a raw handler).
        self.server = server
        #: Fault controls shared by every connection to this host.
        self.faults = faults
        self.accepted = 0
        self.refused = 0
        self._handler = handler
        self._state = HostState.UP
        self._changed = trio.Event()
        self._scopes: set[trio.CancelScope] = set()

    @property
    def state(self) -> HostState:
        """Whether the host takes new connections; see :class:`HostState`."""
        return self._state

    @property
    def active(self) -> int:
        """Connections whose server side is still running."""
        return len(self._scopes)

    def kill(self) -> None:
        """Reset every current connection abruptly, as a crash would.

        Both ends see :exc:`trio.BrokenResourceError` (no CLOSE frame gets
        out) and the server's tasks for these connections are cancelled.
        New connections are not affected: combine with :meth:`down`.
        """
        self.faults.reset()
        for scope in self._scopes:
            scope.cancel()

    def down(self, *, kill: bool = True, unreachable: bool = False) -> None:
        """Stop taking connections: refuse them, or with ``unreachable=True`` let them hang.

        With ``kill=True`` (the default) every current connection is also
        reset, as by :meth:`kill`; with ``kill=False`` they carry on.
        """
        self._set_state(HostState.UNREACHABLE if unreachable else HostState.REFUSING)
        if kill:
            self.kill()

    def up(self, server: Server | Handler | None = None, **server_kwargs: Any) -> None:
        """Take connections again, from now on served by ``server`` if given.

        ``server`` may be a :class:`Server` or a handler (a fresh
        ``Server(handler, **server_kwargs)`` is made): a restarted process has
        a fresh registry, and a drained :class:`Server` refuses everyone for
        good. Attempts left hanging by an unreachable host go through now.
        """
        if server is not None:
            self.server = _as_server(server, server_kwargs)
            self._handler = self.server.handle_stream
        elif server_kwargs:
            raise TypeError("server settings need a server or handler")
        self._set_state(HostState.UP)

    def restart(self, server: Server | Handler | None = None, **server_kwargs: Any) -> None:
        """:meth:`kill` every connection and come straight back :meth:`up`."""
        self.kill()
        self.up(server, **server_kwargs)

    def _set_state(self, state: HostState) -> None:
        self._state = state
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_reachable(self) -> None:
        while self._state is HostState.UNREACHABLE:
            await self._changed.wait()

    async def _serve(self, stream: trio.abc.Stream, address: str, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._handler(stream, address)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection was reset or closed under the handler: its end, not a bug
        finally:
            self._scopes.discard(scope)
            await trio.aclose_forcefully(stream)


@final
class MemoryNetwork:
    """Named in-memory servers and a connector to reach them; see :func:`open_memory_network`.

    >>> async def test_echo(autojump_clock) -> None:  # doctest: +SKIP
    ...     async with open_memory_network() as network:
    ...         host = network.listen("server:9000", echo)
    ...         async with open_reconnecting_client(
    ...             ["server:9000"], connector=network.connect
    ...         ) as client:
    ...             await client.send(b"hi")
    ...             assert await client.receive() == b"hi"
    ...             host.down()                      # crash: the client backs off
    ...             host.up()                        # and comes back

    Servers run in the nursery the network was given; they never raise
    (:meth:`Server.handle_stream` does not), but a raw handler that raises
    crashes that nursery, so a test sees the error.
    """

    def __init__(self, nursery: trio.Nursery, *, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        self._nursery = nursery
        self._buffer_size = buffer_size
        self._hosts: dict[tuple[str, int], MemoryHost] = {}
        self._ports = itertools.count(49152)

    def listen(
        self,
        endpoint: Endpoint,
        server: Server | Handler,
        *,
        faults: Faults | None = None,
        **server_kwargs: Any,
    ) -> MemoryHost:
        """Serve THB/1 at ``endpoint`` (``"host:port"`` or ``(host, port)``).

        ``server`` is a :class:`Server` or a handler, for which
        ``Server(handler, **server_kwargs)`` is made. ``faults`` are the
        controls shared by every connection to this host (a fresh
        :class:`Faults` by default; give two hosts the same one and a
        :meth:`MemoryHost.kill` of either resets both). Raises :exc:`OSError`
        (``EADDRINUSE``) if the address is taken.
        """
        built = _as_server(server, server_kwargs)
        return self._add(endpoint, built.handle_stream, built, faults)

    def listen_raw(
        self, endpoint: Endpoint, handler: StreamHandler, *, faults: Faults | None = None
    ) -> MemoryHost:
        """Run ``handler(stream, address)`` for every connection to ``endpoint``, no THB/1.

        For peers that misbehave on purpose: a server that never says HELLO,
        or a :class:`tests.helpers.RawPeer`-style script. The stream is closed
        when the handler returns.
        """
        return self._add(endpoint, handler, None, faults)

    def host(self, endpoint: Endpoint) -> MemoryHost:
        """The host listening at ``endpoint``; :exc:`KeyError` if there is none."""
        return self._hosts[parse_endpoint(endpoint)]

    def _add(
        self,
        endpoint: Endpoint,
        handler: StreamHandler,
        server: Server | None,
        faults: Faults | None,
    ) -> MemoryHost:
        address = parse_endpoint(endpoint)
        if address in self._hosts:
            raise OSError(errno.EADDRINUSE, f"address already in use: {format_endpoint(*address)}")
        host = MemoryHost(address, handler, server, Faults() if faults is None else faults)
        self._hosts[address] = host
        return host

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        """Open a connection to ``host:port``; usable as ``connector=`` of a reconnecting client.

        Returns the client's end of a fresh in-memory stream pair whose other
        end the host's server is already serving. Raises
        :exc:`ConnectionRefusedError` (an :exc:`OSError` with ``ECONNREFUSED``)
        if nothing listens there or the host is down; waits while the host is
        unreachable. Cancellable.
        """
        await trio.lowlevel.checkpoint()
        target = self._hosts.get((host, port))
        if target is not None:
            await target._wait_reachable()
        if target is None or target.state is not HostState.UP:
            if target is not None:
                target.refused += 1
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"connection refused: {format_endpoint(host, port)}"
            )
        near, far, _ = faulty_stream_pair(target.faults, buffer_size=self._buffer_size)
        target.accepted += 1
        # Registered before the task starts, so that a kill() right after this
        # returns still reaches the new connection's server side.
        scope = trio.CancelScope()
        target._scopes.add(scope)
        self._nursery.start_soon(target._serve, far, f"memory:{next(self._ports)}", scope)
        return near


@asynccontextmanager
async def open_memory_network(
    *, buffer_size: int = DEFAULT_BUFFER_SIZE
) -> AsyncIterator[MemoryNetwork]:
    """A :class:`MemoryNetwork` whose servers live as long as the ``async with`` block.

    ``buffer_size`` bounds the bytes each direction of a connection holds
    (sent, not yet read) before the sender waits. Leaving the block cancels
    every server task. An exception from the block propagates as itself.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield MemoryNetwork(nursery, buffer_size=buffer_size)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        reraise_single(group)


async def _run_client(
    done: trio.Event,
    kwargs: Mapping[str, Any],
    *,
    task_status: trio.TaskStatus[ReconnectingClient] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with open_reconnecting_client(**kwargs) as client:
        task_status.started(client)
        await done.wait()


@asynccontextmanager
async def run_clients(
    network: MemoryNetwork,
    endpoint: Endpoint,
    clients: int,
    *,
    per_client: Callable[[int], Mapping[str, Any]] | None = None,
    wait_connected: bool = True,
    **client_kwargs: Any,
) -> AsyncIterator[list[ReconnectingClient]]:
    """Run ``clients`` reconnecting clients of ``endpoint`` on ``network`` for the block.

    >>> async def test_many(autojump_clock) -> None:  # doctest: +SKIP
    ...     async with open_memory_network() as network:
    ...         host = network.listen("server:9000", echo)
    ...         async with run_clients(network, "server:9000", 100) as clients:
    ...             host.restart()

    Client ``i`` is ``open_reconnecting_client([endpoint],
    connector=network.connect, **client_kwargs, **per_client(i))``, each in a
    task of its own; ``per_client`` gives a client its own settings (a seeded
    backoff, listeners). The block starts once every client is connected,
    unless ``wait_connected=False``, and gets the clients in order.

    Leaving the block closes every client gracefully (CLOSE 1000). If a client
    gives up (:class:`ReconnectFailed`), the block is cancelled and that error
    raised, as with a single client.
    """
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            running: list[ReconnectingClient] = []
            for i in range(clients):
                kwargs = {
                    "endpoints": [endpoint],
                    "connector": network.connect,
                    **client_kwargs,
                    **(per_client(i) if per_client is not None else {}),
                }
                running.append(await nursery.start(_run_client, done, kwargs))
            if wait_connected:
                for client in running:
                    await client.wait_connected()
            yield running
            done.set()
    except BaseExceptionGroup as group:
        reraise_single(group)


@final
@dataclass(frozen=True, slots=True)
class Fleet:
    """What :func:`run_server_and_clients` runs: one host and its clients."""

    network: MemoryNetwork
    host: MemoryHost
    clients: list[ReconnectingClient]

    @property
    def server(self) -> Server:
        """The THB/1 server behind the host right now."""
        assert self.host.server is not None
        return self.host.server


@asynccontextmanager
async def run_server_and_clients(
    server: Server | Handler,
    clients: int,
    *,
    endpoint: Endpoint = "server:9000",
    network: MemoryNetwork | None = None,
    server_kwargs: Mapping[str, Any] | None = None,
    per_client: Callable[[int], Mapping[str, Any]] | None = None,
    wait_connected: bool = True,
    **client_kwargs: Any,
) -> AsyncIterator[Fleet]:
    """Serve ``server`` at ``endpoint`` on a memory network, with ``clients`` clients of it.

    >>> async def test_fleet(autojump_clock) -> None:  # doctest: +SKIP
    ...     async with run_server_and_clients(echo, 10, backoff=ConstantBackoff(1.0)) as fleet:
    ...         fleet.host.down()                   # every client loses the server
    ...         await trio.sleep(5)
    ...         fleet.host.up()
    ...         for client in fleet.clients:
    ...             await client.wait_connected()

    ``server`` is a :class:`Server` or a handler (then
    ``Server(handler, **server_kwargs)`` is made); the clients are those of
    :func:`run_clients`, with the same ``per_client``, ``wait_connected`` and
    keyword arguments. The network is a fresh one unless ``network`` is given.
    Leaving the block closes every client gracefully, then the network.
    """
    async with AsyncExitStack() as stack:
        if network is None:
            network = await stack.enter_async_context(open_memory_network())
        host = network.listen(endpoint, server, **(server_kwargs or {}))
        running = await stack.enter_async_context(
            run_clients(
                network,
                endpoint,
                clients,
                per_client=per_client,
                wait_connected=wait_connected,
                **client_kwargs,
            )
        )
        yield Fleet(network, host, running)
