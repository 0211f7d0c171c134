"""The runtime's own machinery (``_connection.py``): direct socket I/O, the
writer started on demand, the class-based context manager, and end waiters.

On a plain :class:`trio.SocketStream` the reader reads with ``os.read`` and
answers with a non-blocking ``os.write``; these tests run over real loopback
TCP and put a stand-in for the ``os`` module into ``_transport`` only
(:class:`FakeOs`), which cuts writes short, makes them fail or would-block,
and fails a read once, on one descriptor. Everything else runs over memory
streams in virtual time with exact times. Which tasks exist, and which task
wrote what, is read from Trio itself: the task tree, an instrument that sees
every writer start and end, and a stream that records the writing task.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing
from helpers import LOOPBACK, ScriptedPeer, WrappedStream, wire_frame
from test_connection import (
    CONFIG,
    HELLO_SIZE,
    handshake_then_serve,
    idle_ping_times,
    run_body,
    served_connection,
    stream_and_peer,
)
from test_connection_paths import stalling_stream_and_peer
from trio.lowlevel import Task
from trio.testing import MockClock

from trio_heartbeat import _transport
from trio_heartbeat._config import Config
from trio_heartbeat._connection import _READER_NAME, Connection
from trio_heartbeat._detectors import FailureDetector
from trio_heartbeat._errors import BrokenConnection, ConnectionClosed
from trio_heartbeat._events import Event, PingReceived
from trio_heartbeat._frames import (
    CloseCode,
    FrameDecoder,
    FrameType,
    HealthStatus,
    Role,
    encode_pong,
)
from trio_heartbeat._groups import BaseExceptionGroup
from trio_heartbeat._handshake import CLIENT_LEAD
from trio_heartbeat._options import ConnectionOptions
from trio_heartbeat._state import State
from trio_heartbeat._stream_connection import open_stream_connection
from trio_heartbeat._writer import _TASK_NAME as _WRITER_NAME

#: A PONG frame, header included.
PONG_SIZE = len(encode_pong(bytes(8), HealthStatus.SERVING))
#: Bound on every real-socket test: they take milliseconds, or half a second when idling.
REAL_TIME_BOUND = 5.0
#: Bound, in virtual time, on the memory-stream tests: a hang fails instead of stalling.
VIRTUAL_BOUND = 10.0


# -- observing the runtime ------------------------------------------------------


def task_names() -> list[str]:
    """The names of every task in this run, walked from the root task down."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    names: list[str] = []
    pending = [root]
    while pending:
        task = pending.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return names


class WriterLog(trio.abc.Instrument):
    """When each connection writer task started and ended (``trio.current_time()``)."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.ended: list[float] = []

    def task_spawned(self, task: Task) -> None:
        if task.name == _WRITER_NAME:
            self.started.append(trio.current_time())

    def task_exited(self, task: Task) -> None:
        if task.name == _WRITER_NAME:
            self.ended.append(trio.current_time())


@contextmanager
def watch_writers() -> Iterator[WriterLog]:
    """A :class:`WriterLog` installed for the block."""
    log = WriterLog()
    trio.lowlevel.add_instrument(log)
    try:
        yield log
    finally:
        trio.lowlevel.remove_instrument(log)


class WhoWrites(WrappedStream):
    """Records every ``send_all``: when, from which task, and the frame types in it.

    Each write here carries whole frames (the runtime never splits a frame
    across ``send_all`` calls), so each is decoded on its own.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.writes: list[tuple[float, str, list[FrameType]]] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        decoder = FrameDecoder(max_frame=0xFFFFFFFF)
        decoder.receive_data(bytes(data))
        kinds = []
        while (frame := decoder.next_frame()) is not None:
            kinds.append(wire_frame(frame).type)
        at, name = trio.current_time(), trio.lowlevel.current_task().name
        await super().send_all(data)
        self.writes.append((at, name, kinds))


def memory_stream_and_peer() -> tuple[WhoWrites, ScriptedPeer]:
    """Our end of a memory stream pair (recording its writes) and a server peer on the other."""
    ours, theirs = trio.testing.memory_stream_pair()
    return WhoWrites(ours), ScriptedPeer(theirs)


# -- real sockets, and a stand-in for os inside _transport -------------------------


class FakeOs:
    """Stands in for the ``os`` module inside ``_transport`` (its only uses: read, write).

    Every call goes to the real ``os``. On the descriptor :attr:`target` it can
    write at most :attr:`write_limit` bytes per call, raise the errors queued
    in :attr:`write_faults` / :attr:`read_faults` (one per call, before doing
    anything; :attr:`on_write_fault` runs just before a write fault is
    raised, to act at that exact moment). It records, per descriptor, the
    bytes written, and on the target each write as ``(bytes asked, bytes
    written)``.
    """

    def __init__(self) -> None:
        self.target = -1
        self.write_limit: int | None = None
        self.write_faults: list[OSError] = []
        self.on_write_fault: Callable[[], object] | None = None
        self.read_faults: list[OSError] = []
        self.target_writes: list[tuple[int, int]] = []
        self.read_faults_raised = 0
        self.target_reads = 0
        self.written: dict[int, int] = {}

    def write(self, fd: int, data: bytes) -> int:
        if fd != self.target:
            sent = os.write(fd, data)
        elif self.write_faults:
            self.target_writes.append((len(data), 0))
            if self.on_write_fault is not None:
                self.on_write_fault()
            raise self.write_faults.pop(0)
        else:
            sent = os.write(fd, data[: self.write_limit])
            self.target_writes.append((len(data), sent))
        self.written[fd] = self.written.get(fd, 0) + sent
        return sent

    def read(self, fd: int, size: int) -> bytes:
        if fd == self.target:
            if self.read_faults:
                self.read_faults_raised += 1
                raise self.read_faults.pop(0)
            self.target_reads += 1
        return os.read(fd, size)


@pytest.fixture
def fake_os(monkeypatch: pytest.MonkeyPatch) -> FakeOs:
    """A :class:`FakeOs` as ``_transport.os`` for the test (the real module is untouched)."""
    fake = FakeOs()
    monkeypatch.setattr(_transport, "os", fake)
    return fake


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """Both ends of one loopback TCP connection (client end, server end), closed on the way out."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream(LOOPBACK, port)
        server = await listeners[0].accept()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
    try:
        yield client, server
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def test_an_idle_tcp_pair_heartbeats_with_direct_writes_and_no_writer_task(
    fake_os: FakeOs,
) -> None:
    """Over real TCP, every heartbeat byte of both sides goes out through
    ``os.write`` from the reader; the client's PINGs are all answered; and
    in half a second of 50 ms heartbeats no writer task ever starts, nor is
    one found in the task tree."""
    config = Config(interval=0.05, timeout=1.0)
    pings_at_server: list[bytes] = []

    def server_listener(conn: Connection, event: Event) -> None:
        if isinstance(event, PingReceived):
            pings_at_server.append(event.opaque)

    servers: list[Connection] = []
    server_ready = trio.Event()
    async with tcp_pair() as (client_stream, server_stream):
        client_fd, server_fd = client_stream.socket.fileno(), server_stream.socket.fileno()

        async def serve() -> None:
            async with open_stream_connection(
                server_stream, role=Role.SERVER, config=config, listeners=[server_listener]
            ) as server:
                servers.append(server)
                server_ready.set()
                await server.wait_closed()

        with trio.fail_after(REAL_TIME_BOUND), watch_writers() as writers:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                async with open_stream_connection(client_stream, config=config) as client:
                    await server_ready.wait()
                    server = servers[0]
                    idle_until = trio.current_time() + 0.5
                    samples = 0
                    while trio.current_time() < idle_until:
                        await trio.sleep(0.01)
                        names = task_names()
                        assert names.count(_READER_NAME) == 2
                        assert _WRITER_NAME not in names
                        samples += 1
                    # PONGs come back in order: once ping()'s own is in, so are those
                    # of every PING before it; unless the timer sent one more since
                    # (a stall of our event loop), so look again a few times.
                    for _ in range(3):
                        assert await client.ping() >= 0
                        client_stats = client.statistics()
                        if client_stats.pongs_received == len(pings_at_server):
                            break
                    assert client_stats.pings_sent >= 5
                    assert client_stats.pongs_received == client_stats.pings_sent
                    assert len(pings_at_server) == client_stats.pings_sent
                    client_stats, server_stats = client.statistics(), server.statistics()
                    assert fake_os.written[client_fd] == client_stats.bytes_out
                    assert fake_os.written[server_fd] == server_stats.bytes_out
                    assert client_stats.state is server_stats.state is State.OPEN
                    assert writers.started == []
                    assert samples >= 5


async def test_a_partial_direct_write_is_finished_by_the_writer(fake_os: FakeOs) -> None:
    """When the socket takes only part of a direct write (the server's HELLO,
    a PONG), the writer sends the rest: the peer reads every frame whole and
    in order, each direct write was cut, and each writer ended afterwards."""
    limit = 5
    peer_got_pong = trio.Event()
    config = Config(instance_id="in five-byte pieces")
    async with tcp_pair() as (their_stream, our_stream):
        fake_os.target = our_stream.socket.fileno()
        fake_os.write_limit = limit
        peer = ScriptedPeer(their_stream, Role.CLIENT)

        async def script() -> None:
            await peer.handshake()
            await peer.send_ping(b"8 bytes!")
            await peer.expect(FrameType.PONG)
            peer_got_pong.set()
            await peer.serve()

        with trio.fail_after(REAL_TIME_BOUND), watch_writers() as writers:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(script)
                async with open_stream_connection(
                    our_stream, role=Role.SERVER, config=config
                ) as conn:
                    await peer_got_pong.wait()
                    await trio.testing.wait_all_tasks_blocked()
                    hello_size = HELLO_SIZE + len(config.instance_id)
                    assert fake_os.target_writes == [(hello_size, limit), (PONG_SIZE, limit)]
                    assert len(writers.started) == len(writers.ended) == 2
                    assert _WRITER_NAME not in task_names()
                    assert conn.statistics().bytes_out == hello_size + PONG_SIZE
    hello, pong = peer.frames[0], peer.frames[1]
    assert hello.hello.instance_id == "in five-byte pieces"
    assert (pong.type, pong.opaque) == (FrameType.PONG, b"8 bytes!")
    assert peer.frames[-1].close_code == CloseCode.NORMAL


async def test_a_direct_write_that_would_block_goes_whole_to_the_writer_ahead_of_data(
    fake_os: FakeOs,
) -> None:
    """A client's HELLO whose direct write would block is sent by the writer,
    ahead of DATA queued at that very moment (which the same writer round
    sends) and of DATA the block sends once entered."""
    conns: list[Connection] = []

    def keep_the_connection(conn: Connection, event: Event) -> None:
        if not conns:
            conns.append(conn)  # at HandshakeComplete: our HELLO is queued, not written

    async with tcp_pair() as (our_stream, their_stream):
        fake_os.target = our_stream.socket.fileno()
        fake_os.write_faults.append(BlockingIOError(errno.EAGAIN, "injected"))
        fake_os.on_write_fault = lambda: conns[0].send_nowait(b"queued as the hello waits")
        peer = ScriptedPeer(their_stream, Role.SERVER)

        with trio.fail_after(REAL_TIME_BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(handshake_then_serve, peer)
                async with open_stream_connection(
                    our_stream, listeners=[keep_the_connection]
                ) as conn:
                    await conn.send(b"sent by the block")
                    assert await conn.receive() == b"queued as the hello waits"
                    assert await conn.receive() == b"sent by the block"
    assert fake_os.target_writes == [(HELLO_SIZE, 0)]
    assert [(frame.type, frame.payload) for frame in peer.frames[1:3]] == [
        (FrameType.DATA, b"queued as the hello waits"),
        (FrameType.DATA, b"sent by the block"),
    ]
    assert peer.frames[0].hello.role is Role.CLIENT


async def test_a_direct_write_that_fails_is_a_broken_connection(fake_os: FakeOs) -> None:
    """``os.write`` failing (EPIPE) on the reader's PONG cancels the block and
    raises BrokenConnection 1006, with the OS error behind its cause; the stream
    is closed and the peer gets no PONG."""
    fault = BrokenPipeError(errno.EPIPE, "injected")
    armed = trio.Event()
    cancelled: list[Connection] = []

    async def body(conn: Connection) -> None:
        fake_os.write_faults.append(fault)
        armed.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(conn)
            raise

    async with tcp_pair() as (their_stream, our_stream):
        fake_os.target = our_stream.socket.fileno()
        peer = ScriptedPeer(their_stream, Role.CLIENT)

        async def script() -> None:
            await peer.handshake()
            await armed.wait()
            await peer.send_ping()
            await peer.drain()

        with trio.fail_after(REAL_TIME_BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(script)
                with pytest.raises(BrokenConnection) as raised:
                    await run_body(our_stream, body, role=Role.SERVER)
    assert len(cancelled) == 1, "the block was not cancelled"
    conn = cancelled[0]
    assert raised.value.code == CloseCode.ABNORMAL_CLOSURE
    assert not raised.value.by_peer
    # Reported as the stream would report it, with the OS error behind it.
    cause = raised.value.__cause__
    assert isinstance(cause, trio.BrokenResourceError)
    assert cause.__cause__ is fault
    assert raised.value.reason.startswith("transport failed: BrokenResourceError(")
    assert isinstance(conn.closed, BrokenConnection)
    assert fake_os.target_writes[-1] == (PONG_SIZE, 0)
    assert fake_os.write_faults == []
    assert our_stream.socket.fileno() == -1
    assert FrameType.PONG not in [frame.type for frame in peer.frames]
    assert peer.eof_at is not None


async def test_a_spurious_wake_of_the_reader_is_not_a_failure(fake_os: FakeOs) -> None:
    """``os.read`` raising BlockingIOError after ``wait_readable`` (woken for
    nothing) sends the reader back to waiting: DATA sent then still arrives
    and the connection stays open."""
    armed = trio.Event()
    async with tcp_pair() as (their_stream, our_stream):
        fake_os.target = our_stream.socket.fileno()
        peer = ScriptedPeer(their_stream, Role.CLIENT)

        async def script() -> None:
            await peer.handshake()
            await armed.wait()
            await peer.send_data(b"after a spurious wake")
            await peer.serve()

        with trio.fail_after(REAL_TIME_BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(script)
                async with open_stream_connection(our_stream, role=Role.SERVER) as conn:
                    reads_before = fake_os.target_reads
                    fake_os.read_faults.append(BlockingIOError(errno.EAGAIN, "injected"))
                    armed.set()
                    assert await conn.receive() == b"after a spurious wake"
                    assert fake_os.read_faults_raised == 1
                    assert fake_os.target_reads > reads_before
                    assert conn.state is State.OPEN
                    assert conn.closed is None
    assert peer.frames[-1].close_code == CloseCode.NORMAL


# -- the writer on demand (memory streams, virtual time) --------------------------


async def test_the_writer_ends_after_a_burst_and_a_later_send_starts_it_again(
    autojump_clock: MockClock,
) -> None:
    """A burst of sends starts one writer, which sends it in one write and
    ends; a send later starts a new one. No writer task is left in between."""
    stream, peer = memory_stream_and_peer()
    burst = [f"burst {n}".encode() for n in range(10)]
    with trio.fail_after(VIRTUAL_BOUND):
        async with served_connection(stream, peer, config=CONFIG) as conn:
            with watch_writers() as writers:
                for message in burst:
                    await conn.send(message)
                assert [await conn.receive() for _ in burst] == burst
                await trio.testing.wait_all_tasks_blocked()
                assert (writers.started, writers.ended) == ([0.0], [0.0])
                assert _WRITER_NAME not in task_names()
                assert task_names().count(_READER_NAME) == 1

                await trio.sleep(0.5)
                await conn.send(b"later")
                assert await conn.receive() == b"later"
                await trio.testing.wait_all_tasks_blocked()
                assert (writers.started, writers.ended) == ([0.0, 0.5], [0.0, 0.5])
                assert _WRITER_NAME not in task_names()
    assert stream.writes[:3] == [
        (0.0, _READER_NAME, [FrameType.HELLO]),
        (0.0, _WRITER_NAME, [FrameType.DATA] * len(burst)),
        (0.5, _WRITER_NAME, [FrameType.DATA]),
    ]
    assert peer.times(FrameType.DATA) == [0.0] * len(burst) + [0.5]


async def test_a_timer_ping_on_a_memory_stream_goes_out_through_the_writer(
    autojump_clock: MockClock,
) -> None:
    """On a stream that is not a plain socket the reader does not write the
    PING its timer queues: a writer starts for it at the exact PING time,
    writes it, and ends."""
    stream, peer = memory_stream_and_peer()
    expected = idle_ping_times(1.0 * CLIENT_LEAD, 2.0)
    assert expected == [0.9, 1.8]
    with trio.fail_after(VIRTUAL_BOUND):
        async with served_connection(stream, peer, hello_only=True, config=CONFIG) as conn:
            with watch_writers() as writers:
                await trio.sleep_until(2.0)
                assert (writers.started, writers.ended) == (expected, expected)
                assert _WRITER_NAME not in task_names()
                assert conn.statistics().pongs_received == len(expected)
    assert stream.writes[: 1 + len(expected)] == [
        (0.0, _READER_NAME, [FrameType.HELLO]),
        *[(at, _WRITER_NAME, [FrameType.PING]) for at in expected],
    ]
    assert peer.times(FrameType.PING) == expected


# -- the context manager ----------------------------------------------------------


async def test_open_stream_connection_can_be_entered_only_once(autojump_clock: MockClock) -> None:
    """A second entry, during or after the first, raises RuntimeError without
    touching the stream or the live connection."""
    stream, peer = stream_and_peer()
    manager = open_stream_connection(stream, config=CONFIG)

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake_then_serve, peer)
            async with manager as conn:
                with pytest.raises(RuntimeError, match="only once"):
                    await manager.__aenter__()
                assert not stream.closed
                await conn.send(b"still served")
                assert await conn.receive() == b"still served"
    closes = stream.aclose_calls
    with pytest.raises(RuntimeError, match="only once"):
        await manager.__aenter__()
    assert stream.aclose_calls == closes
    assert conn.statistics().state is State.CLOSED
    assert trio.current_time() == 0.0


async def test_entering_closes_the_stream_when_the_connection_cannot_be_built(
    autojump_clock: MockClock,
) -> None:
    """A detector factory that raises fails the entry with its own error,
    and the stream, which is the connection's from the moment of entry,
    is closed without a byte written."""

    class FactoryFailed(Exception):
        pass

    def failing_detector() -> FailureDetector:
        raise FactoryFailed

    stream, peer = stream_and_peer()
    options = ConnectionOptions(detector=failing_detector)
    with pytest.raises(FactoryFailed):
        async with open_stream_connection(stream, config=CONFIG, options=options):
            pytest.fail("entered without a connection")  # pragma: no cover
    assert stream.aclose_calls == 1
    assert await peer.receive_frame() is None
    assert peer.frames == []
    assert peer.eof_at == 0.0


# -- waiting for the end ------------------------------------------------------------


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


# -- regressions found while writing these tests ---------------------------------


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


async def test_sending_while_a_cancelled_block_is_left_does_not_hit_a_closed_nursery(
    autojump_clock: MockClock,
) -> None:
    """The block is cancelled from outside while another task keeps sending.
    The connection's nursery closes the moment its last task ends, before
    the block's exit has run on; a send in between used to start the writer
    in that closed nursery (``RuntimeError: Nursery is closed to new
    arrivals``; 41 of 50 attempts before the fix). Every attempt must end
    with the sends refused as ConnectionClosed, and nothing else."""
    outcomes: list[str] = []
    for attempt in range(20):
        ours, theirs = trio.testing.memory_stream_pair()
        peer = ScriptedPeer(theirs)
        conns: list[Connection] = []

        async def sender(conns: list[Connection] = conns) -> None:
            while not conns:
                await trio.lowlevel.checkpoint()
            try:
                while True:
                    with contextlib.suppress(trio.WouldBlock):
                        conns[0].send_nowait(b"x")
                    await trio.lowlevel.checkpoint()
            except ConnectionClosed:
                outcomes.append("refused")
            except RuntimeError as exc:  # the bug
                outcomes.append(f"RuntimeError: {exc}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.handshake)
            nursery.start_soon(sender)
            with trio.CancelScope() as scope:
                async with open_stream_connection(ours, config=CONFIG) as conn:
                    conns.append(conn)
                    scope.cancel()
                    await trio.sleep_forever()
            with trio.fail_after(VIRTUAL_BOUND):
                while len(outcomes) <= attempt:
                    await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
    assert outcomes == ["refused"] * 20


async def test_nothing_is_written_after_a_write_cut_halfway(autojump_clock: MockClock) -> None:
    """A ``ping()`` leaves its PING half written at 0.5 (the peer stopped
    reading); the peer's CLOSE at 0.75 ends the connection in order, and the
    PING's write is cut at its write timeout, 1.5. Nothing may follow the
    partial frame, not even our answering CLOSE: the peer would read it as the
    rest of the PING. (The writer, which had stood back for the PING, used to
    send the CLOSE after it.)"""
    stream, peer = stalling_stream_and_peer()
    raised: list[tuple[float, int]] = []

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(0.75)
        await peer.send_close()
        await peer.drain()

    async def pinger(conn: Connection) -> None:
        with pytest.raises(ConnectionClosed) as closed:
            await conn.ping()
        raised.append((trio.current_time(), closed.value.code))

    async def body(conn: Connection) -> None:
        await trio.sleep_until(0.5)
        stream.stall_next_write(after=5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pinger, conn)
            await conn.wait_closed()
            assert trio.current_time() == 0.75

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with trio.fail_after(VIRTUAL_BOUND):
            await run_body(
                stream, body, config=CONFIG, options=ConnectionOptions(write_timeout=1.0)
            )
    assert raised == [(1.5, CloseCode.NORMAL)]
    assert stream.send_interrupted
    # The peer got our HELLO, then the first 5 bytes of the PING, and nothing more.
    assert [frame.type for frame in peer.frames] == [FrameType.HELLO]
    assert peer._decoder.buffered == 5


@pytest.mark.parametrize("leaves", [1, 2], ids=["one-error", "two-errors"])
async def test_the_blocks_own_exception_group_comes_out_unchanged(
    leaves: int, autojump_clock: MockClock
) -> None:
    """An ExceptionGroup raised by the block (say from a nursery in it) is the
    caller's own error: the very object comes out of the ``async with``, not a
    group around it nor one of its leaves."""
    stream, peer = stream_and_peer()
    mine = BaseExceptionGroup("mine", [ValueError(1), KeyError(2)][:leaves])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_serve, peer)
        with pytest.raises(BaseExceptionGroup) as raised:
            async with open_stream_connection(stream, config=CONFIG):
                raise mine
    assert raised.value is mine
    assert peer.frames[-1].close_code == CloseCode.GOING_AWAY
