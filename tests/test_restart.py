"""The restart plan (``RestartPlan`` in ``_restart.py``): a supervisor's decisions, sans-IO.

A table covers every strategy with every restart type and exit kind of the
child that exits, among siblings of each restart type. Example tests pin the
budget exactly (the N+1th restart within the period gives up, one just after
it does not, the window slides), ends the supervisor caused (``stopped``),
overlapping decisions, dynamic children, shutting down and every error. A
hypothesis state machine drives random starts, exits, stops, additions,
removals and time against a model that keeps a plain list of children.
"""

from __future__ import annotations

import doctest
import math
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from trio_heartbeat import _restart
from trio_heartbeat._restart import (
    DEFAULT_RESTART_BUDGET,
    ChildState,
    Decision,
    ExitKind,
    RestartBudget,
    RestartPlan,
    RestartType,
    Strategy,
)

PERMANENT, TRANSIENT, TEMPORARY = (
    RestartType.PERMANENT,
    RestartType.TRANSIENT,
    RestartType.TEMPORARY,
)
NORMAL, FAILED, HUNG = ExitKind.NORMAL, ExitKind.FAILED, ExitKind.HUNG
ONE_FOR_ONE, ONE_FOR_ALL, REST_FOR_ONE = (
    Strategy.ONE_FOR_ONE,
    Strategy.ONE_FOR_ALL,
    Strategy.REST_FOR_ONE,
)


def running_plan(
    children: list[tuple[str, RestartType]],
    strategy: Strategy = ONE_FOR_ONE,
    budget: RestartBudget = DEFAULT_RESTART_BUDGET,
) -> RestartPlan:
    """A plan whose children have all been started."""
    plan = RestartPlan(children, strategy, budget)
    for name in plan.pending:
        plan.started(name)
    return plan


def carry_out(plan: RestartPlan, decision: Decision) -> None:
    """Do what a runtime does with a decision: stop, then start."""
    for name in decision.stop:
        plan.stopped(name)
    for name in decision.start:
        plan.started(name)


# -- every strategy, restart type and exit kind -----------------------------------------

# The siblings: x before the child y that exits, z (transient) and w (temporary) after it.
# What a restart of y does, by strategy: (stop, start, removed).
RESTART = {
    ONE_FOR_ONE: ((), ("y",), ()),
    ONE_FOR_ALL: (("w", "z", "x"), ("x", "y", "z"), ("w",)),
    REST_FOR_ONE: (("w", "z"), ("y", "z"), ("w",)),
}
RESTARTED = {
    (PERMANENT, NORMAL): True,
    (PERMANENT, FAILED): True,
    (PERMANENT, HUNG): True,
    (TRANSIENT, NORMAL): False,
    (TRANSIENT, FAILED): True,
    (TRANSIENT, HUNG): True,
    (TEMPORARY, NORMAL): False,
    (TEMPORARY, FAILED): False,
    (TEMPORARY, HUNG): False,
}


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize(("restart_type", "kind"), list(RESTARTED))
def test_each_strategy_with_each_restart_type_and_exit_kind(
    strategy: Strategy, restart_type: RestartType, kind: ExitKind
) -> None:
    """Whether y is restarted depends on its type and how it ended; who goes with it on the
    strategy; the siblings stop last-started first, everyone starts in start order, and a
    temporary sibling stopped on the way is not started again."""
    plan = running_plan(
        [("x", PERMANENT), ("y", restart_type), ("z", TRANSIENT), ("w", TEMPORARY)], strategy
    )
    decision = plan.child_exited("y", kind, now=1.0)
    assert decision.child == "y"
    assert decision.kind is kind
    assert decision.give_up is False
    if RESTARTED[restart_type, kind]:
        stop, start, removed = RESTART[strategy]
        assert (decision.stop, decision.start, decision.removed) == (stop, start, removed)
        assert decision.restarts_in_window == 1
        assert "restarting" in decision.reason
        assert plan.stopping == tuple(sorted(stop, key="xyzw".index))
        assert plan.pending == ("y",)
        carry_out(plan, decision)
        assert plan.running == tuple(n for n in "xyzw" if n not in removed)
        assert plan.statistics(1.0).restarts == 1
        assert plan.statistics(1.0).children_restarted == len(start)
    else:
        assert (decision.stop, decision.start, decision.removed) == ((), (), ("y",))
        assert decision.restarts_in_window == 0
        assert "not restarted" in decision.reason
        assert plan.running == ("x", "z", "w")
        assert "y" not in plan
        assert plan.statistics(1.0).restarts == 0
    assert plan.statistics(1.0).exits == 1
    assert plan.statistics(1.0).abnormal_exits == (kind is not NORMAL)


def test_exit_kinds_know_which_are_abnormal() -> None:
    """FAILED and HUNG are abnormal, NORMAL is not."""
    assert [kind.abnormal for kind in ExitKind] == [False, True, True]


def test_the_first_child_under_rest_for_one_takes_everyone_with_it() -> None:
    """REST_FOR_ONE from the first child is ONE_FOR_ALL; from the last, ONE_FOR_ONE."""
    plan = running_plan([("a", PERMANENT), ("b", PERMANENT), ("c", PERMANENT)], REST_FOR_ONE)
    first = plan.child_exited("a", FAILED, now=0.0)
    assert (first.stop, first.start) == (("c", "b"), ("a", "b", "c"))
    carry_out(plan, first)
    last = plan.child_exited("c", FAILED, now=0.0)
    assert (last.stop, last.start) == ((), ("c",))


# -- the budget --------------------------------------------------------------------------


def test_the_budget_defaults_and_checks() -> None:
    """3 restarts in 5 s by default; a bad count or period is refused with its type."""
    assert RestartBudget(3, 5.0) == DEFAULT_RESTART_BUDGET
    assert RestartBudget(0, 1).period == 1
    for bad in (True, 1.0, "3"):
        with pytest.raises(TypeError, match="max_restarts"):
            RestartBudget(max_restarts=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 0"):
        RestartBudget(max_restarts=-1)
    for bad_type in (True, "5"):
        with pytest.raises(TypeError, match="period"):
            RestartBudget(period=bad_type)  # type: ignore[arg-type]
    for bad_value in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive, finite"):
            RestartBudget(period=bad_value)
    with pytest.raises(FrozenInstanceError):
        DEFAULT_RESTART_BUDGET.period = 1.0  # type: ignore[misc]


def crash_at(plan: RestartPlan, *times: float) -> list[Decision]:
    decisions = []
    for now in times:
        decision = plan.child_exited("a", FAILED, now=now)
        decisions.append(decision)
        if not decision.give_up:
            carry_out(plan, decision)
    return decisions


def test_the_n_plus_first_restart_within_the_period_gives_up() -> None:
    """Three restarts in 5 s are made; a fourth exactly 5 s after the first is one too many
    (a restart exactly ``period`` old still counts, as in OTP)."""
    plan = running_plan([("a", PERMANENT), ("b", TRANSIENT), ("c", TEMPORARY)], ONE_FOR_ONE)
    *made, last = crash_at(plan, 0.0, 1.0, 2.0, 5.0)
    assert [d.restarts_in_window for d in made] == [1, 2, 3]
    assert not any(d.give_up for d in made)
    assert last.give_up is True
    assert (last.child, last.kind) == ("a", FAILED)
    assert last.restarts_in_window == 4
    assert (
        last.reason
        == "'a' failed; 3 restart(s) within 5.0 s already, as many as the budget allows: giving up"
    )
    assert last.stop == ("c", "b")
    assert last.start == ()
    assert last.removed == ("a", "b", "c")
    assert plan.given_up
    assert plan.closed
    assert plan.running == ()
    assert plan.stopping == ("b", "c")
    stats = plan.statistics(5.0)
    assert (stats.restarts, stats.restart_times, stats.given_up) == (3, (0.0, 1.0, 2.0), True)


def test_a_restart_just_after_the_period_does_not_give_up_and_the_window_slides() -> None:
    """Past 5 s the first restart is forgotten; the next ones are judged by the last 5 s only."""
    plan = running_plan([("a", PERMANENT)], ONE_FOR_ONE)
    just_after = 5.0 + 2**-20
    decisions = crash_at(plan, 0.0, 1.0, 2.0, just_after, 6.0 + 2**-20, 7.0)
    assert [d.give_up for d in decisions] == [False, False, False, False, False, True]
    assert [d.restarts_in_window for d in decisions] == [1, 2, 3, 3, 3, 4]
    assert plan.statistics(7.0).restart_times == (2.0, just_after, 6.0 + 2**-20)
    assert plan.statistics(100.0).restart_times == ()


def test_a_budget_of_zero_gives_up_at_the_first_restart_only() -> None:
    """With max_restarts=0, ends that call for no restart still pass; the first restart gives up."""
    plan = running_plan([("t", TEMPORARY), ("r", TRANSIENT), ("p", PERMANENT)], ONE_FOR_ONE,
                        RestartBudget(max_restarts=0))  # fmt: skip
    assert not plan.child_exited("t", FAILED, now=0.0).give_up
    assert not plan.child_exited("r", NORMAL, now=0.0).give_up
    last = plan.child_exited("p", NORMAL, now=0.0)
    assert last.give_up
    assert (last.child, last.kind) == ("p", NORMAL)


def test_a_restart_of_everyone_counts_once() -> None:
    """A ONE_FOR_ALL restart of three children is one restart against the budget."""
    plan = running_plan([("a", PERMANENT), ("b", PERMANENT), ("c", PERMANENT)], ONE_FOR_ALL,
                        RestartBudget(max_restarts=2, period=10.0))  # fmt: skip
    first = plan.child_exited("b", FAILED, now=0.0)
    carry_out(plan, first)
    second = plan.child_exited("c", HUNG, now=1.0)
    assert second.restarts_in_window == 2
    assert not second.give_up
    carry_out(plan, second)
    assert plan.child_exited("a", FAILED, now=2.0).give_up
    stats = plan.statistics(2.0)
    assert (stats.restarts, stats.children_restarted, stats.exits) == (2, 6, 3)


def test_ends_that_are_not_restarted_never_count() -> None:
    """A temporary child's end, or a transient one's normal end, leaves the budget alone."""
    children = [(f"t{i}", TEMPORARY) for i in range(5)] + [(f"r{i}", TRANSIENT) for i in range(5)]
    plan = running_plan(children, ONE_FOR_ALL, RestartBudget(max_restarts=1))
    for i in range(5):
        assert plan.child_exited(f"t{i}", FAILED, now=0.0).stop == ()
        assert plan.child_exited(f"r{i}", NORMAL, now=0.0).stop == ()
    assert len(plan) == 0
    assert plan.statistics(0.0).restarts == 0


def test_an_end_that_is_not_restarted_reports_the_window_as_it_stands() -> None:
    """Its ``restarts_in_window`` counts the earlier restarts still in the window, the one
    exactly ``period`` old included, and none once it has slid past."""
    plan = running_plan([("a", PERMANENT), ("t", TEMPORARY), ("u", TEMPORARY)], ONE_FOR_ONE)
    carry_out(plan, plan.child_exited("a", FAILED, now=1.0))
    at_the_edge = plan.child_exited("t", FAILED, now=6.0)  # the restart at 1.0 is 5 s old
    assert at_the_edge.restarts_in_window == 1
    assert at_the_edge.give_up is False
    assert plan.child_exited("u", NORMAL, now=6.5).restarts_in_window == 0


def test_every_exit_and_every_abnormal_one_is_counted() -> None:
    """``exits`` and ``abnormal_exits`` add up over decisions of every kind."""
    plan = running_plan([("a", PERMANENT), ("b", TRANSIENT), ("t", TEMPORARY)], ONE_FOR_ONE,
                        RestartBudget(max_restarts=10))  # fmt: skip
    carry_out(plan, plan.child_exited("a", FAILED, now=0.0))
    carry_out(plan, plan.child_exited("a", HUNG, now=1.0))
    carry_out(plan, plan.child_exited("a", NORMAL, now=2.0))
    carry_out(plan, plan.child_exited("b", HUNG, now=3.0))
    plan.child_exited("t", FAILED, now=4.0)
    stats = plan.statistics(4.0)
    assert (stats.exits, stats.abnormal_exits) == (5, 4)


def test_giving_up_drops_children_waiting_to_start() -> None:
    """On giving up, a PENDING child is not stopped (it never ran) and leaves at once."""
    plan = running_plan([("a", PERMANENT), ("b", PERMANENT)], ONE_FOR_ONE, RestartBudget(2))
    carry_out(plan, plan.child_exited("a", FAILED, now=0.0))
    plan.child_exited("b", FAILED, now=0.0)  # restarted, not started yet
    assert plan.pending == ("b",)
    decision = plan.child_exited("a", FAILED, now=0.5)
    assert decision.give_up
    assert (decision.child, decision.kind) == ("a", FAILED)
    assert (decision.stop, decision.removed) == ((), ("a", "b"))
    assert len(plan) == 0


def test_a_plan_that_gave_up_refuses_exits_and_children_but_takes_stops() -> None:
    """After giving up, only the ends of the children it is stopping are taken."""
    plan = running_plan([("a", PERMANENT), ("b", PERMANENT)], ONE_FOR_ONE, RestartBudget(0))
    assert plan.child_exited("a", FAILED, now=0.0).give_up
    with pytest.raises(ValueError, match="'b' exited, but the plan gave up"):
        plan.child_exited("b", FAILED, now=1.0)
    with pytest.raises(ValueError, match="cannot add 'c': the plan gave up"):
        plan.add("c", PERMANENT)
    plan.stopped("b")
    assert len(plan) == 0
    assert plan.shutdown() == ()
    assert repr(plan) == "<RestartPlan one_for_one, 0 children, 0 restarts, given up>"


# -- ends the supervisor caused ----------------------------------------------------------


def test_the_end_of_a_child_being_stopped_is_not_an_exit() -> None:
    """Siblings a decision stops are STOPPING: their ends go to ``stopped`` and count nothing,
    however they ended; reporting them as exits is refused."""
    plan = running_plan([("a", PERMANENT), ("b", TRANSIENT)], ONE_FOR_ALL)
    decision = plan.child_exited("a", FAILED, now=0.0)
    assert plan.state("b") is ChildState.STOPPING
    with pytest.raises(ValueError, match="'b' is being stopped: report its end with stopped"):
        plan.child_exited("b", FAILED, now=0.0)
    carry_out(plan, decision)
    stats = plan.statistics(0.0)
    assert (stats.exits, stats.restarts) == (1, 1)
    assert plan.running == ("a", "b")


def test_stopped_is_only_for_children_being_stopped() -> None:
    """A RUNNING or PENDING child's end is not a stop the plan asked for."""
    plan = RestartPlan([("a", PERMANENT), ("b", PERMANENT)], ONE_FOR_ONE)
    plan.started("a")
    with pytest.raises(ValueError, match="'a' is running, not stopping"):
        plan.stopped("a")
    with pytest.raises(ValueError, match="'b' is pending, not stopping"):
        plan.stopped("b")


def test_an_exit_reported_twice_is_refused() -> None:
    """After an exit, the restarted child is PENDING: a second report of the same end is an error,
    and so is starting a child twice."""
    plan = running_plan([("a", PERMANENT)])
    plan.child_exited("a", FAILED, now=0.0)
    with pytest.raises(
        ValueError, match="'a' is pending, not running: was its exit reported twice"
    ):
        plan.child_exited("a", FAILED, now=0.0)
    plan.started("a")
    with pytest.raises(ValueError, match="'a' is running, not pending: it cannot be started"):
        plan.started("a")


def test_decisions_may_overlap() -> None:
    """A child that exits while an earlier restart waits to start: the new decision stops only
    RUNNING siblings and starts only those it restarts; the earlier fates stand."""
    plan = running_plan(
        [("a", PERMANENT), ("b", PERMANENT), ("c", PERMANENT), ("d", TEMPORARY)], ONE_FOR_ALL
    )
    first = plan.child_exited("a", FAILED, now=0.0)
    assert first.stop == ("d", "c", "b")
    plan.stopped("b")  # c and d still being stopped, a and b pending
    # Nothing is RUNNING now; start b only, and let it fail at once.
    plan.started("b")
    second = plan.child_exited("b", FAILED, now=0.0)
    assert (second.stop, second.start, second.removed) == ((), ("b",), ())
    assert plan.pending == ("a", "b")
    assert plan.stopping == ("c", "d")
    plan.stopped("c")
    plan.stopped("d")
    assert plan.state("c") is ChildState.PENDING
    assert plan.children == ("a", "b", "c")
    assert "d" not in plan


def test_a_running_sibling_is_stopped_while_a_restarted_child_waits() -> None:
    """REST_FOR_ONE: the later exit's decision leaves an earlier child that is PENDING alone."""
    plan = running_plan([("a", PERMANENT), ("b", PERMANENT), ("c", PERMANENT)], REST_FOR_ONE)
    carry_out(plan, plan.child_exited("c", FAILED, now=0.0))
    plan.child_exited("b", FAILED, now=0.0)  # stop c, start b and c
    plan.stopped("c")
    plan.started("b")
    assert plan.pending == ("c",)
    decision = plan.child_exited("a", FAILED, now=0.0)
    assert (decision.stop, decision.start) == (("b",), ("a", "b"))


# -- dynamic children and shutting down ------------------------------------------------------


def test_added_children_start_last() -> None:
    """An added child is PENDING and last in start order; added again after it left, last again."""
    plan = running_plan([("a", PERMANENT), ("b", TEMPORARY)], REST_FOR_ONE)
    plan.add("c", PERMANENT)
    assert plan.pending == ("c",)
    assert plan.children == ("a", "b", "c")
    assert plan.restart_type("c") is PERMANENT
    plan.started("c")
    plan.child_exited("b", FAILED, now=0.0)
    plan.add("b", TRANSIENT)
    assert plan.children == ("a", "c", "b")
    plan.started("b")
    decision = plan.child_exited("a", HUNG, now=1.0)
    assert (decision.stop, decision.start) == (("b", "c"), ("a", "c", "b"))


def test_removing_a_child_in_each_state() -> None:
    """A PENDING child leaves at once; a RUNNING one is stopped first (True); a STOPPING one is
    not started again once stopped."""
    plan = RestartPlan([("a", PERMANENT), ("b", PERMANENT), ("c", PERMANENT)], ONE_FOR_ALL)
    assert plan.remove("a") is False
    assert "a" not in plan
    plan.started("b")
    plan.started("c")
    assert plan.remove("b") is True
    assert plan.stopping == ("b",)
    plan.stopped("b")
    assert plan.children == ("c",)
    plan.add("d", PERMANENT)
    plan.started("d")
    decision = plan.child_exited("c", FAILED, now=0.0)
    assert decision.stop == ("d",)
    assert plan.remove("d") is False
    plan.stopped("d")
    assert plan.children == ("c",)
    assert plan.pending == ("c",)


def test_shutdown_stops_everyone_last_started_first() -> None:
    """Shutting down stops the RUNNING children in reverse start order, drops the PENDING ones,
    cancels the restarts of those being stopped, and closes the plan; a second call adds nothing."""
    plan = running_plan([("a", PERMANENT), ("b", PERMANENT), ("c", PERMANENT), ("d", PERMANENT)],
                        REST_FOR_ONE)  # fmt: skip
    plan.child_exited("c", FAILED, now=0.0)  # stop d, start c and d
    assert plan.shutdown() == ("b", "a")
    assert plan.closed
    assert not plan.given_up
    assert plan.stopping == ("a", "b", "d")
    assert plan.shutdown() == ()
    for name in ("a", "b", "d"):
        plan.stopped(name)
    assert len(plan) == 0
    with pytest.raises(ValueError, match="'a' exited, but the plan was shut down"):
        plan.child_exited("a", FAILED, now=0.0)
    with pytest.raises(ValueError, match="the plan was shut down"):
        plan.add("e", PERMANENT)
    assert repr(plan) == "<RestartPlan rest_for_one, 0 children, 1 restarts, shut down>"


# -- errors ----------------------------------------------------------------------------------


def test_bad_construction_is_refused() -> None:
    """Wrong types raise TypeError; an empty or repeated name ValueError."""
    with pytest.raises(TypeError, match="strategy must be from Strategy"):
        RestartPlan([], "one_for_one")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="budget must be a RestartBudget"):
        RestartPlan([], ONE_FOR_ONE, (3, 5.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="restart_type must be from RestartType"):
        RestartPlan([("a", "permanent")], ONE_FOR_ONE)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="a child's name must be a str"):
        RestartPlan([(1, PERMANENT)], ONE_FOR_ONE)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^a child's name must not be empty$"):
        RestartPlan([("", PERMANENT)], ONE_FOR_ONE)
    with pytest.raises(ValueError, match="already has a child named 'a'"):
        RestartPlan([("a", PERMANENT), ("a", TEMPORARY)], ONE_FOR_ONE)


def test_unknown_names_and_bad_reports_are_refused() -> None:
    """Every call that names a child says so when there is none; an exit needs an ExitKind and a
    finite time that does not go back."""
    plan = running_plan([("a", PERMANENT)])
    calls: list[Any] = [
        lambda: plan.child_exited("x", FAILED, now=0.0),
        lambda: plan.started("x"),
        lambda: plan.stopped("x"),
        lambda: plan.remove("x"),
        lambda: plan.state("x"),
        lambda: plan.restart_type("x"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="the plan has no child named 'x'"):
            call()
    with pytest.raises(TypeError, match="kind must be from ExitKind"):
        plan.child_exited("a", "failed", now=0.0)  # type: ignore[arg-type]
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite time"):
            plan.child_exited("a", FAILED, now=bad)
    carry_out(plan, plan.child_exited("a", FAILED, now=2.0))
    with pytest.raises(ValueError, match=r"time went back: now=1\.0 after 2\.0"):
        plan.child_exited("a", FAILED, now=1.0)
    assert plan.state("a") is ChildState.RUNNING  # the refused report changed nothing
    assert plan.statistics(2.0).exits == 1


# -- small things ------------------------------------------------------------------------------


def test_reading_a_plan() -> None:
    """len, in, repr, the frozen decision and the reasons for the log."""
    plan = running_plan([("a", PERMANENT), ("b", TRANSIENT)], ONE_FOR_ALL)
    assert len(plan) == 2
    assert "a" in plan
    assert "z" not in plan
    assert 3 not in plan
    assert repr(plan) == "<RestartPlan one_for_all, 2 children, 0 restarts>"
    decision = plan.child_exited("b", HUNG, now=0.0)
    assert decision.reason == "'b' hung; restarting 'a', 'b' (one_for_all)"
    with pytest.raises(FrozenInstanceError):
        decision.give_up = True  # type: ignore[misc]
    carry_out(plan, decision)
    assert plan.child_exited("b", NORMAL, now=0.0).reason == (
        "'b' returned; it is transient: not restarted"
    )
    assert repr(plan) == "<RestartPlan one_for_all, 1 children, 1 restarts>"


def test_doctests() -> None:
    results = doctest.testmod(_restart)
    assert results.attempted > 0
    assert results.failed == 0


# -- against a model -----------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e"]


class Model:
    """A plain list of [name, type, state, restarted-after-stop], in start order."""

    def __init__(self) -> None:
        self.children: list[list[Any]] = []

    def find(self, name: str) -> list[Any] | None:
        return next((c for c in self.children if c[0] == name), None)

    def named(self, state: str) -> tuple[str, ...]:
        return tuple(c[0] for c in self.children if c[2] == state)


class PlanMachine(RuleBasedStateMachine):
    """Random starts, exits, stops, additions, removals, shutdowns and time, against ``Model``."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.model = Model()
        self.accepted: list[float] = []
        self.temporaries_started: set[str] = set()
        self.closed = False
        self.given_up = False

    @initialize(
        strategy=st.sampled_from(list(Strategy)),
        max_restarts=st.integers(0, 4),
        quarters=st.integers(1, 12),
        children=st.lists(
            st.tuples(st.sampled_from(NAMES), st.sampled_from(list(RestartType))),
            unique_by=lambda c: c[0],
        ),
    )
    def build(
        self,
        strategy: Strategy,
        max_restarts: int,
        quarters: int,
        children: list[tuple[str, RestartType]],
    ) -> None:
        self.strategy = strategy
        self.budget = RestartBudget(max_restarts, quarters / 4)
        self.plan = RestartPlan(children, strategy, self.budget)
        self.model.children = [[n, t, "pending", False] for n, t in children]

    @rule(quarters=st.integers(0, 12))
    def advance(self, quarters: int) -> None:
        self.now += quarters / 4

    @precondition(lambda self: bool(self.model.named("pending")))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        self.start_one(data.draw(st.sampled_from(self.model.named("pending"))))

    def start_one(self, name: str) -> None:
        self.plan.started(name)
        child = self.model.find(name)
        assert child is not None
        child[2] = "running"
        if child[1] is TEMPORARY:
            # A temporary child is started once, when it is added.
            assert name not in self.temporaries_started
            self.temporaries_started.add(name)

    @rule()
    def carry_everything_out(self) -> None:
        """What a runtime that finishes each decision before the next does: stop, then start."""
        for name in self.model.named("stopping"):
            self.stop_one(name)
        for name in self.model.named("pending"):
            self.start_one(name)

    @precondition(lambda self: bool(self.model.named("stopping")))
    @rule(data=st.data())
    def stop(self, data: st.DataObject) -> None:
        self.stop_one(data.draw(st.sampled_from(self.model.named("stopping"))))

    def stop_one(self, name: str) -> None:
        self.plan.stopped(name)
        child = self.model.find(name)
        assert child is not None
        if child[3]:
            child[2], child[3] = "pending", False
        else:
            self.model.children.remove(child)

    @rule(name=st.sampled_from(NAMES), restart_type=st.sampled_from(list(RestartType)))
    def add(self, name: str, restart_type: RestartType) -> None:
        if self.model.find(name) is not None or self.closed:
            with pytest.raises(ValueError, match=r"already has|cannot add"):
                self.plan.add(name, restart_type)
            return
        self.plan.add(name, restart_type)
        self.model.children.append([name, restart_type, "pending", False])
        self.temporaries_started.discard(name)

    @rule(name=st.sampled_from(NAMES))
    def remove(self, name: str) -> None:
        child = self.model.find(name)
        if child is None:
            with pytest.raises(ValueError, match="no child named"):
                self.plan.remove(name)
            return
        must_stop = self.plan.remove(name)
        assert must_stop == (child[2] == "running")
        if child[2] == "pending":
            self.model.children.remove(child)
        else:
            child[2], child[3] = "stopping", False

    # Rarely: it ends everything that follows.
    @rule(roll=st.integers(0, 9))
    def shutdown(self, roll: int) -> None:
        if roll:
            return
        expected = tuple(reversed(self.model.named("running")))
        assert self.plan.shutdown() == expected
        self.shut_everything()
        self.closed = True

    def shut_everything(self) -> None:
        for child in list(self.model.children):
            if child[2] == "pending":
                self.model.children.remove(child)
            else:
                child[2], child[3] = "stopping", False

    @rule(name=st.sampled_from(NAMES), kind=st.sampled_from(list(ExitKind)))
    def exit_of_a_child_not_running(self, name: str, kind: ExitKind) -> None:
        child = self.model.find(name)
        if self.closed or child is None or child[2] != "running":
            with pytest.raises(ValueError, match=rf"plan|{name!r} is"):
                self.plan.child_exited(name, kind, now=self.now)

    @precondition(lambda self: bool(self.model.named("running")))
    @rule(data=st.data(), kind=st.sampled_from(list(ExitKind)))
    def exit(self, data: st.DataObject, kind: ExitKind) -> None:
        name = data.draw(st.sampled_from(self.model.named("running")))
        child = self.model.find(name)
        assert child is not None
        decision = self.plan.child_exited(name, kind, now=self.now)
        assert (decision.child, decision.kind) == (name, kind)
        restart = child[1] is PERMANENT or (child[1] is TRANSIENT and kind is not NORMAL)
        if not restart:
            assert (decision.stop, decision.start, decision.removed) == ((), (), (name,))
            assert not decision.give_up
            self.model.children.remove(child)
            return
        recent = [t for t in self.accepted if self.now - t <= self.budget.period]
        if len(recent) + 1 > self.budget.max_restarts:
            assert decision.give_up
            assert decision.start == ()
            assert decision.removed == tuple(c[0] for c in self.model.children)
            self.model.children.remove(child)
            assert decision.stop == tuple(reversed(self.model.named("running")))
            self.shut_everything()
            self.closed = self.given_up = True
            return
        assert not decision.give_up
        self.accepted.append(self.now)
        names = [c[0] for c in self.model.children]
        if self.strategy is ONE_FOR_ONE:
            group = [child]
        elif self.strategy is ONE_FOR_ALL:
            group = list(self.model.children)
        else:
            group = self.model.children[names.index(name) :]
        stop = [c for c in group if c is not child and c[2] == "running"]
        assert decision.stop == tuple(c[0] for c in reversed(stop))
        assert decision.start == tuple(
            c[0] for c in group if c is child or (c in stop and c[1] is not TEMPORARY)
        )
        assert decision.removed == tuple(c[0] for c in stop if c[1] is TEMPORARY)
        child[2] = "pending"
        for c in stop:
            c[2], c[3] = "stopping", c[1] is not TEMPORARY

    @invariant()
    def the_children_are_the_models(self) -> None:
        if not hasattr(self, "plan"):
            return
        assert self.plan.children == tuple(c[0] for c in self.model.children)
        for state in ChildState:
            assert getattr(self.plan, state.value) == self.model.named(state.value)
        assert self.plan.closed == self.closed
        assert self.plan.given_up == self.given_up

    @invariant()
    def no_window_holds_more_than_the_budget(self) -> None:
        if not hasattr(self, "plan"):
            return
        for t in self.accepted:
            inside = [u for u in self.accepted if t <= u <= t + self.budget.period]
            assert len(inside) <= self.budget.max_restarts
        stats = self.plan.statistics(self.now)
        assert stats.restarts == len(self.accepted)
        assert stats.restart_times == tuple(
            t for t in self.accepted if self.now - t <= self.budget.period
        )
        assert stats.given_up == self.given_up


PlanMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, database=None)
TestPlanMachine = PlanMachine.TestCase
