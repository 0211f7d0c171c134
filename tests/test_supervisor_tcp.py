"""The reconnect supervisor over real TCP on loopback: a server restarted on the same port.

These run in real time, so they check the order of events and what arrives,
with generous bounds, and leave exact timings to tests/test_supervisor.py.
"""

from __future__ import annotations

import trio

from trio_heartbeat import (
    AttemptFailed,
    AttemptStarted,
    BackingOff,
    CloseCode,
    Config,
    Connected,
    Connection,
    ConstantBackoff,
    Disconnected,
    Server,
    SupervisorEvent,
    SupervisorState,
    open_reconnecting_client,
    serve_tcp,
)

LOOPBACK = "127.0.0.1"
#: Far more than any of these tests needs; they fail instead of hanging.
BOUND = 10.0


async def echo(conn: Connection) -> None:
    async for message in conn:
        await conn.send(message)


async def serve_until_drained(
    port: int,
    stopped: trio.Event,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    # ``stopped`` is set once the listener is closed, so that the port can be
    # bound again by the next server.
    try:
        await serve_tcp(echo, port, host=LOOPBACK, task_status=task_status)
    finally:
        stopped.set()


async def test_reconnects_after_a_server_restart_on_the_same_port() -> None:
    events: list[SupervisorEvent] = []
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            first_stopped = trio.Event()
            first: Server = await nursery.start(serve_until_drained, 0, first_stopped)
            port = first.port
            async with open_reconnecting_client(
                [f"{LOOPBACK}:{port}"], backoff=ConstantBackoff(0.05), listeners=[events.append]
            ) as client:
                await client.send(b"before")
                assert await client.receive() == b"before"

                await first.drain(grace=BOUND)  # CLOSE 1001 to the client, then gone
                await first_stopped.wait()
                await client.wait_state(SupervisorState.BACKING_OFF)
                await client.send(b"while down")  # buffered until the next connection

                second_stopped = trio.Event()
                second: Server = await nursery.start(serve_until_drained, port, second_stopped)
                conn = await client.wait_connected()
                assert conn.remote_address == f"{LOOPBACK}:{port}"
                assert await client.receive() == b"while down"
                await client.send(b"after")
                assert await client.receive() == b"after"
            await second.drain(grace=BOUND)

    kinds = [type(event) for event in events]
    assert kinds[:4] == [AttemptStarted, Connected, Disconnected, AttemptStarted]
    assert isinstance(events[2], Disconnected)
    assert events[2].error.code == CloseCode.GOING_AWAY
    # After 1001 the supervisor came straight back, found nobody, and backed off
    # until the second server was listening.
    assert kinds[4:6] == [AttemptFailed, BackingOff]
    assert kinds[-2:] == [Connected, type(events[-1])]
    assert all(kind in (AttemptStarted, AttemptFailed, BackingOff) for kind in kinds[4:-2])
    assert client.connections == 2
    assert first.statistics().closed_by_code == {CloseCode.GOING_AWAY: 1}
    assert second.statistics().completed_handshakes == 1


async def greet_in_turn(conn: Connection) -> None:
    await conn.send(b"hello from %s" % conn.config.instance_id.encode())
    await echo(conn)


async def serve_in(
    scope: trio.CancelScope,
    port: int,
    name: str,
    stopped: trio.Event,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        with scope:
            await serve_tcp(
                greet_in_turn,
                port,
                host=LOOPBACK,
                config=Config(instance_id=name),
                task_status=task_status,
            )
    finally:
        stopped.set()


async def test_receive_carries_on_when_a_cancelled_server_comes_back_on_its_port() -> None:
    # The first server is cancelled rather than drained, as when its process
    # is told to stop: its connections are torn down at once.
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            first_scope, first_stopped = trio.CancelScope(), trio.Event()
            first: Server = await nursery.start(serve_in, first_scope, 0, "first", first_stopped)
            port = first.port
            async with open_reconnecting_client(
                [(LOOPBACK, port)], backoff=ConstantBackoff(0.05)
            ) as client:
                assert await client.receive() == b"hello from first"
                first_scope.cancel()
                await first_stopped.wait()
                second_scope, second_stopped = trio.CancelScope(), trio.Event()
                await nursery.start(serve_in, second_scope, port, "second", second_stopped)
                assert await client.receive() == b"hello from second"
                await client.send(b"still in touch")
                assert await client.receive() == b"still in touch"
            second_scope.cancel()
    assert client.connections == 2
