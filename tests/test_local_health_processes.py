"""Local health on real processes: our own stall never convicts a healthy peer, and no blind spot.

A companion of ``test_local_health.py``: the same promises (issue #11, sections
2 and 3), kept here because they need real processes, real loopback sockets
and the real clock. A ``python -m trio_heartbeat serve`` or ``connect``
process is frozen with SIGSTOP for longer than its own timeout and then
resumed with SIGCONT, or this test's own event loop is blocked by a blocking
call, while its peer, whose timeout is longer, keeps sending heartbeats into
the socket. On resuming, the side that stalled must hear what was waiting
before it judges anyone, so a healthy peer is never convicted for our
lateness; a peer that really froze meanwhile is still convicted promptly.

The server is a ``serve`` process, or a TLS echo server in a ``python -c``
process (``serve`` has no TLS option, and the runtime reads a TLS stream by
another path than a plain socket).

The tests of section 3 are the blind spot of an application that does not
read: its inbound queue is full, and then the peer is frozen. The timeout
still bounds detection, whatever the application does, for a plain
connection and for the reconnecting client behind a send-only application;
and while the peer is healthy, a full queue convicts nobody.

The server's verdicts are read from its INFO log (``HOST:PORT: ended with CODE
(REASON), closed by us|the peer``), the ``connect`` client's from its
supervisor's (``disconnected from ...``). Bounds are generous: a stall is 5 s
against a 3 s timeout, the side that must tolerate it has a 10 s timeout, and a
due conviction gets :data:`MARGIN`. Every child is resumed and killed on the way out.
"""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from math import inf
from pathlib import Path

import pytest
import trio
import trustme
from helpers import LOOPBACK, SERVE_STARTUP, ServeProcess, reap, run_serve_process

from trio_heartbeat import (
    Config,
    Connection,
    ConnectionClosed,
    ConnectionOptions,
    Disconnected,
    FixedTimeout,
    HeartbeatTimeout,
    ReconnectingClient,
    Server,
    SupervisorEvent,
    SupervisorState,
    open_connection,
    open_reconnecting_client,
    serve_tcp,
)

pytestmark = pytest.mark.slow

INTERVAL = 1.0
#: The timeout of the side that stalls, or that must convict a frozen peer.
SHORT = 3.0
#: The timeout of the side that must sit out the other's stall.
LONG = 10.0
#: Longer than :data:`SHORT`, well short of :data:`LONG`.
STALL = 5.0
#: How long after a conviction falls due it may come, on a loaded machine.
MARGIN = 1.0
#: After a resume: time for the side that stalled to judge its (long overdue) peers.
SETTLE = 1.0
#: Enough for a process to finish answering and go back to waiting for input.
QUIET = 0.25
#: Bound on anything that is only waited for (a round trip, a log line).
BOUND = 10.0
#: DATA a connection queues for an application that does not read (the reconnecting
#: client's ``receive_buffer`` holds as many on top).
QUEUE = ConnectionOptions().receive_queue
#: Messages beyond what the queues hold: a few, and small (24 bytes each), so
#: that little DATA waits in the socket in front of the heartbeats.
EXTRA = 16

SHORT_CONFIG = Config(interval=INTERVAL, timeout=SHORT)
LONG_CONFIG = Config(interval=INTERVAL, timeout=LONG)
#: The side that must sit out its peer's stall waits for its whole (long) timeout:
#: a warmed-up adaptive detector would rightly convict a peer silent for 5 s.
LENIENT = ConnectionOptions(detector=FixedTimeout)
CLI = [sys.executable, "-m", "trio_heartbeat"]
_connect_serial = count()


# -- processes -------------------------------------------------------------------------


async def stop(process: trio.Process) -> None:
    """SIGSTOP ``process`` once it is idle, waiting for input (as a process mostly is).

    Stopped in the middle of some work (answering the message we just sent),
    it would work out how long to wait for input only after SIGCONT, and so
    see its input at once: the stall under test would not happen.
    """
    await trio.sleep(QUIET)
    process.send_signal(signal.SIGSTOP)


@asynccontextmanager
async def stopped(process: trio.Process) -> AsyncIterator[None]:
    """:func:`stop` ``process`` for the block; SIGCONT on the way out, however it is left."""
    await stop(process)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


def heartbeat_options(timeout: float) -> tuple[str, ...]:
    lenient = ("--detector", "fixed") if timeout == LONG else ()
    return ("--interval", str(INTERVAL), "--timeout", str(timeout), *lenient)


@dataclass
class ConnectProcess:
    """A running ``python -m trio_heartbeat connect``: stdin lines out, DATA on stdout."""

    process: trio.Process
    stderr_path: Path
    _pending: bytearray = field(default_factory=bytearray)

    def stderr(self) -> str:
        """Everything the client has logged so far."""
        return self.stderr_path.read_text()

    async def echo(self, line: bytes) -> bytes:
        """Send ``line`` and return the next line it prints (the echo server's answer)."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        await self.process.stdin.send_all(line + b"\n")
        with trio.fail_after(BOUND):
            while b"\n" not in self._pending:
                chunk = await self.process.stdout.receive_some()
                assert chunk, f"connect exited:\n{self.stderr()}"
                self._pending += chunk
        answer, _, rest = bytes(self._pending).partition(b"\n")
        self._pending[:] = rest
        return answer


@asynccontextmanager
async def run_connect_process(log_dir: Path, *arguments: str) -> AsyncIterator[ConnectProcess]:
    """Start ``connect`` with ``arguments``; resumed (it may be stopped) and killed on the way out."""
    stderr_path = log_dir / f"connect-{next(_connect_serial)}.stderr"
    with stderr_path.open("wb") as stderr_file:
        process = await trio.lowlevel.open_process(
            [*CLI, "connect", *arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )
    try:
        yield ConnectProcess(process, stderr_path)
    finally:
        await reap(process)


@asynccontextmanager
async def serve_process(log_dir: Path, heartbeat_timeout: float) -> AsyncIterator[ServeProcess]:
    """``serve`` with ``heartbeat_timeout``; resumed (a test may leave it stopped), then killed."""
    options = ("--port", "0", *heartbeat_options(heartbeat_timeout))
    async with run_serve_process(log_dir, *options) as server:
        try:
            yield server
        finally:
            server.process.send_signal(signal.SIGCONT)


#: A TLS echo server, as ``serve`` is a plain one: ``python -c TLS_SERVE CHAIN TIMEOUT``.
#: (``serve`` has no TLS option; the runtime reads a TLS stream by another path.)
TLS_SERVE = """
import logging, ssl, sys
from functools import partial
import trio
from trio_heartbeat import Config, serve_tcp

async def echo(conn):
    async for message in conn:
        await conn.send(message)

async def main(chain, timeout):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain)
    config = Config(interval=1.0, timeout=timeout)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_tcp, echo, 0, config=config, ssl_context=context))
        print(f"listening on 127.0.0.1:{server.port}", flush=True)

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
trio.run(main, sys.argv[1], float(sys.argv[2]))
"""


@asynccontextmanager
async def tls_serve_process(
    log_dir: Path, ca: trustme.CA, heartbeat_timeout: float
) -> AsyncIterator[ServeProcess]:
    """:data:`TLS_SERVE` with a certificate from ``ca``; resumed and killed on the way out."""
    chain = log_dir / "server.pem"
    ca.issue_cert(LOOPBACK).private_key_and_cert_chain_pem.write_to_path(str(chain))
    stderr_path = log_dir / "tls-serve.stderr"
    with stderr_path.open("wb") as stderr_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", TLS_SERVE, str(chain), str(heartbeat_timeout)],
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )
    stdout = process.stdout
    assert stdout is not None
    try:
        received = b""
        with trio.fail_after(SERVE_STARTUP):
            while b"\n" not in received:
                chunk = await stdout.receive_some()
                assert chunk, f"the TLS server exited before listening:\n{stderr_path.read_text()}"
                received += chunk
        match = re.fullmatch(rb"listening on (\S+):(\d+)", received.partition(b"\n")[0])
        assert match is not None, received
        yield ServeProcess(process, match[1].decode(), int(match[2]), stderr_path)
    finally:
        await reap(process)


# -- reading logs ------------------------------------------------------------------------


async def wait_for(read: Callable[[], str], pattern: str, bound: float = BOUND) -> str:
    """Poll ``read()`` until ``pattern`` matches a line; return that line."""
    with trio.move_on_after(bound):
        while True:
            for line in read().splitlines():
                if re.search(pattern, line):
                    return line
            await trio.sleep(0.02)
    raise AssertionError(f"no line matching {pattern!r} within {bound} s:\n{read()}")


def connected_addresses(log: str) -> list[str]:
    """The addresses of the clients a ``serve`` log says it accepted, in order."""
    return re.findall(r" (\S+): connected", log)


def convictions(log: str) -> list[str]:
    """The lines of a ``serve`` log that say it ended a connection with 1011."""
    return [line for line in log.splitlines() if "ended with 1011" in line]


# -- one connection in this process -----------------------------------------------------


async def round_trip(conn: Connection, payload: bytes) -> None:
    """``payload`` goes to an echo server and comes back, within :data:`BOUND`."""
    await conn.send(payload)
    with trio.fail_after(BOUND):
        assert await conn.receive() == payload


async def wait_until_receive_queue_full(conn: Connection, messages: int = QUEUE) -> None:
    """The application has not read, and the connection holds at least ``messages``."""
    with trio.fail_after(BOUND):
        while conn.statistics().receive_queue_used < messages:  # noqa: ASYNC110
            await trio.sleep(0.02)
    await trio.sleep(0.5)  # and the rest has come, and found no room


def message(number: int) -> bytes:
    return b"%03d" % number * 8


# -- section 2: a server stopped, or a client stopped, longer than its timeout ----------


async def sit_out_the_servers_stall(
    server: ServeProcess, ssl_context: ssl.SSLContext | None = None
) -> None:
    """Connect (10 s timeout), stop the server for 5 s, resume it: nobody is convicted.

    The connection must stay up and still echo, and the server's log must
    show no 1011, only the CLOSE 1000 we send when we leave.
    """
    try:
        async with open_connection(
            server.host, server.port, config=LONG_CONFIG, options=LENIENT, ssl_context=ssl_context
        ) as conn:
            await round_trip(conn, b"before the stall")
            async with stopped(server.process):
                await trio.sleep(STALL)
            await trio.sleep(SETTLE)
            assert conn.closed is None, server.stderr()
            await round_trip(conn, b"after the stall")
            assert convictions(server.stderr()) == []
    except ConnectionClosed as exc:
        pytest.fail(f"the connection ended after the server's stall: {exc!r}\n{server.stderr()}")
    ended = await wait_for(server.stderr, r"ended with")
    log = server.stderr()
    assert re.search(r"ended with 1000\b.*closed by the peer", ended), log
    assert convictions(log) == [], log
    assert len(connected_addresses(log)) == 1, log


async def test_a_server_stopped_longer_than_its_timeout_convicts_no_healthy_client(
    tmp_path: Path,
) -> None:
    """SIGSTOP ``serve`` for 5 s (its timeout is 3 s): on SIGCONT it keeps its healthy client.

    The client's PINGs wait in the server's socket for the whole pause; the
    client tolerates the pause (10 s timeout).
    """
    async with serve_process(tmp_path, SHORT) as server:
        await sit_out_the_servers_stall(server)


async def test_a_tls_server_stopped_longer_than_its_timeout_convicts_no_healthy_client(
    tmp_path: Path,
) -> None:
    """The same over TLS: the client's PINGs wait in the socket as TLS records.

    A TLS stream is not read through its descriptor, so what is waiting must
    be heard by way of the stream (its ``receive_some``) before anyone is judged.
    """
    ca = trustme.CA()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with tls_serve_process(tmp_path, ca, SHORT) as server:
        await sit_out_the_servers_stall(server, context)


async def test_a_client_stopped_longer_than_its_timeout_convicts_no_healthy_server(
    tmp_path: Path,
) -> None:
    """SIGSTOP a ``connect`` process for 5 s (its timeout is 3 s): on SIGCONT it keeps its server.

    The server (in this process, 10 s timeout) PINGs into the stopped
    client's socket. After SIGCONT the client must not close with 1011 nor
    reconnect: the server's one connection stays up and still echoes, and the
    client's log has no ``disconnected from``.
    """
    accepted: list[Connection] = []

    async def echo(conn: Connection) -> None:
        accepted.append(conn)
        async for data in conn:
            await conn.send(data)

    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(serve_tcp, echo, 0, host=LOOPBACK, config=LONG_CONFIG, options=LENIENT)
        )
        endpoint = f"{LOOPBACK}:{server.port}"
        options = (*heartbeat_options(SHORT), "--linger", "0.2", endpoint)
        async with run_connect_process(tmp_path, *options) as client:
            assert await client.echo(b"before the stall") == b"before the stall"
            async with stopped(client.process):
                await trio.sleep(STALL)
            await trio.sleep(SETTLE)
            assert "disconnected from" not in client.stderr()
            assert await client.echo(b"after the stall") == b"after the stall"
            assert len(accepted) == 1, client.stderr()
            assert accepted[0].closed is None, accepted[0].closed
            # End of input: the client closes with 1000 and exits with 0.
            assert client.process.stdin is not None
            await client.process.stdin.aclose()
            with trio.fail_after(BOUND):
                await client.process.wait()
                ending = await accepted[0].wait_closed()
            log = client.stderr()
        nursery.cancel_scope.cancel()
    assert client.process.returncode == 0, log
    assert "disconnected from" not in log, log
    assert log.count("connected to") == 1, log
    assert (ending.code, ending.by_peer) == (1000, True), repr(ending)


async def test_a_blocking_call_in_the_loop_convicts_no_healthy_server(tmp_path: Path) -> None:
    """Our own event loop blocked for 5 s (``time.sleep``) with a 3 s timeout: nobody is convicted.

    The server (a ``serve`` process, 10 s timeout) PINGs throughout; when the
    loop runs again its deadlines have long passed, but the PINGs are in the
    socket. The connection must stay up and echo, and the server's log must
    show no ending until we close with 1000.
    """
    async with serve_process(tmp_path, LONG) as server:
        try:
            async with open_connection(server.host, server.port, config=SHORT_CONFIG) as conn:
                await round_trip(conn, b"before the stall")
                time.sleep(STALL)  # noqa: ASYNC251  # the stall under test
                await trio.sleep(SETTLE)
                assert conn.closed is None
                await round_trip(conn, b"after the stall")
                assert "ended with" not in server.stderr()
        except ConnectionClosed as exc:
            pytest.fail(f"the connection ended after our own stall: {exc!r}\n{server.stderr()}")
        ended = await wait_for(server.stderr, r"ended with")
        log = server.stderr()
    assert re.search(r"ended with 1000\b.*closed by the peer", ended), log
    assert len(connected_addresses(log)) == 1, log


async def test_a_peer_that_froze_during_the_servers_stall_is_still_convicted_promptly(
    tmp_path: Path,
) -> None:
    """Of two clients, one freezes for good while the server is stopped: only it is convicted.

    The server (3 s timeout) is stopped for 5 s; one second into that, a
    ``connect`` client is frozen with SIGSTOP and never resumed. After the
    server's SIGCONT it must convict the frozen client within its timeout
    (plus :data:`MARGIN`) and keep the healthy one (10 s timeout, in this
    process), which still echoes.
    """
    async with serve_process(tmp_path, SHORT) as server:
        try:
            async with open_connection(
                server.host, server.port, config=LONG_CONFIG, options=LENIENT
            ) as conn:
                await round_trip(conn, b"healthy")
                healthy = connected_addresses(server.stderr())
                assert len(healthy) == 1, server.stderr()
                options = (*heartbeat_options(LONG), server.endpoint)
                async with run_connect_process(tmp_path, *options) as doomed:
                    assert await doomed.echo(b"doomed") == b"doomed"
                    addresses = connected_addresses(server.stderr())
                    assert len(addresses) == 2, server.stderr()
                    doomed_address = addresses[1]
                    async with stopped(server.process):
                        await trio.sleep(1.0)
                        await stop(doomed.process)  # for good
                        await trio.sleep(STALL - 1.0)
                    resumed = trio.current_time()
                    line = await wait_for(
                        server.stderr,
                        rf"{re.escape(doomed_address)}: ended with 1011",
                        SHORT + MARGIN + BOUND,
                    )
                    convicted_after = trio.current_time() - resumed
                    assert "closed by us" in line, line
                    assert conn.closed is None
                    await round_trip(conn, b"still healthy")
                    log = server.stderr()
        except ConnectionClosed as exc:
            pytest.fail(f"the healthy client's connection ended: {exc!r}\n{server.stderr()}")
    assert convicted_after <= SHORT + MARGIN, (convicted_after, log)
    assert [line for line in convictions(log) if healthy[0] in line] == [], log


# -- section 3: an application that does not read, and a peer that then freezes ---------


#: The byte bound of the queue in the test of a full one (and of the reserve, if
#: there is one), and the DATA that overflows both: far more than they hold.
SMALL_QUEUE_BYTES = 4096
OVERFLOW = [bytes(1024)] * 64


@pytest.mark.parametrize(
    ("options", "flood", "full_at", "healthy_first"),
    [
        pytest.param(
            ConnectionOptions(),
            [message(number) for number in range(QUEUE + EXTRA)],
            QUEUE,
            True,
            id="messages",
        ),
        pytest.param(
            ConnectionOptions(receive_queue_bytes=SMALL_QUEUE_BYTES),
            OVERFLOW,
            SMALL_QUEUE_BYTES // len(OVERFLOW[0]),
            False,
            id="bytes",
        ),
    ],
)
async def test_a_connection_whose_application_does_not_read_still_convicts_a_frozen_server(
    tmp_path: Path,
    options: ConnectionOptions,
    flood: list[bytes],
    full_at: int,
    healthy_first: bool,
) -> None:
    """The inbound queue is full (echoes nobody took); then the server freezes.

    The client (3 s timeout) must convict it all the same: the ``async with``
    block ends with :class:`HeartbeatTimeout` (1011, by us) within the
    timeout plus :data:`MARGIN` of the SIGSTOP. The queue is full at its
    message bound (a few small messages more than 64) or far beyond its byte
    bound (64 KiB against 4 KiB, so whatever the connection holds beyond the
    queue, it stops reading too). In the first case the other promise is
    checked as well: while the server is healthy, the queue full for longer
    than the timeout convicts nobody. (In the second nothing is said of a
    healthy server: the docs say what happens when the connection can hold
    no more.)
    """
    ending: ConnectionClosed | None = None
    frozen_at = convicted_at = inf
    async with serve_process(tmp_path, LONG) as server:
        with trio.CancelScope() as watch:
            try:
                async with open_connection(
                    server.host, server.port, config=SHORT_CONFIG, options=options
                ) as conn:
                    for data in flood:
                        await conn.send(data)
                    await wait_until_receive_queue_full(conn, full_at)
                    if healthy_first:
                        await trio.sleep(SHORT + MARGIN)  # a slow application, a healthy server
                        assert conn.closed is None
                        # Every echo is held: the queue, and the reserve past it.
                        assert conn.statistics().receive_queue_used == len(flood)
                    await stop(server.process)
                    frozen_at = trio.current_time()
                    watch.deadline = frozen_at + SHORT + MARGIN
                    await trio.sleep_forever()
            except ConnectionClosed as exc:
                ending = exc
                convicted_at = trio.current_time()
        log = server.stderr()
    assert ending is not None, (
        f"still open {SHORT + MARGIN} s after the server froze (timeout {SHORT} s)"
    )
    assert convicted_at >= frozen_at, f"ended before the server froze: {ending!r}\n{log}"
    assert isinstance(ending, HeartbeatTimeout), repr(ending)
    assert (ending.code, ending.by_peer) == (1011, False), repr(ending)
    assert convicted_at - frozen_at <= SHORT + MARGIN


async def test_a_send_only_reconnecting_client_notices_a_frozen_server(tmp_path: Path) -> None:
    """A send-only application behind the reconnecting client: a frozen server is noticed in time.

    Nobody calls ``receive``, so the echoes fill the client's receive buffer
    (64) and then the connection's queue (64), and the client stays connected
    for longer than the timeout while the server is healthy. Then the server
    is frozen while the application goes on sending: the client must report
    :class:`Disconnected` with a 1011 conviction of its own within the
    timeout plus :data:`MARGIN`, and its ``state`` must leave CONNECTED.
    """
    events: list[tuple[float, SupervisorEvent]] = []
    lost = trio.Event()

    def on_event(event: SupervisorEvent) -> None:
        events.append((trio.current_time(), event))
        if isinstance(event, Disconnected):
            lost.set()

    async def keep_sending(client: ReconnectingClient) -> None:
        for number in count():
            await client.send(b"reading %d" % number)
            await trio.sleep(0.05)

    frozen_at = inf
    async with serve_process(tmp_path, LONG) as server:
        with trio.CancelScope() as everything:
            async with (
                open_reconnecting_client(
                    [server.endpoint], config=SHORT_CONFIG, listeners=[on_event]
                ) as client,
                trio.open_nursery() as nursery,
            ):
                with trio.fail_after(BOUND):
                    conn = await client.wait_connected()
                for number in range(2 * QUEUE + EXTRA):
                    await client.send(message(number))
                await wait_until_receive_queue_full(conn)
                nursery.start_soon(keep_sending, client)
                await trio.sleep(SHORT + MARGIN)  # a slow application, a healthy server
                assert client.state is SupervisorState.CONNECTED, events
                assert client.connection is conn
                await stop(server.process)
                frozen_at = trio.current_time()
                with trio.move_on_after(SHORT + MARGIN):
                    await lost.wait()
                state = client.state
                everything.cancel()
    disconnections = [(at, event) for at, event in events if isinstance(event, Disconnected)]
    assert disconnections, (
        f"still connected {SHORT + MARGIN} s after the server froze (timeout {SHORT} s): {events}"
    )
    at, disconnected = disconnections[0]
    assert at >= frozen_at, "the healthy server was convicted while the application did not read"
    assert isinstance(disconnected.error, HeartbeatTimeout), repr(disconnected.error)
    assert (disconnected.error.code, disconnected.error.by_peer) == (1011, False)
    assert at - frozen_at <= SHORT + MARGIN
    assert state is not SupervisorState.CONNECTED
