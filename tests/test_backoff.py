"""Backoff policies: exact seeded checks, property tests, and a fleet's spread."""

from __future__ import annotations

import doctest
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import FrozenInstanceError, replace
from itertools import islice, pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_heartbeat import _backoff
from trio_heartbeat._backoff import (
    DEFAULT_BACKOFF,
    GRPC_BACKOFF,
    GRPC_MIN_CONNECT_TIMEOUT,
    ConstantBackoff,
    DecorrelatedJitterBackoff,
    EqualJitterBackoff,
    ExponentialBackoff,
    FullJitterBackoff,
)

Policy = (
    FullJitterBackoff
    | EqualJitterBackoff
    | ExponentialBackoff
    | DecorrelatedJitterBackoff
    | ConstantBackoff
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "backoff.md"


def envelope(base: float, factor: float, cap: float, n: int) -> float:
    """min(cap, base * factor**n), written out independently of the code under test."""
    try:
        return min(cap, base * factor**n)
    except OverflowError:
        return cap


def take(policy: Iterable[float], count: int) -> list[float]:
    return list(islice(policy, count))


def assert_within_bounds(policy: Policy, delays: list[float]) -> None:
    """Every delay lies in the range its policy's formula allows, exactly."""
    previous = getattr(policy, "base", 0.0)
    for n, delay in enumerate(delays):
        if isinstance(policy, FullJitterBackoff):
            top = envelope(policy.base, policy.factor, policy.cap, n)
            assert 0 <= delay <= top
        elif isinstance(policy, EqualJitterBackoff):
            top = envelope(policy.base, policy.factor, policy.cap, n)
            assert top / 2 <= delay <= top
        elif isinstance(policy, ExponentialBackoff):
            middle = envelope(policy.base, policy.factor, policy.cap, n)
            assert middle * (1 - policy.jitter) <= delay <= middle * (1 + policy.jitter)
        elif isinstance(policy, DecorrelatedJitterBackoff):
            assert policy.base <= delay <= min(policy.cap, previous * policy.factor)
            # Unrolled, the recurrence stays under the next envelope (up to rounding).
            assert delay <= envelope(policy.base, policy.factor, policy.cap, n + 1) * (1 + 1e-9)
            previous = delay
        else:
            assert delay == policy.delay


# -- exact formulas, seeded ----------------------------------------------------


def test_full_jitter_draws_uniformly_below_the_envelope() -> None:
    rng = random.Random(42)
    expected = [rng.uniform(0, min(30.0, 1.0 * 2.0**n)) for n in range(12)]
    assert take(FullJitterBackoff(base=1.0, factor=2.0, cap=30.0, seed=42), 12) == expected


def test_equal_jitter_draws_from_the_upper_half_of_the_envelope() -> None:
    rng = random.Random(42)
    tops = [min(10.0, 0.5 * 3.0**n) for n in range(8)]
    expected = [rng.uniform(top / 2, top) for top in tops]
    assert take(EqualJitterBackoff(base=0.5, factor=3.0, cap=10.0, seed=42), 8) == expected


def test_decorrelated_jitter_follows_the_recurrence() -> None:
    rng = random.Random(42)
    expected, previous = [], 1.0
    for _ in range(20):
        previous = min(15.0, rng.uniform(1.0, previous * 3))
        expected.append(previous)
    assert take(DecorrelatedJitterBackoff(base=1.0, cap=15.0, seed=42), 20) == expected
    assert 15.0 in expected  # the cap was reached and held, not just approached


def test_plain_exponential_is_the_envelope_itself() -> None:
    policy = ExponentialBackoff(base=0.5, factor=2.0, cap=10.0)
    assert take(policy, 8) == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_proportional_jitter_draws_around_the_envelope() -> None:
    rng = random.Random(9)
    middles = [min(50.0, 2.0 * 1.5**n) for n in range(12)]
    expected = [rng.uniform(m * 0.75, m * 1.25) for m in middles]
    policy = ExponentialBackoff(base=2.0, factor=1.5, cap=50.0, jitter=0.25, seed=9)
    assert take(policy, 12) == expected


def test_constant() -> None:
    assert take(ConstantBackoff(0.25), 4) == [0.25, 0.25, 0.25, 0.25]
    assert take(ConstantBackoff(), 1) == [1.0]


@pytest.mark.parametrize(
    "policy",
    [
        FullJitterBackoff(base=0.1, factor=2.0, cap=5.0),
        EqualJitterBackoff(base=0.1, factor=2.0, cap=5.0),
        ExponentialBackoff(base=0.1, factor=2.0, cap=5.0, jitter=0.5),
        DecorrelatedJitterBackoff(base=0.1, cap=5.0),
        ConstantBackoff(0.3),
    ],
    ids=lambda policy: type(policy).__name__,
)
def test_every_delay_is_within_its_bounds(policy: Policy) -> None:
    for seed in range(50):
        seeded = replace(policy, seed=seed)
        assert_within_bounds(seeded, take(seeded, 60))


def test_the_envelope_grows_monotonically_to_the_cap_and_stays() -> None:
    plain = take(ExponentialBackoff(base=0.3, factor=1.7, cap=20.0), 40)
    assert plain == sorted(plain)
    first_capped = plain.index(20.0)
    assert plain[first_capped:] == [20.0] * (40 - first_capped)
    growing = plain[:first_capped]
    assert first_capped == 8  # 0.3 * 1.7**7 = 12.3 < 20 < 0.3 * 1.7**8 = 20.9
    assert all(b / a == pytest.approx(1.7) for a, b in pairwise(growing))


def test_full_jitter_fills_its_envelope_at_every_step() -> None:
    # Over many clients the largest n-th delay comes close to the n-th envelope
    # and none passes it: the jitter spans the envelope, and the envelope grows.
    rng = random.Random(3)
    policy = FullJitterBackoff(base=0.5, factor=2.0, cap=16.0, seed=rng)
    columns = list(zip(*(take(policy, 10) for _ in range(500)), strict=True))
    for n, column in enumerate(columns):
        top = min(16.0, 0.5 * 2.0**n)
        assert 0.95 * top <= max(column) <= top
        assert min(column) <= 0.05 * top
        assert sum(column) / len(column) == pytest.approx(top / 2, rel=0.1)


def test_changing_the_cap_moves_only_the_capped_delays() -> None:
    # The same seed gives the same random stream; the cap only rescales the
    # draws whose envelope it cuts (here from the fourth delay on).
    low = take(FullJitterBackoff(cap=4.0, seed=5), 6)
    high = take(FullJitterBackoff(cap=400.0, seed=5), 6)
    assert low[:3] == high[:3]
    assert low[3:] != high[3:]


# -- limits --------------------------------------------------------------------


def test_cap_bounds_every_delay() -> None:
    policy = FullJitterBackoff(base=1.0, factor=10.0, cap=7.0, seed=1)
    delays = take(policy, 300)
    assert max(delays) <= 7.0
    assert max(delays) > 6.9  # and the cap, not a smaller bound, is what limits them


def test_max_attempts_counts_delays() -> None:
    assert len(list(FullJitterBackoff(max_attempts=7, seed=0))) == 7
    assert list(ConstantBackoff(1.0, max_attempts=0)) == []


def test_max_elapsed_stops_before_the_delay_that_would_pass_it() -> None:
    assert list(ConstantBackoff(2.0, max_elapsed=6.0)) == [2.0, 2.0, 2.0]
    assert list(ConstantBackoff(2.0, max_elapsed=5.9)) == [2.0, 2.0]
    assert list(ExponentialBackoff(base=1.0, max_elapsed=10.0)) == [1.0, 2.0, 4.0]
    assert list(FullJitterBackoff(max_elapsed=0.0, seed=0)) == []


def test_max_elapsed_is_a_prefix_of_the_unlimited_sequence() -> None:
    unlimited = take(FullJitterBackoff(seed=11), 100)
    limited = list(FullJitterBackoff(max_elapsed=40.0, seed=11))
    assert limited == unlimited[: len(limited)]
    assert sum(limited) <= 40.0 < sum(unlimited[: len(limited) + 1])


def test_the_tighter_of_two_limits_wins() -> None:
    assert list(ConstantBackoff(1.0, max_attempts=3, max_elapsed=100.0)) == [1.0] * 3
    assert list(ConstantBackoff(1.0, max_attempts=30, max_elapsed=2.5)) == [1.0] * 2


def test_no_limits_means_endless() -> None:
    assert len(take(DEFAULT_BACKOFF, 10_000)) == 10_000


def test_envelope_survives_float_overflow() -> None:
    # factor**n leaves the floats (n = 1024) long before the envelope reaches
    # the cap: the envelope must then be the cap, not an OverflowError.
    policy = ExponentialBackoff(base=5e-324, factor=2.0, cap=1e300)
    delays = take(policy, 1030)
    assert delays[1023] == 5e-324 * 2.0**1023
    assert delays[1024:] == [1e300] * 6


# -- reproducibility and fresh iterators ---------------------------------------


def test_same_int_seed_same_delays() -> None:
    one = take(EqualJitterBackoff(seed=123), 20)
    assert one == take(EqualJitterBackoff(seed=123), 20)
    assert one != take(EqualJitterBackoff(seed=124), 20)


def test_each_iter_starts_a_fresh_cycle() -> None:
    policy = FullJitterBackoff(base=1.0, cap=1000.0, seed=8)
    first = iter(policy)
    deep = take(first, 12)
    second = iter(policy)
    assert second is not first
    assert take(second, 12) == deep
    assert take(first, 1) != deep[:1]  # the first iterator went on where it was


def test_unseeded_iterators_differ_but_each_starts_small() -> None:
    policy = FullJitterBackoff(base=1.0, cap=1000.0)
    old = iter(policy)
    take(old, 15)
    assert next(iter(policy)) <= 1.0  # a new cycle begins at the smallest envelope
    assert take(policy, 8) != take(policy, 8)


def test_a_shared_random_instance_makes_the_whole_run_reproducible() -> None:
    def run(policy: FullJitterBackoff) -> list[list[float]]:
        return [take(policy, 5) for _ in range(3)]

    first_run = run(FullJitterBackoff(seed=random.Random(5)))
    assert first_run == run(FullJitterBackoff(seed=random.Random(5)))
    assert first_run[0] != first_run[1]  # cycles draw on from the shared stream


def test_policies_are_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        DEFAULT_BACKOFF.cap = 1.0  # type: ignore[misc]


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"),
    [
        (FullJitterBackoff, {"base": -1.0}, ValueError, "base must be a positive"),
        (FullJitterBackoff, {"base": 0.0}, ValueError, "base must be a positive"),
        (EqualJitterBackoff, {"base": math.nan}, ValueError, "base must be a positive"),
        (FullJitterBackoff, {"base": math.inf}, ValueError, "base must be a positive"),
        (FullJitterBackoff, {"factor": 0.5}, ValueError, "factor must be at least 1"),
        (ExponentialBackoff, {"factor": math.inf}, ValueError, "factor must be at least 1"),
        (FullJitterBackoff, {"base": 5.0, "cap": 4.0}, ValueError, "cap must be finite and at"),
        (EqualJitterBackoff, {"cap": math.inf}, ValueError, "cap must be finite and at"),
        (ExponentialBackoff, {"jitter": -0.1}, ValueError, "jitter must be between 0 and 1"),
        (ExponentialBackoff, {"jitter": 1.5}, ValueError, "jitter must be between 0 and 1"),
        (ExponentialBackoff, {"cap": 1e308, "jitter": 1.0}, ValueError, "overflows"),
        (DecorrelatedJitterBackoff, {"cap": 1e308}, ValueError, "overflows"),
        (DecorrelatedJitterBackoff, {"factor": 0.9}, ValueError, "factor must be at least 1"),
        (ConstantBackoff, {"delay": -1.0}, ValueError, "delay must be 0 or more"),
        (ConstantBackoff, {"delay": math.nan}, ValueError, "delay must be 0 or more"),
        (ConstantBackoff, {"max_attempts": -1}, ValueError, "max_attempts must be 0 or more"),
        (ConstantBackoff, {"max_attempts": 2.0}, TypeError, "max_attempts must be an int"),
        (ConstantBackoff, {"max_attempts": True}, TypeError, "max_attempts must be an int"),
        (ConstantBackoff, {"max_elapsed": -0.5}, ValueError, "max_elapsed must be 0 or more"),
        (ConstantBackoff, {"max_elapsed": math.nan}, ValueError, "max_elapsed must be 0 or"),
        (FullJitterBackoff, {"seed": "abc"}, TypeError, "seed must be an int"),
        (FullJitterBackoff, {"seed": 1.5}, TypeError, "seed must be an int"),
        (FullJitterBackoff, {"seed": False}, TypeError, "seed must be an int"),
    ],
)
def test_invalid_parameters_are_refused(
    make: Callable[..., Policy], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make(**kwargs)


def test_edge_values_are_accepted() -> None:
    assert take(ConstantBackoff(0.0, max_elapsed=0.0), 3) == [0.0, 0.0, 0.0]
    flat = take(FullJitterBackoff(base=2.0, cap=2.0, factor=1.0, seed=0), 50)
    assert len(flat) == 50
    assert max(flat) <= 2.0 < 2 * max(flat)
    assert take(ExponentialBackoff(jitter=1.0, seed=0), 1)[0] <= 2.0
    assert take(ConstantBackoff(1.0, max_elapsed=math.inf), 3) == [1.0] * 3


def test_a_huge_cap_is_accepted_while_its_largest_delay_is_finite() -> None:
    """The overflow check is on ``cap * (1 + jitter)``, the largest delay, and nothing more."""
    delays = take(ExponentialBackoff(base=1e308, cap=1e308, jitter=0.5, seed=0), 20)
    assert all(0.5e308 <= delay <= 1.5e308 for delay in delays)
    assert take(ExponentialBackoff(base=1e308, cap=1e308), 2) == [1e308, 1e308]


# -- property tests ------------------------------------------------------------

bases = st.floats(min_value=1e-3, max_value=1e3)
factors = st.floats(min_value=1.0, max_value=10.0)
cap_ratios = st.floats(min_value=1.0, max_value=1e4)
seeds = st.integers(min_value=0, max_value=2**64)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    base, factor, seed = draw(bases), draw(factors), draw(seeds)
    cap = base * draw(cap_ratios)
    kind = draw(st.sampled_from(["full", "equal", "exponential", "decorrelated", "constant"]))
    if kind == "full":
        return FullJitterBackoff(base=base, factor=factor, cap=cap, seed=seed)
    if kind == "equal":
        return EqualJitterBackoff(base=base, factor=factor, cap=cap, seed=seed)
    if kind == "exponential":
        jitter = draw(st.floats(min_value=0.0, max_value=1.0))
        return ExponentialBackoff(base=base, factor=factor, cap=cap, jitter=jitter, seed=seed)
    if kind == "decorrelated":
        return DecorrelatedJitterBackoff(base=base, factor=factor, cap=cap, seed=seed)
    return ConstantBackoff(draw(st.floats(min_value=0.0, max_value=1e3)), seed=seed)


@settings(database=None)
@given(policies())
def test_property_every_delay_is_within_its_envelope(policy: Policy) -> None:
    assert_within_bounds(policy, take(policy, 200))


@settings(database=None)
@given(policies(), st.integers(min_value=0, max_value=60))
def test_property_attempts_never_exceed_max_attempts(policy: Policy, limit: int) -> None:
    assert len(take(replace(policy, max_attempts=limit), limit + 10)) == limit


@settings(database=None)
@given(policies(), st.floats(min_value=0.0, max_value=1e4))
def test_property_sum_never_exceeds_max_elapsed(policy: Policy, budget: float) -> None:
    limited = take(replace(policy, max_elapsed=budget), 500)
    assert sum(limited) <= budget
    unlimited = take(policy, len(limited) + 1)
    assert limited == unlimited[: len(limited)]
    if len(limited) < 500:  # it stopped because the next delay did not fit
        assert sum(unlimited) > budget


# -- a fleet -------------------------------------------------------------------


def busiest_window(times: list[float], width: float) -> int:
    """The most values in any closed window of ``width`` seconds, wherever it starts."""
    ordered = sorted(times)
    return max(bisect_right(ordered, start + width) - i for i, start in enumerate(ordered))


@pytest.mark.parametrize("seed", range(20))
def test_full_jitter_spreads_a_fleet_that_failed_together(seed: int) -> None:
    # 1,000 clients lose the server at the same instant and each starts a
    # reconnect cycle with the default policy. Their first retries should not
    # arrive together: no 100 ms window may hold more than 12% of them. With
    # the 2 s base a window expects 5%; the busiest of all sliding windows
    # stays far below 12% for every seed (with a 1 s base it would not).
    clients = 1000
    fleet = replace(DEFAULT_BACKOFF, seed=random.Random(seed))
    first_retries = [next(iter(fleet)) for _ in range(clients)]
    assert busiest_window(first_retries, 0.1) <= 0.12 * clients
    assert min(first_retries) < 0.01
    assert max(first_retries) > 0.99 * DEFAULT_BACKOFF.base

    # The same fleet without jitter would retry all at once.
    lockstep = ExponentialBackoff(base=DEFAULT_BACKOFF.base)
    assert busiest_window([next(iter(lockstep)) for _ in range(clients)], 0.1) == clients


def test_default_backoff_numbers() -> None:
    assert isinstance(DEFAULT_BACKOFF, FullJitterBackoff)
    assert (DEFAULT_BACKOFF.base, DEFAULT_BACKOFF.factor, DEFAULT_BACKOFF.cap) == (2.0, 2.0, 30.0)
    assert DEFAULT_BACKOFF.max_attempts is None
    assert DEFAULT_BACKOFF.max_elapsed is None
    assert DEFAULT_BACKOFF.seed is None


# -- the gRPC preset -----------------------------------------------------------


def test_grpc_preset_numbers() -> None:
    assert (GRPC_BACKOFF.base, GRPC_BACKOFF.factor, GRPC_BACKOFF.cap) == (1.0, 1.6, 120.0)
    assert GRPC_BACKOFF.jitter == 0.2
    assert GRPC_MIN_CONNECT_TIMEOUT == 20.0


def test_grpc_envelope_and_jitter() -> None:
    unjittered = take(replace(GRPC_BACKOFF, jitter=0.0), 16)
    assert unjittered[:5] == pytest.approx([1.0, 1.6, 2.56, 4.096, 6.5536])
    assert unjittered[10] == pytest.approx(1.6**10)  # 109.95..., the last one below the cap
    assert unjittered[11:] == [120.0] * 5

    below = above = 0
    for seed in range(200):
        delays = take(replace(GRPC_BACKOFF, seed=seed), 16)
        for delay, middle in zip(delays, unjittered, strict=True):
            assert 0.8 * middle <= delay <= 1.2 * middle
            below += delay < middle
            above += delay > middle
    assert below > 1000
    assert above > 1000  # the jitter goes both ways, and the first delay is jittered too


# -- documentation -------------------------------------------------------------


def test_docstring_examples() -> None:
    result = doctest.testmod(_backoff, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted >= 6


def test_docs_examples() -> None:
    result = doctest.testfile(str(DOCS), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted >= 3
