"""Resilience on real loopback TCP: server processes that die, and a network that misbehaves.

Two kinds of test live here. The first kills or stops a real ``python -m
trio_heartbeat serve`` process under a reconnecting client and starts a new
one on the same port: SIGKILL (no CLOSE at all, the client finds out from the
transport) and SIGTERM (a drain: CLOSE 1001, which the client answers by
trying again at once). The second puts a :class:`FaultProxy` between the
reconnecting client and an in-process server, so that the server's registry
can be watched too, and injects one fault per test: blackholes, one-way
partitions, delay, a throughput limit, a slow reader, a reset, a half-open
connection.

Everything runs on the real clock, so bounds come in two kinds. Lower bounds
are the protocol's own and are checked exactly: a peer is convicted no sooner
than ``timeout`` after the last frame it sent arrived, a backoff wait lasts at
least its delay, the proxy never delivers early. Upper bounds get
:data:`SLACK` on top, for a loaded machine. Every backoff delay is checked
against the seeded policy, delay for delay.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from itertools import islice, pairwise
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from helpers import LOOPBACK, echo, run_serve_process

from trio_heartbeat import (
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
    Disconnected,
    Event,
    FixedTimeout,
    FullJitterBackoff,
    HeartbeatTimeout,
    PingReceived,
    PongReceived,
    ReconnectingClient,
    Server,
    SupervisorEvent,
    open_reconnecting_client,
    serve_tcp,
)
from trio_heartbeat.testing import Direction, FaultProxy, Side

pytestmark = pytest.mark.slow

INTERVAL = 0.1
TIMEOUT = 0.5
#: Both sides ping every 0.1 s and convict after 0.5 s of silence. The client
#: gives up on a handshake after 1 s, so that attempts into a blackhole end.
CLIENT_CONFIG = Config(interval=INTERVAL, timeout=TIMEOUT, handshake_timeout=1.0, close_timeout=1.0)
#: The in-process server waits longer for a HELLO than the client does: a
#: client HELLO held back by a fault and released by ``heal()`` is still
#: welcome, so a heal never meets a connection that is already doomed.
SERVER_CONFIG = Config(interval=INTERVAL, timeout=TIMEOUT, handshake_timeout=5.0)
SERVE_OPTIONS = ("--interval", str(INTERVAL), "--timeout", str(TIMEOUT))
BACKOFF = FullJitterBackoff(base=0.1, factor=2, cap=0.5, seed=1)
CONNECT_TIMEOUT = 2.0
#: Added to every real-time upper bound; never to a lower bound.
SLACK = 1.5
#: How long after a heal the client may take to be back: an attempt under way
#: may have to time out (handshake_timeout) and the next backoff wait pass.
RECONNECT_BOUND = CLIENT_CONFIG.handshake_timeout + BACKOFF.cap + SLACK
#: The whole of one test; only reached if something hangs.
BOUND = 10.0
#: Float rounding between ``a + b <= c`` and ``c - a >= b``.
EPSILON = 1e-6

E = TypeVar("E", bound=SupervisorEvent)


# -- watching the client -------------------------------------------------------------


class Timeline:
    """What a reconnecting client reports, stamped with ``trio.current_time()``.

    Pass :meth:`on_event` in the client's ``listeners`` and
    :meth:`on_protocol_event` in its ``connection_listeners``. Indexes into
    :attr:`events` mark "from here on": take :meth:`mark` before causing
    something, then wait for what it causes with :meth:`next`.
    """

    def __init__(self) -> None:
        self.events: list[tuple[float, SupervisorEvent]] = []
        #: Every PING or PONG the client received, and on which connection.
        self.heartbeats: list[tuple[float, Connection]] = []
        self._changed = trio.Event()

    def on_event(self, event: SupervisorEvent) -> None:
        self.events.append((trio.current_time(), event))
        self._notify()

    def on_protocol_event(self, conn: Connection, event: Event) -> None:
        if isinstance(event, PingReceived | PongReceived):
            self.heartbeats.append((trio.current_time(), conn))
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def mark(self) -> int:
        return len(self.events)

    async def next(self, kind: type[E], since: int) -> tuple[int, float, E]:
        """The first event of type ``kind`` at index ``since`` or later: (index, time, event)."""
        index = since
        while True:
            while index < len(self.events):
                at, event = self.events[index]
                if isinstance(event, kind):
                    return index, at, event
                index += 1
            await self._changed.wait()

    async def heartbeat_after(self, moment: float) -> tuple[float, Connection]:
        """Wait for a PING or PONG from the server received after ``moment``.

        A server sends heartbeats only once it has read our HELLO, and we
        heard this one, so the connection it came on works both ways: the
        right test for "reconnected" after a fault, where a client can be
        OPEN on a connection whose HELLO never got through.
        """
        while True:
            for at, conn in self.heartbeats:
                if at > moment and conn.closed is None:
                    return at, conn
            await self._changed.wait()

    def of_type(self, kind: type[E], since: int = 0) -> list[tuple[float, E]]:
        return [(at, event) for at, event in self.events[since:] if isinstance(event, kind)]


@asynccontextmanager
async def steady(timeline: Timeline) -> AsyncIterator[None]:
    """Fail at once, naming the event, if the client loses its connection in the block."""

    async def watch(since: int) -> None:
        _, _, event = await timeline.next(Disconnected, since)
        raise AssertionError(f"unexpected disconnect: {event}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, timeline.mark())
        yield
        nursery.cancel_scope.cancel()


def check_backoff(timeline: Timeline) -> list[float]:
    """Every wait was the seeded policy's next delay, and was waited out in full.

    The connections in these tests never stay up for ``healthy_after``, so the
    policy never starts over: the n-th wait of the client's life is its n-th delay.
    """
    delays = [event.delay for _, event in timeline.of_type(BackingOff)]
    assert delays == list(islice(BACKOFF, len(delays)))
    for (at, event), (next_at, following) in pairwise(timeline.events):
        if isinstance(event, BackingOff):
            assert isinstance(following, AttemptStarted), following
            assert following.attempt == event.attempt
            assert next_at - at >= event.delay - EPSILON
    return delays


async def round_trip(client: ReconnectingClient, *messages: bytes) -> None:
    """Send ``messages`` and get each echoed back, in order."""
    for message in messages:
        await client.send(message)
    for message in messages:
        assert await client.receive() == message


@asynccontextmanager
async def reconnecting_client(
    port: int,
    timeline: Timeline,
    *,
    options: ConnectionOptions | None = None,
    buffer_size: int = 1024,
) -> AsyncIterator[ReconnectingClient]:
    async with open_reconnecting_client(
        [(LOOPBACK, port)],
        config=CLIENT_CONFIG,
        options=options,
        backoff=BACKOFF,
        connect_timeout=CONNECT_TIMEOUT,
        healthy_after=60.0,
        buffer_size=buffer_size,
        listeners=[timeline.on_event],
        connection_listeners=[timeline.on_protocol_event],
    ) as client:
        yield client


# -- server processes that die --------------------------------------------------------


async def test_sigkill_then_restart_on_the_same_port(tmp_path: Path) -> None:
    timeline = Timeline()
    while_down = [b"buffered %d" % n for n in range(5)]
    with trio.fail_after(BOUND):
        async with run_serve_process(tmp_path, "--port", "0", *SERVE_OPTIONS) as first:
            port = first.port
            async with reconnecting_client(port, timeline) as client:
                conn = await client.wait_connected()
                await round_trip(client, b"before the crash")

                mark = timeline.mark()
                first.process.kill()  # SIGKILL: the kernel closes the socket, no CLOSE
                killed_at = trio.current_time()
                lost_index, lost_at, lost = await timeline.next(Disconnected, mark)
                assert isinstance(lost.error, BrokenConnection | HeartbeatTimeout), lost
                assert lost_at - killed_at <= TIMEOUT + SLACK
                assert conn.closed is not None

                # Nobody listens: attempts are refused and the client backs off.
                _, _, refused = await timeline.next(AttemptFailed, lost_index)
                assert isinstance(refused.error, BrokenConnection), refused
                assert await first.process.wait() == -signal.SIGKILL
                for message in while_down:
                    await client.send(message)
                assert client.buffered == len(while_down)

                async with run_serve_process(
                    tmp_path, "--port", str(port), *SERVE_OPTIONS
                ) as second:
                    back_index, back_at, back = await timeline.next(Connected, lost_index)
                    # Delivered in order once reconnected; the echo server answers in order.
                    for message in while_down:
                        assert await client.receive() == message
                    await round_trip(client, b"after the restart")
                    await client.aclose()
                    second.process.send_signal(signal.SIGTERM)
                    assert await second.process.wait() == 0
                    log = second.stderr()

    # From the loss to the return: wait, attempt, outcome, as often as it took.
    story = timeline.events[lost_index : back_index + 1]
    kinds = [type(event) for _, event in story]
    failures = (len(kinds) - 4) // 3
    assert failures >= 1
    assert kinds == [
        Disconnected,
        *[BackingOff, AttemptStarted, AttemptFailed] * failures,
        BackingOff,
        AttemptStarted,
        Connected,
    ]
    attempts = [event.attempt for _, event in story if isinstance(event, AttemptStarted)]
    assert attempts == list(range(2, 2 + len(attempts)))
    assert back.attempt == attempts[-1]
    delays = check_backoff(timeline)
    assert len(delays) == len(attempts)
    assert back_at - lost_at >= sum(delays) - EPSILON
    assert log.count(": connected\n") == 1
    assert "ended with 1000" in log


async def test_sigterm_drains_and_the_client_comes_straight_back(tmp_path: Path) -> None:
    timeline = Timeline()
    while_down = [b"queued %d" % n for n in range(3)]
    with trio.fail_after(BOUND):
        async with run_serve_process(tmp_path, "--port", "0", *SERVE_OPTIONS) as first:
            port = first.port
            async with reconnecting_client(port, timeline) as client:
                await client.wait_connected()
                await round_trip(client, b"before the drain")

                mark = timeline.mark()
                first.process.send_signal(signal.SIGTERM)
                lost_index, lost_at, lost = await timeline.next(Disconnected, mark)
                # An orderly CLOSE 1001 from the server, not a failure.
                assert type(lost.error) is ConnectionClosed, lost
                assert lost.error.code == CloseCode.GOING_AWAY
                assert lost.error.by_peer
                # 1001 means "come back now": the next attempt starts at once, no wait first.
                retry_index, retry_at, retry = await timeline.next(AttemptStarted, lost_index)
                assert retry_index == lost_index + 1
                assert retry_at - lost_at < SLACK
                # The draining server stopped listening first, so that attempt fails.
                _, _, refused = await timeline.next(AttemptFailed, lost_index)
                assert refused.attempt == retry.attempt
                assert await first.process.wait() == 0
                assert "SIGTERM: draining 1 connection(s)" in first.stderr()

                for message in while_down:
                    await client.send(message)
                assert client.buffered == len(while_down)
                async with run_serve_process(
                    tmp_path, "--port", str(port), *SERVE_OPTIONS
                ) as second:
                    await timeline.next(Connected, lost_index)
                    for message in while_down:
                        assert await client.receive() == message
                    await round_trip(client, b"after the restart")
                    await client.aclose()
                    second.process.send_signal(signal.SIGTERM)
                    assert await second.process.wait() == 0
                    log = second.stderr()

    check_backoff(timeline)
    assert log.count(": connected\n") == 1


# -- a misbehaving network between the client and the server ------------------------------


@dataclass
class Rig:
    server: Server
    proxy: FaultProxy
    client: ReconnectingClient
    timeline: Timeline
    #: The first connection, on the client's side and on the server's.
    conn: Connection
    server_conn: Connection
    #: When the server received each PING, on any connection.
    server_pings: list[float]


@asynccontextmanager
async def proxied(
    *,
    server_config: Config = SERVER_CONFIG,
    server_options: ConnectionOptions | None = None,
    options: ConnectionOptions | None = None,
    buffer_size: int = 1024,
) -> AsyncIterator[Rig]:
    """An echo server in this process, a :class:`FaultProxy` before it, and a
    reconnecting client of the proxy, connected and past one round trip."""
    timeline = Timeline()
    server_pings: list[float] = []

    def on_server_event(conn: Connection, event: Event) -> None:
        if isinstance(event, PingReceived):
            server_pings.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(
                serve_tcp,
                echo,
                0,
                host=LOOPBACK,
                config=server_config,
                options=server_options,
                listeners=[on_server_event],
            )
        )
        proxy = FaultProxy()
        await nursery.start(proxy.serve, LOOPBACK, server.port)
        async with reconnecting_client(
            proxy.port, timeline, options=options, buffer_size=buffer_size
        ) as client:
            conn = await client.wait_connected()
            await round_trip(client, b"hello")
            (server_conn,) = server.registry.connections()
            yield Rig(server, proxy, client, timeline, conn, server_conn, server_pings)
        nursery.cancel_scope.cancel()


async def registry_empty(server: Server) -> float:
    """Wait until the server lists no peer; return when that was seen."""
    await server.registry.wait_until(lambda registry: len(registry) == 0)
    return trio.current_time()


async def registry_without(server: Server, conn: Connection) -> None:
    """Wait until the server no longer lists ``conn``."""
    await server.registry.wait_until(lambda registry: conn not in registry.connections())


async def heal_and_reconnect(rig: Rig) -> Connection:
    """Lift every fault and wait until the client is back on a working connection."""
    rig.proxy.faults.heal()
    healed_at = trio.current_time()
    back_at, conn = await rig.timeline.heartbeat_after(healed_at)
    assert back_at - healed_at <= RECONNECT_BOUND
    assert conn is not rig.conn
    await round_trip(rig.client, b"back again")
    return conn


async def test_blackhole_is_caught_by_heartbeat_timeout_and_heal_reconnects() -> None:
    with trio.fail_after(BOUND):
        async with proxied() as rig:
            mark = rig.timeline.mark()
            rig.proxy.faults.blackhole()
            cut_at = trio.current_time()

            lost_index, lost_at, lost = await rig.timeline.next(Disconnected, mark)
            assert isinstance(lost.error, HeartbeatTimeout), lost
            assert lost.error.code == CloseCode.HEARTBEAT_TIMEOUT
            assert not lost.error.by_peer  # the server's CLOSE, if any, is held back
            last_heard = rig.conn.last_received
            assert last_heard is not None
            assert lost_at - last_heard >= TIMEOUT - EPSILON
            assert lost_at - cut_at <= TIMEOUT + SLACK
            # The server stopped hearing too and convicted its side.
            assert await registry_empty(rig.server) - cut_at <= TIMEOUT + SLACK
            assert rig.server.statistics().closed_by_code == {CloseCode.HEARTBEAT_TIMEOUT: 1}

            # New connections fall into the blackhole too: the attempt times
            # out, and the client backs off before the next one.
            failed_index, _, failed = await rig.timeline.next(AttemptFailed, lost_index)
            assert isinstance(failed.error, HeartbeatTimeout), failed
            await rig.timeline.next(BackingOff, failed_index)
            await heal_and_reconnect(rig)

    kinds = [type(event) for _, event in rig.timeline.events[lost_index:]]
    assert kinds[:5] == [Disconnected, BackingOff, AttemptStarted, AttemptFailed, BackingOff]
    check_backoff(rig.timeline)


async def test_partition_client_to_server_is_caught_by_the_server() -> None:
    with trio.fail_after(BOUND):
        async with proxied() as rig:
            mark = rig.timeline.mark()
            rig.proxy.faults.blackhole(Direction.OUTBOUND)
            cut_at = trio.current_time()

            # The server stops hearing: it convicts, and its CLOSE 1011 still
            # reaches the client, which kept hearing the server's PINGs.
            emptied_at = await registry_empty(rig.server)
            server_heard = rig.server_conn.last_received
            assert server_heard is not None
            assert emptied_at - server_heard >= TIMEOUT - EPSILON
            assert emptied_at - cut_at <= TIMEOUT + SLACK
            assert rig.server.statistics().closed_by_code == {CloseCode.HEARTBEAT_TIMEOUT: 1}
            _, lost_at, lost = await rig.timeline.next(Disconnected, mark)
            assert type(lost.error) is ConnectionClosed, lost
            assert lost.error.code == CloseCode.HEARTBEAT_TIMEOUT
            assert lost.error.by_peer
            assert lost_at - cut_at <= TIMEOUT + SLACK

            await rig.timeline.next(BackingOff, mark)
            conn = await heal_and_reconnect(rig)
            # Connections whose HELLO was held back end once it arrives with
            # their EOF; the working one stays.
            await rig.server.registry.wait_until(lambda registry: len(registry) == 1)
            assert conn.closed is None
    check_backoff(rig.timeline)


async def test_partition_server_to_client_is_caught_by_the_client() -> None:
    with trio.fail_after(BOUND):
        async with proxied() as rig:
            mark = rig.timeline.mark()
            rig.proxy.faults.blackhole(Direction.INBOUND)
            cut_at = trio.current_time()

            # The client stops hearing: it convicts, and its CLOSE 1011 still
            # reaches the server, which drops the peer at once.
            lost_index, lost_at, lost = await rig.timeline.next(Disconnected, mark)
            assert isinstance(lost.error, HeartbeatTimeout), lost
            assert not lost.error.by_peer
            last_heard = rig.conn.last_received
            assert last_heard is not None
            assert lost_at - last_heard >= TIMEOUT - EPSILON
            assert lost_at - cut_at <= TIMEOUT + SLACK
            assert await registry_empty(rig.server) - lost_at <= SLACK
            assert rig.server.statistics().closed_by_code == {CloseCode.HEARTBEAT_TIMEOUT: 1}
            assert rig.server_conn.closed is not None
            assert rig.server_conn.closed.by_peer  # the client's CLOSE, not the server's verdict

            _, _, failed = await rig.timeline.next(AttemptFailed, lost_index)
            assert isinstance(failed.error, HeartbeatTimeout), failed  # no server HELLO came
            await heal_and_reconnect(rig)
    check_backoff(rig.timeline)


async def test_delay_below_the_timeout_raises_the_rtt_and_nothing_else() -> None:
    delay = 0.1
    with trio.fail_after(BOUND):
        async with proxied() as rig:
            assert await rig.conn.ping() < delay  # loopback
            mark = rig.timeline.mark()
            rig.proxy.faults.set_delay(delay)

            async with steady(rig.timeline):
                # The proxy never delivers early: a round trip now takes two delays.
                assert await rig.conn.ping() >= 2 * delay
                started = trio.current_time()
                await round_trip(rig.client, b"slow but sure")
                assert trio.current_time() - started >= 2 * delay
                # The idle heartbeats carry the smoothed RTT up to the new level.
                while rig.conn.srtt is None or rig.conn.srtt < 1.5 * delay:
                    await rig.timeline.heartbeat_after(trio.current_time())
            rtt = rig.conn.rtt
            assert rtt is not None
            assert rtt >= 2 * delay

            assert rig.timeline.mark() == mark  # no disconnect, no attempt
            assert rig.client.connection is rig.conn
            assert rig.conn.closed is None
            assert len(rig.server.registry) == 1
            assert rig.server.statistics().closed_by_code == {}


async def test_throughput_limit_slows_messages_without_a_false_timeout() -> None:
    """Messages crawl, heartbeats keep both sides sure of each other, and nobody cries flood.

    The client sends a burst, then PINGs every interval while the burst
    crawls: those PINGs queue behind it and reach the server back to back.
    They are a backlog, not a flood, so the server must not close with 1008
    (which would also make the client give up for good). The first burst
    comes before the server has seen any PING, the second after.
    """
    rate = 100_000  # bytes per second, each way
    messages = [bytes([n]) * 5_000 for n in range(20)]  # 100 kB: at least 1 s to get there
    with trio.fail_after(BOUND):
        async with proxied() as rig:
            mark = rig.timeline.mark()
            rig.proxy.faults.limit_rate(rate)
            async with steady(rig.timeline):
                for _ in range(2):
                    started = trio.current_time()
                    await round_trip(rig.client, *messages)
                    took = trio.current_time() - started
                    assert took >= sum(map(len, messages)) / rate - EPSILON
                    # The case that matters did happen: PINGs arrived bunched, enough
                    # of them sooner than half an interval apart for three strikes.
                    pings = [at for at in rig.server_pings if at >= started]
                    bunched = [b - a < INTERVAL / 2 for a, b in pairwise(pings)]
                    assert sum(bunched) >= 3, pings
            assert rig.timeline.mark() == mark
            assert rig.client.connection is rig.conn
            assert len(rig.server.registry) == 1
            assert rig.server.statistics().closed_by_code == {}
            assert rig.proxy.statistics().outbound.bytes_delivered > sum(map(len, messages))


async def test_slow_reader_is_backpressure_and_a_stopped_reader_a_write_timeout() -> None:
    """A server that reads slowly but steadily is alive; one that stops reading is not.

    ``slow_reader(n, interval)`` models a peer that takes its time: the proxy
    feeds the server ``n`` bytes per ``interval``, the kernel buffers fill,
    and the client's sends start waiting. That is backpressure, not a failure:
    frames still reach the server and its echoes and heartbeats still reach
    the client, so nobody is convicted and every message arrives in order.
    (The reader here takes about 3 MB/s, so that the kernel's buffers, which
    wake a blocked writer only once a good part of them has drained, never
    hold a write up for long: a reader slow enough to keep one write waiting
    for the whole write timeout is, to the writer, one that stopped.)
    With the interval far beyond any timeout, the peer has in effect stopped
    reading: the client's write makes no progress and its write timeout
    convicts the peer, although the peer's PINGs still arrive. The server is
    given a longer timeout so that this verdict is the client's alone.
    """
    size = 16_384
    buffer_size = 64
    server_config = Config(interval=INTERVAL, timeout=4 * TIMEOUT, handshake_timeout=5.0)
    # The plain timeout: an adaptive detector would convict the client sooner.
    server_options = ConnectionOptions(detector=FixedTimeout)
    options = ConnectionOptions(send_queue=4)  # small batches: one write never waits long
    with trio.fail_after(BOUND):
        async with proxied(
            server_config=server_config,
            server_options=server_options,
            options=options,
            buffer_size=buffer_size,
        ) as rig:
            client = rig.client
            sent = received = fullest = 0

            async def send_forever() -> None:
                nonlocal sent, fullest
                while True:
                    await client.send(sent.to_bytes(4, "big") * (size // 4))
                    sent += 1
                    fullest = max(fullest, client.buffered)

            async def receive_in_order() -> None:
                nonlocal received
                while True:
                    message = await client.receive()
                    assert message[:4] == received.to_bytes(4, "big")
                    received += 1

            mark = rig.timeline.mark()
            rig.proxy.faults.slow_reader(16_384, 0.005, Direction.OUTBOUND)
            async with trio.open_nursery() as traffic:
                traffic.start_soon(send_forever)
                traffic.start_soon(receive_in_order)
                async with steady(rig.timeline):
                    await trio.sleep(1.5)
                # Backpressure reached the caller: its buffer filled, so send() waited...
                assert fullest == buffer_size
                # ...and nothing else happened: messages flow, in order, and so does liveness.
                assert received > 20
                assert rig.timeline.mark() == mark
                assert rig.conn.closed is None
                last_heard = rig.conn.last_received
                assert last_heard is not None
                assert trio.current_time() - last_heard < TIMEOUT

                rig.proxy.faults.slow_reader(1, 3600.0, Direction.OUTBOUND)
                stopped_at = trio.current_time()
                lost_index, lost_at, lost = await rig.timeline.next(Disconnected, mark)
                traffic.cancel_scope.cancel()
            assert isinstance(lost.error, HeartbeatTimeout), lost
            assert lost.error.reason == "write timeout: the peer stopped reading"
            assert lost_at - stopped_at <= TIMEOUT + SLACK
            # Not a verdict on silence: the server's heartbeats were still coming in.
            last_heard = rig.conn.last_received
            assert last_heard is not None
            assert lost_at - last_heard < TIMEOUT

            await rig.timeline.next(BackingOff, lost_index)
            rig.proxy.faults.heal()
            healed_at = trio.current_time()
            _, conn = await rig.timeline.heartbeat_after(healed_at)
            assert conn is not rig.conn
            # What waited in the client's buffer goes out on the new connection,
            # still in order (the messages lost with the old one are skipped).
            await client.send(b"marker")
            last = received - 1
            while (message := await client.receive()) != b"marker":
                number = int.from_bytes(message[:4], "big")
                assert number > last
                last = number
            await registry_without(rig.server, rig.server_conn)
    check_backoff(rig.timeline)


async def test_reset_breaks_both_ends_and_the_client_reconnects_at_once() -> None:
    with trio.fail_after(BOUND):
        async with proxied() as rig:
            mark = rig.timeline.mark()
            rig.proxy.reset_all()
            reset_at = trio.current_time()
            lost_index, lost_at, lost = await rig.timeline.next(Disconnected, mark)
            assert isinstance(lost.error, BrokenConnection), lost
            assert lost.error.code == CloseCode.ABNORMAL_CLOSURE
            assert lost_at - reset_at <= SLACK
            assert await registry_empty(rig.server) - reset_at <= SLACK
            assert rig.server.statistics().closed_by_code == {CloseCode.ABNORMAL_CLOSURE: 1}

            # A reset affects only the connections of the moment: the very
            # next attempt, one short backoff delay later, succeeds.
            _, back_at, back = await rig.timeline.next(Connected, lost_index)
            assert back_at - lost_at <= BACKOFF.base + SLACK
            kinds = [type(event) for _, event in rig.timeline.events[lost_index:]]
            assert kinds == [Disconnected, BackingOff, AttemptStarted, Connected]
            await round_trip(rig.client, b"after the reset")
            assert rig.client.connection is not rig.conn
    check_backoff(rig.timeline)


async def test_half_open_is_caught_by_heartbeat_timeout_and_the_server_lets_go_at_once() -> None:
    with trio.fail_after(BOUND):
        async with proxied() as rig:
            mark = rig.timeline.mark()
            # The client's side stays "up": its sends vanish, its reads wait.
            # The server reads EOF.
            rig.proxy.faults.half_open(Side.NEAR, peer_sees="eof")
            cut_at = trio.current_time()

            emptied_at = await registry_empty(rig.server)
            assert rig.server.statistics().closed_by_code == {CloseCode.ABNORMAL_CLOSURE: 1}
            lost_index, lost_at, lost = await rig.timeline.next(Disconnected, mark)
            assert emptied_at <= lost_at  # the server knew first: EOF needs no timeout
            assert isinstance(lost.error, HeartbeatTimeout), lost
            last_heard = rig.conn.last_received
            assert last_heard is not None
            assert lost_at - last_heard >= TIMEOUT - EPSILON
            assert lost_at - cut_at <= TIMEOUT + SLACK

            # Half-open hits the connections of the moment only.
            _, back_at, _ = await rig.timeline.next(Connected, lost_index)
            assert back_at - lost_at <= BACKOFF.base + SLACK
            await round_trip(rig.client, b"after the half-open")
    check_backoff(rig.timeline)
