"""The in-memory network of the test kit (``testing/_network.py``), in virtual time.

Hosts that refuse, go down, come back, get killed or share one set of fault
controls; and the fleet helpers, :func:`run_server_and_clients` and
:func:`run_clients`, which start a server and many reconnecting clients on it.
"""

from __future__ import annotations

import errno
import logging

import pytest
import trio
import trio.testing
from helpers import ENDPOINT, close_first_with

from trio_heartbeat import (
    CloseCode,
    Connection,
    ConstantBackoff,
    ReconnectFailed,
    Server,
    SupervisorState,
    open_stream_connection,
)
from trio_heartbeat.testing import (
    HostState,
    MemoryNetwork,
    open_memory_network,
    run_clients,
    run_server_and_clients,
)


async def echo(conn: Connection) -> None:
    async for message in conn:
        await conn.send(message)


async def echo_bytes(stream: trio.abc.Stream, address: str) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


async def test_nothing_listening_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_network() as network:
        with pytest.raises(ConnectionRefusedError) as info:
            await network.connect("nowhere", 1)
        assert info.value.errno == errno.ECONNREFUSED
        with pytest.raises(KeyError):
            network.host("nowhere:1")


async def test_an_address_is_taken_once(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_network() as network:
        host = network.listen(("server", 1), echo)
        assert network.host("server:1") is host
        with pytest.raises(OSError, match="in use") as info:
            network.listen_raw("server:1", echo_bytes)
        assert info.value.errno == errno.EADDRINUSE


async def test_a_server_instance_is_served_as_it_is(autojump_clock: trio.testing.MockClock) -> None:
    server = Server(echo)
    async with open_memory_network() as network:
        host = network.listen("server:1", server)
        assert host.server is server
        with pytest.raises(TypeError, match="Server"):
            network.listen("other:1", server, max_connections=2)
        with pytest.raises(TypeError, match="server or handler"):
            host.up(max_connections=2)
        stream = await network.connect("server", 1)
        async with open_stream_connection(stream) as conn:
            await conn.send(b"hi")
            assert await conn.receive() == b"hi"
            assert host.active == 1
            assert host.accepted == 1


async def test_kill_resets_both_ends_and_ends_the_server_side(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_network() as network:
        host = network.listen_raw("raw:1", echo_bytes)
        stream = await network.connect("raw", 1)
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
        assert host.active == 1
        host.kill()
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()
        await trio.testing.wait_all_tasks_blocked()
        assert host.active == 0
        assert host.state is HostState.UP  # kill alone keeps accepting
        again = await network.connect("raw", 1)
        await again.send_all(b"pong")
        assert await again.receive_some() == b"pong"


async def test_down_refuses_or_leaves_attempts_hanging(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_network() as network:
        host = network.listen_raw("raw:1", echo_bytes)
        survivor = await network.connect("raw", 1)
        host.down(kill=False)
        refusing = host.state
        assert refusing is HostState.REFUSING
        with pytest.raises(ConnectionRefusedError):
            await network.connect("raw", 1)
        assert host.refused == 1
        await survivor.send_all(b"still up")
        assert await survivor.receive_some() == b"still up"

        host.down(unreachable=True)
        assert host.state is HostState.UNREACHABLE
        with pytest.raises(trio.BrokenResourceError):
            await survivor.receive_some()
        with trio.move_on_after(5.0) as gave_up:
            await network.connect("raw", 1)
        assert gave_up.cancelled_caught
        assert trio.current_time() == 5.0

        async def come_back() -> None:
            await trio.sleep(2.0)
            host.up()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(come_back)
            stream = await network.connect("raw", 1)
            assert trio.current_time() == 7.0  # the hanging attempt went through once up
        await stream.send_all(b"back")
        assert await stream.receive_some() == b"back"
        assert (host.accepted, host.refused) == (2, 1)


async def test_host_faults_apply_to_every_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_network() as network:
        host = network.listen_raw("raw:1", echo_bytes)
        host.faults.set_delay(0.25)
        for _ in range(2):
            stream = await network.connect("raw", 1)
            started = trio.current_time()
            await stream.send_all(b"x")
            assert await stream.receive_some() == b"x"
            assert trio.current_time() == started + 0.5  # there and back


async def test_a_raw_handler_error_comes_out_as_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def broken(stream: trio.abc.Stream, address: str) -> None:
        raise ValueError(f"bug serving {address}")

    async def serve_broken(network: MemoryNetwork) -> None:
        network.listen_raw("raw:1", broken)
        await network.connect("raw", 1)
        await trio.sleep_forever()

    with pytest.raises(ValueError, match="bug serving memory:"):
        async with open_memory_network() as network:
            await serve_broken(network)


async def test_a_reset_while_closing_ends_the_connection_cleanly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The server asks to close and the connection is reset at the same instant:
    # its writer, woken by the close, may run after the reader has recorded the
    # reset. That must end the connection as broken, not crash the handler.
    # Trio runs the two in either order, so try it a number of times.
    closed: list[int] = []

    async def close_and_reset(conn: Connection) -> None:
        conn.close_nowait(CloseCode.NORMAL)
        host.faults.reset()
        closed.append((await conn.wait_closed()).code)

    async with open_memory_network() as network:
        host = network.listen("server:1", close_and_reset)
        for _ in range(20):
            stream = await network.connect("server", 1)
            with pytest.raises(Exception):  # noqa: B017, PT011 - broken or closed, either is fine
                async with open_stream_connection(stream) as conn:
                    await conn.receive()
            await trio.testing.wait_all_tasks_blocked()
    assert len(closed) == 20
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_run_server_and_clients_on_a_given_network(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_network() as network:
        async with run_server_and_clients(
            Server(echo), 3, endpoint="elsewhere:7", network=network, wait_connected=False
        ) as fleet:
            assert fleet.network is network
            assert network.host("elsewhere:7") is fleet.host
            for client in fleet.clients:
                await client.wait_connected()
            assert trio.current_time() == 0.0
        assert fleet.host.accepted == 3


# -- the fleet helpers -----------------------------------------------------------------


async def test_run_server_and_clients_brings_a_fleet_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with run_server_and_clients(echo, 5, backoff=ConstantBackoff(1.0)) as fleet:
        await trio.testing.wait_all_tasks_blocked()  # the server side is OPEN too
        assert len(fleet.server.registry) == 5
        fleet.host.down()
        assert fleet.host.state is HostState.REFUSING
        await trio.sleep(2.5)
        assert all(c.state is SupervisorState.BACKING_OFF for c in fleet.clients)
        fleet.host.up(echo)  # a restarted process: a fresh server
        for client in fleet.clients:
            await client.wait_connected()
        assert trio.current_time() == 3.0
        await trio.testing.wait_all_tasks_blocked()
        assert len(fleet.server.registry) == 5
        assert fleet.host.refused == 10
        for i, client in enumerate(fleet.clients):
            await client.send(b"%d" % i)
            assert await client.receive() == b"%d" % i
    assert all(c.state is SupervisorState.CLOSED for c in fleet.clients)


async def test_run_clients_passes_a_give_up_through(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_network() as network:
        network.listen(ENDPOINT, close_first_with(CloseCode.POLICY_VIOLATION))
        with pytest.raises(ReconnectFailed):
            async with run_clients(network, ENDPOINT, 2) as clients:
                await trio.sleep_forever()
    assert [c.state for c in clients] == [SupervisorState.CLOSED] * 2
