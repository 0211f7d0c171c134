"""The restart plan: which children a supervisor stops and starts when one exits (sans-IO).

Theory of operation
-------------------
A supervisor runs *children*, each started in a fixed order, and must decide
what to do when one of them ends. This module makes that decision and keeps
the bookkeeping; it starts, stops and awaits nothing. It follows Erlang/OTP's
supervisor, with its words:

* the **restart type** of a child says whether its end calls for a restart:
  PERMANENT always, TRANSIENT only after an abnormal end (it raised, or hung
  and was cancelled), TEMPORARY never. A child that is not restarted leaves
  the plan, and nothing else happens to its siblings;
* the **strategy** says who else goes with a child that is restarted:
  ONE_FOR_ONE nobody, ONE_FOR_ALL every other child, REST_FOR_ONE the children
  started after it (they may depend on it). The siblings are stopped first,
  the last started first, and then everyone is started again in start order,
  except TEMPORARY siblings: stopped, they leave the plan, as in OTP;
* the **budget** (:class:`RestartBudget`, OTP's intensity and period) bounds
  how often that may happen: each decision that restarts anything counts once
  (a ONE_FOR_ALL restart of five children is one restart), and a restart that
  would make more than ``max_restarts`` within any ``period`` seconds is not
  made. The plan *gives up* instead: every running child is to be stopped,
  nothing started, and the supervisor should end with an error, for its
  parent (or systemd) to handle. The window slides: a restart older than
  ``period`` seconds is forgotten, and one exactly ``period`` seconds old
  still counts, as in OTP.

Each child of a :class:`RestartPlan` is in one of three states:

=========  ================================================================
PENDING    to be started: every child when the plan is made or added, and
           every child a decision restarts; :meth:`~RestartPlan.started`
           says its task is running
RUNNING    its end is news: :meth:`~RestartPlan.child_exited` reports it
STOPPING   the plan asked for it to be stopped (a decision, :meth:`~RestartPlan.remove`
           or :meth:`~RestartPlan.shutdown`); :meth:`~RestartPlan.stopped`
           reports its end, which is expected and never counts as an exit
=========  ================================================================

The runtime never has to tell the plan that it is stopping a child: the plan
asked for it, and remembers. That is what keeps an exit *caused* by the
supervisor (a child cancelled by a ONE_FOR_ALL restart that raises on its way
out, or one that crashes on its own while being stopped) from counting as a
new failure: the runtime looks at :attr:`RestartPlan.stopping` (or simply
calls :meth:`~RestartPlan.stopped` for every child a decision listed) and the
report never reaches the strategy. Hang detection stays in the runtime: it
cancels a child that missed its check-in deadline, waits for it, and reports
its end as :attr:`ExitKind.HUNG`.

Decisions may overlap: a child may exit while an earlier decision's children
are still being stopped or waiting to start (behind a backoff, say). A
decision only ever stops RUNNING children and lists in ``start`` only the
children it makes PENDING; children still PENDING or STOPPING from an earlier
decision keep their fate. The runtime starts PENDING children in start order
(:attr:`RestartPlan.pending`) once the children it is stopping are gone.

Time always comes in as ``now`` (``trio.current_time()`` in the runtime), and
must not go back; nothing here reads a clock or does I/O.

>>> plan = RestartPlan(
...     [("db", RestartType.PERMANENT), ("api", RestartType.PERMANENT)],
...     Strategy.REST_FOR_ONE,
...     RestartBudget(max_restarts=1, period=5.0),
... )
>>> for name in plan.pending:
...     plan.started(name)
>>> decision = plan.child_exited("db", ExitKind.FAILED, now=1.0)
>>> decision.stop, decision.start
(('api',), ('db', 'api'))
>>> plan.stopped("api")
>>> for name in plan.pending:
...     plan.started(name)
>>> plan.child_exited("api", ExitKind.HUNG, now=2.0).give_up
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeVar, final

__all__ = [
    "DEFAULT_RESTART_BUDGET",
    "ChildState",
    "Decision",
    "ExitKind",
    "RestartBudget",
    "RestartPlan",
    "RestartStatistics",
    "RestartType",
    "Strategy",
]


class Strategy(Enum):
    """Which siblings are restarted with a child that is restarted."""

    #: Only the child itself.
    ONE_FOR_ONE = "one_for_one"
    #: Every child: the others are stopped, then all are started again.
    ONE_FOR_ALL = "one_for_all"
    #: The child and every child started after it.
    REST_FOR_ONE = "rest_for_one"


class RestartType(Enum):
    """Whether a child's end calls for a restart."""

    #: Always restarted, however it ended.
    PERMANENT = "permanent"
    #: Restarted only after an abnormal end (FAILED or HUNG).
    TRANSIENT = "transient"
    #: Never restarted, not even with its siblings.
    TEMPORARY = "temporary"


class ExitKind(Enum):
    """How a child ended."""

    #: It returned.
    NORMAL = "normal"
    #: It raised.
    FAILED = "failed"
    #: It missed its check-in deadline and the supervisor cancelled it.
    HUNG = "hung"

    @property
    def abnormal(self) -> bool:
        """FAILED and HUNG are abnormal; NORMAL is not."""
        return self is not ExitKind.NORMAL


class ChildState(Enum):
    """Where a child of a :class:`RestartPlan` stands (see the module docstring)."""

    #: To be started; :meth:`RestartPlan.started` once its task runs.
    PENDING = "pending"
    #: Running: its end is reported with :meth:`RestartPlan.child_exited`.
    RUNNING = "running"
    #: Asked to stop: its end is reported with :meth:`RestartPlan.stopped`.
    STOPPING = "stopping"


@final
@dataclass(frozen=True, slots=True)
class RestartBudget:
    """At most ``max_restarts`` restarts within any ``period`` seconds (OTP's intensity and period).

    The defaults, 3 in 5 s, are Elixir's: OTP's 1 in 5 s suits a deep tree of
    supervisors that escalate to each other, while a supervisor here usually
    stands alone, waits a backoff between restarts, and giving up ends the
    process; one crash more is worth tolerating before that.

    >>> RestartBudget()
    RestartBudget(max_restarts=3, period=5.0)
    >>> RestartBudget(max_restarts=0)  # never restart: give up at the first exit that calls for one
    RestartBudget(max_restarts=0, period=5.0)
    """

    #: How many restarts are allowed within ``period``; 0 allows none.
    max_restarts: int = 3
    #: The sliding window, in seconds.
    period: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int):
            raise TypeError(f"max_restarts must be an int, not {self.max_restarts!r}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be at least 0, not {self.max_restarts}")
        if isinstance(self.period, bool) or not isinstance(self.period, int | float):
            raise TypeError(f"period must be a number of seconds, not {self.period!r}")
        if not 0.0 < self.period < math.inf:
            raise ValueError(
                f"period must be a positive, finite number of seconds, not {self.period!r}"
            )


#: The budget a plan gets when none is given.
DEFAULT_RESTART_BUDGET: Final = RestartBudget()


@final
@dataclass(frozen=True, slots=True)
class Decision:
    """What the supervisor must do about one child's exit.

    First stop ``stop`` (reporting each end with :meth:`RestartPlan.stopped`),
    then start ``start``, in that order. With ``give_up``, ``start`` is empty,
    ``stop`` holds every running child, and the supervisor ends with an error
    once they are stopped.
    """

    #: The child that exited.
    child: str
    #: How it ended.
    kind: ExitKind
    #: The running children to stop first, the last started first.
    stop: tuple[str, ...]
    #: The children to start once those are stopped, in start order.
    start: tuple[str, ...]
    #: The children that leave the plan with this decision and will not be
    #: started again (those among ``stop`` leave once :meth:`RestartPlan.stopped`).
    removed: tuple[str, ...]
    #: Whether the budget is spent: the supervisor gives up.
    give_up: bool
    #: A sentence for the log.
    reason: str
    #: Restarts within the budget's window at this time, this one included
    #: (on giving up, the restart that would have exceeded the budget).
    restarts_in_window: int


@final
@dataclass(frozen=True, slots=True)
class RestartStatistics:
    """What :meth:`RestartPlan.statistics` reports."""

    #: Exits reported with :meth:`RestartPlan.child_exited`.
    exits: int
    #: Of those, how many were FAILED or HUNG.
    abnormal_exits: int
    #: Decisions that restarted something (each counts once against the budget).
    restarts: int
    #: Children started again by those decisions, siblings included.
    children_restarted: int
    #: The restarts still within the budget's window, oldest first.
    restart_times: tuple[float, ...]
    #: Whether the plan gave up (it does so at most once).
    given_up: bool


@final
class _Child:
    __slots__ = ("keep", "restart_type", "state")

    def __init__(self, restart_type: RestartType) -> None:
        self.restart_type = restart_type
        self.state = ChildState.PENDING
        # For a STOPPING child: whether it is started again once stopped.
        self.keep = False


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a child's name must be a str, not {name!r}")
    if not name:
        raise ValueError("a child's name must not be empty")
    return name


_E = TypeVar("_E", bound=Enum)


def _check_enum(value: object, kind: type[_E], what: str) -> _E:
    if not isinstance(value, kind):
        raise TypeError(f"{what} must be from {kind.__name__}, not {value!r}")
    return value


@final
class RestartPlan:
    """The restart decisions of one supervisor, for ``children`` given in start order.

    ``children`` are ``(name, RestartType)`` pairs, all PENDING at first. Bad
    input raises :exc:`TypeError` or :exc:`ValueError`; a call the plan's state
    does not allow (an exit after it gave up, a child started twice) raises
    :exc:`ValueError` too, naming the child and its state.

    >>> plan = RestartPlan([("worker", RestartType.TRANSIENT)], Strategy.ONE_FOR_ONE)
    >>> plan.started("worker")
    >>> plan.child_exited("worker", ExitKind.FAILED, now=0.0).start
    ('worker',)
    >>> plan.started("worker")
    >>> plan.child_exited("worker", ExitKind.NORMAL, now=1.0).removed
    ('worker',)
    >>> plan.running, len(plan)
    ((), 0)
    """

    __slots__ = ("_abnormal", "_children", "_closed", "_exits", "_given_up", "_last_now",
                 "_restarted", "_restarts", "_times", "budget", "strategy")  # fmt: skip

    def __init__(
        self,
        children: Iterable[tuple[str, RestartType]],
        strategy: Strategy,
        budget: RestartBudget = DEFAULT_RESTART_BUDGET,
    ) -> None:
        #: Which siblings go with a child that is restarted.
        self.strategy = _check_enum(strategy, Strategy, "strategy")
        if not isinstance(budget, RestartBudget):
            raise TypeError(f"budget must be a RestartBudget, not {budget!r}")
        #: How many restarts are allowed, and within how long.
        self.budget = budget
        # Restart times within the window as of the last exit, oldest first.
        self._times: list[float] = []
        self._last_now = -math.inf
        self._exits = self._abnormal = self._restarts = self._restarted = 0
        self._given_up = False
        self._closed = False
        # In start order: a child added later, or again, goes last.
        self._children: dict[str, _Child] = {}
        for name, restart_type in children:
            self.add(name, restart_type)

    def __repr__(self) -> str:
        end = ", given up" if self._given_up else ", shut down" if self._closed else ""
        return (
            f"<RestartPlan {self.strategy.value}, {len(self._children)} children, "
            f"{self._restarts} restarts{end}>"
        )

    def __len__(self) -> int:
        """How many children the plan holds, whatever their state."""
        return len(self._children)

    def __contains__(self, name: object) -> bool:
        """Whether the plan holds a child of that name."""
        return name in self._children

    # -- reading it ---------------------------------------------------------------------

    def _named(self, state: ChildState) -> tuple[str, ...]:
        return tuple(name for name, child in self._children.items() if child.state is state)

    @property
    def children(self) -> tuple[str, ...]:
        """Every child in the plan, in start order."""
        return tuple(self._children)

    @property
    def running(self) -> tuple[str, ...]:
        """The RUNNING children, in start order."""
        return self._named(ChildState.RUNNING)

    @property
    def pending(self) -> tuple[str, ...]:
        """The children waiting to be started, in start order."""
        return self._named(ChildState.PENDING)

    @property
    def stopping(self) -> tuple[str, ...]:
        """The children asked to stop whose end has not been reported yet, in start order."""
        return self._named(ChildState.STOPPING)

    def state(self, name: str) -> ChildState:
        """Where the child ``name`` stands; :exc:`ValueError` if the plan has no such child."""
        return self._child(name).state

    def restart_type(self, name: str) -> RestartType:
        """The restart type the child ``name`` was added with."""
        return self._child(name).restart_type

    @property
    def given_up(self) -> bool:
        """Whether a decision gave up: the plan takes no more exits."""
        return self._given_up

    @property
    def closed(self) -> bool:
        """Whether it gave up or was shut down: it takes no more exits or children."""
        return self._closed

    def statistics(self, now: float) -> RestartStatistics:
        """The counters, with the restarts still within the window at ``now``.

        >>> plan = RestartPlan([("a", RestartType.PERMANENT)], Strategy.ONE_FOR_ONE)
        >>> plan.started("a")
        >>> _ = plan.child_exited("a", ExitKind.NORMAL, now=1.0)
        >>> plan.statistics(now=2.0).restart_times, plan.statistics(now=6.5).restart_times
        ((1.0,), ())
        """
        return RestartStatistics(
            exits=self._exits,
            abnormal_exits=self._abnormal,
            restarts=self._restarts,
            children_restarted=self._restarted,
            restart_times=tuple(t for t in self._times if now - t <= self.budget.period),
            given_up=self._given_up,
        )

    # -- what the runtime reports -------------------------------------------------------

    def add(self, name: str, restart_type: RestartType) -> None:
        """A new child, last in start order and PENDING.

        >>> plan = RestartPlan([], Strategy.ONE_FOR_ALL)
        >>> plan.add("cache", RestartType.PERMANENT)
        >>> plan.pending
        ('cache',)
        """
        name = _check_name(name)
        restart_type = _check_enum(restart_type, RestartType, "restart_type")
        if name in self._children:
            raise ValueError(f"the plan already has a child named {name!r}")
        if self._closed:
            raise ValueError(f"cannot add {name!r}: the plan {self._end()}")
        self._children[name] = _Child(restart_type)

    def remove(self, name: str) -> bool:
        """Take the child ``name`` out of the plan for good.

        Returns whether the runtime must stop it (it was RUNNING): it is then
        STOPPING until :meth:`stopped`. A PENDING child leaves at once; a
        STOPPING one leaves when stopped, and is no longer started again.

        >>> plan = RestartPlan([("a", RestartType.PERMANENT)], Strategy.ONE_FOR_ONE)
        >>> plan.started("a")
        >>> plan.remove("a"), plan.stopping
        (True, ('a',))
        >>> plan.stopped("a")
        >>> "a" in plan
        False
        """
        child = self._child(name)
        if child.state is ChildState.PENDING:
            del self._children[name]
            return False
        child.keep = False
        if child.state is ChildState.STOPPING:
            return False
        child.state = ChildState.STOPPING
        return True

    def started(self, name: str) -> None:
        """The PENDING child ``name`` is running: call it once its task is spawned.

        From then on its end, however early (a start that raises included), is
        reported with :meth:`child_exited`.
        """
        child = self._child(name)
        if child.state is not ChildState.PENDING:
            raise ValueError(f"{name!r} is {child.state.value}, not pending: it cannot be started")
        child.state = ChildState.RUNNING

    def stopped(self, name: str) -> None:
        """The STOPPING child ``name`` has ended, however it ended.

        It becomes PENDING if the decision that stopped it restarts it, else
        it leaves the plan. The end never counts as an exit.
        """
        child = self._child(name)
        if child.state is not ChildState.STOPPING:
            raise ValueError(
                f"{name!r} is {child.state.value}, not stopping: report its end with child_exited"
            )
        if child.keep:
            child.state = ChildState.PENDING
            child.keep = False
        else:
            del self._children[name]

    def shutdown(self) -> tuple[str, ...]:
        """The supervisor is ending: every RUNNING child is to be stopped, the last started first.

        The returned children are STOPPING (report each with :meth:`stopped`);
        PENDING ones leave at once; nothing is started again. Idempotent: a
        second call returns nothing new.

        >>> plan = RestartPlan([("a", RestartType.PERMANENT), ("b", RestartType.PERMANENT)],
        ...                    Strategy.ONE_FOR_ONE)
        >>> plan.started("a"); plan.started("b")
        >>> plan.shutdown()
        ('b', 'a')
        """
        self._closed = True
        return self._stop_everything()

    def child_exited(self, name: str, kind: ExitKind, now: float) -> Decision:
        """The RUNNING child ``name`` ended, as ``kind`` says, at ``now``: what to do.

        See the module docstring for the rules. Raises :exc:`ValueError` if
        the plan gave up or was shut down, if ``name`` is unknown or not
        RUNNING (a second report of the same end, or the end of a child the
        plan is stopping: that one goes to :meth:`stopped`), or if ``now`` is
        earlier than a time already reported.
        """
        kind = _check_enum(kind, ExitKind, "kind")
        child = self._running(name, now)
        self._last_now = now
        self._exits += 1
        self._abnormal += kind.abnormal
        ended = f"{name!r} {'returned' if kind is ExitKind.NORMAL else kind.value}"
        if child.restart_type is RestartType.TEMPORARY or (
            child.restart_type is RestartType.TRANSIENT and not kind.abnormal
        ):
            del self._children[name]
            reason = f"{ended}; it is {child.restart_type.value}: not restarted"
            count = sum(now - t <= self.budget.period for t in self._times)
            return Decision(name, kind, (), (), (name,), False, reason, count)
        period, allowed = self.budget.period, self.budget.max_restarts
        self._times = [t for t in self._times if now - t <= period]
        count = len(self._times) + 1
        if count > allowed:
            self._given_up = self._closed = True
            everyone = tuple(self._children)
            del self._children[name]
            reason = (
                f"{ended}; {allowed} restart(s) within {period!r} s already, as many as the"
                " budget allows: giving up"
            )
            return Decision(name, kind, self._stop_everything(), (), everyone, True, reason, count)
        stop, start, removed = self._restart(name)
        self._times.append(now)
        self._restarts += 1
        self._restarted += len(start)
        reason = f"{ended}; restarting {', '.join(map(repr, start))} ({self.strategy.value})"
        return Decision(name, kind, stop, start, removed, False, reason, count)

    # -- helpers -----------------------------------------------------------------------

    def _child(self, name: str) -> _Child:
        try:
            return self._children[name]
        except KeyError:
            raise ValueError(f"the plan has no child named {name!r}") from None

    def _end(self) -> str:
        return "gave up" if self._given_up else "was shut down"

    def _running(self, name: str, now: float) -> _Child:
        # The child whose exit is reported, once the report is found sound.
        if not -math.inf < now < math.inf:
            raise ValueError(f"now must be a finite time, not {now!r}")
        if self._closed:
            raise ValueError(f"{name!r} exited, but the plan {self._end()}: no more decisions")
        child = self._child(name)
        if child.state is ChildState.PENDING:
            raise ValueError(f"{name!r} is pending, not running: was its exit reported twice?")
        if child.state is ChildState.STOPPING:
            raise ValueError(f"{name!r} is being stopped: report its end with stopped()")
        if now < self._last_now:
            raise ValueError(f"time went back: now={now!r} after {self._last_now!r}")
        return child

    def _restart(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        # Who is stopped, started and removed when ``name`` is restarted.
        names = list(self._children)
        if self.strategy is Strategy.ONE_FOR_ONE:
            affected = [name]
        elif self.strategy is Strategy.ONE_FOR_ALL:
            affected = names
        else:
            affected = names[names.index(name) :]
        stop: list[str] = []
        start: list[str] = []
        removed: list[str] = []
        for other in affected:
            child = self._children[other]
            if other == name:
                child.state = ChildState.PENDING
                start.append(other)
            elif child.state is ChildState.RUNNING:
                # PENDING and STOPPING siblings keep the fate an earlier decision gave them.
                child.state = ChildState.STOPPING
                child.keep = child.restart_type is not RestartType.TEMPORARY
                stop.append(other)
                (start if child.keep else removed).append(other)
        return tuple(reversed(stop)), tuple(start), tuple(removed)

    def _stop_everything(self) -> tuple[str, ...]:
        stop = []
        for name, child in reversed(list(self._children.items())):
            child.keep = False
            if child.state is ChildState.RUNNING:
                child.state = ChildState.STOPPING
                stop.append(name)
            elif child.state is ChildState.PENDING:
                del self._children[name]
        return tuple(stop)
