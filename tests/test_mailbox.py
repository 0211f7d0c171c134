"""The reconnecting client's mailbox (``Mailbox`` in ``_mailbox.py``): its send buffer and its inbox.

The mailbox is driven on its own, in virtual time (the ``autojump_clock``
fixture), against a small fake connection that has only what the mailbox
uses (``send``, ``take_unsent``, ``receive``, ``receive_nowait``, ``closed``)
and that the test opens, fills and ends by hand. The tests pin order across
connections (a message a dying connection did not take stays at the head,
what it took and never wrote comes back to the head), what a full buffer
does (``"wait"`` and ``"fail"``), that a cancelled ``send`` or ``receive``
loses nothing, the forwarder's backpressure while a connection is open and
none once it has ended, and when ``refused()`` and ``stopped()`` are raised.
Every wait is checked to the exact virtual moment it ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import cast

import pytest
import trio
from helpers import VIRTUAL_BOUND
from trio.testing import MockClock

from trio_heartbeat import Connection
from trio_heartbeat._errors import ConnectionClosed, HeartbeatError, ReconnectFailed
from trio_heartbeat._mailbox import Mailbox


class FakeConnection:
    """Just what :class:`Mailbox` calls on a connection, driven by the test.

    ``send`` accepts a message while the fake has ``room`` (else it waits),
    and keeps it as unwritten until :meth:`write` says it went out;
    ``take_unsent`` hands back the unwritten ones. ``receive`` takes from
    :attr:`incoming`, which the test fills with :meth:`deliver`. :meth:`end`
    ends it: ``send`` refuses, and ``receive`` raises once ``incoming`` is empty.
    """

    def __init__(self, room: int = 1000) -> None:
        self.room = room
        #: (virtual time, message) for every message ``send`` accepted.
        self.accepted: list[tuple[float, bytes]] = []
        self.unwritten: list[bytes] = []
        self.incoming: deque[bytes] = deque()
        self.closed: ConnectionClosed | None = None
        self._changed = trio.Event()

    def as_connection(self) -> Connection:
        return cast(Connection, self)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- driven by the test -----------------------------------------------------------

    def make_room(self, count: int) -> None:
        self.room += count
        self._notify()

    def write(self, count: int) -> None:
        """The first ``count`` unwritten messages went out on the wire."""
        del self.unwritten[:count]

    def deliver(self, *messages: bytes) -> None:
        self.incoming.extend(messages)
        self._notify()

    def end(self, code: int = 1006) -> None:
        self.closed = ConnectionClosed(code, "gone")
        self._notify()

    # -- what Mailbox calls -----------------------------------------------------------

    async def send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        while self.closed is None and self.room == 0:
            await self._changed.wait()
        if self.closed is not None:
            raise self.closed
        self.room -= 1
        self.accepted.append((trio.current_time(), data))
        self.unwritten.append(data)

    def take_unsent(self) -> list[bytes]:
        assert self.closed is not None, "only an ended connection gives its messages back"
        unsent, self.unwritten = self.unwritten, []
        return unsent

    async def receive(self) -> bytes:
        while True:
            await trio.lowlevel.checkpoint()  # before taking: a cancelled receive takes nothing
            if self.incoming:
                return self.incoming.popleft()
            if self.closed is not None:
                raise self.closed
            await self._changed.wait()

    def receive_nowait(self) -> bytes:
        if self.incoming:
            return self.incoming.popleft()
        if self.closed is not None:
            raise self.closed
        raise trio.WouldBlock


def nothing() -> HeartbeatError | None:
    """Neither refused nor stopped."""
    return None


def after(when: float, error: HeartbeatError) -> Callable[[], HeartbeatError | None]:
    """``error`` from virtual time ``when`` on."""
    return lambda: error if trio.current_time() >= when else None


def messages(count: int, prefix: bytes = b"m") -> list[bytes]:
    return [prefix + b"%d" % n for n in range(1, count + 1)]


async def end_at(conn: FakeConnection, when: float) -> None:
    await trio.sleep_until(when)
    conn.end()


async def deliver_at(conn: FakeConnection, when: float, *items: bytes) -> None:
    await trio.sleep_until(when)
    conn.deliver(*items)


async def send_all(mailbox: Mailbox, items: list[bytes]) -> None:
    for item in items:
        await mailbox.send(item, nothing)


# -- sending through the pump ----------------------------------------------------------
#
# A wait that only a wake-up from the mailbox ends runs under
# ``trio.fail_after(VIRTUAL_BOUND)``: a missed wake-up fails the test at once
# (virtual time jumps to the bound) instead of hanging it.


async def test_the_pump_hands_messages_over_in_order(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(8, "wait", 8)
    conn = FakeConnection()
    await send_all(mailbox, messages(3))
    assert mailbox.buffered == 3
    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.pump, conn.as_connection())
            await mailbox.wait_sent()
            assert trio.current_time() == 0.0
            await trio.sleep(1.0)
            await mailbox.send(b"late", nothing)  # the idle pump wakes for it
            await mailbox.wait_sent()
            nursery.cancel_scope.cancel()
    assert conn.accepted == [(0.0, b"m1"), (0.0, b"m2"), (0.0, b"m3"), (1.0, b"late")]
    assert mailbox.buffered == 0


async def test_a_message_the_dying_connection_did_not_take_stays_at_the_head(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 8)
    first = FakeConnection(room=1)
    await send_all(mailbox, messages(3))
    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(end_at, first, 2.0)
            # m1 goes in; m2 waits for room that never comes, until the
            # connection dies under that send: the pump returns, and m2 stays.
            await mailbox.pump(first.as_connection())
    assert trio.current_time() == 2.0
    assert first.accepted == [(0.0, b"m1")]
    assert mailbox.buffered == 2
    # m1 was accepted but never written: it comes back ahead of m2.
    mailbox.recover(first.as_connection())
    assert mailbox.buffered == 3
    second = FakeConnection()
    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.pump, second.as_connection())
            await mailbox.wait_sent()
            nursery.cancel_scope.cancel()
    assert second.accepted == [(2.0, b"m1"), (2.0, b"m2"), (2.0, b"m3")]


async def test_a_pump_on_an_ended_connection_returns_at_once_and_takes_nothing(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 8)
    conn = FakeConnection()
    conn.end()
    await send_all(mailbox, messages(2))
    await mailbox.pump(conn.as_connection())
    assert trio.current_time() == 0.0
    assert conn.accepted == []
    assert mailbox.take_all() == [b"m1", b"m2"]


async def test_recover_puts_the_unwritten_messages_back_ahead_of_newer_ones(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 8)
    conn = FakeConnection()
    await send_all(mailbox, messages(4))
    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.pump, conn.as_connection())
            await mailbox.wait_sent()
            nursery.cancel_scope.cancel()
    conn.write(1)  # m1 reached the wire; m2 to m4 were still in the connection's queue
    await send_all(mailbox, [b"n1", b"n2"])  # sent while it was dying
    conn.end()
    mailbox.recover(conn.as_connection())
    assert mailbox.buffered == 5
    assert mailbox.take_all() == [b"m2", b"m3", b"m4", b"n1", b"n2"]
    mailbox.recover(conn.as_connection())  # nothing left to give back: nothing changes
    assert mailbox.buffered == 0


async def test_recover_wakes_an_idle_pump(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(8, "wait", 8)
    old = FakeConnection()
    await mailbox.send(b"m1", nothing)
    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.pump, old.as_connection())
            await mailbox.wait_sent()
            nursery.cancel_scope.cancel()
    old.end()
    fresh = FakeConnection()
    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.pump, fresh.as_connection())  # idle: the buffer is empty
            await trio.sleep(3.0)
            mailbox.recover(old.as_connection())
            await mailbox.wait_sent()
            nursery.cancel_scope.cancel()
    assert fresh.accepted == [(3.0, b"m1")]


# -- send: a full buffer, refusal, cancellation ----------------------------------------


async def test_a_full_buffer_fails_at_once_with_fail(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(2, "fail", 8)
    await send_all(mailbox, messages(2))
    with pytest.raises(trio.WouldBlock):
        await mailbox.send(b"m3", nothing)
    assert trio.current_time() == 0.0
    assert mailbox.take_all() == [b"m1", b"m2"]


async def test_a_full_buffer_waits_for_the_pump_with_wait(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(2, "wait", 8)
    conn = FakeConnection(room=1)
    await send_all(mailbox, messages(2))
    accepted_at: list[float] = []

    async def third() -> None:
        await mailbox.send(b"m3", nothing)
        accepted_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.sleep(3.0)
        assert (accepted_at, mailbox.buffered) == ([], 2)
        nursery.start_soon(mailbox.pump, conn.as_connection())  # takes m1, then waits for room
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert accepted_at == [3.0]
    assert conn.accepted == [(3.0, b"m1")]
    assert mailbox.take_all() == [b"m2", b"m3"]


async def test_take_all_makes_room_for_a_waiting_send(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(1, "wait", 8)
    await mailbox.send(b"m1", nothing)
    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.send, b"m2", nothing)
            await trio.sleep(2.0)
            assert mailbox.take_all() == [b"m1"]
    assert trio.current_time() == 2.0
    assert mailbox.take_all() == [b"m2"]


async def test_a_refused_send_raises_the_refusal_and_accepts_nothing(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 8)
    error = ReconnectFailed("the client is closing", None, 0)
    with pytest.raises(ReconnectFailed) as raised:
        await mailbox.send(b"m1", lambda: error)
    assert raised.value is error
    assert mailbox.buffered == 0


async def test_a_refusal_comes_before_the_full_buffer(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(1, "fail", 8)
    await mailbox.send(b"m1", nothing)
    error = ReconnectFailed("the client is closing", None, 0)
    with pytest.raises(ReconnectFailed) as raised:
        await mailbox.send(b"m2", lambda: error)
    assert raised.value is error


async def test_a_send_waiting_for_room_is_refused_when_told_of_a_change(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(1, "wait", 8)
    error = ReconnectFailed("the client is closing", None, 0)
    await mailbox.send(b"m1", nothing)

    async def closing_at_two() -> None:
        await trio.sleep(2.0)
        mailbox.changed()  # as the client does when its close begins

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(closing_at_two)
            with pytest.raises(ReconnectFailed) as raised:
                await mailbox.send(b"m2", after(2.0, error))
    assert raised.value is error
    assert trio.current_time() == 2.0
    assert mailbox.take_all() == [b"m1"]


async def test_a_cancelled_send_accepts_nothing(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(1, "wait", 8)
    with trio.CancelScope() as scope:
        scope.cancel()
        await mailbox.send(b"m1", nothing)  # room, but the checkpoint comes first
    assert scope.cancelled_caught
    assert mailbox.buffered == 0
    # Cancelled while it waits for room: still nothing.
    await mailbox.send(b"m1", nothing)
    with trio.move_on_after(1.0) as waited:
        await mailbox.send(b"m2", nothing)
    assert waited.cancelled_caught
    assert trio.current_time() == 1.0
    assert mailbox.take_all() == [b"m1"]


async def test_wait_sent_returns_once_the_buffer_is_empty(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(8, "wait", 8)
    await mailbox.wait_sent()  # nothing buffered: at once
    conn = FakeConnection(room=1)
    await send_all(mailbox, messages(2))

    async def room_at_four() -> None:
        await trio.sleep(4.0)
        conn.make_room(1)

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.pump, conn.as_connection())
            nursery.start_soon(room_at_four)
            await mailbox.wait_sent()
            assert trio.current_time() == 4.0
            nursery.cancel_scope.cancel()
    assert conn.accepted == [(0.0, b"m1"), (4.0, b"m2")]


async def test_take_all_returns_everything_oldest_first_and_empties(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 8)
    await send_all(mailbox, messages(5))
    assert mailbox.take_all() == messages(5)
    assert mailbox.buffered == 0
    assert mailbox.take_all() == []
    await mailbox.wait_sent()
    assert trio.current_time() == 0.0


# -- receiving -------------------------------------------------------------------------


async def test_forward_moves_messages_in_order(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(8, "wait", 8)
    conn = FakeConnection()
    got: list[tuple[float, bytes]] = []
    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.forward, conn.as_connection())
            nursery.start_soon(deliver_at, conn, 1.5, b"r3")
            conn.deliver(b"r1", b"r2")
            for _ in range(3):
                message = await mailbox.receive(nothing)
                got.append((trio.current_time(), message))
            nursery.cancel_scope.cancel()
    assert got == [(0.0, b"r1"), (0.0, b"r2"), (1.5, b"r3")]


async def test_forward_waits_for_room_before_taking_from_an_open_connection(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 2)
    conn = FakeConnection()
    conn.deliver(*messages(4, b"r"))
    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.forward, conn.as_connection())
            await trio.sleep(1.0)
            # The inbox is full at two: the rest stay in the connection (whose
            # reader then stops reading, and the peer is held back), not in
            # the forwarder's hands.
            assert list(conn.incoming) == [b"r3", b"r4"]
            assert await mailbox.receive(nothing) == b"r1"
            await trio.sleep(1.0)
            assert list(conn.incoming) == [b"r4"]  # one taken for the one room made
            nursery.cancel_scope.cancel()
    # The cancelled forwarder dropped nothing: r4 is still in the connection.
    assert list(conn.incoming) == [b"r4"]
    assert await mailbox.receive(nothing) == b"r2"
    assert await mailbox.receive(nothing) == b"r3"


async def test_forward_takes_regardless_of_room_once_the_connection_ended(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 1)
    conn = FakeConnection()
    conn.deliver(*messages(3, b"r"))
    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.forward, conn.as_connection())
            await trio.sleep(1.0)
            assert list(conn.incoming) == [b"r2", b"r3"]  # waiting for room
            conn.end()
            mailbox.changed()  # as the client does when its state changes: look again
    # Ended: backpressure can no longer reach the peer, and a caller who is not
    # reading must not hold up a reconnect. It moved the rest, then returned.
    assert trio.current_time() == 1.0
    assert list(conn.incoming) == []
    assert [await mailbox.receive(nothing) for _ in range(3)] == [b"r1", b"r2", b"r3"]


async def test_collect_moves_what_an_ended_connection_holds_regardless_of_room(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 2)
    conn = FakeConnection()
    conn.deliver(*messages(5, b"r"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mailbox.forward, conn.as_connection())
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert list(conn.incoming) == [b"r3", b"r4", b"r5"]
    conn.end()
    mailbox.collect(conn.as_connection())
    assert list(conn.incoming) == []
    assert [await mailbox.receive(nothing) for _ in range(5)] == messages(5, b"r")
    mailbox.collect(conn.as_connection())  # nothing left: nothing moves
    error = ReconnectFailed("the client stopped", None, 0)
    with pytest.raises(ReconnectFailed):
        await mailbox.receive(lambda: error)


async def test_collect_takes_only_what_a_live_connection_has_waiting(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 8)
    conn = FakeConnection()
    conn.deliver(b"r1")
    mailbox.collect(conn.as_connection())  # r1 moves; then WouldBlock ends it
    assert list(conn.incoming) == []
    assert await mailbox.receive(nothing) == b"r1"
    assert trio.current_time() == 0.0


async def test_collect_wakes_a_waiting_receiver_only_when_it_moves_something(
    autojump_clock: MockClock,
) -> None:
    """A receiver waiting on an empty inbox gets what ``collect`` moves in at
    once (1.0). A ``collect`` that moves nothing (3.0) wakes nobody: the
    receiver, whose ``stopped()`` turned at 2.0, finds out only when told of
    a change (4.0)."""
    mailbox = Mailbox(8, "wait", 8)
    error = ReconnectFailed("the client stopped", None, 0)
    got: list[tuple[float, bytes]] = []

    async def receiver(stopped: Callable[[], HeartbeatError | None]) -> None:
        message = await mailbox.receive(stopped)
        got.append((trio.current_time(), message))

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver, nothing)
            await trio.sleep(1.0)
            ended = FakeConnection()
            ended.deliver(b"r1")
            ended.end()
            mailbox.collect(ended.as_connection())
        assert got == [(1.0, b"r1")]

        async def stopping_receiver() -> None:
            with pytest.raises(ReconnectFailed):
                await receiver(after(2.0, error))
            got.append((trio.current_time(), b"stopped"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stopping_receiver)
            await trio.sleep_until(3.0)
            empty = FakeConnection()
            empty.end()
            mailbox.collect(empty.as_connection())
            await trio.sleep(1.0)
            assert got == [(1.0, b"r1")]  # still waiting
            mailbox.changed()
    assert got == [(1.0, b"r1"), (4.0, b"stopped")]


async def test_a_cancelled_receive_loses_nothing(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(8, "wait", 8)
    conn = FakeConnection()
    conn.deliver(b"r1")
    conn.end()
    mailbox.collect(conn.as_connection())
    with trio.CancelScope() as scope:
        scope.cancel()
        await mailbox.receive(nothing)  # a message is waiting, but the checkpoint comes first
    assert scope.cancelled_caught
    assert await mailbox.receive(nothing) == b"r1"
    # Cancelled while it waits: the message that comes later is still there.
    with trio.move_on_after(1.0) as waited:
        await mailbox.receive(nothing)
    assert waited.cancelled_caught
    later = FakeConnection()
    later.deliver(b"r2")
    later.end()
    mailbox.collect(later.as_connection())
    assert await mailbox.receive(nothing) == b"r2"
    assert trio.current_time() == 1.0


async def test_a_message_another_receiver_took_is_waited_for_again(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 8)
    conn = FakeConnection()
    got: list[tuple[float, bytes]] = []

    async def receiver() -> None:
        message = await mailbox.receive(nothing)
        got.append((trio.current_time(), message))

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            nursery.start_soon(receiver)
            nursery.start_soon(mailbox.forward, conn.as_connection())
            await trio.sleep(1.0)
            conn.deliver(b"r1")  # wakes both receivers; one of them takes it
            await trio.sleep(1.0)
            assert got == [(1.0, b"r1")]
            conn.deliver(b"r2")
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    assert got == [(1.0, b"r1"), (2.0, b"r2")]


async def test_stopped_is_raised_only_once_the_inbox_is_empty(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(8, "wait", 8)
    conn = FakeConnection()
    conn.deliver(b"r1", b"r2")
    conn.end()
    mailbox.collect(conn.as_connection())
    error = ReconnectFailed("the client stopped", None, 0)
    assert await mailbox.receive(lambda: error) == b"r1"
    assert await mailbox.receive(lambda: error) == b"r2"
    with pytest.raises(ReconnectFailed) as raised:
        await mailbox.receive(lambda: error)
    assert raised.value is error


async def test_a_waiting_receive_raises_stopped_when_told_of_a_change(
    autojump_clock: MockClock,
) -> None:
    mailbox = Mailbox(8, "wait", 8)
    error = ReconnectFailed("the client stopped", None, 0)

    async def stopped_at_three() -> None:
        await trio.sleep(3.0)
        mailbox.changed()  # as the client does when it stops

    with trio.fail_after(VIRTUAL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stopped_at_three)
            with pytest.raises(ReconnectFailed) as raised:
                await mailbox.receive(after(3.0, error))
    assert raised.value is error
    assert trio.current_time() == 3.0


async def test_a_stopped_receive_is_still_a_checkpoint(autojump_clock: MockClock) -> None:
    mailbox = Mailbox(8, "wait", 8)
    with trio.CancelScope() as scope:
        scope.cancel()
        await mailbox.receive(lambda: ReconnectFailed("the client stopped", None, 0))
    assert scope.cancelled_caught  # Cancelled, not the error: the checkpoint comes first
