"""The service supervisor: children run, watched for hangs and restarted, the Trio way.

Theory of operation
-------------------
:func:`open_service_supervisor` runs each child (a :class:`ChildSpec`) as a
task of its own, in a cancel scope of its own, inside the supervisor's
nursery, beside one *loop* task that carries out what the sans-IO
:class:`~trio_heartbeat._restart.RestartPlan` decides. A child's task only
notes how it ended and wakes the loop; the rest happens in the loop, one
synchronous step at a time, so no two endings interleave. Each step:

1. reports the children that ended: to :meth:`RestartPlan.stopped` if the plan
   was stopping them, else to :meth:`RestartPlan.child_exited` as NORMAL (it
   returned), FAILED (it raised an :exc:`Exception`, kept as the cause of a
   give-up) or HUNG (see below); the decision's ``stop`` children join the
   *stop queue*, and its ``start`` children may start ``delay`` seconds later,
   the next delay of the crashed child's backoff;
2. notices hangs: a child with a ``check_in_period`` gets a :class:`CheckIn`
   handle as its first argument; starting counts as a check-in, and a child
   that has not checked in for a whole period is cancelled at exactly that
   deadline (virtual time) and, once it has ended, reported as HUNG. A
   check-in made in the very instant of the deadline counts (the loop lets
   every task woken at that instant run before it judges), but in real time a
   child should check in at least twice per period, as systemd asks of its
   watchdog;
3. stops the stop queue one child at a time, the last started first, as OTP
   does: the next child is cancelled only once the one before has ended;
4. abandons a cancelled child not ended ``shutdown_timeout`` seconds after its
   cancellation (a hung one: after its deadline). Trio cannot kill a task that
   shields itself: the supervisor only stops waiting for it (its end is
   reported, an error logged, the restarts go ahead, so for a while two runs
   of the child may be alive at once); its task stays in the nursery, and
   leaving the supervisor's block still waits for it. A child abandoned again
   while an abandoned run of it is still alive is beyond help: the supervisor
   gives up rather than pile up copies it cannot stop;
5. starts the PENDING children, in start order, once no child is being
   stopped and their delay has passed (under ONE_FOR_ALL and REST_FOR_ONE no
   child starts before an earlier pending one: later children may depend on
   earlier ones).

The loop then sleeps until it is woken by an ending or until the earliest time
step 2, 4 or 5 is waiting for. On a give-up, the supervisor's
:attr:`~ServiceSupervisor.error` is set at once (before listeners hear of the
exit that caused it) and the plan lists every running child; once they are
stopped (or abandoned) listeners hear ``SupervisorStopped(error)`` and the
loop raises :class:`SupervisorGaveUp`,
which cancels the block and comes out of the ``async with`` once every task
has ended: never, if an abandoned child shields itself for ever. That is why
a liveness check (``/livez``, systemd's watchdog) looks at ``error`` or the
event, not at the exception: the platform can still end the process.

A child's backoff starts over when its run lasted at least the budget's
``period`` (too long ago to be part of a storm the budget would stop), and
when it runs out: giving up is the budget's job.

With a :class:`~trio_heartbeat._health_monitor.HealthMonitor`, each run of a
child with a ``check_in_period`` is also a component of the board, named
after the child, checked in with it and unregistered when the run has ended:
the process health is NOT_SERVING from the moment a child misses its deadline
until the hung run has ended (or been abandoned); the next run, once its
backoff has passed, joins the board again (a child waiting for its restart
is not on the board, crashed or hung). A run the
supervisor stops leaves the board at its cancellation: a stop, however slow,
is not a health problem.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, NoReturn, final

import trio

from ._backoff import ExponentialBackoff
from ._errors import SupervisorGaveUp
from ._groups import forget_frames, reraise_single
from ._health_monitor import HealthComponent, HealthMonitor
from ._restart import (
    DEFAULT_RESTART_BUDGET,
    ChildState,
    ExitKind,
    RestartBudget,
    RestartPlan,
    RestartType,
    Strategy,
)
from ._service_events import (
    ChildAbandoned,
    ChildExited,
    ChildRestarting,
    ChildStarted,
    ChildStopped,
    ServiceEvent,
    ServiceListener,
    ServiceStatistics,
    SupervisorStopped,
)

__all__ = [
    "DEFAULT_SERVICE_BACKOFF",
    "MAX_CHILDREN",
    "CheckIn",
    "ChildSpec",
    "ServiceSupervisor",
    "open_service_supervisor",
]

logger = logging.getLogger("trio_heartbeat")

#: The delays before restarts when none are given: 0.125 s doubling to 4 s, no
#: jitter. Short, because a service inside a process is restarted, not a fleet
#: reconnected; the restart budget (3 in 5 s by default) stops a crash loop.
DEFAULT_SERVICE_BACKOFF: Final = ExponentialBackoff(base=0.125, factor=2.0, cap=4.0)

#: The most children one supervisor runs. Each step of its loop looks at every
#: child, so a stop of N children costs N²: 0.2 s for 1,000, 13 s
#: for 10,000. A supervisor is for a service's few parts; many like
#: parts (connections, jobs) belong in a nursery of their own, under one child.
#: (Measured on one core of a 2-core EPYC.)
MAX_CHILDREN: Final = 1000


# -- what a supervisor runs ----------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One child of a service supervisor: what to run and how to treat its end.

    ``fn`` is called as ``await fn(*args)``, or ``await fn(check_in, *args)``
    with a :class:`CheckIn` handle when ``check_in_period`` is set: the child
    must then call ``check_in.check_in()`` at least that often, or it is
    cancelled as hung. ``shutdown_timeout`` is how long a cancelled child may
    take to end before the supervisor abandons it (see the module docstring).

    >>> async def worker() -> None: ...
    >>> ChildSpec("worker", worker, check_in_period=5.0).restart
    <RestartType.PERMANENT: 'permanent'>
    """

    name: str
    fn: Callable[..., Awaitable[object]]
    restart: RestartType = RestartType.PERMANENT
    check_in_period: float | None = None
    shutdown_timeout: float = 5.0
    args: tuple[object, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a child's name must be a non-empty str, not {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"fn must be an async function, not {self.fn!r}")
        if not isinstance(self.restart, RestartType):
            raise TypeError(f"restart must be from RestartType, not {self.restart!r}")
        period = self.check_in_period
        if period is not None and not (_seconds(period) and period > 0):
            raise ValueError(f"check_in_period must be positive seconds or None, not {period!r}")
        if not (_seconds(self.shutdown_timeout) and self.shutdown_timeout >= 0):
            raise ValueError(
                f"shutdown_timeout must be 0 or more seconds, not {self.shutdown_timeout!r}"
            )
        if not isinstance(self.args, tuple):
            raise TypeError(f"args must be a tuple, not {self.args!r}")


def _seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@final
class CheckIn:
    """The handle a child with a ``check_in_period`` gets: call :meth:`check_in` often.

    One handle per run of the child; once the run is being stopped, was found
    hung or has ended, checking in changes nothing (not even :attr:`deadline`).
    """

    __slots__ = ("_run",)

    def __init__(self, run: _Run) -> None:
        self._run = run

    @property
    def name(self) -> str:
        return self._run.spec.name

    @property
    def deadline(self) -> float:
        """When the child is found hung unless it checks in first (``trio.current_time()``)."""
        return self._run.deadline

    def check_in(self) -> None:
        """The child is alive: its deadline moves to now plus its period."""
        run = self._run
        if run.cancelled or run.ended:
            return
        assert run.spec.check_in_period is not None  # only such runs get a handle
        run.deadline = trio.current_time() + run.spec.check_in_period
        if run.component is not None:
            run.component.check_in()


@final
class _Run:
    """One run of a child: its task's cancel scope and how it ended."""

    __slots__ = ("abandon_at", "cancelled", "component", "deadline", "ended", "error", "hung",
                 "reported", "scope", "spec", "started_at")  # fmt: skip

    def __init__(self, spec: ChildSpec, now: float) -> None:
        self.spec = spec
        self.started_at = now
        self.scope = trio.CancelScope()
        period = spec.check_in_period
        self.deadline = math.inf if period is None else now + period
        self.abandon_at = math.inf
        self.cancelled = self.hung = self.ended = self.reported = False
        self.error: Exception | None = None
        self.component: HealthComponent | None = None


# -- the supervisor -------------------------------------------------------------------


@final
class ServiceSupervisor:
    """Children run and restarted for as long as the ``async with`` block runs.

    Get one from :func:`open_service_supervisor`.
    """

    def __init__(
        self,
        children: Iterable[ChildSpec],
        strategy: Strategy,
        budget: RestartBudget,
        backoff: Iterable[float],
        health: HealthMonitor | None,
        listeners: Iterable[ServiceListener],
    ) -> None:
        specs = list(children)
        if len(specs) > MAX_CHILDREN:
            raise ValueError(f"at most {MAX_CHILDREN} children, not {len(specs)}")
        if iter(backoff) is backoff:  # it is asked for its delays again after each healthy run
            raise TypeError("backoff must be re-iterable (a policy, a list), not an iterator")
        for delay in itertools.islice(backoff, 1):  # a policy's first delay, as a sample
            if not (_seconds(delay) and delay >= 0):
                raise ValueError(f"backoff delays must be finite seconds, not {delay!r}")
        for spec in specs:
            if not isinstance(spec, ChildSpec):
                raise TypeError(f"children must be ChildSpec objects, not {spec!r}")
            if health is not None and spec.check_in_period is not None and spec.name in health:
                raise ValueError(f"the health monitor already has a component {spec.name!r}")
        self._plan = RestartPlan([(s.name, s.restart) for s in specs], strategy, budget)
        self._specs = {spec.name: spec for spec in specs}
        self._backoff = backoff
        self._health = health
        self._listeners = list(listeners)
        self._nursery: trio.Nursery | None = None
        self._runs: dict[str, _Run] = {}  # the current run of each child, until reported
        self._ended: deque[_Run] = deque()  # runs that ended, not yet looked at
        self._stop_queue: deque[str] = deque()
        self._not_before: dict[str, float] = {}
        self._delays: dict[str, Iterator[float]] = {}
        self._woken = trio.Event()
        self._closed = trio.Event()  # set once shut down and every child stopped
        self._closing = False
        self._stopped = False  # SupervisorStopped was emitted
        self._gave_up: SupervisorGaveUp | None = None
        self._counts = dict.fromkeys(("starts", "stopped", "abandoned"), 0)
        self._lingering: Counter[str] = Counter()  # abandoned runs still running, by child
        #: The :exc:`SupervisorGaveUp` once the supervisor gave up (see :attr:`error`).
        self._error: SupervisorGaveUp | None = None
        self._exits = dict.fromkeys(ExitKind, 0)

    def __repr__(self) -> str:
        return f"<ServiceSupervisor {self._plan.strategy.value}, running {self._plan.running}>"

    @property
    def error(self) -> SupervisorGaveUp | None:
        """Why the supervisor gave up, once it has, else ``None``.

        A :exc:`SupervisorGaveUp` equal to the one raised (same message, child,
        kind, error and cause), not that very object: the one raised carries
        the traceback of its way out, through this supervisor.

        Set the moment it decides to, while its children are still being
        stopped, long before the error can be raised: a child that shields
        itself from cancellation keeps the ``async with`` from ending (Trio
        cannot kill it). A liveness check (``/livez``, systemd's watchdog)
        looks here, not at the exception.
        """
        return self._error

    def state(self, name: str) -> ChildState | None:
        """Where ``name`` stands; ``None`` once it left for good (:exc:`KeyError` if unknown)."""
        if name not in self._specs:
            raise KeyError(name)
        return self._plan.state(name) if name in self._plan else None

    def statistics(self) -> ServiceStatistics:
        """The counters now."""
        return ServiceStatistics(
            starts=self._counts["starts"],
            normal_exits=self._exits[ExitKind.NORMAL],
            failed_exits=self._exits[ExitKind.FAILED],
            hung_exits=self._exits[ExitKind.HUNG],
            stopped=self._counts["stopped"],
            abandoned=self._counts["abandoned"],
            restarts=self._plan.statistics(trio.current_time()).restarts,
            running=self._plan.running,
        )

    def add_listener(self, listener: ServiceListener) -> None:
        """Call ``listener(event)`` for every :class:`ServiceEvent` from now on."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ServiceListener) -> None:
        """Stop calling ``listener``; :exc:`ValueError` if it was not added."""
        self._listeners.remove(listener)

    def _emit(self, event: ServiceEvent) -> None:
        for listener in list(self._listeners):  # a listener may remove itself
            try:
                listener(event)
            except Exception:
                logger.exception("service listener %r failed on %r", listener, event)

    # -- the children's tasks ---------------------------------------------------------

    async def _run_child(self, run: _Run) -> None:
        spec = run.spec
        try:
            with run.scope:
                if spec.check_in_period is None:
                    await spec.fn(*spec.args)
                else:
                    await spec.fn(CheckIn(run), *spec.args)
        except Exception as exc:  # anything else (Cancelled from outside) ends the supervisor
            # The traceback keeps the child's frames, whose variables (its
            # CheckIn among them) lead back to this run: a cycle that would keep
            # every failed run alive until a full collection. The lines stay.
            forget_frames(exc)
            run.error = exc
        finally:
            run.ended = True
            if run.component is not None:  # also when the whole supervisor is cancelled
                run.component.unregister()
            self._ended.append(run)
            self._woken.set()
            del self, run, spec  # nor a cycle through this frame, which the traceback holds

    # -- the loop ----------------------------------------------------------------------

    async def _loop(self) -> NoReturn:
        while True:
            self._woken = trio.Event()
            self._step()
            with trio.move_on_at(self._next_wake()):
                await self._woken.wait()
            # Every task woken at this instant runs first, so that a check-in
            # made exactly at its deadline counts, whatever order Trio picks.
            await trio.lowlevel.checkpoint()

    def _next_wake(self) -> float:
        wake = math.inf
        for run in self._runs.values():
            wake = min(wake, run.abandon_at if run.cancelled else run.deadline)
        if not self._plan.stopping:
            pending = self._plan.pending
            if self._plan.strategy is not Strategy.ONE_FOR_ONE:
                pending = pending[:1]  # the others wait behind the first (see _step)
            for name in pending:
                wake = min(wake, self._not_before.get(name, -math.inf))
        return wake

    def _step(self) -> None:
        now = trio.current_time()
        while self._ended:
            run = self._ended.popleft()
            if run.reported:
                logger.info("abandoned child %r ended at last", run.spec.name)
                self._lingering[run.spec.name] -= 1
            else:
                self._report(run, now)
        for run in list(self._runs.values()):
            if run.cancelled and run.abandon_at <= now:
                self._abandon(run, now)
            elif not run.cancelled and run.deadline <= now:
                self._hang(run)
        while self._stop_queue:
            run_to_stop = self._runs.get(self._stop_queue[0])
            if run_to_stop is None:
                self._stop_queue.popleft()  # already ended, or abandoned
                continue
            if not run_to_stop.cancelled:
                run_to_stop.cancelled = True
                run_to_stop.abandon_at = now + run_to_stop.spec.shutdown_timeout
                run_to_stop.scope.cancel()
                if run_to_stop.component is not None:  # a stop is no health problem
                    run_to_stop.component.unregister()
                logger.info("stopping child %r", run_to_stop.spec.name)
            return  # one at a time: the next once this one has ended
        if self._gave_up is not None:
            # Cancelled first, here: a block cancelled from inside Trio's handling of
            # the error below would get a Cancelled whose frames lead to the error.
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
            error, self._gave_up = self._gave_up, None
            logger.error("service supervisor gave up: %s", error)
            self._stopped = True
            self._emit(SupervisorStopped(error))
            try:
                raise error from error.error
            finally:
                del error, self  # its traceback holds this frame: no cycle through it
        if self._closing:
            self._closed.set()
            return
        one_for_one = self._plan.strategy is Strategy.ONE_FOR_ONE
        for name in self._plan.pending:
            if self._not_before.get(name, -math.inf) <= now:
                self._start(name, now)
            elif not one_for_one:
                break

    def _start(self, name: str, now: float) -> None:
        assert self._nursery is not None
        spec = self._specs[name]
        run = _Run(spec, now)
        self._runs[name] = run
        self._not_before.pop(name, None)
        self._plan.started(name)
        if self._health is not None and spec.check_in_period is not None:
            try:
                run.component = self._health.register(name, spec.check_in_period)
            except ValueError as exc:  # its name was taken on the board meanwhile
                run.error, run.ended = exc, True
                self._ended.append(run)  # a start that failed: reported FAILED next
                self._woken.set()
                return
        self._nursery.start_soon(self._run_child, run, name=f"trio_heartbeat service {name}")
        self._counts["starts"] += 1
        logger.info("started child %r", name)
        self._emit(ChildStarted(name))

    def _hang(self, run: _Run) -> None:
        run.cancelled = run.hung = True
        run.abandon_at = run.deadline + run.spec.shutdown_timeout
        run.scope.cancel()
        logger.warning("child %r missed its check-in deadline: cancelling it", run.spec.name)

    def _abandon(self, run: _Run, now: float) -> None:
        name, timeout = run.spec.name, run.spec.shutdown_timeout
        logger.error(
            "child %r did not end within %g s of its cancellation: abandoned", name, timeout
        )
        self._counts["abandoned"] += 1
        if self._lingering[name] and not self._plan.closed:
            # Its last abandoned run is still there: restarting again would pile
            # up copies without end, and Trio cannot kill them. Beyond help.
            self._stop_queue.extend(self._plan.shutdown())
            reason = f"child {name!r} was abandoned again while an earlier run of it was still"
            self._give_up(f"{reason} running: giving up", name, ExitKind.HUNG, run.error)
        self._lingering[name] += 1
        self._emit(ChildAbandoned(name, timeout))
        self._report(run, now)

    def _report(self, run: _Run, now: float) -> None:
        name = run.spec.name
        run.reported = True
        del self._runs[name]
        if run.component is not None:
            run.component.unregister()
        plan = self._plan
        if plan.state(name) is ChildState.STOPPING:
            plan.stopped(name)
            self._counts["stopped"] += 1
            logger.info("stopped child %r", name, exc_info=run.error)
            self._emit(ChildStopped(name))
            return
        kind = ExitKind.HUNG if run.hung else ExitKind.FAILED if run.error else ExitKind.NORMAL
        decision = plan.child_exited(name, kind, now)
        self._exits[kind] += 1
        level = logging.INFO if kind is ExitKind.NORMAL else logging.WARNING
        logger.log(level, "child %s", decision.reason, exc_info=run.error)
        if decision.give_up:  # before the event: its listeners see ``error`` set
            self._give_up(f"child {decision.reason}", name, kind, run.error)
        self._emit(ChildExited(name, kind, run.error))
        self._stop_queue.extend(decision.stop)
        if decision.start:
            delay = self._next_delay(name, now - run.started_at)
            for child in decision.start:
                self._not_before[child] = now + delay
            logger.info("restarting %s in %g s", ", ".join(map(repr, decision.start)), delay)
            self._emit(ChildRestarting(name, delay, decision.start))

    def _give_up(self, message: str, name: str, kind: ExitKind, error: Exception | None) -> None:
        # Two equal errors: the one raised gathers a traceback through the
        # supervisor's frames on its way out, and ``error`` must not hold it
        # (a cycle that would keep the supervisor alive until a full collection).
        self._gave_up = SupervisorGaveUp(message, name, kind, error)
        self._error = SupervisorGaveUp(message, name, kind, error)
        self._error.__cause__ = error

    def _next_delay(self, name: str, ran_for: float) -> float:
        delays = self._delays.get(name)
        if delays is None or ran_for >= self._plan.budget.period:
            delays = self._delays[name] = iter(self._backoff)
        delay = next(delays, None)
        if delay is None:  # ran out: start over
            delays = self._delays[name] = iter(self._backoff)
            delay = next(delays, 0.0)
        return delay

    async def _shutdown(self) -> None:
        """Stop every child, the last started first, and wait until they are gone."""
        self._closing = True
        self._stop_queue.extend(self._plan.shutdown())
        self._woken.set()
        await self._closed.wait()
        logger.info("service supervisor stopped")
        self._stopped = True
        self._emit(SupervisorStopped(None))


@asynccontextmanager
async def open_service_supervisor(
    children: Iterable[ChildSpec],
    *,
    strategy: Strategy = Strategy.ONE_FOR_ONE,
    budget: RestartBudget = DEFAULT_RESTART_BUDGET,
    backoff: Iterable[float] = DEFAULT_SERVICE_BACKOFF,
    health: HealthMonitor | None = None,
    listeners: Iterable[ServiceListener] = (),
) -> AsyncIterator[ServiceSupervisor]:
    """Run ``children`` for as long as the block runs, restarting them as ``strategy`` says.

    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with open_service_supervisor(
    ...         [ChildSpec("server", serve), ChildSpec("worker", work, check_in_period=5.0)],
    ...         strategy=Strategy.REST_FOR_ONE,
    ...     ) as supervisor:
    ...         await trio.sleep_forever()

    The children start, in order, before the block runs. Leaving the block
    stops them one at a time, the last started first, each given its
    ``shutdown_timeout``; leaving it by an exception (a cancellation from
    outside included) cancels them all at once and raises that exception.
    When ``budget`` runs out, the children are stopped, the block is cancelled
    and one :class:`SupervisorGaveUp` is raised, with the last child's
    exception as its cause (once every task has ended: see
    :attr:`ServiceSupervisor.error` for a child that never does); a block that
    raises an error of its own while the give-up cancels it gets both, in an
    :exc:`ExceptionGroup`. A child's own exception never escapes; one that
    is not an :exc:`Exception` (:exc:`KeyboardInterrupt`) ends the supervisor
    and comes out as itself. ``listeners`` hear every :class:`ServiceEvent`,
    the first starts included.
    """
    supervisor = ServiceSupervisor(children, strategy, budget, backoff, health, listeners)
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            supervisor._nursery = nursery
            supervisor._step()  # the first starts, before the block
            nursery.start_soon(supervisor._loop, name="trio_heartbeat service supervisor")
            try:
                yield supervisor
            except BaseException as exc:
                raised = exc
                if not supervisor._stopped:  # a give-up has said so already
                    logger.info("service supervisor cancelled: %r", exc)
                    supervisor._emit(SupervisorStopped(None))
                raise
            await supervisor._shutdown()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        reraise_single(group, raised)  # the block's own error, or the give-up, as raised
    finally:
        raised = None  # no cycle through this frame
