"""The fault-injecting pair and wrapper, in virtual time with exact times.

Every timing test runs under ``MockClock(autojump_threshold=0)`` (the
``autojump_clock`` fixture), so "arrives at exactly 0.25" is an equality, not a
bound. Times are chosen to be exact binary fractions.
"""

from __future__ import annotations

import inspect
import re
import ssl
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from trio.testing import MockClock

from trio_heartbeat.testing import (
    Direction,
    Faults,
    FaultyHalfCloseableStream,
    FaultyStream,
    Side,
    faulty_stream_pair,
    open_faulty_stream,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


async def receive_exactly(stream: trio.abc.ReceiveStream, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        chunk = await stream.receive_some(nbytes - len(data))
        assert chunk, "unexpected EOF"
        data += chunk
    return data


async def blocks_for(afn: Callable[[], Any], seconds: float) -> bool:
    """True if ``await afn()`` was still waiting after ``seconds`` (and got cancelled)."""
    with trio.move_on_after(seconds) as scope:
        await afn()
    return scope.cancelled_caught


class PlainStream(trio.abc.Stream):
    """A stream that is not half-closeable, to wrap."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


# ---------------------------------------------------------------------------
# Trio's generic stream checks, with no fault active


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


# ---------------------------------------------------------------------------
# Delay and jitter


async def test_delay_delivers_each_chunk_exactly_late(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.set_delay(0.25)

    await client.send_all(b"a")
    assert trio.current_time() == 0  # send_all does not wait for the trip
    await trio.sleep(0.125)
    await client.send_all(b"b")

    assert await server.receive_some(1) == b"a"
    assert trio.current_time() == 0.25
    assert await server.receive_some(1) == b"b"
    assert trio.current_time() == 0.375

    await server.send_all(b"c")
    assert await client.receive_some() == b"c"
    assert trio.current_time() == 0.625


async def test_delay_is_set_per_direction(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.inbound.delay = 0.5

    await client.send_all(b"up")
    assert await server.receive_some() == b"up"
    assert trio.current_time() == 0

    await server.send_all(b"down")
    assert await client.receive_some() == b"down"
    assert trio.current_time() == 0.5


async def test_eof_travels_with_the_delay(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.set_delay(0.5)
    await client.send_all(b"last")
    await client.send_eof()
    assert await server.receive_some() == b"last"
    assert await server.receive_some() == b""
    assert trio.current_time() == 0.5


async def arrival_times(seed: int, count: int = 20) -> list[float]:
    client, server, faults = faulty_stream_pair(Faults(seed=seed))
    faults.set_delay(0.125, jitter=0.5)
    for i in range(count):
        await client.send_all(bytes([i]))
    times = []
    for i in range(count):
        assert await server.receive_some(1) == bytes([i])  # order is kept
        times.append(trio.current_time())
    return times


def test_jitter_is_seeded_bounded_and_keeps_order() -> None:
    def run(seed: int) -> list[float]:
        return trio.run(arrival_times, seed, clock=MockClock(autojump_threshold=0))

    times = run(seed=7)
    assert times == sorted(times)
    assert all(0.125 <= t <= 0.625 for t in times)
    assert len(set(times)) > 1  # the jitter did something
    assert run(seed=7) == times  # and did it reproducibly
    assert run(seed=8) != times


async def test_lowering_the_delay_never_reorders(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.set_delay(1.0)
    await client.send_all(b"slow")
    await trio.sleep(0.25)
    faults.set_delay(0.0)
    await client.send_all(b"fast")
    # "fast" could go at once, but may not overtake "slow".
    assert await server.receive_some() == b"slowfast"
    assert trio.current_time() == 1.0


# ---------------------------------------------------------------------------
# Throughput


async def test_rate_limit_makes_500_bytes_take_half_a_second(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.limit_rate(1000)
    await client.send_all(b"x" * 500)
    assert trio.current_time() == 0  # it fit in the buffer
    assert await receive_exactly(server, 500) == b"x" * 500
    assert trio.current_time() == 0.5


async def test_rate_limit_adds_to_the_delay(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.limit_rate(1024, Direction.OUTBOUND)
    faults.set_delay(0.25, direction=Direction.OUTBOUND)
    await client.send_all(b"x" * 256)
    await client.send_all(b"y" * 256)  # queued behind the first on the link
    assert await receive_exactly(server, 256) == b"x" * 256
    assert trio.current_time() == 0.5
    assert await receive_exactly(server, 256) == b"y" * 256
    assert trio.current_time() == 0.75


async def test_a_send_larger_than_the_buffer_takes_the_time_it_would(
    autojump_clock: MockClock,
) -> None:
    client, server, faults = faulty_stream_pair(buffer_size=1000)
    faults.limit_rate(1000)
    returned_at = []

    async def send() -> None:
        await client.send_all(b"z" * 3000)
        returned_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        assert await receive_exactly(server, 3000) == b"z" * 3000
    assert trio.current_time() == 3.0
    # It returned once the last 1000 bytes fit in the buffer.
    assert returned_at == [2.0]


# ---------------------------------------------------------------------------
# Blackhole and partition


async def test_blackhole_holds_bytes_until_switched_off(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.blackhole()

    async def heal_at_5() -> None:
        await trio.sleep(5)
        assert faults.statistics().outbound.bytes_buffered == 5
        faults.heal()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heal_at_5)
        await client.send_all(b"hello")
        assert trio.current_time() == 0
        assert await server.receive_some() == b"hello"
        assert trio.current_time() == 5


async def test_blackhole_blocks_the_sender_at_the_buffer_bound(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair(buffer_size=100)
    faults.outbound.blackholed = True
    await client.send_all(b"a" * 100)  # exactly fills the buffer

    async def lift_at_3() -> None:
        await trio.sleep(3)
        faults.outbound.blackholed = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lift_at_3)
        nursery.start_soon(receive_exactly, server, 150)
        await client.send_all(b"b" * 50)
        assert trio.current_time() == 3
    assert faults.statistics().outbound.bytes_delivered == 150


async def test_one_way_partition_lets_the_other_direction_through(
    autojump_clock: MockClock,
) -> None:
    client, server, faults = faulty_stream_pair()
    faults.blackhole(Direction.OUTBOUND)

    await client.send_all(b"ping")
    assert await blocks_for(server.receive_some, 10)
    await server.send_all(b"pong")
    assert await client.receive_some() == b"pong"
    assert trio.current_time() == 10

    faults.heal(Direction.OUTBOUND)
    assert await server.receive_some() == b"ping"
    assert trio.current_time() == 10


# ---------------------------------------------------------------------------
# Slow reader


async def test_slow_reader_makes_send_all_take_the_computed_time(
    autojump_clock: MockClock,
) -> None:
    # Buffer 1000 B, reader 100 B per second, 1500 B to send: the last 500 B
    # fit once five reads (at t = 0, 1, 2, 3, 4) have made room.
    client, server, faults = faulty_stream_pair(buffer_size=1000)
    faults.slow_reader(100, 1.0, Direction.OUTBOUND)
    reads: list[tuple[float, int]] = []

    async def read_all() -> None:
        while sum(n for _, n in reads) < 1500:
            data = await server.receive_some()
            reads.append((trio.current_time(), len(data)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await client.send_all(b"w" * 1500)
        assert trio.current_time() == 4.0
    assert reads == [(float(t), 100) for t in range(15)]


async def test_a_write_timeout_on_a_slow_reader_breaks_the_stream_clearly(
    autojump_clock: MockClock,
) -> None:
    client, server, faults = faulty_stream_pair(buffer_size=1000)
    faults.slow_reader(100, 1.0, Direction.OUTBOUND)
    received = bytearray()

    async def read_forever() -> None:
        while True:
            received.extend(await server.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_forever)
        with trio.move_on_after(2.5) as timeout:
            await client.send_all(b"w" * 1500)
        nursery.cancel_scope.cancel()
    assert timeout.cancelled_caught
    assert len(received) == 300  # reads at t = 0, 1, 2

    # 1300 of the 1500 bytes went in, so the stream is truncated for good:
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"more")
    with pytest.raises(trio.BrokenResourceError):
        await read_forever()
    assert received == b"w" * 1300
    assert trio.current_time() == 12.0  # ten more slow reads, then the break


# ---------------------------------------------------------------------------
# Reset


async def test_reset_breaks_both_ends_now_and_later(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair(buffer_size=10)
    faults.blackhole(Direction.INBOUND)  # so that both ends are stuck when the reset comes
    failed_at: dict[str, float] = {}

    async def client_receives() -> None:
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        failed_at["client"] = trio.current_time()

    async def server_sends() -> None:
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"s" * 30)  # blocks once 10 bytes are held
        failed_at["server"] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_receives)
        nursery.start_soon(server_sends)
        await trio.sleep(1)
        faults.reset()
    assert failed_at == {"client": 1, "server": 1}

    for operation in (client.send_all(b"x"), server.receive_some(), client.receive_some()):
        with pytest.raises(trio.BrokenResourceError):
            await operation
    assert faults.statistics().inbound.bytes_dropped == 10  # the full buffer

    faults.heal()  # settings only: a reset connection stays dead
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"y")

    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")


async def test_reset_reaches_every_pair_sharing_the_controls(autojump_clock: MockClock) -> None:
    shared = Faults()
    first = faulty_stream_pair(shared)
    second = faulty_stream_pair(shared)
    shared.reset()
    for client, server, _ in (first, second):
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
    client, server, _ = faulty_stream_pair(shared)  # made later: unaffected
    await client.send_all(b"ok")
    assert await server.receive_some() == b"ok"


# ---------------------------------------------------------------------------
# Half-open


async def test_half_open_near_survives_and_far_sees_eof(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    await client.send_all(b"in flight")
    faults.half_open(Side.NEAR, peer_sees="eof")

    assert await server.receive_some() == b""  # in-flight bytes are lost too
    await server.send_all(b"answer")  # vanishes
    await client.send_all(b"are you there?")  # succeeds, vanishes
    assert await blocks_for(client.receive_some, 60)
    stats = faults.statistics()
    assert stats.outbound.bytes_dropped == len(b"in flight") + len(b"are you there?")
    assert stats.inbound.bytes_dropped == len(b"answer")
    assert stats.outbound.bytes_delivered == stats.inbound.bytes_delivered == 0


async def test_half_open_far_survives_and_near_sees_reset(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.half_open(Side.FAR, peer_sees="reset")

    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")
    await server.send_all(b"still here")
    assert await blocks_for(server.receive_some, 60)

    faults.reset()  # an explicit reset still reaches the survivor
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")


# ---------------------------------------------------------------------------
# Cancellation


async def test_a_cancelled_receive_loses_nothing(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.set_delay(1.0)
    await client.send_all(b"abc")
    assert await blocks_for(server.receive_some, 0.5)
    assert await server.receive_some() == b"abc"
    assert trio.current_time() == 1.0


async def test_a_send_cancelled_before_any_byte_went_in_leaves_the_stream_usable(
    autojump_clock: MockClock,
) -> None:
    client, server, faults = faulty_stream_pair(buffer_size=10)
    faults.blackhole()
    await client.send_all(b"0123456789")
    assert await blocks_for(lambda: client.send_all(b"lost"), 1)
    faults.heal()
    assert await server.receive_some() == b"0123456789"
    await client.send_all(b"!")
    assert await server.receive_some() == b"!"


async def test_a_send_cancelled_halfway_truncates_the_stream(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair(buffer_size=10)
    faults.blackhole()
    await client.send_all(b"1234")
    assert await blocks_for(lambda: client.send_all(b"abcdefghij"), 1)  # 6 of 10 went in
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"z")
    faults.heal()
    assert await server.receive_some() == b"1234abcdef"
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    # The other direction is unaffected.
    await server.send_all(b"back")
    assert await client.receive_some() == b"back"


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


# ---------------------------------------------------------------------------
# Statistics and validation


async def test_statistics_add_up(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.set_delay(1.0)
    await client.send_all(b"x" * 10)
    await trio.sleep(1)
    await client.send_all(b"y" * 5)
    assert await server.receive_some() == b"x" * 10
    stats = faults.statistics().outbound
    assert (stats.bytes_sent, stats.bytes_delivered, stats.bytes_buffered) == (15, 10, 5)
    await server.aclose()  # the 5 unread bytes are dropped
    stats = client.statistics().outbound
    assert (stats.bytes_sent, stats.bytes_delivered, stats.bytes_dropped) == (15, 10, 5)
    assert stats.bytes_buffered == 0
    assert client.faults is faults


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("delay", -1.0),
        ("delay", float("nan")),
        ("jitter", float("inf")),
        ("rate", 0),
        ("read_limit", 0),
        ("read_interval", -0.5),
    ],
)
def test_settings_are_validated(attribute: str, value: float) -> None:
    faults = Faults()
    with pytest.raises(ValueError, match=attribute):
        setattr(faults.outbound, attribute, value)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        faulty_stream_pair(buffer_size=0)
    with pytest.raises(ValueError, match="peer_sees"):
        Faults().half_open(peer_sees="rst")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Faults().blackhole("outbound")  # type: ignore[arg-type]


def test_heal_turns_every_setting_off() -> None:
    faults = Faults()
    faults.blackhole()
    faults.set_delay(1, 2)
    faults.limit_rate(10)
    faults.slow_reader(1, 3)
    faults.heal(Direction.INBOUND)
    assert faults.outbound.blackholed
    assert (faults.outbound.delay, faults.outbound.jitter, faults.outbound.rate) == (1, 2, 10)
    assert (faults.outbound.read_limit, faults.outbound.read_interval) == (1, 3)
    inbound = faults.inbound
    assert not inbound.blackholed
    assert (inbound.delay, inbound.jitter, inbound.rate, inbound.read_limit) == (0, 0, None, None)


# ---------------------------------------------------------------------------
# The wrapper


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


async def test_wrapper_reset_breaks_the_near_end_and_closes_the_inner_stream(
    autojump_clock: MockClock,
) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    async with open_faulty_stream(near_raw) as near:
        async with trio.open_nursery() as nursery:

            async def reset_at_2() -> None:
                await trio.sleep(2)
                near.faults.reset()

            nursery.start_soon(reset_at_2)
            with pytest.raises(trio.BrokenResourceError):
                await near.receive_some()
        assert trio.current_time() == 2
        # A memory stream cannot carry an RST; the far end reads EOF.
        assert await far.receive_some() == b""
        with pytest.raises(trio.BrokenResourceError):
            await near.send_all(b"x")


async def test_wrapper_turns_an_inner_failure_into_broken_resource_error(
    autojump_clock: MockClock,
) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    async with open_faulty_stream(near_raw) as near:
        await far.aclose()
        await near.send_all(b"into the void")  # buffered; the pump then fails
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BrokenResourceError):
            await near.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await near.send_all(b"more")


async def test_wrapper_half_open_keeps_the_near_end_fooled(autojump_clock: MockClock) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    async with open_faulty_stream(near_raw) as near:
        near.faults.half_open(Side.NEAR, peer_sees="eof")
        assert await far.receive_some() == b""
        await far.send_all(b"unheard")
        await near.send_all(b"unseen")
        assert await blocks_for(near.receive_some, 30)
        assert near.statistics().inbound.bytes_dropped == len(b"unheard")


async def test_closing_the_wrapper_flushes_then_closes_the_inner_stream(
    autojump_clock: MockClock,
) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    async with open_faulty_stream(PlainStream(near_raw)) as near:
        near.faults.set_delay(1.0)
        await near.send_all(b"bye")
        await near.aclose()
        assert await far.receive_some() == b"bye"
        assert trio.current_time() == 1.0
        assert await far.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await near.receive_some()


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


async def test_wrapper_reset_sends_a_tcp_rst_even_under_tls() -> None:
    # Real sockets. The server's TLS stream is https_compatible, so a plain
    # close would read as a clean b"": only an RST makes it raise.
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0] as listener:
        port = listener.socket.getsockname()[1]
        client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
        server_tls = trio.SSLStream(
            await listener.accept(), server_context, server_side=True, https_compatible=True
        )
        client_tls = trio.SSLStream(client_tcp, client_context, server_hostname="127.0.0.1")
        async with server_tls:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_tls.do_handshake)
                nursery.start_soon(client_tls.do_handshake)
            async with open_faulty_stream(client_tls) as stream:
                await stream.send_all(b"hi")
                with trio.fail_after(5):
                    assert await server_tls.receive_some() == b"hi"
                stream.faults.reset()
                with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
                    await server_tls.receive_some()


# ---------------------------------------------------------------------------
# The user guide's examples run


def doc_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_user_guide_has_examples() -> None:
    assert len(doc_examples()) >= 4


@pytest.mark.parametrize("index", range(len(doc_examples())))
def test_user_guide_example_runs(index: int) -> None:
    namespace: dict[str, Any] = {"__name__": f"testing_md_{index}"}
    exec(compile(doc_examples()[index], f"{DOCS}:example{index}", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
    assert tests, "every example in docs/testing.md defines a test_ function"
    for fn in tests:
        if "autojump_clock" in inspect.signature(fn).parameters:
            clock = MockClock(autojump_threshold=0)
            trio.run(fn, clock, clock=clock)
        else:
            trio.run(fn)
