"""The health monitor: the process's health board on Trio, published wherever it is reported.

Theory of operation
-------------------
A :class:`HealthMonitor` owns one :class:`~trio_heartbeat._health.HealthBoard`
and one timer task (:meth:`HealthMonitor.run`, started by
:func:`open_health_monitor`). The application registers components
(:meth:`HealthMonitor.register`) and each checks in from its own code with
:meth:`HealthComponent.check_in`; the application may also say what it knows
with :meth:`HealthMonitor.set_status`. The derived status (worst wins) is
*published*: every target given to :meth:`HealthMonitor.publish_to` (a
:class:`Server`, a :class:`Connection`, a :class:`ReconnectingClient`, or
anything with a ``set_health(status)`` method) gets ``set_health`` at the
moment the status changes, and through it the next PING or PONG of each
connection carries it, within the rate rule: the peer knows one trip later.

The board is polled at exactly the two moments it may change: after anything
the application does (a check-in, a registration, ``set_status``), at once and
in the caller's task; and when the earliest deadline comes, in the timer task,
which sleeps in a cancel scope whose deadline is the board's next deadline
(moved earlier when a registration or a recovery needs it). All times are
``trio.current_time()``, so everything runs under ``MockClock``: a component
missed at its deadline changes the status at exactly that instant.

Targets are held weakly: a connection that has ended and is dropped by its
owner is not kept alive by a monitor it was published to.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Final, NoReturn, Protocol, final

import trio

from ._frames import HealthStatus
from ._groups import reraise_single
from ._health import MAX_COMPONENTS, Component, ComponentSnapshot, HealthBoard

__all__ = [
    "HealthComponent",
    "HealthListener",
    "HealthMonitor",
    "HealthTarget",
    "open_health_monitor",
]

logger = logging.getLogger("trio_heartbeat")

#: How many missed components a log line names.
_NAMED: Final = 10

#: Called as ``listener(status, previous)`` at every change of the derived status.
HealthListener = Callable[[HealthStatus, HealthStatus], None]


class HealthTarget(Protocol):
    """Anything that reports a health status: a server, a connection, a reconnecting client."""

    def set_health(self, status: HealthStatus) -> None: ...


@final
class HealthComponent:
    """A registered component, as the application holds it: :meth:`check_in` often.

    Made by :meth:`HealthMonitor.register`. Also a context manager that
    unregisters it on the way out::

        with monitor.register("consumer", 2.0) as consumer:
            async for job in jobs:
                await handle(job)
                consumer.check_in()
    """

    __slots__ = ("_component", "_monitor")

    def __init__(self, monitor: HealthMonitor, component: Component) -> None:
        self._monitor = monitor
        self._component = component

    def __repr__(self) -> str:
        return repr(self._component).replace("<Component", "<HealthComponent", 1)

    @property
    def name(self) -> str:
        return self._component.name

    @property
    def period(self) -> float:
        """Seconds allowed between check-ins."""
        return self._component.period

    @property
    def when_missed(self) -> HealthStatus:
        """What it stands for once missed: DEGRADED or NOT_SERVING."""
        return self._component.when_missed

    @property
    def deadline(self) -> float:
        """When it is missed unless it checks in first (``trio.current_time()`` scale)."""
        return self._component.deadline

    @property
    def misses(self) -> int:
        """How many deadlines it has missed and recovered from."""
        return self._component.misses

    @property
    def status(self) -> HealthStatus:
        """SERVING before its deadline, ``when_missed`` from then until it checks in."""
        return self._component.status(trio.current_time())

    @property
    def registered(self) -> bool:
        return self._component.registered

    def check_in(self) -> None:
        """It is alive now: its deadline moves to now plus its period (a missed one recovers).

        Cheap enough to call every time round a busy loop: a check-in in time only
        moves the deadline later, which no one needs to hear of; one that recovers
        a missed component polls the board and wakes the timer, O(log n).
        """
        component = self._component
        recovers = component.missed
        component.check_in(trio.current_time())
        if recovers:
            self._monitor._changed()

    def unregister(self) -> None:
        """It no longer counts (idempotent)."""
        if self._component.registered:
            self._component.unregister()
            self._monitor._changed()

    def __enter__(self) -> HealthComponent:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unregister()


@final
class HealthMonitor:
    """The process's health: the application's status and its components', on Trio.

    Build it inside ``trio.run`` and run its timer with :func:`open_health_monitor`
    (or start :meth:`run` in a nursery of your own); without the timer, a missed
    deadline is only noticed at the next check-in, ``set_status`` or reading of
    :attr:`status`.

    >>> async def main() -> None:
    ...     async with open_health_monitor() as health:
    ...         worker = health.register("worker", 1.0)
    ...         await trio.sleep(1.0)  # the worker never checked in
    ...         assert health.status is HealthStatus.NOT_SERVING
    ...         worker.check_in()
    ...         assert health.status is HealthStatus.SERVING
    >>> trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    """

    __slots__ = ("_board", "_changes", "_listeners", "_running", "_targets", "_timer", "_woken")

    def __init__(
        self,
        status: HealthStatus = HealthStatus.SERVING,
        *,
        max_components: int = MAX_COMPONENTS,
    ) -> None:
        self._board = HealthBoard(status, max_components=max_components)
        self._targets: weakref.WeakSet[HealthTarget] = weakref.WeakSet()
        self._listeners: list[HealthListener] = []
        self._woken = trio.Event()
        self._timer: trio.CancelScope | None = None
        self._running = False
        self._changes = 0  # changes announced so far

    def __repr__(self) -> str:
        return (
            f"<HealthMonitor {self._board.reported.name}, {len(self._board)} components, "
            f"{len(self._targets)} targets>"
        )

    # -- reading -----------------------------------------------------------------

    @property
    def status(self) -> HealthStatus:
        """The derived status now (the worst of the application's and the components'): a
        deadline that has come is taken into account, and published, when it is read."""
        self._poll()
        return self._board.reported

    @property
    def application_status(self) -> HealthStatus:
        """What the application last said with :meth:`set_status`."""
        return self._board.application_status

    def components(self) -> tuple[ComponentSnapshot, ...]:
        """Every registered component as it stands now, in registration order."""
        return self._board.components(trio.current_time())

    def __len__(self) -> int:
        return len(self._board)

    def __contains__(self, name: object) -> bool:
        return name in self._board

    # -- what the application says -------------------------------------------------

    def set_status(self, status: HealthStatus) -> None:
        """The application's own view; components can only make the derived status worse."""
        self._board.set_status(status)
        self._changed()

    def register(
        self,
        name: str,
        period: float,
        *,
        when_missed: HealthStatus = HealthStatus.NOT_SERVING,
    ) -> HealthComponent:
        """A component that must check in every ``period`` seconds from now on.

        Registering is its first check-in. :exc:`ValueError` for a name in use,
        empty or over 128 characters, a period that is not positive and finite,
        SERVING as ``when_missed``, or a monitor already full (``max_components``).
        """
        component = self._board.register(
            name, period, when_missed=when_missed, now=trio.current_time()
        )
        self._changed()
        return HealthComponent(self, component)

    def unregister(self, name: str) -> None:
        """Unregister the component called ``name``; :exc:`KeyError` if there is none."""
        self._board.unregister(name)
        self._changed()

    # -- publishing -----------------------------------------------------------------

    def publish_to(self, target: HealthTarget) -> None:
        """Call ``target.set_health(status)`` now and at every change (held weakly; an
        exception from it at a change is logged, and the others are still told)."""
        target.set_health(self._board.reported)
        self._targets.add(target)

    def stop_publishing(self, target: HealthTarget) -> None:
        """No more ``set_health`` calls for ``target`` (a no-op if it was not a target)."""
        self._targets.discard(target)

    def add_listener(self, listener: HealthListener) -> None:
        """Call ``listener(status, previous)`` at every change; its errors are logged.

        A listener may change the status itself (a check-in, ``set_status``): that
        change is announced at once, and the listeners after it do not hear the
        older one (they hear only the newer, with the older as ``previous``).
        """
        self._listeners.append(listener)

    def remove_listener(self, listener: HealthListener) -> None:
        """Stop calling ``listener``; :exc:`ValueError` if it was not added."""
        self._listeners.remove(listener)

    async def wait_status(self, *statuses: HealthStatus) -> HealthStatus:
        """Sleep until the derived status is one of ``statuses``; return it."""
        if not statuses:
            raise ValueError("wait_status needs at least one status")
        await trio.lowlevel.checkpoint()
        while (status := self.status) not in statuses:
            await self._woken.wait()
        return status

    # -- the timer ------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Poll the board at each deadline, for ever; one task per monitor."""
        if self._running:
            raise RuntimeError("this HealthMonitor's timer is already running")
        self._running = True
        try:
            self._changed()
            task_status.started()
            while True:
                with trio.CancelScope(deadline=self._board.next_deadline) as timer:
                    self._timer = timer
                    await trio.sleep_forever()
                self._timer = None
                self._poll()
        finally:
            self._timer = None
            self._running = False

    def _changed(self) -> None:
        """Something may have changed the status: poll now, and wake the timer earlier if
        the next deadline moved before the one it sleeps to."""
        self._poll()
        timer = self._timer
        if timer is not None:
            deadline = self._board.next_deadline
            if deadline < timer.deadline:
                timer.deadline = deadline

    def _poll(self) -> None:
        now = trio.current_time()
        board = self._board
        previous = board.reported
        status = board.poll(now)
        if status is None:
            return
        if logger.isEnabledFor(logging.INFO):  # naming the missed walks every component
            logger.info("health %s -> %s%s", previous.name, status.name, _missed(board, now))
        for target in list(self._targets):
            try:
                target.set_health(status)
            except Exception:
                logger.exception("health target %r failed on %s", target, status.name)
        self._changes += 1
        change = self._changes
        for listener in list(self._listeners):
            if self._changes != change:
                # A listener changed it again: that change was announced in full,
                # to everyone; the rest must not hear this older one after it.
                return
            try:
                listener(status, previous)
            except Exception:
                logger.exception("health listener %r failed on %s", listener, status.name)
        self._woken.set()
        self._woken = trio.Event()


def _missed(board: HealthBoard, now: float) -> str:
    names = [c.name for c in board.components(now) if c.status is not HealthStatus.SERVING]
    if not names:
        return ""
    more = f" and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
    return f" (missed: {', '.join(names[:_NAMED])}{more})"


@asynccontextmanager
async def open_health_monitor(
    *targets: HealthTarget,
    status: HealthStatus = HealthStatus.SERVING,
    max_components: int = MAX_COMPONENTS,
) -> AsyncIterator[HealthMonitor]:
    """A :class:`HealthMonitor` with its timer running for the block, published to ``targets``.

    >>> async def main(server: Server) -> None:  # doctest: +SKIP
    ...     async with open_health_monitor(server) as health:
    ...         with health.register("worker", 5.0) as worker:
    ...             while True:
    ...                 await do_some_work()
    ...                 worker.check_in()
    """
    monitor = HealthMonitor(status, max_components=max_components)
    for target in targets:
        monitor.publish_to(target)
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run)
            try:
                yield monitor
            except BaseException as exc:
                raised = exc
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        reraise_single(group, raised)  # what the block raised, as it was raised
    finally:
        raised = None  # no cycle through this frame
