"""``open_stream_connection`` (``_stream_connection.py``): one connection for the length of an ``async with`` block.

Entering starts the connection and waits for the handshake (a client's block
starts only once its HELLO is written); leaving closes it, with 1000 after a
block that ended in order and 1001 after one that raised. Whatever happens the
stream is closed, and exactly one exception comes out: the block's own
(unchanged, even an exception group), or the one that says how the connection
failed. A manager is entered once. In virtual time, against a
:class:`helpers.ScriptedPeer` on the far end of a memory stream.
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing
from helpers import (
    CONFIG,
    VIRTUAL_BOUND,
    ScriptedPeer,
    handshake_then_drain,
    handshake_then_serve,
    run_body,
    served_connection,
    stream_and_peer,
    wait_forever,
)
from trio.testing import MockClock

from trio_heartbeat._connection import Connection
from trio_heartbeat._detectors import FailureDetector
from trio_heartbeat._errors import ConnectionClosed, HeartbeatTimeout
from trio_heartbeat._events import ConnectionEnded, Event, HandshakeComplete, PingReceived
from trio_heartbeat._frames import CloseCode, FrameType, Role
from trio_heartbeat._options import ConnectionOptions
from trio_heartbeat._state import State
from trio_heartbeat._stream_connection import open_stream_connection

#: The whole message of the error a second entry raises.
ONLY_ONCE = r"^open_stream_connection\(\) can be entered only once$"

# -- entering --------------------------------------------------------------------------


async def test_a_client_block_starts_only_once_its_hello_is_written(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stream_and_peer(role=Role.SERVER)

    async def body(conn: Connection) -> None:
        raise KeyError("at once")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(KeyError):
            await run_body(stream, body, role=Role.CLIENT, config=CONFIG)
    types = [frame.type for frame in peer.frames]
    assert types[:1] == [FrameType.HELLO]
    assert peer.frames[-1].close_code == CloseCode.GOING_AWAY


async def test_protocol_error_during_the_handshake(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.send(b"GET / HTTP/1.1\r\n\r\n")
        await peer.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            async with open_stream_connection(stream, config=CONFIG):
                pass  # pragma: no cover - never entered
    assert raised.value.code == CloseCode.PROTOCOL_ERROR
    assert [frame.type for frame in peer.frames] == [FrameType.CLOSE]


async def test_open_stream_connection_can_be_entered_only_once(autojump_clock: MockClock) -> None:
    """A second entry, during or after the first, raises RuntimeError without
    touching the stream or the live connection."""
    stream, peer = stream_and_peer()
    manager = open_stream_connection(stream, config=CONFIG)

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake_then_serve, peer)
            async with manager as conn:
                with pytest.raises(RuntimeError, match=ONLY_ONCE):
                    await manager.__aenter__()
                assert not stream.closed
                await conn.send(b"still served")
                assert await conn.receive() == b"still served"
    closes = stream.aclose_calls
    with pytest.raises(RuntimeError, match=ONLY_ONCE):
        await manager.__aenter__()
    assert stream.aclose_calls == closes
    assert conn.statistics().state is State.CLOSED
    assert trio.current_time() == 0.0


async def test_the_listeners_and_the_remote_address_given_reach_the_connection(
    autojump_clock: MockClock,
) -> None:
    """What the caller passes on is the connection's: each listener hears
    every event, from the handshake to the end, and the remote address is
    the one given."""
    stream, peer = stream_and_peer()
    heard: list[tuple[str, Connection, type[Event]]] = []

    def first(conn: Connection, event: Event) -> None:
        heard.append(("first", conn, type(event)))

    def second(conn: Connection, event: Event) -> None:
        heard.append(("second", conn, type(event)))

    async with served_connection(
        stream,
        peer,
        config=CONFIG,
        listeners=[first, second],
        remote_address="peer.example:4242",
    ) as conn:
        assert conn.remote_address == "peer.example:4242"
    assert [(name, kind) for name, who, kind in heard if who is conn] == [
        ("first", HandshakeComplete),
        ("second", HandshakeComplete),
        ("first", PingReceived),  # the server's verdict
        ("second", PingReceived),
        ("first", ConnectionEnded),
        ("second", ConnectionEnded),
    ]
    assert len(heard) == 6


async def test_the_detector_of_the_options_is_the_one_that_judges(
    autojump_clock: MockClock,
) -> None:
    """A detector that suspects a silent peer at once convicts it as early
    as THB/1 lets any detector: two of the peer's send intervals (1 s) after
    its last frame, at 2.0, where the default would wait for the timeout (3.0)."""

    class Impatient:
        def record(self, arrival: float) -> None:
            pass

        def suspect_at(self, last_arrival: float, timeout: float) -> float:
            return last_arrival

    stream, peer = stream_and_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout):
            await run_body(
                stream, wait_forever, config=CONFIG, options=ConnectionOptions(detector=Impatient)
            )
        assert trio.current_time() == 2.0


async def test_the_stream_is_closed_even_if_setting_up_fails(autojump_clock: MockClock) -> None:
    stream, _peer = stream_and_peer()

    def broken_detector() -> FailureDetector:
        raise RuntimeError("no detector today")

    with pytest.raises(RuntimeError, match="no detector today"):
        async with open_stream_connection(
            stream, options=ConnectionOptions(detector=broken_detector)
        ):
            pass  # pragma: no cover - never entered
    assert stream.closed


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


# -- leaving ---------------------------------------------------------------------------


async def test_leaving_the_block_closes_with_1000(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    async with served_connection(stream, peer, hello_only=True, config=CONFIG) as conn:
        await conn.send(b"a")
        await conn.send(b"b")
    assert [frame.type for frame in peer.frames] == [
        FrameType.HELLO,
        FrameType.DATA,
        FrameType.DATA,
        FrameType.CLOSE,
    ]
    assert peer.frames[-1].close_code == CloseCode.NORMAL
    assert conn.state is State.CLOSED
    assert stream.closed


async def test_a_body_exception_propagates_unchanged(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()
    cause = KeyError("the cause")
    error = ValueError("from the body")

    async def script() -> None:
        await peer.handshake()
        await peer.drain()

    async def body(conn: Connection) -> None:
        await trio.sleep(0.5)
        raise error from cause

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ValueError, match="from the body") as raised:
            await run_body(stream, body, config=CONFIG)
    assert raised.value is error
    assert raised.value.__cause__ is cause
    close = peer.frames[-1]
    assert (close.at, close.close_code, close.close_reason) == (
        0.5,
        CloseCode.GOING_AWAY,
        "ValueError",
    )
    assert stream.closed


async def test_an_error_raised_while_being_cancelled_wins(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def body(conn: Connection) -> None:
        try:
            await trio.sleep_forever()
        finally:
            # The watchdog cancelled us at 3.0 and our cleanup failed:
            # that error is what the caller needs to see.
            raise RuntimeError("cleanup failed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(RuntimeError, match="cleanup failed"):
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 3.0
    assert [frame.at for frame in peer.of_type(FrameType.CLOSE)] == [3.0]
    assert stream.closed


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


async def test_a_cancel_while_the_exit_waits_for_the_peers_close_still_closes_the_stream(
    autojump_clock: MockClock,
) -> None:
    stream, peer = stream_and_peer()
    after_the_block: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)  # reads our CLOSE, never answers
        with trio.move_on_after(1.0) as scope:
            async with open_stream_connection(stream, config=CONFIG) as conn:
                await trio.sleep(0.25)
            after_the_block.append(trio.current_time())  # pragma: no cover - cancelled first
        assert scope.cancelled_caught
        assert trio.current_time() == 1.0
    assert after_the_block == []
    assert stream.closed
    assert [(frame.at, frame.close_code) for frame in peer.of_type(FrameType.CLOSE)] == [
        (0.25, CloseCode.NORMAL)
    ]
    assert peer.eof_at == 1.0
    closed = conn.closed
    assert closed is not None
    assert (type(closed), closed.code, closed.by_peer) == (
        ConnectionClosed,
        CloseCode.NORMAL,
        False,
    )
