"""The circuit breaker for Trio code: ``async with breaker:`` around a call to a peer.

Theory of operation
-------------------
:class:`Breaker` is a thin Trio layer over the sans-IO
:class:`~._breaker.CircuitBreaker`: every decision is the state machine's, and
this module only supplies the time, which is always ``trio.current_time()``, so
Trio's virtual clock drives it exactly.

There is no background task. ``OPEN`` turns into ``HALF_OPEN`` when somebody
looks: a call that asks to be admitted, :attr:`Breaker.state`,
:meth:`Breaker.statistics`, or a task in :meth:`Breaker.wait_state`, which
sleeps until the machine's ``next_transition`` (or until any transition)
and then looks again.

Every admitted call is settled exactly once, whatever happens to it: a clean
exit records a success (slow if it took longer than ``slow_call_duration``),
an exception that ``record_failure`` accepts records a failure, and anything
else, cancellation above all, *releases* the permit: it counts for nothing and,
while ``HALF_OPEN``, gives its trial slot back, so a cancelled trial can never
hold the breaker half open for ever; one that hangs uncancelled is given up on
after the config's ``max_trial_duration`` (the breaker opens again).

Listeners hear of every transition as a :class:`~._breaker.BreakerTransition`;
one that raises is logged on the ``trio_heartbeat`` logger and the others still
run, so a faulty listener never leaves the breaker half-moved.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, TypeVar, TypeVarTuple, Unpack, final

import trio

from ._breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStatistics,
    BreakerTransition,
    CircuitBreaker,
    Permit,
)
from ._errors import CircuitOpen

__all__ = [
    "HEARTBEAT_BREAKER_CONFIG",
    "Breaker",
    "default_record_failure",
]

logger = logging.getLogger("trio_heartbeat")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Defaults sized for calls to a heartbeat-monitored peer, not resilience4j's
#: 100 calls and 60 s waits. Twenty calls in the window with ten needed before
#: a rate counts: a busy client trips within a burst, one or two unlucky calls
#: never do. Five seconds open is a few heartbeat intervals, long enough for a
#: restarting peer to come back and short enough that callers do not notice a
#: stale rejection (a liveness binding lifts it earlier anyway); repeated trips
#: double it up to a minute, so a long outage costs at most one probe a minute.
#: Three trial calls decide ``HALF_OPEN``, and a trial still under way after 30 s
#: opens it again (a trial that hangs cannot hold it half open). A call is slow
#: after 10 s, but only a window of nothing but slow calls trips on slowness (the
#: liveness detector, not the breaker, is the judge of a peer that has stalled).
HEARTBEAT_BREAKER_CONFIG: Final = BreakerConfig(
    window_size=20,
    minimum_number_of_calls=10,
    failure_rate_threshold=50.0,
    slow_call_rate_threshold=100.0,
    slow_call_duration=10.0,
    permitted_calls_in_half_open=3,
    max_trial_duration=30.0,
    wait_in_open=5.0,
    open_backoff_factor=2.0,
    max_wait_in_open=60.0,
    open_jitter=0.2,
)


def default_record_failure(exc: BaseException) -> bool:
    """Any :exc:`Exception` is a failure; ``Cancelled``, ``KeyboardInterrupt`` and
    other :exc:`BaseException` (groups holding one included) are not."""
    return isinstance(exc, Exception)


Listener = Callable[[BreakerTransition], object]


@final
class Breaker:
    """A Trio circuit breaker; build it inside ``trio.run`` (it reads the clock).

    >>> async def demo() -> None:
    ...     breaker = Breaker()
    ...     async with breaker:
    ...         pass  # the call to the peer
    ...     assert breaker.statistics().calls == 1
    >>> trio.run(demo)

    ``record_failure(exc)`` says whether an exception leaving a call counts as
    a failure; when it says no, the call is released without an outcome.
    """

    __slots__ = ("_changed", "_core", "_held", "_listeners", "_moves", "_record_failure")

    def __init__(
        self,
        config: BreakerConfig = HEARTBEAT_BREAKER_CONFIG,
        *,
        record_failure: Callable[[BaseException], bool] = default_record_failure,
    ) -> None:
        self._core = CircuitBreaker(config, now=trio.current_time())
        self._record_failure = record_failure
        self._listeners: list[Listener] = []
        self._changed = trio.Event()
        self._moves = 0  # transitions heard so far
        # Permits held by ``async with`` blocks, per task (a stack for nesting).
        self._held: dict[trio.lowlevel.Task, list[Permit]] = {}
        self._core.add_listener(self._on_transition)

    # -- observing -------------------------------------------------------------

    @property
    def core(self) -> CircuitBreaker:
        """The sans-IO state machine (for bindings; drive it with ``trio.current_time()``)."""
        return self._core

    @property
    def config(self) -> BreakerConfig:
        return self._core.config

    @property
    def state(self) -> BreakerState:
        """The state now (an ``OPEN`` whose wait is over becomes ``HALF_OPEN`` here)."""
        self._core.handle_timeout(trio.current_time())
        return self._core.state

    def statistics(self) -> BreakerStatistics:
        """The state machine's counters as of now."""
        now = trio.current_time()
        self._core.handle_timeout(now)
        return self._core.statistics(now)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(transition)`` at every transition; its errors are logged."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; :exc:`ValueError` if it was not added."""
        self._listeners.remove(listener)

    def __repr__(self) -> str:
        return f"<Breaker {self._core!r}>"

    # -- calls -----------------------------------------------------------------

    async def __aenter__(self) -> None:
        # A cancellation point, as Connection.send is; the call it admits does the
        # yielding (a schedule point here would cost each call a trip through Trio).
        await trio.lowlevel.checkpoint_if_cancelled()
        permit = self._acquire()
        self._held.setdefault(trio.lowlevel.current_task(), []).append(permit)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = trio.lowlevel.current_task()
        stack = self._held[task]
        permit = stack.pop()
        if not stack:
            del self._held[task]
        self._settle(permit, exc)

    async def call(self, fn: Callable[[Unpack[Ts]], Awaitable[T]], *args: *Ts) -> T:
        """``await fn(*args)`` through the breaker; :exc:`CircuitOpen` if refused."""
        # As ``async with self``, without the per-task stack a block needs.
        await trio.lowlevel.checkpoint_if_cancelled()
        permit = self._acquire()
        try:
            result = await fn(*args)
        except BaseException as exc:
            self._settle(permit, exc)
            raise
        self._settle(permit, None)
        return result

    async def call_with_fallback(
        self,
        fn: Callable[[Unpack[Ts]], Awaitable[T]],
        *args: *Ts,
        fallback: Callable[[Exception], Awaitable[T]],
        on_failure: bool = True,
    ) -> T:
        """``await fn(*args)``, or ``await fallback(exc)`` for a degraded answer.

        The fallback gets the :exc:`CircuitOpen` when the breaker refuses the
        call, and, if ``on_failure``, the exception of a call that failed (one
        that ``record_failure`` counts); anything else propagates.
        """
        try:
            return await self.call(fn, *args)
        except CircuitOpen as exc:
            refused: Exception = exc
        except Exception as exc:
            if not (on_failure and self._record_failure(exc)):
                raise
            refused = exc
        return await fallback(refused)

    # -- liveness passthroughs ---------------------------------------------------

    def force_open(self, reason: str) -> bool:
        """Open until :meth:`liveness_restored`; ``False`` if already forced open."""
        return self._core.force_open(trio.current_time(), reason)

    def liveness_restored(self) -> bool:
        """Lift :meth:`force_open` (to ``HALF_OPEN``); ``False`` if it was not forced."""
        return self._core.liveness_restored(trio.current_time())

    # -- waiting ---------------------------------------------------------------

    async def wait_state(self, *states: BreakerState) -> BreakerState:
        """Sleep until the breaker is in one of ``states``; return the one it is in.

        An ``OPEN`` breaker becomes ``HALF_OPEN`` at exactly its ``open_until``
        while a task waits here.
        """
        if not states:
            raise ValueError("wait_state needs at least one state")
        while True:
            current = self.state
            if current in states:
                await trio.lowlevel.checkpoint()
                return current
            changed = self._changed
            deadline = self._core.next_transition
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await changed.wait()

    async def wait_closed(self) -> None:
        """Sleep until the breaker is ``CLOSED``."""
        await self.wait_state(BreakerState.CLOSED)

    # -- inside ----------------------------------------------------------------

    def _acquire(self) -> Permit:
        now = trio.current_time()
        permit = self._core.try_acquire(now)
        if permit is not None:
            if self._core.state is BreakerState.HALF_OPEN:
                self._wake()  # a trial under way moves next_transition: waiters look again
            return permit
        state = self._core.state
        until = self._core.next_transition
        raise CircuitOpen(state, None if until is None else until - now)

    def _settle(self, permit: Permit, exc: BaseException | None) -> None:
        if exc is None:
            permit.success(trio.current_time())
            return
        try:
            failed = self._record_failure(exc)
        except BaseException:
            permit.release()
            raise
        if failed:
            permit.failure(trio.current_time())
        else:
            permit.release()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _on_transition(self, transition: BreakerTransition) -> None:
        self._wake()
        self._moves += 1
        move = self._moves
        for listener in list(self._listeners):
            if self._moves != move:
                return  # a listener moved it again: the later ones heard that, not this
            try:
                listener(transition)
            except Exception:
                logger.exception("breaker listener %r failed on %r", listener, transition)
