"""Cancelling a connection from outside, at every point where it can be cancelled.

The idea comes from httpcore's ``tests/test_cancellations.py``: run one
scenario again and again, cancel it at a different moment each time, and check
that every run ends cleanly. Here "a different moment" is either the k-th task
step of the whole run (an instrument counts the steps of every task and fires
the cancel before step k) or a virtual-time deadline in a sweep. Every run must
show that:

* the cancellation surfaces as a plain :class:`trio.Cancelled` (never an
  exception group) and the caller's cancel scope absorbs it;
* the stream was closed;
* no task outlived the ``async with`` block;
* the peer heard CLOSE 1001 if the handshake had completed and no write was
  cut off midway (after our own ``aclose()`` began, 1000 is also right).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from helpers import ScriptedPeer, WrappedStream, living_tasks
from trio.testing import MockClock

from trio_heartbeat._config import Config
from trio_heartbeat._connection import Connection
from trio_heartbeat._errors import ConnectionClosed
from trio_heartbeat._events import Event, HandshakeComplete
from trio_heartbeat._frames import CloseCode, FrameType, Role
from trio_heartbeat._options import ConnectionOptions
from trio_heartbeat._state import State
from trio_heartbeat._stream_connection import open_stream_connection

CONFIG = Config(interval=1.0, timeout=3.0)


class CancelBeforeStep(trio.abc.Instrument):
    """Cancels ``scope`` just before the ``step``-th task step of the run."""

    def __init__(self, scope: trio.CancelScope, step: int) -> None:
        self.scope = scope
        self.step = step
        self.steps = 0
        self.fired = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        if self.steps == self.step:
            self.fired = True
            self.scope.cancel()


@dataclass
class Run:
    """What one cancelled (or not) run left behind."""

    stream: WrappedStream
    peer: ScriptedPeer
    escaped: BaseException | None = None
    opened: bool = False
    closing: bool = False
    finished: bool = False
    cancelled: bool = False
    tasks_before: int = 0
    tasks_after: int = 0
    events: list[Event] = field(default_factory=list)


async def scenario(conn: Connection, run: Run, idle: float) -> None:
    """Every kind of await a connection's user makes; ``idle`` lets a PING go by."""
    await conn.send(b"one")
    assert await conn.receive() == b"one"
    await conn.ping()
    await trio.sleep(idle)
    conn.send_nowait(b"two")
    async for message in conn:
        assert message == b"two"
        break
    run.closing = True
    await conn.aclose()


async def run_once(
    cancel: CancelBeforeStep | None, after: float = float("inf"), *, delay: float = 0.0
) -> Run:
    """One run of :func:`scenario` against a well-mannered peer, cancelled by
    ``cancel`` or ``after`` seconds (or not at all); returns what it left."""
    ours, theirs = trio.testing.memory_stream_pair()
    run = Run(WrappedStream(ours, checkpoints=True, receive_delay=delay), ScriptedPeer(theirs))

    def listener(conn: Connection, event: Event) -> None:
        run.events.append(event)
        if isinstance(event, HandshakeComplete):
            run.opened = True

    measured = trio.Event()

    async def peer_script() -> None:
        await run.peer.send_hello()
        await run.peer.serve()
        await measured.wait()  # stay alive, so that the task count is exact

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer_script)
        with trio.move_on_after(after) as outer:
            run.tasks_before = living_tasks()
            if cancel is not None:
                cancel.scope = outer
                trio.lowlevel.add_instrument(cancel)
            try:
                async with open_stream_connection(
                    run.stream, config=CONFIG, listeners=[listener]
                ) as conn:
                    await scenario(conn, run, idle=1.0 if delay else 0.0)
                run.finished = True
            except BaseException as exc:
                run.escaped = exc
                raise
            finally:
                run.tasks_after = living_tasks()
                measured.set()
                if cancel is not None:
                    trio.lowlevel.remove_instrument(cancel)
        run.cancelled = outer.cancelled_caught
    return run


def check(run: Run) -> None:
    """The invariants every run must keep, however it was cancelled."""
    assert run.escaped is None or type(run.escaped) is trio.Cancelled, repr(run.escaped)
    assert run.cancelled == (run.escaped is not None)
    assert run.finished != run.cancelled
    assert run.stream.closed
    # Our reader and writer are gone; only the peer's task is still there.
    assert run.tasks_after == run.tasks_before
    # The peer read to the end of the stream: we closed it.
    assert run.peer.eof_at is not None
    closes = run.peer.of_type(FrameType.CLOSE)
    if run.opened and not run.stream.send_interrupted:
        assert len(closes) == 1, run.peer.frames
        assert closes[0] is run.peer.frames[-1]
        expected = {CloseCode.GOING_AWAY}
        if run.closing:
            expected.add(CloseCode.NORMAL)
        assert closes[0].close_code in expected
    if run.finished:
        assert [frame.close_code for frame in closes] == [CloseCode.NORMAL]
    assert len(closes) <= 1


async def test_cancel_before_every_task_step(autojump_clock: MockClock) -> None:
    outcomes: list[tuple[bool, bool, bool]] = []
    step = 0
    while True:
        step += 1
        cancel = CancelBeforeStep(trio.CancelScope(), step)
        run = await run_once(cancel)
        check(run)
        outcomes.append((run.opened, run.closing, run.stream.send_interrupted))
        if not cancel.fired or run.finished:
            break
        assert step < 2000, "the scenario never finished"
    # The sweep went through the handshake, the open connection and the close.
    assert (False, False, False) in outcomes
    assert any(opened and not closing for opened, closing, _ in outcomes)
    assert any(closing for _, closing, _ in outcomes)
    assert step > 50


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        # The handshake ends at 0.01, the server's verdict opens the block at
        # 0.02, the first echo and ping are done by 0.04.
        (0.0, {"handshake", "open"}),
        # Our idle PING at 0.93 (CLIENT_LEAD of the interval after the ping at
        # 0.03), the last echo at 1.04, CLOSE at 1.05, done at 1.06.
        (0.9, {"open", "closing", "finished"}),
    ],
)
async def test_cancel_at_every_moment_of_a_slow_connection(
    autojump_clock: MockClock, start: float, expected: set[str]
) -> None:
    """Reads take 0.01 s of virtual time here, so a deadline sweep with a finer
    step lands on every read, write and wakeup in turn."""
    phases: set[str] = set()
    for n in range(70):
        run = await run_once(None, start + n * 0.0025, delay=0.01)
        check(run)
        if run.finished:
            phases.add("finished")
        elif run.closing:
            phases.add("closing")
        else:
            phases.add("open" if run.opened else "handshake")
    assert phases == expected


# -- cancelling one call leaves the connection usable ------------------------------


async def test_cancelled_send_queues_nothing(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.lockstep_stream_pair()
    stream, peer = WrappedStream(ours), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        await trio.sleep(1.0)  # not reading yet: our writer is stuck on "1"
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(
            stream, config=CONFIG, options=ConnectionOptions(send_queue=1)
        ) as conn:
            await trio.sleep(0.125)  # our HELLO is out: "1" travels alone
            conn.send_nowait(b"1")
            await trio.sleep(0.125)
            conn.send_nowait(b"2")
            with trio.move_on_after(0.25) as scope:
                await conn.send(b"cancelled")
            assert scope.cancelled_caught
            assert trio.current_time() == 0.5
            assert conn.state is State.OPEN
            await conn.send(b"3")
            assert trio.current_time() == 1.0
    payloads = [frame.payload for frame in peer.of_type(FrameType.DATA)]
    assert payloads == [b"1", b"2", b"3"]


async def test_cancelled_receive_loses_nothing(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = WrappedStream(ours), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()  # with the verdict that opens our block, at 0.0
        await trio.sleep(1.0)
        await peer.send_data(b"late")
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            with trio.move_on_after(0.5):
                await conn.receive()
            assert conn.state is State.OPEN
            assert await conn.receive() == b"late"
            assert trio.current_time() == 1.0


async def test_cancelled_ping_and_its_late_pong(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = WrappedStream(ours), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        ping = await peer.expect(FrameType.PING)
        await trio.sleep(0.5)  # answer only after the caller gave up
        await peer.send_pong(ping.opaque)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            with trio.move_on_after(0.25):
                await conn.ping()
            await trio.sleep(0.5)
            # The late PONG still measured the round trip, and broke nothing.
            assert conn.rtt == 0.5
            assert conn.statistics().pongs_received == 1
            assert await conn.ping() == 0.0
            assert trio.current_time() == 0.75
            assert conn.state is State.OPEN


async def test_cancelled_aclose_still_closes(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = WrappedStream(ours), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()  # with the verdict that opens our block, at 0.0
        with trio.move_on_after(1.0):
            await peer.drain()  # our CLOSE arrives; the answer comes late
        await peer.send_close()
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, config=CONFIG) as conn:
            with trio.move_on_after(0.25):
                await conn.aclose()
            assert conn.state is State.CLOSING
            with pytest.raises(ConnectionClosed):
                await conn.send(b"closing already")
        # Leaving the block waited for the peer's answer.
        assert trio.current_time() == 1.0
    assert conn.statistics().state is State.CLOSED
    assert [frame.close_code for frame in peer.of_type(FrameType.CLOSE)] == [CloseCode.NORMAL]
    assert stream.closed


# -- cancelling the whole connection where it waits --------------------------------


async def test_cancel_during_the_handshake(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = WrappedStream(ours), ScriptedPeer(theirs, role=Role.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.drain)  # reads our HELLO, never answers
        with trio.move_on_after(1.5) as outer:
            try:
                async with open_stream_connection(stream, role=Role.SERVER, config=CONFIG):
                    pass  # pragma: no cover - never entered
            except BaseException as exc:
                assert type(exc) is trio.Cancelled
                raise
        assert outer.cancelled_caught
    assert trio.current_time() == 1.5
    assert [frame.type for frame in peer.frames] == [FrameType.HELLO, FrameType.CLOSE]
    assert peer.frames[-1].close_code == CloseCode.GOING_AWAY
    assert stream.closed


async def test_cancel_while_the_writer_is_stuck(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.lockstep_stream_pair()
    stream, peer = WrappedStream(ours), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_forever()  # stops reading

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with trio.move_on_after(2.0) as outer:
            async with open_stream_connection(stream, config=CONFIG) as conn:
                await conn.send(b"stuck")
                await trio.sleep_forever()
        assert outer.cancelled_caught
        # Prompt: no waiting for the write, the write timeout or a CLOSE.
        assert trio.current_time() == 2.0
        nursery.cancel_scope.cancel()
    assert stream.send_interrupted
    assert stream.closed


async def test_cancel_while_the_reader_waits_for_the_application(
    autojump_clock: MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = WrappedStream(ours), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        for n in range(5):
            await peer.send_data(b"%d" % n)
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with trio.move_on_after(4.0) as outer:
            async with open_stream_connection(
                stream, config=CONFIG, options=ConnectionOptions(receive_queue=1)
            ):
                await trio.sleep_forever()  # never reads
        assert outer.cancelled_caught
        assert trio.current_time() == 4.0
    assert peer.frames[-1].close_code == CloseCode.GOING_AWAY
    assert stream.closed


async def test_cancel_while_waiting_for_the_close_answer(autojump_clock: MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream, peer = WrappedStream(ours), ScriptedPeer(theirs)

    async def script() -> None:
        await peer.handshake()
        await peer.drain()  # never answers our CLOSE

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with trio.move_on_after(1.0) as outer:
            async with open_stream_connection(stream, config=Config(close_timeout=5.0)):
                pass  # leaving the block starts the close handshake
        assert outer.cancelled_caught
        assert trio.current_time() == 1.0
    # Our CLOSE 1000 went out at once; cancelling the wait sent nothing more.
    assert [frame.close_code for frame in peer.of_type(FrameType.CLOSE)] == [CloseCode.NORMAL]
    assert stream.closed
