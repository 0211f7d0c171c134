"""The read side of one connection (``_reader.py``): the reader task, which is also the watchdog.

The reader reads inside a timer scope, and the timer is the watchdog: it
convicts a silent peer (the handshake timeout first, then the failure
detector's verdict), queues the PING that is due, and gives up on a write cut
short; every frame that arrives moves it, and a frame that arrived before a
stall of our own event loop is read before the verdict. The reader answers
PINGs itself and hands DATA to a bounded queue: when the application falls
behind it stops reading, and the silence that follows is not held against the
peer; ``receive`` takes waiting DATA without a task switch.

Every test runs in virtual time against a :class:`helpers.ScriptedPeer`.
Where the outcome depends on which of two tasks woken at the same instant runs
first, the stream fixes the order: :class:`LateReads` hands received bytes
over a set number of scheduling rounds late, as a busy event loop would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing
from helpers import (
    CONFIG,
    ScriptedPeer,
    StepCounter,
    WrappedStream,
    connection_pair,
    handshake_then_drain,
    handshake_then_serve,
    hang_up_on_close,
    how_it_ended,
    idle_ping_times,
    opaque,
    resume_at,
    run_body,
    served_connection,
    stalling_stream_and_peer,
    stream_and_peer,
    wait_forever,
    watch_writers,
)
from trio.testing import MockClock

from trio_heartbeat._budget import BufferBudget
from trio_heartbeat._config import Config
from trio_heartbeat._connection import Connection
from trio_heartbeat._errors import (
    BrokenConnection,
    ConnectionClosed,
    Conviction,
    HeartbeatTimeout,
    RemoteProtocolError,
)
from trio_heartbeat._events import (
    Event,
    Liveness,
    PeerRecovered,
    PeerSuspected,
    PingReceived,
    PongReceived,
)
from trio_heartbeat._frames import (
    CloseCode,
    FrameType,
    HealthStatus,
    Role,
    encode_data,
    encode_ping,
)
from trio_heartbeat._handshake import CLIENT_LEAD
from trio_heartbeat._local_health import local_health
from trio_heartbeat._options import ConnectionOptions
from trio_heartbeat._pings import RTT_REFRESH
from trio_heartbeat._reader import HELD_OVERHEAD
from trio_heartbeat._state import State
from trio_heartbeat._stream_connection import open_stream_connection
from trio_heartbeat._transport import RECEIVE_SIZE, socket_fd


class LateReads(WrappedStream):
    """Hands every received chunk over ``rounds`` scheduling rounds after it arrived.

    A stand-in for a stream that does more work after its input has arrived
    (a decoder, say): the bytes are here, but the reader gets them only after
    other tasks have run ``rounds`` times. Cancel-safe, as Trio's streams
    are: a chunk whose handing over is cancelled is handed over next time.
    """

    def __init__(self, inner: trio.abc.Stream, rounds: int) -> None:
        super().__init__(inner)
        self.rounds = rounds
        self.held: bytes | bytearray | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.held is None:
            self.held = await super().receive_some(max_bytes)
        for _ in range(self.rounds):
            await trio.lowlevel.checkpoint()
        data, self.held = self.held, None
        return data


def late_stream_and_peer(
    peer_role: Role = Role.SERVER, rounds: int = 1
) -> tuple[LateReads, ScriptedPeer]:
    """Our end of a memory stream pair reading ``rounds`` rounds late, and a peer."""
    ours, theirs = trio.testing.memory_stream_pair()
    return LateReads(ours, rounds), ScriptedPeer(theirs, peer_role)


# -- conviction ------------------------------------------------------------------------


async def three_messages_then_pings(peer: ScriptedPeer) -> None:
    """The peer sends three messages, then answers everything and PINGs every second, ten
    times, whether or not our application reads."""
    await peer.handshake()
    for n in range(3):
        await peer.send_data(b"message %d" % n)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.serve)
        for _ in range(10):
            await trio.sleep(1.0)
            await peer.send_ping()


async def three_messages_then_silence(peer: ScriptedPeer) -> None:
    """The peer sends three messages, then reads what we send and answers nothing."""
    await peer.handshake()
    for n in range(3):
        await peer.send_data(b"message %d" % n)
    await peer.drain()


#: A queue of one message and a reserve too small for any (each message in the reserve counts
#: HELD_OVERHEAD bytes more than its payload): the reader holds the next message itself.
NO_RESERVE = ConnectionOptions(receive_queue=1, receive_queue_bytes=HELD_OVERHEAD)


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
    assert raised.value.reason == "heartbeat timeout: peer silent"
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


async def test_a_write_cut_by_the_timer_past_the_abort_deadline_is_a_heartbeat_timeout(
    autojump_clock: MockClock,
) -> None:
    """The peer neither reads nor writes. Our DATA write stalls at 0.5; its
    write timeout (3 s, the default) would end it at 3.5, but the peer has
    been silent since 0.0 and is dead at 3.0: the verdict is the heartbeat
    timeout, and nothing more is written after the cut frame."""
    stream, peer = stalling_stream_and_peer()

    async def body(conn: Connection) -> None:
        await trio.sleep(0.5)
        stream.stall_next_write(after=3)
        await conn.send(b"half of this")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 3.0
    assert (raised.value.code, raised.value.reason) == (
        CloseCode.HEARTBEAT_TIMEOUT,
        "heartbeat timeout: peer silent",
    )
    assert stream.send_interrupted
    # Our idle PING was due at 0.9, but no PING goes out while a write is stuck.
    assert [frame.type for frame in peer.frames] == [FrameType.HELLO]
    assert peer.eof_at == 3.0


@pytest.mark.parametrize(
    ("write_timeout", "ended_at", "reason"),
    [
        (1.0, 1.5, "write timeout: the peer stopped reading"),
        (5.0, 3.5, "heartbeat timeout: peer silent"),
    ],
    ids=["write-timeout-first", "silence-first"],
)
async def test_our_own_pong_stuck_in_the_stream_is_cut_by_the_timer(
    write_timeout: float, ended_at: float, reason: str, autojump_clock: MockClock
) -> None:
    """The peer PINGs at 0.5 and then neither reads nor writes: the PONG the
    reader writes itself stalls partway. The reader's own timer cuts it at
    whichever comes first, the write timeout (from 0.5) or the verdict on the
    peer's silence (3.0 after its PING), and that ends the connection: a cut
    frame leaves the stream unusable, so nothing more is written."""
    stream, peer = stalling_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(0.5)
        stream.stall_next_write(after=4)  # our PONG
        await peer.send_ping()
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream,
                wait_forever,
                config=CONFIG,
                options=ConnectionOptions(write_timeout=write_timeout),
            )
        assert trio.current_time() == ended_at
    assert (raised.value.code, raised.value.reason) == (CloseCode.HEARTBEAT_TIMEOUT, reason)
    assert not raised.value.by_peer
    assert stream.send_interrupted
    assert [frame.type for frame in peer.frames] == [FrameType.HELLO]  # and half a PONG
    assert peer.eof_at == ended_at


async def test_a_close_timeout_that_cuts_our_own_pong_ends_the_reader_at_once(
    autojump_clock: MockClock,
) -> None:
    """Our PONG to the peer's PING at 0.5 stalls partway, and at 1.0 we close
    without flushing (the CLOSE waits behind the stuck PONG). The reader's
    timer cuts the PONG at the close timeout (2.0): the stream is unusable,
    so the close is over there, in order, and the reader stops at once. The
    stream is closed at 2.0 and leaving the block takes no time at all (a
    reader that went on reading would hold it up for the short bound on the
    last words)."""
    stream, peer = stalling_stream_and_peer()
    closed_at: list[float] = []

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(0.5)
        stream.stall_next_write(after=4)  # our PONG
        await peer.send_ping()
        await peer.drain()

    async def body(conn: Connection) -> None:
        await trio.sleep_until(1.0)
        conn.close_nowait(4001, "done", flush=False)
        ended = await conn.wait_closed()
        closed_at.append(trio.current_time())
        assert (type(ended), ended.code, ended.reason, ended.by_peer) == (
            ConnectionClosed,
            4001,
            "done",
            False,
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        await run_body(
            stream,
            body,
            config=Config(interval=1.0, timeout=3.0, close_timeout=1.0),
            options=ConnectionOptions(write_timeout=5.0),
        )
        assert trio.current_time() == 2.0
    assert closed_at == [2.0]
    assert stream.send_interrupted
    assert [frame.type for frame in peer.frames] == [FrameType.HELLO]  # and half a PONG
    assert peer.eof_at == 2.0


# -- a frame that arrived before a stall of our own loop -------------------------------


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


@pytest.mark.parametrize(("rounds", "verdict_at"), [(0, 6.0), (1, 3.0)], ids=["honoured", "late"])
async def test_a_frame_that_arrived_before_a_stall_is_read_before_the_verdict(
    rounds: int, verdict_at: float, autojump_clock: MockClock
) -> None:
    """The peer's DATA arrives at 2.5, but a stalled loop (a clock jump) brings
    us to the 3.0 deadline before the reader has run. The reader, woken for
    its input before Trio expires the deadline, takes it in: the frame saves
    the peer (silent again from 3.0, it is convicted at 6.0). A stream that
    hands the frame over a round later than that is too late: the verdict
    stands at 3.0."""
    stream, peer = late_stream_and_peer(Role.SERVER, rounds)
    received: list[tuple[float, bytes]] = []

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(2.5)
        await peer.send_data(b"sent in time")
        autojump_clock.jump(0.5)
        await peer.drain()

    async def body(conn: Connection) -> None:
        message = await conn.receive()
        received.append((trio.current_time(), message))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout):
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == verdict_at
    assert received == ([(3.0, b"sent in time")] if verdict_at > 3.0 else [])
    assert peer.of_type(FrameType.CLOSE)[0].at == verdict_at


@pytest.mark.parametrize(
    ("rounds", "client_ping_at", "server_pings"),
    [(0, 0.75, []), (0, 1.125, [1.0]), (1, 0.75, [1.0])],
    ids=["waiting-in-the-buffer", "arrives-later", "handed-over-late"],
)
async def test_a_server_answers_the_client_ping_waiting_at_its_deadline_instead_of_pinging(
    rounds: int, client_ping_at: float, server_pings: list[float], autojump_clock: MockClock
) -> None:
    """The server PINGs its verdict on the client's HELLO at 0.0, so its next
    PING is due at 1.0. A client PING already in our buffer then (sent
    earlier, but a busy loop, here a clock jump, kept the reader from it) is
    answered, and the server sends no PING of its own: Trio wakes the reader
    for its input before it expires the timer's deadline. A PING that arrives
    after 1.0, or one that the stream hands over only later, finds the
    server's PING already sent; it is answered all the same (nothing is lost
    to the timer's cancellation)."""
    stream, peer = late_stream_and_peer(Role.CLIENT, rounds)
    stats = []

    async def script() -> None:
        await peer.handshake()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.serve)  # reads (and answers) everything, from now on
            await trio.sleep_until(client_ping_at)
            await peer.send_ping()
            if client_ping_at < 1.0:
                autojump_clock.jump(1.0 - client_ping_at)  # our reader gets to it only at 1.0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, role=Role.SERVER, config=CONFIG) as conn:
            await trio.sleep_until(1.5)
            stats.append(conn.statistics())
    [at_1_5] = stats
    assert at_1_5.send_interval == 1.0
    # The verdict (our PING #1) at 0.0, then the heartbeat's own PINGs, if any.
    assert at_1_5.pings_sent == 1 + len(server_pings)
    assert peer.times(FrameType.PING) == [0.0, *server_pings]
    assert [frame.opaque for frame in peer.of_type(FrameType.PING)] == [
        opaque(n) for n in range(1, 2 + len(server_pings))
    ]
    # The client's PING was answered when we read it: at 1.0, or when it arrived.
    [pong] = peer.of_type(FrameType.PONG)
    assert (pong.at, pong.opaque) == (max(client_ping_at, 1.0), opaque(1))
    assert at_1_5.state is State.OPEN


# -- the heartbeat the timer keeps, and the answers ------------------------------------


@pytest.mark.parametrize(
    ("role", "peer_timeout", "expected"),
    [
        # A server PINGs its verdict on the client's HELLO at once, then after
        # exactly its send interval of silence.
        (Role.SERVER, 3.0, [0.0, 1.0, 2.0, 3.0, 4.0]),
        # min(own interval 1.0, peer timeout / 2): the peer's timeout sets the pace.
        (Role.SERVER, 1.0, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]),
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
    # The peer answers every PING and never PINGs itself, but for a server peer's
    # verdict on our HELLO: our PONG to it goes at 0.0, as our HELLO did, so our
    # idle PINGs count from 0.0 all the same.
    async with served_connection(stream, peer, hello_only=True, role=role, config=CONFIG) as conn:
        await trio.sleep(4.25)
        assert conn.statistics().pings_sent == len(expected)
        assert conn.statistics().pongs_received == len(expected)
    assert peer.times(FrameType.PING) == expected
    assert [frame.opaque for frame in peer.of_type(FrameType.PING)] == [
        opaque(n) for n in range(1, len(expected) + 1)
    ]


@pytest.mark.parametrize("delay", [0.0, 2**-5], ids=["prompt", "one-way-delay"])
async def test_an_idle_pair_carries_the_client_heartbeat_and_a_server_ping_per_refresh(
    delay: float, autojump_clock: MockClock
) -> None:
    """The point of CLIENT_LEAD: both sides run the same send rule, but the
    client's PING comes first and the server's PONG restarts the server's
    timer, so an idle server only answers, also when each frame takes
    ``delay`` to cross. The server PINGs only to measure: its verdict on the
    client's HELLO, then once every RTT_REFRESH send intervals after its last
    PING; the client's PONG to each restarts the client's own timer."""
    server_saw: list[tuple[float, type[Event]]] = []

    def server_listener(conn: Connection, event: Event) -> None:
        if isinstance(event, (PingReceived, PongReceived)):
            server_saw.append((trio.current_time(), type(event)))

    until = 2.5 * RTT_REFRESH * 1.0  # two refreshes, and some
    # The server's HELLO crosses, the client's HELLO crosses back, and the
    # server PINGs its verdict at once; then every RTT_REFRESH intervals.
    server_pings = [2 * delay + n * RTT_REFRESH * 1.0 for n in range(3)]
    # The client's PONGs to them leave as they arrive; the first (to the
    # verdict) is its last frame of the handshake, and each one restarts its
    # timer: it PINGs every CLIENT_LEAD of the interval after its last frame.
    client_pongs = [at + delay for at in server_pings]
    sent: list[float] = []
    for start, end in zip(client_pongs, [*client_pongs[1:], until], strict=True):
        sent += idle_ping_times(1.0 * CLIENT_LEAD, end, start=start)
    async with connection_pair(
        client_config=CONFIG,
        server_config=CONFIG,
        server_listeners=[server_listener],
        receive_delay=delay,
    ) as pair:
        await trio.sleep_until(until)
        client, server = pair.client.statistics(), pair.server.statistics()
        assert client.send_interval == server.send_interval == 1.0
        assert server.pings_sent == server.pongs_received == len(server_pings) == 3
        assert len(sent) == 332
        assert client.pings_sent == client.pongs_received == len(sent)
        assert server_saw == sorted(
            [(at + 2 * delay, PongReceived) for at in server_pings]
            + [(at + delay, PingReceived) for at in sent]
        )
        # Every PING of either side kept to the rate rule: both are still OPEN.
        assert server.state is client.state is State.OPEN
        assert pair.client.rtt == pair.server.rtt == 2 * delay
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


# -- delivery and backpressure ---------------------------------------------------------


async def test_slow_application_does_not_convict_a_healthy_peer(autojump_clock: MockClock) -> None:
    """With a queue of one message and nobody reading, the reader goes on reading: the two
    messages past the queue wait in its reserve, and the peer's PINGs are heard and answered
    as they come. The watchdog keeps judging the peer, who is alive."""
    stream, peer = stream_and_peer()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(three_messages_then_pings, peer)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(receive_queue=1)
        ) as conn:
            await trio.sleep(0.5)
            assert conn.statistics().receive_queue_used == 3  # one queued, two in reserve
            assert conn.watchdog_deadline == 3.0  # still judging the peer
            await trio.sleep(9.5)  # far beyond the 3 s timeout
            assert conn.state is State.OPEN
            assert conn.watchdog_deadline > 12.0  # the peer was heard within the last second
            received = [await conn.receive() for _ in range(3)]
            assert received == [b"message 0", b"message 1", b"message 2"]
            await trio.sleep(0.5)
            assert conn.state is State.OPEN
            assert trio.current_time() == 10.5
    # The peer's PINGs were answered as they came, not when the application read.
    assert peer.times(FrameType.PONG) == [float(second) for second in range(1, 11)]
    # Our own heartbeat never stopped: never silent for more than the client's lead.
    ours = sorted(peer.times(FrameType.PING) + peer.times(FrameType.PONG))
    assert ours[0] == 1.0 * CLIENT_LEAD
    assert max(b - a for a, b in itertools.pairwise(ours)) <= 1.0 * CLIENT_LEAD + 1e-9
    assert ours[-1] >= 10.0


async def test_a_full_queue_does_not_blind_the_watchdog(autojump_clock: MockClock) -> None:
    """The peer sends three messages and then nothing at all, and our application never
    reads: the messages wait (one queued, two in reserve), and the silent peer is convicted
    at the timeout all the same, as a peer that went silent. What was received stays
    readable after the end."""
    stream, peer = stream_and_peer()
    conns: list[Connection] = []

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(three_messages_then_silence, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, body, config=CONFIG, options=ConnectionOptions(receive_queue=1))
        assert trio.current_time() == 3.0
    assert raised.value.conviction is Conviction.PEER_SILENT
    [conn] = conns
    assert [conn.receive_nowait() for _ in range(3)] == [b"message 0", b"message 1", b"message 2"]


async def test_past_the_reserve_the_timeout_still_bounds_detection_and_the_fault_is_ours(
    autojump_clock: MockClock,
) -> None:
    """A reserve too small for anything (each message counts 64 bytes more than its payload):
    the second message stops the reader. The peer keeps pinging, unheard; at the timeout the
    watchdog convicts, saying that we were stalled, since the silence is our reader's."""
    stream, peer = stream_and_peer()

    deadlines: list[float] = []

    async def body(conn: Connection) -> None:
        await trio.sleep(0.5)
        deadlines.append(conn.watchdog_deadline)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(three_messages_then_pings, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream,
                body,
                config=CONFIG,
                options=NO_RESERVE,
            )
        assert trio.current_time() == 3.0
        nursery.cancel_scope.cancel()
    assert deadlines == [3.0]
    assert raised.value.conviction is Conviction.LOCAL_STALL
    assert peer.of_type(FrameType.CLOSE)[0].close_reason == "heartbeat timeout: we were stalled"


async def test_conviction_returns_once_the_application_catches_up(
    autojump_clock: MockClock,
) -> None:
    """Past the reserve, taking the DATA resumes reading, and the silence counts from then.

    The reader stops at the second message (a reserve of no use: 64 bytes); the
    application takes all three at 2.0, inside the timeout. The peer, silent since
    0.0, has the whole timeout again from 2.0, and not a moment more: convicted at 5.0.
    """
    stream, peer = stream_and_peer()

    deadlines: list[tuple[float, float]] = []

    async def body(conn: Connection) -> None:
        await trio.sleep(2.0)
        deadlines.append((trio.current_time(), conn.watchdog_deadline))
        assert [await conn.receive() for _ in range(3)] == [
            b"message 0",
            b"message 1",
            b"message 2",
        ]
        deadlines.append((trio.current_time(), conn.watchdog_deadline))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(three_messages_then_silence, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream,
                body,
                config=CONFIG,
                options=NO_RESERVE,
            )
        assert trio.current_time() == 5.0
    assert deadlines == [(2.0, 3.0), (2.0, 5.0)]
    assert raised.value.conviction is Conviction.PEER_SILENT
    assert (peer.frames[-1].type, peer.frames[-1].at) == (FrameType.CLOSE, 5.0)
    assert peer.frames[-1].close_code == CloseCode.HEARTBEAT_TIMEOUT


async def test_the_reserve_moves_up_into_the_queue_in_order_and_counts_once(
    autojump_clock: MockClock,
) -> None:
    """Past a queue of two, messages wait in the reserve; as the application takes them,
    the reserve moves up in order, and the shared budget counts each message once: in the
    reserve with its overhead, as the reserve itself counts it, in the queue its payload."""
    budget = BufferBudget(10_000)
    stream, peer = stream_and_peer()

    async def body(conn: Connection) -> None:
        await peer.send(b"".join(encode_data(b"%d" % n * 10) for n in range(6)))
        await trio.sleep(0.125)
        assert conn.statistics().receive_queue_used == 6
        assert budget.holding(conn) == 60 + 4 * HELD_OVERHEAD
        taken = []
        for left in (5, 4, 3, 2, 1, 0):
            taken.append(conn.receive_nowait())
            assert conn.statistics().receive_queue_used == left
            assert budget.holding(conn) == 10 * left + max(left - 2, 0) * HELD_OVERHEAD
        assert taken == [b"%d" % n * 10 for n in range(6)]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        await run_body(
            stream,
            body,
            config=CONFIG,
            options=ConnectionOptions(receive_queue=2, budget=budget),
        )
    assert budget.used == 0


async def test_a_flood_of_tiny_messages_is_bounded_by_the_reserve_with_its_overhead(
    autojump_clock: MockClock,
) -> None:
    """Each message in the reserve counts HELD_OVERHEAD bytes more than its payload, so a
    flood of one-byte messages stops the reader after reserve / (1 + HELD_OVERHEAD) of them,
    not after a million."""
    stream, peer = stream_and_peer()
    reserve = 10 * (1 + HELD_OVERHEAD)

    async def body(conn: Connection) -> None:
        await peer.send(encode_data(b"x") * 1_000)
        await trio.sleep(0.125)
        # The queue (one message) and ten in reserve; the reader holds the next.
        assert conn.statistics().receive_queue_used == 1 + 10

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        await run_body(
            stream,
            body,
            config=CONFIG,
            options=ConnectionOptions(receive_queue=1, receive_queue_bytes=reserve),
        )


async def test_receive_with_data_waiting_never_yields_yet_honours_a_cancel(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await peer.send_data(b"one")
        await peer.send_data(b"two")
        await peer.serve()

    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            await trio.sleep(0.5)
            assert conn.statistics().receive_queue_used == 2
            counter = StepCounter(trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(counter)
            try:
                # receive() is a cancellation point, which Trio counts as a
                # checkpoint, although with DATA waiting it never lets another
                # task run: the task's step goes on through it.
                with (
                    pytest.raises(AssertionError, match="assert_no_checkpoints block yielded"),
                    trio.testing.assert_no_checkpoints(),
                ):
                    received.append(await conn.receive())
            finally:
                trio.lowlevel.remove_instrument(counter)
            assert counter.steps == 0
            assert received == [b"one"]
            with trio.CancelScope() as scope:
                scope.cancel()
                received.append(await conn.receive())  # raises Cancelled: DATA or not
            assert scope.cancelled_caught
            # The DATA was not taken by the cancelled call: it is still there.
            assert conn.statistics().receive_queue_used == 1
            received.append(await conn.receive())
            assert received == [b"one", b"two"]
            assert trio.current_time() == 0.5


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
            await trio.sleep(0.5)  # queue (64) and reserve (36) hold everything
            assert conn.statistics().receive_queue_used == 100
        # Not at the 5 s close timeout: the unread DATA was dropped and the
        # peer's CLOSE read at once.
        assert trio.current_time() == 0.5
        closed = conn.closed
        assert closed is not None
        assert closed.code == CloseCode.NORMAL
        nursery.cancel_scope.cancel()


class ReadSizes(WrappedStream):
    """Records how much every read handed over."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.sizes: list[int] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await super().receive_some(max_bytes)
        self.sizes.append(len(data))
        return data


async def test_a_burst_is_read_a_bounded_piece_at_a_time(autojump_clock: MockClock) -> None:
    """Three messages of 40,000 bytes arrive at once: the reader takes them in
    reads of RECEIVE_SIZE bytes at most (a stream that holds more must not
    hand it all over in one read), and every message arrives whole."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = ReadSizes(ours), ScriptedPeer(theirs)
    messages = [bytes([n]) * 40_000 for n in range(3)]

    async def body(conn: Connection) -> None:
        stream.sizes.clear()
        await peer.send(b"".join(encode_data(message) for message in messages))
        assert [await conn.receive() for _ in messages] == messages
        assert trio.current_time() == 0.0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        await run_body(stream, body, config=CONFIG)
    assert max(stream.sizes) == RECEIVE_SIZE
    assert sum(stream.sizes[:2]) == sum(len(encode_data(message)) for message in messages)


# -- reading while we close ------------------------------------------------------------


async def test_a_reset_in_answer_to_our_close_ends_it_like_an_eof(
    autojump_clock: MockClock,
) -> None:
    # The peer reads our CLOSE and resets the connection instead of answering.
    # The close is over, not cleanly, as when the peer just hangs up: the
    # block that closed does not raise.
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        while (frame := await peer.receive_frame()) is not None:
            if frame.type is FrameType.CLOSE:
                await trio.sleep(0.25)
                stream.break_now()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            await trio.sleep(1.0)
        assert trio.current_time() == 1.25
    assert how_it_ended(conn) == (ConnectionClosed, CloseCode.NORMAL, False)
    assert stream.closed


# -- a read that fails, and the end of a connection while DATA waits -------------------


async def test_a_read_that_fails_is_a_broken_connection_the_peer_started(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.75)
        stream.break_now()  # the read under way fails, as on a reset
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(BrokenConnection) as raised:
            await run_body(stream, wait_forever, config=CONFIG)
        assert trio.current_time() == 0.75
    assert raised.value.code == CloseCode.ABNORMAL_CLOSURE
    assert raised.value.by_peer
    # The reason is the stream error's own words.
    assert raised.value.reason == "connection lost: connection reset (injected)"
    assert isinstance(raised.value.__cause__, trio.BrokenResourceError)


async def test_data_read_before_a_protocol_error_is_still_delivered(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stream_and_peer()
    conns: list[Connection] = []

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.5)
        await peer.send(encode_data(b"before") + b"\xff" * 6)  # one read: DATA, then garbage
        await hang_up_on_close(peer)

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 0.5
    assert raised.value.code == CloseCode.PROTOCOL_ERROR
    assert isinstance(raised.value.__cause__, RemoteProtocolError)
    [conn] = conns
    assert conn.statistics().receive_queue_used == 1
    assert await conn.receive() == b"before"
    with pytest.raises(ConnectionClosed) as again:
        await conn.receive()
    assert again.value.code == CloseCode.PROTOCOL_ERROR


async def test_a_protocol_error_is_logged_at_debug_with_the_peer_and_the_close_code(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The reader logs the peer's protocol error once, at DEBUG: who the peer
    is, what it did wrong and the close code we answer with."""
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await peer.send(b"\xff" * 6)  # no frame type is 0xff
        await hang_up_on_close(peer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with (
            caplog.at_level(logging.DEBUG, logger="trio_heartbeat"),
            pytest.raises(ConnectionClosed) as raised,
        ):
            await run_body(stream, wait_forever, config=CONFIG, remote_address="192.0.2.7:4433")
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteProtocolError)
    assert cause.code == raised.value.code == CloseCode.PROTOCOL_ERROR
    records = [record for record in caplog.records if record.module == "_reader"]
    assert [(record.levelno, record.getMessage()) for record in records] == [
        (logging.DEBUG, f"protocol error from peer 192.0.2.7:4433: {cause} (close 1002)")
    ]


async def test_a_reader_cancelled_from_outside_lets_the_cancellation_through(
    autojump_clock: MockClock,
) -> None:
    """The caller's scope is cancelled at 1.5 while the reader waits for input:
    the reader ends with the cancellation, as the block does, nothing else
    comes out, and the peer hears GOING_AWAY "cancelled" in the last words."""
    stream, peer = stream_and_peer()
    conns: list[Connection] = []

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with trio.move_on_after(1.5) as scope:
            await run_body(stream, body, config=CONFIG)
        assert scope.cancelled_caught
        assert trio.current_time() == 1.5
    [conn] = conns
    assert how_it_ended(conn) == (ConnectionClosed, CloseCode.GOING_AWAY, False)
    assert conn.closed is not None
    assert conn.closed.reason == "cancelled"
    last = peer.frames[-1]
    assert (last.type, last.at, last.close_code) == (FrameType.CLOSE, 1.5, CloseCode.GOING_AWAY)
    assert stream.closed


async def test_a_reader_waiting_for_room_stops_when_the_connection_fails(
    autojump_clock: MockClock,
) -> None:
    """The application does not read: "0" fills the queue of one, and the reader
    (with no usable reserve) holds "1" while it waits for room. Our write then fails (the peer stopped
    accepting bytes): the reader stops waiting, and what was queued is still
    delivered, but not what the reader held."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = WrappedStream(ours), ScriptedPeer(theirs)
    conns: list[Connection] = []

    async def script() -> None:
        await peer.handshake()
        for n in range(3):
            await peer.send_data(b"%d" % n)
        await trio.sleep(0.5)
        theirs.receive_stream.close()
        await trio.sleep_forever()

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep(0.75)
        assert conn.statistics().receive_queue_used == 1
        assert conn.watchdog_deadline == 3.0  # held up: the timeout alone
        await conn.send(b"lost")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(BrokenConnection) as raised:
            await run_body(
                stream,
                body,
                config=CONFIG,
                options=NO_RESERVE,
            )
        assert trio.current_time() == 0.75
        nursery.cancel_scope.cancel()
    assert not raised.value.by_peer
    [conn] = conns
    assert await conn.receive() == b"0"
    with pytest.raises(BrokenConnection):
        await conn.receive()


# -- what the reader holds, counted against a shared budget ----------------------------


async def test_what_the_reader_holds_counts_against_the_budget_to_the_byte(
    autojump_clock: MockClock,
) -> None:
    """Received bytes count against a shared budget wherever they wait.

    With a queue of one message: the DATA queued, the DATA the reader holds
    while the queue is full, and a frame still arriving all count, and each
    counts once; whatever leaves (taken by the application, or moved from
    the reader's hands into the queue) stops counting at once.
    """
    budget = BufferBudget(10_000)
    stream, peer = stream_and_peer()
    big = encode_data(b"x" * 50)
    partial = len(big) - 1  # all of that frame but its last byte

    async def body(conn: Connection) -> None:
        await peer.send(big[:-1])
        await trio.sleep(0.125)
        assert budget.holding(conn) == partial  # nothing queued, nothing held: a frame arriving
        await peer.send(big[-1:])
        await trio.sleep(0.125)
        assert budget.holding(conn) == 50  # now a message in the queue
        assert await conn.receive() == b"x" * 50
        assert budget.holding(conn) == 0
        await peer.send(encode_data(b"a") + encode_data(b"b"))
        await trio.sleep(0.125)
        assert budget.holding(conn) == 1 + 1  # "a" queued, "b" in the reader's hands
        await peer.send(encode_data(b"c") + big[:-1])
        await trio.sleep(0.125)
        assert budget.holding(conn) == 2  # not read yet: the reader waits for room
        assert await conn.receive() == b"a"
        await trio.sleep(0.125)
        # "b" moved into the queue; "c" waits in the reader's hands, the big
        # frame in the decoder.
        assert budget.holding(conn) == 1 + 1 + partial
        assert await conn.receive() == b"b"
        await trio.sleep(0.125)
        assert budget.holding(conn) == 1 + partial
        await peer.send(big[-1:])
        await trio.sleep(0.125)
        assert budget.holding(conn) == 1 + 50  # "c" queued, the whole frame held
        assert await conn.receive() == b"c"
        await trio.sleep(0.125)
        assert budget.holding(conn) == 50
        assert await conn.receive() == b"x" * 50
        assert budget.holding(conn) == budget.used == 0
        assert trio.current_time() == 1.0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        await run_body(
            stream,
            body,
            config=CONFIG,
            options=dataclasses.replace(NO_RESERVE, budget=budget),
        )
    assert budget.used == 0


async def test_the_receive_queue_holds_up_to_its_byte_bound_exactly(
    autojump_clock: MockClock,
) -> None:
    """``receive_queue_bytes`` (10 here) bounds the bytes queued, exactly.

    A message that would take the queue past it waits in the reader until
    the application has taken enough; one that brings the queue to the bound
    exactly is queued. Taken with ``receive_nowait``, which never waits.
    """
    stream, peer = stream_and_peer()

    async def body(conn: Connection) -> None:
        await peer.send(encode_data(b"a" * 4) + encode_data(b"b" * 6) + encode_data(b"c"))
        await trio.sleep(0.125)
        assert conn.statistics().receive_queue_used == 2  # 10 bytes: "c" would make 11
        assert conn.receive_nowait() == b"a" * 4
        await trio.sleep(0.125)
        assert conn.statistics().receive_queue_used == 2  # 7 bytes, "c" among them
        await peer.send(encode_data(b"d" * 4))
        await trio.sleep(0.125)
        assert conn.statistics().receive_queue_used == 2  # "d" would make 11
        assert conn.receive_nowait() == b"b" * 6
        await trio.sleep(0.125)
        assert conn.statistics().receive_queue_used == 2  # 5 bytes
        assert [conn.receive_nowait(), conn.receive_nowait()] == [b"c", b"d" * 4]
        with pytest.raises(trio.WouldBlock):
            conn.receive_nowait()
        assert trio.current_time() == 0.5

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        await run_body(
            stream, body, config=CONFIG, options=ConnectionOptions(receive_queue_bytes=10)
        )


async def test_a_connection_cut_off_while_its_reader_holds_data_lets_go_of_all_of_it(
    autojump_clock: MockClock,
) -> None:
    """Cut off by the shared budget, a connection drops all the DATA nobody took.

    The queue holds "a" and the reader holds "b", waiting for room; our own
    send then takes the budget past its limit, and this connection, the only
    one, holds the most. The end wakes the reader, but "b" is not delivered
    into the emptied queue: neither message can be received afterwards, and
    neither counts against the budget again.
    """
    budget = BufferBudget(100)
    stream, peer = stream_and_peer()
    conns: list[Connection] = []

    async def script() -> None:
        await peer.handshake()
        await peer.send_data(b"a" * 40)
        await peer.send_data(b"b" * 40)
        await peer.drain()

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep(0.5)
        assert budget.holding(conn) == 80
        await conn.send(b"c" * 30)  # 110 bytes in all
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            await run_body(
                stream,
                body,
                config=CONFIG,
                # No usable reserve: the reader holds "b" itself.
                options=dataclasses.replace(NO_RESERVE, budget=budget),
            )
        assert trio.current_time() == 0.5
    assert (raised.value.code, raised.value.reason) == (
        CloseCode.TRY_AGAIN_LATER,
        "buffer budget exceeded",
    )
    [conn] = conns
    assert conn.statistics().receive_queue_used == 0
    with pytest.raises(ConnectionClosed) as again:
        conn.receive_nowait()
    assert again.value.code == CloseCode.TRY_AGAIN_LATER
    assert budget.used == 0
    assert peer.of_type(FrameType.DATA) == []
    assert peer.frames[-1].close_code == CloseCode.TRY_AGAIN_LATER


# -- on a plain socket: a frame the poll has not reported yet at the deadline -----------


direct_io = pytest.mark.skipif(sys.platform == "win32", reason="no direct socket I/O on Windows")


class StallAfterPoll(trio.abc.Instrument):
    """A stall of our own event loop, as a plain socket sees it.

    Once armed, right after Trio's next poll for I/O it runs an action on the
    peer's socket (the peer's frame arrives, say), then jumps the clock. What
    the action did happened before the deadline the jump passes, but the poll
    did not see it, and Trio expires that deadline before it polls again:
    the order the reader's local-stall guard is for.
    """

    def __init__(self, clock: MockClock) -> None:
        self.clock = clock
        self.armed: tuple[Callable[[], object], float] | None = None

    def arm(self, action: Callable[[], object], jump: float) -> None:
        self.armed = (action, jump)

    def after_io_wait(self, timeout: float) -> None:
        if self.armed is not None:
            (action, jump), self.armed = self.armed, None
            action()
            self.clock.jump(jump)


@contextmanager
def plain_socket_and_peer(
    *, on_fd_0: bool = False
) -> Iterator[tuple[trio.SocketStream, ScriptedPeer, socket.socket]]:
    """Our end of a socket pair as a plain stream, a peer on the other, and the peer's socket.

    ``on_fd_0`` puts our end on descriptor 0, where inetd and systemd hand a
    program its connection (the test's own descriptor 0 is put back after).
    """
    ours, theirs = socket.socketpair()
    saved = None
    if on_fd_0:
        saved = os.dup(0)
        os.dup2(ours.fileno(), 0)
        ours.close()
        ours = socket.socket(fileno=0)
    try:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        peer = ScriptedPeer(trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))
        yield stream, peer, theirs
    finally:
        ours.close()
        theirs.close()
        if saved is not None:
            os.dup2(saved, 0)
            os.close(saved)


@direct_io
@pytest.mark.parametrize("on_fd_0", [False, True], ids=["socket", "socket-on-fd-0"])
async def test_on_a_plain_socket_a_frame_the_poll_missed_is_read_before_the_verdict(
    on_fd_0: bool, autojump_clock: MockClock
) -> None:
    """The peer's DATA reaches our socket in time, but a stall of our own loop
    (a clock jump from 2.5) brings the 3.0 deadline before the poll reports
    it. The reader reads what waits in the socket before it judges: the frame
    saves the peer, its silence counts from 3.0, and the verdict comes at 6.0.
    The same on descriptor 0."""
    stall = StallAfterPoll(autojump_clock)
    received: list[tuple[float, bytes, float]] = []

    with plain_socket_and_peer(on_fd_0=on_fd_0) as (stream, peer, theirs):
        assert (socket_fd(stream) == 0) is on_fd_0

        async def body(conn: Connection) -> None:
            await trio.sleep_until(2.5)
            stall.arm(lambda: theirs.send(encode_data(b"sent in time")), 0.5)
            message = await conn.receive()
            received.append((trio.current_time(), message, conn.watchdog_deadline))
            await trio.sleep_forever()

        trio.lowlevel.add_instrument(stall)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(handshake_then_drain, peer)
                with pytest.raises(HeartbeatTimeout):
                    await run_body(stream, body, config=CONFIG)
                assert trio.current_time() == 6.0
        finally:
            trio.lowlevel.remove_instrument(stall)
    assert received == [(3.0, b"sent in time", 6.0)]
    closes = peer.of_type(FrameType.CLOSE)
    assert [(close.at, close.close_code) for close in closes] == [(6.0, 1011)]


@direct_io
async def test_on_a_plain_socket_a_read_that_fails_at_the_deadline_leaves_the_verdict(
    autojump_clock: MockClock,
) -> None:
    """The peer, silent since the handshake, closes its socket with our PINGs
    unread (a reset) just before our 3.0 deadline, and a stall of our own
    loop keeps the poll from reporting it in time. The reader's read before
    the verdict fails; the silent peer is judged as it stands: a heartbeat
    timeout, not a broken connection the peer started."""
    stall = StallAfterPoll(autojump_clock)
    with plain_socket_and_peer() as (stream, peer, theirs):

        async def body(conn: Connection) -> None:
            await trio.sleep_until(2.5)
            stall.arm(theirs.close, 0.5)
            await trio.sleep_forever()

        trio.lowlevel.add_instrument(stall)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.handshake)
                with pytest.raises(HeartbeatTimeout) as raised:
                    await run_body(stream, body, config=CONFIG)
                assert trio.current_time() == 3.0
        finally:
            trio.lowlevel.remove_instrument(stall)
    assert (raised.value.code, raised.value.reason) == (
        CloseCode.HEARTBEAT_TIMEOUT,
        "heartbeat timeout: peer silent",
    )
    assert not raised.value.by_peer


@direct_io
@pytest.mark.parametrize("on_fd_0", [False, True], ids=["socket", "socket-on-fd-0"])
async def test_on_a_plain_socket_the_reader_keeps_an_idle_connection_alive_by_itself(
    on_fd_0: bool, autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a plain socket, on descriptor 0 too, the reader does the I/O of an idle
    connection itself: it reads through the descriptor, never through the
    stream's ``receive_some``, and writes the PINGs its timer queues as it goes
    round, so no writer task is ever started for the heartbeat."""
    receive_calls: list[int | None] = []
    with plain_socket_and_peer(on_fd_0=on_fd_0) as (stream, peer, _):
        assert (socket_fd(stream) == 0) is on_fd_0
        receive_some = stream.receive_some

        async def counted_receive_some(  # pragma: no cover - the direct path never calls it
            max_bytes: int | None = None,
        ) -> bytes | bytearray:
            receive_calls.append(max_bytes)
            return await receive_some(max_bytes)

        monkeypatch.setattr(stream, "receive_some", counted_receive_some)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake_then_serve, peer)
            async with open_stream_connection(stream, config=CONFIG) as conn:
                with watch_writers() as writers:
                    await trio.sleep(3.5)
                assert writers.started == []
                assert conn.statistics().pongs_received == len(
                    idle_ping_times(1.0 * CLIENT_LEAD, 3.5)
                )
                await conn.send(b"now a message")
            nursery.cancel_scope.cancel()
    assert receive_calls == []
    assert peer.times(FrameType.PING) == idle_ping_times(1.0 * CLIENT_LEAD, 3.5)
    assert [frame.payload for frame in peer.of_type(FrameType.DATA)] == [b"now a message"]


# -- suspicion: SUSPECT before the verdict, and back ------------------------------------


async def test_an_overdue_peer_is_suspect_until_its_next_frame(autojump_clock: MockClock) -> None:
    """Heard at 0.0, the peer (one PING a second) is SUSPECT at exactly 1.5, as the listeners
    hear; its PING at 2.0 makes it ALIVE again; silent from then, it is SUSPECT at 3.5 and
    convicted at 5.0. The suspicion level rises with the silence and falls with a frame."""
    stream, peer = stream_and_peer()
    heard: list[tuple[float, Event]] = []
    seen: list[tuple[float, Liveness, float]] = []

    def listener(conn: Connection, event: Event) -> None:
        if isinstance(event, PeerSuspected | PeerRecovered):
            heard.append((trio.current_time(), event))

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(2.0)
        await peer.send_ping()
        await peer.drain()

    async def body(conn: Connection) -> None:
        for when in (1.0, 1.625, 1.75, 2.25, 3.0):
            await trio.sleep_until(when)
            seen.append((when, conn.liveness, conn.suspicion))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout):
            await run_body(stream, body, config=CONFIG, listeners=[listener])
        assert trio.current_time() == 5.0
    assert heard == [
        (1.5, PeerSuspected(1.5, pytest.approx(-math.log10(0.5)))),  # type: ignore[arg-type]
        (2.0, PeerRecovered(2.0)),
        (3.5, PeerSuspected(1.5, pytest.approx(-math.log10(0.5)))),  # type: ignore[arg-type]
    ]
    assert [(when, liveness) for when, liveness, _ in seen] == [
        (1.0, Liveness.ALIVE),
        (1.625, Liveness.SUSPECT),
        (1.75, Liveness.SUSPECT),
        (2.25, Liveness.ALIVE),
        (3.0, Liveness.ALIVE),
    ]
    levels = [level for _, _, level in seen]
    assert levels[0] < levels[1] < levels[2]  # rising with the silence
    assert levels[3] < levels[0]  # a frame at 2.0: a quarter of a second of silence
    assert levels[4] == levels[0]  # one second of silence again


async def test_a_peer_whose_frame_waits_in_the_socket_is_not_suspected(
    autojump_clock: MockClock,
) -> None:
    """On a plain socket the suspicion, like the verdict, first reads what is waiting: a PING
    that arrived before a stall of our loop saves the peer from suspicion."""
    a, b = socket.socketpair()
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    theirs = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    peer = ScriptedPeer(theirs)
    heard: list[Event] = []

    async def body(conn: Connection) -> None:
        await trio.sleep_until(1.2)
        # The peer's PING reaches our socket, and our loop is away over the 1.5 suspicion.
        b.send(encode_ping(bytes(8), HealthStatus.SERVING))
        autojump_clock.jump(0.4)
        await trio.sleep(0.1)
        assert conn.liveness is Liveness.ALIVE
        assert conn.last_received == 1.6

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        await run_body(
            ours,
            body,
            config=CONFIG,
            listeners=[lambda conn, event: heard.append(event)],
        )
        nursery.cancel_scope.cancel()
    await theirs.aclose()
    assert not [event for event in heard if isinstance(event, PeerSuspected)]


async def test_past_the_reserve_the_verdict_does_not_read_on_into_a_flood(
    autojump_clock: MockClock,
) -> None:
    """Past the reserve the reader is not reading, and the verdict must not read for it: a
    peer that floods DATA (and PINGs) on a plain socket while our application takes nothing
    is convicted at the timeout, saying that we were stalled, with no more than the kernel's
    buffers taken from it. (Reading what waits before the verdict would pull the flood in
    without bound, and hear the peer again and again.)"""
    a, b = socket.socketpair()
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    theirs = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    peer = ScriptedPeer(theirs)
    flood = encode_data(b"x" * 1000) * 100 + encode_ping(bytes(8), HealthStatus.SERVING)
    conns: list[Connection] = []

    async def script() -> None:
        await peer.handshake()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for _ in range(100):  # 10 MB in all, if it were all read
                await theirs.send_all(flood)

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(ours, body, config=CONFIG, options=NO_RESERVE)
        assert trio.current_time() == 3.0
        nursery.cancel_scope.cancel()
    await theirs.aclose()
    assert raised.value.conviction is Conviction.LOCAL_STALL
    [conn] = conns
    assert conn.statistics().bytes_in < 2_000_000


@pytest.mark.parametrize(
    ("stall", "reads_at"),
    [(5.0, 6.5), (2.2, 3.25), (2.4, 3.45)],
    ids=["far-past-the-write-deadline", "just-past-it", "under-a-stall-past-it"],
)
async def test_a_stall_of_ours_during_a_write_is_not_the_peers_slowness(
    stall: float, reads_at: float, autojump_clock: MockClock
) -> None:
    """Our DATA's write is under way (the peer's buffer is full) from 0.25 when our loop is
    away from 1.0, past the write deadline of 3.25: far past it, or by less than a stall
    (the timer also pulses while a write is stuck, so the stall shows all the same). The
    peer is not blamed for our stall: the write gets its whole time again, goes through
    when the peer reads, and the connection lives on."""
    stream, peer = stalling_stream_and_peer()

    async with (
        trio.open_nursery() as nursery,
        served_connection(stream, peer, config=CONFIG) as conn,
    ):
        await trio.sleep_until(0.25)
        stream.stall_next_write(after=4)
        conn.send_nowait(b"under way")
        nursery.start_soon(resume_at, stream, reads_at)
        await trio.sleep_until(1.0)
        autojump_clock.jump(stall)
        await trio.sleep_until(8.0)
        assert conn.closed is None
        assert await conn.receive() == b"under way"  # echoed: it went through
    assert [frame.at for frame in peer.of_type(FrameType.DATA)] == [reads_at]


async def test_a_write_that_stalls_on_behind_our_stalls_is_given_its_time_again_once(
    autojump_clock: MockClock,
) -> None:
    """The peer never reads again, and our loop is away a second in every second and a half:
    the stuck write is given its whole time again after the first stall only, so the peer
    that stopped reading is convicted 3 s after it, not never."""
    stream, peer = stalling_stream_and_peer()

    async def body(conn: Connection) -> None:
        await trio.sleep_until(0.25)
        stream.stall_next_write(after=4)
        conn.send_nowait(b"stuck for good")
        for round_ in range(20):
            await trio.sleep_until(1.0 + 1.5 * round_)
            autojump_clock.jump(1.0)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_serve, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, body, config=CONFIG)
        assert 5.0 <= trio.current_time() <= 5.5
        nursery.cancel_scope.cancel()
    assert raised.value.reason == "write timeout: the peer stopped reading"


async def test_with_a_short_interval_a_shorter_lateness_is_a_stall_of_ours(
    autojump_clock: MockClock,
) -> None:
    """With a 0.1 s interval and a 0.3 s timeout, a 0.4 s stall of our loop is under the
    half second that counts as a stall in general, but past half the peer's send interval:
    it is a stall all the same, and the live peer is not convicted for it."""
    stream, peer = stream_and_peer(timeout=0.3)
    peer.interval = 0.1
    fast = Config(interval=0.1, timeout=0.3)

    async def body(conn: Connection) -> None:
        await trio.sleep_until(1.0)
        autojump_clock.jump(0.4)
        await trio.sleep_until(3.0)
        assert conn.closed is None
        assert local_health().stalls == 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_serve, peer)
        await run_body(stream, body, config=fast)
        nursery.cancel_scope.cancel()
