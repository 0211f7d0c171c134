"""The health board: the process's health, derived from components that must check in (sans-IO).

Theory of operation
-------------------
A heartbeat proves that the event loop runs; it says nothing of a worker
that deadlocked, a consumer that stopped draining its queue or a connection
pool that stopped answering. A :class:`HealthBoard` lets the application say
what it knows (:meth:`HealthBoard.set_status`) and register *components*
that must prove themselves: each :class:`Component` has a period and checks
in from the application's own code (the worker loop calls
:meth:`Component.check_in` each time round). A component whose deadline (its
last check-in plus its period) has come without a check-in is *missed*, from
exactly that instant, and stands for its ``when_missed`` status (DEGRADED or
NOT_SERVING, chosen per component); its next check-in recovers it. The
process's health is the worst of the application's status and every
component's, in the order SERVING < DEGRADED < NOT_SERVING.

Two ways to read it:

* :meth:`HealthBoard.status` is a pure reading at any time, walking every
  component: for observability and tests, as is :meth:`HealthBoard.components`;
* :meth:`HealthBoard.poll` is for the runtime, which drives the board with one
  timer: it sleeps until :attr:`HealthBoard.next_deadline`, calls ``poll(now)``,
  and calls it again after anything that may change the status (a check-in, a
  registration, :meth:`~HealthBoard.set_status`). ``poll`` returns the derived
  status when it differs from what the previous poll returned, else ``None``,
  so each change is announced once. It costs O(log n) per deadline reached,
  and a check-in O(1) (O(log n) when it recovers a missed component), so a
  thousand workers checking in often do not cost a walk of the board each.

The deadlines wait in a heap. A check-in only moves its component's deadline
later, so the heap is not touched then: an entry found at the top with an
old deadline is pushed back with the new one (at most one entry per live
component), and entries of unregistered components are dropped when they
surface, or all at once when they outnumber the live ones.

A change that is undone before the next poll (a component missed at its
deadline and checked in again before the runtime polled) is never announced:
``poll`` reports the status as of its ``now``. A runtime that polls at
:attr:`~HealthBoard.next_deadline` and after every check-in sees every change.

Time always comes in as ``now`` (``trio.current_time()`` in the runtime), so
everything here runs under any clock, and nothing does I/O.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Final, final

from ._frames import HealthStatus

__all__ = ["MAX_COMPONENTS", "MAX_NAME_LENGTH", "Component", "ComponentSnapshot", "HealthBoard"]

#: How many components one board holds by default.
MAX_COMPONENTS: Final = 1000
#: The longest component name, in characters.
MAX_NAME_LENGTH: Final = 128

_MISSABLE: Final = (HealthStatus.DEGRADED, HealthStatus.NOT_SERVING)


@final
@dataclass(frozen=True, slots=True)
class ComponentSnapshot:
    """One component as :meth:`HealthBoard.components` saw it at one moment."""

    #: The name it was registered under.
    name: str
    #: Seconds allowed between check-ins.
    period: float
    #: What it stands for while missed: DEGRADED or NOT_SERVING.
    when_missed: HealthStatus
    #: When it last checked in (its registration counts as the first check-in).
    last_check_in: float
    #: When it is missed unless it checks in first.
    deadline: float
    #: SERVING, or ``when_missed`` once the deadline has come.
    status: HealthStatus
    #: How many deadlines it has missed, the current one included.
    misses: int


@final
class Component:
    """Something in the application that must check in at least every ``period`` seconds.

    Made by :meth:`HealthBoard.register`, never directly.

    >>> board = HealthBoard()
    >>> worker = board.register("worker", 5.0, now=10.0)
    >>> worker.deadline
    15.0
    >>> worker.status(14.9), worker.status(15.0)
    (<HealthStatus.SERVING: 0>, <HealthStatus.NOT_SERVING: 2>)
    >>> worker.check_in(16.0)  # late: one miss, and recovered
    >>> worker.deadline, worker.misses
    (21.0, 1)
    """

    __slots__ = ("_board", "_deadline", "_last", "_missed", "_misses", "_name", "_period", "_when")

    def __init__(
        self,
        board: HealthBoard,
        name: str,
        period: float,
        when_missed: HealthStatus,
        now: float,
    ) -> None:
        # Read-only from outside: the board's heap and counts rely on them.
        self._board: HealthBoard | None = board
        self._name = name
        self._period = period
        self._when = when_missed
        self._last = now
        self._deadline = now + period
        self._misses = 0
        # Whether the board's last poll found it missed (and counts it so).
        self._missed = False

    def __repr__(self) -> str:
        state = "" if self._board is not None else ", unregistered"
        return (
            f"<Component {self.name!r} every {self.period!r} s, deadline {self.deadline!r}, "
            f"{self.when_missed} when missed{state}>"
        )

    @property
    def name(self) -> str:
        """The name it was registered under (unique on its board)."""
        return self._name

    @property
    def period(self) -> float:
        """Seconds allowed between check-ins."""
        return self._period

    @property
    def when_missed(self) -> HealthStatus:
        """What it stands for while missed: DEGRADED or NOT_SERVING."""
        return self._when

    @property
    def deadline(self) -> float:
        """When it is missed unless it checks in first: its last check-in plus its period."""
        return self._deadline

    @property
    def misses(self) -> int:
        """How many deadlines it missed and then recovered from with a check-in."""
        return self._misses

    @property
    def last_check_in(self) -> float:
        """When it last checked in; its registration counts as the first check-in."""
        return self._last

    @property
    def missed(self) -> bool:
        """Whether the last :meth:`HealthBoard.poll` counted it missed (its check-in recovers it)."""
        return self._missed

    @property
    def registered(self) -> bool:
        """False once unregistered: then it no longer counts, and check-ins are ignored."""
        return self._board is not None

    def status(self, now: float) -> HealthStatus:
        """``when_missed`` from its deadline on, until it checks in again; SERVING before.

        >>> board = HealthBoard()
        >>> pool = board.register("pool", 2.0, when_missed=HealthStatus.DEGRADED, now=0.0)
        >>> pool.status(2.0)
        <HealthStatus.DEGRADED: 1>
        """
        return self.when_missed if now >= self.deadline else HealthStatus.SERVING

    def check_in(self, now: float) -> None:
        """It is alive at ``now``: its deadline moves to ``now + period``.

        A missed component recovers at once (a check-in at exactly the deadline
        is already late, and counts as a miss). The deadline never moves back,
        and a check-in after :meth:`unregister` is ignored.

        >>> board = HealthBoard()
        >>> consumer = board.register("consumer", 1.0, now=0.0)
        >>> consumer.check_in(0.5)
        >>> consumer.deadline, consumer.misses
        (1.5, 0)
        """
        board = self._board
        if board is None or now <= self._last:
            return
        if now >= self._deadline:
            self._misses += 1
        self._last = now
        self._deadline = now + self._period
        if self._missed:
            board._recovered(self)

    def unregister(self) -> None:
        """Take it off its board: it no longer counts. Idempotent.

        >>> board = HealthBoard()
        >>> board.register("job", 1.0, now=0.0).unregister()
        >>> board.status(5.0), len(board)
        (<HealthStatus.SERVING: 0>, 0)
        """
        board = self._board
        if board is not None:
            board._remove(self)


@final
class HealthBoard:
    """The health of one process: the application's status and its components'.

    ``status`` is the application's own status to start from;
    ``max_components`` bounds how many components may be registered at once.

    >>> board = HealthBoard()
    >>> db = board.register("db", 3.0, now=0.0)
    >>> cache = board.register("cache", 1.0, when_missed=HealthStatus.DEGRADED, now=0.0)
    >>> board.next_deadline
    1.0
    >>> board.poll(1.0)  # the cache missed its deadline
    <HealthStatus.DEGRADED: 1>
    >>> board.next_deadline
    3.0
    >>> board.poll(3.0)  # and now the database: the worst wins
    <HealthStatus.NOT_SERVING: 2>
    >>> db.check_in(3.5)
    >>> cache.check_in(3.5)
    >>> board.poll(3.5)
    <HealthStatus.SERVING: 0>
    >>> board.poll(3.6) is None  # no change since the last poll
    True
    """

    __slots__ = (
        "_application",
        "_by_name",
        "_heap",
        "_missed",
        "_reported",
        "_seq",
        "max_components",
    )

    def __init__(
        self,
        status: HealthStatus = HealthStatus.SERVING,
        *,
        max_components: int = MAX_COMPONENTS,
    ) -> None:
        if isinstance(max_components, bool) or not isinstance(max_components, int):
            raise TypeError(f"max_components must be an int, not {max_components!r}")
        if max_components < 1:
            raise ValueError(f"max_components must be at least 1, not {max_components}")
        self._application = HealthStatus(status)
        #: At most this many components at once.
        self.max_components = max_components
        self._by_name: dict[str, Component] = {}
        # (deadline, sequence, component) for every registered component that
        # the last poll did not find missed; entries may be stale (see the
        # module docstring).
        self._heap: list[tuple[float, int, Component]] = []
        self._seq = 0
        # How many components the last poll found missed, by their when_missed.
        self._missed = {HealthStatus.DEGRADED: 0, HealthStatus.NOT_SERVING: 0}
        self._reported = self._application

    def __repr__(self) -> str:
        return (
            f"<HealthBoard {self._reported} as last polled, application {self._application}, "
            f"{len(self._by_name)} components>"
        )

    def __len__(self) -> int:
        """How many components are registered."""
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        """Whether a component of that name is registered."""
        return name in self._by_name

    def __getitem__(self, name: str) -> Component:
        """The component registered under ``name``; :exc:`KeyError` if none is."""
        return self._by_name[name]

    # -- what the application says ------------------------------------------------------

    @property
    def application_status(self) -> HealthStatus:
        """The status the application set (SERVING unless it said otherwise)."""
        return self._application

    def set_status(self, status: HealthStatus) -> None:
        """The application's own view of its health; the components can only make it worse.

        >>> board = HealthBoard()
        >>> board.set_status(HealthStatus.DEGRADED)
        >>> board.poll(0.0)
        <HealthStatus.DEGRADED: 1>
        """
        self._application = HealthStatus(status)

    def register(
        self,
        name: str,
        period: float,
        *,
        when_missed: HealthStatus = HealthStatus.NOT_SERVING,
        now: float,
    ) -> Component:
        """A new component that must check in every ``period`` seconds, from ``now`` on.

        Registering counts as its first check-in. Raises :exc:`ValueError` for
        a name already registered, empty or longer than :data:`MAX_NAME_LENGTH`;
        a period that is not a positive, finite number; SERVING as
        ``when_missed``; or a board already holding ``max_components``.

        >>> board = HealthBoard()
        >>> board.register("worker", 0.5, now=2.0)
        <Component 'worker' every 0.5 s, deadline 2.5, NOT_SERVING when missed>
        """
        if not isinstance(name, str):
            raise TypeError(f"a component's name must be a str, not {name!r}")
        if not 0 < len(name) <= MAX_NAME_LENGTH:
            raise ValueError(
                f"a component's name must be 1 to {MAX_NAME_LENGTH} characters, got {name!r}"
            )
        if name in self._by_name:
            raise ValueError(f"a component named {name!r} is already registered")
        if not 0.0 < period < math.inf:
            raise ValueError(f"period must be a positive, finite number of seconds, not {period!r}")
        when_missed = HealthStatus(when_missed)
        if when_missed not in _MISSABLE:
            raise ValueError("when_missed must be DEGRADED or NOT_SERVING, not SERVING")
        if len(self._by_name) >= self.max_components:
            raise ValueError(f"this board already holds {self.max_components} components")
        component = Component(self, name, period, when_missed, now)
        self._by_name[name] = component
        self._push(component)
        return component

    def unregister(self, name: str) -> None:
        """Unregister the component called ``name``; :exc:`KeyError` if there is none.

        >>> board = HealthBoard()
        >>> _ = board.register("job", 1.0, now=0.0)
        >>> board.unregister("job")
        >>> "job" in board
        False
        """
        self._remove(self._by_name[name])

    # -- reading it -----------------------------------------------------------------------

    def status(self, now: float) -> HealthStatus:
        """The health at ``now``: the worst of the application's and every component's.

        A pure reading, walking every component; the runtime uses :meth:`poll`.

        >>> board = HealthBoard()
        >>> _ = board.register("job", 1.0, when_missed=HealthStatus.DEGRADED, now=0.0)
        >>> board.status(0.5), board.status(1.0)
        (<HealthStatus.SERVING: 0>, <HealthStatus.DEGRADED: 1>)
        """
        worst = self._application
        for component in self._by_name.values():
            if now >= component.deadline and component.when_missed > worst:
                worst = component.when_missed
        return worst

    def components(self, now: float) -> tuple[ComponentSnapshot, ...]:
        """Every registered component as it stands at ``now``, in registration order.

        >>> board = HealthBoard()
        >>> _ = board.register("job", 1.0, now=0.0)
        >>> [(c.name, c.status, c.misses) for c in board.components(1.5)]
        [('job', <HealthStatus.NOT_SERVING: 2>, 1)]
        """
        return tuple(
            ComponentSnapshot(
                name=c.name,
                period=c.period,
                when_missed=c.when_missed,
                last_check_in=c.last_check_in,
                deadline=c.deadline,
                status=c.status(now),
                misses=c.misses + (now >= c.deadline),
            )
            for c in self._by_name.values()
        )

    @property
    def reported(self) -> HealthStatus:
        """The status as of the last :meth:`poll` (before the first, the application's
        status when the board was made)."""
        return self._reported

    @property
    def next_deadline(self) -> float:
        """When the status may next change by itself: the earliest deadline of the
        components the last poll did not find missed (``inf`` if there is none).

        Always later than the last poll's ``now`` (for a clock that never goes
        back): the runtime's timer sleeps until then and polls.
        """
        heap = self._heap
        while heap:
            deadline, _, component = heap[0]
            if component._board is None:
                heapq.heappop(heap)
            elif component.deadline != deadline:
                self._seq += 1
                heapq.heapreplace(heap, (component.deadline, self._seq, component))
            else:
                return deadline
        return math.inf

    def poll(self, now: float) -> HealthStatus | None:
        """The health at ``now`` if it changed since the last poll, else ``None``.

        Call it at :attr:`next_deadline` and after every check-in, registration,
        unregistration and :meth:`set_status`; see the module docstring.

        >>> board = HealthBoard()
        >>> job = board.register("job", 1.0, now=0.0)
        >>> board.poll(0.999) is None, board.poll(1.0)
        (True, <HealthStatus.NOT_SERVING: 2>)
        >>> job.check_in(1.2)
        >>> board.poll(1.2)
        <HealthStatus.SERVING: 0>
        """
        while self.next_deadline <= now:
            # next_deadline left the component whose deadline it is at the top.
            _, _, component = heapq.heappop(self._heap)
            component._missed = True
            self._missed[component.when_missed] += 1
        if self._missed[HealthStatus.NOT_SERVING]:
            derived = HealthStatus.NOT_SERVING
        elif self._missed[HealthStatus.DEGRADED]:
            derived = max(self._application, HealthStatus.DEGRADED)
        else:
            derived = self._application
        if derived is self._reported:
            return None
        self._reported = derived
        return derived

    # -- kept by the components -----------------------------------------------------------

    def _push(self, component: Component) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (component.deadline, self._seq, component))

    def _recovered(self, component: Component) -> None:
        # A component the last poll found missed checked in: it counts as live again.
        component._missed = False
        self._missed[component.when_missed] -= 1
        self._push(component)

    def _remove(self, component: Component) -> None:
        del self._by_name[component.name]
        component._board = None
        if component._missed:
            component._missed = False
            self._missed[component.when_missed] -= 1
        elif len(self._heap) > 2 * len(self._by_name) + 16:
            # Entries of unregistered components only leave when they reach
            # the top; when they outnumber the rest, drop them all at once.
            self._heap = [entry for entry in self._heap if entry[2]._board is not None]
            heapq.heapify(self._heap)
