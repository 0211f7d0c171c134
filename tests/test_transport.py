"""The byte stream under a connection (``_transport.py``): direct socket I/O, OS errors translated, the lingering close.

On a plain :class:`trio.SocketStream` the reader reads with ``os.read`` and
answers with a non-blocking ``os.write``. The connection tests here run over
real loopback TCP and put a stand-in for the ``os`` module into
``_transport`` only (:class:`FakeOs`), which cuts writes short, makes them
fail or would-block, and fails a read once, on one descriptor; which tasks
exist, and which task wrote what, is read from Trio itself. The functions are
then tested on their own, over a socket pair: which streams ``socket_fd``
takes directly, what ``read_nowait``, ``write_nowait`` and ``stream_error``
make of each outcome of the OS, and what ``linger`` does.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import pytest
import trio
import trio.testing
from helpers import (
    CONFIG,
    HELLO_SIZE,
    LOOPBACK,
    VERDICT,
    ScriptedPeer,
    WrappedStream,
    opaque,
    run_body,
    task_names,
    watch_writers,
)
from trio.testing import MockClock

from trio_heartbeat import _transport
from trio_heartbeat._config import Config
from trio_heartbeat._connection import _READER_NAME, Connection
from trio_heartbeat._errors import BrokenConnection, ConnectionClosed
from trio_heartbeat._events import Event, PingReceived
from trio_heartbeat._frames import (
    CloseCode,
    FrameType,
    HealthStatus,
    Role,
    encode_ping,
    encode_pong,
)
from trio_heartbeat._state import State
from trio_heartbeat._stream_connection import open_stream_connection
from trio_heartbeat._transport import (
    RECEIVE_SIZE,
    linger,
    read_nowait,
    socket_fd,
    stream_error,
    write_nowait,
)
from trio_heartbeat._writer import _TASK_NAME as _WRITER_NAME

#: A PING frame and a PONG frame, header included.
PING_SIZE = len(encode_ping(bytes(8), HealthStatus.SERVING))
PONG_SIZE = len(encode_pong(bytes(8), HealthStatus.SERVING))


#: Bound on every real-socket test: they take milliseconds, or half a second when idling.
REAL_TIME_BOUND = 5.0


# -- real sockets, and a stand-in for os inside _transport -----------------------------


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
    its verdict PING on the client's HELLO, a PONG), the writer sends the
    rest: the peer reads every frame whole and in order, each direct write
    was cut, and each writer ended afterwards."""
    limit = 5
    peer_got_pong = trio.Event()
    config = Config(instance_id="in five-byte pieces")
    async with tcp_pair() as (their_stream, our_stream):
        fake_os.target = our_stream.socket.fileno()
        fake_os.write_limit = limit
        peer = ScriptedPeer(their_stream, Role.CLIENT)

        async def script() -> None:
            await peer.handshake()
            verdict = await peer.expect(FrameType.PING)
            await peer.send_pong(verdict.opaque)
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
                    assert fake_os.target_writes == [
                        (hello_size, limit),
                        (PING_SIZE, limit),
                        (PONG_SIZE, limit),
                    ]
                    assert len(writers.started) == len(writers.ended) == 3
                    assert _WRITER_NAME not in task_names()
                    assert conn.statistics().bytes_out == hello_size + PING_SIZE + PONG_SIZE
    hello, verdict, pong = peer.frames[:3]
    assert hello.hello.instance_id == "in five-byte pieces"
    assert (verdict.type, verdict.opaque) == (FrameType.PING, opaque(1))
    assert (pong.type, pong.opaque) == (FrameType.PONG, b"8 bytes!")
    assert peer.frames[-1].close_code == CloseCode.NORMAL


async def test_a_direct_write_that_would_block_goes_whole_to_the_writer_ahead_of_data(
    fake_os: FakeOs,
) -> None:
    """A client's HELLO whose direct write would block is sent by the writer,
    ahead of DATA queued at that very moment (which the same writer round
    sends, so it reaches the server before the server's verdict is even
    written) and of DATA the block sends once entered (after the verdict)."""
    conns: list[Connection] = []

    def keep_the_connection(conn: Connection, event: Event) -> None:
        if not conns:
            conns.append(conn)  # at HandshakeComplete: our HELLO is queued, not written

    async with tcp_pair() as (our_stream, their_stream):
        fake_os.target = our_stream.socket.fileno()
        fake_os.write_faults.append(BlockingIOError(errno.EAGAIN, "injected"))
        fake_os.on_write_fault = lambda: conns[0].send_nowait(b"queued as the hello waits")
        peer = ScriptedPeer(their_stream, Role.SERVER)

        async def script() -> None:
            await peer.send_hello()
            await peer.expect(FrameType.HELLO)
            # Accept it. The DATA queued with the HELLO (a client MAY send
            # DATA before the verdict) is already here: serve() echoes it, and
            # takes the verdict's PONG.
            await peer.send_ping(VERDICT)
            await peer.serve()

        with trio.fail_after(REAL_TIME_BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(script)
                async with open_stream_connection(
                    our_stream, listeners=[keep_the_connection]
                ) as conn:
                    await conn.send(b"sent by the block")
                    assert await conn.receive() == b"queued as the hello waits"
                    assert await conn.receive() == b"sent by the block"
    # The HELLO's direct write took nothing; the writer had sent it (with the
    # DATA) and ended before the verdict came, so the PONG went direct, whole.
    assert fake_os.target_writes == [(HELLO_SIZE, 0), (PONG_SIZE, PONG_SIZE)]
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
    assert raised.value.by_peer is False  # ours: a bool, not merely falsy
    # Reported as the stream would report it, with the OS error behind it.
    cause = raised.value.__cause__
    assert isinstance(cause, trio.BrokenResourceError)
    assert cause.__cause__ is fault
    assert raised.value.reason == "connection lost: broken pipe"  # the system's words for EPIPE
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


# -- the lingering close ---------------------------------------------------------------


async def test_after_a_protocol_error_we_linger_briefly_for_the_peer_to_hang_up(
    autojump_clock: MockClock,
) -> None:
    # The peer broke the protocol and keeps sending: we send CLOSE and EOF at
    # once, then read and drop what comes for at most 0.1 s, so that a TCP
    # reset cannot destroy the CLOSE before the peer reads it.
    ours, theirs = trio.testing.memory_stream_pair()  # half-closeable, unlike WrappedStream
    peer = ScriptedPeer(theirs, Role.SERVER)
    stopped_reading_at: list[float] = []

    async def script() -> None:
        await peer.handshake()
        async with trio.open_nursery() as reading:
            reading.start_soon(peer.drain)
            await trio.sleep(1.5)
            await peer.send(b"\xff" * 6)
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:  # garbage until our side is gone
                    await peer.send(b"\x00" * 1024)
                    await trio.sleep(0.01)
            stopped_reading_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            async with open_stream_connection(ours, config=CONFIG):
                await trio.sleep_forever()
        assert trio.current_time() == 1.5 + 0.1
    assert raised.value.code == CloseCode.PROTOCOL_ERROR
    assert peer.frames[-1].close_code == CloseCode.PROTOCOL_ERROR
    assert peer.eof_at == 1.5  # our EOF went out with the CLOSE
    assert stopped_reading_at == [1.6]


async def test_linger_stops_reading_past_max_bytes_and_at_the_peers_eof(
    autojump_clock: MockClock,
) -> None:
    """A peer that floods is read only up to ``max_bytes`` (plus the last read); one that
    hangs up ends the linger at its EOF. Either way our EOF went out first."""
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(b"x" * (3 * RECEIVE_SIZE))
    await linger(ours, max_bytes=1000)
    assert await theirs.receive_some(1) == b""  # our EOF
    left = 0
    with trio.move_on_after(1.0):  # what linger left unread is still there
        while True:
            left += len(await ours.receive_some(3 * RECEIVE_SIZE))
    assert left == 2 * RECEIVE_SIZE  # one read took it past its 1,000 bytes

    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(b"x" * 100)
    await theirs.send_eof()
    started = trio.current_time()
    await linger(ours, max_bytes=1000)
    assert trio.current_time() == started  # at the EOF, with no wait


# -- the functions on their own --------------------------------------------------------

direct_io = pytest.mark.skipif(sys.platform == "win32", reason="no direct socket I/O on Windows")


@direct_io
async def test_socket_fd_is_a_plain_tcp_streams_descriptor_and_minus_one_otherwise() -> None:
    async with tcp_pair() as (client, _):
        assert socket_fd(client) == client.socket.fileno() >= 0
        await client.aclose()
        assert socket_fd(client) == -1  # asked afresh: a closed socket has none
    memory, _ = trio.testing.memory_stream_pair()
    assert socket_fd(memory) == -1
    async with tcp_pair() as (client, _):
        assert socket_fd(WrappedStream(client)) == -1  # only trio.SocketStream itself


@direct_io
def test_read_nowait_takes_what_arrived_and_says_none_or_eof() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        assert read_nowait(ours.fileno()) is None  # nothing yet: woken for nothing
        theirs.sendall(b"x" * 10)
        assert read_nowait(ours.fileno()) == b"x" * 10
        theirs.sendall(b"y" * (RECEIVE_SIZE + 5))
        assert len(read_nowait(ours.fileno()) or b"") <= RECEIVE_SIZE
        theirs.shutdown(socket.SHUT_WR)
        while (data := read_nowait(ours.fileno())) not in (b"", None):
            assert set(data) == {ord("y")}
        assert data == b""  # end-of-file


@direct_io
def test_write_nowait_takes_what_the_socket_takes_without_waiting() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        assert write_nowait(ours.fileno(), b"hello") == 5
        assert theirs.recv(5) == b"hello"
        # Fill the socket: the write that finds no room at all takes nothing.
        sent = 0
        while (n := write_nowait(ours.fileno(), b"z" * 65536)) > 0:
            sent += n
        assert n == 0
        assert sent > 0


@direct_io
def test_a_closed_descriptor_and_a_broken_one_are_told_apart() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.close()
    with pytest.raises(trio.BrokenResourceError) as broken:
        write_nowait(ours.fileno(), b"x" * 1024)  # the peer is gone: EPIPE
    assert isinstance(broken.value.__cause__, OSError)
    assert broken.value.__cause__.errno in (errno.EPIPE, errno.ECONNRESET)
    fd = ours.fileno()
    ours.close()
    with pytest.raises(trio.ClosedResourceError) as closed:
        read_nowait(fd)
    assert isinstance(closed.value.__cause__, OSError)
    assert closed.value.__cause__.errno == errno.EBADF


@pytest.mark.parametrize(
    ("error", "kind", "text"),
    [
        (OSError(errno.EBADF, "bad fd"), trio.ClosedResourceError, "the socket was already closed"),
        (
            ConnectionResetError(errno.ECONNRESET, "reset"),
            trio.BrokenResourceError,
            "socket connection broken: ",
        ),
        (
            BrokenPipeError(errno.EPIPE, "pipe"),
            trio.BrokenResourceError,
            "socket connection broken: ",
        ),
        (
            OSError(errno.ETIMEDOUT, "timed out"),
            trio.BrokenResourceError,
            "socket connection broken: ",
        ),
    ],
    ids=["EBADF", "ECONNRESET", "EPIPE", "ETIMEDOUT"],
)
def test_stream_error_says_it_as_trio_streams_do(
    error: OSError, kind: type[Exception], text: str
) -> None:
    translated = stream_error(error)
    assert type(translated) is kind
    assert str(translated).startswith(text)
    assert translated.__cause__ is error


async def test_linger_sends_eof_and_reads_to_the_peers_eof(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    read_at: list[float] = []

    async def peer() -> None:
        assert await theirs.receive_some() == b""  # our EOF came first
        read_at.append(trio.current_time())
        await theirs.send_all(b"late bytes, dropped")
        await trio.sleep(0.25)
        await theirs.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        await linger(ours)
        assert trio.current_time() == 0.25  # until the peer's EOF, not before
    assert read_at == [0.0]


class ReadSizes(WrappedStream):
    """Records how many bytes each ``receive_some`` asked for, and how many it returned."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.asked: list[int | None] = []
        self.returned: list[int] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.asked.append(max_bytes)
        data = await super().receive_some(max_bytes)
        self.returned.append(len(data))
        return data


async def test_linger_discards_a_flood_in_reads_of_bounded_size(
    autojump_clock: MockClock,
) -> None:
    """What the peer sends while we linger is read ``RECEIVE_SIZE`` bytes at a
    time: a peer that floods us before its EOF never makes us hold more than
    one read's worth at once (a memory stream would hand over all of it)."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream = ReadSizes(ours)
    flood = 3 * RECEIVE_SIZE + 5

    async def peer() -> None:
        await theirs.send_all(b"f" * flood)
        await trio.sleep(0.25)
        await theirs.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        await trio.sleep(0.125)  # the whole flood is buffered before we read
        await linger(stream)
    assert trio.current_time() == 0.25
    assert set(stream.asked) == {RECEIVE_SIZE}
    assert stream.returned == [RECEIVE_SIZE] * 3 + [5, 0]


async def test_linger_on_a_stream_that_cannot_half_close_only_reads(
    autojump_clock: MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    wrapped = WrappedStream(ours)  # not a HalfCloseableStream
    assert not isinstance(wrapped, trio.abc.HalfCloseableStream)

    async def peer() -> None:
        await theirs.send_all(b"dropped")
        await trio.sleep(0.5)
        await theirs.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        await linger(wrapped)
    assert trio.current_time() == 0.5
    assert wrapped.sent == b""  # nothing written, no EOF sent
