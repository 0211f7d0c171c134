"""A TCP proxy on loopback that injects the same faults as the in-memory streams.

Each accepted connection gets a wire (see ``_wire``) and one outgoing
connection to the target; four pump tasks (see ``_pumps``) move bytes
socket -> wire -> socket in both directions, so every fault of
:class:`~trio_heartbeat.testing.Faults` applies to real TCP traffic. The
proxy's client is the near end: OUTBOUND is client to target. All tasks live
in the nursery of :meth:`FaultProxy.serve`, and every socket is closed when
its connection ends or ``serve`` is cancelled.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal, final

import trio

from ._faults import Faults, FaultStatistics, LinkStatistics, Side
from ._pumps import abort_stream, splice
from ._wire import DEFAULT_BUFFER_SIZE, _Wire

__all__ = ["FaultProxy", "ProxyConnection", "ProxyStatistics"]


@final
@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """Counters of a :class:`FaultProxy` since it was made."""

    #: Client connections accepted.
    connections_accepted: int
    #: Connections accepted and not yet ended (including any still dialling the target).
    connections_active: int
    #: Accepted connections dropped because the target could not be reached.
    connections_failed: int
    #: Connections that ended in a reset (injected, or a socket failing).
    connections_reset: int
    #: Client-to-target bytes, summed over the connections using the proxy's faults.
    outbound: LinkStatistics
    #: Target-to-client bytes, likewise.
    inbound: LinkStatistics


@final
class ProxyConnection:
    """One proxied connection, for faults aimed at it alone.

    The settings (blackhole, delay, ...) are the proxy's and are shared by all
    connections; the terminal events can target one connection. Handles come
    from :attr:`FaultProxy.connections`; not constructed directly.
    """

    def __init__(self, wire: _Wire, client_address: tuple[str, int]) -> None:
        self._wire = wire
        #: The client's (host, port).
        self.client_address = client_address

    def reset(self) -> None:
        """Send an RST to both the client and the target."""
        self._wire.reset()

    def half_open(
        self, side: Side = Side.NEAR, *, peer_sees: Literal["eof", "reset"] = "reset"
    ) -> None:
        """Make this connection half-open; see :meth:`Faults.half_open`."""
        if peer_sees not in ("eof", "reset"):
            raise ValueError(f'peer_sees must be "eof" or "reset", not {peer_sees!r}')
        self._wire.half_open(side, peer_sees)

    def statistics(self) -> FaultStatistics:
        """Byte counters of this connection alone."""
        return self._wire.statistics()


def _require_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the fault proxy listens on loopback IP addresses only, not {host!r}")


@final
class FaultProxy:
    """A loopback TCP proxy whose faults can be changed while traffic flows.

    Every connection to the proxy is forwarded to the target through the
    controls in :attr:`faults` (shared by all connections; see
    :class:`~trio_heartbeat.testing.Faults`), so ``proxy.faults.set_delay(0.1)``
    or ``proxy.faults.blackhole()`` affect what is connected now and what
    connects later. Each direction of each connection buffers at most
    ``buffer_size`` bytes in the proxy; past that the proxy stops reading and
    TCP's own backpressure reaches the sender.

    A reset (:meth:`reset_all`, ``faults.reset()``, or
    :meth:`ProxyConnection.reset`) sends an RST to both sides, so both see
    :exc:`trio.BrokenResourceError`. If the target cannot be reached, the
    client's connection is reset and counted in ``connections_failed``.

    Example::

        proxy = FaultProxy()
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve, "127.0.0.1", server_port)
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            proxy.faults.blackhole()             # no bytes either way now
            ...
            proxy.faults.heal()
            nursery.cancel_scope.cancel()        # closes every socket
    """

    def __init__(
        self, faults: Faults | None = None, *, buffer_size: int = DEFAULT_BUFFER_SIZE
    ) -> None:
        self._faults = Faults() if faults is None else faults
        self._buffer_size = buffer_size
        self._port: int | None = None
        self._serving = False
        self._connections: dict[ProxyConnection, None] = {}
        self._accepted = 0
        self._failed = 0
        self._reset = 0

    @property
    def faults(self) -> Faults:
        """The controls applied to every proxied connection."""
        return self._faults

    @property
    def port(self) -> int:
        """The port the proxy listens on; RuntimeError before :meth:`serve` has started."""
        if self._port is None:
            raise RuntimeError(
                "the proxy is not listening yet; use nursery.start(proxy.serve, ...)"
            )
        return self._port

    @property
    def connections(self) -> tuple[ProxyConnection, ...]:
        """The connections being proxied now, oldest first."""
        return tuple(self._connections)

    def reset_all(self) -> None:
        """Reset every current connection (RST to both sides); new ones are unaffected."""
        for connection in self.connections:
            connection.reset()

    def statistics(self) -> ProxyStatistics:
        """Connection and byte counters."""
        bytes_ = self._faults.statistics()
        return ProxyStatistics(
            connections_accepted=self._accepted,
            connections_active=len(self._connections),
            connections_failed=self._failed,
            connections_reset=self._reset,
            outbound=bytes_.outbound,
            inbound=bytes_.inbound,
        )

    async def serve(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``listen_host:listen_port`` and proxy to the target until cancelled.

        Use it with ``nursery.start``, which returns the listening port (also
        at :attr:`port`). ``listen_host`` must be a loopback IP address. Every
        per-connection task runs in a nursery inside this call; cancelling it
        closes the listener and every proxied socket. A proxy serves once.
        """
        _require_loopback(listen_host)
        if self._serving:
            raise RuntimeError("this FaultProxy is already serving")
        self._serving = True
        listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
        try:
            async with trio.open_nursery() as nursery:
                self._port = listeners[0].socket.getsockname()[1]
                task_status.started(self._port)
                for listener in listeners:
                    nursery.start_soon(
                        self._accept_loop, listener, nursery, target_host, target_port
                    )
        finally:
            self._port = None
            with trio.CancelScope(shield=True):  # close every one, even when cancelled
                for listener in listeners:
                    await trio.aclose_forcefully(listener)

    async def _accept_loop(
        self,
        listener: trio.SocketListener,
        nursery: trio.Nursery,
        target_host: str,
        target_port: int,
    ) -> None:
        while True:
            client = await listener.accept()
            self._accepted += 1
            nursery.start_soon(self._proxy, client, target_host, target_port)

    async def _proxy(self, client: trio.SocketStream, target_host: str, target_port: int) -> None:
        # Registered before the target is dialled: once the target has
        # accepted, faults aimed at "every current connection" reach this one.
        wire = _Wire(self._faults, self._buffer_size)
        try:
            host, port = client.socket.getpeername()[:2]
        except OSError:  # the client is already gone; the pumps will notice
            host, port = "", 0
        connection = ProxyConnection(wire, (host, port))
        self._connections[connection] = None
        try:
            try:
                target = await trio.open_tcp_stream(target_host, target_port)
            except OSError:
                self._failed += 1
                await abort_stream(client)
                return
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(splice, client, wire.outbound, wire.inbound, wire)
                    nursery.start_soon(splice, target, wire.inbound, wire.outbound, wire)
            finally:
                await trio.aclose_forcefully(target)
        finally:
            wire.discard()
            del self._connections[connection]
            if wire.was_reset:
                self._reset += 1
            await trio.aclose_forcefully(client)
