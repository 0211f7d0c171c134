"""``Connection`` (``_connection.py``), the public face of one connection, in virtual time.

What the application sees: ``send``, ``receive`` and ``async for``, ``ping()``,
``set_health``, ``aclose``, ``close_nowait`` and ``wait_closed``, the facts and
``statistics()``, event listeners, every task waiting for the end, and how
each ending surfaces (which exception, which code, who started it; the first
word wins). The reader, the writer, the transport and the context manager have
test modules of their own.

Most tests put a :class:`helpers.ScriptedPeer` on the far end of an
in-memory stream, so the test decides what the peer sends and when, and reads
back every frame we send with the virtual time it arrived. Times are exact:
the ``autojump_clock`` fixture jumps straight to the next deadline.
"""

from __future__ import annotations

import itertools
import logging
import math
import traceback
from typing import Any

import pytest
import trio
import trio.testing
from helpers import (
    CONFIG,
    HELLO_SIZE,
    VERDICT,
    VIRTUAL_BOUND,
    ScriptedPeer,
    connection_pair,
    handshake_then_drain,
    handshake_then_serve,
    hang_up_on_close,
    hello_frame,
    lockstep_stream_and_peer,
    opaque,
    resume_at,
    run_body,
    served_connection,
    stalling_stream_and_peer,
    stream_and_peer,
    task_names,
    wait_forever,
)
from trio.testing import MockClock

from trio_heartbeat._budget import BufferBudget
from trio_heartbeat._config import Config
from trio_heartbeat._connection import Connection
from trio_heartbeat._errors import (
    BrokenConnection,
    ConnectionClosed,
    ConnectionRejected,
    HeartbeatTimeout,
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

# -- echo, and the facts of a connection -----------------------------------------------


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


async def test_a_message_that_is_not_bytes_is_refused_at_the_call(
    autojump_clock: MockClock,
) -> None:
    """A str fails in the caller's ``send``, not later in the writer task (#10)."""
    async with connection_pair() as pair:
        for wrong in ("a str", 42, None):
            with pytest.raises(
                TypeError, match=f"a message must be bytes, not {type(wrong).__name__}"
            ):
                await pair.client.send(wrong)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="a message must be bytes"):
                pair.client.send_nowait(wrong)  # type: ignore[arg-type]
        mutable = bytearray(b"before")
        await pair.client.send(mutable)  # type: ignore[arg-type]
        pair.client.send_nowait(memoryview(b"viewed"))  # type: ignore[arg-type]
        mutable[:] = b"after!"  # a copy was queued: changing it now changes nothing sent
        assert [await pair.server.receive(), await pair.server.receive()] == [b"before", b"viewed"]
        assert pair.client.state is State.OPEN
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


async def test_hello_helper_round_trips(autojump_clock: MockClock) -> None:
    # The helpers speak the same HELLO as the runtime: guard the test tooling itself.
    stream, peer = stream_and_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.send, hello_frame(Role.SERVER, instance_id="scripted"))
        nursery.start_soon(peer.serve)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            assert conn.peer_id == "scripted"


# -- the block opens on the server's verdict -------------------------------------------

#: When the scripted server gives its verdict on our HELLO: judging it takes a while.
JUDGED_AT = 0.25


@pytest.mark.parametrize(
    ("hello_first", "code", "reason"),
    [
        (True, CloseCode.POLICY_VIOLATION, "interval below the floor"),
        (False, CloseCode.TRY_AGAIN_LATER, "at capacity"),
        (True, CloseCode.TRY_AGAIN_LATER, "at capacity"),
        (True, CloseCode.GOING_AWAY, "server draining"),
    ],
    ids=["hello-then-1008", "1013-instead-of-hello", "hello-then-1013", "hello-then-1001"],
)
async def test_a_refused_client_never_enters_its_block(
    hello_first: bool, code: int, reason: str, autojump_clock: MockClock
) -> None:
    """A client is OPEN as soon as its HELLO is out, before the server has
    judged it; its block opens only on the server's verdict. A refusal (CLOSE
    1008, 1013 or 1001, after the server's HELLO or instead of it) is raised
    from the ``async with`` entry, and the block's body never runs."""
    stream, peer = stream_and_peer()
    entered: list[float] = []

    async def body(conn: Connection) -> None:
        entered.append(trio.current_time())
        await trio.sleep_forever()

    async def script() -> None:
        if hello_first:
            await peer.send_hello()
            await peer.expect(FrameType.HELLO)
        await trio.sleep_until(JUDGED_AT)
        await peer.send_close(code, reason)
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionRejected) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == JUDGED_AT
    assert entered == []
    # Raised from the entry, not from the exit of a block that was cancelled.
    # (By substring: a mutation tool renames the functions it wraps.)
    names = [entry.name for entry in raised.traceback]
    assert any("__aenter__" in name for name in names), names
    assert not any("__aexit__" in name for name in names), names
    assert (raised.value.code, raised.value.reason, raised.value.by_peer) == (code, reason, True)
    # Our HELLO at once if the server sent its own; our answer to the CLOSE as it came.
    expected = [(0.0, FrameType.HELLO)] if hello_first else []
    expected.append((JUDGED_AT, FrameType.CLOSE))
    assert [(frame.at, frame.type) for frame in peer.frames] == expected
    assert peer.frames[-1].close_code == code
    assert peer.eof_at == JUDGED_AT
    assert stream.closed


async def test_an_accepted_client_enters_its_block_as_the_verdict_arrives(
    autojump_clock: MockClock,
) -> None:
    """The server's verdict PING opens the client's block at the moment it
    arrives, not when the server's HELLO did: once inside, the client knows
    the server has accepted it."""
    stream, peer = stream_and_peer()
    entered: list[float] = []

    async def script() -> None:
        await peer.send_hello()
        await peer.expect(FrameType.HELLO)
        await trio.sleep_until(JUDGED_AT)
        await peer.send_ping(opaque(1))  # the verdict, numbered as our server numbers it
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            entered.append(trio.current_time())
            assert conn.state is State.OPEN
            assert conn.statistics().frames_in == 2  # the server's HELLO, and its verdict
            await conn.send(b"accepted")
            assert await conn.receive() == b"accepted"
    assert entered == [JUDGED_AT]
    # Our HELLO went out at once, the PONG to the verdict as it came, then the block's DATA.
    assert [(frame.at, frame.type) for frame in peer.frames[:3]] == [
        (0.0, FrameType.HELLO),
        (JUDGED_AT, FrameType.PONG),
        (JUDGED_AT, FrameType.DATA),
    ]
    assert peer.frames[1].opaque == opaque(1)


async def test_a_close_right_after_the_hello_still_opens_the_block(
    autojump_clock: MockClock,
) -> None:
    """A server that sends its HELLO, then a CLOSE 1000 instead of its
    verdict PING (not a refusal), ends the connection in order before the
    client's block could open. The block opens all the same, at that moment,
    and finds the connection closed; leaving it raises nothing."""
    stream, peer = stream_and_peer()
    seen: list[tuple[float, ConnectionClosed | None]] = []

    async def script() -> None:
        await peer.send_hello()
        await peer.expect(FrameType.HELLO)
        await trio.sleep_until(JUDGED_AT)
        await peer.send_close(CloseCode.NORMAL, "nothing to do")
        await peer.drain()

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(script)
            async with open_stream_connection(stream, config=CONFIG) as conn:
                seen.append((trio.current_time(), conn.closed))
    [(entered_at, closed)] = seen
    assert entered_at == JUDGED_AT
    assert closed is not None
    assert (type(closed), closed.code, closed.reason, closed.by_peer) == (
        ConnectionClosed,
        CloseCode.NORMAL,
        "nothing to do",
        True,
    )
    assert [frame.close_code for frame in peer.of_type(FrameType.CLOSE)] == [CloseCode.NORMAL]


# -- ping() ----------------------------------------------------------------------------


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


async def test_pings_out_at_the_same_time_each_hear_their_own_pong(
    autojump_clock: MockClock,
) -> None:
    """A second ping() sent while the first still waits for its PONG must not
    make that PONG go unheard: the peer answers both late, and in reverse
    order, and each call returns at its own PONG with its own round trip."""
    stream, peer = stream_and_peer()
    returned: list[tuple[str, float, float]] = []

    async def script() -> None:
        await peer.handshake()
        first = await peer.expect(FrameType.PING)
        second = await peer.expect(FrameType.PING)
        await trio.sleep_until(1.0)
        await peer.send_pong(second.opaque)
        await trio.sleep_until(1.25)
        await peer.send_pong(first.opaque)
        await peer.serve()

    async def one_ping(conn: Connection, name: str) -> None:
        rtt = await conn.ping()
        returned.append((name, trio.current_time(), rtt))

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(script)
            async with open_stream_connection(stream, config=CONFIG) as conn:
                async with trio.open_nursery() as pingers:
                    pingers.start_soon(one_ping, conn, "first")
                    await trio.testing.wait_all_tasks_blocked()
                    pingers.start_soon(one_ping, conn, "second")  # out at 0.625
                assert conn.state is State.OPEN
    # The second PING went out at 0.625 (the rate rule and its margin).
    assert returned == [("second", 1.0, 0.375), ("first", 1.25, 1.25)]
    assert peer.times(FrameType.PING)[:2] == [0.0, 0.625]


async def test_a_cancelled_ping_still_writes_its_whole_ping(autojump_clock: MockClock) -> None:
    """ping() writes its PING from the calling task, shielded: cancelling the
    call while that write is held up does not cut the frame short (a partial
    frame would leave the stream unusable and end the connection). The write
    finishes once the stream moves again, the cancellation arrives then, and
    the connection stays open."""
    stream, peer = stalling_stream_and_peer()
    async with (
        trio.open_nursery() as nursery,
        served_connection(stream, peer, config=CONFIG) as conn,
    ):
        stream.stall_next_write(after=4)
        nursery.start_soon(resume_at, stream, 0.5)
        with trio.move_on_after(0.25) as scope:
            await conn.ping()
        assert scope.cancelled_caught
        assert trio.current_time() == 0.5  # the write went on past the cancellation
        await trio.sleep(0.5)
        assert conn.closed is None
        assert conn.state is State.OPEN
    assert not stream.send_interrupted
    assert peer.times(FrameType.PING)[0] == 0.5


async def test_ping_measures_the_round_trip(autojump_clock: MockClock) -> None:
    async with connection_pair(receive_delay=0.125) as pair:
        # Three crossings open the client's block: the server's HELLO, ours,
        # and the server's verdict PING (sent at 0.25, the server's first
        # round trip once our PONG to it has crossed back, at 0.5).
        assert trio.current_time() == 0.375
        await trio.sleep_until(0.5)  # the link is idle again
        assert await pair.client.ping() == 0.25
        assert trio.current_time() == 0.75
        assert pair.client.srtt == 0.25
        assert (pair.server.rtt, pair.server.srtt) == (0.25, 0.25)


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


async def test_ping_after_a_broken_transport_raises_instead_of_waiting_forever(
    autojump_clock: MockClock,
) -> None:
    """A reset ends the connection with 1006 but leaves the protocol core OPEN
    (the core never saw a CLOSE). ``ping()`` used to look at the core only:
    it sent a PING nobody would answer and waited for ever."""
    stream, peer = stream_and_peer()
    conns: list[Connection] = []

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.5)
        stream.break_now()  # a reset under our reader
        await peer.drain()

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(BrokenConnection):
            await run_body(stream, body, config=CONFIG)
    [conn] = conns
    with trio.fail_after(VIRTUAL_BOUND), pytest.raises(BrokenConnection) as raised:
        await conn.ping()
    assert raised.value.code == CloseCode.ABNORMAL_CLOSURE
    assert trio.current_time() == 0.5  # at once, not after any wait


# -- health and listeners --------------------------------------------------------------


async def test_set_health_pings_at_once_within_the_rate_rule(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    async with served_connection(stream, peer, hello_only=True, config=CONFIG) as conn:
        await trio.sleep(0.25)
        conn.set_health(HealthStatus.DEGRADED)  # no PING yet: at once
        await trio.sleep(0.25)
        conn.set_health(HealthStatus.DEGRADED)  # no change, no PING
        conn.set_health(HealthStatus.NOT_SERVING)  # rate rule: 0.25 + 0.5, then a margin
        assert conn.health is HealthStatus.NOT_SERVING
        await trio.sleep(2.0)
    pings = [(frame.at, frame.status) for frame in peer.of_type(FrameType.PING)]
    assert pings == [
        (0.25, HealthStatus.DEGRADED),
        (0.875, HealthStatus.NOT_SERVING),
        (0.875 + 1.0 * CLIENT_LEAD, HealthStatus.NOT_SERVING),  # the next regular one
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
        (0.0, PingReceived),  # the server's verdict on our HELLO
        (first_ping, PeerHealthChanged),
        (first_ping, PongReceived),
        (1.5, PeerHealthChanged),
        (1.5, PingReceived),
        (1.75, ConnectionEnded),
    ]
    events = [event for _, event in seen]
    assert events[1] == PingReceived(VERDICT, HealthStatus.SERVING)
    assert events[2] == PeerHealthChanged(HealthStatus.DEGRADED, HealthStatus.SERVING)
    assert events[3] == PongReceived(opaque(1), HealthStatus.DEGRADED, 0.0)
    assert events[4] == PeerHealthChanged(HealthStatus.NOT_SERVING, HealthStatus.DEGRADED)
    assert events[5] == PingReceived(opaque(7), HealthStatus.NOT_SERVING)
    assert events[6] == ConnectionEnded(CloseCode.NORMAL, "", by_peer=False, clean=True)
    # The PONG to the peer's PING carried our own status.
    assert peer.of_type(FrameType.PONG)[0].status is HealthStatus.SERVING


async def test_a_failing_listener_is_logged(
    caplog: pytest.LogCaptureFixture, autojump_clock: MockClock
) -> None:
    """A listener that raises is logged, once per event, with the listener,
    the event and the error; it is called with the connection itself."""
    heard: list[tuple[Connection, Event]] = []

    def broken(conn: Connection, event: Event) -> None:
        heard.append((conn, event))
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="trio_heartbeat"):
        async with connection_pair(client_listeners=[broken]) as pair:
            assert pair.client.state is State.OPEN
    assert "event listener" in caplog.text
    assert [type(event) for _, event in heard] == [
        HandshakeComplete,
        PingReceived,
        ConnectionEnded,
    ]
    assert all(conn is pair.client for conn, _ in heard)
    assert [record.getMessage() for record in caplog.records] == [
        f"event listener {broken!r} failed on {event!r}" for _, event in heard
    ]
    for record in caplog.records:
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)


# -- statistics ------------------------------------------------------------------------


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
    # In: HELLO, the verdict PING, 2 DATA, 2 echoed DATA, 1 PONG.
    # Out: HELLO, the PONG to the verdict, 2 DATA, 1 PING. (PING and PONG: 6 + 9 bytes.)
    assert (stats.frames_in, stats.frames_out) == (7, 5)
    assert (stats.data_frames_in, stats.data_frames_out) == (4, 2)
    assert stats.bytes_in == HELLO_SIZE + 15 + (6 + 3) + 6 + (6 + 5) + (6 + 1) + 15
    assert stats.bytes_out == HELLO_SIZE + 15 + (6 + 5) + (6 + 1) + 15
    assert (stats.pings_sent, stats.pongs_received) == (1, 1)
    assert (stats.send_queue_used, stats.receive_queue_used) == (0, 0)


# -- orderly closes --------------------------------------------------------------------


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


async def test_our_close_carries_the_code_and_reason_given_and_none_by_default(
    autojump_clock: MockClock,
) -> None:
    """aclose(code, reason) puts both in our CLOSE and in how the connection
    ended; close_nowait() with no arguments closes with 1000 and an empty
    reason."""
    ends: list[tuple[int, str, int, str]] = []
    for explicit in (True, False):
        stream, peer = stream_and_peer()
        async with served_connection(stream, peer, config=CONFIG) as conn:
            if explicit:
                await conn.aclose(4001, "done here")
            else:
                conn.close_nowait()
                await conn.wait_closed()
            closed = conn.closed
            assert closed is not None
            [frame] = peer.of_type(FrameType.CLOSE)
            ends.append((frame.close_code, frame.close_reason, closed.code, closed.reason))
    assert ends == [(4001, "done here", 4001, "done here"), (1000, "", 1000, "")]


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


@pytest.mark.parametrize("flush", [True, False], ids=["flush", "no-flush"])
async def test_senders_refused_after_close_nowait_hear_the_requested_code(
    flush: bool, autojump_clock: MockClock
) -> None:
    """A sender waiting for room, a later ``send_nowait`` and a ``ping`` all
    learn of the close the application asked for (4002), as ``wait_closed``
    does. With ``flush=True`` the close is only asked for until the writer has
    flushed the queue and applied it, so the core has no close code yet: the
    refusal takes the code from the request. (A regression test: it used to
    report 1000 with an empty reason.) Either way the close is ours: ``by_peer``
    is ``False`` (with ``flush=False`` the core is CLOSING, and says so)."""
    stream, peer = stalling_stream_and_peer()
    refusals: list[tuple[str, int, str, object]] = []

    async def blocked_sender(conn: Connection) -> None:
        try:
            await conn.send(b"no room")
        except ConnectionClosed as exc:
            refusals.append(("send", exc.code, exc.reason, exc.by_peer))

    async with (
        trio.open_nursery() as nursery,
        served_connection(
            stream, peer, config=CONFIG, options=ConnectionOptions(send_queue=1)
        ) as conn,
    ):
        stream.stall_next_write(after=4)
        conn.send_nowait(b"first")
        await trio.sleep(0.125)
        conn.send_nowait(b"second")
        async with trio.open_nursery() as senders:
            senders.start_soon(blocked_sender, conn)
            await trio.sleep(0.125)
            conn.close_nowait(4002, "app says bye", flush=flush)
        with pytest.raises(ConnectionClosed) as raised:
            conn.send_nowait(b"too late")
        refusals.append(
            ("send_nowait", raised.value.code, raised.value.reason, raised.value.by_peer)
        )
        with pytest.raises(ConnectionClosed) as raised:
            await conn.ping()
        refusals.append(("ping", raised.value.code, raised.value.reason, raised.value.by_peer))
        nursery.start_soon(resume_at, stream, 0.5)
        closed = await conn.wait_closed()
    assert (closed.code, closed.reason) == (4002, "app says bye")
    assert refusals == [
        ("send", 4002, "app says bye", False),
        ("send_nowait", 4002, "app says bye", False),
        ("ping", 4002, "app says bye", False),
    ]


# -- what is left in the queues --------------------------------------------------------


async def test_receive_nowait_takes_what_is_queued_then_says_how_it_ended(
    autojump_clock: MockClock,
) -> None:
    """receive_nowait() returns DATA that has arrived and raises WouldBlock
    when none has; once the connection has ended it still returns what was
    queued before the end, then raises how it ended."""
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(0.25)
        await peer.send_data(b"one")
        await trio.sleep_until(0.75)
        await peer.send_data(b"two")
        await peer.send_close(4003, "that was all")
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            with pytest.raises(trio.WouldBlock):
                conn.receive_nowait()
            await trio.sleep_until(0.5)
            assert conn.receive_nowait() == b"one"
            with pytest.raises(trio.WouldBlock):
                conn.receive_nowait()
            await trio.sleep_until(1.0)
            assert conn.closed is not None
            assert conn.receive_nowait() == b"two"
            with pytest.raises(ConnectionClosed) as raised:
                conn.receive_nowait()
    assert (raised.value.code, raised.value.reason, raised.value.by_peer) == (
        4003,
        "that was all",
        True,
    )


async def test_take_unsent_hands_back_what_was_never_written(autojump_clock: MockClock) -> None:
    """While the connection is live take_unsent() refuses; once it has ended
    it returns the messages still queued (never written), oldest first, and
    leaves the queue empty. Here our write of the first message is held up
    when the peer's CLOSE ends the connection, so the two after it are left."""
    stream, peer = stalling_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(0.5)
        await peer.send_close(CloseCode.GOING_AWAY, "draining")
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            with pytest.raises(
                RuntimeError, match=r"^take_unsent\(\) is for a connection that has ended$"
            ):
                conn.take_unsent()
            stream.stall_next_write(after=4)
            conn.send_nowait(b"first")
            await trio.sleep(0.25)  # its write is held up
            conn.send_nowait(b"second")
            conn.send_nowait(b"third")
            closed = await conn.wait_closed()
            assert trio.current_time() == 0.5
            assert conn.take_unsent() == [b"second", b"third"]
            assert conn.take_unsent() == []
            stream.resume.set()
    assert (closed.code, closed.by_peer) == (CloseCode.GOING_AWAY, True)
    # Only the first message reached the peer, then our answer to its CLOSE.
    assert [frame.payload for frame in peer.of_type(FrameType.DATA)] == [b"first"]
    assert [frame.close_code for frame in peer.of_type(FrameType.CLOSE)] == [CloseCode.GOING_AWAY]


# -- waiting for the end ---------------------------------------------------------------


async def test_a_cancelled_wait_closed_leaves_no_waiter_behind(autojump_clock: MockClock) -> None:
    """After a wait_closed() is cancelled, a later one still returns when the
    connection ends (at that moment, with how it ended), and one after the
    end returns at once."""
    stream, peer = stream_and_peer()
    ends: list[tuple[float, int]] = []

    async def wait_for_the_end(conn: Connection) -> None:
        closed = await conn.wait_closed()
        ends.append((trio.current_time(), closed.code))

    with trio.fail_after(VIRTUAL_BOUND):
        async with served_connection(stream, peer, config=CONFIG) as conn:
            with trio.move_on_after(0.5) as scope:
                await conn.wait_closed()
            assert scope.cancelled_caught
            assert trio.current_time() == 0.5
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_the_end, conn)
                await trio.sleep(0.25)
                assert ends == []
                conn.close_nowait()
            assert ends == [(0.75, CloseCode.NORMAL)]
            closed = await conn.wait_closed()
            assert (closed.code, trio.current_time()) == (CloseCode.NORMAL, 0.75)


async def test_every_waiter_for_the_end_returns(autojump_clock: MockClock) -> None:
    """Two wait_closed() calls in two tasks and an aclose() in a third all
    return when the connection ends, with the same outcome."""
    stream, peer = stream_and_peer()
    ends: list[tuple[str, float, int]] = []

    async def wait_for_the_end(conn: Connection, name: str) -> None:
        closed = await conn.wait_closed()
        ends.append((name, trio.current_time(), closed.code))

    with trio.fail_after(VIRTUAL_BOUND):
        async with (
            served_connection(stream, peer, config=CONFIG) as conn,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(wait_for_the_end, conn, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait_for_the_end, conn, "second")
            await trio.sleep(0.25)
            await conn.aclose()
            assert trio.current_time() == 0.25
    assert sorted(ends) == [
        ("first", 0.25, CloseCode.NORMAL),
        ("second", 0.25, CloseCode.NORMAL),
    ]


async def test_cancelling_some_waiters_for_the_end_leaves_the_others_waiting(
    autojump_clock: MockClock,
) -> None:
    """The first waiter (kept on its own) and a later one (in the lot) are
    cancelled; the others, including one that comes after the cancellations,
    return at the end, and the cancelled ones never do."""
    stream, peer = stream_and_peer()
    ends: list[tuple[str, float]] = []
    cancelled: list[str] = []

    async def wait_for_the_end(conn: Connection, name: str, scope: trio.CancelScope) -> None:
        with scope:
            await conn.wait_closed()
            ends.append((name, trio.current_time()))
        if scope.cancelled_caught:
            cancelled.append(name)

    with trio.fail_after(VIRTUAL_BOUND):
        async with served_connection(stream, peer, config=CONFIG) as conn:
            scopes = {name: trio.CancelScope() for name in ("one", "two", "three", "four")}
            async with trio.open_nursery() as nursery:
                for name in ("one", "two", "three"):
                    nursery.start_soon(wait_for_the_end, conn, name, scopes[name])
                    await trio.testing.wait_all_tasks_blocked()
                await trio.sleep_until(0.25)
                scopes["one"].cancel()
                scopes["three"].cancel()
                await trio.sleep_until(0.5)
                nursery.start_soon(wait_for_the_end, conn, "four", scopes["four"])
                await trio.sleep_until(0.75)
                conn.close_nowait()
            closed = conn.closed
            assert isinstance(closed, ConnectionClosed)
            assert closed.code == CloseCode.NORMAL
    assert sorted(cancelled) == ["one", "three"]
    assert sorted(ends) == [("four", 0.75), ("two", 0.75)]


# -- how an ending surfaces ------------------------------------------------------------


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
    """A reset under the reader is a broken connection that the peer's side
    ended (1006, ``by_peer``). The core never sees it, so the connection tells
    the listeners itself, with a ConnectionEnded that says the same (not clean)."""
    stream, peer = stream_and_peer()
    heard: list[Event] = []

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(1.25)
        stream.break_now()
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(BrokenConnection) as raised:
            async with open_stream_connection(
                stream, config=CONFIG, listeners=[lambda conn, event: heard.append(event)]
            ):
                await trio.sleep_forever()
        assert trio.current_time() == 1.25
    assert raised.value.code == CloseCode.ABNORMAL_CLOSURE
    assert raised.value.by_peer is True
    assert raised.value.reason.startswith("connection lost: ")
    assert isinstance(raised.value.__cause__, trio.BrokenResourceError)
    assert stream.closed
    assert heard[-1] == ConnectionEnded(
        CloseCode.ABNORMAL_CLOSURE, raised.value.reason, by_peer=True, clean=False
    )
    assert [type(event) for event in heard].count(ConnectionEnded) == 1


async def test_a_write_that_makes_no_progress_is_a_heartbeat_timeout(
    autojump_clock: MockClock,
) -> None:
    """A write that has not finished after the write timeout means the peer
    stopped reading: the block is cancelled at that moment and raises a
    HeartbeatTimeout (1011) of our own, which says so."""
    stream, peer = stalling_stream_and_peer()

    async def body(conn: Connection) -> None:
        await trio.sleep(0.25)
        stream.stall_next_write(after=4)  # and it never resumes
        await conn.send(b"never read")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream, body, config=CONFIG, options=ConnectionOptions(write_timeout=0.5)
            )
        assert trio.current_time() == 0.75
    assert (raised.value.code, raised.value.reason, raised.value.by_peer) == (
        CloseCode.HEARTBEAT_TIMEOUT,
        "write timeout: the peer stopped reading",
        False,
    )
    assert stream.closed


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


async def test_a_connection_cut_off_by_a_shared_budget_lets_go_of_its_bytes_at_once(
    autojump_clock: MockClock,
) -> None:
    """Two connections share a budget of 100 bytes. One holds 60 received
    bytes its application never takes; the other queues 50 to send, which is
    over: the hoarder, holding more, is cut off there and then (CLOSE 1013,
    raised from its block) and its 60 bytes are let go at once, not when its
    block has unwound, so the sender's next 40 bytes fit and it stays open.
    What a connection still holds when it ends is let go too."""
    budget = BufferBudget(100)
    options = ConnectionOptions(budget=budget)
    hoarder_stream, hoarder_peer = stream_and_peer()
    stream, peer = stream_and_peer()
    hoarders: list[Connection] = []
    raised: list[ConnectionClosed] = []

    async def hoarder_script() -> None:
        await hoarder_peer.handshake()
        await hoarder_peer.send_data(bytes(60))
        await hoarder_peer.drain()

    async def hoard(conn: Connection) -> None:
        hoarders.append(conn)
        await trio.sleep_forever()  # never takes what it received

    async def run_hoarder() -> None:
        try:
            await run_body(hoarder_stream, hoard, config=CONFIG, options=options)
        except ConnectionClosed as exc:
            raised.append(exc)

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hoarder_script)
            nursery.start_soon(run_hoarder)
            async with served_connection(stream, peer, config=CONFIG, options=options) as conn:
                await trio.sleep(0.25)
                [hoarder] = hoarders
                assert (budget.used, budget.holding(hoarder)) == (60, 60)
                conn.send_nowait(bytes(50))  # 110 bytes: over
                assert (budget.used, budget.holding(hoarder), budget.holding(conn)) == (50, 0, 50)
                closed = hoarder.closed
                assert closed is not None
                assert (type(closed), closed.code, closed.reason, closed.by_peer) == (
                    ConnectionClosed,
                    CloseCode.TRY_AGAIN_LATER,
                    "buffer budget exceeded",
                    False,
                )
                conn.send_nowait(bytes(40))  # 90 bytes: room
                assert budget.used == 90
                assert await conn.receive() == bytes(50)  # the echo; the other one is left
                await trio.sleep(0.25)
                assert conn.closed is None
                assert (budget.used, budget.holding(conn)) == (40, 40)
    [exc] = raised
    assert (type(exc), exc.code, exc.by_peer) == (
        ConnectionClosed,
        CloseCode.TRY_AGAIN_LATER,
        False,
    )
    # The hoarder's CLOSE went out as it was cut off; it never got to read its DATA.
    assert [
        (frame.at, frame.close_code, frame.close_reason)
        for frame in hoarder_peer.of_type(FrameType.CLOSE)
    ] == [(0.25, CloseCode.TRY_AGAIN_LATER, "buffer budget exceeded")]
    assert hoarder_stream.closed
    # Both ended: the 40 bytes left unreceived were let go when the block was left.
    assert (budget.used, budget.holding(conn)) == (0, 0)


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


# -- leaving the block -----------------------------------------------------------------


async def test_a_block_that_raises_sends_1001_naming_the_error_ahead_of_the_queue(
    autojump_clock: MockClock,
) -> None:
    """The block raised: our CLOSE says 1001 with the exception's type as the
    reason and jumps the send queue (DATA queued just before is dropped, not
    flushed), and the caller gets its own exception back."""
    stream, peer = stream_and_peer()

    async def body(conn: Connection) -> None:
        await trio.sleep(0.25)
        conn.send_nowait(b"queued, never written")
        raise KeyError("the application's own")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_serve, peer)
        with pytest.raises(KeyError, match="the application's own"):
            await run_body(stream, body, config=CONFIG)
    assert [
        (frame.at, frame.type, frame.close_code, frame.close_reason)
        for frame in peer.frames[1:]
        if frame.type is not FrameType.PING
    ] == [(0.25, FrameType.CLOSE, CloseCode.GOING_AWAY, "KeyError")]
    assert peer.of_type(FrameType.DATA) == []
    assert stream.closed


async def test_a_block_cancelled_from_outside_says_goodbye_with_1001_cancelled(
    autojump_clock: MockClock,
) -> None:
    """Cancelled from outside while live, the connection does not wait: its
    CLOSE says 1001 "cancelled", and it records that it ended so, by us, as
    an ending and not a failure."""
    stream, peer = stream_and_peer()
    conns: list[Connection] = []

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)  # never answers our CLOSE
        with trio.move_on_after(0.5):
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 0.5  # no wait for an answer
    [conn] = conns
    closed = conn.closed
    assert closed is not None
    assert (type(closed), closed.code, closed.reason, closed.by_peer) == (
        ConnectionClosed,
        CloseCode.GOING_AWAY,
        "cancelled",
        False,
    )
    [frame] = peer.of_type(FrameType.CLOSE)
    assert (frame.at, frame.close_code, frame.close_reason) == (
        0.5,
        CloseCode.GOING_AWAY,
        "cancelled",
    )
    assert stream.closed


async def test_after_a_protocol_error_we_linger_until_the_peer_hangs_up(
    autojump_clock: MockClock,
) -> None:
    """After our CLOSE for the peer's protocol error we do not close the
    stream at once (a reset could destroy the CLOSE unread): we wait for the
    peer's end-of-file, here sent a little after it read our CLOSE, and only
    then close and leave."""
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(1.5)
        await peer.send(b"\xff" * 6)
        while (frame := await peer.receive_frame()) is not None:
            if frame.type is FrameType.CLOSE:
                break
        await trio.sleep(0.0625)
        theirs = peer.stream
        assert isinstance(theirs, trio.abc.HalfCloseableStream)
        await theirs.send_eof()
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            await run_body(stream, wait_forever, config=CONFIG)
        assert trio.current_time() == 1.5625
    assert raised.value.code == CloseCode.PROTOCOL_ERROR
    assert [frame.close_code for frame in peer.of_type(FrameType.CLOSE)] == [
        CloseCode.PROTOCOL_ERROR
    ]
    assert peer.eof_at == 1.5625
    assert stream.closed


async def test_the_cause_of_an_ending_keeps_its_traceback_but_not_the_variables(
    autojump_clock: MockClock,
) -> None:
    """The cause of a protocol error was raised in our tasks: it keeps its
    traceback for the record, but the finished frames are cleared of their
    variables, which would keep the connection and its buffers alive."""
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await peer.send(b"\xff" * 6)
        await hang_up_on_close(peer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            await run_body(stream, wait_forever, config=CONFIG)
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteProtocolError)
    frames = [frame for frame, _ in traceback.walk_tb(cause.__traceback__)]
    assert frames
    assert [len(frame.f_locals) for frame in frames] == [0] * len(frames)


async def test_the_reader_task_has_a_name_of_its_own(autojump_clock: MockClock) -> None:
    """One name for every connection's reader task, to find it in a task tree."""
    stream, peer = stream_and_peer()
    async with served_connection(stream, peer, config=CONFIG):
        assert task_names().count("trio_heartbeat.Connection.reader") == 1


# -- the watchdog deadline -------------------------------------------------------------


async def test_the_watchdog_deadline_is_the_verdict_then_the_close_timeout_then_none(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stream_and_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)  # reads our CLOSE, never answers
        async with open_stream_connection(stream, config=CONFIG) as conn:
            assert conn.watchdog_deadline == 3.0  # the silent peer's verdict
            await trio.sleep(0.5)
            conn.close_nowait(flush=False)
            assert conn.watchdog_deadline == 0.5 + CONFIG.close_timeout
            closed = await conn.wait_closed()
            assert trio.current_time() == 0.5 + CONFIG.close_timeout
            assert conn.watchdog_deadline == math.inf  # ended: nothing left to watch
    assert (type(closed), closed.code, closed.by_peer) == (
        ConnectionClosed,
        CloseCode.NORMAL,
        False,
    )


# -- listeners added later, and waiting for the peer's health ---------------------------


async def peer_pinging_with(peer: ScriptedPeer, statuses: list[HealthStatus]) -> None:
    """The client peer's handshake, one PING a second with each status, then serve."""
    await peer.handshake()
    for second, status in enumerate(statuses, start=1):
        await trio.sleep_until(float(second))
        await peer.send_ping(status=status)
    await peer.serve()


async def test_wait_peer_health_returns_when_a_ping_says_so(autojump_clock: MockClock) -> None:
    statuses = [HealthStatus.SERVING, HealthStatus.DEGRADED, HealthStatus.NOT_SERVING]

    async def body(conn: Connection) -> None:
        assert await conn.wait_peer_health(HealthStatus.SERVING) is HealthStatus.SERVING
        assert trio.current_time() == 0.0  # its HELLO said so already
        found = await conn.wait_peer_health(HealthStatus.NOT_SERVING, HealthStatus.DEGRADED)
        assert (trio.current_time(), found) == (2.0, HealthStatus.DEGRADED)
        assert await conn.wait_peer_health(HealthStatus.NOT_SERVING) is HealthStatus.NOT_SERVING
        assert trio.current_time() == 3.0
        assert conn._listeners == ()  # every waiter's listener is gone
        with pytest.raises(ValueError, match="at least one status"):
            await conn.wait_peer_health()

    stream, peer = stream_and_peer(Role.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer_pinging_with, peer, statuses)
        await run_body(stream, body, role=Role.SERVER, config=CONFIG)


async def test_wait_peer_health_raises_once_the_connection_has_ended(
    autojump_clock: MockClock,
) -> None:
    async def body(conn: Connection) -> None:
        with pytest.raises(ConnectionClosed) as info:
            await conn.wait_peer_health(HealthStatus.NOT_SERVING)
        assert trio.current_time() == 1.0
        assert info.value.code == CloseCode.NORMAL
        with pytest.raises(ConnectionClosed):
            await conn.wait_peer_health(HealthStatus.NOT_SERVING)  # and at once, later

    async def close_at_one(peer: ScriptedPeer) -> None:
        await peer.handshake()
        await trio.sleep_until(1.0)
        await peer.send_close()
        await peer.drain()

    stream, peer = stream_and_peer(Role.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_at_one, peer)
        await run_body(stream, body, role=Role.SERVER, config=CONFIG)


async def test_a_listener_added_later_hears_what_comes_next_on_that_connection_only(
    autojump_clock: MockClock,
) -> None:
    heard: list[tuple[float, str]] = []

    def listener(conn: Connection, event: Event) -> None:
        heard.append((trio.current_time(), type(event).__name__))

    shared: list[Any] = []  # the listeners a server gives every connection

    async with connection_pair(server_listeners=shared) as pair:
        await trio.sleep(0.5)
        pair.server.add_listener(listener)
        await trio.sleep(1.0)  # the client's PING at 0.9
        pair.server.remove_listener(listener)
        with pytest.raises(ValueError, match="not in tuple"):
            pair.server.remove_listener(listener)
        await trio.sleep(1.0)
        assert pair.client._listeners == ()
    assert shared == []  # a new tuple each time: nothing added to what was passed in
    assert heard == [(0.9, "PingReceived")]
