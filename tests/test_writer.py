"""The write side of one connection (``_writer.py``): the send queue, one writer at a time, the write deadline.

What goes on the wire, in what order and when. A burst of sends goes out in
one write, and a batch stops at 256 KiB; the send queue pushes back on
``send``; control frames go ahead of queued DATA; at most one task writes at a
time (the reader and ``ping()`` write inline, the writer task is started on
demand and ends when nothing is left); a write that makes no progress for the
write timeout convicts the peer, and nothing follows a frame cut halfway; a
close flushes the queue for ``close_timeout`` at most; last words are given
up after a short while.

In virtual time, over memory streams: :class:`helpers.StallingStream` leaves
a write half done (a full TCP buffer) until the test lets it finish,
:class:`RecordingStream` keeps each ``send_all``, a lockstep stream makes every
write wait for the peer to read it, and :func:`helpers.watch_writers` sees
every writer task start and end.
"""

from __future__ import annotations

import math
import socket
from contextlib import suppress

import pytest
import trio
import trio.testing
from helpers import (
    CONFIG,
    VIRTUAL_BOUND,
    ScriptedPeer,
    StallingStream,
    StepCounter,
    WrappedStream,
    handshake_then_drain,
    how_it_ended,
    idle_ping_times,
    lockstep_stream_and_peer,
    memory_stream_and_peer,
    opaque,
    resume_at,
    run_body,
    served_connection,
    stalling_stream_and_peer,
    stream_and_peer,
    task_names,
    wait_forever,
    watch_writers,
    wire_frame,
)
from trio.testing import MockClock

from trio_heartbeat import _transport, _writer
from trio_heartbeat._budget import BufferBudget
from trio_heartbeat._config import Config
from trio_heartbeat._connection import _READER_NAME, Connection
from trio_heartbeat._errors import (
    BrokenConnection,
    ConnectionClosed,
    HeartbeatTimeout,
    LocalProtocolError,
    RemoteProtocolError,
)
from trio_heartbeat._frames import CloseCode, FrameDecoder, FrameType, Role
from trio_heartbeat._handshake import CLIENT_LEAD
from trio_heartbeat._options import ConnectionOptions
from trio_heartbeat._state import State
from trio_heartbeat._stream_connection import open_stream_connection
from trio_heartbeat._writer import _BATCH_BYTES, BEST_EFFORT_SECONDS
from trio_heartbeat._writer import _TASK_NAME as _WRITER_NAME

WRITE_TIMEOUT_REASON = "write timeout: the peer stopped reading"


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


def frame_types(data: bytes) -> list[FrameType]:
    """The types of the whole frames in ``data``, which must hold nothing else."""
    decoder = FrameDecoder(max_frame=0xFFFFFFFF)
    decoder.receive_data(data)
    kinds = [wire_frame(frame).type for frame in decoder.frames()]
    assert decoder.buffered == 0
    return kinds


def data_payloads(data: bytes) -> list[bytes]:
    """The payloads of the DATA frames in ``data``, which must hold whole frames only."""
    decoder = FrameDecoder(max_frame=0xFFFFFFFF)
    decoder.receive_data(data)
    frames = [wire_frame(frame) for frame in decoder.frames()]
    assert decoder.buffered == 0
    return [frame.payload for frame in frames if frame.type is FrameType.DATA]


# -- the send queue --------------------------------------------------------------------


async def test_send_waits_while_the_send_queue_is_full(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(1.0)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(send_queue=2)
        ) as conn:
            await trio.sleep(0.125)  # our HELLO is out: "1" travels alone
            conn.send_nowait(b"1")
            await trio.sleep(0.125)  # the writer takes it and blocks: the peer is not reading
            conn.send_nowait(b"2")
            conn.send_nowait(b"3")
            assert conn.statistics().send_queue_used == 2
            with pytest.raises(trio.WouldBlock):
                conn.send_nowait(b"4")
            await conn.send(b"4")
            assert trio.current_time() == 1.0
    assert [frame.payload for frame in peer.of_type(FrameType.DATA)] == [b"1", b"2", b"3", b"4"]


async def test_the_send_queue_takes_exactly_its_byte_bound_again_after_each_write(
    autojump_clock: MockClock,
) -> None:
    """With ``send_queue_bytes=10`` the queue takes messages up to exactly 10
    bytes and refuses the eleventh byte; once the writer has sent them, the
    same 10 bytes fit again (what it wrote no longer counts)."""
    stream, peer = stream_and_peer()
    options = ConnectionOptions(send_queue_bytes=10)
    async with served_connection(stream, peer, config=CONFIG, options=options) as conn:
        for round_ in (b"1", b"2"):
            # No checkpoint in between: the writer cannot take any of it yet.
            conn.send_nowait(round_ * 4)
            conn.send_nowait(round_ * 6)  # 10 bytes queued: at the bound, not past it
            with pytest.raises(trio.WouldBlock):
                conn.send_nowait(round_)
            assert conn.statistics().send_queue_used == 2
            assert [await conn.receive(), await conn.receive()] == [round_ * 4, round_ * 6]
            assert conn.statistics().send_queue_used == 0
    assert [frame.payload for frame in peer.of_type(FrameType.DATA)] == [
        b"1111",
        b"111111",
        b"2222",
        b"222222",
    ]
    assert trio.current_time() == 0.0


async def test_queued_data_counts_against_a_shared_budget_until_it_is_written(
    autojump_clock: MockClock,
) -> None:
    """What ``send`` queues is held in the shared budget, byte for byte,
    and given back once the writer has taken it out of the queue."""
    budget = BufferBudget(1 << 20)
    stream, peer = stream_and_peer()
    options = ConnectionOptions(budget=budget)
    async with served_connection(stream, peer, config=CONFIG, options=options) as conn:
        conn.send_nowait(b"x" * 1000)
        conn.send_nowait(b"y" * 234)
        assert budget.holding(conn) == budget.used == 1234
        assert await conn.receive() == b"x" * 1000
        assert await conn.receive() == b"y" * 234
        assert budget.holding(conn) == budget.used == 0


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


@pytest.mark.parametrize("send_queue", [1, 2])
async def test_senders_waiting_for_room_get_it_in_turn_as_each_write_frees_it(
    send_queue: int, autojump_clock: MockClock
) -> None:
    """The peer reads nothing until 1.0; meanwhile the queue fills and
    ``4 * send_queue + 1`` senders wait for room, one after another. From
    1.0 each write takes a full queue and lets exactly that many senders in,
    the longest waiting first: their messages go out in the order they
    came, ``send_queue`` to a write. (A sender let in too early finds no
    room and waits again, behind the others: its message would come late.)"""
    ours, theirs = trio.testing.lockstep_stream_pair()
    stream, peer = RecordingStream(ours), ScriptedPeer(theirs)
    queued = [b"queued %d" % n for n in range(send_queue)]
    waiting = [b"waited %02d" % n for n in range(4 * send_queue + 1)]

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(1.0)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(send_queue=send_queue)
        ) as conn:
            conn.send_nowait(b"first")
            await trio.sleep(0.125)  # the writer takes it and blocks: the peer is not reading
            for message in queued:
                conn.send_nowait(message)
            async with trio.open_nursery() as senders:
                for message in waiting:
                    senders.start_soon(conn.send, message)
                    await trio.sleep(0.0625)  # each waits for room before the next comes
                assert conn.statistics().send_queue_used == send_queue
            assert trio.current_time() == 1.0
    # The DATA of each write (a PING or the CLOSE may ride along); senders
    # let in together may queue in either order.
    per_write = [sorted(data_payloads(write)) for write in stream.writes]
    assert [payloads for payloads in per_write if payloads] == [
        [b"first"],
        queued,
        *[waiting[start : start + send_queue] for start in range(0, len(waiting), send_queue)],
    ]


async def test_oversized_send_is_refused_locally(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer(max_frame=1024)
    async with served_connection(stream, peer, config=CONFIG) as conn:
        with pytest.raises(LocalProtocolError) as raised:
            await conn.send(b"x" * 1025)
        assert raised.value.code == CloseCode.TOO_BIG
        # The message names both sizes: what was sent, and the peer's limit.
        assert str(raised.value) == "DATA of 1025 bytes exceeds the peer's limit of 1024"
        await conn.send(b"x" * 1024)
        assert await conn.receive() == b"x" * 1024


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


# -- coalescing, batches, and control frames first -------------------------------------


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
    # Our HELLO and the PONG to the server's verdict (each written by the
    # reader, inline), then all 50 DATA in one send_all.
    assert [frame_types(write) for write in writes] == [
        [FrameType.HELLO],
        [FrameType.PONG],
        [FrameType.DATA] * 50,
    ]
    assert [frame.payload for frame in peer.of_type(FrameType.DATA)] == messages


async def test_the_writer_waits_a_round_for_a_burst_that_is_still_growing(
    autojump_clock: MockClock,
) -> None:
    """The application yields once after each of five sends, and the writer,
    started by the first, runs in between. It does not write the first
    message alone: it gives the application a scheduling round, and another
    as long as the queue grew meanwhile, so its first write carries at least
    two. (How many more depends on which task the scheduler runs first;
    hence twenty bursts.) Every message arrives, in order."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = RecordingStream(ours), ScriptedPeer(theirs)
    async with served_connection(stream, peer, config=CONFIG) as conn:
        for attempt in range(20):
            burst = [b"burst %d, message %d" % (attempt, n) for n in range(5)]
            writes_before = len(stream.writes)
            for message in burst:
                conn.send_nowait(message)
                await trio.lowlevel.checkpoint()
            assert [await conn.receive() for _ in burst] == burst
            first_write = data_payloads(stream.writes[writes_before])
            assert first_write == burst[: len(first_write)]
            assert len(first_write) >= 2
    assert [frame.payload for frame in peer.of_type(FrameType.DATA)] == [
        b"burst %d, message %d" % (attempt, n) for attempt in range(20) for n in range(5)
    ]
    assert trio.current_time() == 0.0


async def test_a_batch_that_reaches_256_kib_exactly_takes_nothing_more(
    autojump_clock: MockClock,
) -> None:
    """Six queued messages of 64 KiB: the first write carries four of them
    (256 KiB, the batch limit reached exactly), the second the other two."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = RecordingStream(ours), ScriptedPeer(theirs)
    size = 64 * 1024
    assert 4 * size == _BATCH_BYTES
    messages = [bytes([n]) * size for n in range(6)]
    async with served_connection(stream, peer, config=CONFIG) as conn:
        for message in messages:
            conn.send_nowait(message)
        assert [await conn.receive() for _ in messages] == messages
        data_writes = [frame_types(write) for write in stream.writes[2:]]
    assert data_writes == [[FrameType.DATA] * 4, [FrameType.DATA] * 2]


async def test_pong_goes_out_ahead_of_queued_data(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()
    message = b"x" * 10_000
    count = 50

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(1.0)  # not reading: our writer is stuck mid-batch
        await peer.send_ping(b"pingpong")
        await trio.sleep(0.25)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(send_queue=count)
        ) as conn:
            for _ in range(count):
                conn.send_nowait(message)
            await trio.sleep(2.0)
    kinds = [frame.type for frame in peer.frames]
    pong_at = kinds.index(FrameType.PONG)
    # The first batch (messages until 256 KiB are taken) was already being
    # written; the PONG then went ahead of all the DATA still queued.
    first_batch = math.ceil(_BATCH_BYTES / len(message))
    assert first_batch < count
    assert kinds[1:pong_at] == [FrameType.DATA] * first_batch
    assert kinds[pong_at + 1 :] == [FrameType.DATA] * (count - first_batch) + [FrameType.CLOSE]
    assert peer.frames[pong_at].opaque == b"pingpong"
    assert peer.frames[pong_at].at == 1.25


# -- one writer at a time --------------------------------------------------------------


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


async def test_a_close_asked_for_during_an_inline_write_follows_it_at_once(
    autojump_clock: MockClock,
) -> None:
    """The reader's PONG stalls from 0.25 to 0.5; at 0.375 the application
    closes (nothing queued to flush). The writer stands back while the PONG
    is written, and sends the CLOSE the moment the PONG is through."""
    stream, peer = stalling_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.serve)
            await trio.sleep_until(0.25)
            stream.stall_next_write(after=4)  # our PONG
            await peer.send_ping()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        nursery.start_soon(resume_at, stream, 0.5)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            await trio.sleep_until(0.375)
            conn.close_nowait()
            closed = await conn.wait_closed()
            assert trio.current_time() == 0.5
    assert (type(closed), closed.code, closed.by_peer) == (
        ConnectionClosed,
        CloseCode.NORMAL,
        False,
    )
    assert [(frame.type, frame.at) for frame in peer.frames[1:]] == [
        (FrameType.PONG, 0.5),
        (FrameType.CLOSE, 0.5),
    ]


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


async def test_a_ping_due_during_the_writers_write_goes_out_right_after_it(
    autojump_clock: MockClock,
) -> None:
    """The writer takes "a" at 0.0 and is stuck writing it (the peer reads
    nothing until 0.9) while our PING falls due, at 0.9 exactly; "b" and "c"
    fill the queue meanwhile. The moment the write ends, the writer's next
    round puts the PING first: it goes out at 0.9, ahead of "b" and "c"."""
    stream, peer = lockstep_stream_and_peer()
    assert 1.0 * CLIENT_LEAD == 0.9

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(0.9)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(send_queue=2)
        ) as conn:
            conn.send_nowait(b"a")
            await trio.sleep(0.125)  # the writer took "a" at 0.0 and is stuck in its write
            conn.send_nowait(b"b")
            conn.send_nowait(b"c")
            assert [await conn.receive() for _ in range(3)] == [b"a", b"b", b"c"]
            assert conn.statistics().pongs_received == 1
            assert conn.rtt == 0.0  # the PING was sent, and answered, at 0.9
    assert [(frame.type, frame.at, frame.payload[:1]) for frame in peer.frames[1:5]] == [
        (FrameType.DATA, 0.9, b"a"),
        (FrameType.PING, 0.9, b"\x00"),
        (FrameType.DATA, 0.9, b"b"),
        (FrameType.DATA, 0.9, b"c"),
    ]


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


async def test_an_answer_whose_timer_expired_first_is_no_cut_write(
    autojump_clock: MockClock,
) -> None:
    """The peer's PING at 0.5 wakes our reader, but before the reader runs the
    clock jumps to 1.0, past the PING we owe at 0.9: the reader holds the
    PING's bytes and an expired timer. The timer must be taken before the
    PONG's write starts, with the PONG still in the core; a write cancelled
    before its first byte would count as a write cut short and end the
    connection. The PONG goes out at 1.0 (and, being a frame sent, puts off
    the PING we owed), and the connection carries on."""
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.5)
        await peer.send_ping()  # the reader is now runnable, with these bytes
        autojump_clock.jump(0.5)  # and its timer expires before it runs
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            await trio.sleep_until(1.5)
            assert conn.closed is None
    assert [(frame.type, frame.at, frame.opaque) for frame in peer.frames[1:-1]] == [
        (FrameType.PONG, 1.0, opaque(1))
    ]
    assert how_it_ended(conn) == (ConnectionClosed, CloseCode.NORMAL, False)
    assert not stream.send_interrupted


# -- the writer task on demand ---------------------------------------------------------


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
    # The reader writes our HELLO and the PONG to the server's verdict inline.
    assert stream.writes[:4] == [
        (0.0, _READER_NAME, [FrameType.HELLO]),
        (0.0, _READER_NAME, [FrameType.PONG]),
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
    # The reader writes our HELLO and the PONG to the server's verdict inline;
    # that PONG, at 0.0, is our last frame before the first idle PING.
    assert stream.writes[: 2 + len(expected)] == [
        (0.0, _READER_NAME, [FrameType.HELLO]),
        (0.0, _READER_NAME, [FrameType.PONG]),
        *[(at, _WRITER_NAME, [FrameType.PING]) for at in expected],
    ]
    assert peer.times(FrameType.PING) == expected


# -- the write deadline, and writes cut short ------------------------------------------


async def test_write_timeout_when_the_peer_stops_reading(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_forever()  # neither reads nor writes

    async def body(conn: Connection) -> None:
        await trio.sleep(0.5)
        await conn.send(b"into the void")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream, body, config=CONFIG, options=ConnectionOptions(write_timeout=1.0)
            )
        assert trio.current_time() == 1.5
        nursery.cancel_scope.cancel()
    assert raised.value.reason == "write timeout: the peer stopped reading"
    assert stream.closed
    assert stream.send_interrupted


async def test_a_peer_that_pings_but_never_reads_is_cut_off(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        with suppress(trio.BrokenResourceError):
            while True:
                await trio.sleep(1.0)
                await peer.send_ping()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, wait_forever, config=CONFIG)
        # Our PING at 0.9 (a client leads the peer's PING at 1.0) never gets
        # through; the write is given up one timeout (3 s, the default write
        # timeout) later. The peer's PINGs, still read, keep it from looking dead.
        assert trio.current_time() == 1.0 * CLIENT_LEAD + 3.0
        nursery.cancel_scope.cancel()
    assert raised.value.reason == "write timeout: the peer stopped reading"


async def test_write_timeout_while_the_reader_waits_for_the_application(
    autojump_clock: MockClock,
) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        with suppress(trio.BrokenResourceError):  # we hang up while it still writes
            for n in range(3):
                await peer.send_data(b"%d" % n)
            await trio.sleep_forever()  # never reads again

    async def body(conn: Connection) -> None:
        await trio.sleep(0.5)
        await conn.send(b"nobody reads this")
        await trio.sleep_forever()  # nor do we

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream,
                body,
                config=CONFIG,
                options=ConnectionOptions(receive_queue=1, write_timeout=1.0),
            )
        # The reader was paused (no liveness verdict); the write timeout still holds.
        assert trio.current_time() == 1.5
        nursery.cancel_scope.cancel()
    assert raised.value.reason == "write timeout: the peer stopped reading"


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


async def test_after_a_write_cut_halfway_the_stream_is_closed_without_a_goodbye(
    autojump_clock: MockClock,
) -> None:
    """As above, the PING's write is cut at 1.5, after the peer's orderly
    CLOSE (0.75). A close that says goodbye (a TLS close_notify) would write
    after the partial frame as well: the stream is only closed forcefully,
    by the last words, when the block is left (2.0)."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = SlowToClose(ours, takes=0.0625), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(0.75)
        await peer.send_close()
        await peer.drain()

    async def pinger(conn: Connection) -> None:
        with pytest.raises(ConnectionClosed):
            await conn.ping()

    async def body(conn: Connection) -> None:
        await trio.sleep_until(0.5)
        stream.stall_next_write(after=5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pinger, conn)
        assert trio.current_time() == 1.5  # the PING's write was given up
        await trio.sleep_until(2.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with trio.fail_after(VIRTUAL_BOUND):
            await run_body(
                stream, body, config=CONFIG, options=ConnectionOptions(write_timeout=1.0)
            )
    assert stream.send_interrupted
    assert stream.closes == [("cut short", 2.0)]
    assert peer.eof_at == 2.0


# -- writes that fail ------------------------------------------------------------------


async def test_write_failure_is_a_broken_connection(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream = WrappedStream(ours)
    peer = ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        # The peer stops accepting bytes but never ends its own side: only
        # our writes can notice.
        await trio.sleep(0.5)
        theirs.receive_stream.close()

    conns: list[Connection] = []

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep(0.75)
        await conn.send(b"lost")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(BrokenConnection) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 0.75
    assert isinstance(raised.value.__cause__, trio.BrokenResourceError)
    assert raised.value.by_peer is False  # ours: a bool, not merely falsy
    # Afterwards every send reports the same failure.
    with pytest.raises(BrokenConnection):
        await conns[0].send(b"after")
    with pytest.raises(BrokenConnection):
        conns[0].send_nowait(b"after")
    with pytest.raises(BrokenConnection):
        await conns[0].receive()


class WritesFail(WrappedStream):
    """A stream whose writes fail from :meth:`fail_writes` on, the one under way
    included (say a reset the next write reports); reads go on as before."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self._failed = False
        self._writes: set[trio.CancelScope] = set()

    def fail_writes(self) -> None:
        self._failed = True
        for scope in self._writes:
            scope.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with trio.CancelScope() as scope:
            self._writes.add(scope)
            try:
                if not self._failed:
                    await super().send_all(data)
            finally:
                self._writes.discard(scope)
        if self._failed:
            raise trio.BrokenResourceError("connection reset (injected, on writes)")


async def test_after_a_failed_write_the_writer_takes_nothing_more_from_the_queue(
    autojump_clock: MockClock,
) -> None:
    """The writer is writing a batch (two 200 kB messages) when the stream
    breaks at 0.5, with the queue full again behind it. The connection fails,
    and every message no write had taken is still queued, for
    ``take_unsent`` to hand back (a reconnecting client sends them again)."""
    ours, theirs = trio.testing.lockstep_stream_pair()
    stream, peer = WritesFail(ours), ScriptedPeer(theirs)
    messages = [bytes([n]) * 200_000 for n in range(5)]
    conns: list[Connection] = []

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_forever()  # reads nothing more

    async def body(conn: Connection) -> None:
        conns.append(conn)
        for message in messages[:3]:
            conn.send_nowait(message)
        await trio.sleep(0.125)  # the writer took the first two and is stuck writing them
        for message in messages[3:]:
            conn.send_nowait(message)
        assert conn.statistics().send_queue_used == 3
        await trio.sleep_until(0.5)
        stream.fail_writes()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(BrokenConnection) as raised:
            await run_body(stream, body, config=CONFIG, options=ConnectionOptions(send_queue=3))
        assert trio.current_time() == 0.5
        nursery.cancel_scope.cancel()
    assert raised.value.by_peer is False  # our write failed
    assert conns[0].take_unsent() == messages[2:]


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
    assert raised.value.by_peer is False  # ours: a bool, not merely falsy
    assert isinstance(raised.value.__cause__, trio.BrokenResourceError)
    assert stream.closed


# -- closing: the flush, and last words ------------------------------------------------


async def test_close_nowait_without_flush_jumps_the_queue(autojump_clock: MockClock) -> None:
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(1.0)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            conn.send_nowait(b"first")
            await trio.sleep(0.5)  # the writer is stuck writing "first"
            conn.send_nowait(b"never sent")
            conn.close_nowait(4002, "now", flush=False)
            conn.close_nowait(4003, "ignored")  # the first close wins
            with pytest.raises(ConnectionClosed):
                conn.send_nowait(b"refused")
            closed = await conn.wait_closed()
            assert (closed.code, closed.reason) == (4002, "now")
    assert [(frame.type, frame.payload) for frame in peer.frames[1:]] == [
        (FrameType.DATA, b"first"),
        (FrameType.CLOSE, b"\x0f\xa2now"),
    ]


@pytest.mark.parametrize(
    ("close_timeout", "data_delivered", "closed_at"),
    [(1.0, 4, 2.0), (0.8, 2, 0.8 + 0.4), (5.0, 6, 2.8)],
    ids=["flush-cut-short", "flush-ends-with-a-write", "flush-in-time"],
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
    options = ConnectionOptions(write_timeout=10.0, send_queue=8, send_queue_bytes=2_000_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(ours, config=config, options=options) as conn:
            for _ in range(6):
                conn.send_nowait(b"x" * 200_000)
            await conn.aclose(4001, "done")
            assert trio.current_time() == closed_at
    # Cut short: what was on the wire by the deadline (1.0) went out, the
    # CLOSE followed the write under way (done at 1.6), the rest was dropped.
    # A deadline (0.8) met exactly as a write ends is over: the CLOSE goes next.
    assert [kind for _, kind in received] == [FrameType.DATA] * data_delivered + [FrameType.CLOSE]
    assert received[-1][0] == closed_at
    assert how_it_ended(conn) == (ConnectionClosed, 4001, False)
    assert conn.closed is not None
    assert conn.closed.reason == "done"


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


async def test_after_an_orderly_close_the_writer_closes_the_stream_while_the_block_runs(
    autojump_clock: MockClock,
) -> None:
    """The peer closes at 0.5 and we answer: the stream is closed right
    then, by the writer, not when the block is left at 1.0."""
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.5)
        await peer.send_close(CloseCode.GOING_AWAY)
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            with pytest.raises(ConnectionClosed):
                await conn.receive()
            await trio.sleep_until(1.0)
            assert stream.aclose_calls == 1
            assert peer.eof_at == 0.5
    assert [frame.type for frame in peer.frames] == [FrameType.HELLO, FrameType.CLOSE]
    assert how_it_ended(conn) == (ConnectionClosed, CloseCode.GOING_AWAY, True)


class SlowToClose(StallingStream):
    """A stream whose ``aclose`` says goodbye first (as TLS sends its
    close_notify), which takes ``takes`` seconds; records how each close went.
    It can stall a write, as :class:`helpers.StallingStream` does."""

    def __init__(self, inner: trio.abc.Stream, takes: float) -> None:
        super().__init__(inner)
        self.takes = takes
        self.closes: list[tuple[str, float]] = []

    async def aclose(self) -> None:
        self.aclose_calls += 1
        try:
            await trio.sleep(self.takes)
            self.closes.append(("goodbye said", trio.current_time()))
        except trio.Cancelled:
            self.closes.append(("cut short", trio.current_time()))
            raise
        finally:
            await trio.aclose_forcefully(self.inner)


@pytest.mark.parametrize(
    ("takes", "first_close"),
    [(0.0625, ("goodbye said", 0.5625)), (5.0, ("cut short", 0.5 + BEST_EFFORT_SECONDS))],
    ids=["quick-goodbye", "endless-goodbye"],
)
async def test_the_writer_closes_the_stream_shielded_for_a_short_while(
    takes: float, first_close: tuple[str, float], autojump_clock: MockClock
) -> None:
    """After the peer's CLOSE at 0.5 the writer closes the stream, whose
    close takes ``takes``. A cancel of the block from outside at 0.53 does
    not cut that close short, but it gets a short while at most; then the
    block is left (and the last words close the stream once more, at once)."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = SlowToClose(ours, takes), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.5)
        await peer.send_close()
        await peer.drain()

    async def cancel_at(scope: trio.CancelScope, when: float) -> None:
        await trio.sleep_until(when)
        scope.cancel()

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(script)
            with trio.CancelScope() as outside:
                nursery.start_soon(cancel_at, outside, 0.53125)
                async with open_stream_connection(stream, config=CONFIG):
                    await trio.sleep_forever()
            assert trio.current_time() == first_close[1]
    assert stream.closes == [first_close, ("cut short", first_close[1])]
    assert peer.eof_at == first_close[1]


class FailsAsItCloses(WrappedStream):
    """A stream whose first ``aclose`` closes it and then reports a reset."""

    async def aclose(self) -> None:
        await super().aclose()
        if self.aclose_calls == 1:
            raise trio.BrokenResourceError("connection reset as we hung up")


async def test_a_stream_that_fails_as_the_writer_closes_it_leaves_an_orderly_end_alone(
    autojump_clock: MockClock,
) -> None:
    """The peer closes in order at 0.5; the writer then closes the stream,
    which reports a reset. The connection has ended in order already: the
    failure is no news, and the block carries on and is left without error."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = FailsAsItCloses(ours), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.5)
        await peer.send_close(CloseCode.GOING_AWAY, "bye")
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            await trio.sleep_until(1.0)
            assert stream.aclose_calls == 1
    assert how_it_ended(conn) == (ConnectionClosed, CloseCode.GOING_AWAY, True)
    assert peer.eof_at == 0.5


async def test_an_answering_close_is_not_cut_off_by_a_cancel_from_outside(
    autojump_clock: MockClock,
) -> None:
    """The peer closes at 0.5 and reads our answer only at 0.5625; the block
    is cancelled from outside at 0.53125, while the answer is on its way. It
    still arrives whole (it is written shielded, within its short while),
    and only then is the block left."""
    ours, theirs = trio.testing.lockstep_stream_pair()
    peer = ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.5)
        await peer.send_close(CloseCode.GOING_AWAY, "bye")
        await trio.sleep_until(0.5625)
        await peer.drain()

    async def cancel_at(scope: trio.CancelScope, when: float) -> None:
        await trio.sleep_until(when)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with trio.CancelScope() as outside:
            nursery.start_soon(cancel_at, outside, 0.53125)
            async with open_stream_connection(ours, config=CONFIG):
                await trio.sleep_forever()
        assert trio.current_time() == 0.5625
    assert [(frame.at, frame.close_code, frame.close_reason) for frame in peer.frames[1:]] == [
        (0.5625, CloseCode.GOING_AWAY, "bye")
    ]


async def test_last_words_nobody_reads_are_given_up_after_a_short_while(
    autojump_clock: MockClock,
) -> None:
    """The peer breaks the protocol at 0.5 and reads nothing more: our CLOSE
    1002 goes out as last words, after everything was cancelled, but only for
    a short while; then the stream is closed and the block's exception raised."""
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(0.5)  # before our idle PING (0.9), which would stall
        with suppress(trio.BrokenResourceError):
            await peer.send(b"\xff" * 6)
        await trio.sleep_forever()  # never reads again

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            await run_body(stream, wait_forever, config=CONFIG)
        assert trio.current_time() == 0.5 + BEST_EFFORT_SECONDS
        nursery.cancel_scope.cancel()
    assert raised.value.code == CloseCode.PROTOCOL_ERROR
    assert isinstance(raised.value.__cause__, RemoteProtocolError)
    assert stream.send_interrupted  # the CLOSE was cut off, not waited for
    assert stream.closed
    assert FrameType.CLOSE not in [frame.type for frame in peer.frames]


async def test_last_words_go_out_when_the_block_is_cancelled_from_outside(
    autojump_clock: MockClock,
) -> None:
    """A cancel from outside the ``async with`` at 0.5 leaves the block
    mid-connection: the CLOSE 1001 said on the way out is written although
    the caller's scope is still cancelled, and the stream is closed after it."""
    stream, peer = stream_and_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with trio.move_on_after(0.5) as scope:
            async with open_stream_connection(stream, config=CONFIG) as conn:
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert trio.current_time() == 0.5
    assert [
        (frame.at, frame.close_code, frame.close_reason) for frame in peer.of_type(FrameType.CLOSE)
    ] == [(0.5, CloseCode.GOING_AWAY, "cancelled")]
    assert peer.eof_at == 0.5
    assert stream.closed
    assert how_it_ended(conn) == (ConnectionClosed, CloseCode.GOING_AWAY, False)


async def test_senders_waiting_for_room_hear_of_a_failure_at_once(
    autojump_clock: MockClock,
) -> None:
    """A write stalls from 0.0 and is given up at its write timeout, 1.0: a
    sender in another task, waiting for room in the full queue, raises then,
    with how the connection ended."""
    stream, peer = stalling_stream_and_peer()
    woken: list[tuple[float, type[ConnectionClosed]]] = []

    async def blocked_sender(conn: Connection) -> None:
        try:
            await conn.send(b"no room")
        except ConnectionClosed as exc:
            woken.append((trio.current_time(), type(exc)))

    async with trio.open_nursery() as outside:

        async def body(conn: Connection) -> None:
            stream.stall_next_write(after=4)
            conn.send_nowait(b"first")  # the writer takes it and stalls mid-frame
            await trio.sleep(0.125)
            conn.send_nowait(b"second")  # fills the queue of one
            outside.start_soon(blocked_sender, conn)
            await trio.sleep_forever()

        outside.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream,
                body,
                config=CONFIG,
                options=ConnectionOptions(send_queue=1, write_timeout=1.0),
            )
        assert trio.current_time() == 1.0
    assert raised.value.reason == WRITE_TIMEOUT_REASON
    assert woken == [(1.0, HeartbeatTimeout)]


# -- a direct write the socket took only part of ------------------------------------------


async def test_the_rest_of_a_partial_direct_write_goes_out_before_anything_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PONG the socket took only part of: the writer task sends the rest
    first, then what was queued meanwhile, and the peer reads whole frames.

    Over a real socket pair, in real time; the socket's taking only three
    bytes (a nearly full buffer) is injected, and the application sends at
    that very moment.
    """
    a, b = socket.socketpair()
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    peer = ScriptedPeer(trio.SocketStream(trio.socket.from_stdlib_socket(b)))
    conns: list[Connection] = []
    partial: list[int] = []

    def stingy(fd: int, data: bytes) -> int:
        if conns and not partial and FrameType.PONG in frame_types(data):
            partial.append(len(data))
            conns[0].send_nowait(b"sent while the PONG was half out")
            return _transport.write_nowait(fd, data[:3])
        return _transport.write_nowait(fd, data)

    monkeypatch.setattr(_writer, "write_nowait", stingy)

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await peer.send_ping()
        assert await conn.receive() == b"the end"

    async def script() -> None:
        await peer.handshake()
        pong = await peer.expect(FrameType.PONG)
        data = await peer.expect(FrameType.DATA)
        assert data.payload == b"sent while the PONG was half out"
        assert pong.payload[:8] == opaque(1)
        await peer.send_data(b"the end")
        await peer.expect(FrameType.CLOSE)
        await peer.send_close()
        await peer.stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(script)
            await run_body(ours, body, config=CONFIG)
    assert len(partial) == 1
    assert partial[0] > 3  # the PONG, of which the socket took 3 bytes


async def test_data_queued_at_a_heartbeat_timeout_never_goes_out(autojump_clock: MockClock) -> None:
    """The peer reads but says nothing; our DATA is half written when its
    silence reaches the timeout, with more queued behind it. The conviction
    cuts the write: nothing follows the partial frame (no CLOSE, no queued
    DATA), and what was queued comes back from ``take_unsent``."""
    stream, peer = stalling_stream_and_peer()
    conns: list[Connection] = []

    async def body(conn: Connection) -> None:
        conns.append(conn)
        await trio.sleep_until(2.0)
        stream.stall_next_write(after=3)
        conn.send_nowait(b"first")
        await trio.sleep(0.25)  # the writer has begun, and stalls
        conn.send_nowait(b"second")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout):
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 3.0
    (conn,) = conns
    assert stream.send_interrupted
    assert FrameType.DATA not in [frame.type for frame in peer.frames]
    assert FrameType.CLOSE not in [frame.type for frame in peer.frames]
    assert peer._decoder.buffered == 3  # the start of "first", and nothing after it
    assert conn.take_unsent() == [b"second"]
