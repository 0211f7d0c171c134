"""Fault injection around any stream (``open_faulty_stream`` in ``testing/_wrap.py``).

The wrapper passes Trio's generic stream checks (half-closeable or not, as the
stream it wraps), applies every fault between you and the wrapped stream with
exact timings, closes both ends when the block is left (dropping what is
still in flight), and lets an exception from the block out as itself.
Every timing test runs under ``MockClock(autojump_threshold=0)`` (the
``autojump_clock`` fixture), so "arrives at exactly 0.25" is an equality, not a
bound. Times are chosen to be exact binary fractions.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing
from helpers import PlainStream, blocks_for, receive_exactly
from trio.testing import MockClock

from trio_heartbeat.testing import (
    Direction,
    Faults,
    FaultyHalfCloseableStream,
    FaultyStream,
    Side,
    open_faulty_stream,
)

# -- Trio's generic stream checks, with no fault active --------------------------------


async def test_wrapper_passes_trio_half_closeable_stream_checks() -> None:
    async with AsyncExitStack() as stack:

        async def make() -> tuple[FaultyHalfCloseableStream, FaultyHalfCloseableStream]:
            left, right = trio.testing.memory_stream_pair()
            return (
                await stack.enter_async_context(open_faulty_stream(left)),
                await stack.enter_async_context(open_faulty_stream(right)),
            )

        await trio.testing.check_half_closeable_stream(make, None)


async def test_wrapper_of_a_plain_stream_is_a_plain_stream_and_passes_two_way_checks() -> None:
    async with AsyncExitStack() as stack:

        async def make() -> tuple[FaultyStream, FaultyStream]:
            left, right = trio.testing.memory_stream_pair()
            near = await stack.enter_async_context(open_faulty_stream(PlainStream(left)))
            far = await stack.enter_async_context(open_faulty_stream(PlainStream(right)))
            assert not isinstance(near, trio.abc.HalfCloseableStream)
            return near, far

        await trio.testing.check_two_way_stream(make, None)


# -- faults around a wrapped stream ----------------------------------------------------


async def test_wrapper_delays_both_directions_exactly(autojump_clock: MockClock) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    async with open_faulty_stream(near_raw) as near:
        assert isinstance(near, FaultyHalfCloseableStream)
        near.faults.set_delay(0.25)
        await near.send_all(b"x")
        assert trio.current_time() == 0
        assert await far.receive_some() == b"x"
        assert trio.current_time() == 0.25
        await far.send_all(b"y")
        assert await near.receive_some() == b"y"
        assert trio.current_time() == 0.5


async def test_wrapper_blackhole_and_rate_limit(autojump_clock: MockClock) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    faults = Faults()
    async with open_faulty_stream(near_raw, faults) as near:
        faults.blackhole(Direction.INBOUND)
        await far.send_all(b"held")
        assert await blocks_for(near.receive_some, 5)
        faults.heal()
        assert await near.receive_some() == b"held"
        assert trio.current_time() == 5

        faults.limit_rate(1000, Direction.OUTBOUND)
        await near.send_all(b"r" * 500)
        assert await receive_exactly(far, 500) == b"r" * 500
        assert trio.current_time() == 5.5


async def test_wrapper_half_open_keeps_the_near_end_fooled(autojump_clock: MockClock) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    async with open_faulty_stream(near_raw) as near:
        near.faults.half_open(Side.NEAR, peer_sees="eof")
        assert await far.receive_some() == b""
        await far.send_all(b"unheard")
        await near.send_all(b"unseen")
        assert await blocks_for(near.receive_some, 30)
        assert near.statistics().inbound.bytes_dropped == len(b"unheard")


# -- leaving the block -----------------------------------------------------------------


async def test_leaving_the_block_closes_everything(autojump_clock: MockClock) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    async with open_faulty_stream(near_raw) as near:
        near.faults.set_delay(1.0)
        await near.send_all(b"never delivered")
    assert trio.current_time() == 0
    stats = near.statistics().outbound
    assert (stats.bytes_dropped, stats.bytes_buffered) == (len(b"never delivered"), 0)
    assert await far.receive_some() == b""
    with pytest.raises(trio.ClosedResourceError):
        await near_raw.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await near.send_all(b"x")


async def test_an_exception_from_the_block_is_not_wrapped_in_a_group() -> None:
    near_raw, _ = trio.testing.memory_stream_pair()
    with pytest.raises(KeyError, match="mine"):
        async with open_faulty_stream(near_raw):
            raise KeyError("mine")
