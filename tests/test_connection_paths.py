"""Paths through the rewritten runtime (``_connection.py``) that need a precise set-up.

Each test puts the connection in one situation the module docstring
describes (the writer standing back for an inline write, the watchdog's
guards, a write that cannot finish) and checks what goes on the wire and
when, in virtual time. Where the outcome depends on the order in which
Trio runs two tasks woken at the same instant, the stream is arranged so
that the order is fixed: :class:`LateReads` hands received bytes over a
set number of scheduling rounds late, as a busy event loop would. A
:class:`StallingStream` leaves a write half done (a full TCP buffer) until
the test lets it finish, so that the tests can see what is written, or not,
after a cut frame.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from helpers import ScriptedPeer, WrappedStream, opaque, wire_frame
from test_connection import (
    CONFIG,
    handshake_then_drain,
    run_body,
    served_connection,
    stream_and_peer,
)
from trio.testing import MockClock

from trio_heartbeat._config import Config
from trio_heartbeat._connection import Connection
from trio_heartbeat._errors import BrokenConnection, ConnectionClosed, HeartbeatTimeout
from trio_heartbeat._frames import CloseCode, FrameDecoder, FrameType, Role
from trio_heartbeat._handshake import CLIENT_LEAD
from trio_heartbeat._options import ConnectionOptions
from trio_heartbeat._state import State
from trio_heartbeat._stream_connection import open_stream_connection
from trio_heartbeat._writer import BEST_EFFORT_SECONDS


def how_it_ended(conn: Connection) -> tuple[type[ConnectionClosed], int, bool]:
    """The kind, code and side of a connection's end, for one assert."""
    closed = conn.closed
    assert closed is not None, "the connection has not ended"
    return type(closed), closed.code, closed.by_peer


WRITE_TIMEOUT_REASON = "write timeout: the peer stopped reading"


class LateReads(WrappedStream):
    """Hands every received chunk over ``rounds`` scheduling rounds after it arrived.

    A stand-in for a stream that does more work after its input has arrived
    (a decoder, say): the bytes are here, but the reader gets them only after
    other tasks have run ``rounds`` times. Cancel-safe, as Trio's streams
    are: a chunk whose handing over is cancelled is handed over next time.
    """

    def __init__(self, inner: trio.abc.Stream, rounds: int) -> None:
        super().__init__(inner)
        self.rounds = rounds
        self.held: bytes | bytearray | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.held is None:
            self.held = await super().receive_some(max_bytes)
        for _ in range(self.rounds):
            await trio.lowlevel.checkpoint()
        data, self.held = self.held, None
        return data


class RecordingStream(WrappedStream):
    """Keeps every ``send_all`` payload, one entry per call, and when one was cut off."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.writes: list[bytes] = []
        self.interrupted_at: float | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        try:
            await super().send_all(data)
        except trio.Cancelled:
            self.interrupted_at = trio.current_time()
            raise


class StepCounter(trio.abc.Instrument):
    """Counts the steps one task ends: a task that never yields ends none."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


def frame_types(data: bytes) -> list[FrameType]:
    """The types of the whole frames in ``data``, which must hold nothing else."""
    decoder = FrameDecoder(max_frame=0xFFFFFFFF)
    decoder.receive_data(data)
    kinds = [wire_frame(frame).type for frame in decoder.frames()]
    assert decoder.buffered == 0
    return kinds


def late_stream_and_peer(
    peer_role: Role = Role.SERVER, rounds: int = 1
) -> tuple[LateReads, ScriptedPeer]:
    """Our end of a memory stream pair reading ``rounds`` rounds late, and a peer."""
    ours, theirs = trio.testing.memory_stream_pair()
    return LateReads(ours, rounds), ScriptedPeer(theirs, peer_role)


class StallingStream(WrappedStream):
    """A stream whose next ``send_all`` stops partway, as a full TCP buffer does.

    After :meth:`stall_next_write`, the next write sends its first ``after``
    bytes and waits for :attr:`resume` before sending the rest, so that a
    frame can be left half on the wire.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.resume = trio.Event()
        self._stall_after: int | None = None

    def stall_next_write(self, after: int) -> None:
        self._stall_after = after

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        after, self._stall_after = self._stall_after, None
        if after is not None:
            await super().send_all(data[:after])
            try:
                await self.resume.wait()
            except trio.Cancelled:
                self.send_interrupted = True
                raise
            data = data[after:]
        await super().send_all(data)


def stalling_stream_and_peer(peer_role: Role = Role.SERVER) -> tuple[StallingStream, ScriptedPeer]:
    """Our end of a memory stream pair that can stall a write midway, and a peer."""
    ours, theirs = trio.testing.memory_stream_pair()
    return StallingStream(ours), ScriptedPeer(theirs, peer_role)


async def resume_at(stream: StallingStream, when: float) -> None:
    """Let a stalled write finish at ``when``."""
    await trio.sleep_until(when)
    stream.resume.set()


# -- the server looks for the client's PING before it PINGs ---------------------------


@pytest.mark.parametrize(
    ("rounds", "client_ping_at", "server_pings"),
    [(0, 0.75, []), (0, 1.125, [1.0]), (1, 0.75, [1.0])],
    ids=["waiting-in-the-buffer", "arrives-later", "handed-over-late"],
)
async def test_a_server_answers_the_client_ping_waiting_at_its_deadline_instead_of_pinging(
    rounds: int, client_ping_at: float, server_pings: list[float], autojump_clock: MockClock
) -> None:
    """The server's PING is due at 1.0 (its HELLO went out at 0.0). A client
    PING already in our buffer then (sent earlier, but a busy loop, here a
    clock jump, kept the reader from it) is answered, and the server sends no
    PING of its own: Trio wakes the reader for its input before it expires
    the timer's deadline. A PING that arrives after 1.0, or one that the
    stream hands over only later, finds the server's PING already sent; it is
    answered all the same (nothing is lost to the timer's cancellation)."""
    stream, peer = late_stream_and_peer(Role.CLIENT, rounds)
    stats = []

    async def script() -> None:
        await peer.handshake()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.serve)  # reads (and answers) everything, from now on
            await trio.sleep_until(client_ping_at)
            await peer.send_ping()
            if client_ping_at < 1.0:
                autojump_clock.jump(1.0 - client_ping_at)  # our reader gets to it only at 1.0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, role=Role.SERVER, config=CONFIG) as conn:
            await trio.sleep_until(1.5)
            stats.append(conn.statistics())
    [at_1_5] = stats
    assert at_1_5.send_interval == 1.0
    assert at_1_5.pings_sent == len(server_pings)
    assert peer.times(FrameType.PING) == server_pings
    # The client's PING was answered when we read it: at 1.0, or when it arrived.
    [pong] = peer.of_type(FrameType.PONG)
    assert (pong.at, pong.opaque) == (max(client_ping_at, 1.0), opaque(1))
    assert at_1_5.state is State.OPEN


# -- send() and receive() yield only when they must wait ------------------------------


async def test_receive_with_data_waiting_never_yields_yet_honours_a_cancel(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await peer.send_data(b"one")
        await peer.send_data(b"two")
        await peer.serve()

    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            await trio.sleep(0.5)
            assert conn.statistics().receive_queue_used == 2
            counter = StepCounter(trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(counter)
            try:
                # receive() is a cancellation point, which Trio counts as a
                # checkpoint, although with DATA waiting it never lets another
                # task run: the task's step goes on through it.
                with (
                    pytest.raises(AssertionError, match="assert_no_checkpoints block yielded"),
                    trio.testing.assert_no_checkpoints(),
                ):
                    received.append(await conn.receive())
            finally:
                trio.lowlevel.remove_instrument(counter)
            assert counter.steps == 0
            assert received == [b"one"]
            with trio.CancelScope() as scope:
                scope.cancel()
                received.append(await conn.receive())  # raises Cancelled: DATA or not
            assert scope.cancelled_caught
            # The DATA was not taken by the cancelled call: it is still there.
            assert conn.statistics().receive_queue_used == 1
            received.append(await conn.receive())
            assert received == [b"one", b"two"]
            assert trio.current_time() == 0.5


async def test_send_with_room_never_yields_yet_honours_a_cancel(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    async with served_connection(stream, peer, config=CONFIG) as conn:
        counter = StepCounter(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(counter)
        try:
            await conn.send(b"queued")
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps == 0
        assert conn.statistics().send_queue_used == 1
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.send(b"cancelled")  # raises Cancelled before queueing
        assert scope.cancelled_caught
        # Raising Cancelled let the writer run: the first message may be
        # on its way, but the cancelled one was not queued.
        stats = conn.statistics()
        assert stats.send_queue_used + stats.data_frames_out == 1
        assert await conn.receive() == b"queued"
        await trio.sleep(0.5)
    # The cancelled message never went out: a cancelled send() sent nothing.
    assert [frame.payload for frame in peer.of_type(FrameType.DATA)] == [b"queued"]


async def test_a_burst_of_sends_goes_out_in_one_write(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = RecordingStream(ours), ScriptedPeer(theirs)
    messages = [b"message %d" % n for n in range(50)]

    async with served_connection(stream, peer, config=CONFIG) as conn:
        assert conn.statistics().send_interval == 1.0
        counter = StepCounter(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(counter)
        try:
            for message in messages:
                await conn.send(message)
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps == 0
        assert [await conn.receive() for _ in messages] == messages
        writes = list(stream.writes)
    assert trio.current_time() == 0.0
    # Our HELLO (written by the reader, inline), then all 50 DATA in one send_all.
    assert [frame_types(write) for write in writes] == [
        [FrameType.HELLO],
        [FrameType.DATA] * 50,
    ]
    assert [frame.payload for frame in peer.of_type(FrameType.DATA)] == messages


# -- ping() writes inline, shielded, within the write timeout -------------------------


async def test_a_ping_cancelled_during_its_write_finishes_the_frame_first(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stalling_stream_and_peer()

    async with (
        trio.open_nursery() as nursery,
        served_connection(
            stream, peer, config=CONFIG, options=ConnectionOptions(write_timeout=1.0)
        ) as conn,
    ):
        await trio.sleep(0.25)
        stream.stall_next_write(after=4)  # half of the PING's header goes out
        nursery.start_soon(resume_at, stream, 0.875)
        with trio.move_on_after(0.25) as scope:
            await conn.ping()
        # Cancelled at 0.5, but the PING was on the wire: the call returned
        # only once the frame was whole, within the write timeout.
        assert scope.cancelled_caught
        assert trio.current_time() == 0.875
        assert conn.state is State.OPEN
        # Everything after it is framed as it should be.
        await conn.send(b"after the cut")
        assert await conn.receive() == b"after the cut"
        assert await conn.ping() == 0.0
    assert not stream.send_interrupted
    pings = peer.of_type(FrameType.PING)
    assert [(frame.at, frame.opaque) for frame in pings] == [(0.875, opaque(1)), (0.875, opaque(2))]
    assert [frame.type for frame in peer.frames] == [
        FrameType.HELLO,
        FrameType.PING,
        FrameType.DATA,
        FrameType.PING,
        FrameType.CLOSE,
    ]


async def test_a_ping_write_that_never_finishes_convicts_at_the_write_timeout(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stalling_stream_and_peer()
    ping_returned: list[float] = []

    async def body(conn: Connection) -> None:
        await trio.sleep(0.25)
        stream.stall_next_write(after=4)
        with trio.move_on_after(0.25):
            await conn.ping()
        ping_returned.append(trio.current_time())  # pragma: no cover - convicted first

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream, body, config=CONFIG, options=ConnectionOptions(write_timeout=1.0)
            )
        # The write started at 0.25; the caller's cancel at 0.5 did not cut it.
        assert trio.current_time() == 1.25
    assert ping_returned == []
    assert raised.value.reason == WRITE_TIMEOUT_REASON
    assert raised.value.code == CloseCode.HEARTBEAT_TIMEOUT
    assert stream.send_interrupted
    # Half a PING header is all that reached the peer: nothing was written
    # after it (a CLOSE there would be read as the rest of the PING).
    assert [frame.type for frame in peer.frames] == [FrameType.HELLO]
    assert peer.eof_at == 1.25
    assert stream.closed


# -- one writer at a time -----------------------------------------------------------


async def test_data_queued_during_an_inline_ping_goes_out_right_after_it(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stalling_stream_and_peer()

    async with (
        trio.open_nursery() as nursery,
        served_connection(stream, peer, config=CONFIG) as conn,
    ):
        await trio.sleep(0.25)
        stream.stall_next_write(after=4)
        nursery.start_soon(resume_at, stream, 0.5)
        # The writer is woken for the DATA while ping() writes its PING
        # inline: it stands back, and the DATA follows the PING.
        conn.send_nowait(b"queued behind the PING")
        assert await conn.ping() == 0.25
        assert trio.current_time() == 0.5
        assert await conn.receive() == b"queued behind the PING"
    assert [(frame.type, frame.at) for frame in peer.frames[1:3]] == [
        (FrameType.PING, 0.5),
        (FrameType.DATA, 0.5),
    ]


# -- closing wakes the senders that wait for room -----------------------------------


async def test_close_nowait_wakes_the_senders_waiting_for_room(autojump_clock: MockClock) -> None:
    stream, peer = stalling_stream_and_peer()
    woken: list[tuple[float, ConnectionClosed]] = []

    async def blocked_sender(conn: Connection) -> None:
        try:
            await conn.send(b"no room")
        except ConnectionClosed as exc:
            woken.append((trio.current_time(), exc))

    async with (
        trio.open_nursery() as nursery,
        served_connection(
            stream, peer, config=CONFIG, options=ConnectionOptions(send_queue=1)
        ) as conn,
    ):
        stream.stall_next_write(after=4)
        conn.send_nowait(b"first")  # the writer takes it and stalls mid-frame
        await trio.sleep(0.125)
        conn.send_nowait(b"second")  # fills the queue
        async with trio.open_nursery() as senders:
            senders.start_soon(blocked_sender, conn)
            senders.start_soon(blocked_sender, conn)
            await trio.sleep(0.125)
            assert woken == []  # both wait for room
            conn.close_nowait()
        assert trio.current_time() == 0.25  # they raised at once
        nursery.start_soon(resume_at, stream, 0.5)
        closed = await conn.wait_closed()
        assert trio.current_time() == 0.5
    assert [(at, type(exc), exc.code, exc.by_peer) for at, exc in woken] == [
        (0.25, ConnectionClosed, CloseCode.NORMAL, False)
    ] * 2
    assert (type(closed), closed.code) == (ConnectionClosed, CloseCode.NORMAL)
    # What was queued before the close still went out, ahead of the CLOSE.
    assert [(frame.type, frame.payload) for frame in peer.frames[1:]] == [
        (FrameType.DATA, b"first"),
        (FrameType.DATA, b"second"),
        (FrameType.CLOSE, b"\x03\xe8"),
    ]


@pytest.mark.parametrize("flush", [True, False], ids=["flush", "no-flush"])
async def test_senders_refused_after_close_nowait_hear_the_requested_code(
    flush: bool, autojump_clock: MockClock
) -> None:
    """A sender waiting for room, a later ``send_nowait`` and a ``ping`` all
    learn of the close the application asked for (4002), as ``wait_closed``
    does. Fails today with ``flush=True``: until the writer has flushed the
    queue and applied the close, ``_closed_error()`` finds no close code in the
    core and reports 1000 with an empty reason."""
    stream, peer = stalling_stream_and_peer()
    refusals: list[tuple[str, int, str]] = []

    async def blocked_sender(conn: Connection) -> None:
        try:
            await conn.send(b"no room")
        except ConnectionClosed as exc:
            refusals.append(("send", exc.code, exc.reason))

    async with (
        trio.open_nursery() as nursery,
        served_connection(
            stream, peer, config=CONFIG, options=ConnectionOptions(send_queue=1)
        ) as conn,
    ):
        stream.stall_next_write(after=4)
        conn.send_nowait(b"first")
        await trio.sleep(0.125)
        conn.send_nowait(b"second")
        async with trio.open_nursery() as senders:
            senders.start_soon(blocked_sender, conn)
            await trio.sleep(0.125)
            conn.close_nowait(4002, "app says bye", flush=flush)
        with pytest.raises(ConnectionClosed) as raised:
            conn.send_nowait(b"too late")
        refusals.append(("send_nowait", raised.value.code, raised.value.reason))
        with pytest.raises(ConnectionClosed) as raised:
            await conn.ping()
        refusals.append(("ping", raised.value.code, raised.value.reason))
        nursery.start_soon(resume_at, stream, 0.5)
        closed = await conn.wait_closed()
    assert (closed.code, closed.reason) == (4002, "app says bye")
    assert refusals == [
        ("send", 4002, "app says bye"),
        ("send_nowait", 4002, "app says bye"),
        ("ping", 4002, "app says bye"),
    ]


# -- inline writes that fail ----------------------------------------------------------


@pytest.mark.parametrize("writer", ["pong", "ping"])
async def test_an_inline_write_to_a_broken_transport_is_a_broken_connection(
    writer: str, autojump_clock: MockClock
) -> None:
    """The reader writing a PONG, or a ping() caller its PING, finds that the
    peer no longer accepts bytes: the connection fails at once, by our side."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = WrappedStream(ours), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.5)
        theirs.receive_stream.close()  # stops accepting bytes, still talks
        if writer == "pong":
            await trio.sleep(0.25)
            await peer.send_ping()
        await trio.sleep_forever()

    async def body(conn: Connection) -> None:
        if writer == "ping":
            await trio.sleep(0.75)
            await conn.ping()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(BrokenConnection) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 0.75  # before our idle PING at 0.9 could find out
        nursery.cancel_scope.cancel()
    assert raised.value.code == CloseCode.ABNORMAL_CLOSURE
    assert not raised.value.by_peer
    assert isinstance(raised.value.__cause__, trio.BrokenResourceError)
    assert stream.closed


# -- last words are given up after a short while --------------------------------------


async def test_an_answering_close_nobody_reads_is_given_up_after_a_short_while(
    autojump_clock: MockClock,
) -> None:
    """The peer closes (0.5) and stops reading. Our answering CLOSE goes out
    shielded, so that leaving the block cannot cut it off, but only for a short
    while: the writer gives it up on its own at 0.6, while the block still runs,
    and leaving the block later then takes no time at all."""
    ours, theirs = trio.testing.lockstep_stream_pair()
    stream, peer = RecordingStream(ours), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.5)  # before our first idle PING (0.9), which would stall
        await peer.send_close(CloseCode.GOING_AWAY, "bye")
        await trio.sleep_forever()  # never reads our answer

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            with pytest.raises(ConnectionClosed) as raised:
                await conn.receive()
            assert (raised.value.code, raised.value.by_peer) == (CloseCode.GOING_AWAY, True)
            assert trio.current_time() == 0.5
            await trio.sleep_until(0.75)
            # Given up by the writer itself, while the block still ran.
            assert stream.interrupted_at == 0.5 + BEST_EFFORT_SECONDS
            assert frame_types(stream.writes[-1]) == [FrameType.CLOSE]
        # The peer's orderly close is no failure, and nothing was left to wait for.
        assert trio.current_time() == 0.75
        nursery.cancel_scope.cancel()
    assert how_it_ended(conn) == (ConnectionClosed, CloseCode.GOING_AWAY, True)
    assert stream.closed


# -- the watchdog's verdicts ----------------------------------------------------------


async def test_a_write_cut_by_the_timer_past_the_abort_deadline_is_a_heartbeat_timeout(
    autojump_clock: MockClock,
) -> None:
    """The peer neither reads nor writes. Our DATA write stalls at 0.5; its
    write timeout (3 s, the default) would end it at 3.5, but the peer has
    been silent since 0.0 and is dead at 3.0: the verdict is the heartbeat
    timeout, and nothing more is written after the cut frame."""
    stream, peer = stalling_stream_and_peer()

    async def body(conn: Connection) -> None:
        await trio.sleep(0.5)
        stream.stall_next_write(after=3)
        await conn.send(b"half of this")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 3.0
    assert (raised.value.code, raised.value.reason) == (
        CloseCode.HEARTBEAT_TIMEOUT,
        "heartbeat timeout",
    )
    assert stream.send_interrupted
    # Our idle PING was due at 0.9, but no PING goes out while a write is stuck.
    assert [frame.type for frame in peer.frames] == [FrameType.HELLO]
    assert peer.eof_at == 3.0


@pytest.mark.parametrize(("rounds", "verdict_at"), [(0, 6.0), (1, 3.0)], ids=["honoured", "late"])
async def test_a_frame_that_arrived_before_a_stall_is_read_before_the_verdict(
    rounds: int, verdict_at: float, autojump_clock: MockClock
) -> None:
    """The peer's DATA arrives at 2.5, but a stalled loop (a clock jump) brings
    us to the 3.0 deadline before the reader has run. The reader, woken for
    its input before Trio expires the deadline, takes it in: the frame saves
    the peer (silent again from 3.0, it is convicted at 6.0). A stream that
    hands the frame over a round later than that is too late: the verdict
    stands at 3.0."""
    stream, peer = late_stream_and_peer(Role.SERVER, rounds)
    received: list[tuple[float, bytes]] = []

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(2.5)
        await peer.send_data(b"sent in time")
        autojump_clock.jump(0.5)
        await peer.drain()

    async def body(conn: Connection) -> None:
        message = await conn.receive()
        received.append((trio.current_time(), message))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout):
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == verdict_at
    assert received == ([(3.0, b"sent in time")] if verdict_at > 3.0 else [])
    assert peer.of_type(FrameType.CLOSE)[0].at == verdict_at


@pytest.mark.parametrize(
    ("send_queue", "messages"),
    [
        (64, 1),
        (1, 1),
        (4, 4),
    ],
    ids=["room-left", "queue-of-one", "queue-full"],
)
async def test_data_and_a_due_ping_go_out_when_an_inline_write_ends_late(
    send_queue: int, messages: int, autojump_clock: MockClock
) -> None:
    """Our PONG to the peer's PING at 0.5 stalls until 1.5; meanwhile the
    application queues DATA (at 1.0) and our own PING falls due (at 0.5 +
    0.9). When the PONG is through, the writer must send both at once: one
    PING, then the DATA, at 1.5.

    A regression test: with the send queue full at 1.5 the writer skips the
    coalescing round, queues the PING and the DATA in the core, and meets the
    cancellation of its own timer (rearmed to the past, 1.4, when the PONG
    write ended) before ``data_to_send``. ``_on_timer`` then finds no PING due
    (one was just queued); the writer used to park with the bytes in the core
    until its next PING deadline, 1.5 + 0.9 = 2.4, and add a second PING right
    behind the first (a rate-rule strike at the peer).
    """
    stream, peer = stalling_stream_and_peer()
    payloads = [b"queued while the PONG is stuck %d" % n for n in range(messages)]

    async def script() -> None:
        await peer.handshake()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.serve)
            await trio.sleep_until(0.5)
            stream.stall_next_write(after=4)  # our PONG
            await peer.send_ping()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        nursery.start_soon(resume_at, stream, 1.5)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(send_queue=send_queue)
        ) as conn:
            await trio.sleep_until(1.0)
            for payload in payloads:
                conn.send_nowait(payload)
            assert [await conn.receive() for _ in payloads] == payloads
            echoed_at = trio.current_time()
    assert 0.5 + 1.0 * CLIENT_LEAD < 1.5  # our PING was due while the PONG was stuck
    assert [(frame.type, frame.at) for frame in peer.frames[1:-1]] == [
        (FrameType.PONG, 1.5),
        (FrameType.PING, 1.5),
    ] + [(FrameType.DATA, 1.5)] * messages
    assert echoed_at == 1.5


# -- aclose() bounds its flush ---------------------------------------------------------


@pytest.mark.parametrize(
    ("close_timeout", "data_delivered", "closed_at"),
    [(1.0, 4, 2.0), (5.0, 6, 2.8)],
    ids=["flush-cut-short", "flush-in-time"],
)
async def test_a_flush_that_outlasts_the_close_timeout_gives_way_to_the_close(
    close_timeout: float, data_delivered: int, closed_at: float, autojump_clock: MockClock
) -> None:
    # Every write waits for the peer to read it, and the peer reads one frame
    # every 0.4 s. Six 200 kB messages go two per write (the batch limit is
    # 256 KiB), so the whole flush would take until 2.4.
    ours, theirs = trio.testing.lockstep_stream_pair()
    peer = ScriptedPeer(theirs, Role.SERVER)
    received: list[tuple[float, FrameType]] = []

    async def script() -> None:
        await peer.handshake()
        while True:
            await trio.sleep(0.4)
            frame = await peer.receive_frame()
            assert frame is not None
            received.append((trio.current_time(), frame.type))
            if frame.type is FrameType.CLOSE:
                await peer.send_close(frame.close_code)
                return

    config = Config(interval=10.0, timeout=30.0, close_timeout=close_timeout)
    options = ConnectionOptions(write_timeout=10.0, send_queue=8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(ours, config=config, options=options) as conn:
            for _ in range(6):
                conn.send_nowait(b"x" * 200_000)
            await conn.aclose(4001, "done")
            assert trio.current_time() == closed_at
    # Cut short: what was on the wire by the deadline (1.0) went out, the
    # CLOSE followed the write under way (done at 1.6), the rest was dropped.
    assert [kind for _, kind in received] == [FrameType.DATA] * data_delivered + [FrameType.CLOSE]
    assert received[-1][0] == closed_at
    assert how_it_ended(conn) == (ConnectionClosed, 4001, False)
    assert conn.closed is not None
    assert conn.closed.reason == "done"


# -- a reset in answer to our CLOSE --------------------------------------------------


async def test_a_reset_in_answer_to_our_close_ends_it_like_an_eof(
    autojump_clock: MockClock,
) -> None:
    # The peer reads our CLOSE and resets the connection instead of answering.
    # The close is over, not cleanly, as when the peer just hangs up: the
    # block that closed does not raise.
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        while (frame := await peer.receive_frame()) is not None:
            if frame.type is FrameType.CLOSE:
                await trio.sleep(0.25)
                stream.break_now()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            await trio.sleep(1.0)
        assert trio.current_time() == 1.25
    assert how_it_ended(conn) == (ConnectionClosed, CloseCode.NORMAL, False)
    assert stream.closed
