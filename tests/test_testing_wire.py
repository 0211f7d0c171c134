"""The wire of the test kit (``testing/_wire.py``): two timed, bounded links, one per direction.

Each fault as the links apply it, with exact virtual times: delay and seeded
jitter (order always kept), a throughput limit, blackholes and one-way
partitions, a slow reader and the backpressure it makes, resets and half-open
connections, and what a cancelled send or receive leaves behind. Driven
through :func:`faulty_stream_pair`, whose streams are a wire's two ends.
Every timing test runs under ``MockClock(autojump_threshold=0)`` (the
``autojump_clock`` fixture), so "arrives at exactly 0.25" is an equality, not a
bound. Times are chosen to be exact binary fractions.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from helpers import blocks_for, receive_exactly
from trio.testing import MockClock

from trio_heartbeat.testing import Direction, Faults, Side, faulty_stream_pair

# -- delay and jitter ------------------------------------------------------------------


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


# -- throughput ------------------------------------------------------------------------


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


# -- blackhole and partition -----------------------------------------------------------


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


# -- slow reader -----------------------------------------------------------------------


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


# -- reset -----------------------------------------------------------------------------


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


# -- half-open -------------------------------------------------------------------------


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


# -- cancellation ----------------------------------------------------------------------


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
