"""A circuit breaker driven by liveness: bound to a connection or a reconnecting client.

Theory of operation
-------------------
A breaker library learns that a peer is gone from calls that fail, one
timeout at a time. Our connections already know: the failure detector
convicts a silent peer, the peer says NOT_SERVING in its heartbeats, the
reconnecting client loses its connection. :func:`bind_breaker` turns each of
those into :meth:`Breaker.force_open` *from the listener that hears it*, so
the breaker is ``FORCED_OPEN`` at the same ``trio.current_time()`` as the
conviction, with no failed call needed and no task in between:

* the bound connection ends (a heartbeat timeout, a CLOSE, a broken
  transport), or the reconnecting client is not connected;
* the peer reports NOT_SERVING (in a PING or a PONG, or at the handshake).

The breaker leaves ``FORCED_OPEN`` (for ``HALF_OPEN``, where its trial calls
decide) only when a heartbeat from a SERVING peer gets through: a PING or a
PONG saying SERVING, or, for a client, a new connection whose server said
SERVING in its verdict. A DEGRADED peer keeps a forced-open breaker open; a
breaker opened by failed calls goes on by its own rules.

No call reaches a peer the breaker opened on: from the listener's return,
every :meth:`Breaker.call` and ``async with breaker`` raises :exc:`CircuitOpen`
until liveness comes back (calls already under way finish as they will).
"""

from __future__ import annotations

from types import TracebackType
from typing import Final, final

from ._breaker import BreakerState
from ._circuit import Breaker
from ._connection import Connection
from ._events import (
    ConnectionEnded,
    Event,
    PeerHealthChanged,
    PingReceived,
    PongReceived,
)
from ._frames import HealthStatus
from ._reconnect_events import (
    Connected,
    Disconnected,
    Stopped,
    SupervisorEvent,
    SupervisorState,
)
from ._supervisor import ReconnectingClient

__all__ = ["LivenessBinding", "bind_breaker"]

_HEARTBEATS: Final = (PingReceived, PongReceived)


@final
class LivenessBinding:
    """What :func:`bind_breaker` returns; :meth:`unbind` (or leaving a ``with``) undoes it."""

    __slots__ = ("_bound", "_client", "breaker")

    def __init__(self, breaker: Breaker) -> None:
        #: The breaker this binding drives.
        self.breaker = breaker
        # The connection whose events we hear, and the client that hands them over.
        self._bound: Connection | None = None
        self._client: ReconnectingClient | None = None

    def __repr__(self) -> str:
        source = self._client if self._client is not None else self._bound
        return f"<LivenessBinding {self.breaker!r} to {source!r}>"

    def unbind(self) -> None:
        """Stop driving the breaker; it stays in the state it is in. Idempotent."""
        if self._client is not None:
            self._client.remove_listener(self._on_supervisor)
            self._client = None
        self._follow(None)

    def __enter__(self) -> LivenessBinding:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unbind()

    # -- what the connection says -----------------------------------------------------

    def _follow(self, conn: Connection | None) -> None:
        if self._bound is not None:
            self._bound.remove_listener(self._on_event)
        self._bound = None
        if conn is None:
            return
        closed = conn.closed
        if closed is not None:  # nothing more can come: not listened to at all
            self._ended(closed.code, closed.reason)
            return
        self._bound = conn
        conn.add_listener(self._on_event)
        if conn.peer_health is HealthStatus.NOT_SERVING:
            self.breaker.force_open("peer reports NOT_SERVING")
        elif conn.peer_health is HealthStatus.SERVING and conn.opened_at is not None:
            self._restored()

    def _on_event(self, _conn: Connection, event: Event) -> None:
        kind = type(event)
        if kind in _HEARTBEATS:
            assert isinstance(event, (PingReceived, PongReceived))
            if event.status is HealthStatus.SERVING:
                self._restored()
        elif kind is PeerHealthChanged:
            # The HELLO's status is read by _follow: a binding starts after the handshake.
            assert isinstance(event, PeerHealthChanged)
            if event.status is HealthStatus.NOT_SERVING:
                self.breaker.force_open("peer reports NOT_SERVING")
        elif kind is ConnectionEnded:
            assert isinstance(event, ConnectionEnded)
            self._ended(event.code, event.reason)
            # Nothing more can come: let go of it (it and we would be a cycle that
            # keeps an ended connection alive until a full collection).
            self._follow(None)

    def _ended(self, code: int, reason: str) -> None:
        self.breaker.force_open(f"connection ended: {code} {reason}".rstrip())

    def _restored(self) -> None:
        # Every heartbeat asks; only a forced-open breaker has anything to do.
        if self.breaker.core.state is BreakerState.FORCED_OPEN:
            self.breaker.liveness_restored()

    # -- what the reconnecting client says ----------------------------------------------

    def _on_supervisor(self, event: SupervisorEvent) -> None:
        kind = type(event)
        if kind is Connected:
            assert isinstance(event, Connected)
            self._follow(event.connection)
        elif kind is Disconnected or kind is Stopped:
            self._follow(None)
            self.breaker.force_open("disconnected")
            if kind is Stopped and self._client is not None:
                # Stopped for good: let go of it (it and we would be a cycle).
                self._client.remove_listener(self._on_supervisor)
                self._client = None


def bind_breaker(breaker: Breaker, source: Connection | ReconnectingClient) -> LivenessBinding:
    """Drive ``breaker`` by ``source``'s liveness: open at the conviction, half-open at the
    next heartbeat from a SERVING peer (see the module's documentation).

    ``source`` is a :class:`Connection`, for its life, or a
    :class:`ReconnectingClient`, across its connections: then the breaker is
    forced open whenever the client is not connected. The binding acts at once
    on where ``source`` stands now (a closed connection, a NOT_SERVING peer, a
    client still connecting).

    >>> async def main(client: ReconnectingClient) -> None:  # doctest: +SKIP
    ...     breaker = Breaker()
    ...     with bind_breaker(breaker, client):
    ...         answer = await breaker.call_with_fallback(ask, client, fallback=cached)
    """
    binding = LivenessBinding(breaker)
    if isinstance(source, ReconnectingClient):
        conn = source.connection
        if conn is None:
            breaker.force_open("not connected")
        if source.state is not SupervisorState.CLOSED:  # a stopped one says nothing more
            binding._client = source
            source.add_listener(binding._on_supervisor)
        binding._follow(conn)
    elif isinstance(source, Connection):
        binding._follow(source)
    else:
        raise TypeError(
            f"bind_breaker needs a Connection or a ReconnectingClient, not {type(source).__name__}"
        )
    return binding
