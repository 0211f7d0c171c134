"""The reconnect supervisor (``_supervisor.py``): a client that keeps coming back, without stampeding.

Almost every test runs under an autojump MockClock, with the servers on a
:class:`~trio_heartbeat.testing.MemoryNetwork` and the supervisor's
``connector=`` pointed at it, so each attempt, failure, backoff and reconnect
happens at an exact virtual time that the tests assert with ``==``: how each
close code is classified, the anti-flap reset, nudges, the send buffer and the
inbound channel across connections, how the endpoints are walked, the attempt
timeout, the states and events reported, and a reconnect storm of a thousand
clients. The last two tests run over real TCP on loopback, with a server
restarted on the same port; they run in real time, so they check the order of
events and what arrives, with generous bounds.

How endpoints are parsed and named is in ``test_endpoints.py``, how events read
in ``test_reconnect_events.py``, and the test kit's fleet helpers in
``test_testing_network.py``.
"""

from __future__ import annotations

import gc
import logging
import re
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from itertools import islice
from typing import Any

import pytest
import trio
import trio.testing
from helpers import ENDPOINT, LOOPBACK, Recorder, close_first_with, reconnecting

from trio_heartbeat import (
    DEFAULT_BACKOFF,
    GRPC_BACKOFF,
    AttemptFailed,
    AttemptStarted,
    BackingOff,
    BrokenConnection,
    CloseCode,
    Config,
    Connected,
    Connection,
    ConnectionClosed,
    ConnectionOptions,
    ConnectionRejected,
    ConstantBackoff,
    DecorrelatedJitterBackoff,
    Disconnected,
    EqualJitterBackoff,
    ExponentialBackoff,
    FullJitterBackoff,
    HeartbeatTimeout,
    ReconnectFailed,
    ReconnectingClient,
    Server,
    Stopped,
    SupervisorEvent,
    SupervisorState,
    UndeliveredMessages,
    open_reconnecting_client,
    serve_tcp,
)
from trio_heartbeat._frames import (
    Close,
    FrameDecoder,
    HealthStatus,
    Hello,
    Role,
    encode_close,
    encode_hello,
    encode_ping,
)
from trio_heartbeat.testing import (
    Direction,
    MemoryHost,
    MemoryNetwork,
    open_memory_network,
    run_clients,
)

# -- helpers ---------------------------------------------------------------------------


async def echo(conn: Connection) -> None:
    async for message in conn:
        await conn.send(message)


async def idle(conn: Connection) -> None:
    await trio.sleep_forever()


def numbered(count: int) -> list[bytes]:
    return [b"%d" % i for i in range(count)]


def running_sums(delays: Iterable[float], start: float = 0.0) -> list[float]:
    """Attempt times: each delay added to the time before, as ``trio.sleep`` does."""
    times = [start]
    for delay in delays:
        times.append(times[-1] + delay)
    return times


# -- each policy drives the delays -----------------------------------------------------


POLICIES = [
    pytest.param(FullJitterBackoff(base=0.5, cap=4.0, max_attempts=6, seed=1), id="full"),
    pytest.param(EqualJitterBackoff(base=0.5, cap=4.0, max_attempts=6, seed=2), id="equal"),
    pytest.param(
        ExponentialBackoff(base=0.5, cap=4.0, jitter=0.2, max_attempts=6, seed=3), id="exponential"
    ),
    pytest.param(DecorrelatedJitterBackoff(base=0.5, cap=4.0, max_attempts=6, seed=4), id="decor"),
    pytest.param(ConstantBackoff(0.75, max_attempts=6), id="constant"),
    pytest.param(replace(DEFAULT_BACKOFF, max_attempts=6, seed=5), id="default"),
    pytest.param(replace(GRPC_BACKOFF, max_elapsed=60.0, seed=6), id="grpc-max-elapsed"),
]


@pytest.mark.parametrize("policy", POLICIES)
async def test_each_policy_sets_the_delays_between_attempts_exactly(
    autojump_clock: trio.testing.MockClock, policy: Iterable[float]
) -> None:
    delays = list(policy)  # a seeded policy gives the same delays to every iterator
    record = Recorder()
    async with open_memory_network() as network:  # nothing listens: every attempt is refused
        with pytest.raises(ReconnectFailed, match="backoff policy ran out") as info:
            async with reconnecting(network, record=record, backoff=policy):
                await trio.sleep_forever()

    attempts = running_sums(delays)
    assert [event.delay for _, event in record.of(BackingOff)] == delays
    assert record.times(AttemptStarted) == attempts
    # Each wait starts the moment the attempt before it fails.
    assert record.times(BackingOff) == attempts[:-1]
    assert record.times(AttemptFailed) == attempts
    assert [event.attempt for _, event in record.of(AttemptStarted)] == list(
        range(1, len(delays) + 2)
    )
    assert trio.current_time() == attempts[-1]
    assert info.value.attempts == len(delays) + 1
    last = info.value.last_error
    assert isinstance(last, BrokenConnection)
    assert last.code == CloseCode.ABNORMAL_CLOSURE
    assert isinstance(last.__cause__, ConnectionRefusedError)


# -- close codes -----------------------------------------------------------------------


async def test_going_away_reconnects_at_once_to_the_next_endpoint(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        network.listen("a:1", close_first_with(CloseCode.GOING_AWAY))
        network.listen("b:1", echo)
        async with reconnecting(
            network, ("a:1", "b:1"), record, backoff=ConstantBackoff(5.0)
        ) as client:
            await trio.sleep(2.0)
            assert client.connection is not None
            assert client.connection.remote_address == "b:1"
            await client.send(b"still here")
            assert await client.receive() == b"still here"

    assert record.summary()[:5] == [
        (0.0, "attempt", 1, "a:1"),
        (0.0, "connected", 1, "a:1"),
        (1.0, "disconnected", "a:1", CloseCode.GOING_AWAY, 1.0),
        (1.0, "attempt", 2, "b:1"),  # no wait: the attempt starts at the disconnect time
        (1.0, "connected", 2, "b:1"),
    ]
    assert record.of(BackingOff) == []


async def test_a_server_that_sends_everyone_away_gets_backoff_after_the_first_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """1001 right after every handshake: at once the first time only, then backoff (#10).

    Before, each 1001 reconnected at once: about 540 reconnects a second.
    """
    record = Recorder()

    async def go_away(conn: Connection) -> None:
        await conn.aclose(CloseCode.GOING_AWAY)

    async with open_memory_network() as network:
        network.listen(ENDPOINT, go_away)
        async with reconnecting(
            network, record=record, backoff=ExponentialBackoff(base=1.0, factor=2.0, cap=8.0)
        ):
            await trio.sleep(20.0)

    assert record.times(AttemptStarted) == [0.0, 0.0, 1.0, 3.0, 7.0, 15.0]
    assert [event.delay for _, event in record.of(BackingOff)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert all(event.error.code == CloseCode.GOING_AWAY for _, event in record.of(Disconnected))


async def test_going_away_after_a_healthy_spell_reconnects_at_once_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    lifetimes = iter([0.0, 0.0, 12.0, 0.0])

    async def go_away_later(conn: Connection) -> None:
        await trio.sleep(next(lifetimes, 3600.0))
        await conn.aclose(CloseCode.GOING_AWAY)

    async with open_memory_network() as network:
        network.listen(ENDPOINT, go_away_later)
        async with reconnecting(
            network, record=record, backoff=ConstantBackoff(5.0), healthy_after=10.0
        ):
            await trio.sleep(30.0)

    # The first 1001 at once, the second backs off; 12 s up is healthy again,
    # so the 1001 that ends it is a first one (at once), and the next is not.
    assert record.times(AttemptStarted) == [0.0, 0.0, 5.0, 17.0, 22.0]
    assert record.times(BackingOff) == [0.0, 17.0]


async def test_going_away_then_a_failed_attempt_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        network.listen("a:1", close_first_with(CloseCode.GOING_AWAY))
        # Nothing listens at b:1.
        async with reconnecting(network, ("a:1", "b:1"), record, backoff=ConstantBackoff(5.0)):
            await trio.sleep(6.5)

    assert record.summary()[:-1] == [
        (0.0, "attempt", 1, "a:1"),
        (0.0, "connected", 1, "a:1"),
        (1.0, "disconnected", "a:1", CloseCode.GOING_AWAY, 1.0),
        (1.0, "attempt", 2, "b:1"),
        (1.0, "failed", 2, "b:1", CloseCode.ABNORMAL_CLOSURE),
        (1.0, "backoff", 3, 5.0),
        (6.0, "attempt", 3, "a:1"),  # round the list again
        (6.0, "connected", 3, "a:1"),
    ]


async def test_a_draining_server_is_left_at_once_and_its_refusal_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        async with reconnecting(network, record=record, backoff=ConstantBackoff(5.0)):
            await trio.sleep(1.0)
            assert host.server is not None
            await host.server.drain()
            await trio.sleep(5.5)

    assert record.summary()[:-1] == [
        (0.0, "attempt", 1, ENDPOINT),
        (0.0, "connected", 1, ENDPOINT),
        (1.0, "disconnected", ENDPOINT, CloseCode.GOING_AWAY, 1.0),
        (1.0, "attempt", 2, ENDPOINT),
        # A drained server refuses newcomers with 1001 during the handshake:
        # that is a failed attempt, and failed attempts back off.
        (1.0, "failed", 2, ENDPOINT, CloseCode.GOING_AWAY),
        (1.0, "backoff", 3, 5.0),
        (6.0, "attempt", 3, ENDPOINT),
        (6.0, "failed", 3, ENDPOINT, CloseCode.GOING_AWAY),
        (6.0, "backoff", 4, 5.0),
    ]


async def test_try_again_later_at_capacity_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo, max_connections=1)
        async with reconnecting(network) as first:
            await first.wait_connected()
            async with reconnecting(
                network, record=record, backoff=ExponentialBackoff(base=1.0, factor=2.0)
            ) as second:
                await trio.sleep(2.5)
                await first.aclose()  # frees the only slot at t=2.5
                await second.wait_connected()
                assert trio.current_time() == 3.0

    assert record.summary()[:-1] == [
        (0.0, "attempt", 1, ENDPOINT),
        (0.0, "failed", 1, ENDPOINT, CloseCode.TRY_AGAIN_LATER),
        (0.0, "backoff", 2, 1.0),
        (1.0, "attempt", 2, ENDPOINT),
        (1.0, "failed", 2, ENDPOINT, CloseCode.TRY_AGAIN_LATER),
        (1.0, "backoff", 3, 2.0),
        (3.0, "attempt", 3, ENDPOINT),
        (3.0, "connected", 3, ENDPOINT),
    ]
    error = record.of(AttemptFailed)[0][1].error
    assert isinstance(error, ConnectionRejected)


async def test_try_again_later_after_open_backs_off(autojump_clock: trio.testing.MockClock) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        network.listen(ENDPOINT, close_first_with(CloseCode.TRY_AGAIN_LATER))
        async with reconnecting(network, record=record, backoff=ConstantBackoff(2.0)) as client:
            await trio.sleep(1.5)
            await client.wait_connected()
            assert trio.current_time() == 3.0

    assert record.summary()[:-1] == [
        (0.0, "attempt", 1, ENDPOINT),
        (0.0, "connected", 1, ENDPOINT),
        (1.0, "disconnected", ENDPOINT, CloseCode.TRY_AGAIN_LATER, 1.0),
        (1.0, "backoff", 2, 2.0),
        (3.0, "attempt", 2, ENDPOINT),
        (3.0, "connected", 2, ENDPOINT),
    ]


STOP_CODES = [
    pytest.param(CloseCode.POLICY_VIOLATION, id="1008"),
    pytest.param(CloseCode.REPLACED, id="4000"),
]


@pytest.mark.parametrize("code", STOP_CODES)
async def test_stop_codes_cancel_the_block_and_raise(
    autojump_clock: trio.testing.MockClock, code: int
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        network.listen(ENDPOINT, close_first_with(code))
        with pytest.raises(ReconnectFailed, match=f"close code {code}") as info:
            async with reconnecting(network, record=record, backoff=ConstantBackoff(2.0)) as client:
                await trio.sleep_forever()

    assert trio.current_time() == 1.0  # the block was cancelled the moment it stopped
    last = info.value.last_error
    assert isinstance(last, ConnectionClosed)
    assert last.code == code
    assert last.by_peer
    assert client.state is SupervisorState.CLOSED
    assert client.error is info.value
    assert record.summary() == [
        (0.0, "attempt", 1, ENDPOINT),
        (0.0, "connected", 1, ENDPOINT),
        (1.0, "disconnected", ENDPOINT, code, 1.0),
        (1.0, "stopped", last),
    ]
    with pytest.raises(ReconnectFailed) as again:
        await client.wait_connected()
    assert again.value is info.value


@pytest.mark.parametrize("code", STOP_CODES)
async def test_without_stop_codes_those_codes_back_off(
    autojump_clock: trio.testing.MockClock, code: int
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        network.listen(ENDPOINT, close_first_with(code))
        async with reconnecting(
            network, record=record, backoff=ConstantBackoff(2.0), stop_codes=()
        ) as client:
            await trio.sleep(1.5)
            await client.wait_connected()
            assert trio.current_time() == 3.0

    assert record.summary()[2:-1] == [
        (1.0, "disconnected", ENDPOINT, code, 1.0),
        (1.0, "backoff", 2, 2.0),
        (3.0, "attempt", 2, ENDPOINT),
        (3.0, "connected", 2, ENDPOINT),
    ]


async def test_a_newer_client_with_the_same_id_stops_the_older_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(instance_id="node-1")

    async def newer_one(network: MemoryNetwork) -> None:
        await trio.sleep(1.0)
        async with reconnecting(network, config=config):
            await trio.sleep_forever()

    async with open_memory_network() as network:
        network.listen(ENDPOINT, idle)
        with pytest.raises(ReconnectFailed) as info:
            async with reconnecting(network, config=config), trio.open_nursery() as nursery:
                nursery.start_soon(newer_one, network)
    assert trio.current_time() == 1.0
    assert info.value.last_error is not None
    assert info.value.last_error.code == CloseCode.REPLACED


async def test_a_refused_secret_stops_at_the_first_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        network.listen(ENDPOINT, idle, config=Config(secret=b"s3cret"))
        with pytest.raises(ReconnectFailed) as info:
            async with reconnecting(network, record=record):
                await trio.sleep_forever()
    assert info.value.last_error is not None
    assert info.value.last_error.code == CloseCode.POLICY_VIOLATION
    assert info.value.last_error.by_peer
    # The client's block waits for the server's verdict on its HELLO; a refusal
    # is that verdict, so the attempt failed and the client was never connected.
    assert record.summary() == [
        (0.0, "attempt", 1, ENDPOINT),
        (0.0, "failed", 1, ENDPOINT, CloseCode.POLICY_VIOLATION),
        (0.0, "stopped", info.value.last_error),
    ]


async def test_a_heartbeat_timeout_backs_off(autojump_clock: trio.testing.MockClock) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, idle)

        def heal_once_convicted(event: SupervisorEvent) -> None:
            if isinstance(event, Disconnected):
                host.faults.heal()  # so that the next attempt can get through

        async with reconnecting(
            network,
            record=record,
            backoff=ConstantBackoff(2.0),
            config=Config(interval=1.0, timeout=3.0),
        ) as client:
            client.add_listener(heal_once_convicted)
            await trio.sleep(0.5)  # nothing has come since the server's HELLO at t=0
            host.faults.blackhole()
            await client.wait_state(SupervisorState.BACKING_OFF)
            assert trio.current_time() == 3.0
            await client.wait_connected()
            assert trio.current_time() == 5.0

    assert record.summary()[:-1] == [
        (0.0, "attempt", 1, ENDPOINT),
        (0.0, "connected", 1, ENDPOINT),
        (3.0, "disconnected", ENDPOINT, CloseCode.HEARTBEAT_TIMEOUT, 3.0),
        (3.0, "backoff", 2, 2.0),
        (5.0, "attempt", 2, ENDPOINT),
        (5.0, "connected", 2, ENDPOINT),
    ]
    assert isinstance(record.of(Disconnected)[0][1].error, HeartbeatTimeout)


async def test_a_crashed_server_backs_off(autojump_clock: trio.testing.MockClock) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, idle)
        async with reconnecting(network, record=record, backoff=ConstantBackoff(2.0)) as client:
            await trio.sleep(1.0)
            host.restart()  # every connection reset, back up at once
            await trio.sleep(0.5)
            assert client.state is SupervisorState.BACKING_OFF
            await client.wait_connected()
            assert trio.current_time() == 3.0

    assert record.summary()[2:-1] == [
        (1.0, "disconnected", ENDPOINT, CloseCode.ABNORMAL_CLOSURE, 1.0),
        (1.0, "backoff", 2, 2.0),
        (3.0, "attempt", 2, ENDPOINT),
        (3.0, "connected", 2, ENDPOINT),
    ]
    assert isinstance(record.of(Disconnected)[0][1].error, BrokenConnection)


# -- the anti-flap reset ---------------------------------------------------------------


def living_for(lifetimes: Iterable[float]) -> Callable[[Connection], Any]:
    """A handler whose n-th connection stays up for the n-th lifetime, then closes (1000)."""
    remaining = iter(lifetimes)

    async def handler(conn: Connection) -> None:
        await trio.sleep(next(remaining, 3600.0))

    return handler


async def test_a_server_that_closes_at_once_gets_ever_slower_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    policy = ExponentialBackoff(base=1.0, factor=2.0, cap=8.0)
    async with open_memory_network() as network:
        network.listen(ENDPOINT, living_for([0.0] * 100))
        async with reconnecting(network, record=record, backoff=policy, healthy_after=5.0):
            await trio.sleep(30.0)

    assert [event.delay for _, event in record.of(BackingOff)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert record.times(Connected) == [0.0, 1.0, 3.0, 7.0, 15.0, 23.0]
    assert all(event.uptime == 0.0 for _, event in record.of(Disconnected))
    assert all(event.error.code == CloseCode.NORMAL for _, event in record.of(Disconnected))
    assert [event.attempt for _, event in record.of(Connected)] == [1, 2, 3, 4, 5, 6]


async def test_a_connection_up_for_healthy_after_resets_the_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    policy = FullJitterBackoff(base=1.0, factor=2.0, cap=30.0, seed=7)
    first = list(islice(policy, 4))
    async with open_memory_network() as network:
        # Two flaps, a healthy connection, a flap, one up not quite long enough, a flap.
        network.listen(ENDPOINT, living_for([0.0, 0.0, 6.0, 0.0, 4.0, 0.0]))
        async with reconnecting(network, record=record, backoff=policy, healthy_after=5.0):
            await trio.sleep(60.0)

    delays = [event.delay for _, event in record.of(BackingOff)]
    assert delays[:6] == [first[0], first[1], first[0], first[1], first[2], first[3]]
    assert delays[2] <= 1.0  # drawn from the first envelope again
    # The backoff starts over; the events still number the attempts over the
    # client's life, as a person counts them.
    assert [event.attempt for _, event in record.of(BackingOff)][:6] == [2, 3, 4, 5, 6, 7]
    assert [event.attempt for _, event in record.of(Connected)][:6] == [1, 2, 3, 4, 5, 6]


async def test_the_reset_happens_at_exactly_healthy_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    policy = ExponentialBackoff(base=1.0, factor=2.0, cap=8.0)
    async with open_memory_network() as network:
        network.listen(ENDPOINT, living_for([0.0, 0.0, 5.0, 0.0]))
        async with reconnecting(network, record=record, backoff=policy, healthy_after=5.0):
            await trio.sleep(12.0)

    assert record.times(Connected) == [0.0, 1.0, 3.0, 9.0, 11.0]
    assert [event.uptime for _, event in record.of(Disconnected)][:3] == [0.0, 0.0, 5.0]
    assert [event.delay for _, event in record.of(BackingOff)][:3] == [1.0, 2.0, 1.0]


# -- nudge -----------------------------------------------------------------------------


async def test_nudge_skips_the_rest_of_the_wait(autojump_clock: trio.testing.MockClock) -> None:
    record = Recorder()
    async with (
        open_memory_network() as network,
        reconnecting(network, record=record, backoff=ConstantBackoff(10.0)) as client,
    ):
        await trio.sleep(3.0)
        assert client.state is SupervisorState.BACKING_OFF
        network.listen(ENDPOINT, echo)
        client.nudge()
        await client.wait_connected()
        assert trio.current_time() == 3.0

    assert record.summary()[:-1] == [
        (0.0, "attempt", 1, ENDPOINT),
        (0.0, "failed", 1, ENDPOINT, CloseCode.ABNORMAL_CLOSURE),
        (0.0, "backoff", 2, 10.0),
        (3.0, "attempt", 2, ENDPOINT),
        (3.0, "connected", 2, ENDPOINT),
    ]


async def test_nudge_during_an_attempt_skips_the_wait_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        host.down(unreachable=True)
        async with reconnecting(
            network, record=record, backoff=ConstantBackoff(10.0), connect_timeout=4.0
        ) as client:
            await trio.sleep(1.0)
            assert client.state is SupervisorState.CONNECTING
            client.nudge()
            await trio.sleep(3.5)
            host.up()
            await client.wait_connected()
            assert trio.current_time() == 4.5

    assert record.summary()[:-1] == [
        (0.0, "attempt", 1, ENDPOINT),
        (4.0, "failed", 1, ENDPOINT, CloseCode.HEARTBEAT_TIMEOUT),
        (4.0, "attempt", 2, ENDPOINT),  # no BackingOff: the nudge came during the attempt
        (4.5, "connected", 2, ENDPOINT),  # the hanging attempt goes through once up
    ]


async def test_a_nudge_while_connected_does_not_skip_a_later_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        async with reconnecting(network, record=record, backoff=ConstantBackoff(10.0)) as client:
            await client.wait_connected()
            client.nudge()  # nothing to skip: no wait is under way
            await trio.sleep(1.0)
            host.restart()
            await trio.sleep(1.0)
            assert client.state is SupervisorState.BACKING_OFF
            await client.wait_connected()
            assert trio.current_time() == 11.0

    assert record.summary()[2:4] == [
        (1.0, "disconnected", ENDPOINT, CloseCode.ABNORMAL_CLOSURE, 1.0),
        (1.0, "backoff", 2, 10.0),
    ]


# -- the send buffer -------------------------------------------------------------------


def collecting(
    received: list[bytes], done_at: int
) -> tuple[Callable[[Connection], Any], trio.Event]:
    """A handler appending every message to ``received``; the event is set at ``done_at`` messages."""
    done = trio.Event()

    async def handler(conn: Connection) -> None:
        async for message in conn:
            received.append(message)
            if len(received) == done_at:
                done.set()

    return handler, done


async def test_nothing_sent_while_disconnected_is_lost_or_reordered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    received: list[bytes] = []
    handler, all_in = collecting(received, 100)
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, handler)
        async with reconnecting(network, backoff=ConstantBackoff(1.0)) as client:
            await client.wait_connected()
            host.down()
            await client.wait_state(SupervisorState.BACKING_OFF)
            for message in numbered(100):
                await client.send(message)
            assert client.buffered == 100
            await trio.sleep(2.5)
            assert client.buffered == 100  # two refused attempts took nothing
            host.up()
            await all_in.wait()
            assert trio.current_time() == 3.0
            assert client.buffered == 0

    assert received == numbered(100)


async def test_a_full_buffer_fails_fast_with_when_full_fail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    received: list[bytes] = []
    handler, all_in = collecting(received, 6)
    async with (
        open_memory_network() as network,
        reconnecting(
            network, backoff=ConstantBackoff(1.0), buffer_size=5, when_full="fail"
        ) as client,
    ):
        for message in numbered(5):
            await client.send(message)
        with pytest.raises(trio.WouldBlock):
            await client.send(b"no room")
        assert client.buffered == 5
        network.listen(ENDPOINT, handler)
        await client.wait_connected()
        await trio.testing.wait_all_tasks_blocked()  # the pump has emptied the buffer
        assert client.buffered == 0
        await client.send(b"5")
        await all_in.wait()
        assert trio.current_time() == 1.0

    assert received == numbered(6)


async def test_a_full_buffer_waits_with_when_full_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    received: list[bytes] = []
    handler, all_in = collecting(received, 3)
    returned_at: list[float] = []
    async with (
        open_memory_network() as network,
        reconnecting(
            network, backoff=ConstantBackoff(1.0), buffer_size=2, when_full="wait"
        ) as client,
    ):
        await client.send(b"0")
        await client.send(b"1")

        async def third() -> None:
            await client.send(b"2")
            returned_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.sleep(2.5)
            assert returned_at == []  # still waiting for room
            network.listen(ENDPOINT, handler)
        await all_in.wait()

    assert returned_at == [3.0]  # the next attempt, at t=3, flushed the buffer
    assert received == numbered(3)


async def test_a_message_that_is_not_bytes_is_refused_at_the_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Not later, in the pump task, where it would have ended the client (#10)."""
    received: list[bytes] = []
    handler, all_in = collecting(received, 1)
    async with open_memory_network() as network, reconnecting(network) as client:
        network.listen(ENDPOINT, handler)
        with pytest.raises(TypeError, match="a message must be bytes, not str"):
            await client.send("a str")
        await client.send(bytearray(b"copied"))
        await all_in.wait()
        assert client.state is SupervisorState.CONNECTED
    assert received == [b"copied"]


@pytest.mark.parametrize("count", [1, 1000])
async def test_what_was_sent_just_before_leaving_the_block_is_delivered(
    autojump_clock: trio.testing.MockClock, count: int
) -> None:
    """Leaving the block flushes what send() accepted (#10: 1 of 1 was lost, 1 of 1,000)."""
    received: list[bytes] = []
    handler, _ = collecting(received, count)
    async with open_memory_network() as network:
        network.listen(ENDPOINT, handler)
        async with reconnecting(network) as client:
            for message in numbered(count):
                await client.send(message)
        await trio.testing.wait_all_tasks_blocked()
    assert received == numbered(count)


async def test_what_could_not_be_sent_by_the_close_timeout_is_named_in_the_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three sends while the server is down, then leaving: never a silent loss."""
    record = Recorder()

    async def send_three_and_leave(network: MemoryNetwork) -> None:
        async with reconnecting(network, record=record, backoff=ConstantBackoff(0.5)) as client:
            for message in numbered(3):
                await client.send(message)

    async with open_memory_network() as network:
        with pytest.raises(UndeliveredMessages) as info:
            await send_three_and_leave(network)
    assert info.value.messages == numbered(3)
    assert str(info.value).startswith("3 messages accepted by send() not delivered: ")
    assert trio.current_time() == Config().close_timeout  # it kept trying until then
    assert record.of(Stopped)


async def test_a_client_that_gives_up_hands_back_what_it_could_not_deliver(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its backoff ran out with messages buffered: they come with the error (#10)."""

    async def send_and_wait(network: MemoryNetwork) -> None:
        async with reconnecting(network, backoff=ConstantBackoff(1.0, max_attempts=2)) as client:
            for message in numbered(3):
                await client.send(message)
            await trio.sleep_forever()

    async with open_memory_network() as network:  # nothing listens
        with pytest.raises(ReconnectFailed) as info:
            await send_and_wait(network)
    assert info.value.undelivered == numbered(3)
    assert info.value.__notes__ == ["3 message(s) accepted by send() were not delivered"]
    assert trio.current_time() == 2.0


async def test_a_send_waiting_for_room_fails_once_the_client_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Nothing listens, so the buffered message is never delivered: the close
    # tries for close_timeout and then says so, with the message.
    refused_at: list[float] = []

    async def fill_then_close(network: MemoryNetwork) -> None:
        async with reconnecting(network, buffer_size=1) as client:
            await client.send(b"fills the buffer")

            async def close_later() -> None:
                await trio.sleep(1.0)
                await client.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_later)
                with pytest.raises(ReconnectFailed, match="closed"):
                    await client.send(b"no room, ever")
                refused_at.append(trio.current_time())

    async with open_memory_network() as network:
        # The close's error comes from a task of the test's own nursery, whose group
        # the client leaves as it was raised.
        with pytest.raises(ExceptionGroup) as info:
            await fill_then_close(network)
    assert refused_at == [1.0]  # at once, when the close began
    (undelivered,) = info.value.exceptions
    assert isinstance(undelivered, UndeliveredMessages)
    assert undelivered.messages == [b"fills the buffer"]
    assert trio.current_time() == 1.0 + Config().close_timeout


async def test_a_message_not_yet_handed_over_goes_to_the_next_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The client's outgoing bytes are held back, so its connection's queue
    # (one message) fills and the supervisor's pump waits with a message in
    # hand. When the server then closes, that message and the ones behind it
    # go to the next connection, in order, and so does the one in the dead
    # connection's queue, which it never wrote; those it had written are gone
    # with it (THB/1 has no acknowledgements).
    messages = [bytes([i]) * 40_000 for i in range(6)]
    received: list[bytes] = []
    handler, first_in = collecting(received, 1)

    async def close_at_one_second(conn: Connection) -> None:
        await trio.sleep(1.0)
        await conn.aclose()

    record = Recorder()
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, close_at_one_second)

        def heal(event: SupervisorEvent) -> None:
            if isinstance(event, Disconnected):
                host.faults.heal()
                host.up(handler)

        async with reconnecting(
            network,
            record=record,
            backoff=ConstantBackoff(1.0),
            options=ConnectionOptions(send_queue=1),
        ) as client:
            client.add_listener(heal)
            await client.wait_connected()
            await trio.testing.wait_all_tasks_blocked()  # both sides are OPEN
            host.faults.blackhole(Direction.OUTBOUND)
            for message in messages:
                await client.send(message)
            await trio.sleep(0.5)
            left = client.buffered  # the message in the pump's hand counts
            assert 1 <= left < len(messages)  # the others went into the connection
            await first_in.wait()
            await trio.testing.wait_all_tasks_blocked()

    # The queue of one the dead connection never wrote is sent again, first.
    assert received == messages[len(messages) - left - 1 :]
    (lost_at, lost), (_, backing_off) = record.of(Disconnected)[0], record.of(BackingOff)[0]
    assert lost.error.code == CloseCode.NORMAL
    assert backing_off.delay == 1.0
    assert record.times(Connected) == [0.0, lost_at + 1.0]


# -- receiving -------------------------------------------------------------------------


async def test_receive_carries_on_across_reconnects(autojump_clock: trio.testing.MockClock) -> None:
    greeted = 0

    async def greet(conn: Connection) -> None:
        nonlocal greeted
        greeted += 1
        await conn.send(b"hello %d" % greeted)
        await trio.sleep_forever()

    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, greet)
        async with reconnecting(network, backoff=ConstantBackoff(1.0)) as client:
            assert await client.receive() == b"hello 1"
            await trio.sleep(1.0)
            host.restart()
            assert await client.receive() == b"hello 2"
            assert trio.current_time() == 2.0


async def test_two_receivers_share_messages_without_loss_or_duplicates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Both wake for the first message; the one that comes second finds it
    # taken after its checkpoint, and waits for the next one.
    async def two(conn: Connection) -> None:
        await conn.send(b"one")
        await trio.sleep(1.0)
        await conn.send(b"two")
        await trio.sleep_forever()

    got: list[tuple[str, bytes, float]] = []

    async def take(name: str, client: ReconnectingClient) -> None:
        got.append((name, await client.receive(), trio.current_time()))

    async with open_memory_network() as network:
        network.listen(ENDPOINT, two)
        async with reconnecting(network) as client, trio.open_nursery() as nursery:
            nursery.start_soon(take, "a", client)
            nursery.start_soon(take, "b", client)

    assert sorted(message for _, message, _ in got) == [b"one", b"two"]
    assert sorted(at for _, _, at in got) == [0.0, 1.0]
    assert {name for name, _, _ in got} == {"a", "b"}


async def test_messages_sent_before_an_orderly_close_are_all_received(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Each connection sends three messages and closes at once (1001, 1000, ...).
    # The messages reach the client in the same batch as the CLOSE: none of them
    # may be dropped on the way from the ending connection to receive().
    served = 0

    async def burst(conn: Connection) -> None:
        nonlocal served
        served += 1
        for i in range(3):
            await conn.send(b"%d.%d" % (served, i))
        await conn.aclose(CloseCode.GOING_AWAY if served % 2 else CloseCode.NORMAL)

    async with open_memory_network() as network:
        network.listen(ENDPOINT, burst)
        async with reconnecting(network, backoff=ConstantBackoff(1.0)) as client:
            got = [await client.receive() for _ in range(30)]

    assert got == [b"%d.%d" % (n, i) for n in range(1, 11) for i in range(3)]


async def test_async_for_ends_quietly_when_closed_by_the_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    got: list[bytes] = []
    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo)
        async with reconnecting(network) as client:
            await client.send(b"one")

            async def stop_soon() -> None:
                await trio.sleep(1.0)
                await client.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_soon)
                async for message in client:
                    got.append(message)
            assert trio.current_time() == 1.0
            assert client.state is SupervisorState.CLOSED
            with pytest.raises(ReconnectFailed, match="closed"):
                await client.send(b"too late")
            with pytest.raises(ReconnectFailed, match="closed"):
                await client.receive()
    assert got == [b"one"]


async def read_all(client: ReconnectingClient) -> list[bytes]:
    return [message async for message in client]


async def test_async_for_raises_when_the_supervisor_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_network() as network:
        network.listen(ENDPOINT, close_first_with(CloseCode.POLICY_VIOLATION))
        with pytest.raises(ReconnectFailed) as info:
            async with reconnecting(network) as client:
                await read_all(client)
    assert info.value.last_error is not None
    assert info.value.last_error.code == CloseCode.POLICY_VIOLATION


# -- endpoints -------------------------------------------------------------------------


def attempted(record: Recorder) -> list[tuple[float, str]]:
    return [(at, event.endpoint) for at, event in record.of(AttemptStarted)]


async def test_failover_walks_a_list_and_stays_with_what_works(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        c = network.listen("c:1", echo)  # a:1 and b:1 refuse
        async with reconnecting(
            network, ("a:1", ("b", 1), "c:1"), record, backoff=ConstantBackoff(1.0)
        ) as client:
            await client.wait_connected()
            await trio.sleep(1.0)
            c.restart()
            await trio.sleep(0.5)
            await client.wait_connected()

    assert attempted(record) == [(0.0, "a:1"), (1.0, "b:1"), (2.0, "c:1"), (4.0, "c:1")]
    assert record.times(Connected) == [2.0, 4.0]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_failover_from_a_callable_refreshes_the_list_when_used_up(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    record = Recorder()
    calls: list[float] = []

    def listed() -> list[str]:
        calls.append(trio.current_time())
        return ["a:1", "c:1"]

    async def listed_later() -> list[str]:
        await trio.lowlevel.checkpoint()
        return listed()

    source = listed if kind == "sync" else listed_later
    async with open_memory_network() as network:
        c = network.listen("c:1", echo)  # a:1 refuses
        async with reconnecting(network, source, record, backoff=ConstantBackoff(1.0)) as client:
            await client.wait_connected()
            await trio.sleep(1.0)
            c.down()
            await trio.sleep(3.5)
            c.up()
            await client.wait_connected()

    assert attempted(record) == [
        (0.0, "a:1"),
        (1.0, "c:1"),  # connected; stays with c:1 after losing it
        (3.0, "c:1"),  # refused: the list is used up
        (4.0, "a:1"),  # so the source is asked again
        (5.0, "c:1"),
        (6.0, "a:1"),
        (7.0, "c:1"),
    ]
    assert calls == [0.0, 4.0, 6.0]
    assert record.times(Connected) == [1.0, 7.0]


async def test_failover_from_an_async_iterator_takes_one_endpoint_per_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()

    async def discover() -> AsyncIterator[str]:
        for endpoint in ["a:1", "b:1", "a:1", "b:1"]:
            yield endpoint

    async def restart_twice(b: MemoryHost) -> None:
        await trio.sleep(1.5)
        b.restart()
        await trio.sleep(2.5)
        b.restart()
        await trio.sleep_forever()

    async with open_memory_network() as network:
        b = network.listen("b:1", echo)
        with pytest.raises(ReconnectFailed, match="ran dry"):
            async with (
                reconnecting(network, discover(), record, backoff=ConstantBackoff(1.0)),
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(restart_twice, b)

    # After losing b:1 the next endpoint comes from the iterator, not a retry of b:1.
    assert attempted(record) == [(0.0, "a:1"), (1.0, "b:1"), (2.5, "a:1"), (3.5, "b:1")]
    assert record.times(Connected) == [1.0, 3.5]
    assert trio.current_time() == 5.0  # the wait after the second loss, then nothing left


async def test_an_empty_refresh_gives_up(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_network() as network:
        with pytest.raises(ReconnectFailed, match="no endpoints"):
            async with reconnecting(network, list):
                await trio.sleep_forever()


def two_then_dry(kind: str) -> Any:
    """An endpoint source that offers "a:1" and "b:1" once, then nothing."""
    if kind == "iterator":

        async def discover() -> AsyncIterator[str]:
            for endpoint in ["a:1", "b:1"]:
                yield endpoint

        return discover()
    lists = iter([["a:1", "b:1"]])
    return lambda: next(lists, [])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("iterator", "the endpoint source ran dry"),
        ("refresh", "the endpoint source returned no endpoints"),
    ],
)
async def test_a_dry_source_reports_the_last_error_and_the_attempts(
    autojump_clock: trio.testing.MockClock, kind: str, message: str
) -> None:
    record = Recorder()
    async with open_memory_network() as network:  # nothing listens: every attempt is refused
        with pytest.raises(ReconnectFailed, match=rf"after 2 attempt\(s\): {message}") as info:
            async with reconnecting(
                network, two_then_dry(kind), record, backoff=ConstantBackoff(1.0)
            ) as client:
                await trio.sleep_forever()

    # Two refusals, each followed by a wait, and then no endpoint to try.
    assert attempted(record) == [(0.0, "a:1"), (1.0, "b:1")]
    assert trio.current_time() == 2.0
    error = info.value
    assert error.attempts == 2
    assert client.attempts == 2  # no attempt is counted for an endpoint that never came
    assert [event.error for _, event in record.of(AttemptFailed)][-1] is error.last_error
    assert isinstance(error.last_error, BrokenConnection)
    assert error.last_error.code == CloseCode.ABNORMAL_CLOSURE
    assert client.error is error
    assert record.summary()[-1] == (2.0, "stopped", error.last_error)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"buffer_size": 0}, "buffer_size"),
        ({"receive_buffer": 0}, "receive_buffer"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"healthy_after": -1}, "healthy_after"),
        ({"when_full": "drop"}, "when_full"),
    ],
)
async def test_bad_settings_are_refused_at_once(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        async with open_reconnecting_client([ENDPOINT], **kwargs):
            pass  # pragma: no cover


# -- the attempt timeout ---------------------------------------------------------------


async def never_says_hello(stream: trio.abc.Stream, address: str) -> None:
    await trio.sleep_forever()


@pytest.mark.parametrize("silence", ["no hello", "unreachable"])
async def test_connect_timeout_bounds_each_attempt(
    autojump_clock: trio.testing.MockClock, silence: str
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        host = network.listen_raw(ENDPOINT, never_says_hello)
        if silence == "unreachable":
            host.down(unreachable=True)
        with pytest.raises(ReconnectFailed, match="ran out") as info:
            async with reconnecting(
                network,
                record=record,
                backoff=ConstantBackoff(1.0, max_attempts=2),
                connect_timeout=2.5,
            ):
                await trio.sleep_forever()

    assert record.times(AttemptStarted) == [0.0, 3.5, 7.0]
    assert record.times(AttemptFailed) == [2.5, 6.0, 9.5]
    assert all(isinstance(event.error, HeartbeatTimeout) for _, event in record.of(AttemptFailed))
    assert info.value.last_error is not None
    assert info.value.last_error.code == CloseCode.HEARTBEAT_TIMEOUT
    assert trio.current_time() == 9.5
    assert host.accepted == (3 if silence == "no hello" else 0)


# -- events and states -----------------------------------------------------------------


async def test_states_follow_the_events(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[tuple[float, str, SupervisorState]] = []
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        host.down(kill=False)
        async with reconnecting(network, backoff=ConstantBackoff(1.0)) as client:
            client.add_listener(
                lambda event: seen.append((trio.current_time(), type(event).__name__, client.state))
            )
            before_the_first_attempt = client.state
            assert before_the_first_attempt is SupervisorState.DISCONNECTED
            assert await client.wait_state(SupervisorState.BACKING_OFF) is (
                SupervisorState.BACKING_OFF
            )
            assert client.connection is None
            host.up()
            conn = await client.wait_connected()
            assert client.connection is conn
            assert trio.current_time() == 1.0
            assert (client.attempts, client.connections) == (2, 1)
        assert client.state is SupervisorState.CLOSED
        assert client.connection is None
        assert client.error is None

    assert seen == [
        (0.0, "AttemptStarted", SupervisorState.CONNECTING),
        (0.0, "AttemptFailed", SupervisorState.CONNECTING),
        (0.0, "BackingOff", SupervisorState.BACKING_OFF),
        (1.0, "AttemptStarted", SupervisorState.CONNECTING),
        (1.0, "Connected", SupervisorState.CONNECTED),
        (1.0, "Stopped", SupervisorState.CLOSED),
    ]


async def test_leaving_the_block_closes_with_1000_and_reports_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        async with reconnecting(network, record=record) as client:
            conn = await client.wait_connected()
        closed = conn.closed
        assert closed is not None
        assert closed.code == CloseCode.NORMAL
        assert not closed.by_peer
        await trio.testing.wait_all_tasks_blocked()
        assert host.server is not None
        assert host.server.statistics().closed_by_code == {CloseCode.NORMAL: 1}
        assert host.active == 0
        await client.aclose()  # idempotent
    assert record.summary()[-1] == (0.0, "stopped", None)
    with pytest.raises(ReconnectFailed, match="closed"):
        await client.wait_connected()


async def test_a_failing_listener_is_logged_and_ignored(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    record = Recorder()

    def broken(event: SupervisorEvent) -> None:
        raise RuntimeError("listener bug")

    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo)
        with caplog.at_level(logging.INFO, logger="trio_heartbeat.supervisor"):
            async with open_reconnecting_client(
                [ENDPOINT], connector=network.connect, listeners=[broken, record]
            ) as client:
                await client.wait_connected()

    assert [type(event) for _, event in record.events] == [AttemptStarted, Connected, Stopped]
    ours = [r for r in caplog.records if r.name == "trio_heartbeat.supervisor"]
    failures = [r for r in ours if r.levelno == logging.ERROR]
    assert len(failures) == 3
    assert "listener" in failures[0].getMessage()
    infos = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    assert infos == [
        f"attempt 1: connecting to {ENDPOINT}",
        f"connected to {ENDPOINT} (attempt 1)",
        "stopped",
    ]


async def test_an_error_in_the_block_propagates_as_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo)
        with pytest.raises(KeyError, match="from the block"):
            async with reconnecting(network, record=record) as client:
                raise KeyError("from the block")
    assert client.state is SupervisorState.CLOSED
    # The supervisor got as far as its first attempt, which the error cancelled.
    assert record.summary() == [(0.0, "attempt", 1, ENDPOINT), (0.0, "stopped", None)]


# -- a reconnect storm -----------------------------------------------------------------


#: A server HELLO with hour-long heartbeats: the storm's server says it, its
#: verdict and nothing more.
QUIET_HELLO = encode_hello(
    Hello(
        role=Role.SERVER,
        status=HealthStatus.SERVING,
        interval_ms=3_600_000,
        timeout_ms=3_600_000,
        max_frame=1 << 20,
        nonce=bytes(16),
    )
)


#: The PING that accepts a client's HELLO (THB/1 §3.1): the client is connected once it arrives.
VERDICT_PING = encode_ping(bytes(8), HealthStatus.SERVING)

QUIET = Config(interval=3600.0, timeout=3600.0)


async def hello_then_listen(stream: trio.abc.Stream, address: str) -> None:
    # A THB/1 server cut down to its handshake and its goodbye: the cheapest
    # peer a supervisor can be connected to, so that 1,000 of them run in a
    # second or two. With hour-long heartbeats nothing else comes (the PONG
    # that answers the verdict is read and ignored).
    await stream.send_all(QUIET_HELLO)
    decoder = FrameDecoder(max_frame=1 << 20)
    while data := await stream.receive_some():
        decoder.receive_data(data)
        for frame in decoder.frames():
            if isinstance(frame, Hello):
                await stream.send_all(VERDICT_PING)
            elif isinstance(frame, Close):
                await stream.send_all(encode_close(frame.code, frame.reason))
                return


def busiest_window(times: Sequence[float], width: float) -> int:
    """The most values in any closed window of ``width`` seconds, wherever it starts."""
    ordered = sorted(times)
    return max(bisect_right(ordered, start + width) - i for i, start in enumerate(ordered))


def envelope(n: int) -> float:
    return min(DEFAULT_BACKOFF.cap, DEFAULT_BACKOFF.base * DEFAULT_BACKOFF.factor**n)


STORM_CLIENTS = 1000


STORM_SEEDS = 20


@pytest.fixture
def fewer_collections() -> Iterator[None]:
    """Collect garbage less often while a thousand clients run.

    Each ending connection leaves cycles behind (exceptions and their
    tracebacks), and each full collection walks every live object of every
    client: at the default thresholds that is half of the storm's run time.
    """
    saved = gc.get_threshold()
    gc.set_threshold(50_000, saved[1], saved[2])
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def fleet_policy(family: int, client: int) -> FullJitterBackoff:
    return replace(DEFAULT_BACKOFF, seed=family * STORM_CLIENTS + client)


async def test_a_reconnect_storm_is_spread_out_and_everyone_comes_back(
    autojump_clock: trio.testing.MockClock, fewer_collections: None
) -> None:
    lost_at, back_at = 1.0, 5.0
    records = [Recorder() for _ in range(STORM_CLIENTS)]
    async with open_memory_network() as network:
        host = network.listen_raw(ENDPOINT, hello_then_listen)
        async with run_clients(
            network,
            ENDPOINT,
            STORM_CLIENTS,
            config=QUIET,
            per_client=lambda i: {"backoff": fleet_policy(0, i), "listeners": [records[i]]},
        ) as clients:
            assert trio.current_time() == 0.0
            await trio.sleep(lost_at)
            host.down()  # every connection reset at the same instant, and refused after
            await trio.sleep(back_at - lost_at)
            host.up()
            for client in clients:
                await client.wait_connected()
            everyone_back = trio.current_time()

    first_retries = []
    for i, record in enumerate(records):
        policy = fleet_policy(0, i)
        delays = [event.delay for _, event in record.of(BackingOff)]
        assert delays == list(islice(policy, len(delays)))
        assert record.times(Disconnected) == [lost_at]
        # The first retry comes exactly the policy's first delay after the loss.
        first_retry = record.times(AttemptStarted)[1]
        assert first_retry == lost_at + next(iter(policy))
        first_retries.append(first_retry - lost_at)
        # Back within one backoff delay of the server's return: the wait under
        # way when it came back, never more than that delay's envelope.
        reconnected_at = record.times(Connected)[1]
        last_wait_began = record.times(BackingOff)[-1]
        assert reconnected_at == last_wait_began + delays[-1]
        assert last_wait_began < back_at <= reconnected_at
        assert reconnected_at - back_at <= delays[-1] <= envelope(len(delays) - 1)

    assert host.accepted == 2 * STORM_CLIENTS
    assert host.refused == sum(len(record.of(AttemptFailed)) for record in records)
    assert everyone_back - back_at <= DEFAULT_BACKOFF.cap
    # No 100 ms window, wherever it starts, holds more than 12% of the first retries.
    assert busiest_window(first_retries, 0.1) <= 0.12 * STORM_CLIENTS
    assert max(first_retries) > 0.95 * DEFAULT_BACKOFF.base  # spread over the whole envelope

    # The run above shows that each first retry comes exactly its policy's first
    # delay after the loss; the same bound holds for the fleets of 19 more seeds.
    for family in range(1, STORM_SEEDS):
        retries = [next(iter(fleet_policy(family, i))) for i in range(STORM_CLIENTS)]
        assert busiest_window(retries, 0.1) <= 0.12 * STORM_CLIENTS


async def test_without_jitter_the_storm_comes_back_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The contrast: the same fleet with unjittered backoff retries in lockstep.
    clients = 100
    retried: list[float] = []

    def note(event: SupervisorEvent) -> None:
        if isinstance(event, AttemptStarted) and event.attempt == 2:
            retried.append(trio.current_time())

    async with open_memory_network() as network:
        host = network.listen_raw(ENDPOINT, hello_then_listen)
        async with run_clients(
            network,
            ENDPOINT,
            clients,
            config=QUIET,
            backoff=ExponentialBackoff(base=DEFAULT_BACKOFF.base),
            listeners=[note],
        ):
            await trio.sleep(1.0)
            host.down()
            await trio.sleep(3.0)
    assert retried == [3.0] * clients
    assert busiest_window(retried, 0.1) == clients


async def test_a_caller_that_does_not_read_never_holds_up_the_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server sends more than the supervisor's receive buffer holds (though
    # not more than the connection's own queue can take as well, or the CLOSE
    # would wait behind unread DATA: that is backpressure), then drains (1001).
    # The caller only sends. The supervisor must still see the end, reconnect
    # at once, and keep every message, in order, for later.
    served = 0

    async def flood_then_close(conn: Connection) -> None:
        nonlocal served
        served += 1
        if served == 1:
            for i in range(100):
                await conn.send(b"%d" % i)
            await conn.aclose(CloseCode.GOING_AWAY, "draining")
        else:
            await trio.sleep_forever()

    async with open_memory_network() as network:
        network.listen(ENDPOINT, flood_then_close)
        async with reconnecting(network, backoff=ConstantBackoff(1.0), receive_buffer=64) as client:
            await client.wait_connected()
            while client.connections < 2:
                await client.wait_state(SupervisorState.CONNECTED, SupervisorState.DISCONNECTED)
                await trio.sleep(0.01)
            assert client.connection is not None
            assert client.connection.closed is None
            received = [await client.receive() for _ in range(100)]
            assert received == [b"%d" % i for i in range(100)]


# -- over real TCP: a server restarted on the same port --------------------------------


#: Far more than any of these tests needs; they fail instead of hanging.
BOUND = 10.0


async def serve_until_drained(
    port: int,
    stopped: trio.Event,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    # ``stopped`` is set once the listener is closed, so that the port can be
    # bound again by the next server.
    try:
        await serve_tcp(echo, port, host=LOOPBACK, task_status=task_status)
    finally:
        stopped.set()


async def test_reconnects_after_a_server_restart_on_the_same_port() -> None:
    events: list[SupervisorEvent] = []
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            first_stopped = trio.Event()
            first: Server = await nursery.start(serve_until_drained, 0, first_stopped)
            port = first.port
            async with open_reconnecting_client(
                [f"{LOOPBACK}:{port}"], backoff=ConstantBackoff(0.05), listeners=[events.append]
            ) as client:
                await client.send(b"before")
                assert await client.receive() == b"before"

                await first.drain(grace=BOUND)  # CLOSE 1001 to the client, then gone
                await first_stopped.wait()
                await client.wait_state(SupervisorState.BACKING_OFF)
                await client.send(b"while down")  # buffered until the next connection

                second_stopped = trio.Event()
                second: Server = await nursery.start(serve_until_drained, port, second_stopped)
                conn = await client.wait_connected()
                assert conn.remote_address == f"{LOOPBACK}:{port}"
                assert await client.receive() == b"while down"
                await client.send(b"after")
                assert await client.receive() == b"after"
            await second.drain(grace=BOUND)

    kinds = [type(event) for event in events]
    assert kinds[:4] == [AttemptStarted, Connected, Disconnected, AttemptStarted]
    assert isinstance(events[2], Disconnected)
    assert events[2].error.code == CloseCode.GOING_AWAY
    # After 1001 the supervisor came straight back, found nobody, and backed off
    # until the second server was listening.
    assert kinds[4:6] == [AttemptFailed, BackingOff]
    assert kinds[-2:] == [Connected, type(events[-1])]
    assert all(kind in (AttemptStarted, AttemptFailed, BackingOff) for kind in kinds[4:-2])
    assert client.connections == 2
    assert first.statistics().closed_by_code == {CloseCode.GOING_AWAY: 1}
    assert second.statistics().completed_handshakes == 1


async def greet_in_turn(conn: Connection) -> None:
    await conn.send(b"hello from %s" % conn.config.instance_id.encode())
    await echo(conn)


async def serve_in(
    scope: trio.CancelScope,
    port: int,
    name: str,
    stopped: trio.Event,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        with scope:
            await serve_tcp(
                greet_in_turn,
                port,
                host=LOOPBACK,
                config=Config(instance_id=name),
                task_status=task_status,
            )
    finally:
        stopped.set()


async def test_receive_carries_on_when_a_cancelled_server_comes_back_on_its_port() -> None:
    # The first server is cancelled rather than drained, as when its process
    # is told to stop: its connections are torn down at once.
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            first_scope, first_stopped = trio.CancelScope(), trio.Event()
            first: Server = await nursery.start(serve_in, first_scope, 0, "first", first_stopped)
            port = first.port
            async with open_reconnecting_client(
                [(LOOPBACK, port)], backoff=ConstantBackoff(0.05)
            ) as client:
                assert await client.receive() == b"hello from first"
                first_scope.cancel()
                await first_stopped.wait()
                second_scope, second_stopped = trio.CancelScope(), trio.Event()
                await nursery.start(serve_in, second_scope, port, "second", second_stopped)
                assert await client.receive() == b"hello from second"
                await client.send(b"still in touch")
                assert await client.receive() == b"still in touch"
            second_scope.cancel()
    assert client.connections == 2


async def test_what_a_slow_server_was_not_sent_by_the_close_timeout_is_named_as_such() -> None:
    """Connected, but the server reads nothing: the reason says so, not "never connected"."""
    config = Config(close_timeout=0.5)
    message = bytes(64 << 10)

    async def never_reads(conn: Connection) -> None:
        await trio.sleep_forever()

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                partial(serve_tcp, never_reads, 0, host=LOOPBACK, config=config)
            )

            async def send_all_then_leave() -> None:
                async with open_reconnecting_client(
                    [(LOOPBACK, server.port)], config=config
                ) as client:
                    await client.wait_connected()
                    for _ in range(400):  # 25 MiB: far more than the socket buffers hold
                        await client.send(message)

            with pytest.raises(UndeliveredMessages) as info:
                await send_all_then_leave()
            nursery.cancel_scope.cancel()
    assert info.value.reason == "not written within the close timeout (0.5 s)"
    assert 0 < len(info.value.messages) < 400


# -- pinned details: counts, messages, states and settings passed on -------------------


async def test_settings_at_their_limits_are_accepted_and_bad_ones_named_exactly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The limits are inclusive where the docs say so, and each refusal says which rule."""
    async with (
        open_memory_network() as network,
        reconnecting(
            network, receive_buffer=1, buffer_size=1, connect_timeout=0.5, healthy_after=0.0
        ) as client,
    ):
        assert client.connect_timeout == 0.5
        assert client.healthy_after == 0.0
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"receive_buffer": 0}, "buffer_size and receive_buffer must be at least 1"),
        ({"connect_timeout": 0}, "connect_timeout must be positive and healthy_after not negative"),
        ({"when_full": "drop"}, "when_full must be 'wait' or 'fail'"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            async with open_reconnecting_client([ENDPOINT], **kwargs):
                pass  # pragma: no cover


async def test_a_stop_code_after_a_healthy_spell_counts_no_attempt_since(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``ReconnectFailed.attempts`` counts attempts since the last healthy connection.

    Up exactly ``healthy_after`` is healthy, so the count starts over at 0.
    """
    async with open_memory_network() as network:
        network.listen(ENDPOINT, close_first_with(CloseCode.POLICY_VIOLATION, after=2.0))
        with pytest.raises(ReconnectFailed) as healthy:
            async with reconnecting(network, healthy_after=2.0):
                await trio.sleep_forever()
    assert healthy.value.attempts == 0
    async with open_memory_network() as network:
        network.listen(ENDPOINT, close_first_with(CloseCode.POLICY_VIOLATION, after=2.0))
        with pytest.raises(ReconnectFailed) as flapped:
            async with reconnecting(network, healthy_after=3.0):
                await trio.sleep_forever()
    assert flapped.value.attempts == 1


async def test_going_away_after_exactly_healthy_after_reconnects_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A connection up exactly ``healthy_after`` makes the next 1001 a first one again."""
    record = Recorder()
    lifetimes = iter([0.0, 5.0, 5.0])

    async def going_away(conn: Connection) -> None:
        await trio.sleep(next(lifetimes, 3600.0))
        await conn.aclose(CloseCode.GOING_AWAY)

    async with open_memory_network() as network:
        network.listen(ENDPOINT, going_away)
        async with reconnecting(
            network, record=record, backoff=ConstantBackoff(1.0), healthy_after=5.0
        ):
            await trio.sleep(20.0)
    assert record.times(Connected) == [0.0, 0.0, 5.0, 10.0]
    assert not record.of(BackingOff)


async def test_a_nudge_during_an_attempt_skips_only_the_next_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The skipped wait is the one after the nudged attempt; the one after that is waited in full."""
    record = Recorder()
    async with open_memory_network() as network:
        network.listen_raw(ENDPOINT, never_says_hello)
        async with reconnecting(
            network, record=record, backoff=ConstantBackoff(1.0), connect_timeout=2.0
        ) as client:
            await trio.sleep(1.0)
            assert client.state is SupervisorState.CONNECTING
            client.nudge()
            await trio.sleep(6.0)
    assert record.times(AttemptStarted) == [0.0, 2.0, 5.0]
    assert record.summary()[-2] == (5.0, "attempt", 3, ENDPOINT)


async def test_the_events_carry_the_connection_and_the_state_after_a_drop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``Connected`` names the connection; once it ends the state is DISCONNECTED."""
    states: list[tuple[str, Any]] = []
    connections: list[Connection] = []

    def listener(event: SupervisorEvent) -> None:
        states.append((type(event).__name__, client.state))
        if isinstance(event, Connected):
            connections.append(event.connection)

    async with open_memory_network() as network:
        network.listen(ENDPOINT, living_for([1.0]))
        async with reconnecting(network, backoff=ConstantBackoff(1.0)) as client:
            client.add_listener(listener)
            first = await client.wait_connected()
            await trio.sleep(1.5)
            assert client.state is SupervisorState.BACKING_OFF
    assert connections[0] is first
    assert ("Disconnected", SupervisorState.DISCONNECTED) in states


async def test_an_attempt_timeout_says_where_and_how_long(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        network.listen_raw(ENDPOINT, never_says_hello)
        with pytest.raises(ReconnectFailed):
            async with reconnecting(network, record=record, backoff=[], connect_timeout=2.5):
                await trio.sleep_forever()
    [(_, failed)] = record.of(AttemptFailed)
    assert failed.error.reason == f"no connection to {ENDPOINT} within 2.5 s"


async def test_connection_listeners_are_given_to_each_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``connection_listeners`` reach the connections made through a ``connector``."""
    seen: list[Connection] = []
    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo)
        listener: Any = lambda conn, event: seen.append(conn)  # noqa: E731
        async with reconnecting(network, connection_listeners=[listener]) as client:
            conn = await client.wait_connected()
            await trio.sleep(1.5)  # a heartbeat or two
    assert seen
    assert all(one is conn for one in seen)


class Refused:
    """Stands in for ``open_connection``'s context manager: the attempt is refused."""

    async def __aenter__(self) -> Connection:
        await trio.lowlevel.checkpoint()
        raise BrokenConnection(CloseCode.ABNORMAL_CLOSURE, "refused")

    async def __aexit__(self, *exc_info: object) -> None:
        pass  # pragma: no cover


async def test_without_a_connector_every_setting_goes_to_open_connection(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """TCP attempts get the client's config, options, TLS, timeout, keepalive and listeners."""
    import trio_heartbeat._supervisor as supervisor

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_open_connection(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))

        return Refused()

    monkeypatch.setattr(supervisor, "open_connection", fake_open_connection)
    config = Config()
    options = ConnectionOptions()
    ssl_context = object()
    listeners: list[Any] = [print]
    with pytest.raises(ReconnectFailed):
        async with open_reconnecting_client(
            [ENDPOINT],
            backoff=[],
            config=config,
            options=options,
            ssl_context=ssl_context,  # type: ignore[arg-type]
            server_hostname="example.org",
            connect_timeout=7.0,
            keepalive=False,
            connection_listeners=listeners,
        ):
            await trio.sleep_forever()
    [(args, kwargs)] = calls
    host, port = ENDPOINT.rsplit(":", 1)
    assert args == (host, int(port))
    assert kwargs == {
        "config": config,
        "options": options,
        "ssl_context": ssl_context,
        "server_hostname": "example.org",
        "connect_timeout": 7.0,
        "keepalive": False,
        "listeners": listeners,
    }


async def test_after_aclose_it_is_closed_at_once_and_send_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo)
        async with reconnecting(network) as client:
            await client.wait_connected()
            await client.aclose()
            assert client.state is SupervisorState.CLOSED
            with pytest.raises(ReconnectFailed) as info:
                await client.send(b"late")
    assert str(info.value) == "the reconnecting client is closed"
    assert info.value.attempts == 1


async def test_undelivered_messages_name_the_last_error_and_it_kept_trying(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Closing with messages buffered keeps trying for ``close_timeout``, then says why."""
    record = Recorder()

    async def send_and_leave(network: MemoryNetwork) -> None:
        async with reconnecting(network, record=record, backoff=ConstantBackoff(1.0)) as client:
            await client.send(b"one")
            await trio.sleep(0.5)

    async with open_memory_network() as network:  # nothing listens
        with pytest.raises(UndeliveredMessages) as info:
            await send_and_leave(network)
    last = record.of(AttemptFailed)[-1][1].error
    assert info.value.reason == str(last)
    assert record.times(AttemptStarted)[:6] == [0.0, 0.5, 1.5, 2.5, 3.5, 4.5]
    assert record.times(Stopped) == [5.5]


async def test_undelivered_messages_before_any_attempt_ended_say_never_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_network() as network:
        network.listen_raw(ENDPOINT, never_says_hello)
        with pytest.raises(UndeliveredMessages) as info:
            async with reconnecting(network, connect_timeout=60.0) as client:
                await client.send(b"one")
    assert info.value.reason == "never connected"


async def test_a_failing_listener_is_logged_with_the_listener_and_the_event(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[SupervisorEvent] = []

    def broken(event: SupervisorEvent) -> None:
        events.append(event)
        raise RuntimeError("listener bug")

    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo)
        with caplog.at_level(logging.ERROR, logger="trio_heartbeat.supervisor"):
            async with reconnecting(network) as client:
                client.add_listener(broken)
                await client.wait_connected()
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failures[0].getMessage() == f"supervisor listener {broken!r} failed on {events[0]!r}"


async def test_a_source_empty_from_the_start_gives_up_with_no_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No attempt was made, so there is no last error, and none was counted."""
    record = Recorder()
    async with open_memory_network() as network:
        with pytest.raises(ReconnectFailed, match=r"after 0 attempt\(s\)") as info:
            async with reconnecting(network, list, record):
                await trio.sleep_forever()
    assert info.value.last_error is None
    assert info.value.attempts == 0
    assert record.summary() == [(0.0, "stopped", None)]


async def test_the_uptime_of_a_connection_that_breaks_is_measured_from_its_opening(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reset connection (ended by an error, not a CLOSE) reports how long it was up."""
    record = Recorder()
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, idle)
        await trio.sleep(2.0)  # the connection opens at t=2, not at t=0
        async with reconnecting(network, record=record, backoff=ConstantBackoff(2.0)):
            await trio.sleep(1.5)
            host.restart()  # every connection reset
            await trio.sleep(0.5)
    [(at, dropped)] = record.of(Disconnected)
    assert isinstance(dropped.error, BrokenConnection)
    assert (at, dropped.uptime) == (3.5, 1.5)


async def test_the_recorder_fails_the_test_on_a_storm_of_events_at_one_instant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The guard that turns a reconnect storm (virtual time standing still)
    into a failure: 1,000 events at one instant pass, the next fails the test;
    events spread over time never do."""
    record = Recorder()
    for attempt in range(Recorder.STORM):
        record(AttemptStarted(attempt, ENDPOINT))
    await trio.sleep(1.0)
    for attempt in range(Recorder.STORM):
        record(AttemptStarted(attempt, ENDPOINT))
    with pytest.raises(
        pytest.fail.Exception, match=r"^a reconnect storm: over 1000 events at 1.0 s$"
    ):
        record(AttemptStarted(0, ENDPOINT))
    assert len(record.events) == 2 * Recorder.STORM


# -- the client's health, and listeners removed ----------------------------------------


async def test_set_health_reaches_the_open_connection_and_every_later_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """DEGRADED at 0.5 reaches the server in a PING at once; the connection after a
    crash at 1.0 says DEGRADED in its HELLO."""
    seen: list[tuple[float, HealthStatus | None]] = []

    async def handler(conn: Connection) -> None:
        seen.append((trio.current_time(), conn.peer_health))
        status = await conn.wait_peer_health(HealthStatus.DEGRADED)
        seen.append((trio.current_time(), status))
        await echo(conn)

    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, handler)
        async with reconnecting(network, backoff=[0.5] * 3) as client:
            await client.wait_connected()
            await trio.sleep_until(0.5)
            client.set_health(HealthStatus.DEGRADED)
            assert client.config.status is HealthStatus.DEGRADED
            assert client.connection is not None
            assert client.connection.health is HealthStatus.DEGRADED
            await trio.sleep_until(1.0)
            host.kill()
            await trio.sleep(0.1)
            conn = await client.wait_connected()
            assert conn.health is HealthStatus.DEGRADED
            await trio.sleep(0.1)
    assert seen == [
        (0.0, HealthStatus.SERVING),
        (0.5, HealthStatus.DEGRADED),
        (1.5, HealthStatus.DEGRADED),
        (1.5, HealthStatus.DEGRADED),
    ]


async def test_a_removed_listener_hears_nothing_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    record = Recorder()
    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo)
        async with reconnecting(network) as client:
            client.add_listener(record)
            await client.wait_connected()
            client.remove_listener(record)
            with pytest.raises(ValueError, match="not in list"):
                client.remove_listener(record)
    assert [type(event) for _, event in record.events] == [AttemptStarted, Connected]


async def test_a_group_raised_by_the_block_comes_out_as_it_was_raised(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The block's own ExceptionGroup, of one or two leaves, is neither unwrapped nor
    wrapped again."""

    async def connected_then_raise(
        network: MemoryNetwork, group: ExceptionGroup[Exception]
    ) -> None:
        async with reconnecting(network) as client:
            await client.wait_connected()
            raise group

    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo)
        for leaves in ([KeyError("a")], [KeyError("a"), ValueError("b")]):
            group = ExceptionGroup("from the block", leaves)
            with pytest.raises(ExceptionGroup) as info:
                await connected_then_raise(network, group)
            assert info.value is group
