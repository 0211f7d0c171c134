"""A circuit breaker: when to stop calling a peer, and when to try again (sans-IO).

Theory of operation
-------------------
The breaker follows the state machine of resilience4j, with one state added
for liveness. It never reads a clock: every method that needs the time takes
``now`` (the runtime passes ``trio.current_time()``), so virtual time drives
it exactly, and ``now`` must never go backwards.

* ``CLOSED``: calls go through. Each call that ends is recorded in a sliding
  window, either the last ``window_size`` outcomes (:attr:`WindowKind.COUNT`)
  or the outcomes of the current second and the ``window_size - 1`` seconds
  before it (:attr:`WindowKind.TIME`, one bucket per whole second of ``now``,
  so memory stays bounded whatever the call rate). Once the window holds at
  least ``minimum_number_of_calls`` outcomes, a failure rate or a slow-call
  rate at or above its threshold trips the breaker.
* ``OPEN``: every call is rejected until ``open_until``; the first
  :meth:`~CircuitBreaker.try_acquire` or :meth:`~CircuitBreaker.handle_timeout`
  at or after it moves to ``HALF_OPEN``. The wait grows with every trip in a
  row, as jittered exponential backoff (an :class:`~._backoff.ExponentialBackoff`
  capped at ``max_wait_in_open``), and starts again from ``wait_in_open``
  once the breaker closes.
* ``HALF_OPEN``: at most ``permitted_calls_in_half_open`` trial calls are
  admitted (a released permit gives its place back). When that many trials
  have ended, their rates decide: under both thresholds closes the breaker,
  otherwise it opens again, for longer.
* ``FORCED_OPEN``: opened from outside by :meth:`~CircuitBreaker.force_open`
  (the liveness binding: the peer was convicted, reported NOT_SERVING or is
  disconnected). Every call is rejected and no timer lifts it; only
  :meth:`~CircuitBreaker.liveness_restored` does, moving it to ``HALF_OPEN``.

A permit belongs to the state it was admitted in: every transition starts a
new *epoch*, and an outcome that arrives after its epoch ended (a call
admitted while ``CLOSED`` that fails after the breaker opened) is counted in
the totals but decides nothing. Every transition is one edge of
:data:`TRANSITIONS`, and listeners hear of each as a :class:`BreakerTransition`.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Final, final

from ._backoff import ExponentialBackoff

__all__ = [
    "TRANSITIONS",
    "BreakerConfig",
    "BreakerState",
    "BreakerStatistics",
    "BreakerTransition",
    "CircuitBreaker",
    "Permit",
    "WindowKind",
]


class BreakerState(Enum):
    """Where a :class:`CircuitBreaker` stands."""

    #: Calls go through and their outcomes are recorded.
    CLOSED = "closed"
    #: Calls are rejected until the open wait is over.
    OPEN = "open"
    #: A few trial calls go through; their outcomes close or reopen the breaker.
    HALF_OPEN = "half_open"
    #: Opened by liveness: rejected until :meth:`CircuitBreaker.liveness_restored`.
    FORCED_OPEN = "forced_open"


class WindowKind(Enum):
    """How the ``CLOSED`` state's sliding window is measured."""

    #: The last ``window_size`` outcomes.
    COUNT = "count"
    #: The outcomes of the last ``window_size`` whole seconds, the current one included.
    TIME = "time"


_S = BreakerState

#: Every edge the breaker may take, and nothing else.
TRANSITIONS: Final[frozenset[tuple[BreakerState, BreakerState]]] = frozenset(
    {
        (_S.CLOSED, _S.OPEN),
        (_S.OPEN, _S.HALF_OPEN),
        (_S.HALF_OPEN, _S.CLOSED),
        (_S.HALF_OPEN, _S.OPEN),
        (_S.CLOSED, _S.FORCED_OPEN),
        (_S.OPEN, _S.FORCED_OPEN),
        (_S.HALF_OPEN, _S.FORCED_OPEN),
        (_S.FORCED_OPEN, _S.HALF_OPEN),
    }
)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    """The breaker's rules; invalid values raise :exc:`ValueError` when built.

    The defaults are resilience4j's, except that the open wait grows.

    >>> config = BreakerConfig(window_size=10, minimum_number_of_calls=5, open_jitter=0.0)
    >>> from itertools import islice
    >>> [round(wait, 1) for wait in islice(config.open_waits(), 6)]
    [60.0, 120.0, 240.0, 480.0, 600.0, 600.0]
    """

    #: Count the last calls or the last seconds.
    window_kind: WindowKind = WindowKind.COUNT
    #: Calls (``COUNT``) or whole seconds (``TIME``) in the sliding window.
    window_size: int = 100
    #: Outcomes the window must hold before a rate can trip the breaker.
    minimum_number_of_calls: int = 100
    #: Percent of failed calls (above 0, at most 100) that trips the breaker.
    failure_rate_threshold: float = 50.0
    #: Percent of slow calls (above 0, at most 100) that trips the breaker.
    slow_call_rate_threshold: float = 100.0
    #: A call that lasts longer than this many seconds is slow; ``math.inf``: never.
    slow_call_duration: float = 60.0
    #: Trial calls admitted while ``HALF_OPEN``, and the outcomes that decide it.
    permitted_calls_in_half_open: int = 10
    #: Seconds a trial call may stay unsettled before ``HALF_OPEN`` gives up on it and
    #: opens again (a trial that hangs would hold its slot for ever); ``math.inf``: never.
    max_trial_duration: float = math.inf
    #: Seconds ``OPEN`` lasts after the first trip in a row.
    wait_in_open: float = 60.0
    #: Each further trip in a row multiplies the wait by this much.
    open_backoff_factor: float = 2.0
    #: The longest wait in ``OPEN``, jitter included.
    max_wait_in_open: float = 600.0
    #: Each wait is its envelope times ``uniform(1 - jitter, 1 + jitter)``; 0 to 1.
    open_jitter: float = 0.2
    #: Randomness for the jitter, as for the backoff policies.
    seed: int | random.Random | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.window_kind, WindowKind):
            raise ValueError(f"window_kind must be a WindowKind, not {self.window_kind!r}")
        for name in ("window_size", "minimum_number_of_calls", "permitted_calls_in_half_open"):
            value = getattr(self, name)
            if not _is_count(value) or value < 1:
                raise ValueError(f"{name} must be an int of at least 1, not {value!r}")
        if self.window_kind is WindowKind.COUNT and self.minimum_number_of_calls > self.window_size:
            raise ValueError(
                f"minimum_number_of_calls ({self.minimum_number_of_calls}) can never be reached "
                f"in a window of {self.window_size} calls"
            )
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            value = getattr(self, name)
            if not 0 < value <= 100:
                raise ValueError(
                    f"{name} must be a percentage above 0 and at most 100, not {value!r}"
                )
        if not self.slow_call_duration > 0:
            raise ValueError(
                f"slow_call_duration must be above 0 seconds, not {self.slow_call_duration!r}"
            )
        if not self.max_trial_duration > 0:
            raise ValueError(
                f"max_trial_duration must be above 0 seconds, not {self.max_trial_duration!r}"
            )
        if not (math.isfinite(self.wait_in_open) and self.wait_in_open > 0):
            raise ValueError(f"wait_in_open must be finite and above 0, not {self.wait_in_open!r}")
        if not (
            math.isfinite(self.max_wait_in_open) and self.max_wait_in_open >= self.wait_in_open
        ):
            raise ValueError(
                f"max_wait_in_open must be finite and at least wait_in_open "
                f"({self.wait_in_open!r} s), not {self.max_wait_in_open!r}"
            )
        if not (math.isfinite(self.open_backoff_factor) and self.open_backoff_factor >= 1):
            raise ValueError(
                f"open_backoff_factor must be finite and at least 1, not {self.open_backoff_factor!r}"
            )
        if not 0 <= self.open_jitter <= 1:
            raise ValueError(f"open_jitter must be between 0 and 1, not {self.open_jitter!r}")
        self.open_waits()  # the policy checks the seed

    def open_waits(self) -> Iterator[float]:
        """A fresh, endless iterator of open waits: one per trip in a row."""
        policy = ExponentialBackoff(
            base=self.wait_in_open,
            factor=self.open_backoff_factor,
            cap=self.max_wait_in_open,
            jitter=self.open_jitter,
            seed=self.seed,
        )
        # The policy jitters after its cap; here the cap is a promise.
        return (min(self.max_wait_in_open, wait) for wait in policy)


@final
@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One move of a breaker, as its listeners hear of it."""

    #: The state it left.
    previous: BreakerState
    #: The state it entered.
    state: BreakerState
    #: The caller's ``now`` at the move.
    at: float
    #: Why, in words: ``"failure rate 60.0% >= 50.0%"``, or force_open's reason.
    reason: str


@final
@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    """A snapshot of a breaker's counters (see :meth:`CircuitBreaker.statistics`)."""

    state: BreakerState
    #: When the breaker entered ``state``.
    state_since: float
    #: Outcomes in the deciding window: the sliding window, or the trials in ``HALF_OPEN``.
    calls: int
    failures: int
    slow_calls: int
    #: Percent of ``calls`` that failed or were slow; ``None`` until there are
    #: enough calls for the rate to count.
    failure_rate: float | None
    slow_call_rate: float | None
    #: Permits admitted and not yet settled, whatever state admitted them.
    in_flight: int
    #: Calls refused since the breaker was made.
    rejected: int
    #: Times the breaker opened on rates, since it was made and since it last closed.
    trips: int
    consecutive_trips: int
    #: When ``OPEN`` ends; ``None`` in any other state.
    open_until: float | None


class _CountWindow:
    """The last ``size`` outcomes, with running totals."""

    __slots__ = ("_outcomes", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        self._outcomes: deque[tuple[bool, bool]] = deque(maxlen=size)
        self.calls = self.failures = self.slow = 0

    def record(self, now: float, failed: bool, slow: bool) -> None:
        if len(self._outcomes) == self._outcomes.maxlen:
            old_failed, old_slow = self._outcomes[0]
            self.calls -= 1
            self.failures -= old_failed
            self.slow -= old_slow
        self._outcomes.append((failed, slow))
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.calls, self.failures, self.slow


class _TimeWindow:
    """Outcomes per whole second of ``now``, for the last ``size`` seconds."""

    __slots__ = ("_buckets", "_size", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        self._size = size
        # [second, calls, failures, slow], oldest first, seconds strictly rising.
        self._buckets: deque[list[int]] = deque()
        self.calls = self.failures = self.slow = 0

    def _expire(self, now: float) -> int:
        second = math.floor(now)
        while self._buckets and self._buckets[0][0] <= second - self._size:
            _, calls, failures, slow = self._buckets.popleft()
            self.calls -= calls
            self.failures -= failures
            self.slow -= slow
        return second

    def record(self, now: float, failed: bool, slow: bool) -> None:
        second = self._expire(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def totals(self, now: float) -> tuple[int, int, int]:
        self._expire(now)
        return self.calls, self.failures, self.slow


def _rate(part: int, whole: int) -> float:
    return 100.0 * part / whole


@final
class Permit:
    """Leave to make one call; settle it exactly once.

    :meth:`success` and :meth:`failure` record the outcome, measured from
    :attr:`started` so that a slow call counts as slow; :meth:`release` gives
    the permit back without an outcome (the call was cancelled, or its error
    says nothing about the peer). Settling twice raises :exc:`RuntimeError`.
    """

    __slots__ = ("_breaker", "_epoch", "_settled", "started")

    def __init__(self, breaker: CircuitBreaker, started: float, epoch: int) -> None:
        self._breaker = breaker
        self._epoch = epoch
        self._settled = False
        #: The ``now`` at which the permit was granted.
        self.started = started

    def success(self, now: float) -> None:
        """The call worked; it still counts as slow if it took too long."""
        self._settle()
        self._breaker._record(self, now, failed=False)

    def failure(self, now: float) -> None:
        """The call failed."""
        self._settle()
        self._breaker._record(self, now, failed=True)

    def release(self) -> None:
        """The call has no outcome to record; its place is given back."""
        self._settle()
        self._breaker._release(self)

    def _settle(self) -> None:
        if self._settled:
            raise RuntimeError("this permit was already settled")
        self._settled = True

    def __repr__(self) -> str:
        settled = "settled" if self._settled else "open"
        return f"<Permit started at {self.started}, {settled}>"


Listener = Callable[[BreakerTransition], object]


@final
class CircuitBreaker:
    """The breaker's state machine, driven by the caller's clock.

    >>> breaker = CircuitBreaker(BreakerConfig(
    ...     window_size=4, minimum_number_of_calls=2, wait_in_open=10.0, open_jitter=0.0))
    >>> for now in (1.0, 2.0):
    ...     breaker.try_acquire(now).failure(now + 0.5)
    >>> breaker.state, breaker.next_transition
    (<BreakerState.OPEN: 'open'>, 12.5)
    >>> breaker.try_acquire(12.0) is None
    True
    >>> trial = breaker.try_acquire(12.5)
    >>> breaker.state
    <BreakerState.HALF_OPEN: 'half_open'>

    Listeners (:meth:`add_listener`) are called synchronously at each
    transition, after the state has changed; an exception from one
    propagates to the caller of the method that caused the transition.
    """

    __slots__ = (
        "_consecutive_trips",
        "_epoch",
        "_in_flight",
        "_listeners",
        "_now",
        "_open_until",
        "_rejected",
        "_since",
        "_state",
        "_trial_admitted",
        "_trials",
        "_trials_out",
        "_trips",
        "_waits",
        "_window",
        "config",
    )

    def __init__(self, config: BreakerConfig | None = None, *, now: float = 0.0) -> None:
        self.config = config if config is not None else BreakerConfig()
        self._state = BreakerState.CLOSED
        self._since = self._now = now
        self._epoch = 0
        self._listeners: list[Listener] = []
        self._window = self._new_window()
        self._trials = _CountWindow(self.config.permitted_calls_in_half_open)
        self._trial_admitted = 0
        self._in_flight = 0
        self._rejected = 0
        self._trips = self._consecutive_trips = 0
        self._open_until: float | None = None
        # The trial calls under way in this HALF_OPEN, oldest first.
        self._trials_out: list[Permit] = []
        self._waits = self.config.open_waits()

    # -- observing -------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state (``OPEN`` until a call or timeout notices the wait is over)."""
        return self._state

    @property
    def next_transition(self) -> float | None:
        """When :meth:`handle_timeout` should next be called: the end of ``OPEN``, the
        moment the oldest trial under way in ``HALF_OPEN`` has taken
        ``max_trial_duration``, or ``None``."""
        if self._open_until is not None:
            return self._open_until
        if self._trials_out and math.isfinite(self.config.max_trial_duration):
            return self._trials_out[0].started + self.config.max_trial_duration
        return None

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(transition)`` at every transition from now on."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; :exc:`ValueError` if it was not added."""
        self._listeners.remove(listener)

    def statistics(self, now: float | None = None) -> BreakerStatistics:
        """The counters, with the time window aged to ``now`` (default: the last time seen)."""
        if now is not None:
            self._observe(now)
        calls, failures, slow = self._deciding_totals()
        enough = calls >= self._deciding_minimum()
        return BreakerStatistics(
            state=self._state,
            state_since=self._since,
            calls=calls,
            failures=failures,
            slow_calls=slow,
            failure_rate=_rate(failures, calls) if enough else None,
            slow_call_rate=_rate(slow, calls) if enough else None,
            in_flight=self._in_flight,
            rejected=self._rejected,
            trips=self._trips,
            consecutive_trips=self._consecutive_trips,
            open_until=self._open_until,
        )

    def __repr__(self) -> str:
        calls, failures, slow = self._deciding_totals()
        until = "" if self._open_until is None else f" until {self._open_until}"
        return (
            f"<CircuitBreaker {self._state.name} since {self._since}{until}: "
            f"{calls} calls, {failures} failed, {slow} slow, {self._in_flight} in flight, "
            f"{self._consecutive_trips} trips in a row>"
        )

    # -- driving ---------------------------------------------------------------

    def try_acquire(self, now: float) -> Permit | None:
        """A permit to make a call at ``now``, or ``None`` if the breaker refuses it."""
        if self._state is BreakerState.CLOSED:  # the common case: nothing can time out
            self._observe(now)
            self._in_flight += 1
            return Permit(self, now, self._epoch)
        self.handle_timeout(now)  # it never leads to CLOSED
        if (
            self._state is BreakerState.HALF_OPEN
            and self._trial_admitted < self.config.permitted_calls_in_half_open
        ):
            self._trial_admitted += 1
            self._in_flight += 1
            permit = Permit(self, now, self._epoch)
            self._trials_out.append(permit)
            return permit
        self._rejected += 1
        return None

    def handle_timeout(self, now: float) -> None:
        """Move ``OPEN`` to ``HALF_OPEN`` if its wait is over at ``now``, and ``HALF_OPEN``
        back to ``OPEN`` if a trial has been under way for ``max_trial_duration``."""
        self._observe(now)
        until = self.next_transition
        if until is None or now < until:
            return
        if self._state is BreakerState.OPEN:
            self._move(BreakerState.HALF_OPEN, now, "open wait over")
        else:
            limit = self.config.max_trial_duration
            self._move(BreakerState.OPEN, now, f"a trial call still under way after {limit:g} s")

    def force_open(self, now: float, reason: str) -> bool:
        """Open the breaker until :meth:`liveness_restored`; ``False`` if it already was."""
        self._observe(now)
        if self._state is BreakerState.FORCED_OPEN:
            return False
        self._move(BreakerState.FORCED_OPEN, now, reason)
        return True

    def liveness_restored(self, now: float) -> bool:
        """Lift :meth:`force_open` (to ``HALF_OPEN``); ``False`` if it was not forced open."""
        self._observe(now)
        if self._state is not BreakerState.FORCED_OPEN:
            return False
        self._move(BreakerState.HALF_OPEN, now, "liveness restored")
        return True

    # -- inside ----------------------------------------------------------------

    def _observe(self, now: float) -> None:
        if now < self._now:
            raise ValueError(f"time went backwards: {now!r} after {self._now!r}")
        self._now = now

    def _new_window(self) -> _CountWindow | _TimeWindow:
        if self.config.window_kind is WindowKind.COUNT:
            return _CountWindow(self.config.window_size)
        return _TimeWindow(self.config.window_size)

    def _deciding_totals(self) -> tuple[int, int, int]:
        if self._state is BreakerState.HALF_OPEN:
            return self._trials.totals(self._now)
        return self._window.totals(self._now)

    def _deciding_minimum(self) -> int:
        if self._state is BreakerState.HALF_OPEN:
            return self.config.permitted_calls_in_half_open
        return self.config.minimum_number_of_calls

    def _release(self, permit: Permit) -> None:
        self._in_flight -= 1
        if permit._epoch == self._epoch and self._state is BreakerState.HALF_OPEN:
            self._trial_admitted -= 1
            self._trials_out.remove(permit)

    def _record(self, permit: Permit, now: float, *, failed: bool) -> None:
        self._observe(now)
        self._in_flight -= 1
        if permit._epoch != self._epoch:
            return  # admitted by a state that is over: it decides nothing now
        slow = now - permit.started > self.config.slow_call_duration
        if self._state is BreakerState.CLOSED:
            self._window.record(now, failed, slow)
        else:  # only CLOSED and HALF_OPEN admit calls
            self._trials_out.remove(permit)
            self._trials.record(now, failed, slow)
        calls, failures, slow_calls = self._deciding_totals()
        if calls < self._deciding_minimum():
            return
        config = self.config
        failure_rate, slow_rate = _rate(failures, calls), _rate(slow_calls, calls)
        if failure_rate >= config.failure_rate_threshold:
            reason = f"failure rate {failure_rate:.1f}% >= {config.failure_rate_threshold}%"
        elif slow_rate >= config.slow_call_rate_threshold:
            reason = f"slow call rate {slow_rate:.1f}% >= {config.slow_call_rate_threshold}%"
        elif self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED, now, "trial calls under both thresholds")
            return
        else:
            return
        self._move(BreakerState.OPEN, now, reason)

    def _move(self, state: BreakerState, now: float, reason: str) -> None:
        previous = self._state
        assert (previous, state) in TRANSITIONS, (previous, state)
        self._state = state
        self._since = now
        self._epoch += 1
        self._open_until = None
        self._trials_out = []
        if state is BreakerState.OPEN:
            self._trips += 1
            self._consecutive_trips += 1
            self._open_until = now + next(self._waits)
        elif state is BreakerState.HALF_OPEN:
            self._trials = _CountWindow(self.config.permitted_calls_in_half_open)
            self._trial_admitted = 0
        elif state is BreakerState.CLOSED:
            self._window = self._new_window()
            self._consecutive_trips = 0
            self._waits = self.config.open_waits()
        transition, epoch = BreakerTransition(previous, state, now, reason), self._epoch
        for listener in list(self._listeners):
            if self._epoch != epoch:
                break  # a listener moved it again: the later ones heard that, not this
            listener(transition)
