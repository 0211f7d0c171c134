"""The Trio runtime of one connection (``_connection.py``), in virtual time.

Most tests put a :class:`helpers.ScriptedPeer` on the far end of an
in-memory stream, so the test decides what the peer sends and when, and reads
back every frame we send with the virtual time it arrived. Times are exact:
the ``autojump_clock`` fixture jumps straight to the next deadline.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
import trio
import trio.testing
from helpers import ScriptedPeer, WrappedStream, connection_pair, hello_frame, opaque
from trio.testing import MockClock

from trio_heartbeat._config import Config
from trio_heartbeat._connection import Connection
from trio_heartbeat._detectors import FailureDetector
from trio_heartbeat._errors import (
    BrokenConnection,
    ConnectionClosed,
    ConnectionRejected,
    HeartbeatTimeout,
    LocalProtocolError,
    RemoteProtocolError,
)
from trio_heartbeat._events import (
    ConnectionEnded,
    Event,
    HandshakeComplete,
    PeerHealthChanged,
    PingReceived,
    PongReceived,
)
from trio_heartbeat._frames import CloseCode, FrameType, HealthStatus, Role, encode_frame
from trio_heartbeat._handshake import CLIENT_LEAD
from trio_heartbeat._options import ConnectionOptions
from trio_heartbeat._state import State
from trio_heartbeat._stream_connection import open_stream_connection
from trio_heartbeat._writer import _BATCH_BYTES

#: One second between PINGs, dead after three of silence: the defaults, spelled out.
CONFIG = Config(interval=1.0, timeout=3.0)
#: Bytes in a HELLO with no id and no auth, header included.
HELLO_SIZE = 6 + 36


def idle_ping_times(step: float, until: float, *, start: float = 0.0) -> list[float]:
    """When a side that sent its last frame at ``start`` PINGs while idle, up to ``until``.

    Every PING is due ``step`` after the one before, counted the way the core
    counts it (so the floats match exactly): ``send_interval`` for a server,
    ``send_interval * CLIENT_LEAD`` for a client.
    """
    times = []
    at = start
    while (at := at + step) <= until:
        times.append(at)
    return times


async def hang_up_on_close(peer: ScriptedPeer) -> None:
    """What a well-behaved peer does on our CLOSE: stop sending (which ends our
    lingering close), then read to the end."""
    while (frame := await peer.receive_frame()) is not None and frame.type is not FrameType.CLOSE:
        pass
    stream = peer.stream
    assert isinstance(stream, trio.abc.HalfCloseableStream)
    await stream.send_eof()
    await peer.drain()


def stream_and_peer(
    role: Role = Role.SERVER, *, timeout: float = 3.0, max_frame: int = 1 << 20
) -> tuple[WrappedStream, ScriptedPeer]:
    """Our end of a memory stream pair (wrapped, to see ``aclose``) and a peer on the other."""
    ours, theirs = trio.testing.memory_stream_pair()
    peer = ScriptedPeer(theirs, role, timeout=timeout, max_frame=max_frame)
    return WrappedStream(ours), peer


def lockstep_stream_and_peer() -> tuple[WrappedStream, ScriptedPeer]:
    """As :func:`stream_and_peer`, but every write waits until the peer reads it."""
    ours, theirs = trio.testing.lockstep_stream_pair()
    return WrappedStream(ours), ScriptedPeer(theirs)


@asynccontextmanager
async def served_connection(
    stream: trio.abc.Stream, peer: ScriptedPeer, *, hello_only: bool = False, **kwargs: Any
) -> AsyncIterator[Connection]:
    """Open a connection on ``stream`` while ``peer`` greets it, then serves it.

    The peer runs in a nursery of its own: :meth:`ScriptedPeer.handshake` (or,
    with ``hello_only``, just :meth:`ScriptedPeer.send_hello`, without waiting
    for our HELLO), then :meth:`ScriptedPeer.serve`. ``kwargs`` go to
    ``open_stream_connection``. Leaving the block closes the connection; the
    peer answers our CLOSE and reads to the end of the stream, so the block
    exits only once the peer is done. An error from the block or the
    connection cancels the peer and comes out of the peer's nursery, wrapped
    in an ``ExceptionGroup``.

    >>> async with served_connection(stream, peer, config=CONFIG) as conn:  # doctest: +SKIP
    ...     await conn.send(b"echoed")
    ...     assert await conn.receive() == b"echoed"
    """

    async def script() -> None:
        if hello_only:
            await peer.send_hello()
        else:
            await peer.handshake()
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, **kwargs) as conn:
            yield conn


async def run_body(
    stream: trio.abc.Stream, body: Callable[[Connection], Awaitable[object]], **kwargs: Any
) -> None:
    """Run ``body`` in an ``open_stream_connection`` block; what the block raises comes out."""
    async with open_stream_connection(stream, **kwargs) as conn:
        await body(conn)


async def wait_forever(conn: Connection) -> None:
    """A block that only waits, until something cancels it."""
    await trio.sleep_forever()


async def handshake_then_drain(peer: ScriptedPeer) -> None:
    """A peer that completes the handshake, then only listens."""
    await peer.handshake()
    await peer.drain()


async def handshake_then_serve(peer: ScriptedPeer) -> None:
    """The peer's side of a healthy connection: handshake, then answer everything."""
    await peer.handshake()
    await peer.serve()


# -- echo -----------------------------------------------------------------------


async def test_echo_between_two_connections_keeps_order(autojump_clock: MockClock) -> None:
    messages = [f"message {i}".encode() for i in range(300)]

    async def echo(conn: Connection) -> None:
        async for message in conn:
            await conn.send(message)

    async with trio.open_nursery() as nursery, connection_pair() as pair:
        nursery.start_soon(echo, pair.server)
        assert pair.client.state is State.OPEN
        assert pair.server.state is State.OPEN
        await pair.client.send(messages[0])
        assert await pair.client.receive() == messages[0]
        for message in messages[1:]:
            await pair.client.send(message)
        received = [await pair.client.receive() for _ in messages[1:]]
        assert received == messages[1:]
        pair.client.send_nowait(b"no wait")
        async for message in pair.client:
            assert message == b"no wait"
            break
        assert trio.current_time() == 0.0
    # Leaving the block closed the client with 1000; the server saw the peer's CLOSE.
    # (statistics(): a fresh read, which mypy does not narrow from the asserts above)
    assert pair.client.statistics().state is State.CLOSED
    assert pair.server.statistics().state is State.CLOSED
    client_end, server_end = pair.client.closed, pair.server.closed
    assert client_end is not None
    assert server_end is not None
    assert (client_end.code, client_end.by_peer) == (CloseCode.NORMAL, False)
    assert (server_end.code, server_end.by_peer) == (CloseCode.NORMAL, True)
    assert pair.client_stream.closed
    assert pair.server_stream.closed
    assert trio.current_time() == 0.0


async def test_handshake_facts(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    server_config = Config(interval=2.0, timeout=5.0, instance_id="server-1")
    client_config = Config(interval=0.5, timeout=1.5, instance_id="client-1")

    async def serve() -> None:
        async with open_stream_connection(
            theirs, role=Role.SERVER, config=server_config, remote_address="peer:1"
        ) as server:
            assert server.peer_id == "client-1"
            assert server.remote_address == "peer:1"
            await server.wait_closed()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        async with open_stream_connection(ours, config=client_config) as conn:
            assert conn.role is Role.CLIENT
            assert conn.config is client_config
            assert conn.peer is not None
            assert conn.peer.interval_ms == 2000
            assert conn.peer_id == "server-1"
            assert conn.peer_health is HealthStatus.SERVING
            assert conn.health is HealthStatus.SERVING
            assert conn.opened_at == 0.0
            assert conn.closed is None
            assert conn.rtt is None
            assert conn.srtt is None
            # min(own interval, peer timeout / 2) = min(0.5, 2.5)
            assert conn.statistics().send_interval == 0.5
            assert conn.last_received == 0.0
            assert conn.stream is ours
            assert conn.remote_address is None


# -- detection ------------------------------------------------------------------


async def test_silent_peer_is_convicted_exactly_at_the_timeout(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    conns: list[Connection] = []

    async def body(conn: Connection) -> None:
        conns.append(conn)
        assert conn.watchdog_deadline == 3.0
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            conns.append(conn)
            raise

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 3.0
    conn = conns[0]
    assert conns == [conn, conn], "the body was not cancelled"
    assert raised.value.code == CloseCode.HEARTBEAT_TIMEOUT
    assert raised.value.reason == "heartbeat timeout"
    assert not raised.value.by_peer
    # Our PINGs kept going while the peer was silent (a client's, every
    # CLIENT_LEAD of the interval); the CLOSE says why we left.
    assert peer.times(FrameType.PING) == idle_ping_times(1.0 * CLIENT_LEAD, 3.0)
    assert len(peer.of_type(FrameType.PING)) == 3
    last = peer.frames[-1]
    assert (last.type, last.at, last.close_code) == (FrameType.CLOSE, 3.0, 1011)
    assert peer.eof_at == 3.0
    assert stream.closed
    assert conn.state is State.ERROR
    closed = conn.closed
    assert isinstance(closed, HeartbeatTimeout)


async def test_a_late_frame_pushes_the_deadline(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(2.5)
        await peer.send_data(b"still here")
        await peer.drain()

    deadlines: list[tuple[float, float]] = []

    async def body(conn: Connection) -> None:
        deadlines.append((trio.current_time(), conn.watchdog_deadline))
        assert await conn.receive() == b"still here"
        deadlines.append((trio.current_time(), conn.watchdog_deadline))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout):
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 5.5
    assert deadlines == [(0.0, 3.0), (2.5, 5.5)]
    assert peer.frames[-1].close_code == CloseCode.HEARTBEAT_TIMEOUT
    assert peer.frames[-1].at == 5.5


async def test_a_frame_waiting_at_the_deadline_is_honoured(
    autojump_clock: MockClock,
) -> None:
    """A loaded event loop (here: a clock jump) can pass the watchdog's deadline
    while a frame the peer sent in time waits for our reader. The local-stall
    guard lets the reader take it in first: the peer is alive, and the
    silence clock restarts from when we read it."""
    stream, peer = stream_and_peer()
    body_cancelled_at: list[float] = []

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(2.5)
        await peer.send_data(b"just in time")
        autojump_clock.jump(0.5)  # the clock reaches 3.0 before our reader runs
        await peer.drain()

    async def body(conn: Connection) -> None:
        try:
            assert await conn.receive() == b"just in time"
            assert trio.current_time() == 3.0
            await trio.sleep_forever()
        finally:
            body_cancelled_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout):
            await run_body(stream, body, config=CONFIG)
    assert body_cancelled_at == [6.0]  # read at 3.0, then silent for the 3 s timeout
    assert peer.frames[-1].close_code == CloseCode.HEARTBEAT_TIMEOUT


async def test_handshake_timeout(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer(role=Role.CLIENT)
    entered = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.drain)  # reads our HELLO, never answers
        with pytest.raises(HeartbeatTimeout) as raised:
            async with open_stream_connection(
                stream, role=Role.SERVER, config=Config(handshake_timeout=2.5)
            ):
                entered = True  # pragma: no cover - the handshake never completes
        assert trio.current_time() == 2.5
    assert not entered
    assert raised.value.reason == "handshake timeout"
    assert [frame.type for frame in peer.frames] == [FrameType.HELLO, FrameType.CLOSE]
    assert peer.frames[-1].close_code == CloseCode.HEARTBEAT_TIMEOUT
    assert peer.frames[-1].at == 2.5
    assert stream.closed


async def test_custom_detector_convicts_sooner_but_never_before_two_peer_intervals(
    autojump_clock: MockClock,
) -> None:
    class Impatient:
        def record(self, arrival: float) -> None:
            pass

        def suspect_at(self, last_arrival: float, timeout: float) -> float:
            return last_arrival  # "dead at once", which the core clamps

    async def body(conn: Connection) -> None:
        assert conn.watchdog_deadline == 2.0
        await trio.sleep_forever()

    stream, peer = stream_and_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout):
            await run_body(
                stream, body, config=CONFIG, options=ConnectionOptions(detector=Impatient)
            )
        # Floor: two of the peer's send intervals, min(1.0, 3.0 / 2) each.
        assert trio.current_time() == 2.0


# -- heartbeats -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "peer_timeout", "expected"),
    [
        # A server PINGs after exactly its send interval of silence.
        (Role.SERVER, 3.0, [1.0, 2.0, 3.0, 4.0]),
        # min(own interval 1.0, peer timeout / 2): the peer's timeout sets the pace.
        (Role.SERVER, 1.0, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]),
        # A client leads: it PINGs after exactly CLIENT_LEAD of its send interval.
        (Role.CLIENT, 3.0, idle_ping_times(1.0 * CLIENT_LEAD, 4.25)),
        (Role.CLIENT, 1.0, idle_ping_times(0.5 * CLIENT_LEAD, 4.25)),
    ],
    ids=["server", "server-peer-timeout", "client", "client-peer-timeout"],
)
async def test_idle_pings_server_at_the_send_interval_client_at_its_lead(
    role: Role, peer_timeout: float, expected: list[float], autojump_clock: MockClock
) -> None:
    peer_role = Role.CLIENT if role is Role.SERVER else Role.SERVER
    stream, peer = stream_and_peer(peer_role, timeout=peer_timeout)
    # The peer answers every PING and never PINGs itself.
    async with served_connection(stream, peer, hello_only=True, role=role, config=CONFIG) as conn:
        await trio.sleep(4.25)
        assert conn.statistics().pings_sent == len(expected)
        assert conn.statistics().pongs_received == len(expected)
    assert peer.times(FrameType.PING) == expected
    assert [frame.opaque for frame in peer.of_type(FrameType.PING)] == [
        opaque(n) for n in range(1, len(expected) + 1)
    ]


@pytest.mark.parametrize("delay", [0.0, 2**-5], ids=["prompt", "one-way-delay"])
async def test_an_idle_pair_carries_only_the_client_heartbeat(
    delay: float, autojump_clock: MockClock
) -> None:
    """The point of CLIENT_LEAD: both sides run the same send rule, but the
    client's PING comes first and the server's PONG restarts the server's
    timer, so an idle server only answers. One heartbeat per connection, not
    two, also when each frame takes ``delay`` to cross."""
    server_saw: list[tuple[float, type[Event]]] = []

    def server_listener(conn: Connection, event: Event) -> None:
        if isinstance(event, (PingReceived, PongReceived)):
            server_saw.append((trio.current_time(), type(event)))

    intervals = 20
    async with connection_pair(
        client_config=CONFIG,
        server_config=CONFIG,
        server_listeners=[server_listener],
        receive_delay=delay,
    ) as pair:
        await trio.sleep_until(intervals * 1.0)
        client, server = pair.client.statistics(), pair.server.statistics()
        assert client.send_interval == server.send_interval == 1.0
        # The server never PINGed: nothing to strike, nothing to answer.
        assert server.pings_sent == server.pongs_received == 0
        # The client PINGed every CLIENT_LEAD of the interval after its HELLO
        # (which left once the server's HELLO had crossed), each one answered.
        sent = idle_ping_times(1.0 * CLIENT_LEAD, intervals * 1.0, start=delay)
        assert len(sent) == 22
        assert client.pings_sent == client.pongs_received == len(sent)
        assert server_saw == [(at + delay, PingReceived) for at in sent]
        # Every client PING kept to the rate rule: the server is still OPEN.
        assert server.state is State.OPEN
        assert pair.client.rtt == 2 * delay
    server_end = pair.server.closed
    assert server_end is not None
    assert (server_end.code, server_end.by_peer) == (CloseCode.NORMAL, True)


async def test_no_ping_while_data_flows(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    async with served_connection(stream, peer, hello_only=True, config=CONFIG) as conn:
        for _ in range(10):
            await trio.sleep(0.5)
            await conn.send(b"tick")
            assert await conn.receive() == b"tick"
    assert peer.of_type(FrameType.PING) == []
    assert peer.times(FrameType.DATA) == [0.5 * n for n in range(1, 11)]


async def test_every_ping_gets_a_pong_with_its_opaque_bytes(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    pongs: list[tuple[float, bytes, HealthStatus]] = []

    async def script() -> None:
        await peer.handshake()
        for n, data in enumerate([b"abcdefgh", b"\x00" * 8, b"\xff" * 8], start=1):
            await trio.sleep_until(n * 0.75)
            await peer.send_ping(data)
            frame = await peer.receive_frame()
            while frame is not None and frame.type is not FrameType.PONG:
                frame = await peer.receive_frame()
            assert frame is not None
            pongs.append((frame.at, frame.opaque, frame.status))
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            await trio.sleep(1.75)
            conn.set_health(HealthStatus.DEGRADED)
            await trio.sleep(0.75)
    assert pongs == [
        (0.75, b"abcdefgh", HealthStatus.SERVING),
        (1.5, b"\x00" * 8, HealthStatus.SERVING),
        (2.25, b"\xff" * 8, HealthStatus.DEGRADED),
    ]


async def test_pong_goes_out_ahead_of_queued_data(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()
    message = b"x" * 10_000
    count = 50

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(1.0)  # not reading: our writer is stuck mid-batch
        await peer.send_ping(b"pingpong")
        await trio.sleep(0.25)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(send_queue=count)
        ) as conn:
            for _ in range(count):
                conn.send_nowait(message)
            await trio.sleep(2.0)
    kinds = [frame.type for frame in peer.frames]
    pong_at = kinds.index(FrameType.PONG)
    # The first batch (messages until 256 KiB are taken) was already being
    # written; the PONG then went ahead of all the DATA still queued.
    first_batch = math.ceil(_BATCH_BYTES / len(message))
    assert first_batch < count
    assert kinds[1:pong_at] == [FrameType.DATA] * first_batch
    assert kinds[pong_at + 1 :] == [FrameType.DATA] * (count - first_batch) + [FrameType.CLOSE]
    assert peer.frames[pong_at].opaque == b"pingpong"
    assert peer.frames[pong_at].at == 1.25


# -- a slow application ---------------------------------------------------------


async def test_slow_application_does_not_convict_a_healthy_peer(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        for n in range(3):
            await peer.send_data(b"message %d" % n)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.serve)
            # Keep pinging at the agreed rate while our application is not reading.
            for _ in range(10):
                await trio.sleep(1.0)
                await peer.send_ping()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(receive_queue=1)
        ) as conn:
            await trio.sleep(0.5)
            assert conn.statistics().receive_queue_used == 1
            assert conn.watchdog_deadline == float("inf")
            await trio.sleep(9.5)  # far beyond the 3 s timeout
            assert conn.state is State.OPEN
            received = [await conn.receive() for _ in range(3)]
            assert received == [b"message 0", b"message 1", b"message 2"]
            await trio.sleep(0.5)
            assert conn.state is State.OPEN
            assert trio.current_time() == 10.5
    # Our own PINGs never stopped, whatever the application was doing. (At
    # 10.0 the PONGs to the peer's PINGs restarted our timer: no PING by 10.5.)
    assert peer.times(FrameType.PING) == idle_ping_times(1.0 * CLIENT_LEAD, 10.0)
    assert len(peer.of_type(FrameType.PING)) == 11
    # The peer's PINGs, read in one go when we resumed, were answered, not struck.
    assert len(peer.of_type(FrameType.PONG)) == 10


# -- writes that do not go anywhere ---------------------------------------------


async def test_write_timeout_when_the_peer_stops_reading(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_forever()  # neither reads nor writes

    async def body(conn: Connection) -> None:
        await trio.sleep(0.5)
        await conn.send(b"into the void")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream, body, config=CONFIG, options=ConnectionOptions(write_timeout=1.0)
            )
        assert trio.current_time() == 1.5
        nursery.cancel_scope.cancel()
    assert raised.value.reason == "write timeout: the peer stopped reading"
    assert stream.closed
    assert stream.send_interrupted


async def test_a_peer_that_pings_but_never_reads_is_cut_off(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        with suppress(trio.BrokenResourceError):
            while True:
                await trio.sleep(1.0)
                await peer.send_ping()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, wait_forever, config=CONFIG)
        # Our PING at 0.9 (a client leads the peer's PING at 1.0) never gets
        # through; the write is given up one timeout (3 s, the default write
        # timeout) later. The peer's PINGs, still read, keep it from looking dead.
        assert trio.current_time() == 1.0 * CLIENT_LEAD + 3.0
        nursery.cancel_scope.cancel()
    assert raised.value.reason == "write timeout: the peer stopped reading"


async def test_send_waits_while_the_send_queue_is_full(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(1.0)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(send_queue=2)
        ) as conn:
            await trio.sleep(0.125)  # our HELLO is out: "1" travels alone
            conn.send_nowait(b"1")
            await trio.sleep(0.125)  # the writer takes it and blocks: the peer is not reading
            conn.send_nowait(b"2")
            conn.send_nowait(b"3")
            assert conn.statistics().send_queue_used == 2
            with pytest.raises(trio.WouldBlock):
                conn.send_nowait(b"4")
            await conn.send(b"4")
            assert trio.current_time() == 1.0
    assert [frame.payload for frame in peer.of_type(FrameType.DATA)] == [b"1", b"2", b"3", b"4"]


# -- protocol errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        (b"\xff" * 6, CloseCode.PROTOCOL_ERROR),
        (bytes.fromhex("02 00 00 20 00 01"), CloseCode.TOO_BIG),  # DATA of 2 MiB + 1
        (encode_frame(FrameType.HELLO, b"\x00" * 36), CloseCode.PROTOCOL_ERROR),
    ],
    ids=["garbage", "oversized", "second-hello"],
)
async def test_protocol_error_from_the_peer(
    attack: bytes, code: int, autojump_clock: MockClock
) -> None:
    stream, peer = stream_and_peer()
    body_cancelled = trio.Event()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(1.5)
        await peer.send(attack)
        await hang_up_on_close(peer)

    async def body(conn: Connection) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            body_cancelled.set()
            raise

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 1.5
    assert body_cancelled.is_set()
    assert type(raised.value) is ConnectionClosed
    assert raised.value.code == code
    assert not raised.value.by_peer
    assert isinstance(raised.value.__cause__, RemoteProtocolError)
    assert raised.value.__cause__.code == code
    assert peer.frames[-1].type is FrameType.CLOSE
    assert peer.frames[-1].close_code == code
    assert peer.eof_at == 1.5
    assert stream.closed


async def test_after_a_protocol_error_we_linger_briefly_for_the_peer_to_hang_up(
    autojump_clock: MockClock,
) -> None:
    # The peer broke the protocol and keeps sending: we send CLOSE and EOF at
    # once, then read and drop what comes for at most 0.1 s, so that a TCP
    # reset cannot destroy the CLOSE before the peer reads it.
    ours, theirs = trio.testing.memory_stream_pair()  # half-closeable, unlike WrappedStream
    peer = ScriptedPeer(theirs, Role.SERVER)
    stopped_reading_at: list[float] = []

    async def script() -> None:
        await peer.handshake()
        async with trio.open_nursery() as reading:
            reading.start_soon(peer.drain)
            await trio.sleep(1.5)
            await peer.send(b"\xff" * 6)
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:  # garbage until our side is gone
                    await peer.send(b"\x00" * 1024)
                    await trio.sleep(0.01)
            stopped_reading_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            async with open_stream_connection(ours, config=CONFIG):
                await trio.sleep_forever()
        assert trio.current_time() == 1.5 + 0.1
    assert raised.value.code == CloseCode.PROTOCOL_ERROR
    assert peer.frames[-1].close_code == CloseCode.PROTOCOL_ERROR
    assert peer.eof_at == 1.5  # our EOF went out with the CLOSE
    assert stopped_reading_at == [1.6]


async def test_ping_flood_is_closed_with_policy_violation(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        for n in range(4):
            await trio.sleep_until(1.0 + n * 0.125)
            await peer.send_ping()
        await hang_up_on_close(peer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            async with open_stream_connection(stream, config=CONFIG):
                await trio.sleep_forever()
        # First PING at 1.0 is fine; 1.125, 1.25 and 1.375 are strikes one to three.
        assert trio.current_time() == 1.375
    assert raised.value.code == CloseCode.POLICY_VIOLATION
    assert isinstance(raised.value.__cause__, RemoteProtocolError)
    assert peer.frames[-1].close_code == CloseCode.POLICY_VIOLATION


async def test_protocol_error_during_the_handshake(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.send(b"GET / HTTP/1.1\r\n\r\n")
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            async with open_stream_connection(stream, config=CONFIG):
                pass  # pragma: no cover - never entered
    assert raised.value.code == CloseCode.PROTOCOL_ERROR
    assert [frame.type for frame in peer.frames] == [FrameType.CLOSE]


async def test_server_at_capacity_rejects_the_client(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.send_close(CloseCode.TRY_AGAIN_LATER, "full")
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionRejected) as raised:
            async with open_stream_connection(stream, config=CONFIG):
                pass  # pragma: no cover - never entered
    assert (raised.value.code, raised.value.reason) == (CloseCode.TRY_AGAIN_LATER, "full")
    assert raised.value.by_peer
    # We answered the CLOSE, as the protocol asks, then hung up.
    assert [frame.close_code for frame in peer.frames] == [CloseCode.TRY_AGAIN_LATER]
    assert stream.closed


# -- orderly closes -------------------------------------------------------------


async def test_local_aclose_completes_the_close_handshake(autojump_clock: MockClock) -> None:
    async with connection_pair() as pair:
        await pair.client.send(b"last words")
        await pair.client.aclose()
        assert pair.client.state is State.CLOSED
        closed = await pair.client.wait_closed()
        assert (type(closed), closed.code, closed.by_peer) == (
            ConnectionClosed,
            CloseCode.NORMAL,
            False,
        )
        assert await pair.server.receive() == b"last words"
        with pytest.raises(ConnectionClosed) as raised:
            await pair.server.receive()
        assert (raised.value.code, raised.value.by_peer) == (CloseCode.NORMAL, True)
        with pytest.raises(ConnectionClosed):
            await pair.client.send(b"too late")
        with pytest.raises(ConnectionClosed):
            pair.client.send_nowait(b"too late")
        with pytest.raises(ConnectionClosed):
            await pair.client.ping()
        await pair.client.aclose()  # idempotent
    assert trio.current_time() == 0.0
    assert pair.client_stream.closed
    assert pair.server_stream.closed


async def test_leaving_the_block_closes_with_1000(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    async with served_connection(stream, peer, hello_only=True, config=CONFIG) as conn:
        await conn.send(b"a")
        await conn.send(b"b")
    assert [frame.type for frame in peer.frames] == [
        FrameType.HELLO,
        FrameType.DATA,
        FrameType.DATA,
        FrameType.CLOSE,
    ]
    assert peer.frames[-1].close_code == CloseCode.NORMAL
    assert conn.state is State.CLOSED
    assert stream.closed


async def test_peer_close_1000_ends_iteration_quietly(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await peer.send_data(b"one")
        await peer.send_data(b"two")
        await trio.sleep(1.5)
        await peer.send_close(CloseCode.NORMAL, "bye")
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            received = [message async for message in conn]
            assert received == [b"one", b"two"]
            assert trio.current_time() == 1.5
            with pytest.raises(ConnectionClosed) as raised:
                await conn.receive()
            assert type(raised.value) is ConnectionClosed
            assert (raised.value.code, raised.value.reason) == (CloseCode.NORMAL, "bye")
            assert raised.value.by_peer
            with pytest.raises(ConnectionClosed):
                await conn.send(b"after close")
    # We answered with the same code, then closed the stream; the body was not cancelled.
    assert [frame.close_code for frame in peer.of_type(FrameType.CLOSE)] == [CloseCode.NORMAL]
    assert peer.of_type(FrameType.CLOSE)[0].at == 1.5
    assert stream.closed


async def iterate(conn: Connection) -> None:
    async for _ in conn:
        pass  # pragma: no cover - the peer sends no DATA


async def test_peer_close_with_an_application_code_raises_from_iteration(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await peer.send_close(4001, "go away, app-style")
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            await run_body(stream, iterate, config=CONFIG)
    assert type(raised.value) is ConnectionClosed
    assert (raised.value.code, raised.value.reason) == (4001, "go away, app-style")
    assert raised.value.by_peer
    assert [frame.close_code for frame in peer.of_type(FrameType.CLOSE)] == [4001]


@pytest.mark.parametrize("explicit", [False, True], ids=["block-exit", "aclose"])
async def test_close_timeout_when_the_peer_never_answers(
    explicit: bool, autojump_clock: MockClock
) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        with trio.move_on_after(1.0):
            await peer.drain()  # reads our CLOSE, never answers
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=Config(interval=1.0, timeout=3.0, close_timeout=2.0)
        ) as conn:
            await trio.sleep(0.25)
            if explicit:
                await conn.aclose()
    assert trio.current_time() == 2.25
    assert conn.state is State.CLOSED
    closed = conn.closed
    assert closed is not None
    assert (type(closed), closed.code, closed.by_peer) == (ConnectionClosed, 1000, False)
    assert peer.of_type(FrameType.CLOSE)[0].at == 0.25
    assert peer.eof_at == 2.25
    assert stream.closed


async def test_close_nowait_without_flush_jumps_the_queue(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(1.0)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            conn.send_nowait(b"first")
            await trio.sleep(0.5)  # the writer is stuck writing "first"
            conn.send_nowait(b"never sent")
            conn.close_nowait(4002, "now", flush=False)
            conn.close_nowait(4003, "ignored")  # the first close wins
            with pytest.raises(ConnectionClosed):
                conn.send_nowait(b"refused")
            closed = await conn.wait_closed()
            assert (closed.code, closed.reason) == (4002, "now")
    assert [(frame.type, frame.payload) for frame in peer.frames[1:]] == [
        (FrameType.DATA, b"first"),
        (FrameType.CLOSE, b"\x0f\xa2now"),
    ]


# -- transport failures ---------------------------------------------------------


async def test_peer_eof_without_close_is_a_broken_connection(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(1.25)
        await peer.stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(BrokenConnection) as raised:
            async with open_stream_connection(stream, config=CONFIG):
                await trio.sleep_forever()
        assert trio.current_time() == 1.25
    assert raised.value.code == CloseCode.ABNORMAL_CLOSURE
    assert raised.value.by_peer
    assert stream.closed


async def test_transport_reset_is_a_broken_connection(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(1.25)
        stream.break_now()
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(BrokenConnection) as raised:
            async with open_stream_connection(stream, config=CONFIG):
                await trio.sleep_forever()
        assert trio.current_time() == 1.25
    assert raised.value.code == CloseCode.ABNORMAL_CLOSURE
    assert isinstance(raised.value.__cause__, trio.BrokenResourceError)
    assert stream.closed


async def test_write_failure_is_a_broken_connection(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream = WrappedStream(ours)
    peer = ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        # The peer stops accepting bytes but never ends its own side: only
        # our writes can notice.
        await trio.sleep(0.5)
        theirs.receive_stream.close()

    conns: list[Connection] = []

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep(0.75)
        await conn.send(b"lost")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(BrokenConnection) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 0.75
    assert isinstance(raised.value.__cause__, trio.BrokenResourceError)
    assert not raised.value.by_peer
    # Afterwards every send reports the same failure.
    with pytest.raises(BrokenConnection):
        await conns[0].send(b"after")
    with pytest.raises(BrokenConnection):
        conns[0].send_nowait(b"after")
    with pytest.raises(BrokenConnection):
        await conns[0].receive()


# -- the application's own errors -----------------------------------------------


async def test_a_body_exception_propagates_unchanged(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    cause = KeyError("the cause")
    error = ValueError("from the body")

    async def script() -> None:
        await peer.handshake()
        await peer.drain()

    async def body(conn: Connection) -> None:
        await trio.sleep(0.5)
        raise error from cause

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ValueError, match="from the body") as raised:
            await run_body(stream, body, config=CONFIG)
    assert raised.value is error
    assert raised.value.__cause__ is cause
    close = peer.frames[-1]
    assert (close.at, close.close_code, close.close_reason) == (
        0.5,
        CloseCode.GOING_AWAY,
        "ValueError",
    )
    assert stream.closed


async def test_an_error_raised_while_being_cancelled_wins(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def body(conn: Connection) -> None:
        try:
            await trio.sleep_forever()
        finally:
            # The watchdog cancelled us at 3.0 and our cleanup failed:
            # that error is what the caller needs to see.
            raise RuntimeError("cleanup failed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(RuntimeError, match="cleanup failed"):
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 3.0
    assert [frame.at for frame in peer.of_type(FrameType.CLOSE)] == [3.0]
    assert stream.closed


# -- health ---------------------------------------------------------------------


async def test_set_health_pings_at_once_within_the_rate_rule(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    async with served_connection(stream, peer, hello_only=True, config=CONFIG) as conn:
        await trio.sleep(0.25)
        conn.set_health(HealthStatus.DEGRADED)  # no PING yet: at once
        await trio.sleep(0.25)
        conn.set_health(HealthStatus.DEGRADED)  # no change, no PING
        conn.set_health(HealthStatus.NOT_SERVING)  # rate rule: not before 0.25 + 0.5
        assert conn.health is HealthStatus.NOT_SERVING
        await trio.sleep(2.0)
    pings = [(frame.at, frame.status) for frame in peer.of_type(FrameType.PING)]
    assert pings == [
        (0.25, HealthStatus.DEGRADED),
        (0.75, HealthStatus.NOT_SERVING),
        (0.75 + 1.0 * CLIENT_LEAD, HealthStatus.NOT_SERVING),  # the next regular one
    ]


async def test_peer_health_and_listeners(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    seen: list[tuple[float, Event]] = []

    def listener(conn: Connection, event: Event) -> None:
        seen.append((trio.current_time(), event))

    def broken_listener(conn: Connection, event: Event) -> None:
        raise RuntimeError("listeners must not break the connection")

    async def script() -> None:
        await peer.handshake()
        ping = await peer.expect(FrameType.PING)
        await peer.send_pong(ping.opaque, HealthStatus.DEGRADED)
        await trio.sleep_until(1.5)
        await peer.send_ping(opaque(7), HealthStatus.NOT_SERVING)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=CONFIG, listeners=[broken_listener, listener]
        ) as conn:
            assert conn.peer_health is HealthStatus.SERVING
            await trio.sleep(1.25)
            assert conn.statistics().peer_health is HealthStatus.DEGRADED
            await trio.sleep(0.5)
            assert conn.statistics().peer_health is HealthStatus.NOT_SERVING
    first_ping = 1.0 * CLIENT_LEAD
    assert [(at, type(event)) for at, event in seen] == [
        (0.0, HandshakeComplete),
        (first_ping, PeerHealthChanged),
        (first_ping, PongReceived),
        (1.5, PeerHealthChanged),
        (1.5, PingReceived),
        (1.75, ConnectionEnded),
    ]
    events = [event for _, event in seen]
    assert events[1] == PeerHealthChanged(HealthStatus.DEGRADED, HealthStatus.SERVING)
    assert events[2] == PongReceived(opaque(1), HealthStatus.DEGRADED, 0.0)
    assert events[3] == PeerHealthChanged(HealthStatus.NOT_SERVING, HealthStatus.DEGRADED)
    assert events[4] == PingReceived(opaque(7), HealthStatus.NOT_SERVING)
    assert events[5] == ConnectionEnded(CloseCode.NORMAL, "", by_peer=False, clean=True)
    # The PONG to the peer's PING carried our own status.
    assert peer.of_type(FrameType.PONG)[0].status is HealthStatus.SERVING


# -- ping() ---------------------------------------------------------------------


async def test_ping_over_memory_streams_takes_no_time(autojump_clock: MockClock) -> None:
    async with connection_pair() as pair:
        assert await pair.client.ping() == 0.0
        assert pair.client.rtt == 0.0
        # The rate rule asks for half the send interval between PINGs; ping()
        # keeps a margin for jitter on top: 5/8 of the 1 s interval.
        assert await pair.server.ping() == 0.0
        assert await pair.client.ping() == 0.0
        assert trio.current_time() == 0.625


async def test_a_loop_of_pings_leaves_room_for_jitter(autojump_clock: MockClock) -> None:
    async with connection_pair() as pair:
        sent_at = []
        for _ in range(6):
            await pair.client.ping()
            sent_at.append(trio.current_time())
        gaps = {round(b - a, 9) for a, b in itertools.pairwise(sent_at)}
        assert gaps == {0.625}  # a quarter more than the rule's 0.5
        assert pair.server.statistics().state is State.OPEN


async def test_concurrent_pings_keep_their_spacing(autojump_clock: MockClock) -> None:
    async with connection_pair() as pair:
        sent_at: list[float] = []

        async def one_ping() -> None:
            await pair.client.ping()
            sent_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one_ping)
        assert sorted(sent_at) == [0.0, 0.625, 1.25, 1.875]
        assert pair.server.statistics().state is State.OPEN  # no strikes, no 1008


async def test_ping_measures_the_round_trip(autojump_clock: MockClock) -> None:
    async with connection_pair(receive_delay=0.125) as pair:
        start = trio.current_time()
        assert await pair.client.ping() == 0.25
        assert trio.current_time() == start + 0.25
        assert pair.client.srtt == 0.25


async def test_ping_raises_when_the_connection_ends_first(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        frame = await peer.expect(FrameType.PING)
        assert frame.at == 0.0
        await peer.send_close(4005, "no pong for you")
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            with pytest.raises(ConnectionClosed) as raised:
                await conn.ping()
    assert raised.value.code == 4005


# -- statistics -----------------------------------------------------------------


async def test_statistics_count_what_was_exchanged(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await peer.send_data(b"abc")
        await peer.send_data(b"")
        await peer.serve()  # echoes our 2 DATA, answers our PING

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            assert [await conn.receive() for _ in range(2)] == [b"abc", b""]
            await trio.sleep(0.5)
            await conn.send(b"hello")
            await conn.send(b"!")
            assert [await conn.receive() for _ in range(2)] == [b"hello", b"!"]
            await trio.sleep(0.5)
            assert await conn.ping() == 0.0
            stats = conn.statistics()
    assert stats.state is State.OPEN
    assert stats.role is Role.CLIENT
    assert stats.peer_id == ""
    assert stats.peer_health is HealthStatus.SERVING
    assert stats.health is HealthStatus.SERVING
    assert stats.opened_at == 0.0
    assert stats.last_received == 1.0
    assert stats.last_sent == 1.0
    assert (stats.rtt, stats.srtt) == (0.0, 0.0)
    assert stats.send_interval == 1.0
    # In: HELLO, 2 DATA, 2 echoed DATA, 1 PONG. Out: HELLO, 2 DATA, 1 PING.
    assert (stats.frames_in, stats.frames_out) == (6, 4)
    assert (stats.data_frames_in, stats.data_frames_out) == (4, 2)
    assert stats.bytes_in == HELLO_SIZE + (6 + 3) + 6 + (6 + 5) + (6 + 1) + 15
    assert stats.bytes_out == HELLO_SIZE + (6 + 5) + (6 + 1) + 15
    assert (stats.pings_sent, stats.pongs_received) == (1, 1)
    assert (stats.send_queue_used, stats.receive_queue_used) == (0, 0)


# -- misuse ---------------------------------------------------------------------


async def test_oversized_send_is_refused_locally(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer(max_frame=1024)
    async with served_connection(stream, peer, config=CONFIG) as conn:
        with pytest.raises(LocalProtocolError) as raised:
            await conn.send(b"x" * 1025)
        assert raised.value.code == CloseCode.TOO_BIG
        await conn.send(b"x" * 1024)
        assert await conn.receive() == b"x" * 1024


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConnectionOptions(send_queue=0),
        lambda: ConnectionOptions(receive_queue=0),
        lambda: ConnectionOptions(write_timeout=0),
    ],
)
def test_options_are_validated(make: Callable[[], ConnectionOptions]) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()


async def test_a_failing_listener_is_logged(
    caplog: pytest.LogCaptureFixture, autojump_clock: MockClock
) -> None:
    def broken(conn: Connection, event: Event) -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="trio_heartbeat"):
        async with connection_pair(client_listeners=[broken]) as pair:
            assert pair.client.state is State.OPEN
    assert "event listener" in caplog.text


async def test_hello_helper_round_trips(autojump_clock: MockClock) -> None:
    # The helpers speak the same HELLO as the runtime: guard the test tooling itself.
    stream, peer = stream_and_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.send, hello_frame(Role.SERVER, instance_id="scripted"))
        nursery.start_soon(peer.serve)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            assert conn.peer_id == "scripted"


# -- corners --------------------------------------------------------------------


async def test_a_ping_waiting_for_the_rate_rule_sees_the_close(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        ping = await peer.expect(FrameType.PING)
        await peer.send_pong(ping.opaque)
        await trio.sleep(0.25)
        await peer.send_close(CloseCode.GOING_AWAY, "draining")
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            assert await conn.ping() == 0.0
            with pytest.raises(ConnectionClosed) as raised:
                await conn.ping()  # waits until 0.625 (rate rule and margin); the CLOSE comes first
            assert trio.current_time() == 0.625
    assert (raised.value.code, raised.value.by_peer) == (CloseCode.GOING_AWAY, True)


async def test_write_timeout_while_the_reader_waits_for_the_application(
    autojump_clock: MockClock,
) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        with suppress(trio.BrokenResourceError):  # we hang up while it still writes
            for n in range(3):
                await peer.send_data(b"%d" % n)
            await trio.sleep_forever()  # never reads again

    async def body(conn: Connection) -> None:
        await trio.sleep(0.5)
        await conn.send(b"nobody reads this")
        await trio.sleep_forever()  # nor do we

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream,
                body,
                config=CONFIG,
                options=ConnectionOptions(receive_queue=1, write_timeout=1.0),
            )
        # The reader was paused (no liveness verdict); the write timeout still holds.
        assert trio.current_time() == 1.5
        nursery.cancel_scope.cancel()
    assert raised.value.reason == "write timeout: the peer stopped reading"


async def test_the_first_word_on_how_it_ended_wins(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.75)
        await peer.send_close()  # crosses our CLOSE, which it never reads
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(write_timeout=0.3125)
        ) as conn:
            await trio.sleep(0.5)
            await conn.aclose()
            # The close handshake is done (the peer's CLOSE arrived), although
            # our own CLOSE is still stuck on its way.
            assert trio.current_time() == 0.75
        # Its write timeout (0.5 + 0.3125) ended the wait for the writer, but
        # came too late to change how the connection ended.
        assert trio.current_time() == 0.8125
        nursery.cancel_scope.cancel()
    closed = conn.closed
    assert closed is not None
    assert (type(closed), closed.code) == (ConnectionClosed, CloseCode.NORMAL)


async def test_a_ping_from_another_task_ends_with_the_connection(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stream_and_peer()
    results: list[BaseException] = []

    async def ping_from_outside(conn: Connection) -> None:
        try:
            await conn.ping()
        except ConnectionClosed as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)  # never answers a PING
        with trio.move_on_after(1.0):
            async with open_stream_connection(stream, config=CONFIG) as conn:
                nursery.start_soon(ping_from_outside, conn)
                await trio.sleep_forever()
    assert trio.current_time() == 1.0
    assert [(type(exc), exc.code) for exc in results] == [  # type: ignore[attr-defined]
        (ConnectionClosed, CloseCode.GOING_AWAY)
    ]


# -- the watchdog records its verdict before it cancels ----------------------------


async def test_the_verdict_is_visible_while_the_block_unwinds(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    seen: list[object] = []

    async def body(conn: Connection) -> None:
        try:
            await trio.sleep_forever()
        finally:
            seen.append(conn.closed)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout):
            await run_body(stream, body, config=CONFIG)
    [verdict] = seen
    assert isinstance(verdict, HeartbeatTimeout)
    assert verdict.code == CloseCode.HEARTBEAT_TIMEOUT


async def test_code_after_aclose_runs_when_the_close_times_out(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    after_close: list[float] = []

    async def body(conn: Connection) -> None:
        await trio.sleep(1.0)
        await conn.aclose()  # the peer never answers: the close timeout ends the wait
        after_close.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        await run_body(stream, body, config=Config(interval=1.0, timeout=3.0, close_timeout=0.5))
    assert after_close == [1.5]
    assert stream.closed


async def test_a_client_block_starts_only_once_its_hello_is_written(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stream_and_peer(role=Role.SERVER)

    async def body(conn: Connection) -> None:
        raise KeyError("at once")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(KeyError):
            await run_body(stream, body, role=Role.CLIENT, config=CONFIG)
    types = [frame.type for frame in peer.frames]
    assert types[:1] == [FrameType.HELLO]
    assert peer.frames[-1].close_code == CloseCode.GOING_AWAY


async def test_the_stream_is_closed_even_if_setting_up_fails(autojump_clock: MockClock) -> None:
    stream, _peer = stream_and_peer()

    def broken_detector() -> FailureDetector:
        raise RuntimeError("no detector today")

    with pytest.raises(RuntimeError, match="no detector today"):
        async with open_stream_connection(
            stream, options=ConnectionOptions(detector=broken_detector)
        ):
            pass  # pragma: no cover - never entered
    assert stream.closed


async def test_leaving_with_unread_data_closes_in_one_round_trip(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        for i in range(100):  # more than the receive queue (64) holds
            await peer.send_data(b"%d" % i)
        await peer.serve()  # answers our CLOSE at once

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=Config(interval=1.0, timeout=3.0, close_timeout=5.0)
        ) as conn:
            await trio.sleep(0.5)  # the reader is now held up by the full queue
            assert conn.statistics().receive_queue_used == 64
        # Not at the 5 s close timeout: the unread DATA was dropped and the
        # peer's CLOSE read at once.
        assert trio.current_time() == 0.5
        closed = conn.closed
        assert closed is not None
        assert closed.code == CloseCode.NORMAL
        nursery.cancel_scope.cancel()
