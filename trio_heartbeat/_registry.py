"""The liveness registry: who is connected to a server, and how they are doing.

Entries are live views, not copies: :class:`PeerInfo` snapshots are built on
demand from each connection's own counters, so keeping the registry current
costs nothing per frame. Only membership and health changes bump the
registry's :attr:`~LivenessRegistry.version` and wake waiters; "last seen"
moves with every frame and is read, not pushed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Final, final, overload

import trio

from ._connection import Connection
from ._events import Liveness
from ._frames import HealthStatus, Role
from ._state import State

__all__ = ["Departure", "LivenessRegistry", "PeerInfo"]

#: How many endings :attr:`LivenessRegistry.departures` remembers.
DEPARTURES_KEPT: Final = 256


@final
@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One open peer, as the server sees it at the moment of the snapshot.

    Times are ``trio.current_time()`` values; ``rtt`` is the smoothed round
    trip in seconds (``None`` until the first PONG). ``liveness`` is SUSPECT
    while a heartbeat is overdue and ``suspicion`` the silence rule's level.
    """

    peer_id: str
    address: str | None
    connected_since: float
    last_seen: float | None
    rtt: float | None
    health: HealthStatus | None
    state: State
    liveness: Liveness
    suspicion: float
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int


def _snapshot(conn: Connection) -> PeerInfo:
    stats = conn.statistics()
    assert stats.opened_at is not None
    return PeerInfo(
        peer_id=stats.peer_id or "",
        address=conn.remote_address,
        connected_since=stats.opened_at,
        last_seen=stats.last_received,
        rtt=stats.srtt,
        health=stats.peer_health,
        state=stats.state,
        liveness=conn.liveness,
        suspicion=conn.suspicion,
        frames_in=stats.frames_in,
        frames_out=stats.frames_out,
        bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out,
    )


@final
@dataclass(frozen=True, slots=True)
class Departure:
    """A peer that left: when, and how its connection ended.

    ``reason`` says it for a verdict on a silent peer: ``heartbeat timeout:
    peer silent``, or ``heartbeat timeout: we were stalled``.
    """

    peer_id: str
    address: str | None
    left_at: float
    code: int
    reason: str
    by_peer: bool


@final
class _JsonEntries(Sequence[dict[str, object]]):
    """Peers as JSON-ready dicts, each built only when it is read."""

    __slots__ = ("_connections",)

    def __init__(self, connections: list[Connection]) -> None:
        self._connections = connections

    def __len__(self) -> int:
        return len(self._connections)

    @overload
    def __getitem__(self, index: int) -> dict[str, object]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, object]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, object] | list[dict[str, object]]:
        if isinstance(index, slice):
            return [_json_entry(conn) for conn in self._connections[index]]
        return _json_entry(self._connections[index])

    def __iter__(self) -> Iterator[dict[str, object]]:
        for conn in self._connections:
            yield _json_entry(conn)


def _json_entry(conn: Connection) -> dict[str, object]:
    now, wall = trio.current_time(), time.time()
    stats = conn.statistics()
    assert stats.opened_at is not None
    last_seen = stats.last_received
    health = stats.peer_health
    return {
        "id": stats.peer_id or "",
        "address": conn.remote_address,
        "connected_since": round(wall - (now - stats.opened_at), 3),
        "last_seen": None if last_seen is None else round(wall - (now - last_seen), 3),
        "rtt": stats.srtt,
        "health": None if health is None else health.name,
        "state": stats.state.name,
        "liveness": conn.liveness.name,
    }


@final
class LivenessRegistry:
    """Every open connection of a server, queryable and awaitable.

    >>> async def report(server: "Server") -> None:  # doctest: +SKIP
    ...     for peer in server.registry:
    ...         print(peer.peer_id, peer.address, peer.rtt, peer.health)
    ...     await server.registry.wait_changed()  # someone joined, left or changed health

    A connection is listed from the moment its handshake completes until it
    ends, however it ends; once every connection is gone the registry is empty.
    """

    def __init__(self) -> None:
        self._connections: dict[Connection, None] = {}
        self._by_id: dict[str, Connection] = {}
        self._changed = trio.Event()
        self.version = 0
        #: The last endings of listed connections, oldest first (at most 256).
        self.departures: deque[Departure] = deque(maxlen=DEPARTURES_KEPT)

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self) -> Iterator[PeerInfo]:
        return iter(self.snapshot())

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._by_id

    def snapshot(self) -> list[PeerInfo]:
        """A :class:`PeerInfo` for every open connection, in order of arrival."""
        return [_snapshot(conn) for conn in self._connections]

    def as_json(self, limit: int | None = None) -> list[dict[str, object]]:
        """The snapshot as JSON-ready values, for an HTTP probe (``/peers``) or a log.

        Times are wall-clock Unix seconds here (only for people to read: the
        registry itself keeps ``trio.current_time()``); statuses are names;
        ``rtt`` and ``last_seen`` are ``None`` until known. ``limit`` lists the
        first peers only; the others cost nothing.
        """
        return [_json_entry(conn) for conn in islice(self._connections, limit)]

    def json_entries(self) -> Sequence[dict[str, object]]:
        """The entries of :meth:`as_json` as a sequence that builds each one when read.

        It holds the peers open now; ``len()`` counts them without building
        an entry. A peer that leaves meanwhile stays in it, described as it is
        when its entry is built, so that a long list can be built a slice at a
        time with checkpoints in between (``/peers`` does).
        """
        return _JsonEntries(list(self._connections))

    def get(self, peer_id: str) -> PeerInfo | None:
        """The peer with this non-empty instance id, if connected."""
        conn = self._by_id.get(peer_id)
        return None if conn is None else _snapshot(conn)

    def connection(self, peer_id: str) -> Connection | None:
        """The live :class:`Connection` of the peer with this instance id, to send to it."""
        return self._by_id.get(peer_id)

    def connections(self) -> list[Connection]:
        """Every live connection, in order of arrival."""
        return list(self._connections)

    async def wait_changed(self) -> None:
        """Wait until a peer joins, leaves, reports a different health status, or becomes
        SUSPECT or ALIVE again."""
        await self._changed.wait()

    async def wait_until(self, predicate: Callable[[LivenessRegistry], bool]) -> None:
        """Wait until ``predicate(registry)`` is true; checked after every change.

        >>> await registry.wait_until(lambda r: len(r) == 0)  # doctest: +SKIP
        """
        while not predicate(self):
            await self.wait_changed()

    # -- kept up to date by the server -----------------------------------------

    def add(self, conn: Connection) -> Connection | None:
        """List ``conn``, whose handshake is done; return the older connection it replaces.

        The server calls this (and :meth:`remove` and :meth:`health_changed`)
        for its own connections; call it yourself only for connections you
        serve by hand. A server connection with a non-empty peer id takes the
        id over from an older one, which is unlisted at once (the caller
        closes it with 4000): an id always names the one connection listed
        under it.
        """
        replaced = None
        peer_id = conn.peer_id
        if peer_id and conn.role is Role.SERVER:
            replaced = self._by_id.get(peer_id)
            self._by_id[peer_id] = conn
            if replaced is not None:
                del self._connections[replaced]
        self._connections[conn] = None
        self._bump()
        return replaced

    def remove(self, conn: Connection) -> None:
        """Unlist ``conn``, however it ended; removing one that is not listed changes nothing."""
        if conn in self._connections:
            del self._connections[conn]
            peer_id = conn.peer_id
            if peer_id and self._by_id.get(peer_id) is conn:
                del self._by_id[peer_id]
            ending = conn.closed
            if ending is not None:
                self.departures.append(
                    Departure(
                        peer_id or "",
                        conn.remote_address,
                        trio.current_time(),
                        ending.code,
                        ending.reason,
                        ending.by_peer,
                    )
                )
            self._bump()

    def health_changed(self, conn: Connection) -> None:
        """``conn``'s peer reported a different health status, or became SUSPECT or ALIVE
        again: wake the waiters."""
        if conn in self._connections:
            self._bump()

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()
