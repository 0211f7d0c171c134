"""The streams at the ends of a wire (``testing/_streams.py``), and the in-memory pair.

A :class:`FaultyStream` keeps Trio's stream contract, checked by Trio's own
generic stream checks with no fault active: overlapping calls raise
:exc:`trio.BusyResourceError`, a closed stream raises
:exc:`trio.ClosedResourceError`, ``max_bytes`` is checked; ``aclose`` during a
send breaks the stream rather than ending it. :func:`faulty_stream_pair` hands
out both ends and their controls.
Every timing test runs under ``MockClock(autojump_threshold=0)`` (the
``autojump_clock`` fixture), so "arrives at exactly 0.25" is an equality, not a
bound. Times are chosen to be exact binary fractions.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from helpers import blocks_for
from trio.testing import MockClock

from trio_heartbeat.testing import Faults, FaultyHalfCloseableStream, faulty_stream_pair

# -- Trio's generic stream checks, with no fault active --------------------------------


async def test_pair_passes_trio_half_closeable_stream_checks() -> None:
    async def make() -> tuple[FaultyHalfCloseableStream, FaultyHalfCloseableStream]:
        client, server, _ = faulty_stream_pair()
        return client, server

    async def make_clogged() -> tuple[FaultyHalfCloseableStream, FaultyHalfCloseableStream]:
        # A one-byte buffer, already full both ways: the next send blocks.
        client, server, _ = faulty_stream_pair(buffer_size=1)
        await client.send_all(b"x")
        await server.send_all(b"x")
        return client, server

    await trio.testing.check_half_closeable_stream(make, make_clogged)


# -- closing ---------------------------------------------------------------------------


async def test_closing_a_stream_during_a_send_breaks_rather_than_ends_it(
    autojump_clock: MockClock,
) -> None:
    client, server, faults = faulty_stream_pair(buffer_size=10)
    faults.blackhole()

    async def close_at_1() -> None:
        await trio.sleep(1)
        await client.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_at_1)
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x" * 20)  # 10 bytes go in, then it waits
    with pytest.raises(trio.ClosedResourceError):
        await client.send_eof()
    faults.heal()
    assert await server.receive_some() == b"x" * 10
    with pytest.raises(trio.BrokenResourceError):  # not b"": the send was cut short
        await server.receive_some()


# -- the stream contract, directly -------------------------------------------------------


async def test_overlapping_calls_are_refused_as_busy(autojump_clock: MockClock) -> None:
    client, server, _ = faulty_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError, match="already receiving"):
            await server.receive_some()
        nursery.cancel_scope.cancel()
    # A cancelled receive has taken nothing, and the guard is free again.
    await client.send_all(b"after")
    assert await server.receive_some() == b"after"


async def test_max_bytes_is_checked_and_honoured() -> None:
    client, server, _ = faulty_stream_pair()
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        await server.receive_some(0)
    await client.send_all(b"abcdef")
    assert await server.receive_some(2) == b"ab"
    assert await server.receive_some() == b"cdef"


async def test_aclose_is_graceful_for_what_was_sent_and_drops_what_was_not_read() -> None:
    client, server, faults = faulty_stream_pair()
    await server.send_all(b"never read")
    await client.send_all(b"last words")
    await client.aclose()
    await client.aclose()  # idempotent
    assert await server.receive_some() == b"last words"
    assert await server.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"to nobody")
    assert faults.statistics().inbound.bytes_dropped == len(b"never read")
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()


async def test_send_eof_ends_one_direction_only(autojump_clock: MockClock) -> None:
    client, server, _ = faulty_stream_pair()
    await client.send_eof()
    assert await server.receive_some() == b""
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"after eof")
    await server.send_all(b"still open this way")
    assert await client.receive_some() == b"still open this way"
    assert await blocks_for(client.receive_some, 1)


# -- the pair ----------------------------------------------------------------------------


def test_the_pair_is_two_half_closeable_ends_of_one_connection() -> None:
    client, server, faults = faulty_stream_pair()
    assert isinstance(client, FaultyHalfCloseableStream)
    assert isinstance(server, FaultyHalfCloseableStream)
    assert client.faults is server.faults is faults
    shared = Faults()
    first, _, given = faulty_stream_pair(shared)
    assert given is shared
    assert first.faults is shared


async def test_both_ends_count_from_the_near_ends_point_of_view() -> None:
    client, server, _ = faulty_stream_pair()
    await client.send_all(b"12345")
    await server.send_all(b"12")
    assert await server.receive_some() == b"12345"
    for end in (client, server):
        stats = end.statistics()
        assert (stats.outbound.bytes_sent, stats.outbound.bytes_delivered) == (5, 5)
        assert (stats.inbound.bytes_sent, stats.inbound.bytes_buffered) == (2, 2)
