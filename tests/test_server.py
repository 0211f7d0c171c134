"""The server in virtual time: ``Server.handle_stream`` over memory streams.

Every peer here is either the real client runtime or a :class:`RawPeer` that
does exactly what the test says, so every ending (capacity, handshake timeout,
a silent peer, a peer that stops reading, drain, takeover) happens at a moment
we can assert exactly. Real sockets are in ``test_tcp.py``.
"""

from __future__ import annotations

import errno
import gc
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager, suppress
from functools import partial
from types import SimpleNamespace
from typing import cast

import pytest
import trio
import trio.testing
import trustme
from helpers import RawPeer, client_hello, echo

import trio_heartbeat as thb
from trio_heartbeat import (
    CloseCode,
    Config,
    Connection,
    ConnectionOptions,
    Event,
    FrameType,
    HandshakeComplete,
    HealthStatus,
    KeepaliveOptions,
    Role,
    Server,
    open_stream_connection,
)
from trio_heartbeat._frames import decode_close, encode_close, encode_data, encode_ping

#: One second between heartbeats, three of silence; handshakes and closes get
#: bounds of their own so that each ending has its own moment.
CONFIG = Config(interval=1.0, timeout=3.0, handshake_timeout=2.0, close_timeout=1.0)


def attach(
    nursery: trio.Nursery,
    server: Server,
    address: str | None = None,
    ended: list[float] | None = None,
    *,
    pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = trio.testing.memory_stream_pair,
) -> trio.abc.Stream:
    """Serve one end of a fresh stream pair; return the other. ``ended`` gets the
    time ``handle_stream`` returned."""
    client_end, server_end = pair()

    async def serve() -> None:
        await server.handle_stream(server_end, address)
        if ended is not None:
            ended.append(trio.current_time())

    nursery.start_soon(serve)
    return client_end


def socket_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Two ends of a connected Unix socket pair: real kernel buffers, real backpressure."""
    one, other = trio.socket.socketpair()
    return trio.SocketStream(one), trio.SocketStream(other)


def close_codes(peer: RawPeer) -> list[int]:
    return [decode_close(f.payload)[0] for f in peer.frames if f.type is FrameType.CLOSE]


def frame_types(peer: RawPeer) -> list[FrameType]:
    return [frame.type for frame in peer.frames]


# -- the happy path and the counters ------------------------------------------------


async def test_handle_stream_serves_a_client_and_counts_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    ended: list[float] = []
    async with trio.open_nursery() as nursery:
        stream = attach(nursery, server, "memory:1", ended)
        async with open_stream_connection(stream, role=Role.CLIENT) as conn:
            await conn.send(b"hello")
            assert await conn.receive() == b"hello"
            stats = server.statistics()
            assert (stats.active, stats.handshaking, stats.accepted) == (1, 0, 1)
            assert stats.completed_handshakes == 1
            assert [peer.address for peer in server.registry] == ["memory:1"]
            await trio.sleep(5)  # heartbeats keep an idle connection alive
            await conn.send(b"later")
            assert await conn.receive() == b"later"
    assert ended == [5.0]
    stats = server.statistics()
    assert (stats.active, stats.refused) == (0, 0)
    assert stats.closed_by_code == {CloseCode.NORMAL: 1}
    assert len(server.registry) == 0


async def test_handler_that_returns_closes_with_1000(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def greet_and_leave(conn: Connection) -> None:
        await conn.send(b"bye")

    server = Server(greet_and_leave, config=CONFIG)
    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server))
        await peer.handshake()
        assert await peer.read_close() == CloseCode.NORMAL
        # The verdict PING on our HELLO (answered by read_close), then the handler's words.
        assert frame_types(peer) == [
            FrameType.HELLO,
            FrameType.PING,
            FrameType.DATA,
            FrameType.CLOSE,
        ]
        await peer.send(encode_close(CloseCode.NORMAL))
        assert await peer.read_until_end() == []
    assert server.statistics().closed_by_code == {CloseCode.NORMAL: 1}
    assert trio.current_time() == 0


async def test_a_failing_handler_closes_its_own_connection_with_1001_only(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(echo, config=CONFIG)
    async with trio.open_nursery() as nursery:
        bystander_stream = attach(nursery, server, "memory:bystander")
        async with open_stream_connection(bystander_stream, role=Role.CLIENT) as bystander:
            peer = RawPeer(attach(nursery, server, "memory:failing"))
            await peer.handshake()
            await peer.send(encode_data(b"raise"))
            assert await peer.read_close() == CloseCode.GOING_AWAY
            await bystander.send(b"unharmed")
            assert await bystander.receive() == b"unharmed"
            # Gone at once: a failed handler does not wait for the peer's answer.
            await server.registry.wait_until(lambda registry: len(registry) == 1)
            assert [info.address for info in server.registry] == ["memory:bystander"]
            assert trio.current_time() == 0
    assert "memory:failing: handler failed" in caplog.messages
    assert server.statistics().closed_by_code == {CloseCode.GOING_AWAY: 1, CloseCode.NORMAL: 1}


async def test_event_listeners_see_every_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[tuple[str | None, str]] = []

    def listener(conn: Connection, event: Event) -> None:
        seen.append((conn.remote_address, type(event).__name__))

    server = Server(echo, config=CONFIG, listeners=[listener])
    async with trio.open_nursery() as nursery:
        stream = attach(nursery, server, "memory:1")
        async with open_stream_connection(stream, role=Role.CLIENT):
            pass
    # The client's block opens on the server's verdict PING, whose PONG it sends
    # before the CLOSE of the block it leaves at once.
    assert seen == [
        ("memory:1", "HandshakeComplete"),
        ("memory:1", "PongReceived"),
        ("memory:1", "ConnectionEnded"),
    ]


# -- limits --------------------------------------------------------------------------


async def test_at_capacity_a_newcomer_gets_1013_instead_of_hello(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG, max_connections=1)
    async with trio.open_nursery() as nursery:
        first = RawPeer(attach(nursery, server))
        await first.read_hello()  # counted from accept on, before its HELLO
        assert server.statistics().handshaking == 1
        refused = RawPeer(attach(nursery, server))
        assert await refused.read_until_end() != []
        assert close_codes(refused) == [CloseCode.TRY_AGAIN_LATER]
        assert frame_types(refused) == [FrameType.CLOSE]
        assert decode_close(refused.frames[0].payload)[1] == "server at capacity"
        stats = server.statistics()
        assert (stats.accepted, stats.refused, stats.active) == (2, 1, 1)
        await first.send(client_hello())
        await first.send(encode_close(CloseCode.NORMAL))
        assert await first.read_close() == CloseCode.NORMAL
    # The slot is free again.
    async with trio.open_nursery() as nursery:
        again = RawPeer(attach(nursery, server))
        hello = await again.read_hello()
        assert hello.role is Role.SERVER
        await again.aclose()
    assert server.statistics().active == 0


async def test_a_refusal_nobody_reads_is_abandoned_after_one_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG, max_connections=1)
    ended: list[float] = []
    async with trio.open_nursery() as nursery:
        first = RawPeer(attach(nursery, server))
        await first.read_hello()
        # Lockstep: send_all waits for a reader that never comes.
        attach(nursery, server, ended=ended, pair=trio.testing.lockstep_stream_pair)
        await trio.sleep(5)
        assert ended == [1.0]
        assert server.statistics().refused == 1
        nursery.cancel_scope.cancel()
    assert server.statistics().active == 0


async def test_handshake_timeout_closes_with_1011_at_the_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    ended: list[float] = []
    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server, ended=ended))
        await peer.read_hello()
        assert await peer.read_close(answer_pings=False) == CloseCode.HEARTBEAT_TIMEOUT
        assert trio.current_time() == CONFIG.handshake_timeout
        assert peer.close_reason == "handshake timeout"
        assert await peer.read_until_end() == []
    assert ended == [2.0]
    stats = server.statistics()
    assert (stats.active, stats.handshaking, stats.completed_handshakes) == (0, 0, 0)
    assert stats.closed_by_code == {CloseCode.HEARTBEAT_TIMEOUT: 1}


# -- peers that stop taking part ----------------------------------------------------------


async def test_a_blackholed_peer_is_cut_off_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    ended: list[float] = []
    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server, ended=ended))
        await peer.handshake()
        # From here on the peer neither reads nor writes, and never closes.
        await server.registry.wait_until(lambda registry: len(registry) == 1)
        await server.registry.wait_until(lambda registry: len(registry) == 0)
        assert trio.current_time() == CONFIG.timeout
    assert ended == [3.0]
    frames = await peer.read_until_end()
    # Our PINGs went out, the verdict at once and then at the send interval (at
    # 0, 1 and 2), until the peer was given up.
    assert [frame.type for frame in frames] == [FrameType.PING] * 3 + [FrameType.CLOSE]
    assert close_codes(peer) == [CloseCode.HEARTBEAT_TIMEOUT]
    assert server.statistics().closed_by_code == {CloseCode.HEARTBEAT_TIMEOUT: 1}


@pytest.mark.parametrize(("write_timeout", "cut_at"), [(None, 3.0), (0.25, 0.25)])
async def test_a_peer_that_pings_but_never_reads_is_cut_off_by_the_write_timeout(
    autojump_clock: trio.testing.MockClock, write_timeout: float | None, cut_at: float
) -> None:
    server = Server(echo, config=CONFIG, options=ConnectionOptions(write_timeout=write_timeout))
    ended: list[float] = []

    async def ping_forever(peer: RawPeer) -> None:
        # One PING every 0.5 s: as often as the rate rule allows, so the peer
        # is never silent and never misbehaves; it only stops reading.
        with trio.move_on_after(10):
            while True:
                await trio.sleep(0.5)
                await peer.send(encode_ping(bytes(8), HealthStatus.SERVING))

    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server, ended=ended, pair=trio.testing.lockstep_stream_pair))
        await peer.handshake()
        with suppress(trio.BrokenResourceError):  # the server hung up on us
            await ping_forever(peer)
    # The server's first write after the handshake, its verdict PING at 0, never
    # got through (nor did the PONGs queued behind it).
    assert ended == [cut_at]
    assert len(server.registry) == 0
    stats = server.statistics()
    assert stats.active == 0
    assert stats.closed_by_code == {CloseCode.HEARTBEAT_TIMEOUT: 1}


async def test_a_peer_that_floods_data_but_never_reads_does_not_pin_the_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    ended: list[float] = []
    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server, ended=ended, pair=trio.testing.lockstep_stream_pair))
        await peer.handshake()
        flood = encode_data(b"x" * 1000) * 1000
        with pytest.raises(trio.BrokenResourceError):
            await peer.send(flood)
        # The echo handler's first reply blocked at once; nothing else could
        # move: the inbound queue filled, reading stopped, and the write
        # timeout alone ended it.
        assert trio.current_time() == CONFIG.timeout
    assert ended == [CONFIG.timeout]
    assert server.statistics().active == 0
    assert len(server.registry) == 0


async def test_a_flood_past_the_buffer_budget_is_cut_off_with_1013_and_others_are_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The server bounds what all its connections buffer together (#10).

    The flooder never reads, so its echoes and its input pile up; long before
    any timeout (the write timeout is 100 s here) the budget runs out, and
    the connection that holds the most is cut off with 1013 at once. (A real
    socket pair: the server's reader must keep reading while its writes wait.)
    """
    server = Server(
        echo,
        config=CONFIG,
        options=ConnectionOptions(write_timeout=100.0),
        max_buffered_bytes=50_000,
    )
    ended: list[float] = []
    async with trio.open_nursery() as nursery:
        good = RawPeer(attach(nursery, server, "memory:good"))
        await good.handshake()
        flooder = RawPeer(attach(nursery, server, "socketpair:flooder", ended, pair=socket_pair))
        await flooder.handshake()
        with pytest.raises(trio.BrokenResourceError):
            await flooder.send(encode_data(b"x" * 1000) * 1000)
        assert trio.current_time() == 0.0  # cut at once, not at a timeout
        await flooder.aclose()
        await good.send(encode_data(b"still served"))
        while (frame := await good.receive_frame()) is not None:
            if frame.type is FrameType.DATA:
                break
        assert frame is not None
        assert frame.payload == b"still served"
        assert ended == [0.0]
        await good.send(encode_close(CloseCode.NORMAL, ""))
    stats = server.statistics()
    assert stats.closed_by_code == {CloseCode.TRY_AGAIN_LATER: 1, CloseCode.NORMAL: 1}
    assert close_codes(flooder) in ([], [CloseCode.TRY_AGAIN_LATER])  # it never read
    budget = server.options.budget
    assert budget is not None
    assert (budget.limit, budget.used) == (50_000, 0)  # all released


async def test_a_frame_that_never_finishes_arriving_counts_against_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """All of a 100 KB DATA frame but its last byte: held by the decoder, counted, cut (#10).

    Before, a peer could make the server hold up to max_frame for free, and
    thousands of peers could hold gigabytes outside any budget.
    """
    server = Server(echo, config=CONFIG, max_buffered_bytes=50_000)
    ended: list[float] = []
    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server, "memory:teaser", ended))
        await peer.handshake()
        await trio.sleep(0.25)
        await peer.send(encode_data(bytes(100_000))[:-1])
        # (Answering PINGs would finish the frame: a PONG's first byte is its last.)
        assert await peer.read_close(answer_pings=False) == CloseCode.TRY_AGAIN_LATER
        assert peer.close_reason == "buffer budget exceeded"
    assert ended == [0.25]
    budget = server.options.budget
    assert budget is not None
    assert budget.used == 0


async def test_serve_tcp_listens_on_loopback_unless_told_otherwise() -> None:
    """One safe default, the same as the command line's (#10: it was every interface)."""
    server = Server(echo, config=CONFIG)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_tcp, 0)
        assert [listener.socket.getsockname()[0] for listener in server.listeners] == ["127.0.0.1"]
        nursery.cancel_scope.cancel()


# -- identity and health ---------------------------------------------------------------------


async def test_a_second_connection_with_the_same_id_replaces_the_first_with_4000(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    async with trio.open_nursery() as nursery:
        older = RawPeer(attach(nursery, server, "memory:older"))
        await older.handshake(instance_id="node-1")
        await server.registry.wait_until(lambda registry: "node-1" in registry)
        await trio.sleep(0.5)
        newer_stream = attach(nursery, server, "memory:newer")
        config = Config(instance_id="node-1")
        async with open_stream_connection(newer_stream, role=Role.CLIENT, config=config) as newer:
            assert await older.read_close() == CloseCode.REPLACED
            assert trio.current_time() == 0.5
            assert older.close_reason == "replaced by a newer connection"
            info = server.registry.get("node-1")
            assert info is not None
            assert info.address == "memory:newer"
            # The older one answers and goes; the newer keeps the id.
            await older.send(encode_close(CloseCode.REPLACED))
            assert await older.read_until_end() == []
            await server.registry.wait_until(lambda registry: len(registry) == 1)
            assert server.registry.connection("node-1") is not None
            info = server.registry.get("node-1")
            assert info is not None
            assert info.address == "memory:newer"
            await newer.send(b"mine now")
            assert await newer.receive() == b"mine now"
    assert server.statistics().closed_by_code == {CloseCode.REPLACED: 1, CloseCode.NORMAL: 1}


async def test_empty_ids_never_replace_each_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    async with trio.open_nursery() as nursery:
        first = RawPeer(attach(nursery, server))
        second = RawPeer(attach(nursery, server))
        await first.handshake()
        await second.handshake()
        await server.registry.wait_until(lambda registry: len(registry) == 2)
        assert "" not in server.registry
        nursery.cancel_scope.cancel()
    assert close_codes(first) == close_codes(second) == []


async def test_set_health_reaches_connected_peers_at_once_and_later_ones_in_hello(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server))
        hello = await peer.handshake()
        assert hello.status is HealthStatus.SERVING
        verdict = await peer.receive_frame()
        assert verdict is not None
        assert verdict.type is FrameType.PING
        assert HealthStatus(verdict.payload[8]) is HealthStatus.SERVING
        # Past the rate rule's half interval after the verdict (and before the
        # next heartbeat, due at 1.0), a change of health goes out at once.
        await trio.sleep(0.75)
        server.set_health(HealthStatus.DEGRADED)
        frame = await peer.receive_frame()
        assert frame is not None
        assert frame.type is FrameType.PING
        assert HealthStatus(frame.payload[8]) is HealthStatus.DEGRADED
        assert trio.current_time() == 0.75
        later = RawPeer(attach(nursery, server))
        assert (await later.read_hello()).status is HealthStatus.DEGRADED
        nursery.cancel_scope.cancel()


async def test_set_health_during_a_handshake_reaches_that_peer_once_it_is_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Our HELLO went out with the old status, and the peer is not in the
    registry yet: the change still reaches it, as soon as the rate rule lets it."""
    server = Server(echo, config=CONFIG)
    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server))
        assert (await peer.read_hello()).status is HealthStatus.SERVING
        await trio.sleep(0.25)
        server.set_health(HealthStatus.NOT_SERVING)
        assert server.registry.connections() == []  # the loop over the peers missed it
        await trio.sleep(0.25)
        await peer.send(client_hello())
        pings = []
        for _ in range(2):
            frame = await peer.receive_frame()
            assert frame is not None
            pings.append((trio.current_time(), frame.type, HealthStatus(frame.payload[8])))
        # The verdict was built with the HELLO's status; the change follows once
        # the rate rule allows it (half an interval later) and its eighth of margin.
        assert pings == [
            (0.5, FrameType.PING, HealthStatus.SERVING),
            (1.125, FrameType.PING, HealthStatus.NOT_SERVING),
        ]
        (conn,) = server.registry.connections()
        assert conn.health is HealthStatus.NOT_SERVING
        nursery.cancel_scope.cancel()


# -- draining ----------------------------------------------------------------------------


async def test_drain_says_1001_to_everyone_and_cancels_a_peer_that_never_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    seen: list[tuple[int, float]] = []

    async def client(stream: trio.abc.Stream) -> None:
        async with open_stream_connection(stream, role=Role.CLIENT) as conn:
            async for _ in conn:
                pass  # iteration ends quietly on 1001
            closed = conn.closed
            assert closed is not None
            seen.append((closed.code, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for number in range(3):
            nursery.start_soon(client, attach(nursery, server, f"memory:{number}"))
        silent = RawPeer(attach(nursery, server, "memory:silent"))
        await silent.handshake()
        await server.registry.wait_until(lambda registry: len(registry) == 4)
        await trio.sleep(1)
        await server.drain(grace=0.5)
        # The well-behaved clients left at once; the silent one was cancelled
        # at the drain bound, well before its own close timeout (1 s).
        assert trio.current_time() == 1.5
        assert server.statistics().active == 0
        assert len(server.registry) == 0
    assert seen == [(CloseCode.GOING_AWAY, 1.0)] * 3
    frames = await silent.read_until_end()
    assert close_codes(silent) == [CloseCode.GOING_AWAY]
    assert frames[-1].type is FrameType.CLOSE
    assert server.draining


async def test_drain_does_not_wait_for_a_handler_whose_connection_has_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler_cancelled_at: list[float] = []

    async def deaf(conn: Connection) -> None:
        try:
            await trio.sleep_forever()  # never looks at its connection
        finally:
            handler_cancelled_at.append(trio.current_time())

    server = Server(deaf, config=CONFIG)

    async def client(stream: trio.abc.Stream) -> None:
        async with open_stream_connection(stream, role=Role.CLIENT) as conn:
            async for _ in conn:
                pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, attach(nursery, server, "memory:deaf"))
        await server.registry.wait_until(lambda registry: len(registry) == 1)
        await trio.sleep(1)
        await server.drain(grace=5.0)
        # The peer answered the CLOSE at once: the drain did not sit out its
        # 5 s bound for a handler that ignores its ended connection.
        assert trio.current_time() == 1.0
        assert server.statistics().active == 0
    assert handler_cancelled_at == [1.0]


async def test_after_drain_a_new_stream_is_refused_with_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    await server.drain()
    assert trio.current_time() == 0  # nothing to wait for
    await server.drain()  # safe to repeat
    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server))
        await peer.read_until_end()
    assert close_codes(peer) == [CloseCode.GOING_AWAY]
    assert frame_types(peer) == [FrameType.CLOSE]
    assert server.statistics().refused == 1


async def test_a_handshake_that_completes_during_drain_is_closed_with_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server))
        await peer.read_hello()
        nursery.start_soon(server.drain)
        await trio.sleep(0.5)
        await peer.send(client_hello())
        assert await peer.read_close() == CloseCode.GOING_AWAY
        assert peer.close_reason == "server draining"
        assert trio.current_time() == 0.5
        await peer.send(encode_close(CloseCode.GOING_AWAY))
    assert server.statistics().active == 0
    assert trio.current_time() == 0.5


# -- accepting ---------------------------------------------------------------------------


class ScriptedListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose ``accept`` follows a script: raise, or hand over a stream."""

    def __init__(self, script: list[Callable[[], trio.abc.Stream]]) -> None:
        self.script = script
        self.closed = False
        self.socket = SimpleNamespace(getsockname=lambda: ("scripted", 7))

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if not self.script:
            await trio.sleep_forever()
        return self.script.pop(0)()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


def raising(code: int) -> Callable[[], trio.abc.Stream]:
    def step() -> trio.abc.Stream:
        raise OSError(code, "scripted")

    return step


async def serve_scripted(
    server: Server, listener: ScriptedListener, body: Callable[[], Awaitable[None]]
) -> None:
    async with trio.open_nursery() as nursery:
        started = await nursery.start(
            server.serve_listeners, cast(list[trio.SocketListener], [listener])
        )
        assert started is server
        assert server.port == 7
        await body()
        nursery.cancel_scope.cancel()
    assert listener.closed


async def test_out_of_file_descriptors_backs_off_and_keeps_accepting(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    listener = ScriptedListener([raising(errno.EMFILE), lambda: server_end])
    server = Server(echo, config=CONFIG, keepalive=None)

    async def body() -> None:
        peer = RawPeer(client_end)
        await peer.read_hello()
        assert trio.current_time() == 0.1

    await serve_scripted(server, listener, body)
    assert "accept failed (EMFILE); retrying in 100 ms" in caplog.messages


async def test_other_accept_errors_end_serving(autojump_clock: trio.testing.MockClock) -> None:
    listener = ScriptedListener([raising(errno.EBADF)])
    server = Server(echo, config=CONFIG)
    # The OSError itself, not an exception group around it.
    with pytest.raises(OSError, match="scripted") as raised:
        await server.serve_listeners(cast(list[trio.SocketListener], [listener]))
    assert raised.value.errno == errno.EBADF
    assert listener.closed


async def test_a_server_that_failed_serves_again_one_that_drained_does_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An accept error ends serving; served again on a new listener (what a service
    supervisor restarting it does), the same server accepts and answers a peer. After a
    drain, serving again accepts nobody and returns at once."""
    server = Server(echo, config=CONFIG, keepalive=None)
    with pytest.raises(OSError, match="scripted"):
        await server.serve_listeners(
            cast(list[trio.SocketListener], [ScriptedListener([raising(errno.EBADF)])])
        )
    client_end, server_end = trio.testing.memory_stream_pair()

    async def body() -> None:
        assert (await RawPeer(client_end).read_hello()).instance_id == CONFIG.instance_id

    await serve_scripted(server, ScriptedListener([lambda: server_end]), body)
    await server.drain()
    again = ScriptedListener([lambda: trio.testing.memory_stream_pair()[1]])
    with trio.fail_after(1):
        await server.serve_listeners(cast(list[trio.SocketListener], [again]))
    assert again.script != []  # never accepted
    assert again.closed


async def test_an_accept_error_with_connections_open_tears_them_down_and_raises_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()

    def fail_later() -> trio.abc.Stream:
        raise OSError(errno.EBADF, "scripted")

    class FailingLater(ScriptedListener):
        async def accept(self) -> trio.abc.Stream:
            if self.script[0] is not fail_later:
                return await super().accept()
            await trio.sleep_until(1.0)  # a connection is up meanwhile
            return await super().accept()

    listener = FailingLater([lambda: server_end, fail_later])
    server = Server(echo, config=CONFIG, keepalive=None)
    peer = RawPeer(client_end)
    codes: list[int] = []

    async def read_close() -> None:
        codes.append(await peer.read_close())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_close)
        with pytest.raises(OSError, match="scripted"):
            await server.serve_listeners(cast(list[trio.SocketListener], [listener]))
        assert trio.current_time() == 1.0
    assert codes == [CloseCode.GOING_AWAY]  # the connection was torn down, and said so
    assert server.statistics().active == 0
    assert listener.closed


class NoKeepaliveSocket:
    def setsockopt(self, level: int, optname: int, value: int, /) -> None:
        raise OSError(errno.ENOPROTOOPT, "no such option here")

    def getsockopt(self, level: int, optname: int, /) -> int:
        return 0

    def getpeername(self) -> tuple[str, int]:
        return ("2001:db8::1", 4000)


class StreamWithSocket(trio.abc.Stream):
    """A memory stream that claims a socket, as an accepted TCP stream would."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.socket = NoKeepaliveSocket()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_keepalive_that_cannot_be_set_is_only_a_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    listener = ScriptedListener([lambda: StreamWithSocket(server_end)])
    server = Server(echo, config=CONFIG)
    assert server.keepalive == KeepaliveOptions.from_heartbeat(CONFIG.interval, CONFIG.timeout)

    async def body() -> None:
        async with open_stream_connection(client_end, role=Role.CLIENT) as conn:
            await conn.send(b"served anyway")
            assert await conn.receive() == b"served anyway"
            assert [info.address for info in server.registry] == ["[2001:db8::1]:4000"]

    with caplog.at_level(logging.WARNING):
        await serve_scripted(server, listener, body)
    assert "could not set TCP keepalive" in caplog.text


# -- small facts -----------------------------------------------------------------------------


def test_constructor_checks_and_defaults() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        Server(echo, max_connections=0)
    server = Server(echo, keepalive=None)
    assert server.keepalive is None
    assert server.config == Config()
    assert not server.draining
    with pytest.raises(RuntimeError, match="not listening"):
        _ = server.port
    explicit = KeepaliveOptions(idle=5, interval=1, count=3)
    assert Server(echo, keepalive=explicit).keepalive is explicit
    assert Server(echo, keepalive=False).keepalive is None


async def test_the_registry_lists_handshaken_connections_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    opened: list[HandshakeComplete] = []

    def listener(conn: Connection, event: Event) -> None:
        if isinstance(event, HandshakeComplete):
            opened.append(event)

    server = Server(echo, config=CONFIG, listeners=[listener])
    async with trio.open_nursery() as nursery:
        peer = RawPeer(attach(nursery, server))
        await peer.read_hello()
        await trio.sleep(1)
        assert len(server.registry) == 0
        assert server.statistics().handshaking == 1
        await peer.send(client_hello(instance_id="late"))
        await server.registry.wait_until(lambda registry: "late" in registry)
        assert trio.current_time() == 1
        assert [event.peer.instance_id for event in opened] == ["late"]
        nursery.cancel_scope.cancel()


# -- memory: an ended connection is freed without the collector (real sockets) -------------


GC_CONFIG = thb.Config(interval=0.1, timeout=0.3, close_timeout=0.2, handshake_timeout=0.5)
ROUTES = [
    "orderly",
    "client-cancelled",
    "client-block-error",
    "eof",
    "silent-peer",
    "protocol-error",
    "handler-error",
    "handler-returns",
    "flood-without-reading",
    "handshake-timeout",
    "reconnecting-client",
]


@contextmanager
def collector_disabled() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def run_route(route: str, refs: list[weakref.ref[thb.Connection]]) -> None:
    def remember(conn: thb.Connection, event: thb.Event) -> None:
        if not any(ref() is conn for ref in refs):
            refs.append(weakref.ref(conn))

    async def handler(conn: thb.Connection) -> None:
        if route == "handler-error":
            raise ValueError("the handler's own bug")
        if route == "handler-returns":
            return
        async for message in conn:
            await conn.send(message)

    server = thb.Server(handler, config=GC_CONFIG, listeners=[remember])
    hello = client_hello(interval_ms=100, timeout_ms=300)

    async def client(port: int) -> None:
        def open_it() -> AbstractAsyncContextManager[thb.Connection]:
            return thb.open_connection("127.0.0.1", port, config=GC_CONFIG, listeners=[remember])

        if route == "orderly":
            async with open_it() as conn:
                await conn.send(b"x")
                assert await conn.receive() == b"x"
        elif route == "client-cancelled":
            with trio.move_on_after(0.05):
                async with open_it():
                    await trio.sleep_forever()
        elif route == "client-block-error":
            with pytest.raises(KeyError):
                async with open_it():
                    raise KeyError("the caller's own bug")
        elif route in ("handler-error", "handler-returns"):
            with pytest.raises(thb.ConnectionClosed):
                async with open_it() as conn:
                    await conn.receive()
        elif route == "reconnecting-client":
            async with thb.open_reconnecting_client(
                [f"127.0.0.1:{port}"], config=GC_CONFIG, connection_listeners=[remember]
            ) as rc:
                await rc.send(b"x")
                assert await rc.receive() == b"x"
        else:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                with suppress(trio.BrokenResourceError):  # the server cuts us off
                    if route != "handshake-timeout":
                        await stream.send_all(hello)
                    if route in ("silent-peer", "handshake-timeout"):
                        await trio.sleep(0.6)
                    elif route == "protocol-error":
                        await stream.send_all(b"\x09\x00\x00\x00\x00\x00")
                        await trio.sleep(0.3)
                    elif route == "flood-without-reading":
                        with trio.move_on_after(2.0):
                            while True:
                                await stream.send_all(encode_data(bytes(1 << 19)))

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_tcp, 0, "127.0.0.1")
        await client(server.port)
        with trio.fail_after(10):
            while server.statistics().active:  # noqa: ASYNC110 (no event says "all ended")
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("route", ROUTES)
def test_an_ended_connection_is_freed_without_the_collector(route: str) -> None:
    """Whatever ended it, a connection and its buffers go by reference counting alone (#10).

    With the collector disabled, a weak reference to every Connection on
    both sides (the server's, the client's, the reconnecting client's) must
    be dead once the run is over. Before #10, every route but an orderly
    close kept its connections in a reference cycle until a full collection
    (three rounds of eight flooding peers took a server to 1.5 GB).
    """
    refs: list[weakref.ref[thb.Connection]] = []
    with collector_disabled():
        trio.run(run_route, route, refs)
        alive = [ref() for ref in refs if ref() is not None]
    raw = route in (
        "eof",
        "silent-peer",
        "protocol-error",
        "flood-without-reading",
        "handshake-timeout",
    )
    assert len(refs) == (1 if raw else 2)  # the server's, and our client's unless it is raw bytes
    assert alive == []


# -- what the server logs, one line per fact ---------------------------------------------------


def server_log(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "trio_heartbeat.server"
    ]


async def test_the_server_logs_each_fact_of_a_connection_once_and_exactly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Every line an operator reads: arrivals (with the id when there is one), health
    changes, refusals, takeovers, endings (with the reason when there is one, and who
    closed), the drain bound and the refusals a drain makes."""
    caplog.set_level(logging.INFO, logger="trio_heartbeat.server")
    server = Server(echo, config=CONFIG, max_connections=2)
    registry = server.registry
    async with trio.open_nursery() as nursery:
        named = RawPeer(attach(nursery, server, "memory:a"))
        await named.handshake(instance_id="node")
        anonymous = RawPeer(attach(nursery, server, "memory:b"))
        await anonymous.handshake()
        await registry.wait_until(lambda r: len(r) == 2)
        refused = RawPeer(attach(nursery, server, "memory:c"))
        await refused.read_until_end()
        await named.send(encode_ping(bytes(8), HealthStatus.DEGRADED))
        await registry.wait_changed()  # a health change wakes the registry's waiters
        assert registry.version == 3
        await anonymous.send(encode_close(CloseCode.NORMAL))
        await registry.wait_until(lambda r: len(r) == 1)
        await trio.testing.wait_all_tasks_blocked()  # its task is over: a slot is free
        newer = RawPeer(attach(nursery, server, "memory:d"))
        await newer.handshake(instance_id="node")
        assert await named.read_close() == CloseCode.REPLACED
        await named.send(encode_close(CloseCode.REPLACED))
        await registry.wait_until(lambda r: len(r) == 1)
        await server.drain(grace=0.5)  # the newer peer never answers
        assert trio.current_time() == 0.5
        late = RawPeer(attach(nursery, server, "memory:e"))
        await late.read_until_end()
        assert [decode_close(frame.payload) for frame in late.frames] == [
            (CloseCode.GOING_AWAY, "server draining")
        ]
    assert server_log(caplog) == [
        (logging.INFO, "memory:a: connected, id 'node'"),
        (logging.INFO, "memory:b: connected"),
        (logging.INFO, "memory:c: refused with 1013 (server at capacity)"),
        (logging.INFO, "memory:a: peer 'node' health SERVING -> DEGRADED"),
        (logging.INFO, "memory:b: ended with 1000, closed by the peer"),
        (logging.INFO, "memory:d: connected, id 'node'"),
        (logging.INFO, "memory:a: id 'node' taken over by memory:d"),
        # (read_close answered the replacement's PING with SERVING)
        (logging.INFO, "memory:a: peer 'node' health DEGRADED -> SERVING"),
        (logging.INFO, "memory:a: ended with 4000 (replaced by a newer connection), closed by us"),
        (logging.WARNING, "drain timed out with 1 connection(s) left; cancelling them"),
        (logging.INFO, "memory:d: ended with 1001 (server draining), closed by us"),
        (logging.INFO, "memory:e: refused with 1001 (server draining)"),
    ]


async def test_the_counters_count_every_connection_not_just_the_last(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two peers in their handshakes at once, two that complete it and end with
    the same code, and refusals of both kinds (capacity, and a HELLO whose values
    the server refuses with 1008): every counter adds up, and none goes negative."""
    server = Server(echo, config=CONFIG, max_connections=2)
    async with trio.open_nursery() as nursery:
        first = RawPeer(attach(nursery, server))
        second = RawPeer(attach(nursery, server))
        await first.read_hello()
        await second.read_hello()
        assert server.statistics().handshaking == 2
        at_capacity = RawPeer(attach(nursery, server))
        assert await at_capacity.read_until_end() != []
        await first.send(client_hello())
        await second.send(client_hello())
        await server.registry.wait_until(lambda r: len(r) == 2)
        stats = server.statistics()
        assert (stats.handshaking, stats.completed_handshakes, stats.active) == (0, 2, 2)
        await first.send(encode_close(CloseCode.NORMAL))
        await second.send(encode_close(CloseCode.NORMAL))
        assert await first.read_close() == CloseCode.NORMAL
        assert await second.read_close() == CloseCode.NORMAL
    async with trio.open_nursery() as nursery:
        unacceptable = RawPeer(attach(nursery, server))
        await unacceptable.read_hello()
        await unacceptable.send(client_hello(interval_ms=1))
        assert await unacceptable.read_close() == CloseCode.POLICY_VIOLATION
    stats = server.statistics()
    assert (stats.accepted, stats.refused, stats.completed_handshakes) == (4, 2, 2)
    assert (stats.active, stats.handshaking) == (0, 0)
    assert stats.closed_by_code == {CloseCode.NORMAL: 2, CloseCode.POLICY_VIOLATION: 1}


class BrokenOnSend(trio.abc.Stream):
    """A custom transport whose every write fails with an OS error."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        raise ConnectionResetError(errno.ECONNRESET, "reset by the peer")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_refusal_that_cannot_be_delivered_is_dropped_quietly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer already gone, a stream already closed, a transport that fails with an
    OS error: telling each why is best effort, and handle_stream never raises."""
    server = Server(echo, config=CONFIG, max_connections=1)
    async with trio.open_nursery() as nursery:
        occupant = RawPeer(attach(nursery, server))
        await occupant.read_hello()
        gone_client, gone_server = trio.testing.memory_stream_pair()
        await gone_client.aclose()
        _, closed_server = trio.testing.memory_stream_pair()
        await closed_server.aclose()
        for stream in (gone_server, closed_server, BrokenOnSend()):
            await server.handle_stream(stream, "memory:refused")
        assert trio.current_time() == 0
        assert server.statistics().refused == 3
        nursery.cancel_scope.cancel()


def test_constructor_defaults_are_the_documented_ones() -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server = Server(echo, ssl_context=context)
    assert (server.max_connections, server.drain_timeout) == (4096, 10.0)
    assert server.ssl_context is context
    assert server.listeners == []
    assert server.draining is False
    with pytest.raises(ValueError, match=r"^max_connections must be at least 1$"):
        Server(echo, max_connections=0)


async def test_serve_tcp_passes_every_setting_to_its_server() -> None:
    """The module-level serve_tcp is Server(...).serve_tcp(...): nothing is dropped."""
    config = Config(interval=2.0, timeout=6.0, instance_id="served")
    options = ConnectionOptions(write_timeout=7.0)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

    def listener(conn: Connection, event: Event) -> None:
        pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(
                    thb.serve_tcp,
                    echo,
                    0,
                    host="127.0.0.2",  # loopback still, but not the default address
                    config=config,
                    options=options,
                    max_connections=7,
                    max_buffered_bytes=12_345,
                    drain_timeout=3.5,
                    ssl_context=context,
                    keepalive=KeepaliveOptions(idle=5, interval=1, count=3),
                    listeners=[listener],
                )
            )
            assert isinstance(server, Server)
            assert server.handler is echo
            assert server.config is config
            assert server.options.write_timeout == 7.0
            assert server.options.budget is not None
            assert server.options.budget.limit == 12_345
            assert (server.max_connections, server.drain_timeout) == (7, 3.5)
            assert server.ssl_context is context
            assert server.keepalive == KeepaliveOptions(idle=5, interval=1, count=3)
            assert server._event_listeners[1:] == (listener,)
            names = [listener.socket.getsockname() for listener in server.listeners]
            assert [name[0] for name in names] == ["127.0.0.2"]
            assert server.port == names[0][1] != 0
            nursery.cancel_scope.cancel()


async def test_serve_tcp_defaults_match_the_servers() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(thb.serve_tcp, echo, 0)
            assert isinstance(server, Server)
            assert server.config == Config()
            assert (server.max_connections, server.drain_timeout) == (4096, 10.0)
            assert server.options.budget is not None
            assert server.options.budget.limit == 256 << 20
            assert server.ssl_context is None
            assert server.keepalive == KeepaliveOptions.from_heartbeat(
                Config().interval, Config().timeout
            )
            assert server._event_listeners[1:] == ()
            assert server.listeners[0].socket.getsockname()[0] == "127.0.0.1"
            nursery.cancel_scope.cancel()


async def test_serve_tcp_passes_its_backlog_on(monkeypatch: pytest.MonkeyPatch) -> None:
    backlogs: list[int | None] = []
    real = trio.open_tcp_listeners

    async def recording(
        port: int, *, host: str | None = None, backlog: int | None = None
    ) -> list[trio.SocketListener]:
        backlogs.append(backlog)
        return await real(port, host=host, backlog=backlog)

    monkeypatch.setattr(trio, "open_tcp_listeners", recording)
    server = Server(echo, config=CONFIG)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.serve_tcp, 0, backlog=3))
            nursery.cancel_scope.cancel()
    assert backlogs == [3]


async def test_drain_cancels_accepted_connections_at_its_bound_and_closes_every_listener(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Connections from the accept loop (not handle_stream) are cancelled at the
    drain bound too, and every listener is closed, even the ones after the first,
    while serving is being torn down by a cancellation."""
    client_end, server_end = trio.testing.memory_stream_pair()
    task_names: list[str] = []

    async def handler(conn: Connection) -> None:
        task_names.append(trio.lowlevel.current_task().name)
        await trio.sleep_forever()

    first = ScriptedListener([lambda: server_end])
    second = ScriptedListener([])
    server = Server(handler, config=CONFIG, keepalive=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            server.serve_listeners, cast(list[trio.SocketListener], [first, second])
        )
        silent = RawPeer(client_end)
        await silent.handshake()  # and then never answers
        await server.registry.wait_until(lambda r: len(r) == 1)
        await server.drain(grace=0.5)
        assert trio.current_time() == 0.5  # not its own close timeout (1 s)
        assert server.statistics().active == 0
        nursery.cancel_scope.cancel()
    assert (first.closed, second.closed) == (True, True)
    assert task_names == ["trio_heartbeat.Server.connection"]


async def test_cancelling_serving_closes_every_listener() -> None:
    first = ScriptedListener([])
    second = ScriptedListener([])
    server = Server(echo, config=CONFIG, keepalive=None)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                server.serve_listeners, cast(list[trio.SocketListener], [first, second])
            )
            nursery.cancel_scope.cancel()
    assert (first.closed, second.closed) == (True, True)


@pytest.mark.parametrize("cause", ["drain", "takeover"])
async def test_drain_and_takeover_closes_jump_the_queued_data(
    autojump_clock: trio.testing.MockClock, cause: str
) -> None:
    """A peer that stops reading has DATA queued behind a blocked write: the CLOSE a
    drain or a takeover sends goes ahead of it, with its reason, rather than wait
    for that DATA to get through."""

    async def chatty(conn: Connection) -> None:
        await conn.send(b"in flight")
        await trio.sleep(0.25)  # the writer is blocked on it by now
        for _ in range(4):
            await conn.send(b"queued")
        await trio.sleep_forever()

    server = Server(chatty, config=CONFIG)
    async with trio.open_nursery() as nursery:
        stuck = RawPeer(attach(nursery, server, pair=trio.testing.lockstep_stream_pair))
        await stuck.handshake(instance_id="node")
        verdict = await stuck.receive_frame()  # and then it stops reading
        assert verdict is not None
        assert verdict.type is FrameType.PING
        await server.registry.wait_until(lambda r: "node" in r)
        await trio.sleep(0.5)  # the first DATA is in flight, the rest queued
        if cause == "drain":
            nursery.start_soon(server.drain)
            expected = (CloseCode.GOING_AWAY, "server draining")
        else:
            newer = RawPeer(attach(nursery, server))
            await newer.handshake(instance_id="node")
            expected = (CloseCode.REPLACED, "replaced by a newer connection")
        await trio.sleep(0.1)
        frames = await stuck.read_until_end()  # reads now, never answers
        assert [frame.type for frame in frames] == [FrameType.DATA, FrameType.CLOSE]
        assert frames[0].payload == b"in flight"
        assert decode_close(frames[-1].payload) == expected
        nursery.cancel_scope.cancel()


async def test_tls_wraps_the_stream_before_anything_is_said(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With an SSL context the server speaks TLS, as the server side, from the first
    byte: a TLS client completes the handshake and is echoed; a refusal is sent over
    TLS too, so that the client can read it."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    server = Server(echo, config=CONFIG, ssl_context=server_context, max_connections=1)
    async with trio.open_nursery() as nursery:
        tls = trio.SSLStream(attach(nursery, server), client_context, server_hostname="localhost")
        async with open_stream_connection(tls, role=Role.CLIENT) as conn:
            await conn.send(b"private")
            assert await conn.receive() == b"private"
            refused = RawPeer(
                trio.SSLStream(attach(nursery, server), client_context, server_hostname="localhost")
            )
            await refused.read_until_end()
            assert close_codes(refused) == [CloseCode.TRY_AGAIN_LATER]


async def test_an_ended_connection_is_let_go_while_its_handler_runs_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The registry unlists a connection the moment it ends, even while its handler
    ignores that and runs on; once handle_stream returns, the server holds nothing
    of it (reference counting alone frees it)."""
    handler_done = trio.Event()

    async def deaf(conn: Connection) -> None:
        await trio.sleep(2)  # never looks at its connection
        handler_done.set()

    with collector_disabled():
        server = Server(deaf, config=CONFIG)
        refs: list[weakref.ref[Connection]] = []
        async with trio.open_nursery() as nursery:
            peer = RawPeer(attach(nursery, server))
            await peer.handshake()
            await server.registry.wait_until(lambda r: len(r) == 1)
            refs.append(weakref.ref(server.registry.connections()[0]))
            await peer.send(encode_close(CloseCode.NORMAL))
            await server.registry.wait_until(lambda r: len(r) == 0)
            assert trio.current_time() == 0
            assert not handler_done.is_set()
        assert trio.current_time() == 2
        assert refs[0]() is None
        assert server._stream_scopes == set()  # the scope of each call goes with it


async def test_wait_draining_returns_the_moment_the_drain_begins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    began: list[float] = []

    async def watch() -> None:
        await server.wait_draining()
        began.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(2.5)
        assert began == []
        await server.drain()
    assert began == [2.5]
    await server.wait_draining()  # at once, once it has begun
    assert trio.current_time() == 2.5
