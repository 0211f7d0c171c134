"""The server and the TCP client over real loopback sockets.

Every misbehaving peer here is a :class:`RawPeer` on a real socket that says
exactly the bytes of its misdeed, and every test checks two things: the exact
close code the raw peer reads, and that a well-behaved client connected at the
same time is still served (bad input never hurts anyone else). Timeouts are
small so that the file runs in seconds, and no assertion depends on how fast
the machine is; exact timing lives in the virtual-time tests of
``test_server.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from helpers import (
    LOOPBACK,
    RawPeer,
    assert_echo,
    client_hello,
    echo,
    hello_frame,
    open_raw_peer,
    serving,
    wait_empty,
)

from trio_heartbeat import (
    BrokenConnection,
    CloseCode,
    Config,
    Connection,
    ConnectionRejected,
    FrameType,
    HealthStatus,
    KeepaliveOptions,
    Role,
    Server,
    open_connection,
    read_keepalive,
    serve_tcp,
)
from trio_heartbeat._frames import (
    decode_close,
    encode_close,
    encode_data,
    encode_frame,
    encode_ping,
)

#: Small timeouts keep the file fast; the bounds in the tests stay generous.
FAST = Config(interval=0.05, timeout=0.3, handshake_timeout=0.5, close_timeout=0.3)
#: Calmer settings for the crowd test, where 400 sockets share one process.
CALM = Config(interval=0.5, timeout=5.0)
SECRET = b"open sesame"


def local_address(conn: Connection) -> str:
    host, port = conn.stream.socket.getsockname()[:2]  # type: ignore[attr-defined]
    return f"{host}:{port}"


async def wait_active(server: Server, count: int) -> None:
    """Wait until the server holds exactly ``count`` connections, handshaking ones included."""
    with trio.fail_after(10):
        while server.statistics().active != count:  # noqa: ASYNC110 - nothing signals this
            await trio.sleep(0.001)


@asynccontextmanager
async def server_with_bystander(**options: Any) -> AsyncIterator[tuple[Server, Connection]]:
    """A server, and a well-behaved client that is connected the whole time."""
    options.setdefault("config", FAST)
    async with serving(**options) as server:
        client_config = dataclasses.replace(FAST, secret=options["config"].secret)
        async with open_connection(LOOPBACK, server.port, config=client_config) as bystander:
            await assert_echo(bystander, b"before")
            yield server, bystander


# -- serving and connecting ------------------------------------------------------------


async def test_echo_through_serve_tcp_and_open_connection() -> None:
    async with (
        serving(config=FAST) as server,
        open_connection(LOOPBACK, server.port, config=FAST) as conn,
    ):
        for size in (0, 1, 1000, 200_000):
            await assert_echo(conn, bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        [info] = server.registry.snapshot()
        assert info.address == local_address(conn)
        assert conn.remote_address == f"{LOOPBACK}:{server.port}"
        assert conn.peer is not None
        assert conn.peer.interval_ms == 50
    await wait_empty(server)
    assert server.statistics().closed_by_code == {CloseCode.NORMAL: 1}


async def test_two_hundred_clients_at_once() -> None:
    clients = 200
    everyone_in = trio.Event()
    finished: list[int] = []

    async def client(number: int) -> None:
        async with open_connection(LOOPBACK, server.port, config=CALM) as conn:
            for turn in range(3):
                await assert_echo(conn, f"{number}:{turn}".encode())
            await everyone_in.wait()
            await assert_echo(conn, f"{number}:last".encode())
        finished.append(number)

    async with serving(config=CALM) as server, trio.open_nursery() as nursery:
        for number in range(clients):
            nursery.start_soon(client, number)
        with trio.fail_after(60):
            await server.registry.wait_until(lambda registry: len(registry) == clients)
        peak = len(server.registry)
        addresses = {info.address for info in server.registry}
        everyone_in.set()
    assert peak == clients
    assert len(addresses) == clients
    assert sorted(finished) == list(range(clients))
    await wait_empty(server)
    stats = server.statistics()
    assert (stats.accepted, stats.completed_handshakes, stats.active) == (clients, clients, 0)
    assert stats.closed_by_code == {CloseCode.NORMAL: clients}
    assert len(server.registry) == 0


async def test_keepalive_on_both_ends() -> None:
    explicit = KeepaliveOptions(idle=7, interval=3, count=4)
    async with (
        serving(config=FAST) as server,
        open_connection(LOOPBACK, server.port, config=FAST, keepalive=explicit) as conn,
    ):
        await assert_echo(conn)
        mine = read_keepalive(conn.stream.socket)  # type: ignore[attr-defined]
        assert (mine.enabled, mine.idle, mine.interval, mine.count) == (True, 7, 3, 4)
        [accepted] = server.registry.connections()
        theirs = read_keepalive(accepted.stream.socket)  # type: ignore[attr-defined]
        assert theirs.enabled
        assert server.keepalive is not None
        assert theirs.idle == server.keepalive.idle


# -- authentication ------------------------------------------------------------------------


async def test_hmac_auth_admits_the_right_key_only() -> None:
    server_config = dataclasses.replace(FAST, secret=SECRET)
    async with serving(config=server_config) as server:
        right = dataclasses.replace(FAST, secret=SECRET, instance_id="trusted")
        async with open_connection(LOOPBACK, server.port, config=right) as conn:
            await assert_echo(conn)
            assert "trusted" in server.registry
            for wrong in (
                dataclasses.replace(FAST, secret=b"open barley"),
                FAST,  # no key at all
            ):
                with pytest.raises(ConnectionRejected) as info:
                    async with open_connection(LOOPBACK, server.port, config=wrong) as rejected:
                        # The client is OPEN once its HELLO is out; the
                        # verdict on it comes next and cancels the block.
                        await rejected.receive()
                assert info.value.code == CloseCode.POLICY_VIOLATION
                assert info.value.by_peer
                assert info.value.reason == "client authentication failed"
                await assert_echo(conn)  # the trusted client never noticed
    assert server.statistics().closed_by_code[CloseCode.POLICY_VIOLATION] == 2


async def test_hmac_auth_interoperates_with_a_hand_signed_hello() -> None:
    async with (
        serving(config=dataclasses.replace(FAST, secret=SECRET)) as server,
        open_raw_peer(server.port) as peer,
    ):
        await peer.handshake(instance_id="by-hand", secret=SECRET)
        await peer.send(encode_data(b"signed"))
        with trio.fail_after(10):
            while (frame := await peer.receive_frame()) is not None:
                if frame.type is FrameType.DATA:
                    break
        assert frame is not None
        assert frame.payload == b"signed"
        assert "by-hand" in server.registry


# -- every close code, provoked by a raw peer --------------------------------------------------

Scenario = Callable[[RawPeer], Awaitable[int]]


async def peer_closes(peer: RawPeer) -> int:
    await peer.handshake()
    await peer.send(encode_close(CloseCode.NORMAL, "done"))
    return await peer.read_close()


async def handler_returns(peer: RawPeer) -> int:
    await peer.handshake()
    await peer.send(encode_data(b"close"))
    code = await peer.read_close()
    await peer.send(encode_close(code))
    return code


async def handler_fails(peer: RawPeer) -> int:
    await peer.handshake()
    await peer.send(encode_data(b"raise"))
    return await peer.read_close()


async def garbage(peer: RawPeer) -> int:
    await peer.read_hello()
    await peer.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    return await peer.read_close()


async def bad_magic(peer: RawPeer) -> int:
    await peer.read_hello()
    await peer.send(client_hello().replace(b"THB1", b"THB2"))
    return await peer.read_close()


async def wrong_role(peer: RawPeer) -> int:
    await peer.read_hello()
    await peer.send(hello_frame(Role.SERVER))
    return await peer.read_close()


async def data_before_hello(peer: RawPeer) -> int:
    await peer.read_hello()
    await peer.send(encode_data(b"too soon"))
    return await peer.read_close()


async def reserved_flags(peer: RawPeer) -> int:
    await peer.handshake()
    await peer.send(bytes.fromhex("02 01 00 00 00 00"))
    return await peer.read_close()


async def interval_out_of_range(peer: RawPeer) -> int:
    await peer.handshake(interval_ms=1)  # the server accepts 5 ms at least
    return await peer.read_close()


async def timeout_out_of_range(peer: RawPeer) -> int:
    await peer.handshake(timeout_ms=5)  # the server accepts 10 ms at least
    return await peer.read_close()


async def ping_flood(peer: RawPeer) -> int:
    await peer.handshake()
    # The first PING is fine; the next three come too early: three strikes.
    await peer.send(b"".join(encode_ping(bytes(8), HealthStatus.SERVING) for _ in range(4)))
    return await peer.read_close()


async def bad_auth(peer: RawPeer) -> int:
    await peer.handshake(secret=b"not the secret")
    return await peer.read_close()


async def oversized_frame(peer: RawPeer) -> int:
    await peer.handshake()
    # Only the header: the server must answer before any payload exists.
    await peer.send(encode_frame(FrameType.DATA)[:2] + (FAST.max_frame + 1).to_bytes(4, "big"))
    return await peer.read_close()


async def oversized_hello(peer: RawPeer) -> int:
    await peer.read_hello()
    await peer.send(bytes.fromhex("01 00 00 00 02 01"))  # 513 bytes: over the handshake limit
    return await peer.read_close()


async def silent_after_handshake(peer: RawPeer) -> int:
    await peer.handshake()
    return await peer.read_close(answer_pings=False)


async def never_says_hello(peer: RawPeer) -> int:
    await peer.read_hello()
    return await peer.read_close(answer_pings=False)


@pytest.mark.parametrize(
    ("scenario", "server_options", "code"),
    [
        (peer_closes, {}, CloseCode.NORMAL),
        (handler_returns, {}, CloseCode.NORMAL),
        (handler_fails, {}, CloseCode.GOING_AWAY),
        (garbage, {}, CloseCode.PROTOCOL_ERROR),
        (bad_magic, {}, CloseCode.PROTOCOL_ERROR),
        (wrong_role, {}, CloseCode.PROTOCOL_ERROR),
        (data_before_hello, {}, CloseCode.PROTOCOL_ERROR),
        (reserved_flags, {}, CloseCode.PROTOCOL_ERROR),
        (interval_out_of_range, {}, CloseCode.POLICY_VIOLATION),
        (timeout_out_of_range, {}, CloseCode.POLICY_VIOLATION),
        (ping_flood, {}, CloseCode.POLICY_VIOLATION),
        (bad_auth, {"config": dataclasses.replace(FAST, secret=SECRET)}, 1008),
        (oversized_frame, {}, CloseCode.TOO_BIG),
        (oversized_hello, {}, CloseCode.TOO_BIG),
        (silent_after_handshake, {}, CloseCode.HEARTBEAT_TIMEOUT),
        (never_says_hello, {}, CloseCode.HEARTBEAT_TIMEOUT),
    ],
    ids=lambda value: getattr(value, "__name__", None) or str(value)[:20],
)
async def test_raw_peer_reads_the_exact_close_code_and_others_are_unharmed(
    scenario: Scenario, server_options: dict[str, Any], code: int
) -> None:
    async with server_with_bystander(**server_options) as (server, bystander):
        async with open_raw_peer(server.port) as peer:
            with trio.fail_after(10):
                assert await scenario(peer) == code
            # After its CLOSE, the server says nothing more: it hangs up.
            with trio.fail_after(10):
                assert await peer.read_until_end() == []
        await wait_active(server, 1)
        await assert_echo(bystander, b"unharmed")
        [info] = server.registry.snapshot()
        assert info.address == local_address(bystander)
        assert server.statistics().closed_by_code == {code: 1}


async def test_oversized_frame_is_refused_from_the_header_alone() -> None:
    async with serving(config=FAST) as server, open_raw_peer(server.port) as peer:
        await peer.handshake()
        # A header that announces 4 GiB: answered at once, nothing allocated.
        await peer.send(bytes.fromhex("02 00 ff ff ff ff"))
        with trio.fail_after(10):
            assert await peer.read_close() == CloseCode.TOO_BIG
        assert "4294967295 bytes exceeds the limit of 1048576" in peer.close_reason


async def test_at_capacity_a_raw_peer_gets_1013_instead_of_hello() -> None:
    async with server_with_bystander(max_connections=2) as (server, bystander):
        async with open_raw_peer(server.port) as filler, trio.open_nursery() as nursery:
            await filler.handshake()
            nursery.start_soon(filler.read_close)  # answers PINGs until closed
            async with open_raw_peer(server.port) as refused:
                with trio.fail_after(10):
                    frames = await refused.read_until_end()
            assert [frame.type for frame in frames] == [FrameType.CLOSE]
            assert decode_close(frames[0].payload) == (1013, "server at capacity")
            with pytest.raises(ConnectionRejected) as info:
                async with open_connection(LOOPBACK, server.port, config=FAST):
                    pass
            assert info.value.code == CloseCode.TRY_AGAIN_LATER
            await assert_echo(bystander, b"unharmed")
            await filler.send(encode_close(CloseCode.NORMAL))
        assert server.statistics().refused == 2
        await wait_active(server, 1)
        async with open_connection(LOOPBACK, server.port, config=FAST) as conn:
            await assert_echo(conn, b"room again")


async def test_same_id_replaces_the_older_raw_peer_with_4000() -> None:
    newer_config = dataclasses.replace(FAST, instance_id="node-1")
    async with (
        server_with_bystander() as (server, bystander),
        open_raw_peer(server.port) as older,
    ):
        await older.handshake(instance_id="node-1")
        with trio.fail_after(10):
            await server.registry.wait_until(lambda registry: "node-1" in registry)
        async with open_connection(LOOPBACK, server.port, config=newer_config) as newer:
            with trio.fail_after(10):
                assert await older.read_close() == CloseCode.REPLACED
            info = server.registry.get("node-1")
            assert info is not None
            assert info.address == local_address(newer)
            await assert_echo(newer, b"mine now")
            await assert_echo(bystander, b"unharmed")


async def test_drain_closes_everyone_with_1001_and_stops_serving() -> None:
    clients = 5
    seen: list[int] = []
    returned = trio.Event()
    ready_send, ready_receive = trio.open_memory_channel[None](clients + 1)

    async def run_server(*, task_status: trio.TaskStatus[Server]) -> None:
        await serve_tcp(echo, 0, host=LOOPBACK, config=FAST, task_status=task_status)
        returned.set()

    async def client() -> None:
        async with open_connection(LOOPBACK, server.port, config=FAST) as conn:
            await assert_echo(conn)
            ready_send.send_nowait(None)
            async for _ in conn:
                pass  # ends quietly on 1001
            closed = conn.closed
            assert closed is not None
            seen.append(closed.code)

    async def raw() -> None:
        async with open_raw_peer(server.port) as peer:
            await peer.handshake()
            ready_send.send_nowait(None)
            code = await peer.read_close()
            seen.append(code)
            await peer.send(encode_close(code))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_server)
            port = server.port
            for _ in range(clients):
                nursery.start_soon(client)
            nursery.start_soon(raw)
            for _ in range(clients + 1):
                await ready_receive.receive()
            await server.registry.wait_until(lambda registry: len(registry) == clients + 1)
            await server.drain(grace=10)
            assert len(server.registry) == 0
            await returned.wait()
    assert seen == [CloseCode.GOING_AWAY] * (clients + 1)
    assert server.statistics().closed_by_code == {CloseCode.GOING_AWAY: clients + 1}
    with pytest.raises(BrokenConnection):
        async with open_connection(LOOPBACK, port, config=FAST):
            pass


async def test_drain_cancels_a_peer_that_never_answers_at_the_bound() -> None:
    patient = dataclasses.replace(FAST, close_timeout=60)
    returned = trio.Event()

    async def run_server(*, task_status: trio.TaskStatus[Server]) -> None:
        await serve_tcp(echo, 0, host=LOOPBACK, config=patient, task_status=task_status)
        returned.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(run_server)
        async with open_raw_peer(server.port) as peer:
            await peer.handshake()
            await server.registry.wait_until(lambda registry: len(registry) == 1)
            with trio.fail_after(30):  # far below the close timeout of 60 s
                await server.drain(grace=0.2)
                await returned.wait()
            # The peer heard why, and never answered: the server hung up anyway.
            assert await peer.read_close() == CloseCode.GOING_AWAY
            assert await peer.read_until_end() == []
    assert server.statistics().closed_by_code == {CloseCode.GOING_AWAY: 1}


async def test_serving_no_listeners_returns_at_once() -> None:
    server = Server(echo, config=FAST)
    with trio.fail_after(10):
        await server.serve_listeners([])
    with pytest.raises(RuntimeError):
        _ = server.port


# -- peers that stop taking part ---------------------------------------------------------------


async def test_a_blackholed_peer_is_cut_off_at_the_timeout() -> None:
    async with server_with_bystander() as (server, bystander):
        async with open_raw_peer(server.port) as peer:
            await peer.handshake()
            # No FIN, no reads, no writes: the socket simply goes quiet.
            with trio.fail_after(10):
                await server.registry.wait_until(lambda registry: len(registry) == 2)
                await server.registry.wait_until(lambda registry: len(registry) == 1)
            await assert_echo(bystander, b"unharmed")
            frames = await peer.read_until_end()
        assert {frame.type for frame in frames[:-1]} <= {FrameType.PING}
        assert decode_close(frames[-1].payload)[0] == CloseCode.HEARTBEAT_TIMEOUT
        assert server.statistics().closed_by_code == {CloseCode.HEARTBEAT_TIMEOUT: 1}


async def send_until_refused(peer: RawPeer, chunk: bytes) -> None:
    while True:  # the echoes pile up unread until the server gives up on us
        await peer.send(chunk)


async def test_a_peer_that_sends_but_never_reads_does_not_pin_the_server() -> None:
    async with server_with_bystander() as (server, bystander):
        async with open_raw_peer(server.port) as peer:
            await peer.handshake()
            with trio.fail_after(20), pytest.raises(trio.BrokenResourceError):
                await send_until_refused(peer, encode_data(b"x" * 65536))
        await wait_active(server, 1)
        assert len(server.registry) == 1
        assert server.statistics().closed_by_code == {CloseCode.HEARTBEAT_TIMEOUT: 1}
        await assert_echo(bystander, b"unharmed")


async def test_serve_listeners_closes_the_listeners_it_was_given() -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    server = Server(echo, config=FAST)
    async with trio.open_nursery() as nursery:
        assert await nursery.start(partial(server.serve_listeners, listeners)) is server
        async with open_connection(LOOPBACK, server.port, config=FAST) as conn:
            await assert_echo(conn)
        nursery.cancel_scope.cancel()
    assert all(listener.socket.fileno() == -1 for listener in listeners)
