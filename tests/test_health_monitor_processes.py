"""Application health across two processes: a worker stops checking in, a client's breaker opens.

A companion of ``test_health.py`` (issue #12, the real-process test): the
health board's promise, carried by the monitor, the server and a liveness
breaker, end to end over a real loopback socket and the real clock. The server
is a child process, ``tests/_health_worker_server.py``: an echo server whose
health monitor has one component, ``worker``, which must check in every
:data:`PERIOD` seconds and stands for NOT_SERVING when it misses; ``pause`` and
``resume`` on its stdin stop and restart the worker's check-ins. This process
is the client: a reconnecting client with a :class:`Breaker` bound to it, and
calls (a message, then its echo) made one after another through
``call_with_fallback``, whose fallback answers :data:`FALLBACK`.

While the worker runs, the server answers. Once it is paused, no call fails:
the server goes NOT_SERVING at the worker's deadline, by its monitor's timer,
says so in its next PING, and the breaker is FORCED_OPEN at the very instant
the client hears it; from then on the fallback answers and no call reaches the
server (it counts its echoes). Once resumed, the first heartbeat from the
SERVING server turns the breaker HALF_OPEN, its trial calls close it, and the
server answers again, over the same connection all along.

Bounds are generous: :data:`OPEN_BOUND` for the opening, which is expected
:data:`PERIOD` after the worker's last check-in plus a round trip (0.4 to 0.6 s
after the ``pause`` on an idle machine), and for the half-opening after the
``resume`` (a few milliseconds: the first check-in sends a PING at once). The
whole test takes about 4 s; the child is killed on the way out, however the
test ends.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from helpers import reap

from trio_heartbeat import (
    HEARTBEAT_BREAKER_CONFIG,
    Breaker,
    BreakerState,
    BreakerTransition,
    CircuitOpen,
    Config,
    Connection,
    Event,
    HealthStatus,
    PeerHealthChanged,
    ReconnectingClient,
    bind_breaker,
    open_reconnecting_client,
)

pytestmark = pytest.mark.slow

SERVER_SCRIPT = Path(__file__).with_name("_health_worker_server.py")
#: The worker's check-in period in the server (it checks in five times a period).
PERIOD = 0.5
#: The client's heartbeat settings: the server's, which PINGs every 0.2 s too.
CLIENT_CONFIG = Config(interval=0.2, timeout=2.0)
#: Bound on the breaker's opening after ``pause``, and its half-opening after ``resume``.
OPEN_BOUND = 3.0
#: The earliest the breaker may open after ``pause``: the worker's deadline is
#: :data:`PERIOD` after its last check-in, which came at most one check-in step
#: (a fifth of the period) before the ``pause`` was read, or a little more if the
#: worker's own timer fired late: hence half the period, to be safe.
EARLIEST_OPEN = PERIOD / 2
#: The real clock moves a little between two listeners of one event.
SAME_DISPATCH = 0.05
#: Bound on anything else that is only waited for (start-up, connecting, a line).
BOUND = 10.0
#: How long the test goes on calling while the breaker is open, and how often it calls.
OPEN_HOLD = 1.0
CALL_EVERY = 0.05
#: What the fallback answers.
FALLBACK = b"<fallback>"
#: Calls that must all be answered by the server while the worker runs.
SERVED_CALLS = 10


# -- the server process ---------------------------------------------------------------


@dataclass
class WorkerServer:
    """The running ``_health_worker_server.py``: commands in, its stdout lines out."""

    process: trio.Process
    host: str
    port: int
    stderr_path: Path
    lines: list[str] = field(default_factory=list)
    _pending: bytes = b""

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def command(self, command: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(command.encode() + b"\n")

    async def next_line(self) -> str:
        """The next line the server prints (within :data:`BOUND`); kept in :attr:`lines`."""
        assert self.process.stdout is not None
        with trio.fail_after(BOUND):
            while b"\n" not in self._pending:
                chunk = await self.process.stdout.receive_some()
                assert chunk, f"the server exited:\n{self.stderr()}"
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        self.lines.append(line.decode())
        return self.lines[-1]

    async def wait_line(self, pattern: str) -> re.Match[str]:
        """Read lines until one matches ``pattern`` from its start; its match."""
        while not (found := re.match(pattern, await self.next_line())):
            pass
        return found


@asynccontextmanager
async def worker_server(log_dir: Path) -> AsyncIterator[WorkerServer]:
    """Start the server and wait for ``listening on``; killed and waited for on the way out."""
    stderr_path = log_dir / "health-worker-server.stderr"
    with stderr_path.open("wb") as stderr_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(SERVER_SCRIPT), str(PERIOD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )
    try:
        server = WorkerServer(process, "", 0, stderr_path)
        listening = await server.wait_line(r"listening on (\S+):(\d+)$")
        server.host, server.port = listening[1], int(listening[2])
        yield server
    finally:
        await reap(process)


# -- the client's calls -----------------------------------------------------------------


@dataclass
class Calls:
    """Calls made one at a time through the breaker, and who answered them."""

    client: ReconnectingClient
    breaker: Breaker
    #: (the breaker's state when it admitted or refused the call, who answered:
    #: "server" or "fallback"), one per call.
    made: list[tuple[BreakerState, str]] = field(default_factory=list)

    def answered_by(self, who: str, since: int = 0) -> int:
        return sum(answerer == who for _, answerer in self.made[since:])

    async def echo(self, payload: bytes) -> bytes:
        # Admitted a moment ago, with no checkpoint since: the state that admitted it.
        self.made.append((self.breaker.core.state, "server"))
        await self.client.send(payload)
        with trio.fail_after(BOUND):
            return await self.client.receive()

    async def fallback(self, exc: Exception) -> bytes:
        assert isinstance(exc, CircuitOpen), repr(exc)
        self.made.append((exc.state, "fallback"))
        return FALLBACK

    async def call(self) -> str:
        """One call, then :data:`CALL_EVERY` of rest: who answered it."""
        payload = b"call %d" % len(self.made)
        # on_failure=False: a failed call is a failure of the test, not a degraded answer.
        answer = await self.breaker.call_with_fallback(
            self.echo, payload, fallback=self.fallback, on_failure=False
        )
        assert answer == (payload if self.made[-1][1] == "server" else FALLBACK), answer
        await trio.sleep(CALL_EVERY)
        return self.made[-1][1]

    async def until(self, state: BreakerState, bound: float = BOUND) -> None:
        """Call on until the breaker is in ``state`` (within ``bound``)."""
        with trio.fail_after(bound):
            while self.breaker.state is not state:
                await self.call()


def peer_health(conn: Connection) -> HealthStatus | None:
    """What the server last reported (read afresh: the type checker keeps no stale narrowing)."""
    return conn.peer_health


# -- the test ---------------------------------------------------------------------------


async def test_a_worker_that_stops_checking_in_opens_the_clients_breaker_until_it_recovers(
    tmp_path: Path,
) -> None:
    """Pause the server's worker: the breaker opens on its health alone; resume: it closes.

    Pins, in order: once the breaker has closed on the first connection, the
    server answers every call; after ``pause``, the breaker is FORCED_OPEN
    because the peer reports NOT_SERVING, not before the worker can have
    missed its deadline (:data:`EARLIEST_OPEN`) and within :data:`OPEN_BOUND`,
    in the same dispatch as the connection's :class:`PeerHealthChanged`;
    meanwhile no call fails and none reaches the server: the fallback answers
    each one, the breaker counts each as rejected, and the server's count of
    echoes when its worker resumes is exactly the client's count of answers;
    after ``resume``, the breaker goes HALF_OPEN ("liveness restored") within
    :data:`OPEN_BOUND`, closes after exactly ``permitted_calls_in_half_open``
    trial calls, all answered by the server, and the server answers again.
    One connection throughout, and the server's own monitor went NOT_SERVING
    after the worker paused, then SERVING as it resumed.
    """
    transitions: list[BreakerTransition] = []
    health_news: list[tuple[float, HealthStatus]] = []

    def on_event(_conn: Connection, event: Event) -> None:
        if isinstance(event, PeerHealthChanged):
            health_news.append((trio.current_time(), event.status))

    async with (
        worker_server(tmp_path) as server,
        open_reconnecting_client(
            [f"{server.host}:{server.port}"],
            config=CLIENT_CONFIG,
            connection_listeners=[on_event],
        ) as client,
    ):
        breaker = Breaker()
        breaker.add_listener(transitions.append)
        with bind_breaker(breaker, client):
            calls = Calls(client, breaker)
            with trio.fail_after(BOUND):
                conn = await client.wait_connected()
            await calls.until(BreakerState.CLOSED)

            # The worker runs: the server answers.
            for _ in range(SERVED_CALLS):
                assert await calls.call() == "server", server.stderr()
            assert peer_health(conn) is HealthStatus.SERVING

            # Pause it: the breaker opens on the server's health, with no failed call.
            before_pause = len(transitions)
            paused_at = trio.current_time()
            await server.command("pause")
            await calls.until(BreakerState.FORCED_OPEN, OPEN_BOUND)
            opened = transitions[before_pause]
            assert (opened.previous, opened.state) == (
                BreakerState.CLOSED,
                BreakerState.FORCED_OPEN,
            ), transitions
            assert opened.reason == "peer reports NOT_SERVING", opened
            opened_after = opened.at - paused_at
            assert EARLIEST_OPEN <= opened_after <= OPEN_BOUND, opened_after
            heard_at, heard = health_news[-1]
            assert heard is HealthStatus.NOT_SERVING, health_news
            assert abs(heard_at - opened.at) <= SAME_DISPATCH, (heard_at, opened)
            assert peer_health(conn) is HealthStatus.NOT_SERVING
            with trio.fail_after(BOUND):  # the connection's own wait agrees
                await conn.wait_peer_health(HealthStatus.NOT_SERVING)

            # While it is open, the fallback answers every call and none reaches the server.
            served_before = calls.answered_by("server")
            rejected_before = breaker.statistics().rejected
            made_before = len(calls.made)
            hold_until = trio.current_time() + OPEN_HOLD
            while trio.current_time() < hold_until:
                assert await calls.call() == "fallback"
            refused = len(calls.made) - made_before
            assert calls.made[made_before:] == [(BreakerState.FORCED_OPEN, "fallback")] * refused
            assert refused >= OPEN_HOLD / CALL_EVERY / 4
            statistics = breaker.statistics()
            assert statistics.state is BreakerState.FORCED_OPEN
            assert statistics.rejected - rejected_before == refused
            assert (statistics.failures, statistics.trips, statistics.in_flight) == (0, 0, 0)

            # Resume it: the next heartbeat half-opens the breaker, trial calls close it.
            made_before = len(calls.made)
            resumed_at = trio.current_time()
            await server.command("resume")
            await calls.until(BreakerState.CLOSED, OPEN_BOUND + BOUND)
            reopened, closed = transitions[before_pause + 1 :]
            assert (reopened.state, reopened.reason) == (
                BreakerState.HALF_OPEN,
                "liveness restored",
            ), transitions
            half_opened_after = reopened.at - resumed_at
            assert 0 < half_opened_after <= OPEN_BOUND, half_opened_after
            assert (closed.previous, closed.state) == (BreakerState.HALF_OPEN, BreakerState.CLOSED)
            trials = [
                who for state, who in calls.made[made_before:] if state is BreakerState.HALF_OPEN
            ]
            trial_calls = HEARTBEAT_BREAKER_CONFIG.permitted_calls_in_half_open
            assert trials == ["server"] * trial_calls, calls.made[made_before:]
            assert calls.answered_by("server", made_before) == trial_calls
            for _ in range(SERVED_CALLS):
                assert await calls.call() == "server", server.stderr()
            assert peer_health(conn) is HealthStatus.SERVING
            assert client.connection is conn
            assert client.connections == 1

        # The server's view: its worker, its health, and the echoes it sent.
        await server.wait_line(r"worker resumed after")
        told = [line for line in server.lines if not line.startswith("listening on")]
        assert [line.rpartition(" after ")[0] for line in told] == [
            "worker paused",
            "health NOT_SERVING",
            "health SERVING",  # the worker's first check-in again
            "worker resumed",
        ], told
        echoes = [int(line.rpartition(" after ")[2].removesuffix(" echoes")) for line in told]
        assert echoes[0] <= echoes[1] <= served_before, told
        assert echoes[2] == echoes[3] == served_before, (told, served_before)

    print(
        f"opened {opened_after:.3f} s after pause, half-open {half_opened_after:.3f} s after resume"
    )
