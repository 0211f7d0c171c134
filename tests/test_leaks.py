"""Nothing is left behind, however a connection ends.

After hundreds of real TCP connections that end every way there is (orderly
close, heartbeat timeout, reset, protocol error, cancellation, a peer that
leaves before its HELLO), the registry is empty, no connection is counted as
active, no task is left, and the process holds exactly the file descriptors it
held before. A virtual-time sweep then cancels both ends at many different
points of a connection's life, in the manner of httpcore's cancellation tests,
and checks the same books after each.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable

import trio
import trio.testing
from helpers import (
    LOOPBACK,
    RawPeer,
    assert_echo,
    echo,
    living_tasks,
    open_fds,
    open_raw_peer,
    serving,
    wait_empty,
)

from trio_heartbeat import (
    CloseCode,
    Config,
    ConnectionClosed,
    Role,
    Server,
    open_connection,
    open_stream_connection,
)
from trio_heartbeat._frames import encode_data

CONFIG = Config(interval=0.1, timeout=0.5, handshake_timeout=0.5, close_timeout=0.3)
PER_KIND = 50


async def orderly(port: int) -> None:
    async with open_connection(LOOPBACK, port, config=CONFIG) as conn:
        await assert_echo(conn)


async def cancelled(port: int) -> None:
    with trio.CancelScope() as scope:
        async with open_connection(LOOPBACK, port, config=CONFIG) as conn:
            await assert_echo(conn)
            scope.cancel()  # the whole connection, in the middle of a receive
            await conn.receive()
    assert scope.cancelled_caught


async def timed_out(port: int) -> None:
    async with open_raw_peer(port) as peer:
        await peer.handshake()
        await peer.read_until_end()  # never answers: cut off at the timeout


async def reset(port: int) -> None:
    async with open_raw_peer(port) as peer:
        await peer.handshake()
        await peer.send(encode_data(b"about to vanish"))
        await peer.receive_frame()
        # Linger zero: close() sends RST instead of FIN.
        sock = peer.stream.socket  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def protocol_error(port: int) -> None:
    async with open_raw_peer(port) as peer:
        await peer.handshake()
        await peer.send(b"\x09" * 6)  # an unknown frame type
        assert await peer.read_close() == CloseCode.PROTOCOL_ERROR


async def gone_before_hello(port: int) -> None:
    async with open_raw_peer(port) as peer:
        await peer.read_hello()


async def handler_failed(port: int) -> None:
    """The handler raises: its connection ends with 1001."""
    async with open_raw_peer(port) as peer:
        await peer.handshake()
        await peer.send(encode_data(b"raise"))
        assert await peer.read_close() == CloseCode.GOING_AWAY


ENDINGS: list[Callable[[int], Awaitable[None]]] = [
    orderly,
    cancelled,
    timed_out,
    reset,
    protocol_error,
    gone_before_hello,
    handler_failed,
]


async def test_hundreds_of_tcp_connections_ending_every_way_leave_nothing_behind() -> None:
    fds_before = open_fds()
    tasks_before = living_tasks()
    async with serving(config=CONFIG) as server:
        await trio.testing.wait_all_tasks_blocked()
        fds_serving = open_fds()
        tasks_serving = living_tasks()
        for ending in ENDINGS:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for _ in range(PER_KIND):
                        nursery.start_soon(ending, server.port)
        await wait_empty(server)
        await trio.testing.wait_all_tasks_blocked()
        stats = server.statistics()
        assert stats.accepted == PER_KIND * len(ENDINGS)
        assert (stats.active, stats.handshaking, len(server.registry)) == (0, 0, 0)
        assert living_tasks() == tasks_serving
        assert open_fds() == fds_serving
        # Every ending was seen as what it was.
        assert stats.closed_by_code == {
            CloseCode.NORMAL: PER_KIND,
            CloseCode.GOING_AWAY: 2 * PER_KIND,  # cancelled, and the failed handlers
            CloseCode.HEARTBEAT_TIMEOUT: PER_KIND,
            CloseCode.PROTOCOL_ERROR: PER_KIND,
            CloseCode.ABNORMAL_CLOSURE: 2 * PER_KIND,  # reset, and gone before HELLO
        }
    await trio.testing.wait_all_tasks_blocked()
    assert living_tasks() == tasks_before
    assert open_fds() == fds_before


async def test_cancelling_either_end_anywhere_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    baseline = living_tasks()
    outcomes: set[int] = set()

    async def client(stream: trio.abc.Stream) -> None:
        try:
            async with open_stream_connection(stream, role=Role.CLIENT, config=CONFIG) as conn:
                while True:
                    await conn.send(b"ping-pong")
                    await conn.receive()
                    await trio.sleep(0.05)
        except ConnectionClosed as exc:
            outcomes.add(exc.code)

    async def cut_after(scope: trio.CancelScope, checkpoints: int, delay: float) -> None:
        for _ in range(checkpoints):
            await trio.lowlevel.checkpoint()
        await trio.sleep(delay)
        scope.cancel()

    async def serve(stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        with scope:
            await server.handle_stream(stream, "memory")

    async def connect(stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        with scope:
            await client(stream)

    async def run_once(which: str, checkpoints: int, delay: float) -> None:
        client_end, server_end = trio.testing.memory_stream_pair()
        server_scope, client_scope = trio.CancelScope(), trio.CancelScope()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, server_end, server_scope)
                nursery.start_soon(connect, client_end, client_scope)
                if which in ("client", "both"):
                    nursery.start_soon(cut_after, client_scope, checkpoints, delay)
                if which in ("server", "both"):
                    nursery.start_soon(cut_after, server_scope, checkpoints, delay)

    # Cut at many scheduling points of the first moment (handshake, first
    # exchange), then at moments spread over the heartbeats and the close.
    cuts = [(checkpoints, 0.0) for checkpoints in range(40)]
    cuts += [(0, delay / 16) for delay in range(1, 24)]
    for which in ("client", "server", "both"):
        for checkpoints, delay in cuts:
            await run_once(which, checkpoints, delay)
            assert server.statistics().active == 0, (which, checkpoints, delay)
            assert len(server.registry) == 0
            assert living_tasks() == baseline
    assert server.statistics().accepted == 3 * len(cuts)
    assert server.statistics().completed_handshakes > 0
    # Where only the server was cut, the client heard why.
    assert CloseCode.GOING_AWAY in outcomes


async def test_a_raw_peer_that_never_finishes_anything_is_still_cleaned_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    baseline = living_tasks()
    async with trio.open_nursery() as nursery:
        for _ in range(100):
            client_end, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_stream, server_end, "memory")
            nursery.start_soon(RawPeer(client_end).read_until_end)
    # Every one of them was given up at the handshake bound.
    assert trio.current_time() == CONFIG.handshake_timeout
    assert server.statistics().closed_by_code == {CloseCode.HEARTBEAT_TIMEOUT: 100}
    assert server.statistics().active == 0
    assert living_tasks() == baseline
