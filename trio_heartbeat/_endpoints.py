"""Endpoints: how servers are named, parsed and printed, and where a client finds the next one.

The spelling, ``host:port`` with an IPv6 host in brackets (``[::1]:7400``),
is :mod:`~trio_heartbeat._address`'s, re-exported here. :class:`EndpointCycle` turns any :data:`EndpointSource` (a list, a
function, an async iterable such as a service-discovery stream) into "the next
endpoint to try".
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeAlias, final

import trio

from ._address import Endpoint, format_endpoint, is_single_endpoint, parse_endpoint
from ._errors import NoEndpointLeft

__all__ = [
    "Endpoint",
    "EndpointCycle",
    "EndpointSource",
    "format_endpoint",
    "parse_endpoint",
    "peer_address",
]

#: Where endpoints come from: a fixed list, a function called for a fresh list
#: whenever the last one is used up (sync or async), or an async iterable that
#: yields the next endpoint to try each time (service discovery).
EndpointSource: TypeAlias = (
    Sequence[Endpoint]
    | Callable[[], Sequence[Endpoint] | Awaitable[Sequence[Endpoint]]]
    | AsyncIterable[Endpoint]
)


def peer_address(stream: trio.abc.Stream) -> str | None:
    """The remote address of a socket stream, as :func:`format_endpoint` spells it.

    A Unix socket's path as it is; ``None`` when the stream has no socket or
    the peer is already gone.
    """
    socket = getattr(stream, "socket", None)
    if socket is None:
        return None
    try:
        peer = socket.getpeername()
    except OSError:
        return None
    if isinstance(peer, tuple):
        return format_endpoint(peer[0], peer[1])
    return str(peer)


@final
class EndpointCycle:
    """Turns any :data:`EndpointSource` into "the next endpoint to try".

    A list is tried in turn, round and round, moving on after each failure; a
    function is called for a fresh list each time the last one is used up; an
    async iterable is asked for each endpoint. :meth:`next` raises
    :exc:`NoEndpointLeft` when the source has nothing (more) to give.
    """

    __slots__ = ("_iterator", "_pending", "_source")

    def __init__(self, source: EndpointSource) -> None:
        self._source = source
        self._pending: deque[Endpoint] = deque()
        self._iterator: AsyncIterator[Endpoint] | None = None
        if isinstance(source, str) or is_single_endpoint(source):
            raise TypeError(f"endpoints must be a list of endpoints, not one endpoint: {source!r}")
        if isinstance(source, AsyncIterable):
            self._iterator = aiter(source)
        elif callable(source):
            pass
        elif isinstance(source, Sequence):
            if not source:
                raise ValueError("at least one endpoint is needed")
            for endpoint in source:
                parse_endpoint(endpoint)  # a malformed one fails now, not at its turn
        else:
            raise TypeError(
                "endpoints must be a sequence of endpoints, a callable or an async iterable, "
                f"not {type(source).__name__}"
            )

    async def next(self) -> tuple[str, int]:
        """The endpoint to try now."""
        if self._iterator is not None:
            try:
                return parse_endpoint(await anext(self._iterator))
            except StopAsyncIteration:
                raise NoEndpointLeft("the endpoint source ran dry") from None
        if not self._pending:
            source = self._source
            if callable(source):
                listed = source()
                if isinstance(listed, Awaitable):
                    listed = await listed
            else:
                assert isinstance(source, Sequence)
                listed = source
            self._pending.extend(listed)
            if not self._pending:
                raise NoEndpointLeft("the endpoint source returned no endpoints")
        return parse_endpoint(self._pending[0])

    def failed(self) -> None:
        """Move on from the endpoint just tried (it failed)."""
        if not self._pending:
            return
        if callable(self._source):
            self._pending.popleft()  # the next call to the source refreshes the list
        else:
            self._pending.rotate(-1)
