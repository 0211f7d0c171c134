"""``HealthMonitor`` (``_health_monitor.py``): the health board on Trio, in virtual time.

What it pins: a missed check-in changes the status at exactly its deadline,
and a check-in recovers it at exactly that moment; the timer sleeps to the
board's next deadline and wakes earlier when a registration or a recovery
needs it; the status is published to every target at once (a server's peers
see it in the next PING, one trip later, a reconnecting client's server in the
next PING or a new HELLO); listeners and waiters hear each change once;
targets are held weakly. Times are exact (``autojump_clock``).
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import trio
import trio.testing
from helpers import ENDPOINT, connection_pair, echo, reconnecting
from trio.testing import MockClock

from trio_heartbeat._config import Config
from trio_heartbeat._connection import Connection
from trio_heartbeat._events import Event, PeerHealthChanged
from trio_heartbeat._frames import HealthStatus
from trio_heartbeat._health_monitor import (
    HealthMonitor,
    open_health_monitor,
)
from trio_heartbeat.testing import open_memory_network

SERVING, DEGRADED, NOT_SERVING = (
    HealthStatus.SERVING,
    HealthStatus.DEGRADED,
    HealthStatus.NOT_SERVING,
)


class Target:
    """Anything with ``set_health``: notes each call with the virtual time."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, HealthStatus]] = []

    def set_health(self, status: HealthStatus) -> None:
        self.calls.append((trio.current_time(), status))


class Changes:
    """A health listener that notes (time, status, previous)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, HealthStatus, HealthStatus]] = []

    def __call__(self, status: HealthStatus, previous: HealthStatus) -> None:
        self.seen.append((trio.current_time(), status, previous))


async def test_a_missed_check_in_changes_the_status_at_exactly_its_deadline(
    autojump_clock: MockClock,
) -> None:
    changes = Changes()
    async with open_health_monitor() as health:
        health.add_listener(changes)
        await trio.sleep(0.25)
        worker = health.register("worker", 2.0)
        assert worker.deadline == 2.25
        assert await health.wait_status(NOT_SERVING) is NOT_SERVING
        assert trio.current_time() == 2.25
        assert worker.status is NOT_SERVING
        await trio.sleep(0.5)
        worker.check_in()  # late: recovered at once
        assert health.status is SERVING
        assert (worker.deadline, worker.misses) == (4.75, 1)
    assert changes.seen == [(2.25, NOT_SERVING, SERVING), (2.75, SERVING, NOT_SERVING)]


async def test_check_ins_in_time_keep_it_serving_and_wake_nobody(autojump_clock: MockClock) -> None:
    changes = Changes()
    async with open_health_monitor() as health:
        health.add_listener(changes)
        worker = health.register("worker", 1.0)
        for _ in range(10):
            await trio.sleep(0.9)
            worker.check_in()
        assert health.status is SERVING
        assert worker.misses == 0
    assert changes.seen == []


async def test_the_worst_wins_with_the_application_status(autojump_clock: MockClock) -> None:
    changes = Changes()
    async with open_health_monitor() as health:
        health.add_listener(changes)
        health.register("cache", 1.0, when_missed=DEGRADED)
        health.register("db", 3.0)
        await trio.sleep(5.0)
        health.set_status(DEGRADED)  # the components already make it worse
        health.unregister("db")
        health.unregister("cache")
        assert (health.status, health.application_status) == (DEGRADED, DEGRADED)
        health.set_status(SERVING)
    assert changes.seen == [
        (1.0, DEGRADED, SERVING),
        (3.0, NOT_SERVING, DEGRADED),
        (5.0, DEGRADED, NOT_SERVING),  # db unregistered: the cache and the application
        (5.0, SERVING, DEGRADED),
    ]


async def test_a_shorter_period_registered_later_wakes_the_timer_earlier(
    autojump_clock: MockClock,
) -> None:
    async with open_health_monitor() as health:
        health.register("slow", 10.0)
        await trio.sleep(1.0)  # the timer sleeps until 10.0
        health.register("fast", 0.5)
        await health.wait_status(NOT_SERVING)
        assert trio.current_time() == 1.5


async def test_a_recovery_whose_new_deadline_comes_first_wakes_the_timer_for_it(
    autojump_clock: MockClock,
) -> None:
    """After A misses at 1.0 the timer sleeps to B's 5.0; A's recovery at 2.0 gives it a
    deadline of 3.0, which must not wait until 5.0 to be noticed."""
    changes = Changes()
    async with open_health_monitor() as health:
        health.add_listener(changes)
        a = health.register("a", 1.0)
        health.register("b", 5.0, when_missed=DEGRADED)
        await trio.sleep(2.0)
        a.check_in()
        await trio.sleep(1.5)
    assert [(at, status) for at, status, _ in changes.seen] == [
        (1.0, NOT_SERVING),
        (2.0, SERVING),
        (3.0, NOT_SERVING),
    ]


async def test_targets_hear_the_status_at_once_and_at_every_change(
    autojump_clock: MockClock,
) -> None:
    first, second = Target(), Target()
    async with open_health_monitor(first) as health:
        assert first.calls == [(0.0, SERVING)]
        health.register("job", 1.0, when_missed=DEGRADED)
        await trio.sleep(0.5)
        health.publish_to(second)
        await trio.sleep(1.0)
        health.stop_publishing(first)
        health.stop_publishing(first)  # a no-op the second time
        health.unregister("job")
    assert first.calls == [(0.0, SERVING), (1.0, DEGRADED)]
    assert second.calls == [(0.5, SERVING), (1.0, DEGRADED), (1.5, SERVING)]


async def test_targets_are_held_weakly(autojump_clock: MockClock) -> None:
    gc.disable()
    try:
        async with open_health_monitor() as health:
            target = Target()
            health.publish_to(target)
            alive = weakref.ref(target)
            del target
            assert alive() is None
            health.set_status(DEGRADED)  # nothing to publish to, nothing raised
            assert "0 targets" in repr(health)
    finally:
        gc.enable()


@pytest.mark.parametrize(("registered_at", "seen_at"), [(2.7, 3.05), (2.0, 2.775)])
async def test_a_servers_peers_see_a_missed_check_in_one_trip_after_its_deadline(
    autojump_clock: MockClock, registered_at: float, seen_at: float
) -> None:
    """With 0.05 s each way, the server last PINGs at 2.1, and its next announcement may
    go from 2.725 (5/8 of its interval later). A worker missed at 3.0 goes out at once
    and the client reads it at 3.05, one trip later; one missed at 2.3 goes at 2.725."""
    seen: list[tuple[float, HealthStatus]] = []

    def note(_conn: Connection, event: Event) -> None:
        if isinstance(event, PeerHealthChanged):
            seen.append((trio.current_time(), event.status))

    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        host.faults.set_delay(0.05)
        server = host.server
        assert server is not None
        async with (
            open_health_monitor(server) as health,
            reconnecting(network, connection_listeners=[note]) as client,
        ):
            conn = await client.wait_connected()
            await trio.sleep_until(registered_at)
            health.register("worker", 0.3)
            assert await conn.wait_peer_health(NOT_SERVING) is NOT_SERVING
            assert trio.current_time() == pytest.approx(seen_at)
            assert server.registry.snapshot()[0].health is SERVING  # the client's own
    ((at, status),) = seen
    assert status is NOT_SERVING
    assert at == pytest.approx(seen_at)


async def test_a_reconnecting_client_reports_the_status_on_every_connection(
    autojump_clock: MockClock,
) -> None:
    server_side: list[tuple[float, HealthStatus | None]] = []

    async def watch(conn: Connection) -> None:
        server_side.append((trio.current_time(), conn.peer_health))
        status = await conn.wait_peer_health(DEGRADED)
        server_side.append((trio.current_time(), status))
        await echo(conn)

    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, watch)
        async with reconnecting(network) as client, open_health_monitor(client) as health:
            await client.wait_connected()
            health.set_status(DEGRADED)
            assert client.config.status is DEGRADED
            await trio.sleep(1.0)
            host.kill()  # the next connection says DEGRADED in its HELLO
            await trio.sleep(0.1)
            await client.wait_connected()
            await trio.sleep(1.0)
    assert server_side[:2] == [(0.0, SERVING), (0.0, DEGRADED)]
    assert server_side[2][1] is DEGRADED
    assert server_side[3] == (server_side[2][0], DEGRADED)


async def test_set_health_during_a_handshake_reaches_the_new_connection(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo).faults.set_delay(0.5)
        async with reconnecting(network) as client:
            await trio.sleep(0.1)  # our HELLO is out with SERVING, the server's is not in
            client.set_health(NOT_SERVING)
            conn = await client.wait_connected()
            assert conn.health is NOT_SERVING


async def test_a_failing_listener_is_logged_and_the_others_still_hear(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    changes = Changes()

    def broken(status: HealthStatus, previous: HealthStatus) -> None:
        raise RuntimeError("listener bug")

    async with open_health_monitor() as health:
        health.add_listener(broken)
        health.add_listener(changes)
        with caplog.at_level(logging.INFO, logger="trio_heartbeat"):
            health.register("worker", 1.0)
            await trio.sleep(1.5)
        health.remove_listener(broken)
        with pytest.raises(ValueError, match="not in list"):
            health.remove_listener(broken)
    assert changes.seen == [(1.0, NOT_SERVING, SERVING)]
    messages = [record.getMessage() for record in caplog.records]
    assert "health SERVING -> NOT_SERVING (missed: worker)" in messages
    assert f"health listener {broken!r} failed on NOT_SERVING" in messages


async def test_a_component_used_as_a_context_manager_unregisters_on_the_way_out(
    autojump_clock: MockClock,
) -> None:
    async with open_health_monitor() as health:
        with health.register("job", 1.0, when_missed=DEGRADED) as job:
            assert "job" in health
            assert len(health) == 1
            await trio.sleep(1.25)
            assert health.status is DEGRADED
            assert [c.status for c in health.components()] == [DEGRADED]
        assert not job.registered
        assert "job" not in health
        assert health.status is SERVING
        job.check_in()  # ignored once unregistered
        job.unregister()  # idempotent
        assert health.status is SERVING
        assert len(health) == 0
        assert (job.name, job.period, job.when_missed) == ("job", 1.0, DEGRADED)
        assert repr(job).startswith("<HealthComponent 'job'")


async def test_without_its_timer_a_miss_is_noticed_at_the_next_poll(
    autojump_clock: MockClock,
) -> None:
    """No timer: the miss at 1.0 is announced only when somebody looks, at 3.0; another
    component's check-in in time (at 2.0) only moves its own deadline."""
    changes = Changes()
    health = HealthMonitor()
    health.add_listener(changes)
    a = health.register("a", 1.0)
    b = health.register("b", 5.0)
    await trio.sleep(2.0)
    assert changes.seen == []  # nobody polled
    b.check_in()
    assert changes.seen == []
    await trio.sleep(1.0)
    assert health.status is NOT_SERVING
    assert changes.seen == [(3.0, NOT_SERVING, SERVING)]
    a.check_in()
    assert changes.seen[-1] == (3.0, SERVING, NOT_SERVING)


async def test_the_timer_runs_once_per_monitor(autojump_clock: MockClock) -> None:
    health = HealthMonitor()
    async with trio.open_nursery() as nursery:
        await nursery.start(health.run)
        with pytest.raises(RuntimeError, match=r"^this HealthMonitor's timer is already running$"):
            await health.run()
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:  # and again, once the first has stopped
        await nursery.start(health.run)
        nursery.cancel_scope.cancel()


async def test_wait_status_returns_at_once_and_needs_a_status(autojump_clock: MockClock) -> None:
    health = HealthMonitor(DEGRADED)
    assert await health.wait_status(SERVING, DEGRADED) is DEGRADED
    with pytest.raises(ValueError, match=r"^wait_status needs at least one status$"):
        await health.wait_status()
    with pytest.raises(ValueError, match="positive, finite"):
        health.register("x", 0.0)
    small = HealthMonitor(max_components=1)
    small.register("one", 1.0)
    with pytest.raises(ValueError, match="already holds 1"):
        small.register("two", 1.0)
    assert repr(small) == "<HealthMonitor SERVING, 1 components, 0 targets>"


async def test_a_connection_can_be_a_target(autojump_clock: MockClock) -> None:
    async with (
        connection_pair(client_config=Config(interval=1.0, timeout=3.0)) as pair,
        open_health_monitor(pair.client) as health,
    ):
        health.set_status(DEGRADED)
        assert pair.client.health is DEGRADED
        assert await pair.server.wait_peer_health(DEGRADED) is DEGRADED


async def test_each_change_is_logged_once_naming_the_components_not_serving(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """One INFO line per change: the components not serving, comma-separated in registration
    order, and no bracket at all once none is."""
    with caplog.at_level(logging.INFO, logger="trio_heartbeat"):
        async with open_health_monitor() as health:
            a = health.register("a", 1.0)
            b = health.register("b", 1.0, when_missed=DEGRADED)
            await trio.sleep(1.5)
            a.check_in()
            b.check_in()
    assert [r.getMessage() for r in caplog.records if r.name == "trio_heartbeat"] == [
        "health SERVING -> NOT_SERVING (missed: a, b)",
        "health NOT_SERVING -> DEGRADED (missed: b)",
        "health DEGRADED -> SERVING",
    ]


async def test_a_listener_may_call_back_into_the_monitor_from_the_timer(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener that answers the timer's NOT_SERVING at 1.0 with ``set_status(DEGRADED)``:
    the call is taken (nothing logged as failed); a's check-in at 2.0 leaves the
    application's DEGRADED, and the timer still wakes at a's next deadline, 3.0."""
    changes = Changes()
    async with open_health_monitor() as health:

        def degrade(status: HealthStatus, previous: HealthStatus) -> None:
            if status is NOT_SERVING:
                health.set_status(DEGRADED)

        health.add_listener(degrade)
        health.add_listener(changes)
        a = health.register("a", 1.0)
        with caplog.at_level(logging.INFO, logger="trio_heartbeat"):
            await trio.sleep(2.0)
            assert health.application_status is DEGRADED
            a.check_in()
            await trio.sleep(2.0)
    assert changes.seen == [
        (1.0, NOT_SERVING, SERVING),
        (2.0, DEGRADED, NOT_SERVING),
        (3.0, NOT_SERVING, DEGRADED),
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_components_repr_renames_its_own_prefix_only(autojump_clock: MockClock) -> None:
    """The component's repr with its class name changed once: a name that itself holds
    ``<Component`` is shown as it is."""
    health = HealthMonitor()
    odd = health.register("<Component", 1.0)
    assert repr(odd) == (
        "<HealthComponent '<Component' every 1.0 s, deadline 1.0, NOT_SERVING when missed>"
    )


async def test_a_change_made_by_a_listener_supersedes_the_one_being_announced(
    autojump_clock: MockClock,
) -> None:
    """The first listener answers NOT_SERVING at 1.0 with a check-in: SERVING again at
    once. Everyone hears NOT_SERVING then SERVING, in that order, and the later listener
    never hears the stale NOT_SERVING after the SERVING (it hears only SERVING)."""
    first, later = Changes(), Changes()
    async with open_health_monitor() as health:
        a = health.register("a", 1.0)

        def recover(status: HealthStatus, previous: HealthStatus) -> None:
            first(status, previous)
            if status is NOT_SERVING:
                a.check_in()

        health.add_listener(recover)
        health.add_listener(later)
        await trio.sleep(1.5)
        assert health.status is SERVING
    assert first.seen == [(1.0, NOT_SERVING, SERVING), (1.0, SERVING, NOT_SERVING)]
    assert later.seen == [(1.0, SERVING, NOT_SERVING)]


async def test_reading_the_status_at_a_deadline_takes_it_into_account(
    autojump_clock: MockClock,
) -> None:
    """Whichever task runs first at 1.0, the timer or the reader: the reader sees the miss
    (and the listeners hear it once)."""
    changes = Changes()
    health = HealthMonitor()  # no timer at all: only reading polls
    health.add_listener(changes)
    health.register("a", 1.0)
    await trio.sleep(1.0)
    assert health.status is NOT_SERVING
    assert health.status is NOT_SERVING
    assert changes.seen == [(1.0, NOT_SERVING, SERVING)]


async def test_a_status_that_flaps_every_few_milliseconds_costs_no_connection(
    autojump_clock: MockClock,
) -> None:
    """The server's status flips every 3 ms for 20 s over a link with up to 0.1 s of
    jitter: its announcing PINGs go 5/8 of an interval apart, so the jitter never makes
    three strikes in a row, and the client keeps its one connection (PINGs at the rate
    rule's very limit, half an interval apart, used to cost it a 1008)."""
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, echo)
        host.faults.set_delay(0.05, jitter=0.1)
        server = host.server
        assert server is not None
        async with (
            open_health_monitor(server) as health,
            reconnecting(network, config=Config(max_ping_strikes=3)) as client,
        ):
            conn = await client.wait_connected()
            flips = 0
            while trio.current_time() < 20.0:
                health.set_status(DEGRADED if health.status is SERVING else SERVING)
                flips += 1
                await trio.sleep(0.003)
            assert flips > 6000
            assert client.connection is conn
            assert client.connections == 1
            assert conn.statistics().frames_in > 30


async def test_an_error_in_the_block_comes_out_as_itself(autojump_clock: MockClock) -> None:
    """Not wrapped in an ExceptionGroup by the monitor's nursery."""
    with pytest.raises(KeyError) as info:
        async with open_health_monitor():
            raise KeyError("from the block")
    assert type(info.value) is KeyError


async def test_a_target_that_raises_is_logged_and_everyone_else_is_still_told(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A target's set_health fails at the change at 1.0: the timer goes on, the other
    target and the listeners hear it, and a check-in at 2.0 reaches everyone again."""

    class Broken:
        def set_health(self, status: HealthStatus) -> None:
            if status is not SERVING:
                raise RuntimeError("target bug")

    broken, fine, changes = Broken(), Target(), Changes()
    async with open_health_monitor(broken, fine) as health:
        health.add_listener(changes)
        a = health.register("a", 1.0)
        await trio.sleep(2.0)
        a.check_in()
        assert await health.wait_status(SERVING) is SERVING
    assert fine.calls == [(0.0, SERVING), (1.0, NOT_SERVING), (2.0, SERVING)]
    assert changes.seen == [(1.0, NOT_SERVING, SERVING), (2.0, SERVING, NOT_SERVING)]
    failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert failed == [f"health target {broken!r} failed on NOT_SERVING"]


@pytest.mark.parametrize(("missed", "more"), [(10, ""), (12, " and 2 more")])
async def test_a_log_line_names_ten_missed_components_at_most(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture, missed: int, more: str
) -> None:
    health = HealthMonitor()
    for number in range(missed):
        health.register(f"c{number}", 1.0)
    await trio.sleep(1.0)
    with caplog.at_level(logging.INFO, logger="trio_heartbeat"):
        assert health.status is NOT_SERVING
    names = ", ".join(f"c{number}" for number in range(10))
    assert [r.getMessage() for r in caplog.records] == [
        f"health SERVING -> NOT_SERVING (missed: {names}{more})"
    ]


async def test_below_info_a_change_walks_no_component(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Naming the missed components costs a walk of the board: only for the log line."""
    health = HealthMonitor()
    health.register("a", 1.0)
    await trio.sleep(1.0)

    def walked(self: object, now: float) -> None:
        raise AssertionError("the board was walked")

    monkeypatch.setattr("trio_heartbeat._health.HealthBoard.components", walked)
    logging.getLogger("trio_heartbeat").setLevel(logging.WARNING)
    try:
        assert health.status is NOT_SERVING
    finally:
        logging.getLogger("trio_heartbeat").setLevel(logging.NOTSET)


async def test_a_group_raised_by_the_block_comes_out_as_it_was_raised(
    autojump_clock: MockClock,
) -> None:
    """The block's own ExceptionGroup, of one or two leaves, is neither unwrapped nor
    wrapped again."""
    for leaves in ([KeyError("a")], [KeyError("a"), ValueError("b")]):
        group = ExceptionGroup("from the block", leaves)
        with pytest.raises(ExceptionGroup) as info:
            async with open_health_monitor():
                raise group
        assert info.value is group


async def test_a_listener_that_changes_the_status_away_and_back_supersedes_the_change(
    autojump_clock: MockClock,
) -> None:
    """At 1.0 the first listener answers NOT_SERVING by going DEGRADED and then
    NOT_SERVING again: the status ends where it was, yet the later listener must hear
    the two newer changes last, never the stale first one after them."""
    later = Changes()
    async with open_health_monitor() as health:
        a = health.register("a", 1.0)

        def bounce(status: HealthStatus, previous: HealthStatus) -> None:
            if previous is SERVING:
                health.set_status(DEGRADED)
                a.check_in()  # DEGRADED now
                health.set_status(NOT_SERVING)  # and NOT_SERVING again

        health.add_listener(bounce)
        health.add_listener(later)
        await trio.sleep(1.5)
    assert later.seen == [(1.0, DEGRADED, NOT_SERVING), (1.0, NOT_SERVING, DEGRADED)]
