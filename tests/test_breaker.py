"""The sans-IO circuit breaker: exact transitions at exact times, validation, and a stateful model."""

from __future__ import annotations

import doctest
import math
import random
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from trio_heartbeat import _breaker
from trio_heartbeat._backoff import ExponentialBackoff
from trio_heartbeat._breaker import (
    TRANSITIONS,
    BreakerConfig,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    Permit,
    WindowKind,
)

CLOSED, OPEN, HALF_OPEN, FORCED_OPEN = (
    BreakerState.CLOSED,
    BreakerState.OPEN,
    BreakerState.HALF_OPEN,
    BreakerState.FORCED_OPEN,
)


def config(**overrides: Any) -> BreakerConfig:
    """Small numbers, no jitter: waits of 10, 20, 40, 80, 80, ... seconds."""
    values: dict[str, Any] = {
        "window_size": 4,
        "minimum_number_of_calls": 2,
        "permitted_calls_in_half_open": 2,
        "slow_call_duration": 5.0,
        "wait_in_open": 10.0,
        "max_wait_in_open": 80.0,
        "open_jitter": 0.0,
    }
    values.update(overrides)
    return BreakerConfig(**values)


def breaker_with_log(cfg: BreakerConfig) -> tuple[CircuitBreaker, list[BreakerTransition]]:
    breaker = CircuitBreaker(cfg)
    log: list[BreakerTransition] = []
    breaker.add_listener(log.append)
    return breaker, log


def call(breaker: CircuitBreaker, start: float, end: float, *, failed: bool) -> None:
    """One admitted call from ``start`` to ``end``."""
    permit = breaker.try_acquire(start)
    assert permit is not None
    if failed:
        permit.failure(end)
    else:
        permit.success(end)


def due(breaker: CircuitBreaker) -> float | None:
    """next_transition, read through a call so that mypy does not carry narrowing across steps."""
    return breaker.next_transition


def trip(breaker: CircuitBreaker, at: float) -> None:
    """Two failures ending at ``at`` (enough for config()'s minimum of 2)."""
    call(breaker, at, at, failed=True)
    call(breaker, at, at, failed=True)
    assert breaker.state is OPEN


def test_doctests() -> None:
    """The examples in the module's docstrings run as written."""
    assert doctest.testmod(_breaker).failed == 0


# -- CLOSED -> OPEN -------------------------------------------------------------


def test_count_window_trips_at_the_minimum_number_of_calls() -> None:
    """Nothing trips below the minimum; the call that reaches it at 50% trips at its end time."""
    breaker, log = breaker_with_log(config(minimum_number_of_calls=4))
    call(breaker, 1.0, 1.0, failed=False)
    call(breaker, 2.0, 2.0, failed=True)
    call(breaker, 3.0, 3.0, failed=True)
    assert breaker.state is CLOSED
    assert breaker.statistics().failure_rate is None  # 3 calls < 4
    call(breaker, 4.0, 4.25, failed=False)
    assert breaker.state is OPEN
    assert log == [BreakerTransition(CLOSED, OPEN, 4.25, "failure rate 50.0% >= 50.0%")]
    assert breaker.next_transition == 14.25
    stats = breaker.statistics()
    assert (stats.trips, stats.consecutive_trips, stats.open_until) == (1, 1, 14.25)
    assert stats.state_since == 4.25


def test_count_window_holds_exactly_the_last_n_outcomes() -> None:
    """An old failure falls out of the window; rates count only the last window_size calls."""
    breaker, _ = breaker_with_log(config(window_size=3, minimum_number_of_calls=3))
    outcomes = [True, False, False, False, True]  # failed?
    for now, failed in enumerate(outcomes):
        call(breaker, now, now, failed=failed)
    stats = breaker.statistics()
    assert (stats.calls, stats.failures) == (3, 1)
    assert stats.failure_rate == pytest.approx(100 / 3)
    assert breaker.state is CLOSED
    call(breaker, 5.0, 5.0, failed=True)  # window: S F F
    assert breaker.state is OPEN
    assert breaker.statistics().failures == 2


def test_count_window_forgets_the_slowness_of_the_outcome_it_drops() -> None:
    """A slow call that leaves a count window takes its slow count with it: after a slow
    call and two fast ones in a window of two, 0 of 2 calls are slow."""
    breaker = CircuitBreaker(config(window_size=2, slow_call_rate_threshold=100.0))
    call(breaker, 0.0, 6.0, failed=False)  # 6 s > 5 s: slow
    call(breaker, 6.0, 6.0, failed=False)  # 1 of 2 slow: 50% < 100%
    assert breaker.statistics().slow_calls == 1
    call(breaker, 7.0, 7.0, failed=False)  # the slow one leaves the window
    stats = breaker.statistics()
    assert (stats.calls, stats.failures, stats.slow_calls, stats.slow_call_rate) == (2, 0, 0, 0.0)
    assert breaker.state is CLOSED


def test_time_window_forgets_only_the_slow_calls_of_an_expired_second() -> None:
    """A 10 s window: a fast call in second 0 and a slow one in second 6. At 10.0 second 0
    leaves and the slow call stays counted; at 16.0 second 6 leaves with it."""
    breaker = CircuitBreaker(
        config(window_kind=WindowKind.TIME, window_size=10, minimum_number_of_calls=10)
    )
    call(breaker, 0.0, 0.5, failed=False)
    call(breaker, 0.5, 6.0, failed=False)  # 5.5 s > 5 s: slow
    stats = breaker.statistics(9.999)
    assert (stats.calls, stats.slow_calls) == (2, 1)
    stats = breaker.statistics(10.0)
    assert (stats.calls, stats.failures, stats.slow_calls) == (1, 0, 1)
    stats = breaker.statistics(16.0)
    assert (stats.calls, stats.failures, stats.slow_calls) == (0, 0, 0)
    assert breaker.state is CLOSED


def test_time_window_counts_the_last_whole_seconds() -> None:
    """A 2 s window holds the current second and the one before; older buckets drop at the boundary."""
    breaker, log = breaker_with_log(
        config(window_kind=WindowKind.TIME, window_size=2, minimum_number_of_calls=3)
    )
    call(breaker, 0.5, 0.999, failed=True)
    call(breaker, 1.2, 1.2, failed=False)
    call(breaker, 1.5, 1.9, failed=False)
    assert breaker.statistics(1.999).calls == 3
    assert breaker.statistics(2.0).calls == 2  # second 0 left the window at exactly 2.0
    call(breaker, 2.5, 2.5, failed=True)  # S S F: 33%
    assert breaker.state is CLOSED
    call(breaker, 2.6, 2.7, failed=True)  # S S F F: 50%
    assert breaker.state is OPEN
    assert log[-1].at == 2.7
    assert log[-1].reason == "failure rate 50.0% >= 50.0%"


def test_time_window_may_exceed_its_minimum_over_many_calls_per_second() -> None:
    """Many calls in one second share a bucket; the window forgets them all at once, their
    failures with them (a bucket holds each of its failures, not only the last)."""
    breaker = CircuitBreaker(
        config(window_kind=WindowKind.TIME, window_size=1, minimum_number_of_calls=50)
    )
    permits = [breaker.try_acquire(3.0) for _ in range(10)]
    for permit in permits:
        assert permit is not None
        permit.failure(3.5)
    stats = breaker.statistics(3.99)
    assert (stats.calls, stats.failures, stats.failure_rate) == (10, 10, None)
    stats = breaker.statistics(4.0)
    assert (stats.calls, stats.failures, stats.slow_calls) == (0, 0, 0)
    assert breaker.state is CLOSED


def test_slow_calls_trip_on_the_slow_rate() -> None:
    """A call lasting exactly slow_call_duration is not slow; a longer one is, even when it succeeds."""
    breaker, log = breaker_with_log(config(slow_call_rate_threshold=50.0))
    call(breaker, 0.0, 5.0, failed=False)
    assert breaker.statistics().slow_calls == 0
    call(breaker, 5.0, 10.5, failed=False)
    assert breaker.state is OPEN
    assert log == [BreakerTransition(CLOSED, OPEN, 10.5, "slow call rate 50.0% >= 50.0%")]


def test_infinite_slow_call_duration_never_counts_a_call_as_slow() -> None:
    """slow_call_duration=inf switches the slow-call rule off."""
    breaker = CircuitBreaker(config(slow_call_duration=math.inf, slow_call_rate_threshold=1.0))
    call(breaker, 0.0, 1e9, failed=False)
    call(breaker, 1e9, 2e9, failed=False)
    assert breaker.state is CLOSED
    assert breaker.statistics().slow_call_rate == 0.0


# -- OPEN -> HALF_OPEN -> CLOSED / OPEN -------------------------------------------


def test_open_rejects_until_its_wait_is_over() -> None:
    """Rejected (and counted) just before open_until; the acquire at exactly open_until is a trial."""
    breaker, log = breaker_with_log(config())
    trip(breaker, 3.0)
    assert breaker.try_acquire(12.999) is None
    breaker.handle_timeout(12.999)
    assert breaker.state is OPEN
    assert breaker.statistics().rejected == 1
    permit = breaker.try_acquire(13.0)
    assert isinstance(permit, Permit)
    assert permit.started == 13.0
    assert log[-1] == BreakerTransition(OPEN, HALF_OPEN, 13.0, "open wait over")
    assert breaker.next_transition is None


def test_handle_timeout_moves_to_half_open_at_the_deadline() -> None:
    """The runtime's timer at next_transition is enough, with no call."""
    breaker = CircuitBreaker(config())
    trip(breaker, 0.0)
    deadline = breaker.next_transition
    assert deadline == 10.0
    breaker.handle_timeout(deadline)
    assert breaker.state is HALF_OPEN
    assert breaker.statistics().state_since == 10.0


def test_half_open_admits_at_most_the_cap_and_closes_on_success() -> None:
    """Two trial places; a release gives one back; two successes close at the second's end."""
    breaker, log = breaker_with_log(config())
    trip(breaker, 0.0)
    first, second = breaker.try_acquire(10.0), breaker.try_acquire(10.0)
    assert first is not None
    assert second is not None
    assert breaker.try_acquire(10.5) is None
    second.release()
    third = breaker.try_acquire(11.0)
    assert third is not None
    assert breaker.try_acquire(11.0) is None
    first.success(11.5)
    assert breaker.state is HALF_OPEN
    stats = breaker.statistics()
    assert (stats.calls, stats.failure_rate, stats.in_flight, stats.rejected) == (1, None, 1, 2)
    third.success(12.0)
    assert breaker.state is CLOSED
    assert log[-1] == BreakerTransition(
        HALF_OPEN, CLOSED, 12.0, "trial calls under both thresholds"
    )
    stats = breaker.statistics()
    assert (stats.calls, stats.consecutive_trips, stats.trips) == (0, 0, 1)


def test_a_failed_trial_reopens_for_longer_and_closing_resets_the_wait() -> None:
    """Waits of 10, 20, 40, 80, 80 for trips in a row; after closing, 10 again."""
    breaker = CircuitBreaker(config(permitted_calls_in_half_open=1))
    trip(breaker, 0.0)
    now, waits = 0.0, [10.0]
    for _ in range(4):
        now = breaker.next_transition or math.nan
        call(breaker, now, now, failed=True)
        assert breaker.state is OPEN
        waits.append((breaker.next_transition or math.nan) - now)
    assert waits == [10.0, 20.0, 40.0, 80.0, 80.0]
    assert breaker.statistics().consecutive_trips == 5
    now = breaker.next_transition or math.nan
    call(breaker, now, now, failed=False)
    assert breaker.state is CLOSED
    trip(breaker, now + 1)
    assert breaker.next_transition == now + 1 + 10.0
    assert breaker.statistics().trips == 6


def test_jittered_waits_follow_the_seeded_backoff_capped_at_the_maximum() -> None:
    """The n-th wait in a row is the n-th ExponentialBackoff delay, never above max_wait_in_open."""
    cfg = config(open_jitter=0.5, seed=7, open_backoff_factor=3.0)
    policy = ExponentialBackoff(base=10.0, factor=3.0, cap=80.0, jitter=0.5, seed=7)
    expected = [min(80.0, wait) for wait in islice(policy, 6)]
    assert list(islice(cfg.open_waits(), 6)) == expected
    assert max(expected) == 80.0  # the cap clipped a jittered wait
    breaker = CircuitBreaker(cfg, now=100.0)
    trip(breaker, 100.0)
    assert breaker.next_transition == 100.0 + expected[0]


def test_a_slow_trial_reopens() -> None:
    """In HALF_OPEN the slow-call rate decides too."""
    breaker = CircuitBreaker(config(permitted_calls_in_half_open=1, slow_call_rate_threshold=100.0))
    trip(breaker, 0.0)
    call(breaker, 10.0, 15.5, failed=False)
    assert breaker.state is OPEN
    assert breaker.next_transition == 15.5 + 20.0


# -- liveness -----------------------------------------------------------------------


@pytest.mark.parametrize("start", [CLOSED, OPEN, HALF_OPEN])
def test_force_open_holds_until_liveness_is_restored(start: BreakerState) -> None:
    """Forced open from any state; no timer lifts it; liveness_restored moves it to HALF_OPEN."""
    breaker, log = breaker_with_log(config())
    if start is not CLOSED:
        trip(breaker, 0.0)
    if start is HALF_OPEN:
        breaker.handle_timeout(10.0)
    assert breaker.state is start
    assert breaker.force_open(10.0, "peer convicted") is True
    assert log[-1] == BreakerTransition(start, FORCED_OPEN, 10.0, "peer convicted")
    assert breaker.next_transition is None
    assert breaker.force_open(11.0, "again") is False
    breaker.handle_timeout(1000.0)
    assert breaker.try_acquire(1000.0) is None
    assert breaker.state is FORCED_OPEN
    assert breaker.liveness_restored(1001.0) is True
    assert log[-1] == BreakerTransition(FORCED_OPEN, HALF_OPEN, 1001.0, "liveness restored")
    assert breaker.liveness_restored(1002.0) is False
    assert breaker.try_acquire(1002.0) is not None


def test_liveness_restored_does_nothing_unless_forced_open() -> None:
    """Only FORCED_OPEN is lifted by liveness; an OPEN breaker keeps its wait."""
    breaker, log = breaker_with_log(config())
    assert breaker.liveness_restored(0.0) is False
    trip(breaker, 1.0)
    assert breaker.liveness_restored(2.0) is False
    assert breaker.state is OPEN
    assert len(log) == 1


# -- permits from an earlier state ----------------------------------------------------


def test_outcomes_of_an_ended_state_decide_nothing() -> None:
    """A CLOSED-era call ending in HALF_OPEN neither counts as a trial nor frees a trial place."""
    breaker = CircuitBreaker(config(permitted_calls_in_half_open=1))
    early = [breaker.try_acquire(0.0) for _ in range(3)]
    trip(breaker, 1.0)
    assert breaker.statistics().in_flight == 3
    assert None not in early
    assert early[0] is not None
    assert early[1] is not None
    assert early[2] is not None
    early[0].failure(2.0)  # while OPEN
    breaker.handle_timeout(11.0)
    trial = breaker.try_acquire(11.0)
    assert trial is not None
    early[1].failure(12.0)  # while HALF_OPEN
    early[2].release()
    assert breaker.try_acquire(12.0) is None  # the release freed no trial place
    assert breaker.state is HALF_OPEN
    assert breaker.statistics().calls == 0
    trial.success(13.0)
    assert breaker.state is CLOSED
    assert breaker.statistics().in_flight == 0


def test_a_permit_settles_once() -> None:
    """A second success, failure or release raises and changes no counter."""
    breaker = CircuitBreaker(config())
    permit = breaker.try_acquire(0.0)
    assert permit is not None
    assert repr(permit) == "<Permit started at 0.0, open>"
    permit.success(1.0)
    assert repr(permit) == "<Permit started at 0.0, settled>"
    settled_twice = r"^this permit was already settled$"
    with pytest.raises(RuntimeError, match=settled_twice):
        permit.success(2.0)
    with pytest.raises(RuntimeError, match=settled_twice):
        permit.failure(2.0)
    with pytest.raises(RuntimeError, match=settled_twice):
        permit.release()
    assert breaker.statistics().calls == 1


def test_time_must_not_go_backwards() -> None:
    """Every now is checked against the latest one seen."""
    breaker = CircuitBreaker(config(), now=5.0)
    with pytest.raises(ValueError, match="time went backwards"):
        breaker.try_acquire(4.0)
    permit = breaker.try_acquire(6.0)
    assert permit is not None
    with pytest.raises(ValueError, match="time went backwards"):
        permit.success(5.5)
    with pytest.raises(ValueError, match="time went backwards"):
        breaker.statistics(1.0)


# -- observing --------------------------------------------------------------------


def test_listeners_are_added_and_removed() -> None:
    """A removed listener hears nothing more; removing an unknown one raises ValueError."""
    breaker = CircuitBreaker(config())
    heard: list[BreakerState] = []

    def listener(transition: BreakerTransition) -> None:
        heard.append(transition.state)

    breaker.add_listener(listener)
    trip(breaker, 0.0)
    breaker.remove_listener(listener)
    breaker.handle_timeout(10.0)
    assert heard == [OPEN]
    with pytest.raises(ValueError, match=r"x not in list"):
        breaker.remove_listener(listener)


def test_repr_names_the_state_and_counts() -> None:
    """The repr shows the state, since when, the open deadline and the counters."""
    breaker = CircuitBreaker(config())
    call(breaker, 0.0, 0.5, failed=True)
    assert repr(breaker) == (
        "<CircuitBreaker CLOSED since 0.0: 1 calls, 1 failed, 0 slow, 0 in flight, 0 trips in a row>"
    )
    call(breaker, 1.0, 1.0, failed=False)
    assert repr(breaker) == (
        "<CircuitBreaker OPEN since 1.0 until 11.0: "
        "2 calls, 1 failed, 0 slow, 0 in flight, 1 trips in a row>"
    )


def test_a_trial_that_hangs_opens_the_breaker_again_after_max_trial_duration() -> None:
    """Half open at 10.0 (after a trip at 0.0); a trial admitted at 12.0 never ends: at
    22.0, ten seconds later, the breaker opens again for the doubled wait, and the hung
    permit, settled at last, decides nothing."""
    breaker = CircuitBreaker(config(max_trial_duration=10.0))
    moves: list[BreakerTransition] = []
    breaker.add_listener(moves.append)
    trip(breaker, 0.0)
    breaker.handle_timeout(10.0)
    assert due(breaker) is None  # no trial under way: no limit running
    hung = breaker.try_acquire(12.0)
    assert hung is not None
    quick = breaker.try_acquire(15.0)
    assert quick is not None
    assert due(breaker) == 22.0  # the oldest trial's
    breaker.handle_timeout(21.999)
    assert breaker.state is HALF_OPEN
    breaker.handle_timeout(22.0)
    assert breaker.state is OPEN
    assert moves[-1].reason == "a trial call still under way after 10 s"
    assert due(breaker) == 42.0  # the second trip in a row: 20 s
    hung.success(23.0)
    quick.failure(23.0)
    assert breaker.state is OPEN
    assert breaker.statistics().consecutive_trips == 2


def test_the_limit_follows_the_oldest_trial_still_under_way() -> None:
    """Trials that settle or are released no longer count; the next oldest sets the time."""
    breaker = CircuitBreaker(config(max_trial_duration=5.0, permitted_calls_in_half_open=3))
    trip(breaker, 0.0)
    first, second = breaker.try_acquire(10.0), breaker.try_acquire(11.0)
    assert first is not None
    assert second is not None
    assert due(breaker) == 15.0
    first.release()
    assert due(breaker) == 16.0
    second.success(12.0)
    assert due(breaker) is None
    assert breaker.state is HALF_OPEN
    third = breaker.try_acquire(13.0)
    assert third is not None
    assert due(breaker) == 18.0
    breaker.force_open(14.0, "convicted")
    assert due(breaker) is None  # forced open waits for liveness alone


def test_defaults_are_resilience4j_s_with_a_growing_wait() -> None:
    """The default config, and a breaker built without one."""
    breaker = CircuitBreaker()
    cfg = breaker.config
    assert cfg == BreakerConfig()
    assert (cfg.window_kind, cfg.window_size, cfg.minimum_number_of_calls) == (
        WindowKind.COUNT,
        100,
        100,
    )
    assert (cfg.failure_rate_threshold, cfg.slow_call_rate_threshold) == (50.0, 100.0)
    assert (cfg.slow_call_duration, cfg.permitted_calls_in_half_open) == (60.0, 10)
    assert (cfg.wait_in_open, cfg.open_backoff_factor, cfg.max_wait_in_open) == (60.0, 2.0, 600.0)
    assert cfg.open_jitter == 0.2
    assert cfg.max_trial_duration == math.inf  # resilience4j's 0: wait for ever
    assert breaker.state is CLOSED
    assert breaker.statistics().state_since == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"window_kind": "count"}, "window_kind"),
        ({"window_size": 0}, "window_size"),
        ({"window_size": True}, "window_size"),
        ({"window_size": 2.0}, "window_size"),
        ({"minimum_number_of_calls": 0}, "minimum_number_of_calls"),
        ({"permitted_calls_in_half_open": 0}, "permitted_calls_in_half_open"),
        ({"window_size": 3, "minimum_number_of_calls": 4}, "can never be reached"),
        ({"failure_rate_threshold": 0.0}, "failure_rate_threshold"),
        ({"slow_call_rate_threshold": 100.5}, "slow_call_rate_threshold"),
        ({"failure_rate_threshold": math.nan}, "failure_rate_threshold"),
        ({"slow_call_duration": 0.0}, "slow_call_duration"),
        ({"slow_call_duration": math.nan}, "slow_call_duration"),
        ({"wait_in_open": 0.0}, "wait_in_open must"),
        ({"wait_in_open": math.inf}, "wait_in_open must"),
        ({"max_wait_in_open": 9.0}, "max_wait_in_open"),
        ({"max_wait_in_open": math.inf}, "max_wait_in_open"),
        ({"open_backoff_factor": 0.5}, "open_backoff_factor"),
        ({"open_backoff_factor": math.inf}, "open_backoff_factor"),
        ({"open_jitter": 1.5}, "open_jitter"),
        ({"max_trial_duration": 0.0}, "max_trial_duration"),
        ({"max_trial_duration": math.nan}, "max_trial_duration"),
    ],
)
def test_invalid_configs_raise_value_error(overrides: dict[str, Any], message: str) -> None:
    """Each rule is checked when the config is built, with the field named."""
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_each_rule_accepts_its_boundary_value() -> None:
    """The bounds are where the field docs put them: sub-second call limits and waits,
    max_wait_in_open equal to wait_in_open, a backoff factor of exactly 1 (a constant
    wait), a jitter of exactly 1; and the values work as given."""
    cfg = config(
        slow_call_duration=0.5,
        max_trial_duration=0.5,
        wait_in_open=0.5,
        max_wait_in_open=0.5,
        open_backoff_factor=1.0,
        permitted_calls_in_half_open=1,
    )
    assert list(islice(cfg.open_waits(), 3)) == [0.5, 0.5, 0.5]
    breaker = CircuitBreaker(cfg)
    call(breaker, 0.0, 0.75, failed=False)  # 0.75 s > 0.5 s: slow
    assert breaker.statistics().slow_calls == 1
    call(breaker, 1.0, 1.0, failed=True)  # 1 of 2 failed: 50% trips
    assert breaker.state is OPEN
    assert breaker.next_transition == 1.5
    assert breaker.try_acquire(1.5) is not None
    assert breaker.next_transition == 2.0  # the trial's 0.5 s limit
    assert config(open_jitter=1.0).open_jitter == 1.0


def test_a_time_window_may_be_smaller_than_its_minimum() -> None:
    """Only a count window must hold the minimum: a time window can fill a second with calls."""
    cfg = config(window_kind=WindowKind.TIME, window_size=1, minimum_number_of_calls=10)
    assert cfg.minimum_number_of_calls == 10


def test_a_bad_seed_is_refused_by_the_backoff_policy() -> None:
    """The seed is checked by the ExponentialBackoff the waits come from."""
    with pytest.raises(TypeError, match="seed"):
        config(seed="seven")
    assert config(seed=random.Random(1)).open_jitter == 0.0


# -- the stateful model ----------------------------------------------------------------

SLOW = 2.0


@dataclass
class Held:
    permit: Permit
    started: float
    epoch: int


@dataclass
class Model:
    """What the breaker should hold, kept the simplest way."""

    epoch: int = 0
    #: (end time, failed, slow) of the current CLOSED state's outcomes, all of them.
    window: list[tuple[float, bool, bool]] = field(default_factory=list)
    trials: list[tuple[bool, bool]] = field(default_factory=list)
    trial_admitted: int = 0


class BreakerMachine(RuleBasedStateMachine):
    """Random calls, outcomes, releases, clock advances and liveness events against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.held: list[Held] = []
        self.model = Model()
        self.log: list[BreakerTransition] = []

    @initialize(
        kind=st.sampled_from(WindowKind),
        size=st.integers(1, 5),
        minimum=st.integers(1, 5),
        failure=st.sampled_from([25.0, 50.0, 100.0]),
        slow=st.sampled_from([50.0, 100.0]),
        cap=st.integers(1, 3),
        trial_limit=st.sampled_from([math.inf, 5.0]),
    )
    def build(
        self,
        kind: WindowKind,
        size: int,
        minimum: int,
        failure: float,
        slow: float,
        cap: int,
        trial_limit: float,
    ) -> None:
        if kind is WindowKind.COUNT:
            minimum = min(minimum, size)
        self.config = BreakerConfig(
            window_kind=kind,
            window_size=size,
            minimum_number_of_calls=minimum,
            failure_rate_threshold=failure,
            slow_call_rate_threshold=slow,
            slow_call_duration=SLOW,
            permitted_calls_in_half_open=cap,
            max_trial_duration=trial_limit,
            wait_in_open=3.0,
            max_wait_in_open=12.0,
            open_jitter=0.5,
            seed=0,
        )
        self.breaker = CircuitBreaker(self.config)
        self.breaker.add_listener(self.heard)

    def heard(self, transition: BreakerTransition) -> None:
        previous = self.log[-1].state if self.log else CLOSED
        assert transition.previous is previous
        assert (transition.previous, transition.state) in TRANSITIONS
        assert transition.at == self.now
        self.log.append(transition)
        self.model.epoch += 1
        if transition.state is CLOSED:
            self.model.window = []
        if transition.state is HALF_OPEN:
            self.model.trials = []
            self.model.trial_admitted = 0

    def window_outcomes(self) -> list[tuple[float, bool, bool]]:
        outcomes = self.model.window
        if self.config.window_kind is WindowKind.COUNT:
            return outcomes[-self.config.window_size :]
        oldest = math.floor(self.now) - self.config.window_size
        return [outcome for outcome in outcomes if math.floor(outcome[0]) > oldest]

    def over_threshold(self, outcomes: list[tuple[bool, bool]]) -> bool:
        calls = len(outcomes)
        failed = sum(f for f, _ in outcomes)
        slow = sum(s for _, s in outcomes)
        return (
            100.0 * failed / calls >= self.config.failure_rate_threshold
            or 100.0 * slow / calls >= self.config.slow_call_rate_threshold
        )

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5, 7.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def timeout(self) -> None:
        due, was = self.breaker.next_transition, self.breaker.state
        self.breaker.handle_timeout(self.now)
        if due is not None and self.now >= due:
            # OPEN's wait is over, or a trial has been under way too long.
            assert self.breaker.state is (HALF_OPEN if was is OPEN else OPEN)
            assert self.log[-1].at == self.now
        else:
            assert self.breaker.state is was

    @rule()
    def acquire(self) -> None:
        permit = self.breaker.try_acquire(self.now)
        state = self.breaker.state
        if state in (OPEN, FORCED_OPEN):
            assert permit is None
        elif state is CLOSED:
            assert permit is not None
        elif self.model.trial_admitted < self.config.permitted_calls_in_half_open:
            assert permit is not None
            self.model.trial_admitted += 1
        else:
            assert permit is None
        if permit is not None:
            self.held.append(Held(permit, self.now, self.model.epoch))

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), how=st.sampled_from(["success", "failure", "release"]))
    def settle(self, data: st.DataObject, how: str) -> None:
        held = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        state, current = self.breaker.state, held.epoch == self.model.epoch
        failed, slow = how == "failure", self.now - held.started > SLOW
        expect = state
        if current and how == "release" and state is HALF_OPEN:
            self.model.trial_admitted -= 1
        elif current and how != "release" and state is CLOSED:
            self.model.window.append((self.now, failed, slow))
            outcomes = [(f, s) for _, f, s in self.window_outcomes()]
            enough = len(outcomes) >= self.config.minimum_number_of_calls
            expect = OPEN if enough and self.over_threshold(outcomes) else CLOSED
        elif current and how != "release":  # HALF_OPEN: only it and CLOSED admit
            self.model.trials.append((failed, slow))
            if len(self.model.trials) == self.config.permitted_calls_in_half_open:
                expect = OPEN if self.over_threshold(self.model.trials) else CLOSED
        if how == "release":
            held.permit.release()
        elif failed:
            held.permit.failure(self.now)
        else:
            held.permit.success(self.now)
        assert self.breaker.state is expect

    @rule()
    def force_open(self) -> None:
        was = self.breaker.state
        assert self.breaker.force_open(self.now, "convicted") is (was is not FORCED_OPEN)
        assert self.breaker.state is FORCED_OPEN

    @rule()
    def restore(self) -> None:
        was = self.breaker.state
        assert self.breaker.liveness_restored(self.now) is (was is FORCED_OPEN)
        assert self.breaker.state is (HALF_OPEN if was is FORCED_OPEN else was)

    @invariant()
    def counts_match_the_model(self) -> None:
        stats = self.breaker.statistics(self.now)
        assert stats.in_flight == len(self.held)
        assert stats.state is (self.log[-1].state if self.log else CLOSED)
        if stats.state is CLOSED:
            outcomes = self.window_outcomes()
            assert stats.calls == len(outcomes)
            assert stats.failures == sum(f for _, f, _ in outcomes)
            assert stats.slow_calls == sum(s for _, _, s in outcomes)
        if stats.state is HALF_OPEN:
            assert stats.calls == len(self.model.trials)
            assert stats.failures == sum(f for f, _ in self.model.trials)
            assert self.model.trial_admitted <= self.config.permitted_calls_in_half_open

    @invariant()
    def only_open_and_a_trial_under_way_have_a_deadline(self) -> None:
        deadline, state = self.breaker.next_transition, self.breaker.state
        if state is OPEN:
            assert deadline is not None
            assert 0 < deadline - self.breaker.statistics().state_since <= 12.0
            return
        out = [h.started for h in self.held if h.epoch == self.model.epoch]
        if state is HALF_OPEN and out and math.isfinite(self.config.max_trial_duration):
            assert deadline == min(out) + self.config.max_trial_duration
        else:
            assert deadline is None


BreakerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60)
TestBreakerMachine = BreakerMachine.TestCase


def test_a_core_listener_that_moves_the_breaker_again_supersedes_the_move_it_heard() -> None:
    """As in the Trio layer: the listeners after one that moved the breaker hear only the
    newer move, never the older one after it."""
    breaker = CircuitBreaker(config())
    later: list[BreakerState] = []

    def reopen(transition: BreakerTransition) -> None:
        if transition.state is HALF_OPEN:
            breaker.force_open(transition.at, "still not serving")

    breaker.add_listener(reopen)
    breaker.add_listener(lambda transition: later.append(transition.state))
    breaker.force_open(1.0, "convicted")
    breaker.liveness_restored(2.0)
    assert breaker.state is FORCED_OPEN
    assert later == [FORCED_OPEN, FORCED_OPEN]


def test_a_core_listener_that_moves_the_breaker_away_and_back_supersedes_the_move() -> None:
    """Forced open, lifted and forced open again from a listener: the later listener's
    last word is the newest move, not the stale first one."""
    breaker = CircuitBreaker(config())
    later: list[str] = []

    def bounce(transition: BreakerTransition) -> None:
        if transition.reason == "convicted":
            breaker.liveness_restored(transition.at)
            breaker.force_open(transition.at, "convicted again")

    breaker.add_listener(bounce)
    breaker.add_listener(lambda transition: later.append(transition.reason))
    breaker.force_open(1.0, "convicted")
    assert later == ["liveness restored", "convicted again"]
