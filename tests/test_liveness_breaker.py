"""``bind_breaker`` (``_liveness_breaker.py``): a circuit breaker driven by liveness, in virtual time.

What it pins: the breaker is FORCED_OPEN at exactly the instant the detector
convicts the peer, the peer reports NOT_SERVING (in a HELLO, PING or PONG), or
the reconnecting client loses its connection, with no failed call; it goes
HALF_OPEN only at a heartbeat from a SERVING peer (a DEGRADED one keeps it
open); no call reaches the peer meanwhile (the fallback answers); unbinding
stops all of it. Times are exact (``autojump_clock``).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import trio
import trio.lowlevel
import trio.testing
from helpers import (
    CONFIG,
    ENDPOINT,
    ScriptedPeer,
    echo,
    handshake_then_serve,
    pings_then_silence,
    reconnecting,
    run_body,
    stream_and_peer,
)
from trio.testing import MockClock

from trio_heartbeat._breaker import BreakerState, BreakerTransition
from trio_heartbeat._circuit import Breaker
from trio_heartbeat._config import Config
from trio_heartbeat._connection import Connection
from trio_heartbeat._errors import CircuitOpen, HeartbeatTimeout
from trio_heartbeat._events import ConnectionEnded, Event
from trio_heartbeat._frames import HealthStatus, Role
from trio_heartbeat._liveness_breaker import LivenessBinding, bind_breaker
from trio_heartbeat._stream_connection import open_stream_connection
from trio_heartbeat.testing import open_memory_network

S = BreakerState


def state_of(breaker: Breaker) -> BreakerState:
    """The state, read through a call so that mypy does not carry narrowing across steps."""
    return breaker.state


class Moves:
    """A breaker listener: (time, new state, reason) of every transition."""

    def __init__(self, breaker: Breaker) -> None:
        self.seen: list[tuple[float, BreakerState, str]] = []
        breaker.add_listener(self)

    def __call__(self, transition: BreakerTransition) -> None:
        self.seen.append((transition.at, transition.state, transition.reason))

    def states(self) -> list[tuple[float, BreakerState]]:
        return [(at, state) for at, state, _ in self.seen]


async def test_the_breaker_opens_at_exactly_the_conviction_time(autojump_clock: MockClock) -> None:
    """The peer's last PING is at 3.0; the detector convicts it at 6.0, and so the breaker."""
    breaker = Breaker()
    moves = Moves(breaker)
    bound: list[Connection] = []

    async def body(conn: Connection) -> None:
        bound.append(conn)
        bind_breaker(breaker, conn)
        await trio.sleep_forever()

    stream, peer = stream_and_peer(Role.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pings_then_silence, peer, 3)
        with pytest.raises(HeartbeatTimeout):
            await run_body(stream, body, role=Role.SERVER, config=CONFIG)
        assert trio.current_time() == 6.0
    ((at, state, reason),) = moves.seen
    assert (at, state) == (6.0, S.FORCED_OPEN)
    assert reason == "connection ended: 1011 heartbeat timeout: peer silent"
    with pytest.raises(CircuitOpen) as refused:
        await breaker.call(trio.sleep, 0)
    assert refused.value.state is S.FORCED_OPEN
    assert refused.value.retry_after is None  # until liveness says otherwise


async def peer_reporting(peer: ScriptedPeer, statuses: list[HealthStatus]) -> None:
    """The client peer's handshake, then one PING a second with each status, then serve."""
    await peer.handshake()
    for second, status in enumerate(statuses, start=1):
        await trio.sleep_until(float(second))
        await peer.send_ping(status=status)
    await peer.serve()


async def test_not_serving_opens_it_and_only_a_serving_heartbeat_lets_it_half_open(
    autojump_clock: MockClock,
) -> None:
    breaker = Breaker()
    moves = Moves(breaker)
    statuses = [
        HealthStatus.SERVING,
        HealthStatus.NOT_SERVING,
        HealthStatus.DEGRADED,  # not enough
        HealthStatus.SERVING,
    ]

    async def body(conn: Connection) -> None:
        with bind_breaker(breaker, conn) as binding:
            assert repr(binding) == f"<LivenessBinding {breaker!r} to {conn!r}>"
            await trio.sleep_until(2.5)
            assert state_of(breaker) is S.FORCED_OPEN
            assert await breaker.call_with_fallback(conn.ping, fallback=fallback) == -1.0
            await trio.sleep_until(4.5)
            assert state_of(breaker) is S.HALF_OPEN

    async def fallback(exc: Exception) -> float:
        assert isinstance(exc, CircuitOpen)
        await trio.lowlevel.checkpoint()
        return -1.0

    stream, peer = stream_and_peer(Role.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer_reporting, peer, statuses)
        await run_body(stream, body, role=Role.SERVER, config=CONFIG)
    assert moves.seen == [
        (2.0, S.FORCED_OPEN, "peer reports NOT_SERVING"),
        (4.0, S.HALF_OPEN, "liveness restored"),
    ]


@pytest.mark.parametrize("status", [HealthStatus.NOT_SERVING, HealthStatus.DEGRADED])
async def test_a_server_not_serving_from_its_hello_keeps_a_new_clients_breaker_open(
    autojump_clock: MockClock, status: HealthStatus
) -> None:
    """Bound before the first connection (forced open, not connected), then connected at
    0.0 to a server whose HELLO and PINGs say NOT_SERVING, or DEGRADED: neither lifts
    anything; SERVING from 2.0 half-opens it at that PING (no delay on this network)."""
    breaker = Breaker()
    moves = Moves(breaker)
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo, config=Config(status=status))
        server = host.server
        assert server is not None
        async with reconnecting(network) as client:
            with bind_breaker(breaker, client):
                conn = await client.wait_connected()
                assert conn.peer_health is status
                await trio.sleep_until(2.0)
                assert state_of(breaker) is S.FORCED_OPEN
                server.set_health(HealthStatus.SERVING)
                await trio.sleep(0.5)
    assert moves.seen == [
        (0.0, S.FORCED_OPEN, "not connected"),
        (2.0, S.HALF_OPEN, "liveness restored"),
    ]


async def test_binding_to_a_connection_that_has_ended_opens_it_at_once(
    autojump_clock: MockClock,
) -> None:
    breaker = Breaker()
    stream, peer = stream_and_peer(Role.CLIENT)
    ended: list[Connection] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_serve, peer)
        async with open_stream_connection(stream, role=Role.SERVER, config=CONFIG) as conn:
            ended.append(conn)
    moves = Moves(breaker)
    binding = bind_breaker(breaker, ended[0])
    assert state_of(breaker) is S.FORCED_OPEN
    assert breaker.statistics().state_since == trio.current_time()
    # A CLOSE 1000 with no reason: the code alone, no trailing space.
    assert moves.seen == [(trio.current_time(), S.FORCED_OPEN, "connection ended: 1000")]
    assert repr(binding) == f"<LivenessBinding {breaker!r} to None>"  # let go of at once


async def test_a_reconnecting_client_opens_it_while_disconnected_and_no_call_gets_through(
    autojump_clock: MockClock,
) -> None:
    """Bound before the first connection: open until it is in, half open at the server's
    verdict PING; killed at 2.0: open the instant the connection ends, calls get the fallback;
    back after the 1 s backoff, half open again at the new verdict."""
    breaker = Breaker()
    moves = Moves(breaker)
    reached: list[float] = []

    async def ask(client: object) -> str:
        reached.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        return "peer"

    async def cached(exc: Exception) -> str:
        await trio.lowlevel.checkpoint()
        return "cached"

    trials = breaker.config.permitted_calls_in_half_open
    ended: list[float] = []

    def note_end(_conn: Connection, event: Event) -> None:
        if isinstance(event, ConnectionEnded):
            ended.append(trio.current_time())

    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        host.faults.set_delay(0.05)  # nobody is connected when the binding is made
        async with reconnecting(
            network, backoff=[1.0] * 5, connection_listeners=[note_end]
        ) as client:
            with bind_breaker(breaker, client) as binding:
                assert state_of(breaker) is S.FORCED_OPEN
                await client.wait_connected()
                first = trio.current_time()
                assert state_of(breaker) is S.HALF_OPEN
                for _ in range(trials):
                    assert await breaker.call_with_fallback(ask, client, fallback=cached) == "peer"
                assert state_of(breaker) is S.CLOSED
                await trio.sleep_until(2.0)
                host.kill()
                await breaker.wait_state(S.FORCED_OPEN)
                assert trio.current_time() == ended[-1]  # the instant the connection ended
                answers = [
                    await breaker.call_with_fallback(ask, client, fallback=cached) for _ in range(3)
                ]
                assert answers == ["cached"] * 3
                await breaker.wait_state(S.HALF_OPEN)
                second = trio.current_time()
                assert client.connection is not None
                # The verdict PING: it follows the server's HELLO by one trip (0.1 s).
                assert client.connection.opened_at is not None
                assert second == pytest.approx(client.connection.opened_at + 0.1)
                assert repr(binding) == f"<LivenessBinding {breaker!r} to {client!r}>"
    assert reached == [first] * trials
    assert 3.0 < second < 3.5
    assert moves.states() == [
        (0.0, S.FORCED_OPEN),
        (first, S.HALF_OPEN),
        (first, S.CLOSED),
        (ended[0], S.FORCED_OPEN),
        (second, S.HALF_OPEN),
    ]
    assert moves.seen[0][2] == "not connected"
    assert moves.seen[3][2].startswith("connection ended: 1006")


async def test_a_server_going_not_serving_opens_the_clients_breaker_one_trip_later(
    autojump_clock: MockClock,
) -> None:
    """With 0.05 s each way, the server says NOT_SERVING at 2.8 (5/8 of an interval after
    its last PING, so it goes at once): the client's breaker opens at 2.85; SERVING at
    5.0 reaches it at 5.05, and the breaker half-opens at that PING."""
    breaker = Breaker()
    moves = Moves(breaker)
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        host.faults.set_delay(0.05)
        server = host.server
        assert server is not None
        async with reconnecting(network) as client:
            await client.wait_connected()
            bind_breaker(breaker, client)
            await trio.sleep_until(2.8)
            server.set_health(HealthStatus.NOT_SERVING)
            await trio.sleep_until(5.0)
            server.set_health(HealthStatus.SERVING)
            await trio.sleep_until(6.0)
    (opened, first), (half_opened, second) = moves.states()[:2]
    assert (first, second) == (S.FORCED_OPEN, S.HALF_OPEN)
    assert opened == pytest.approx(2.85)
    assert half_opened == pytest.approx(5.05)


async def test_unbinding_stops_driving_the_breaker(autojump_clock: MockClock) -> None:
    breaker = Breaker()
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        async with reconnecting(network) as client:
            await client.wait_connected()
            binding = bind_breaker(breaker, client)
            assert state_of(breaker) is S.CLOSED  # connected, and the server said SERVING
            binding.unbind()
            binding.unbind()  # idempotent
            host.kill()
            await trio.sleep(2.0)
            assert state_of(breaker) is S.CLOSED


async def test_only_connections_and_clients_can_be_bound(autojump_clock: MockClock) -> None:
    with pytest.raises(TypeError, match="not str"):
        bind_breaker(Breaker(), "server:9000")  # type: ignore[arg-type]


async def test_an_ended_connection_is_not_kept_alive_by_its_binding(
    autojump_clock: MockClock,
) -> None:
    """Without the collector, the ended connection goes as soon as nobody holds it: the
    binding (still held, the breaker still forced open) lets go of it at its end."""
    breaker = Breaker()
    stream, peer = stream_and_peer(Role.CLIENT)
    held: list[LivenessBinding] = []
    gc.disable()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake_then_serve, peer)
            async with open_stream_connection(stream, role=Role.SERVER, config=CONFIG) as conn:
                held.append(bind_breaker(breaker, conn))
                gone = weakref.ref(conn)
            del conn
        del stream, peer
        assert gone() is None
        assert state_of(breaker) is S.FORCED_OPEN
        assert held[0].breaker is breaker
    finally:
        gc.enable()


async def test_binding_to_a_connection_whose_peer_said_not_serving_opens_it_at_once(
    autojump_clock: MockClock,
) -> None:
    """Bound after the handshake to a connection whose server said NOT_SERVING in its HELLO:
    FORCED_OPEN at that instant, saying why."""
    breaker = Breaker()
    moves = Moves(breaker)
    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo, config=Config(status=HealthStatus.NOT_SERVING))
        async with reconnecting(network) as client:
            conn = await client.wait_connected()
            await trio.sleep(0.5)
            with bind_breaker(breaker, conn):
                assert state_of(breaker) is S.FORCED_OPEN
    assert moves.seen == [(0.5, S.FORCED_OPEN, "peer reports NOT_SERVING")]


async def test_only_a_disconnection_or_the_stop_forces_a_hand_lifted_breaker_open_again(
    autojump_clock: MockClock,
) -> None:
    """Connected at 0.0; the host goes down at 1.0 (FORCED_OPEN at the connection's end);
    lifted by hand at 1.5. The refused attempt at 2.0 and the backoff around it leave it
    HALF_OPEN; the client stopping at 2.5 forces it open again, as "disconnected"."""
    breaker = Breaker()
    moves = Moves(breaker)
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        async with reconnecting(network, backoff=[1.0] * 5) as client:
            await client.wait_connected()
            binding = bind_breaker(breaker, client)
            await trio.sleep_until(1.0)
            host.down()
            await trio.sleep_until(1.5)
            assert breaker.liveness_restored()
            await trio.sleep_until(2.5)
            assert client.attempts == 2
            assert state_of(breaker) is S.HALF_OPEN
        assert trio.current_time() == 2.5
    binding.unbind()
    assert moves.seen == [
        (1.0, S.FORCED_OPEN, "connection ended: 1006 connection lost: the connection was reset"),
        (1.5, S.HALF_OPEN, "liveness restored"),
        (2.5, S.FORCED_OPEN, "disconnected"),
    ]


@pytest.mark.parametrize("bound", ["while it runs", "once it has stopped"])
async def test_a_stopped_client_is_not_kept_alive_by_its_binding(
    autojump_clock: MockClock, bound: str
) -> None:
    """Without the collector, the client goes once it has stopped and nobody holds it: a
    binding made while it runs (still held) lets go of it at its Stopped event; one made
    once it has stopped forces the breaker open and never listens to it (a listener would
    be a cycle keeping it until a full collection)."""
    breaker = Breaker()
    gc.disable()
    try:
        async with open_memory_network() as network:
            network.listen(ENDPOINT, echo)
            async with reconnecting(network) as client:
                if bound == "while it runs":
                    binding = bind_breaker(breaker, client)
                await client.wait_connected()
            if bound == "once it has stopped":
                binding = bind_breaker(breaker, client)
            gone = weakref.ref(client)
            del client
            assert gone() is None
        assert state_of(breaker) is S.FORCED_OPEN
        assert repr(binding).endswith("to None>")
    finally:
        gc.enable()
