"""The health board (``HealthBoard`` and ``Component`` in ``_health.py``): health derived from check-ins.

Example tests pin the exact instants: a component is missed from exactly its
deadline, recovers at its next check-in, and the process's status is the
worst of the application's and every component's. ``poll`` announces each
change once and ``next_deadline`` tells a timer when to poll; one test drives
the board the way the runtime will, with one Trio timer in virtual time. A
hypothesis state machine checks the board against a model that walks every
component at every step.
"""

from __future__ import annotations

import doctest
import math
from dataclasses import FrozenInstanceError

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_heartbeat import _health
from trio_heartbeat._frames import HealthStatus
from trio_heartbeat._health import (
    MAX_COMPONENTS,
    MAX_NAME_LENGTH,
    Component,
    ComponentSnapshot,
    HealthBoard,
)

SERVING = HealthStatus.SERVING
DEGRADED = HealthStatus.DEGRADED
NOT_SERVING = HealthStatus.NOT_SERVING

# -- one component ---------------------------------------------------------------------


def test_a_missed_check_in_changes_status_at_exactly_the_deadline() -> None:
    """Registration is the first check-in; the component is missed from last + period on."""
    board = HealthBoard()
    worker = board.register("worker", 2.5, now=10.0)
    assert worker.last_check_in == 10.0
    assert worker.deadline == board.next_deadline == 12.5
    assert worker.status(12.5 - 2**-40) is SERVING
    assert board.status(12.5 - 2**-40) is SERVING
    assert board.poll(12.5 - 2**-40) is None
    assert worker.status(12.5) is NOT_SERVING
    assert board.status(12.5) is NOT_SERVING
    assert board.poll(12.5) is NOT_SERVING
    assert board.reported is NOT_SERVING
    assert board.next_deadline == math.inf  # nothing left that can change by itself


def test_the_next_check_in_recovers_a_missed_component() -> None:
    """A late check-in counts one miss and gives a fresh period from the check-in."""
    board = HealthBoard()
    worker = board.register("worker", 1.0, now=0.0)
    assert board.poll(1.0) is NOT_SERVING
    worker.check_in(3.25)
    assert worker.misses == 1
    assert worker.deadline == board.next_deadline == 4.25
    assert worker.status(3.25) is SERVING
    assert board.poll(3.25) is SERVING
    assert board.poll(4.25) is NOT_SERVING
    worker.check_in(4.5)
    assert worker.misses == 2
    assert board.poll(4.5) is SERVING


def test_a_recovered_component_that_checks_in_on_time_stays_serving() -> None:
    """After a miss and its recovery, check-ins in time change nothing: the recovery is
    counted once, so the board stays SERVING until the next deadline is missed."""
    board = HealthBoard()
    worker = board.register("worker", 1.0, now=0.0)
    assert board.poll(1.0) is NOT_SERVING
    worker.check_in(1.5)
    assert board.poll(1.5) is SERVING
    for now in (2.0, 2.5, 3.25):
        worker.check_in(now)
        assert board.poll(now) is None
        assert board.status(now) is SERVING
    assert (worker.misses, worker.deadline, board.next_deadline) == (1, 4.25, 4.25)
    assert board.poll(4.25) is NOT_SERVING
    worker.check_in(4.5)
    assert board.poll(4.5) is SERVING
    assert worker.misses == 2


def test_missed_says_whether_the_last_poll_counted_it_missed() -> None:
    """False from registration, and still False once the deadline has passed unpolled;
    True from the poll that reaches the deadline; False again after the recovering
    check-in, and after unregistering a missed component."""
    board = HealthBoard()
    worker = board.register("worker", 1.0, now=0.0)
    seen = [worker.missed]
    assert worker.status(1.0) is NOT_SERVING
    seen.append(worker.missed)  # no poll yet
    assert board.poll(1.0) is NOT_SERVING
    seen.append(worker.missed)
    worker.check_in(1.5)
    seen.append(worker.missed)
    assert board.poll(1.5) is SERVING
    assert board.poll(2.5) is NOT_SERVING
    seen.append(worker.missed)
    worker.unregister()
    seen.append(worker.missed)
    assert seen == [False, False, True, False, True, False]
    assert all(type(flag) is bool for flag in seen)


def test_a_check_in_at_exactly_the_deadline_is_a_miss() -> None:
    """The deadline is the first missed instant, so a check-in then is late (and recovers)."""
    board = HealthBoard()
    worker = board.register("worker", 1.0, now=0.0)
    worker.check_in(1.0)
    assert worker.misses == 1
    assert worker.deadline == 2.0
    assert board.poll(1.0) is None  # it never was missed as far as any poll saw


def test_check_ins_in_time_keep_it_serving_and_count_no_miss() -> None:
    """Each check-in before the deadline moves the deadline; the status never changes."""
    board = HealthBoard()
    worker = board.register("worker", 1.0, now=0.0)
    for now in (0.5, 1.25, 2.0, 2.999):
        worker.check_in(now)
        assert board.poll(now) is None
        assert worker.deadline == board.next_deadline == now + 1.0
    assert worker.misses == 0
    assert board.reported is SERVING


def test_a_check_in_never_moves_the_deadline_back() -> None:
    """A check-in at or before the last one is ignored."""
    board = HealthBoard()
    worker = board.register("worker", 1.0, now=5.0)
    worker.check_in(5.0)
    worker.check_in(4.0)
    assert worker.last_check_in == 5.0
    assert worker.deadline == 6.0


def test_a_check_in_at_the_instant_of_the_last_one_is_ignored() -> None:
    """Even when it would count: with a period below the clock's resolution at 1.0
    (2**-60 s), the deadline is 1.0 itself, so the component is missed from its
    registration, and a check-in at 1.0 still counts no miss and recovers nothing."""
    board = HealthBoard()
    worker = board.register("worker", 2**-60, now=1.0)
    assert worker.deadline == 1.0
    assert board.poll(1.0) is NOT_SERVING
    worker.check_in(1.0)
    assert (worker.misses, worker.last_check_in, worker.deadline) == (0, 1.0, 1.0)
    assert board.next_deadline == math.inf  # still counted missed: not back in the heap
    assert board.poll(1.0) is None


def test_a_degraded_component_only_degrades() -> None:
    """``when_missed=DEGRADED`` is what a missed component stands for."""
    board = HealthBoard()
    cache = board.register("cache", 1.0, when_missed=DEGRADED, now=0.0)
    assert cache.status(1.0) is DEGRADED
    assert board.status(1.0) is DEGRADED
    assert board.poll(1.0) is DEGRADED


# -- worst wins ------------------------------------------------------------------------


def test_worst_wins_across_components() -> None:
    """DEGRADED then NOT_SERVING as deadlines pass, and back down as each recovers."""
    board = HealthBoard()
    cache = board.register("cache", 1.0, when_missed=DEGRADED, now=0.0)
    db = board.register("db", 2.0, now=0.0)
    assert board.next_deadline == 1.0
    assert board.poll(1.0) is DEGRADED
    assert board.next_deadline == 2.0
    assert board.poll(2.0) is NOT_SERVING
    cache.check_in(2.5)  # the database is still missed
    assert board.poll(2.5) is None
    assert board.status(2.5) is NOT_SERVING
    db.check_in(2.75)
    assert board.poll(2.75) is SERVING
    assert board.next_deadline == 3.5
    # Missed together, recovered one at a time: the worst one decides.
    assert board.poll(5.0) is NOT_SERVING
    db.check_in(5.0)
    assert board.poll(5.0) is DEGRADED
    cache.check_in(5.0)
    assert board.poll(5.0) is SERVING


def test_worst_wins_with_the_application_status() -> None:
    """The application's status is a floor that components can only make worse."""
    board = HealthBoard()
    cache = board.register("cache", 1.0, when_missed=DEGRADED, now=0.0)
    board.set_status(DEGRADED)
    assert board.application_status is DEGRADED
    assert board.poll(0.0) is DEGRADED
    assert board.poll(1.0) is None  # DEGRADED either way
    board.set_status(NOT_SERVING)
    assert board.poll(1.0) is NOT_SERVING
    board.set_status(SERVING)
    assert board.poll(1.0) is DEGRADED  # the cache is still missed
    cache.check_in(1.5)
    assert board.poll(1.5) is SERVING
    board.set_status(NOT_SERVING)
    assert board.status(1.5) is NOT_SERVING
    assert board.poll(1.5) is NOT_SERVING


def test_a_board_starts_from_the_status_it_is_given() -> None:
    """The first poll announces nothing when nothing changed since the board was made."""
    board = HealthBoard(NOT_SERVING)
    assert board.reported is board.application_status is NOT_SERVING
    assert board.poll(0.0) is None
    assert board.status(0.0) is NOT_SERVING
    board.set_status(SERVING)
    assert board.poll(0.0) is SERVING


def test_status_of_a_missed_component_that_is_not_the_worst() -> None:
    """A DEGRADED component missed beside a NOT_SERVING one changes nothing."""
    board = HealthBoard()
    board.register("db", 1.0, now=0.0)
    board.register("cache", 2.0, when_missed=DEGRADED, now=0.0)
    assert board.status(2.0) is NOT_SERVING
    assert board.poll(2.0) is NOT_SERVING
    assert board.next_deadline == math.inf


# -- unregistering ---------------------------------------------------------------------


def test_unregistering_a_missed_component_recovers_the_board() -> None:
    """It no longer counts; its check-ins are ignored; unregistering twice is harmless."""
    board = HealthBoard()
    worker = board.register("worker", 1.0, now=0.0)
    assert board.poll(1.0) is NOT_SERVING
    worker.unregister()
    worker.unregister()
    assert not worker.registered
    assert "worker" not in board
    assert len(board) == 0
    assert board.poll(1.0) is SERVING
    worker.check_in(1.5)
    assert worker.last_check_in == 0.0
    assert board.status(9.0) is SERVING
    assert board.next_deadline == math.inf


def test_unregistering_by_name_and_registering_the_name_again() -> None:
    """The old component's deadline no longer counts; the new one's does."""
    board = HealthBoard()
    old = board.register("worker", 1.0, now=0.0)
    board.unregister("worker")
    assert board.next_deadline == math.inf
    new = board.register("worker", 3.0, now=0.5)
    assert board["worker"] is new
    assert board.next_deadline == 3.5
    assert board.poll(1.0) is None  # the old deadline passes unnoticed
    assert not old.registered
    assert new.registered
    with pytest.raises(KeyError):
        board.unregister("nobody")


def test_unregistered_entries_are_dropped_once_they_outnumber_the_live_ones() -> None:
    """Registering and unregistering forever keeps the board's memory bounded."""
    board = HealthBoard()
    keeper = board.register("keeper", 100.0, now=0.0)
    for n in range(1000):
        board.register(f"short-{n}", 1.0 + n, now=0.0).unregister()
        assert len(board._heap) <= 2 * len(board) + 17
    assert board.next_deadline == keeper.deadline == 100.0
    assert board.poll(99.0) is None
    assert board.poll(100.0) is NOT_SERVING


def test_the_heap_is_compacted_exactly_when_it_passes_twice_the_live_components_plus_16() -> None:
    """With one live component, each unregistered one leaves an entry behind: the heap
    grows to 18 entries (2 x 1 + 16) and the unregistering that would leave 19 drops
    every stale entry at once, leaving the live one's; and so on, every 18 unregisterings."""
    board = HealthBoard()
    board.register("keeper", 100.0, now=0.0)
    sizes: list[int] = []
    for n in range(40):
        board.register(f"short-{n}", 1.0 + n, now=0.0).unregister()
        sizes.append(len(board._heap))
    cycle = [*range(2, 19), 1]
    assert sizes == (cycle * 3)[:40]
    assert board.next_deadline == 100.0


def test_components_with_equal_deadlines_are_never_compared() -> None:
    """Heap entries of equal deadlines are told apart by a number that is never reused,
    whether the entry was pushed by a registration or renewed after a check-in: b (2.0)
    and c (2.0) share a deadline after a's entry was renewed, and polling past them works."""
    board = HealthBoard()
    a = board.register("a", 1.0, now=0.0)
    board.register("b", 2.0, now=0.0)
    a.check_in(0.5)
    assert board.next_deadline == 1.5  # a's entry renewed
    board.register("c", 1.0, now=1.0)
    assert board.poll(1.5) is NOT_SERVING  # a missed; b and c, both at 2.0, now at the top
    assert board.next_deadline == 2.0
    assert board.poll(2.0) is None
    assert board.next_deadline == math.inf
    assert [s.status for s in board.components(2.0)] == [NOT_SERVING] * 3


# -- next_deadline for a timer ---------------------------------------------------------


def test_next_deadline_follows_check_ins_and_registrations() -> None:
    """The earliest deadline not yet missed, wherever the check-ins moved it."""
    board = HealthBoard()
    assert board.next_deadline == math.inf
    a = board.register("a", 2.0, now=0.0)
    b = board.register("b", 3.0, now=0.0)
    assert board.next_deadline == 2.0
    a.check_in(1.5)  # a's deadline is now 3.5: b's comes first
    assert board.next_deadline == 3.0
    b.check_in(1.75)
    assert board.next_deadline == 3.5
    assert board.poll(3.5) is NOT_SERVING
    assert board.next_deadline == 4.75  # a is missed: only b is left
    board.register("c", 0.5, now=3.5)
    assert board.next_deadline == 4.0


def test_a_runtime_driven_by_one_timer_sees_every_change_at_its_instant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A timer that sleeps until next_deadline and polls, plus a poll after each check-in."""
    changes: list[tuple[float, HealthStatus]] = []

    async def main() -> None:
        board = HealthBoard()
        wake = trio.Event()

        def poll() -> None:
            status = board.poll(trio.current_time())
            if status is not None:
                changes.append((trio.current_time(), status))

        async def timer() -> None:
            nonlocal wake
            while True:
                with trio.move_on_at(board.next_deadline):
                    await wake.wait()
                wake = trio.Event()
                poll()

        async def worker(component: Component, pauses: list[float]) -> None:
            for pause in pauses:
                await trio.sleep(pause)
                component.check_in(trio.current_time())
                poll()
                wake.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(timer)
            db = board.register("db", 1.0, now=trio.current_time())
            cache = board.register("cache", 2.0, when_missed=DEGRADED, now=trio.current_time())
            wake.set()
            async with trio.open_nursery() as workers:
                # db: on time, then late (missed at 2.5, back at 3.75), then silent.
                workers.start_soon(worker, db, [0.75, 0.75, 2.25])
                # cache: missed at 2.0, back at 2.25, then silent.
                workers.start_soon(worker, cache, [2.25])
            await trio.sleep_until(10.0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=autojump_clock)
    assert changes == [
        (2.0, DEGRADED),
        (2.25, SERVING),
        (2.5, NOT_SERVING),
        (3.75, SERVING),
        (4.25, DEGRADED),
        (4.75, NOT_SERVING),
    ]


# -- observability ---------------------------------------------------------------------


def test_components_snapshot() -> None:
    """Name, period, last check-in, deadline, status and misses (the current one included)."""
    board = HealthBoard()
    worker = board.register("worker", 1.0, now=0.0)
    board.register("cache", 2.0, when_missed=DEGRADED, now=0.5)
    worker.check_in(1.5)  # one miss, recovered
    assert board.components(3.0) == (
        ComponentSnapshot("worker", 1.0, NOT_SERVING, 1.5, 2.5, NOT_SERVING, 2),
        ComponentSnapshot("cache", 2.0, DEGRADED, 0.5, 2.5, DEGRADED, 1),
    )
    assert board.components(2.0)[0].misses == 1
    assert board.components(2.0)[0].status is SERVING
    with pytest.raises(FrozenInstanceError):
        board.components(0.0)[0].misses = 0  # type: ignore[misc]


@pytest.mark.parametrize("field", ["name", "period", "when_missed", "deadline", "misses"])
def test_a_components_fields_are_read_only(field: str) -> None:
    """The board's heap and counts rely on them, so nothing outside may change them."""
    worker = HealthBoard().register("worker", 1.0, now=0.0)
    with pytest.raises(AttributeError):
        setattr(worker, field, 5.0)


def test_reprs() -> None:
    """What a log line shows of a board and a component."""
    board = HealthBoard()
    worker = board.register("worker", 1.5, when_missed=DEGRADED, now=1.0)
    assert repr(worker) == "<Component 'worker' every 1.5 s, deadline 2.5, DEGRADED when missed>"
    board.poll(3.0)
    assert repr(board) == (
        "<HealthBoard DEGRADED as last polled, application SERVING, 1 components>"
    )
    worker.unregister()
    assert repr(worker).endswith("DEGRADED when missed, unregistered>")


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("period", [0.0, -1.0, math.nan, math.inf])
def test_register_refuses_a_period_that_is_not_positive_and_finite(period: float) -> None:
    """ValueError, and nothing registered."""
    board = HealthBoard()
    with pytest.raises(ValueError, match="period"):
        board.register("worker", period, now=0.0)
    assert len(board) == 0


@pytest.mark.parametrize("name", ["", "x" * (MAX_NAME_LENGTH + 1)])
def test_register_refuses_an_empty_or_overlong_name(name: str) -> None:
    """Names are 1 to MAX_NAME_LENGTH characters; the longest is accepted."""
    board = HealthBoard()
    with pytest.raises(ValueError, match="name"):
        board.register(name, 1.0, now=0.0)
    assert board.register("x" * MAX_NAME_LENGTH, 1.0, now=0.0).name == "x" * MAX_NAME_LENGTH


def test_register_refuses_a_name_that_is_not_a_string() -> None:
    """TypeError, before anything else is looked at."""
    with pytest.raises(TypeError, match="str"):
        HealthBoard().register(b"worker", 1.0, now=0.0)  # type: ignore[arg-type]


def test_register_refuses_a_duplicate_name() -> None:
    """The first registration stays as it was."""
    board = HealthBoard()
    first = board.register("worker", 1.0, now=0.0)
    with pytest.raises(ValueError, match="already registered"):
        board.register("worker", 5.0, now=0.0)
    assert board["worker"] is first
    assert board.next_deadline == 1.0


def test_register_refuses_serving_as_when_missed() -> None:
    """A component that stands for SERVING when missed would mean nothing; ints are enums."""
    board = HealthBoard()
    refused = r"^when_missed must be DEGRADED or NOT_SERVING, not SERVING$"
    with pytest.raises(ValueError, match=refused):
        board.register("worker", 1.0, when_missed=SERVING, now=0.0)
    with pytest.raises(ValueError, match=refused):
        board.register("worker", 1.0, when_missed=0, now=0.0)  # type: ignore[arg-type]
    assert board.register("w", 1.0, when_missed=1, now=0.0).when_missed is DEGRADED  # type: ignore[arg-type]


def test_a_board_holds_at_most_max_components() -> None:
    """The limit is on components registered at once: unregistering frees a place."""
    assert HealthBoard().max_components == MAX_COMPONENTS == 1000
    board = HealthBoard(max_components=2)
    board.register("a", 1.0, now=0.0)
    board.register("b", 1.0, now=0.0)
    with pytest.raises(ValueError, match="2 components"):
        board.register("c", 1.0, now=0.0)
    board.unregister("a")
    board.register("c", 1.0, now=0.0)
    assert len(board) == 2


@pytest.mark.parametrize(
    ("limit", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_a_board_refuses_a_bad_limit(limit: object, error: type[Exception]) -> None:
    """max_components is a positive int."""
    with pytest.raises(error, match="max_components"):
        HealthBoard(max_components=limit)  # type: ignore[arg-type]


def test_set_status_refuses_what_is_not_a_health_status() -> None:
    """ValueError from the enum, and the status stays as it was."""
    board = HealthBoard()
    with pytest.raises(ValueError, match="7"):
        board.set_status(7)  # type: ignore[arg-type]
    assert board.application_status is SERVING


def test_doctests() -> None:
    results = doctest.testmod(_health)
    assert results.attempted > 0
    assert results.failed == 0


# -- against a model -------------------------------------------------------------------

NAMES = ["a", "b", "c", "d"]


class Model:
    """One registered component as the model sees it."""

    def __init__(self, now: float, period: float, when_missed: HealthStatus) -> None:
        self.last = now
        self.period = period
        self.when_missed = when_missed
        self.misses = 0

    @property
    def deadline(self) -> float:
        return self.last + self.period


class BoardMachine(RuleBasedStateMachine):
    """Random registrations, check-ins, unregistrations, status changes, polls and time."""

    def __init__(self) -> None:
        super().__init__()
        self.board = HealthBoard(max_components=3)
        self.components: dict[str, Component] = {}
        self.model: dict[str, Model] = {}
        self.application = SERVING
        self.now = 0.0
        self.last_poll = -math.inf
        self.reported = SERVING

    def expected(self) -> HealthStatus:
        worst = self.application
        for entry in self.model.values():
            if self.now >= entry.deadline:
                worst = max(worst, entry.when_missed)
        return worst

    # Quarter seconds, so that check-ins and polls land exactly on deadlines often.
    @rule(quarters=st.integers(min_value=0, max_value=12))
    def advance(self, quarters: int) -> None:
        self.now += quarters / 4

    @rule(
        name=st.sampled_from(NAMES),
        quarters=st.integers(min_value=1, max_value=10),
        when_missed=st.sampled_from([DEGRADED, NOT_SERVING]),
    )
    def register(self, name: str, quarters: int, when_missed: HealthStatus) -> None:
        period = quarters / 4
        if name in self.model or len(self.model) == 3:
            with pytest.raises(ValueError, match=r"already registered|3 components"):
                self.board.register(name, period, when_missed=when_missed, now=self.now)
            return
        self.components[name] = self.board.register(
            name, period, when_missed=when_missed, now=self.now
        )
        self.model[name] = Model(self.now, period, when_missed)

    @precondition(lambda self: bool(self.components))
    @rule(data=st.data())
    def check_in(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.components)))
        self.components[name].check_in(self.now)
        entry = self.model.get(name)
        if entry is not None and self.now > entry.last:
            entry.misses += self.now >= entry.deadline
            entry.last = self.now

    @precondition(lambda self: bool(self.components))
    @rule(data=st.data(), by_name=st.booleans())
    def unregister(self, data: st.DataObject, by_name: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.components)))
        if name not in self.model:
            self.components[name].unregister()  # again: harmless
        elif by_name:
            self.board.unregister(name)
        else:
            self.components[name].unregister()
        self.model.pop(name, None)

    @rule(status=st.sampled_from(list(HealthStatus)))
    def set_status(self, status: HealthStatus) -> None:
        self.board.set_status(status)
        self.application = status

    @rule()
    def poll(self) -> None:
        expected = self.expected()
        changed = self.board.poll(self.now)
        assert changed == (expected if expected is not self.reported else None)
        self.reported = expected
        self.last_poll = self.now

    @rule()
    def poll_at_next_deadline(self) -> None:
        deadline = self.board.next_deadline
        if self.now <= deadline < math.inf:
            self.now = deadline
            self.poll()

    @invariant()
    def status_is_the_models(self) -> None:
        assert self.board.status(self.now) is self.expected()
        assert self.board.reported is self.reported

    @invariant()
    def next_deadline_is_the_earliest_live_deadline_after_the_last_poll(self) -> None:
        live = [e.deadline for e in self.model.values() if e.deadline > self.last_poll]
        assert self.board.next_deadline == min(live, default=math.inf)
        assert self.board.next_deadline > self.last_poll

    @invariant()
    def snapshots_are_the_models(self) -> None:
        assert [
            (s.name, s.period, s.when_missed, s.last_check_in, s.deadline, s.misses)
            for s in self.board.components(self.now)
        ] == [
            (
                name,
                e.period,
                e.when_missed,
                e.last,
                e.deadline,
                e.misses + (self.now >= e.deadline),
            )
            for name, e in self.model.items()
        ]
        assert len(self.board._heap) <= 2 * len(self.board) + 17


BoardMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, database=None)
TestBoardMachine = BoardMachine.TestCase
