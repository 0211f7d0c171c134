"""``notify_systemd`` (``_systemd.py``): what a server tells systemd, and when, in virtual time.

A real datagram socket stands in for systemd's ``NOTIFY_SOCKET``; a reader
task notes every datagram with the virtual time it came at. What it pins:
READY=1 with a status line at the start, STATUS= when the peers or the health
change, WATCHDOG=1 at its interval while healthy, no pings once the server has
been NOT_SERVING for longer than the grace or the application says no, pings
again when it recovers, and STOPPING=1 the moment the server drains.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers import echo
from trio.testing import MockClock

from trio_heartbeat._backoff import ConstantBackoff
from trio_heartbeat._errors import SupervisorGaveUp
from trio_heartbeat._frames import HealthStatus, Role
from trio_heartbeat._restart import RestartBudget
from trio_heartbeat._sdnotify import SystemdNotifier
from trio_heartbeat._server import Server
from trio_heartbeat._services import ChildSpec, open_service_supervisor
from trio_heartbeat._stream_connection import open_stream_connection
from trio_heartbeat._systemd import notify_systemd


class Systemd:
    """The receiving end: every datagram, with the virtual time it was read."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.heard: list[tuple[float, str]] = []

    async def read(self) -> None:
        while True:
            data = await self.sock.recv(65536)
            self.heard.append((trio.current_time(), data.decode()))

    def messages(self, prefix: str) -> list[tuple[float, str]]:
        return [(at, text) for at, text in self.heard if text.startswith(prefix)]


async def close_at_exit(notifier: SystemdNotifier) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await notifier.aclose()


@asynccontextmanager
async def systemd(tmp_path: Path) -> AsyncIterator[tuple[Systemd, str]]:
    path = str(tmp_path / "notify")
    # Bound synchronously: Trio binds a path in a thread, and virtual time would
    # jump ahead while it waits.
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    plain.bind(path)
    sock = trio.socket.from_stdlib_socket(plain)
    listener = Systemd(sock)
    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener.read)
            yield listener, path
            await trio.sleep(0.01)  # the last datagrams are read
            nursery.cancel_scope.cancel()


async def test_ready_status_watchdog_and_stopping(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    """Watchdog every 1 s; a peer joins at 2.5 (STATUS at once: the registry changed);
    NOT_SERVING from 3.75 with a grace of 2 s: the tick at 4.0 first sees it, so pings go
    on until 6.0 (4.0 + 2) and stop at 7.0, and the status line says so at the next look
    (4.5, once a second); SERVING again at 7.75: pings from 8.0, the line at 8.5; the drain
    at 9.25 sends STOPPING=1 at once."""
    server = Server(echo)
    async with systemd(tmp_path) as (listener, path), trio.open_nursery() as nursery:
        notifier = SystemdNotifier(path, watchdog_interval=1.0)
        nursery.start_soon(close_at_exit, notifier)
        started = await nursery.start(partial(notify_systemd, server, notifier, grace=2.0))
        assert started is notifier
        await trio.sleep_until(2.5)
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, server_stream)
        async with open_stream_connection(client_stream, role=Role.CLIENT):
            await trio.sleep_until(3.75)
            server.set_health(HealthStatus.NOT_SERVING)
            await trio.sleep_until(7.75)
            server.set_health(HealthStatus.SERVING)
            await trio.sleep_until(9.25)
        nursery.start_soon(server.drain)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert listener.messages("READY") == [(0.0, "READY=1\nSTATUS=0 peer(s), SERVING")]
    assert [at for at, _ in listener.messages("WATCHDOG")] == [
        0.0,
        1.0,
        2.0,
        3.0,
        4.0,
        5.0,
        6.0,
        8.0,
        9.0,
    ]
    assert listener.messages("STATUS") == [
        (2.5, "STATUS=1 peer(s), SERVING"),
        (4.5, "STATUS=1 peer(s), NOT_SERVING"),
        (8.5, "STATUS=1 peer(s), SERVING"),
        (9.25, "STATUS=0 peer(s), SERVING"),
    ]
    stopping = listener.messages("STOPPING")
    assert stopping[0][0] == 9.25
    assert stopping[0][1].startswith("STOPPING=1\nSTATUS=draining")


async def test_the_applications_own_word_stops_the_pings(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    """``healthy()`` says no from 2.5 (a supervisor that gave up, say): no ping from 3.0 on,
    though the server is SERVING."""
    server = Server(echo)
    verdict = [True]
    async with systemd(tmp_path) as (listener, path), trio.open_nursery() as nursery:
        notifier = SystemdNotifier(path, watchdog_interval=1.0)
        nursery.start_soon(close_at_exit, notifier)
        await nursery.start(partial(notify_systemd, server, notifier, healthy=lambda: verdict[0]))
        await trio.sleep_until(2.5)
        verdict[0] = False
        await trio.sleep_until(5.5)
        nursery.cancel_scope.cancel()
    assert [at for at, _ in listener.messages("WATCHDOG")] == [0.0, 1.0, 2.0]


async def test_the_pings_stop_the_moment_a_supervisor_gives_up(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    """``healthy`` is the supervisor's ``error is None``; a child crashes at 2.2 and at
    once on its restart (budget 1 in 5 s): the supervisor gives up at 2.2, though a
    sibling takes 30 s to stop (the exception comes at 32.2); the last ping is at 2.0."""
    server = Server(echo)
    crashes = [2.2, 0.0]

    async def crashing() -> None:
        await trio.sleep(crashes.pop(0) if crashes else math.inf)
        raise RuntimeError("crash")

    async def slow_to_stop() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(30.0)

    children = [ChildSpec("slow", slow_to_stop, shutdown_timeout=60.0), ChildSpec("c", crashing)]
    errors: list[SupervisorGaveUp | None] = []

    async def supervised(nursery: trio.Nursery, notifier: SystemdNotifier) -> None:
        async with open_service_supervisor(
            children, budget=RestartBudget(1, 5.0), backoff=ConstantBackoff(0.0)
        ) as supervisor:
            alive = lambda: supervisor.error is None  # noqa: E731
            await nursery.start(partial(notify_systemd, server, notifier, healthy=alive))
            await trio.sleep_until(2.1)
            errors.append(supervisor.error)
            await trio.sleep_until(2.3)
            errors.append(supervisor.error)
            await trio.sleep_forever()

    async with systemd(tmp_path) as (listener, path), trio.open_nursery() as nursery:
        notifier = SystemdNotifier(path, watchdog_interval=1.0)
        nursery.start_soon(close_at_exit, notifier)
        with pytest.raises(SupervisorGaveUp) as caught:
            await supervised(nursery, notifier)
        assert trio.current_time() == 32.2
        nursery.cancel_scope.cancel()
    assert errors[0] is None
    assert str(errors[1]) == str(caught.value)
    assert [at for at, _ in listener.messages("WATCHDOG")] == [0.0, 1.0, 2.0]


async def test_without_notify_socket_it_returns_at_once(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    async with trio.open_nursery() as nursery:
        assert await nursery.start(notify_systemd, Server(echo)) is None
    assert trio.current_time() == 0.0


async def test_bad_settings_are_refused(autojump_clock: MockClock) -> None:
    """A negative or infinite grace, and a status_every of 0 or less, are refused before
    anything is sent, with this exact message. In an already-cancelled scope, so that a
    call that wrongly went ahead ends at its first checkpoint instead of running forever."""
    message = r"^grace must be finite and not negative, status_every positive$"
    for grace, status_every in (
        (-1.0, 1.0),
        (math.inf, 1.0),
        (math.nan, 1.0),
        (1.0, 0.0),
        (1.0, -1.0),
    ):
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(ValueError, match=message):
                await notify_systemd(
                    Server(echo), SystemdNotifier("/tmp/x"), grace=grace, status_every=status_every
                )
        assert not scope.cancelled_caught, (grace, status_every)


@pytest.mark.parametrize("grace", [0.0, 0.5])
async def test_a_grace_under_a_second_and_not_serving_from_the_start(
    autojump_clock: MockClock, tmp_path: Path, grace: float
) -> None:
    """A grace of 0 or 0.5 s is accepted. The server is NOT_SERVING before the watchdog
    starts: the tick at 0.0 first sees it and still pings (0 s of it is not more than the
    grace), the tick at 1.0 does not; SERVING again at 2.25, pings from 3.0. The status
    line is looked at once a second by default: the change shows at 3.0, not 2.25."""
    server = Server(echo)
    server.set_health(HealthStatus.NOT_SERVING)
    async with systemd(tmp_path) as (listener, path), trio.open_nursery() as nursery:
        notifier = SystemdNotifier(path, watchdog_interval=1.0)
        nursery.start_soon(close_at_exit, notifier)
        await nursery.start(partial(notify_systemd, server, notifier, grace=grace))
        await trio.sleep_until(2.25)
        server.set_health(HealthStatus.SERVING)
        await trio.sleep_until(4.5)
        nursery.cancel_scope.cancel()
    assert listener.messages("READY") == [(0.0, "READY=1\nSTATUS=0 peer(s), NOT_SERVING")]
    assert [at for at, _ in listener.messages("WATCHDOG")] == [0.0, 3.0, 4.0]
    assert listener.messages("STATUS") == [(3.0, "STATUS=0 peer(s), SERVING")]


async def test_the_notifier_comes_from_the_environment_by_default(
    autojump_clock: MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a notifier, NOTIFY_SOCKET and WATCHDOG_USEC (2 s: a ping a second) are
    read: READY=1 at once and the pings go to that socket, and the notifier is reported."""
    server = Server(echo)
    async with systemd(tmp_path) as (listener, path), trio.open_nursery() as nursery:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "2000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        notifier = await nursery.start(notify_systemd, server)
        assert isinstance(notifier, SystemdNotifier)
        assert (notifier.address, notifier.watchdog_interval) == (path, 1.0)
        nursery.start_soon(close_at_exit, notifier)
        await trio.sleep_until(2.5)
        nursery.cancel_scope.cancel()
    assert listener.messages("READY") == [(0.0, "READY=1\nSTATUS=0 peer(s), SERVING")]
    assert [at for at, _ in listener.messages("WATCHDOG")] == [0.0, 1.0, 2.0]
