"""The fault proxy over real TCP on loopback.

Real sockets run on the real clock, so these tests assert behaviour, not exact
times: a lower bound the proxy guarantees (it never delivers early), a window in
which nothing may arrive, or an outcome (reset, EOF). Each takes well under a
second. The exact timing of every fault is tested in virtual time in
test_testing_wire.py; the proxy runs the same code.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial

import pytest
import trio
import trio.testing

from trio_heartbeat.testing import Direction, FaultProxy, Faults, Side

# Generous: only reached if something is broken.
DEADLINE = 5.0


@dataclass
class Setup:
    proxy: FaultProxy
    accepted: trio.MemoryReceiveChannel[trio.SocketStream]
    clients: list[trio.SocketStream]

    async def connect(self) -> tuple[trio.SocketStream, trio.SocketStream]:
        """A client connected through the proxy, and the server's end of it."""
        client = await trio.open_tcp_stream("127.0.0.1", self.proxy.port)
        self.clients.append(client)
        with trio.fail_after(DEADLINE):
            server = await self.accepted.receive()
        return client, server


@asynccontextmanager
async def proxied(faults: Faults | None = None, *, echo: bool = False) -> AsyncIterator[Setup]:
    """A TCP server on loopback (echoing, or handing its streams to the test) behind a proxy."""
    send, receive = trio.open_memory_channel[trio.SocketStream](10)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if echo:
                async for data in stream:
                    await stream.send_all(data)
            else:
                await send.send(stream)
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        server_port = listeners[0].socket.getsockname()[1]
        proxy = FaultProxy(faults)
        assert await nursery.start(proxy.serve, "127.0.0.1", server_port) == proxy.port
        setup = Setup(proxy, receive, [])
        try:
            yield setup
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):  # close them all, cancelled or not
                for client in setup.clients:
                    await trio.aclose_forcefully(client)


async def receive_exactly(stream: trio.abc.ReceiveStream, nbytes: int) -> bytes:
    data = b""
    with trio.fail_after(DEADLINE):
        while len(data) < nbytes:
            chunk = await stream.receive_some(nbytes - len(data))
            assert chunk, "unexpected EOF"
            data += chunk
    return data


async def nothing_arrives(stream: trio.abc.ReceiveStream, seconds: float) -> bool:
    with trio.move_on_after(seconds) as scope:
        await stream.receive_some()
    return scope.cancelled_caught


async def test_echo_through_the_proxy() -> None:
    async with proxied(echo=True) as setup:
        client = await trio.open_tcp_stream("127.0.0.1", setup.proxy.port)
        async with client:
            await client.send_all(b"hello")
            assert await receive_exactly(client, 5) == b"hello"
            stats = setup.proxy.statistics()
            assert (stats.connections_accepted, stats.connections_active) == (1, 1)
            assert stats.outbound.bytes_delivered == stats.inbound.bytes_delivered == 5
            assert len(setup.proxy.connections) == 1
            assert setup.proxy.connections[0].statistics().outbound.bytes_sent == 5


async def test_delay_holds_each_direction_back() -> None:
    async with proxied(echo=True) as setup:
        setup.proxy.faults.set_delay(0.1)
        client = await trio.open_tcp_stream("127.0.0.1", setup.proxy.port)
        async with client:
            start = trio.current_time()
            await client.send_all(b"ping")
            assert await receive_exactly(client, 4) == b"ping"
            assert trio.current_time() - start >= 0.2  # there and back


async def test_rate_limit_paces_the_bytes() -> None:
    async with proxied() as setup:
        setup.proxy.faults.limit_rate(20_000, Direction.OUTBOUND)
        client, server = await setup.connect()
        start = trio.current_time()
        await client.send_all(b"r" * 4000)
        assert await receive_exactly(server, 4000) == b"r" * 4000
        assert trio.current_time() - start >= 4000 / 20_000


async def test_blackhole_then_heal() -> None:
    async with proxied() as setup:
        client, server = await setup.connect()
        setup.proxy.faults.blackhole()
        await client.send_all(b"held")
        await server.send_all(b"also held")
        assert await nothing_arrives(server, 0.3)
        assert await nothing_arrives(client, 0.1)
        setup.proxy.faults.heal()
        assert await receive_exactly(server, 4) == b"held"
        assert await receive_exactly(client, 9) == b"also held"


async def test_one_way_partition() -> None:
    async with proxied() as setup:
        client, server = await setup.connect()
        setup.proxy.faults.blackhole(Direction.OUTBOUND)
        await client.send_all(b"up")
        await server.send_all(b"down")
        assert await receive_exactly(client, 4) == b"down"
        assert await nothing_arrives(server, 0.3)
        setup.proxy.faults.outbound.blackholed = False
        assert await receive_exactly(server, 2) == b"up"


async def test_slow_reader_pushes_back_on_the_sender() -> None:
    async with proxied() as setup:
        client, server = await setup.connect()
        setup.proxy.faults.slow_reader(1000, 0.05, Direction.OUTBOUND)
        # Keep the client's own socket buffer small; the proxy's is at most a
        # few MB, far less than what we try to send.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sent_all = trio.Event()
        received = 0

        async def send_a_lot() -> None:
            await client.send_all(b"s" * (16 * 2**20))
            sent_all.set()

        async def read() -> None:
            nonlocal received
            while True:
                received += len(await server.receive_some())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_a_lot)
            nursery.start_soon(read)
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        assert not sent_all.is_set()  # send_all was blocked by backpressure
        assert 0 < received <= 1000 * (1 + 0.5 / 0.05)


async def test_reset_all_breaks_both_sides_and_new_connections_work() -> None:
    async with proxied() as setup:
        client, server = await setup.connect()
        await client.send_all(b"x")
        assert await receive_exactly(server, 1) == b"x"
        broken = []

        async def expect_reset(stream: trio.SocketStream, name: str) -> None:
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(DEADLINE):
                await stream.receive_some()
            broken.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_reset, client, "client")
            nursery.start_soon(expect_reset, server, "server")
            await trio.testing.wait_all_tasks_blocked()
            setup.proxy.reset_all()
        assert sorted(broken) == ["client", "server"]

        await trio.testing.wait_all_tasks_blocked()  # the proxy's cleanup needs no I/O
        stats = setup.proxy.statistics()
        assert (stats.connections_active, stats.connections_reset) == (0, 1)

        client, server = await setup.connect()
        await server.send_all(b"fresh")
        assert await receive_exactly(client, 5) == b"fresh"


async def test_reset_one_connection_only() -> None:
    async with proxied() as setup:
        first_client, _ = await setup.connect()
        second_client, second_server = await setup.connect()
        setup.proxy.connections[0].reset()
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(DEADLINE):
            await first_client.receive_some()
        await second_server.send_all(b"fine")
        assert await receive_exactly(second_client, 4) == b"fine"


async def test_a_reset_from_one_peer_reaches_the_other() -> None:
    async with proxied() as setup:
        client, server = await setup.connect()
        # An RST from the server: linger on with a zero timeout, then close.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await server.aclose()
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(DEADLINE):
            await client.receive_some()


async def test_half_open_client_stays_fooled_server_sees_eof() -> None:
    async with proxied() as setup:
        client, server = await setup.connect()
        setup.proxy.faults.half_open(Side.NEAR, peer_sees="eof")
        with trio.fail_after(DEADLINE):
            assert await server.receive_some() == b""
        await server.send_all(b"unheard")
        await client.send_all(b"are you there?")  # succeeds, and vanishes
        assert await nothing_arrives(client, 0.3)
        assert setup.proxy.statistics().inbound.bytes_dropped == len(b"unheard")


async def test_half_open_server_stays_fooled_client_sees_reset() -> None:
    async with proxied() as setup:
        client, server = await setup.connect()
        setup.proxy.connections[0].half_open(Side.FAR, peer_sees="reset")
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(DEADLINE):
            await client.receive_some()
        await server.send_all(b"still here")
        assert await nothing_arrives(server, 0.3)


async def test_an_unreachable_target_resets_the_client() -> None:
    with socket.socket() as placeholder:  # a port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]
    proxy = FaultProxy()
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve, "127.0.0.1", dead_port)
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as client:
            with trio.fail_after(DEADLINE):
                with suppress(trio.BrokenResourceError):
                    assert await client.receive_some() == b""
        assert proxy.statistics().connections_failed == 1
        nursery.cancel_scope.cancel()


async def test_cancelling_serve_closes_every_socket() -> None:
    async with proxied() as setup:
        client, _server = await setup.connect()
        setup.clients.remove(client)
        proxy_port = setup.proxy.port
    # serve was cancelled with the connection open: the client is cut off...
    with trio.fail_after(DEADLINE):
        with suppress(trio.BrokenResourceError):
            assert await client.receive_some() == b""
    # ...and nothing listens any more.
    await client.aclose()
    with pytest.raises(OSError, match="all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", proxy_port)
    with pytest.raises(RuntimeError):
        _ = setup.proxy.port


async def test_a_proxy_serves_once() -> None:
    async with proxied() as setup:
        with pytest.raises(RuntimeError, match="already serving"):
            await setup.proxy.serve("127.0.0.1", 9)


async def test_the_proxy_listens_on_loopback_only() -> None:
    proxy = FaultProxy()
    for host in ("0.0.0.0", "localhost", "192.0.2.1"):
        with pytest.raises(ValueError, match="loopback"):
            await proxy.serve("127.0.0.1", 9, listen_host=host)
    with pytest.raises(RuntimeError, match="not listening"):
        _ = proxy.port
