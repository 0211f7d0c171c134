"""The service supervisor (``_services.py``): children run, watched and restarted, in virtual time.

What it pins: each strategy stops the right siblings one at a time, the last
started first, and starts everyone again in start order; each restart type;
the budget's N+1th restart raises one SupervisorGaveUp (never a group) with
the child's exception as its cause, at exactly the expected time and once
every child is stopped; a hung child is cancelled at exactly its check-in
deadline, restarted once it has ended, or abandoned after its shutdown
timeout; backoff delays are exact and start over after a healthy run; the
health board turns NOT_SERVING while a child is hung; leaving the block stops
everything in reverse order, an outside cancellation ends everything, and no
task is left; the events, the log and the counters; the exact words of every
refusal and give-up, and the task names (the last section holds what mutation
testing showed unpinned). Times are exact (``autojump_clock``).
"""

from __future__ import annotations

import gc
import logging
import math
import pickle
import weakref
from collections.abc import Awaitable, Callable, Iterable

import pytest
import trio
from helpers import SpinGuard, task_names
from trio.testing import MockClock

from trio_heartbeat._backoff import ConstantBackoff, ExponentialBackoff
from trio_heartbeat._errors import SupervisorGaveUp
from trio_heartbeat._frames import HealthStatus
from trio_heartbeat._health_monitor import open_health_monitor
from trio_heartbeat._restart import ChildState, ExitKind, RestartBudget, RestartType, Strategy
from trio_heartbeat._service_events import (
    ChildAbandoned,
    ChildExited,
    ChildRestarting,
    ChildStarted,
    ChildStopped,
    ServiceEvent,
    SupervisorStopped,
)
from trio_heartbeat._services import CheckIn, ChildSpec, ServiceSupervisor, open_service_supervisor

NO_WAIT = ConstantBackoff(0.0)
ROOMY = RestartBudget(max_restarts=100, period=1000.0)


class Boom(Exception):
    """What a failing child raises."""


class Record:
    """What the children did and what the supervisor reported, each with its virtual time."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str, str]] = []
        self.events: list[tuple[float, ServiceEvent]] = []

    def note(self, name: str, what: str) -> None:
        self.log.append((trio.current_time(), name, what))

    def __call__(self, event: ServiceEvent) -> None:
        self.events.append((trio.current_time(), event))

    def of(self, name: str) -> list[tuple[float, str]]:
        return [(t, what) for t, who, what in self.log if who == name]

    def starts(self) -> list[tuple[float, str]]:
        return [(t, e.name) for t, e in self.events if isinstance(e, ChildStarted)]

    def stops(self) -> list[tuple[float, str]]:
        return [(t, e.name) for t, e in self.events if isinstance(e, ChildStopped)]


def scripted(
    rec: Record, name: str, *runs: tuple[float, str], cleanup: float = 0.0
) -> Callable[[], Awaitable[None]]:
    """A child that, run after run, lives ``duration`` and then "fail"s or "return"s
    (for ever once the script is spent); cancelled, it spends ``cleanup`` seconds shielded."""
    script = iter(runs)

    async def child() -> None:
        duration, ending = next(script, (math.inf, "return"))
        rec.note(name, "start")
        try:
            await trio.sleep(duration)
        except trio.Cancelled:
            rec.note(name, "cancelled")
            with trio.CancelScope(shield=True):
                await trio.sleep(cleanup)
            rec.note(name, "ended")
            raise
        rec.note(name, ending)
        if ending == "fail":
            raise Boom(name)

    return child


def spec(rec: Record, name: str, *runs: tuple[float, str], **kwargs: object) -> ChildSpec:
    cleanup = kwargs.pop("cleanup", 0.0)
    assert isinstance(cleanup, float)
    return ChildSpec(name, scripted(rec, name, *runs, cleanup=cleanup), **kwargs)  # type: ignore[arg-type]


def same_give_up(raised: SupervisorGaveUp, error: SupervisorGaveUp | None) -> bool:
    """``error`` is the raised give-up's twin: equal in every field, without its traceback."""
    assert error is not None
    assert error.__traceback__ is None
    fields = (str(error), error.child, error.kind, error.error, error.__cause__)
    return fields == (str(raised), raised.child, raised.kind, raised.error, raised.__cause__)


def no_service_tasks() -> bool:
    return not any("service" in name for name in task_names())


# -- strategies ------------------------------------------------------------------------


async def test_one_for_one_restarts_only_the_crashed_child_after_its_backoff(
    autojump_clock: MockClock,
) -> None:
    """b fails at 1 and starts again at 1.5 (backoff 0.5); a and c run on untouched."""
    rec = Record()
    children = [spec(rec, "a"), spec(rec, "b", (1.0, "fail")), spec(rec, "c")]
    async with open_service_supervisor(
        children, backoff=ConstantBackoff(0.5), listeners=[rec]
    ) as sup:
        await trio.sleep(2.0)
        assert rec.starts() == [(0.0, "a"), (0.0, "b"), (0.0, "c"), (1.5, "b")]
        assert rec.of("a") == [(0.0, "start")]
        assert rec.of("c") == [(0.0, "start")]
        assert rec.of("b") == [(0.0, "start"), (1.0, "fail"), (1.5, "start")]
        stats = sup.statistics()
        assert (stats.starts, stats.failed_exits, stats.restarts) == (4, 1, 1)
        assert stats.running == ("a", "b", "c")
    assert no_service_tasks()


async def test_one_for_all_stops_the_others_one_at_a_time_in_reverse_then_starts_all(
    autojump_clock: MockClock,
) -> None:
    """b fails at 1: c is cancelled, ends 0.25 s later, then a is, and only when a has
    ended (1.5) are a, b, c started again, in start order."""
    rec = Record()
    children = [
        spec(rec, "a", cleanup=0.25),
        spec(rec, "b", (1.0, "fail")),
        spec(rec, "c", cleanup=0.25),
    ]
    async with open_service_supervisor(
        children, strategy=Strategy.ONE_FOR_ALL, backoff=ConstantBackoff(0.125), listeners=[rec]
    ):
        await trio.sleep(2.0)
        assert rec.of("c")[:3] == [(0.0, "start"), (1.0, "cancelled"), (1.25, "ended")]
        assert rec.of("a")[:3] == [(0.0, "start"), (1.25, "cancelled"), (1.5, "ended")]
        assert rec.stops() == [(1.25, "c"), (1.5, "a")]
        assert rec.starts()[3:] == [(1.5, "a"), (1.5, "b"), (1.5, "c")]


async def test_rest_for_one_restarts_the_child_and_those_started_after_it(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """b fails at 1: c is stopped and b, c start again; a is left alone. The log names
    both restarted children in one line."""
    caplog.set_level(logging.INFO, logger="trio_heartbeat")
    rec = Record()
    children = [spec(rec, "a"), spec(rec, "b", (1.0, "fail")), spec(rec, "c")]
    async with open_service_supervisor(
        children, strategy=Strategy.REST_FOR_ONE, backoff=NO_WAIT, listeners=[rec]
    ):
        await trio.sleep(2.0)
        assert rec.stops() == [(1.0, "c")]
        assert rec.starts()[3:] == [(1.0, "b"), (1.0, "c")]
        assert rec.of("a") == [(0.0, "start")]
    restarting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restarting")]
    assert restarting == ["restarting 'b', 'c' in 0 s"]


# -- restart types ---------------------------------------------------------------------


async def test_transient_is_restarted_after_a_failure_not_after_a_normal_return(
    autojump_clock: MockClock,
) -> None:
    """A transient child that fails is restarted; one that returns leaves for good."""
    rec = Record()
    child = spec(rec, "t", (1.0, "fail"), (1.0, "return"), restart=RestartType.TRANSIENT)
    async with open_service_supervisor([child], backoff=NO_WAIT, listeners=[rec]) as sup:
        await trio.sleep(3.0)
        assert rec.of("t") == [(0.0, "start"), (1.0, "fail"), (1.0, "start"), (2.0, "return")]
        assert sup.state("t") is None
        assert sup.statistics().normal_exits == 1


async def test_temporary_is_never_restarted_not_even_with_its_siblings(
    autojump_clock: MockClock,
) -> None:
    """A temporary child that fails is gone; one stopped by a ONE_FOR_ALL restart is too."""
    rec = Record()
    children = [
        spec(rec, "gone", (0.5, "fail"), restart=RestartType.TEMPORARY),
        spec(rec, "quiet", restart=RestartType.TEMPORARY),
        spec(rec, "p", (1.0, "fail")),
    ]
    async with open_service_supervisor(
        children, strategy=Strategy.ONE_FOR_ALL, backoff=NO_WAIT, listeners=[rec]
    ) as sup:
        await trio.sleep(2.0)
        assert rec.of("gone") == [(0.0, "start"), (0.5, "fail")]
        assert rec.of("quiet") == [(0.0, "start"), (1.0, "cancelled"), (1.0, "ended")]
        assert rec.starts()[3:] == [(1.0, "p")]
        assert (sup.state("gone"), sup.state("quiet"), sup.state("p")) == (
            None,
            None,
            ChildState.RUNNING,
        )
        with pytest.raises(KeyError):
            sup.state("nobody")


# -- the budget ------------------------------------------------------------------------


async def test_the_restart_past_the_budget_stops_everyone_and_raises_one_error(
    autojump_clock: MockClock,
) -> None:
    """Budget 2 in 10 s, 1 s backoff, a child failing at once: restarts at 1 and 2, and
    its third failure at 2 gives up: the sibling (shielding 0.25 s) is stopped first, and
    one SupervisorGaveUp leaves the block at 2.25, caused by the child's own exception."""
    rec = Record()
    children = [spec(rec, "steady", cleanup=0.25), spec(rec, "bad", *[(0.0, "fail")] * 5)]
    with pytest.raises(SupervisorGaveUp) as caught:
        async with open_service_supervisor(
            children,
            budget=RestartBudget(max_restarts=2, period=10.0),
            backoff=ConstantBackoff(1.0),
            listeners=[rec],
        ):
            await trio.sleep_forever()
    assert trio.current_time() == 2.25
    error = caught.value
    assert type(error) is SupervisorGaveUp
    assert (error.child, error.kind) == ("bad", ExitKind.FAILED)
    assert str(error) == (
        "child 'bad' failed; 2 restart(s) within 10.0 s already, as many as the budget"
        " allows: giving up"
    )
    assert isinstance(error.error, Boom)
    assert error.__cause__ is error.error
    assert rec.starts() == [(0.0, "steady"), (0.0, "bad"), (1.0, "bad"), (2.0, "bad")]
    assert rec.of("steady") == [(0.0, "start"), (2.0, "cancelled"), (2.25, "ended")]
    assert rec.events[-1] == (2.25, SupervisorStopped(error))
    assert no_service_tasks()


async def test_a_childs_exception_is_never_an_exception_group(autojump_clock: MockClock) -> None:
    """With a budget of 0 the first failure gives up: the error is SupervisorGaveUp itself,
    not a group, and it pickles with its fields."""
    rec = Record()
    with pytest.raises(SupervisorGaveUp) as caught:
        async with open_service_supervisor(
            [spec(rec, "x", (0.5, "fail"))], budget=RestartBudget(max_restarts=0)
        ):
            await trio.sleep_forever()
    assert type(caught.value) is SupervisorGaveUp  # not a group
    assert trio.current_time() == 0.5
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (type(copy), str(copy), copy.child, copy.kind) == (
        SupervisorGaveUp,
        str(caught.value),
        "x",
        ExitKind.FAILED,
    )
    assert isinstance(copy.error, Boom)


# -- hangs -----------------------------------------------------------------------------


def checking_in(
    rec: Record, name: str, *, checks: int, cleanup: float = 0.0, release: trio.Event | None = None
) -> Callable[[CheckIn], Awaitable[None]]:
    """Checks in every second ``checks`` times, then hangs; cancelled, it cleans up for
    ``cleanup`` seconds, or until ``release`` is set, shielded. Later runs never hang."""
    runs = 0

    async def child(check_in: CheckIn) -> None:
        nonlocal runs
        runs += 1
        rec.note(name, "start")
        try:
            for _ in range(checks if runs == 1 else 10_000):
                await trio.sleep(1.0)
                check_in.check_in()
            await trio.sleep_forever()
        except trio.Cancelled:
            rec.note(name, "cancelled")
            with trio.CancelScope(shield=True):
                await trio.sleep(cleanup)
                if release is not None:
                    await release.wait()
            rec.note(name, "ended")
            raise

    return child


@pytest.mark.parametrize(("cleanup", "restart_at"), [(0.0, 3.0), (1.0, 4.0)])
async def test_a_hung_child_is_cancelled_at_its_deadline_and_restarted_once_ended(
    autojump_clock: MockClock, cleanup: float, restart_at: float
) -> None:
    """Check-ins at 1 with a 2 s period: cancelled at exactly 3; reported HUNG and
    restarted when it has ended (its shielded cleanup delays the restart as long)."""
    rec = Record()
    child = ChildSpec("w", checking_in(rec, "w", checks=1, cleanup=cleanup), check_in_period=2.0)
    async with open_service_supervisor([child], backoff=NO_WAIT, listeners=[rec]) as sup:
        await trio.sleep(10.0)
        assert rec.of("w")[:4] == [
            (0.0, "start"),
            (3.0, "cancelled"),
            (restart_at, "ended"),
            (restart_at, "start"),
        ]
        exited = [(t, e) for t, e in rec.events if isinstance(e, ChildExited)]
        assert exited == [(restart_at, ChildExited("w", ExitKind.HUNG, None))]
        assert sup.statistics().hung_exits == 1


async def test_a_hung_child_that_never_ends_is_abandoned_after_its_shutdown_timeout(
    autojump_clock: MockClock,
) -> None:
    """Hung at 2, shutdown_timeout 1.5: abandoned at 3.5 and restarted beside it; the
    block's end still waits for the abandoned task, which is not leaked."""
    rec = Record()
    release = trio.Event()
    child = ChildSpec(
        "w",
        checking_in(rec, "w", checks=0, release=release),
        check_in_period=2.0,
        shutdown_timeout=1.5,
    )
    async with open_service_supervisor([child], backoff=NO_WAIT, listeners=[rec]) as sup:
        await trio.sleep(5.0)
        assert rec.of("w") == [(0.0, "start"), (2.0, "cancelled"), (3.5, "start")]
        assert (3.5, ChildAbandoned("w", 1.5)) in rec.events
        assert sup.statistics().abandoned == 1
        release.set()
        await trio.sleep(1.0)
        assert rec.of("w")[-1] == (5.0, "ended")
    assert no_service_tasks()


async def test_a_child_abandoned_again_while_its_last_abandoned_run_lingers_gives_up(
    autojump_clock: MockClock,
) -> None:
    """A child that shields for ever, period 2, shutdown_timeout 1: abandoned at 3 and
    restarted; hung again at 5 and abandoned at 6 while the first copy still runs, so the
    supervisor gives up at 6 (error set, SupervisorStopped(error) heard) instead of piling
    up one unkillable task per restart; the exception comes once the copies end."""
    rec = Record()
    release = trio.Event()

    async def stubborn(check_in: CheckIn) -> None:
        rec.note("w", "start")
        with trio.CancelScope(shield=True):
            await release.wait()

    child = ChildSpec("w", stubborn, check_in_period=2.0, shutdown_timeout=1.0)

    def on_event(event: ServiceEvent) -> None:
        if isinstance(event, SupervisorStopped):
            release.set()  # the watcher, say systemd's watchdog, ends the process

    async def run() -> None:
        async with open_service_supervisor(
            [child], backoff=NO_WAIT, listeners=[rec, on_event]
        ) as sup:
            supervisors.append(sup)
            await trio.sleep(5.5)
            assert sup.error is None
            await trio.sleep_forever()

    supervisors: list[ServiceSupervisor] = []
    with pytest.raises(SupervisorGaveUp) as caught:
        await run()
    assert same_give_up(caught.value, supervisors[0].error)
    assert caught.value.child == "w"
    assert caught.value.kind is ExitKind.HUNG
    assert "abandoned again" in str(caught.value)
    stopped = [(t, e) for t, e in rec.events if isinstance(e, SupervisorStopped)]
    assert stopped == [(6.0, SupervisorStopped(caught.value))]
    assert [t for t, _ in rec.starts()] == [0.0, 3.0]
    assert supervisors[0].statistics().abandoned == 2


async def test_the_give_up_is_known_before_a_child_that_shields_for_ever_ends(
    autojump_clock: MockClock,
) -> None:
    """A sibling that never ends keeps the block from ending (Trio cannot kill it), but
    ``error`` and SupervisorStopped(error) say at once that the supervisor gave up."""
    rec = Record()
    release = trio.Event()

    async def shielding() -> None:
        with trio.CancelScope(shield=True):
            await release.wait()

    stubborn = ChildSpec("s", shielding, shutdown_timeout=1.0)
    crashing = spec(rec, "c", *[(0.0, "fail")] * 2)
    seen: list[float] = []

    def on_event(event: ServiceEvent) -> None:
        if isinstance(event, SupervisorStopped) and event.error is not None:
            seen.append(trio.current_time())
            release.set()  # the watcher, say systemd's watchdog, ends the process

    supervisors: list[ServiceSupervisor] = []

    async def run() -> None:
        async with open_service_supervisor(
            [stubborn, crashing],
            budget=RestartBudget(max_restarts=1, period=5.0),
            backoff=NO_WAIT,
            listeners=[on_event],
        ) as sup:
            supervisors.append(sup)
            await trio.sleep_forever()

    with pytest.raises(SupervisorGaveUp) as caught:
        await run()
    assert seen == [1.0]  # "s" cancelled at 0 and abandoned at 1: only then the verdict
    assert same_give_up(caught.value, supervisors[0].error)
    assert caught.value.child == "c"


async def test_a_check_in_exactly_at_the_deadline_counts(autojump_clock: MockClock) -> None:
    """``sleep(period); check_in()`` wakes in the same instant as the deadline: the
    check-in counts every time, whatever order Trio runs the two tasks in (once it was a
    coin toss per period, and 100 periods never all came up right)."""

    async def punctual(check_in: CheckIn) -> None:
        while True:
            await trio.sleep(1.0)
            check_in.check_in()

    child = ChildSpec("p", punctual, check_in_period=1.0)
    async with open_service_supervisor([child], backoff=NO_WAIT) as sup:
        await trio.sleep(100.5)
        stats = sup.statistics()
    assert (stats.starts, stats.hung_exits) == (1, 0)


async def test_a_failed_run_is_freed_without_a_garbage_collection(
    autojump_clock: MockClock,
) -> None:
    """With gc disabled, what a failed run held (a local of the child, its CheckIn) is
    gone once the run is reported: no cycle through its exception's traceback."""

    class Held:
        pass

    refs: list[weakref.ref[object]] = []

    async def failing(check_in: CheckIn) -> None:
        held = Held()
        refs.append(weakref.ref(held))
        await trio.sleep(1.0)
        error = Boom(check_in.name)
        refs.append(weakref.ref(error))  # its traceback holds the supervisor's frame
        raise error

    child = ChildSpec("f", failing, check_in_period=5.0)
    quiet = logging.getLogger("trio_heartbeat")
    gc.collect()
    gc.disable()
    quiet.disabled = True  # a captured log record would hold the errors
    try:
        async with open_service_supervisor([child], budget=ROOMY, backoff=NO_WAIT):
            await trio.sleep(10.5)
            assert len(refs) == 21
            assert [ref() is None for ref in refs] == [True] * 20 + [False]
    finally:
        quiet.disabled = False
        gc.enable()


async def test_a_stale_check_in_handle_changes_nothing(autojump_clock: MockClock) -> None:
    """The handle of a run that ended keeps its last deadline when checked in."""
    handles: list[CheckIn] = []

    async def short(check_in: CheckIn) -> None:
        handles.append(check_in)
        await trio.sleep(0.5)

    child = ChildSpec("s", short, check_in_period=2.0)
    async with open_service_supervisor([child], backoff=ConstantBackoff(1.0)):
        await trio.sleep(1.0)  # ran 0 to 0.5, restarts at 1.5
        handles[0].check_in()
        assert handles[0].deadline == 2.0


async def test_a_health_name_taken_meanwhile_fails_the_start_not_the_supervisor(
    autojump_clock: MockClock,
) -> None:
    """Someone registers "w" on the board while w is down: the restart at 1 is a FAILED
    exit (the ValueError its error), retried after the backoff; once the name is free
    again (at 1.2) the next attempt, at 1.25, runs."""
    rec = Record()
    w = ChildSpec("w", checking_in(rec, "w", checks=0), check_in_period=0.5, shutdown_timeout=0.0)
    async with (
        open_health_monitor() as health,
        open_service_supervisor(
            [w], budget=ROOMY, backoff=ConstantBackoff(0.25), health=health, listeners=[rec]
        ) as sup,
    ):
        await trio.sleep(0.6)  # hung at 0.5, restart due at 0.75
        squatter = health.register("w", 10.0)
        await trio.sleep(0.5)
        squatter.unregister()
        await trio.sleep(0.5)
        assert [t for t, _ in rec.starts()] == [0.0, 1.25]
        failed = [(t, e) for t, e in rec.events if isinstance(e, ChildExited)]
        assert [(t, e.kind) for t, e in failed] == [
            (0.5, ExitKind.HUNG), (0.75, ExitKind.FAILED), (1.0, ExitKind.FAILED),
        ]  # fmt: skip
        assert isinstance(failed[1][1].error, ValueError)
        assert sup.state("w") is ChildState.RUNNING


async def test_health_is_not_serving_from_the_missed_deadline_until_the_hung_run_ends(
    autojump_clock: MockClock,
) -> None:
    """With a monitor, the child is a component: NOT_SERVING at exactly 3 (its deadline),
    SERVING again at 4 once the hung run has ended; the stop at the block's end (at 6,
    the child then slow to end) leaves the board at once, without a miss."""
    rec = Record()
    changes: list[tuple[float, HealthStatus]] = []
    child = ChildSpec("w", checking_in(rec, "w", checks=1, cleanup=1.0), check_in_period=2.0)
    async with open_health_monitor() as health:
        health.add_listener(lambda status, _: changes.append((trio.current_time(), status)))
        async with open_service_supervisor([child], backoff=NO_WAIT, health=health):
            await trio.sleep(6.0)
            assert "w" in health
        assert "w" not in health
        assert trio.current_time() == 7.0
        await trio.sleep(5.0)
    assert changes == [(3.0, HealthStatus.NOT_SERVING), (4.0, HealthStatus.SERVING)]


# -- backoff -----------------------------------------------------------------------------


async def test_backoff_delays_are_exact_and_start_over_after_a_healthy_run(
    autojump_clock: MockClock,
) -> None:
    """Exponential 0.25 doubling: failures at once restart at 0.25, 0.75, 1.75; a run that
    lasts the budget's period (10 s) resets it, so the next delay is 0.25 again."""
    rec = Record()
    runs = [(0.0, "fail")] * 3 + [(10.0, "fail"), (0.0, "fail")]
    async with open_service_supervisor(
        [spec(rec, "x", *runs)],
        budget=RestartBudget(max_restarts=10, period=10.0),
        backoff=ExponentialBackoff(base=0.25, factor=2.0, cap=8.0),
        listeners=[rec],
    ):
        await trio.sleep(20.0)
    assert [t for t, _ in rec.starts()] == [0.0, 0.25, 0.75, 1.75, 12.0, 12.5]
    delays = [e.delay for _, e in rec.events if isinstance(e, ChildRestarting)]
    assert delays == [0.25, 0.5, 1.0, 0.25, 0.5]


async def test_a_backoff_that_runs_out_starts_over(autojump_clock: MockClock) -> None:
    """Giving up is the budget's job: a spent backoff iterator begins again. The three
    failures are counted."""
    rec = Record()
    async with open_service_supervisor(
        [spec(rec, "x", *[(0.0, "fail")] * 3)],
        budget=ROOMY,
        backoff=ConstantBackoff(1.0, max_attempts=2),
        listeners=[rec],
    ) as sup:
        await trio.sleep(5.0)
        assert sup.statistics().failed_exits == 3
    assert [t for t, _ in rec.starts()] == [0.0, 1.0, 2.0, 3.0]


# -- the block's end -------------------------------------------------------------------


async def test_leaving_the_block_stops_every_child_in_reverse_order(
    autojump_clock: MockClock,
) -> None:
    """Each child is cancelled only once the one started after it has ended."""
    rec = Record()
    children = [spec(rec, name, cleanup=0.25) for name in "abc"]
    async with open_service_supervisor(children, listeners=[rec]) as sup:
        await trio.sleep(1.0)
    assert trio.current_time() == 1.75
    assert rec.stops() == [(1.25, "c"), (1.5, "b"), (1.75, "a")]
    assert rec.events[-1] == (1.75, SupervisorStopped(None))
    assert sup.statistics().stopped == 3
    assert sup.statistics().running == ()
    assert no_service_tasks()


async def test_cancellation_from_outside_ends_everything_at_once(autojump_clock: MockClock) -> None:
    """An outside deadline cancels the block and every child at that moment; nothing
    is raised past the scope and no task is left."""
    rec = Record()
    children = [spec(rec, name) for name in "ab"]
    with trio.move_on_after(2.0) as scope:
        async with open_service_supervisor(children, listeners=[rec]):
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() == 2.0
    assert sorted(rec.log) == [
        (0.0, "a", "start"),
        (0.0, "b", "start"),
        (2.0, "a", "cancelled"),
        (2.0, "a", "ended"),
        (2.0, "b", "cancelled"),
        (2.0, "b", "ended"),
    ]
    assert rec.events[-1] == (2.0, SupervisorStopped(None))
    assert no_service_tasks()


async def test_the_blocks_own_error_comes_out_as_itself(autojump_clock: MockClock) -> None:
    """A ValueError raised in the block is raised as it is, not in a group."""
    rec = Record()
    with pytest.raises(ValueError, match="mine"):
        async with open_service_supervisor([spec(rec, "a")]):
            raise ValueError("mine")
    assert no_service_tasks()


# -- events, logging, validation ----------------------------------------------------


async def test_events_arrive_in_order_and_a_failing_listener_is_only_logged(
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Start, exit with the error, restarting, start, stop, stopped; a listener that raises
    is logged and the others still hear everything."""
    rec = Record()

    def broken(event: ServiceEvent) -> None:
        raise RuntimeError("listener bug")

    caplog.set_level(logging.INFO, logger="trio_heartbeat")
    async with open_service_supervisor(
        [spec(rec, "x", (1.0, "fail"))], backoff=ConstantBackoff(0.5), listeners=[broken, rec]
    ) as sup:
        await trio.sleep(2.0)
        sup.remove_listener(broken)
    kinds = [type(e).__name__ for _, e in rec.events]
    assert kinds == [
        "ChildStarted",
        "ChildExited",
        "ChildRestarting",
        "ChildStarted",
        "ChildStopped",
        "SupervisorStopped",
    ]
    exited = rec.events[1][1]
    assert isinstance(exited, ChildExited)
    assert isinstance(exited.error, Boom)
    assert rec.events[2] == (1.0, ChildRestarting("x", 0.5, ("x",)))
    assert "service listener" in caplog.text
    assert "listener bug" in caplog.text
    assert "'x' failed; restarting 'x'" in caplog.text
    assert "stopped child 'x'" in caplog.text


def test_child_specs_are_checked() -> None:
    """Bad names, periods, timeouts and types are refused when the spec is made."""

    async def fn() -> None: ...

    values: list[dict[str, object]] = [
        {"name": ""},
        {"check_in_period": 0.0},
        {"check_in_period": math.inf},
        {"shutdown_timeout": -1.0},
    ]
    for bad in values:
        with pytest.raises(ValueError, match="must be"):
            ChildSpec(**{"name": "x", "fn": fn, **bad})  # type: ignore[arg-type]
    types: list[dict[str, object]] = [{"fn": 3}, {"restart": "permanent"}, {"args": [1]}]
    for bad in types:
        with pytest.raises(TypeError):
            ChildSpec(**{"name": "x", "fn": fn, **bad})  # type: ignore[arg-type]


async def test_args_are_passed_after_the_check_in_handle(autojump_clock: MockClock) -> None:
    """``fn(check_in, *args)`` with a period, ``fn(*args)`` without."""
    seen: list[tuple[object, ...]] = []

    async def child(*args: object) -> None:
        seen.append(args)
        seen.sort(key=lambda args: isinstance(args[0], CheckIn))
        await trio.sleep_forever()

    children = [
        ChildSpec("plain", child, args=(1, 2)),
        ChildSpec("watched", child, args=(3,), check_in_period=5.0),
    ]
    async with open_service_supervisor(children):
        await trio.sleep(1.0)
    assert seen[0] == (1, 2)
    handle, three = seen[1]
    assert isinstance(handle, CheckIn)
    assert three == 3
    assert handle.name == "watched"
    assert handle.deadline == 5.0


async def test_bad_children_and_a_taken_health_name_are_refused(autojump_clock: MockClock) -> None:
    """Anything but a ChildSpec is a TypeError; a watched child whose name the monitor
    already holds is a ValueError, before anything starts."""
    rec = Record()
    with pytest.raises(TypeError) as refused:
        async with open_service_supervisor(["x"]):  # type: ignore[list-item]
            pass  # pragma: no cover
    assert str(refused.value) == "children must be ChildSpec objects, not 'x'"
    async with open_health_monitor() as health:
        health.register("w", 1.0)
        child = ChildSpec("w", checking_in(rec, "w", checks=0), check_in_period=2.0)
        with pytest.raises(ValueError, match=r"^the health monitor already has a component 'w'$"):
            async with open_service_supervisor([child], health=health):
                pass  # pragma: no cover
    assert rec.log == []
    async with open_service_supervisor([spec(rec, "a")]) as sup:
        sup.add_listener(rec)
        await trio.sleep(1.0)
    assert rec.events[-1] == (1.0, SupervisorStopped(None))


async def test_a_later_childs_earlier_backoff_does_not_spin_the_loop(
    autojump_clock: MockClock,
) -> None:
    """REST_FOR_ONE, 1 s backoff: b fails at 1 (due again at 2), then a fails at 1.5 (due
    at 2.5; b, still pending, waits behind it). From 2 to 2.5 the loop must sleep, not
    spin (under autojump a spin stops the clock for ever): a and b start at 2.5."""
    rec = Record()
    children = [spec(rec, "a", (1.5, "fail")), spec(rec, "b", (1.0, "fail"))]
    steps = SpinGuard(1000)
    with steps.scope:
        trio.lowlevel.add_instrument(steps)
        try:
            async with open_service_supervisor(
                children,
                strategy=Strategy.REST_FOR_ONE,
                budget=ROOMY,
                backoff=ConstantBackoff(1.0),
                listeners=[rec],
            ):
                await trio.sleep(3.0)
        finally:
            trio.lowlevel.remove_instrument(steps)
    assert steps.spun_at is None, f"the loop spins at {steps.spun_at}"
    assert rec.starts() == [(0.0, "a"), (0.0, "b"), (2.5, "a"), (2.5, "b")]


async def test_the_log_tells_each_step_with_its_level_and_exception(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Exact records: start, the missed deadline, the abandonment (with its timeout), the
    restart and its delay, the lingering run's late end, a failure (its traceback
    attached), the stop (with the error it raised on its way out) and the end; a failing listener is logged with itself and the
    event. Kills the mutants that blank or swap a log call's text or arguments."""
    runs = 0

    async def child(check_in: CheckIn) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:  # hangs, then cleans up for 1.25 s: abandoned at 3, ends at 3.25
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(1.25)
        elif runs == 2:
            await trio.sleep(1.0)
            raise Boom("second")
        else:  # raises on its way out when stopped
            try:
                while True:
                    await trio.sleep(0.5)
                    check_in.check_in()
            except trio.Cancelled:
                raise Boom("third") from None

    def broken(event: ServiceEvent) -> None:
        if isinstance(event, ChildAbandoned):
            raise RuntimeError("listener bug")

    caplog.set_level(logging.INFO, logger="trio_heartbeat")
    w = ChildSpec("w", child, check_in_period=2.0, shutdown_timeout=1.0)
    async with open_service_supervisor(
        [w], budget=ROOMY, backoff=ConstantBackoff(0.5), listeners=[broken]
    ):
        await trio.sleep(6.0)
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert records == [
        ("INFO", "started child 'w'"),
        ("WARNING", "child 'w' missed its check-in deadline: cancelling it"),
        ("ERROR", "child 'w' did not end within 1 s of its cancellation: abandoned"),
        ("ERROR", f"service listener {broken!r} failed on {ChildAbandoned('w', 1.0)!r}"),
        ("WARNING", "child 'w' hung; restarting 'w' (one_for_one)"),
        ("INFO", "restarting 'w' in 0.5 s"),
        ("INFO", "abandoned child 'w' ended at last"),
        ("INFO", "started child 'w'"),
        ("WARNING", "child 'w' failed; restarting 'w' (one_for_one)"),
        ("INFO", "restarting 'w' in 0.5 s"),
        ("INFO", "started child 'w'"),
        ("INFO", "stopping child 'w'"),
        ("INFO", "stopped child 'w'"),
        ("INFO", "service supervisor stopped"),
    ]
    with_errors = [(r.getMessage(), r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert [(message, str(error)) for message, error in with_errors] == [
        (records[3][1], "listener bug"),
        ("child 'w' failed; restarting 'w' (one_for_one)", "second"),
        ("stopped child 'w'", "third"),
    ]


async def test_a_supervisor_that_gave_up_is_freed_without_a_garbage_collection(
    autojump_clock: MockClock,
) -> None:
    """With gc disabled, a supervisor whose give-up was caught and dropped is gone as soon
    as the caller lets go of it: ``error`` holds a twin without the traceback that leads
    back through the supervisor's frames (the raised one kept it alive, 20 of 20)."""

    async def give_up() -> weakref.ref[ServiceSupervisor]:
        with pytest.raises(SupervisorGaveUp):
            async with open_service_supervisor(
                [spec(Record(), "c", (0.0, "fail"))], budget=RestartBudget(0, 5.0)
            ) as sup:
                await trio.sleep_forever()
        return weakref.ref(sup)

    quiet = logging.getLogger("trio_heartbeat")
    gc.collect()
    gc.disable()
    quiet.disabled = True  # a captured log record would hold the errors
    try:
        ref = await give_up()
        assert ref() is None
    finally:
        quiet.disabled = False
        gc.enable()


async def test_the_exit_that_makes_it_give_up_is_heard_with_error_set(
    autojump_clock: MockClock,
) -> None:
    """A listener that hears the fatal ChildExited already reads ``error``: it can stop a
    watchdog in that same instant."""
    seen: list[tuple[float, str | None]] = []
    supervisors: list[ServiceSupervisor] = []

    def on_event(event: ServiceEvent) -> None:
        if isinstance(event, ChildExited):
            error = supervisors[0].error
            seen.append((trio.current_time(), None if error is None else error.child))

    async def run() -> None:
        async with open_service_supervisor(
            [spec(Record(), "c", (1.0, "fail"), (1.0, "fail"))],
            budget=RestartBudget(1, 5.0),
            backoff=NO_WAIT,
            listeners=[on_event],
        ) as sup:
            supervisors.append(sup)
            await trio.sleep_forever()

    with pytest.raises(SupervisorGaveUp):
        await run()
    assert seen == [(1.0, None), (2.0, "c")]


def test_an_iterator_is_refused_as_backoff() -> None:
    """A generator would give its delays once, and every later restart would be at once
    (6,600 starts in 2 s): a backoff is asked for its delays again, so it must be
    re-iterable."""
    with pytest.raises(TypeError) as caught:
        ServiceSupervisor([], Strategy.ONE_FOR_ONE, ROOMY, iter([0.1, 0.2]), None, ())
    assert str(caught.value) == "backoff must be re-iterable (a policy, a list), not an iterator"
    ServiceSupervisor([], Strategy.ONE_FOR_ONE, ROOMY, [0.1, 0.2], None, ())


def test_at_most_a_thousand_children() -> None:
    """Each step looks at every child: the count is bounded, and says so."""
    children = [ChildSpec(f"c{i}", trio.sleep_forever) for i in range(1001)]
    with pytest.raises(ValueError, match=r"^at most 1000 children, not 1001$"):
        ServiceSupervisor(children, Strategy.ONE_FOR_ONE, ROOMY, NO_WAIT, None, ())
    ServiceSupervisor(children[:1000], Strategy.ONE_FOR_ONE, ROOMY, NO_WAIT, None, ())


# -- pinned by mutation testing --------------------------------------------------------


def test_a_bad_child_spec_is_refused_with_a_message_naming_what_was_wrong() -> None:
    """Each refusal names the field and the value given, word for word."""

    async def fn() -> None: ...

    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"name": ""}, ValueError, "a child's name must be a non-empty str, not ''"),
        ({"name": 3}, ValueError, "a child's name must be a non-empty str, not 3"),
        ({"fn": 3}, TypeError, "fn must be an async function, not 3"),
        ({"restart": "x"}, TypeError, "restart must be from RestartType, not 'x'"),
        (
            {"check_in_period": -1.0},
            ValueError,
            "check_in_period must be positive seconds or None, not -1.0",
        ),
        (
            {"shutdown_timeout": math.nan},
            ValueError,
            "shutdown_timeout must be 0 or more seconds, not nan",
        ),
        ({"args": [1]}, TypeError, "args must be a tuple, not [1]"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error) as caught:
            ChildSpec(**{"name": "x", "fn": fn, **bad})  # type: ignore[arg-type]
        assert str(caught.value) == message
    assert ChildSpec("x", fn, check_in_period=1, shutdown_timeout=0).shutdown_timeout == 0


async def test_state_of_an_unknown_child_is_a_key_error_naming_it(
    autojump_clock: MockClock,
) -> None:
    """``state("nobody")`` raises ``KeyError("nobody")``."""
    async with open_service_supervisor([spec(Record(), "a")]) as sup:
        with pytest.raises(KeyError) as caught:
            sup.state("nobody")
        assert caught.value.args == ("nobody",)


async def test_each_child_runs_in_a_task_named_after_it(autojump_clock: MockClock) -> None:
    """The task of child "a" is "trio_heartbeat service a", beside the supervisor's loop."""
    async with open_service_supervisor([spec(Record(), "a")]):
        await trio.sleep(1.0)
        names = task_names()
        assert "trio_heartbeat service a" in names
        assert "trio_heartbeat service supervisor" in names


async def test_the_give_up_on_a_second_abandonment_says_why(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The SupervisorGaveUp raised when a child is abandoned again while its first
    abandoned run lingers has the exact message, the HUNG kind and no error; the log
    says it once, at ERROR, message included."""
    release = trio.Event()

    async def stubborn(check_in: CheckIn) -> None:
        with trio.CancelScope(shield=True):
            await release.wait()

    def on_event(event: ServiceEvent) -> None:
        if isinstance(event, SupervisorStopped):
            release.set()

    child = ChildSpec("w", stubborn, check_in_period=2.0, shutdown_timeout=1.0)
    with pytest.raises(SupervisorGaveUp) as caught:
        async with open_service_supervisor([child], backoff=NO_WAIT, listeners=[on_event]):
            await trio.sleep_forever()
    assert str(caught.value) == (
        "child 'w' was abandoned again while an earlier run of it was still running: giving up"
    )
    assert (caught.value.child, caught.value.kind, caught.value.error) == ("w", ExitKind.HUNG, None)
    assert trio.current_time() == 6.0
    gave_up = [(r.levelname, r.getMessage()) for r in caplog.records if "gave up" in r.getMessage()]
    assert gave_up == [("ERROR", f"service supervisor gave up: {caught.value}")]


async def test_an_abandoned_run_that_ended_no_longer_counts_against_its_child(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Period 2, shutdown_timeout 1; the first two runs hang and clean up for 1.5 s. Run 1
    is abandoned at 3 and ends at 3.5; run 2 (from 3) is abandoned at 6, when no earlier
    run lingers any more: no give-up, a third run starts at 6 and runs on."""
    rec = Record()
    runs = 0

    async def child(check_in: CheckIn) -> None:
        nonlocal runs
        runs += 1
        rec.note("w", "start")
        if runs > 2:
            while True:
                await trio.sleep(1.0)
                check_in.check_in()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(1.5)
            rec.note("w", "ended")

    caplog.set_level(logging.INFO, logger="trio_heartbeat")
    w = ChildSpec("w", child, check_in_period=2.0, shutdown_timeout=1.0)
    async with open_service_supervisor([w], budget=ROOMY, backoff=NO_WAIT) as sup:
        await trio.sleep(10.0)
        assert sup.error is None
        assert sup.statistics().abandoned == 2
        assert sup.state("w") is ChildState.RUNNING
    assert rec.of("w") == [(0.0, "start"), (3.0, "start"), (3.5, "ended"), (6.0, "start"),
                           (6.5, "ended")]  # fmt: skip
    late = [r.getMessage() for r in caplog.records if "ended at last" in r.getMessage()]
    assert late == ["abandoned child 'w' ended at last"] * 2


async def test_one_for_one_starts_a_later_child_due_before_an_earlier_one(
    autojump_clock: MockClock,
) -> None:
    """Backoff 1 then 4. a fails at 0 (due at 1) and at 1 (due at 5); b fails at 2 (due at
    3): under ONE_FOR_ONE b starts at 3, not behind a's later restart."""
    rec = Record()
    children = [spec(rec, "a", (0.0, "fail"), (0.0, "fail")), spec(rec, "b", (2.0, "fail"))]
    async with open_service_supervisor(children, budget=ROOMY, backoff=[1.0, 4.0], listeners=[rec]):
        await trio.sleep(6.0)
    assert rec.starts() == [(0.0, "a"), (0.0, "b"), (1.0, "a"), (3.0, "b"), (5.0, "a")]


async def test_each_child_has_a_backoff_of_its_own(autojump_clock: MockClock) -> None:
    """a and b both fail at once: each waits the first delay (1 s), neither the second."""
    rec = Record()
    children = [spec(rec, name, (0.0, "fail")) for name in "ab"]
    async with open_service_supervisor(children, budget=ROOMY, backoff=[1.0, 2.0], listeners=[rec]):
        await trio.sleep(3.0)
    assert rec.starts() == [(0.0, "a"), (0.0, "b"), (1.0, "a"), (1.0, "b")]
    delays = [(e.name, e.delay) for _, e in rec.events if isinstance(e, ChildRestarting)]
    assert sorted(delays) == [("a", 1.0), ("b", 1.0)]


async def test_a_backoff_with_no_delays_restarts_at_once(autojump_clock: MockClock) -> None:
    """An empty backoff (``[]``, or ``max_attempts=0``) has no delay to give: 0 s."""
    empty: list[Iterable[float]] = [[], ConstantBackoff(1.0, max_attempts=0)]
    for backoff in empty:
        rec = Record()
        async with open_service_supervisor(
            [spec(rec, "x", (1.0, "fail"), (1.0, "fail"))],
            budget=ROOMY,
            backoff=backoff,
            listeners=[rec],
        ):
            await trio.sleep(3.0)
        assert [t - rec.starts()[0][0] for t, _ in rec.starts()] == [0.0, 1.0, 2.0]
        delays = [e.delay for _, e in rec.events if isinstance(e, ChildRestarting)]
        assert delays == [0.0, 0.0]


async def test_a_normal_return_is_logged_at_info(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that returns is no warning: its exit is logged at INFO, restarted or not."""
    rec = Record()
    children = [
        spec(rec, "p", (1.0, "return")),
        spec(rec, "t", (1.0, "return"), restart=RestartType.TRANSIENT),
    ]
    caplog.set_level(logging.INFO, logger="trio_heartbeat")
    async with open_service_supervisor(children, backoff=NO_WAIT):
        await trio.sleep(1.5)
    exits = [(r.levelname, r.getMessage()) for r in caplog.records if "returned" in r.getMessage()]
    assert sorted(exits) == [
        ("INFO", "child 'p' returned; restarting 'p' (one_for_one)"),
        ("INFO", "child 't' returned; it is transient: not restarted"),
    ]


async def test_a_cancelled_child_is_given_its_whole_shutdown_timeout(
    autojump_clock: MockClock,
) -> None:
    """w hangs (period 1), is cancelled at 1 and cleans up for 1 s of its 2 s timeout; x's
    failure at 1.5 wakes the loop meanwhile, which must not abandon w early: w ends at 2,
    reported HUNG, and starts again then."""
    rec = Record()
    w = ChildSpec("w", checking_in(rec, "w", checks=0, cleanup=1.0), check_in_period=1.0,
                  shutdown_timeout=2.0)  # fmt: skip
    children = [w, spec(rec, "x", (1.5, "fail"))]
    async with open_service_supervisor(children, budget=ROOMY, backoff=NO_WAIT, listeners=[rec]):
        await trio.sleep(3.0)
    assert not any(isinstance(e, ChildAbandoned) for _, e in rec.events)
    assert rec.of("w")[:4] == [(0.0, "start"), (1.0, "cancelled"), (2.0, "ended"), (2.0, "start")]


@pytest.mark.parametrize("delay", [math.nan, math.inf, -1.0, "0.1", None])
def test_a_backoff_whose_delays_are_not_seconds_is_refused(delay: object) -> None:
    """Its first delay is looked at when the supervisor is made: nan or inf never restarted
    the child, a string or None raised only at the first crash."""
    delays: list[float] = [delay]  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^backoff delays must be finite seconds, not "):
        ServiceSupervisor([], Strategy.ONE_FOR_ONE, ROOMY, delays, None, ())
