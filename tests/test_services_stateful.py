"""The service supervisor (``_services.py``) under random children, checked by replay.

Hypothesis draws 2 to 4 children (restart types, check-in periods, shutdown
timeouts), a strategy, a restart budget and a backoff, and for each child a
script of runs: return or raise after a drawn time, hang (stop checking in)
after a drawn time, or run until stopped; cancelled, a run shields itself for a
drawn cleanup, shorter than its shutdown timeout or, now and then, longer (it
is then abandoned, and ends on its own a little later). One ``trio.run`` under
``MockClock(autojump_threshold=0)`` per example, ten virtual seconds, then the
block is left.

A listener replays every event, as it is emitted, into a fresh
:class:`RestartPlan` and checks on the spot: the stream is well formed per
child (started, maybe abandoned, then exited or stopped); the supervisor's
states and running children equal the replayed plan's; a child starts only
when it is pending, its backoff has passed, nothing is being stopped and (but
for ONE_FOR_ONE) no earlier child is pending; a give-up comes exactly when an
independent count of the restarts within the period says the budget is spent
(or when a child is abandoned again while an abandoned run of it lingers),
and each restart's delay is the backoff's next one. Between events it checks
that the supervisor never idles with a start due or a stop not under way.
Afterwards the children's own records are matched with the events: exact
start, exit, stop and abandonment times, a hung run cancelled at exactly its
last check-in plus its period, stops one at a time in the order the decisions
listed them, no two runs of a child at once unless the first was abandoned;
and the end: one ``SupervisorGaveUp`` (never a group) with the child's error
as its cause iff the replay gave up, the counters, and no task left.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import trio
from helpers import SpinGuard, task_names
from hypothesis import event, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from trio_heartbeat._backoff import ConstantBackoff, ExponentialBackoff
from trio_heartbeat._errors import SupervisorGaveUp
from trio_heartbeat._restart import ExitKind, RestartBudget, RestartPlan, RestartType, Strategy
from trio_heartbeat._service_events import (
    ChildAbandoned,
    ChildExited,
    ChildRestarting,
    ChildStarted,
    ChildStopped,
    ServiceEvent,
    ServiceStatistics,
    SupervisorStopped,
)
from trio_heartbeat._services import CheckIn, ChildSpec, ServiceSupervisor, open_service_supervisor

#: How many steps the supervisor's loop task may take in one instant of virtual time
#: before it counts as spinning (under autojump a spin stops the clock for ever).
SPIN = 2_000


#: When the block is left: a 1/64 fraction no other time has (they are multiples of
#: 1/8, or of 1/32 for an abandoned run's own end), so no tie needs an order.
HORIZON = 10.0 + 1 / 64


class Boom(Exception):
    """What a run that fails raises."""


@dataclass(frozen=True)
class Run:
    """One scripted run: ``action`` after ``duration`` s; cancelled, ``cleanup`` s shielded."""

    action: str  # "return", "raise", "hang" (stop checking in), "forever"
    duration: float
    cleanup: float


FOREVER = Run("forever", 0.0, 0.0)


@dataclass(frozen=True)
class Child:
    name: str
    restart: RestartType
    period: float | None
    shutdown_timeout: float
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Scenario:
    children: tuple[Child, ...]
    strategy: Strategy
    budget: RestartBudget
    backoff: ConstantBackoff | ExponentialBackoff


@st.composite
def runs(draw: st.DrawFn, shutdown_timeout: float) -> Run:
    action = draw(st.sampled_from(["return", "raise", "hang", "forever"]))
    duration = draw(st.integers(0, 12)) / 4
    if draw(st.integers(0, 7)) == 0:  # now and then, too slow: abandoned
        cleanup = shutdown_timeout + draw(st.integers(0, 2)) / 2 + 1 / 32
    else:
        cleanup = draw(st.integers(0, int(shutdown_timeout * 8) - 1)) / 8
    return Run(action, duration, cleanup)


@st.composite
def children(draw: st.DrawFn, name: str) -> Child:
    shutdown_timeout = draw(st.sampled_from([0.5, 1.0, 2.0]))
    return Child(
        name,
        draw(st.sampled_from(RestartType)),
        draw(st.sampled_from([None, 1.0, 2.0])),
        shutdown_timeout,
        tuple(draw(st.lists(runs(shutdown_timeout), max_size=5))),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    count = draw(st.integers(2, 4))
    backoff: ConstantBackoff | ExponentialBackoff
    if draw(st.booleans()):
        backoff = ConstantBackoff(
            draw(st.sampled_from([0.0, 0.125, 0.5, 1.0])),
            max_attempts=draw(st.sampled_from([None, 0, 1, 2])),
        )
    else:
        backoff = ExponentialBackoff(
            base=draw(st.sampled_from([0.125, 0.25, 0.5])),
            factor=2.0,
            cap=draw(st.sampled_from([0.5, 1.0, 2.0])),
        )
    return Scenario(
        tuple(draw(children(f"c{i}")) for i in range(count)),
        draw(st.sampled_from(Strategy)),
        RestartBudget(
            max_restarts=draw(st.integers(0, 4)), period=draw(st.sampled_from([1.0, 2.0, 4.0]))
        ),
        backoff,
    )


# -- what the children did -------------------------------------------------------------


@dataclass
class Trace:
    """One run as the child saw it."""

    run: Run
    start: float
    checkins: list[float] = field(default_factory=list)
    hang_since: float | None = None  # it stopped checking in
    cancelled: float | None = None
    cancel_order: int = -1
    end: float | None = None
    error: Boom | None = None

    def deadline(self, period: float | None) -> float:
        """When the supervisor must find it hung, if it stopped checking in."""
        if period is None or self.hang_since is None:
            return math.inf
        return (self.checkins[-1] if self.checkins else self.start) + period


def make_child(child: Child, traces: list[Trace], order: Iterator[int]) -> ChildSpec:
    script = iter(child.runs)

    async def work(check_in: CheckIn | None, trace: Trace, duration: float) -> None:
        if check_in is None:
            await trio.sleep(duration)
            return
        assert child.period is not None
        while duration > 0:  # checks in every half period
            step = min(child.period / 2, duration)
            await trio.sleep(step)
            duration -= step
            check_in.check_in()
            trace.checkins.append(trio.current_time())

    async def fn(*args: CheckIn) -> None:
        run = next(script, FOREVER)
        trace = Trace(run, trio.current_time())
        traces.append(trace)
        check_in = args[0] if args else None
        try:
            await work(check_in, trace, math.inf if run.action == "forever" else run.duration)
            if run.action == "hang":
                trace.hang_since = trio.current_time()
                await trio.sleep_forever()
            elif run.action == "raise":
                trace.error = Boom(child.name)
                raise trace.error
        except trio.Cancelled:
            trace.cancelled, trace.cancel_order = trio.current_time(), next(order)
            with trio.CancelScope(shield=True):
                await trio.sleep(run.cleanup)
            raise
        finally:
            trace.end = trio.current_time()

    return ChildSpec(
        child.name,
        fn,
        restart=child.restart,
        check_in_period=child.period,
        shutdown_timeout=child.shutdown_timeout,
    )


# -- the replay ------------------------------------------------------------------------


@dataclass
class Ending:
    """One run as the events told it."""

    start: float
    abandoned: float | None = None
    stopped: bool = False
    kind: ExitKind | None = None
    error: Exception | None = None
    end: float | None = None


class Replay:
    """Checks each event as it comes against a RestartPlan fed the same events."""

    def __init__(self, scenario: Scenario, traces: dict[str, list[Trace]]) -> None:
        self.scenario = scenario
        self.specs = {child.name: child for child in scenario.children}
        self.traces = traces
        self.plan = RestartPlan(
            [(c.name, c.restart) for c in scenario.children], scenario.strategy, scenario.budget
        )
        self.sup: ServiceSupervisor | None = None
        self.events: list[tuple[float, ServiceEvent]] = []
        self.failures: list[BaseException] = []
        self.endings: dict[str, list[Ending]] = {name: [] for name in self.specs}
        self.not_before: dict[str, float] = {}
        self.restart_times: list[float] = []
        self.delays: dict[str, Iterator[float]] = {}
        self.expected: ChildRestarting | None = None  # the event that must come next
        self.end_of: str | None = None  # after an abandonment, its end comes next
        self.stop_order: list[str] = []  # every decision's stops, then the shutdown's
        self.shut_down = False
        self.abandoned_again = False
        self.gave_up: tuple[str, ExitKind, Exception | None, str] | None = None
        self.last_time = 0.0

    def __call__(self, event: ServiceEvent) -> None:
        try:
            self.check(event)
        except BaseException as exc:  # the supervisor only logs a listener's errors
            self.failures.append(exc)

    def check(self, event: ServiceEvent) -> None:
        now = trio.current_time()
        if self.events:
            assert not isinstance(self.events[-1][1], SupervisorStopped), "an event after the end"
        if now > self.last_time:
            self.between(self.last_time, now)
            self.last_time = now
        if now >= HORIZON and not self.shut_down:  # the block was left: the plan shuts down
            self.shut_down = True
            self.stop_order += self.plan.shutdown()
        if self.abandoned_again:  # it shut the plan down just after its event
            self.abandoned_again = False
            self.stop_order += self.plan.shutdown()
        self.events.append((now, event))
        if self.expected is not None:
            assert event == self.expected
            self.expected = None
        else:
            assert not isinstance(event, ChildRestarting)
        if self.end_of is not None:
            assert isinstance(event, ChildExited | ChildStopped)
            assert event.name == self.end_of
            self.end_of = None
        plan = self.plan
        if isinstance(event, ChildStarted):
            name = event.name
            endings = self.endings[name]
            assert not endings or endings[-1].end is not None, "started twice"
            assert name in plan.pending
            assert not plan.stopping
            assert not plan.closed
            assert self.not_before.pop(name, -math.inf) <= now
            if plan.strategy is not Strategy.ONE_FOR_ONE:
                assert plan.pending[0] == name, "started before an earlier pending child"
            plan.started(name)
            endings.append(Ending(now))
        elif isinstance(event, ChildAbandoned):
            ending = self.current(event.name)
            assert ending.abandoned is None
            assert event.shutdown_timeout == self.specs[event.name].shutdown_timeout
            ending.abandoned = now
            self.end_of = event.name
            earlier = self.traces[event.name][: len(self.endings[event.name]) - 1]
            if any(trace.end is None for trace in earlier) and not plan.closed:
                self.abandoned_again = True
                assert self.gave_up is None
                self.gave_up = (event.name, ExitKind.HUNG, None, "abandoned again")
        elif isinstance(event, ChildStopped):
            ending = self.current(event.name)
            ending.stopped, ending.end = True, now
            plan.stopped(event.name)
        elif isinstance(event, ChildExited):
            self.exited(event, now)
        elif isinstance(event, ChildRestarting):
            for name in event.children:
                self.not_before[name] = now + event.delay
        else:
            assert isinstance(event, SupervisorStopped)
            assert not plan.running
            assert not plan.stopping
            if self.gave_up is None:
                assert event.error is None
        self.compare()

    def current(self, name: str) -> Ending:
        endings = self.endings[name]
        assert endings, f"{name} never started"
        assert endings[-1].end is None, f"{name} ended but was not running"
        return endings[-1]

    def exited(self, event: ChildExited, now: float) -> None:
        name, kind = event.name, event.kind
        ending = self.current(name)
        ending.kind, ending.error, ending.end = kind, event.error, now
        restart = self.specs[name].restart
        budget = self.scenario.budget
        calls = restart is RestartType.PERMANENT or (
            restart is RestartType.TRANSIENT and kind.abnormal
        )
        recent = sum(now - t <= budget.period for t in self.restart_times)
        decision = self.plan.child_exited(name, kind, now)
        assert decision.give_up == (calls and recent >= budget.max_restarts)
        self.stop_order += decision.stop
        if decision.give_up:
            assert self.gave_up is None
            self.gave_up = (name, kind, event.error, f"child {decision.reason}")
        elif decision.start:
            self.restart_times.append(now)
            self.expected = ChildRestarting(
                name, self.next_delay(name, now - ending.start), decision.start
            )

    def next_delay(self, name: str, ran_for: float) -> float:
        backoff: Iterable[float] = self.scenario.backoff
        if name not in self.delays or ran_for >= self.scenario.budget.period:
            self.delays[name] = iter(backoff)
        delay = next(self.delays[name], None)
        if delay is None:
            self.delays[name] = iter(backoff)
            delay = next(self.delays[name], 0.0)
        return delay

    def compare(self) -> None:
        """The supervisor's own plan says what the replayed one says."""
        sup = self.sup
        if sup is None:  # the first starts come before the block gives it out
            return
        for name in self.specs:
            assert sup.state(name) == (self.plan.state(name) if name in self.plan else None)
        assert sup.statistics().running == self.plan.running

    def between(self, time: float, until: float) -> None:
        """From ``time`` (its events all seen) until ``until`` the supervisor has nothing
        due: no start it could make, and a stop in progress if it has any to make."""
        plan = self.plan
        if plan.stopping:
            cancelled = [
                trace
                for name in plan.stopping
                for trace in self.traces[name][len(self.endings[name]) - 1 :]
                if trace.cancelled is not None and trace.cancelled <= time
            ]
            assert cancelled, f"idle at {time} while {plan.stopping} wait to be stopped"
        elif not plan.closed and plan.pending:
            due = [self.not_before.get(name, -math.inf) for name in plan.pending]
            first = min(due) if plan.strategy is Strategy.ONE_FOR_ONE else due[0]
            assert first >= min(until, HORIZON), f"a start due at {first} was not made"


# -- one example -----------------------------------------------------------------------


async def run_scenario(scenario: Scenario, guard: SpinGuard) -> None:
    traces: dict[str, list[Trace]] = {child.name: [] for child in scenario.children}
    order = itertools.count()
    specs = [make_child(child, traces[child.name], order) for child in scenario.children]
    replay = Replay(scenario, traces)
    raised: BaseException | None = None
    with guard.scope, trio.move_on_after(1000.0) as timer:
        try:
            async with open_service_supervisor(
                specs,
                strategy=scenario.strategy,
                budget=scenario.budget,
                backoff=scenario.backoff,
                listeners=[replay],
            ) as sup:
                replay.sup = sup
                replay.compare()
                await trio.sleep(HORIZON)
        except SupervisorGaveUp as exc:
            raised = exc
    if guard.spun_at is not None:
        raise AssertionError(f"the supervisor's loop spins at {guard.spun_at}")
    assert not timer.cancelled_caught, "the supervisor hangs"
    if replay.failures:
        raise replay.failures[0]
    replay.between(replay.last_time, math.inf)
    assert not [name for name in task_names() if name.startswith("trio_heartbeat service")]
    check_the_end(scenario, replay, raised, sup.error, sup.statistics())
    kinds = {type(event).__name__ for _, event in replay.events}
    event("gave up" if replay.gave_up else "left the block")
    event(" ".join(sorted(kinds & {"ChildAbandoned", "ChildRestarting", "ChildStopped"})))
    check_the_runs(scenario, replay, traces)


def check_the_end(
    scenario: Scenario,
    replay: Replay,
    raised: BaseException | None,
    error: SupervisorGaveUp | None,
    stats: ServiceStatistics,
) -> None:
    events = [event for _, event in replay.events]
    if replay.gave_up is None:
        assert raised is None
        assert error is None
        assert events[-1] == SupervisorStopped(None)
    else:
        assert type(raised) is SupervisorGaveUp  # one error, never a group
        assert error is not None
        assert error is not raised  # a twin without the traceback of the raised one
        assert error.__traceback__ is None
        assert (str(error), error.child, error.kind, error.error, error.__cause__) == (
            str(raised), raised.child, raised.kind, raised.error, raised.__cause__
        )  # fmt: skip
        child, kind, cause, message = replay.gave_up
        assert (raised.child, raised.kind, raised.error) == (child, kind, cause)
        assert raised.__cause__ is cause
        assert message in str(raised)
        assert events[-1] == SupervisorStopped(raised)
    assert sum(isinstance(event, SupervisorStopped) for event in events) == 1

    def count(kind: type[ServiceEvent]) -> int:
        return sum(isinstance(event, kind) for event in events)

    exits = [event.kind for event in events if isinstance(event, ChildExited)]
    assert (
        stats.starts,
        stats.normal_exits,
        stats.failed_exits,
        stats.hung_exits,
        stats.stopped,
        stats.abandoned,
        stats.restarts,
        stats.running,
    ) == (
        count(ChildStarted),
        exits.count(ExitKind.NORMAL),
        exits.count(ExitKind.FAILED),
        exits.count(ExitKind.HUNG),
        count(ChildStopped),
        count(ChildAbandoned),
        count(ChildRestarting),
        (),
    )


def check_the_runs(scenario: Scenario, replay: Replay, traces: dict[str, list[Trace]]) -> None:
    stops: list[tuple[int, str, float, float]] = []  # cancel order, child, from, until
    for child in scenario.children:
        endings, runs = replay.endings[child.name], traces[child.name]
        assert len(endings) == len(runs)
        for ending, trace in zip(endings, runs, strict=True):
            assert ending.start == trace.start
            assert trace.end is not None, "still running"
            assert ending.end is not None
            deadline = trace.deadline(child.period)
            if trace.cancelled is not None:
                assert trace.cancelled <= deadline, "a hung run cancelled late"
            elif trace.hang_since is not None:
                raise AssertionError("a hung run never cancelled")
            too_slow = trace.cancelled is not None and trace.run.cleanup > child.shutdown_timeout
            if too_slow:
                assert trace.cancelled is not None
                assert ending.abandoned == trace.cancelled + child.shutdown_timeout
                assert ending.end == ending.abandoned < trace.end
            else:
                assert ending.abandoned is None
                assert ending.end == trace.end
            if ending.stopped:
                if trace.cancelled is not None and trace.cancelled != deadline:
                    stops.append((trace.cancel_order, child.name, trace.cancelled, ending.end))
                continue
            if ending.kind is ExitKind.HUNG:
                assert trace.cancelled == deadline, "hung, not at its deadline"
                assert ending.error is None
            else:
                assert trace.cancelled is None
                assert trace.end == trace.start + trace.run.duration
                assert trace.run.action == ("return" if ending.kind is ExitKind.NORMAL else "raise")
                assert ending.error is trace.error
        for before, after in itertools.pairwise(zip(endings, runs, strict=True)):
            if before[0].abandoned is None:
                assert after[1].start >= before[1].end  # type: ignore[operator]
    stops.sort()
    for (_, _, _, until), (_, _, since, _) in itertools.pairwise(stops):
        assert since >= until, "two children stopped at once"
    wanted = iter(replay.stop_order)
    assert all(any(name == w for w in wanted) for _, name, _, _ in stops), (
        "stopped out of the decisions' order"
    )


@settings(max_examples=200, deadline=None, database=None)
@given(scenarios())
def test_the_supervisor_follows_its_plan_under_random_children(scenario: Scenario) -> None:
    """Every invariant of the module docstring holds for any drawn scenario."""
    guard = SpinGuard(SPIN)
    trio.run(
        run_scenario, scenario, guard, clock=MockClock(autojump_threshold=0), instruments=[guard]
    )
