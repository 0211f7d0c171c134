"""Endpoints (``_endpoints.py``): how servers are named, parsed and printed, and the next one to try.

The ``host:port`` spelling (``_address``, tested in test_address.py) taken
from a socket's peer and used by the memory network and the reconnecting
client.
:class:`EndpointCycle` is tested on its own for every kind of source: a list
tried round and round, a function (sync or async) asked again when its list
is used up, an async iterable asked once per attempt, and the sources refused
at once.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
import trio.testing
from helpers import Recorder, reconnecting

from trio_heartbeat import AttemptStarted, Connection, open_reconnecting_client
from trio_heartbeat._endpoints import (
    EndpointCycle,
    EndpointSource,
    peer_address,
)
from trio_heartbeat._errors import NoEndpointLeft
from trio_heartbeat.testing import open_memory_network

# -- a socket's peer -------------------------------------------------------------------


def test_addresses_are_described_from_the_socket() -> None:
    def stream_with(peer: Any) -> Any:
        def getpeername() -> Any:
            if isinstance(peer, Exception):
                raise peer
            return peer

        return SimpleNamespace(socket=SimpleNamespace(getpeername=getpeername))

    assert peer_address(stream_with(("127.0.0.1", 80))) == "127.0.0.1:80"
    assert peer_address(stream_with(("::1", 80, 0, 0))) == "[::1]:80"
    assert peer_address(stream_with("/run/thb.sock")) == "/run/thb.sock"
    assert peer_address(stream_with(OSError(errno.ENOTCONN, "gone"))) is None
    assert peer_address(cast(trio.abc.Stream, SimpleNamespace())) is None


# -- in the memory network and the reconnecting client ---------------------------------


async def echo(conn: Connection) -> None:
    async for message in conn:
        await conn.send(message)


def attempted(record: Recorder) -> list[tuple[float, str]]:
    return [(at, event.endpoint) for at, event in record.of(AttemptStarted)]


async def test_ipv6_endpoints_are_parsed_and_named(autojump_clock: trio.testing.MockClock) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        host = network.listen("[::1]:9000", echo)
        assert host.address == ("::1", 9000)
        assert host.endpoint == "[::1]:9000"
        async with reconnecting(network, ("[::1]:9000",), record) as client:
            await client.wait_connected()
    assert attempted(record) == [(0.0, "[::1]:9000")]


@pytest.mark.parametrize(
    ("endpoints", "error"),
    [("a:1", TypeError), (("a", 1), TypeError), ([], ValueError)],
)
async def test_bad_endpoint_sources_are_refused_at_once(endpoints: Any, error: type) -> None:
    with pytest.raises(error):
        async with open_reconnecting_client(endpoints):
            pass  # pragma: no cover


async def test_a_malformed_endpoint_raises_value_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_network() as network:
        with pytest.raises(ValueError, match="host:port"):
            async with reconnecting(network, ("no-port",)):
                await trio.sleep_forever()


# -- parsing and printing --------------------------------------------------------------


# -- EndpointCycle on its own ----------------------------------------------------------


async def tries(cycle: EndpointCycle, failures: int) -> list[tuple[str, int]]:
    """The endpoint to try before each of ``failures`` failures, then the next one."""
    tried = []
    for _ in range(failures):
        tried.append(await cycle.next())
        cycle.failed()
    tried.append(await cycle.next())
    return tried


async def test_a_list_is_tried_round_and_round_moving_on_only_after_a_failure() -> None:
    cycle = EndpointCycle(["a:1", ("b", 2), "[::1]:3"])
    assert await cycle.next() == await cycle.next() == ("a", 1)  # no failure: stay
    assert await tries(cycle, 4) == [("a", 1), ("b", 2), ("::1", 3), ("a", 1), ("b", 2)]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_function_is_asked_again_once_its_list_is_used_up(kind: str) -> None:
    calls = 0

    def listed() -> list[str]:
        nonlocal calls
        calls += 1
        return [f"a:{calls}", f"b:{calls}"]

    async def listed_later() -> list[str]:
        await trio.lowlevel.checkpoint()
        return listed()

    cycle = EndpointCycle(listed if kind == "sync" else listed_later)
    assert calls == 0  # not asked before the first attempt
    assert await tries(cycle, 3) == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert calls == 2


async def test_an_async_iterable_is_asked_once_per_endpoint_until_it_runs_dry() -> None:
    async def discover() -> AsyncIterator[str]:
        for endpoint in ["a:1", "b:2"]:
            yield endpoint

    cycle = EndpointCycle(discover())
    assert await cycle.next() == ("a", 1)
    cycle.failed()  # nothing to move on from: the iterator gives the next anyway
    assert await cycle.next() == ("b", 2)
    with pytest.raises(NoEndpointLeft, match="the endpoint source ran dry"):
        await cycle.next()


async def test_a_function_with_nothing_to_offer_leaves_no_endpoint() -> None:
    cycle = EndpointCycle(list)
    with pytest.raises(NoEndpointLeft, match="the endpoint source returned no endpoints"):
        await cycle.next()
    cycle.failed()  # nothing pending: nothing happens


@pytest.mark.parametrize(
    ("source", "error", "message"),
    [
        (
            "a:1",
            TypeError,
            "endpoints must be a list of endpoints, not one endpoint: 'a:1'",
        ),
        (("a", 1), TypeError, "endpoints must be a list of endpoints"),
        ([], ValueError, "at least one endpoint is needed"),
    ],
    ids=["a-string", "a-tuple", "an-empty-list"],
)
def test_sources_that_cannot_work_are_refused_when_made(
    source: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        EndpointCycle(cast(EndpointSource, source))
