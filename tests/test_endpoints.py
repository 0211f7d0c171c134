"""Endpoints (``_endpoints.py``): how servers are named, parsed and printed, and the next one to try.

One spelling everywhere, ``host:port`` with an IPv6 host in brackets: parsed
and printed both ways (and round trips over arbitrary addresses), taken from a
socket's peer, and used by the memory network and the reconnecting client.
:class:`EndpointCycle` is tested on its own for every kind of source: a list
tried round and round, a function (sync or async) asked again when its list
is used up, an async iterable asked once per attempt, and the sources refused
at once.
"""

from __future__ import annotations

import doctest
import errno
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
import trio.testing
from helpers import Recorder, reconnecting
from hypothesis import given
from hypothesis import strategies as st

from trio_heartbeat import AttemptStarted, Connection, _endpoints, open_reconnecting_client
from trio_heartbeat._endpoints import (
    EndpointCycle,
    EndpointSource,
    format_endpoint,
    parse_endpoint,
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


@pytest.mark.parametrize(
    ("endpoint", "parsed"),
    [
        ("127.0.0.1:7400", ("127.0.0.1", 7400)),
        ("example.org:80", ("example.org", 80)),
        ("[::1]:7400", ("::1", 7400)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        (("example.org", 80), ("example.org", 80)),
        (("::1", 7400), ("::1", 7400)),
    ],
)
def test_parse_endpoint(endpoint: str | tuple[str, int], parsed: tuple[str, int]) -> None:
    assert parse_endpoint(endpoint) == parsed


@pytest.mark.parametrize("endpoint", ["no-port", "host:", "host:http", "host:-1", ""])
def test_parse_endpoint_refuses_what_is_not_host_and_port(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint must be 'host:port' or \\(host, port\\)"):
        parse_endpoint(endpoint)


@pytest.mark.parametrize(
    ("endpoint", "error", "message"),
    [
        ("127.0.0.1:0", ValueError, "port must be 1 to 65535 in the endpoint '127.0.0.1:0'"),
        ("h:65536", ValueError, "port must be 1 to 65535 in the endpoint 'h:65536'"),
        (":7400", ValueError, "no host in the endpoint ':7400'"),
        ("[]:7400", ValueError, "no host in the endpoint"),
        ("[::1:7400", ValueError, "unbalanced brackets in the endpoint"),
        ("h:\u0661", ValueError, "endpoint must be 'host:port'"),  # a digit, but not ASCII
        (("h", "80"), TypeError, "an endpoint tuple must be \\(host, port\\)"),
        (("h", True), TypeError, "an endpoint tuple must be \\(host, port\\)"),
        (("h", 80, 1), TypeError, "an endpoint tuple must be \\(host, port\\)"),
    ],
    ids=[
        "port-0",
        "port-too-big",
        "no-host",
        "empty-brackets",
        "unbalanced",
        "arabic-digit",
        "str-port",
        "bool-port",
        "triple",
    ],
)
def test_parse_endpoint_says_what_is_wrong(
    endpoint: Any, error: type[Exception], message: str
) -> None:
    """Every endpoint is checked where it is given, so a bad one never reaches a connect (#10)."""
    with pytest.raises(error, match=message):
        parse_endpoint(endpoint)


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 7400, "127.0.0.1:7400"),
        ("example.org", 80, "example.org:80"),
        ("::1", 7400, "[::1]:7400"),
        ("fe80::1%eth0", 22, "[fe80::1%eth0]:22"),
    ],
)
def test_format_endpoint_brackets_an_ipv6_host(host: str, port: int, text: str) -> None:
    assert format_endpoint(host, port) == text


@given(
    host=st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5})?", fullmatch=True),
    ),
    port=st.integers(min_value=1, max_value=65535),
)
def test_what_is_printed_parses_back(host: str, port: int) -> None:
    assert parse_endpoint(format_endpoint(host, port)) == (host, port)


def test_doctests() -> None:
    results = doctest.testmod(_endpoints)
    assert results.attempted > 0
    assert results.failed == 0


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
