"""The failure detectors (``_detectors.py``): the fixed timeout, and phi accrual.

:class:`FixedTimeout` is the plain silence rule and holds no state. For
:class:`PhiAccrualDetector`, exact numbers first: for a learned mean and
deviation, :meth:`suspect_at` is ``last + (mean + acceptable_pause + std *
z)``, with ``z`` the standard normal quantile of ``1 - 10 ** -threshold``,
and the tests spell that arithmetic out so that the floats compare equal.
Then the local-stall guard, the bounds on memory and rounding, properties over
arbitrary arrival sequences, and one connection in virtual time convicted
where the core's clamp says. Akka's preset, and the suspicion levels of both
detectors (the fixed timeout's formula, phi). How the core clamps any detector's verdict is
tested in test_silence.py (``test_detector_is_clamped_to_the_safe_window``).
"""

from __future__ import annotations

import doctest
import math
import statistics
from collections import deque
from collections.abc import Iterable
from itertools import accumulate, pairwise
from statistics import NormalDist
from typing import Any

import pytest
import trio
from helpers import CONFIG, pings_then_silence, run_body, stream_and_peer
from hypothesis import assume, given
from hypothesis import strategies as st
from trio.testing import MockClock

from trio_heartbeat import Connection, ConnectionOptions, PhiAccrualDetector, _detectors
from trio_heartbeat._detectors import FailureDetector, FixedTimeout, fixed_suspicion
from trio_heartbeat._errors import HeartbeatTimeout
from trio_heartbeat._frames import CloseCode, FrameType, Role

# -- the fixed timeout -----------------------------------------------------------------


times = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)


@given(arrivals=st.lists(times, max_size=5), last=times, timeout=st.floats(0.001, 1e6))
def test_fixed_timeout_is_the_plain_silence_rule(
    arrivals: list[float], last: float, timeout: float
) -> None:
    detector: FailureDetector = FixedTimeout()
    for arrival in arrivals:
        detector.record(arrival)  # learns nothing
    assert detector.suspect_at(last, timeout) == last + timeout


def test_fixed_timeout_holds_no_state() -> None:
    assert FixedTimeout.__slots__ == ()
    assert FixedTimeout().suspect_at(last_arrival=0.5, timeout=0.25) == 0.75


def test_the_fixed_suspicion_level() -> None:
    """-log10(1 - silence / timeout): 0 at an arrival, 1 at nine tenths, inf from the timeout."""
    assert fixed_suspicion(0.0, 3.0) == 0.0
    assert math.copysign(1.0, fixed_suspicion(0.0, 3.0)) == 1.0  # not -0.0
    assert fixed_suspicion(-1.0, 3.0) == 0.0  # "now" before the arrival
    assert fixed_suspicion(math.nan, 3.0) == 0.0
    assert fixed_suspicion(1.5, 3.0) == -math.log10(0.5)
    assert fixed_suspicion(2.7, 3.0) == pytest.approx(1.0)
    assert fixed_suspicion(3.0, 3.0) == math.inf
    assert fixed_suspicion(1e9, 3.0) == math.inf
    detector = FixedTimeout()
    for now in (10.0, 11.0, 12.9, 13.0, 20.0):
        assert detector.suspicion(now, 10.0, 3.0) == fixed_suspicion(now - 10.0, 3.0)


def test_doctests() -> None:
    results = doctest.testmod(_detectors)
    assert results.attempted > 0
    assert results.failed == 0


# -- the phi accrual detector ----------------------------------------------------------


def z_of(threshold: float) -> float:
    """The quantile as the detector computes it: from the lower tail, which is exact."""
    return -NormalDist().inv_cdf(10.0**-threshold)


#: The default threshold's quantile, about 5.612.
Z8 = z_of(8.0)


def regular(detector: PhiAccrualDetector, until: int, *, start: int = 0) -> float:
    """Record one arrival a second from ``start`` to ``until``; returns the last."""
    for second in range(start, until + 1):
        detector.record(float(second))
    return float(until)


# -- phi accrual: exact numbers --------------------------------------------------------


@pytest.mark.parametrize("threshold", [1.0, 3.0, 8.0, 12.0])
@pytest.mark.parametrize("min_std", [0.1, 0.25])
def test_a_perfectly_regular_peer_is_suspected_min_std_times_z_after_the_mean(
    threshold: float, min_std: float
) -> None:
    detector = PhiAccrualDetector(threshold=threshold, min_std=min_std)
    last = regular(detector, 10)
    assert detector.intervals == (1.0,) * 10
    assert detector.mean == 1.0
    assert detector.std == min_std  # the measured deviation is 0: the floor applies
    suspect = detector.suspect_at(last, timeout=3.0)
    assert suspect == last + (1.0 + 0.0 + min_std * z_of(threshold))
    # The same moment from the stdlib's upper quantile. 1 - 10**-threshold
    # keeps fewer digits of the tail as the threshold grows (at 12, about
    # four), hence the tolerance.
    direct = NormalDist(1.0, min_std).inv_cdf(1 - 10**-threshold)
    assert math.isclose(suspect, last + direct, rel_tol=0.0, abs_tol=1e-6)
    # phi reaches the threshold exactly there.
    assert math.isclose(detector.phi(suspect, last), threshold, rel_tol=1e-9)


def test_high_thresholds_work_where_the_upper_quantile_would_round_to_one() -> None:
    assert 1 - 10**-17 == 1.0
    with pytest.raises(statistics.StatisticsError):
        NormalDist(1.0, 0.1).inv_cdf(1 - 10**-17)
    detector = PhiAccrualDetector(threshold=17.0)
    last = regular(detector, 3)
    suspect = detector.suspect_at(last, 3.0)
    assert suspect == last + (1.0 + 0.1 * z_of(17.0))
    assert round(z_of(17.0), 3) == 8.494
    assert math.isclose(detector.phi(suspect, last), 17.0, rel_tol=1e-9)


def test_the_default_threshold_suspects_a_regular_1s_peer_after_1_561_s() -> None:
    detector = PhiAccrualDetector()
    last = regular(detector, 5)
    assert round(Z8, 6) == 5.612001
    assert detector.suspect_at(last, 3.0) == 5.0 + (1.0 + 0.1 * Z8)
    assert round(detector.suspect_at(last, 3.0) - last, 4) == 1.5612
    assert math.isclose(
        detector.suspect_at(last, 3.0), last + NormalDist(1.0, 0.1).inv_cdf(1 - 1e-8), abs_tol=1e-9
    )


def test_mean_and_deviation_of_an_irregular_peer() -> None:
    detector = PhiAccrualDetector(min_std=0.01)
    for arrival in [0.0, 0.5, 2.0, 2.5, 4.0]:  # intervals 0.5, 1.5, 0.5, 1.5
        detector.record(arrival)
    assert detector.intervals == (0.5, 1.5, 0.5, 1.5)
    assert detector.mean == statistics.fmean(detector.intervals) == 1.0
    assert detector.std == statistics.pstdev(detector.intervals) == 0.5
    assert detector.suspect_at(4.0, 10.0) == 4.0 + (1.0 + 0.5 * Z8)


def test_min_std_is_a_floor_under_a_small_measured_deviation() -> None:
    detector = PhiAccrualDetector(window=4, min_std=0.1)
    for arrival in [0.0, 0.75, 1.75, 2.5, 3.5]:  # intervals 0.75, 1.0, 0.75, 1.0
        detector.record(arrival)
    assert statistics.pstdev(detector.intervals) == 0.125
    assert detector.std == 0.125  # above the floor: measured
    for arrival in [4.375, 5.375, 6.25, 7.25]:  # now 0.875 and 1.0 alternate
        detector.record(arrival)
    assert statistics.pstdev(detector.intervals) == 0.0625
    assert detector.std == 0.1  # below it: the floor


def test_acceptable_pause_moves_the_deadline_and_the_curve() -> None:
    plain = PhiAccrualDetector()
    patient = PhiAccrualDetector(acceptable_pause=0.5)
    for detector in (plain, patient):
        regular(detector, 10)
    assert patient.suspect_at(10.0, 3.0) == 10.0 + (1.0 + 0.5 + 0.1 * Z8)
    assert patient.suspect_at(10.0, 3.0) - plain.suspect_at(10.0, 3.0) == pytest.approx(0.5)
    # phi is the same curve, half a second later.
    assert patient.phi(11.7, 10.0) == pytest.approx(plain.phi(11.2, 10.0), rel=1e-9)


def test_phi_along_a_silence() -> None:
    detector = PhiAccrualDetector()
    regular(detector, 10)
    assert detector.phi(11.0, 10.0) == pytest.approx(math.log10(2))  # the mean: even odds
    # Rising without bound, then past what a float can hold as a probability.
    levels = [detector.phi(10.0 + elapsed, 10.0) for elapsed in (1.2, 1.4, 1.6, 2.0, 4.0)]
    assert levels == sorted(levels)
    assert levels[-1] > 100
    assert detector.phi(20.0, 10.0) == math.inf
    # Long before the mean: no suspicion, and a plain 0.0 (not -0.0).
    early = detector.phi(0.0, 10.0)
    assert early == 0.0
    assert math.copysign(1.0, early) == 1.0


def test_suspicion_is_phi_once_there_is_a_rhythm() -> None:
    """Before two intervals the level is the fixed timeout's; then phi, threshold at the verdict."""
    detector = PhiAccrualDetector()
    detector.record(0.0)
    detector.record(1.0)
    for now in (1.0, 2.0, 3.5, 4.0):
        assert detector.suspicion(now, 1.0, 3.0) == fixed_suspicion(now - 1.0, 3.0)
    assert detector.suspicion(4.0, 1.0, 3.0) == math.inf
    detector.record(2.0)
    for now in (2.0, 3.0, 3.5, 5.0):
        assert detector.suspicion(now, 2.0, 3.0) == detector.phi(now, 2.0)
    verdict = detector.suspect_at(2.0, 3.0)
    assert detector.suspicion(verdict, 2.0, 3.0) == pytest.approx(8.0)


def test_too_little_history_is_the_fixed_timeout() -> None:
    detector = PhiAccrualDetector()
    assert detector.suspect_at(0.0, 3.0) == 3.0
    for arrival, count in [(0.0, 0), (1.0, 1)]:
        detector.record(arrival)
        assert len(detector.intervals) == count
        assert detector.mean is None
        assert detector.std is None
        assert detector.phi(arrival + 100.0, arrival) == 0.0
        assert detector.suspect_at(arrival, 3.0) == arrival + 3.0
    detector.record(2.0)  # the second interval: now it has a rhythm
    assert detector.suspect_at(2.0, 3.0) == 2.0 + (1.0 + 0.1 * Z8)


def test_first_interval_seeds_a_wide_rhythm() -> None:
    detector = PhiAccrualDetector(first_interval=1.0)
    assert detector.intervals == (0.75, 1.25)
    assert detector.mean == 1.0
    assert detector.std == 0.25
    assert detector.suspect_at(0.0, 3.0) == 0.0 + (1.0 + 0.25 * Z8)
    # Real intervals push the seeds out of the window.
    narrow = PhiAccrualDetector(window=3, first_interval=2.0)
    assert narrow.intervals == (1.5, 2.5)
    regular(narrow, 3)
    assert list(narrow.intervals) == [1.0, 1.0, 1.0]


def test_the_window_is_bounded() -> None:
    detector = PhiAccrualDetector(window=3)
    for arrival in [0.0, 1.0, 3.0, 4.0, 5.5, 6.0]:
        detector.record(arrival)
    assert detector.intervals == (1.0, 1.5, 0.5)
    assert detector.mean == 1.0


def test_the_statistics_follow_the_window_as_it_slides() -> None:
    """Each interval that falls out of a full window leaves the mean and the deviation.

    Distinct intervals, checked after every arrival, so that subtracting the wrong
    one, or the wrong amount, shows before the next exact recompute hides it.
    """
    detector = PhiAccrualDetector(window=3, min_std=1e-9)
    for arrival in accumulate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], initial=0.0):
        detector.record(arrival)
        intervals = detector.intervals
        if len(intervals) >= 2:
            assert detector.mean == statistics.fmean(intervals)
            assert detector.std == pytest.approx(statistics.pstdev(intervals), rel=1e-12)
    assert detector.intervals == (5.0, 6.0, 7.0)


class CountingMath:
    """The ``math`` module as ``_detectors`` sees it, counting the calls of ``fsum``."""

    def __init__(self) -> None:
        self.fsums = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(math, name)

    def fsum(self, values: Iterable[float]) -> float:
        self.fsums += 1
        return math.fsum(values)


def test_the_exact_recompute_comes_once_per_turn_of_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """record() is O(1) amortised: the sums are recomputed (two fsum calls, over the whole
    window) after every ``window`` intervals learned, and never in between."""
    counting = CountingMath()
    monkeypatch.setattr(_detectors, "math", counting)
    detector = PhiAccrualDetector(window=4)
    calls = []
    for second in range(13):  # the first arrival, then 12 intervals: three turns
        detector.record(float(second))
        calls.append(counting.fsums)
    assert calls == [0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6]
    assert (detector.mean, detector.std) == (1.0, 0.1)


def test_the_sums_are_recomputed_exactly_each_time_the_window_turns_over() -> None:
    # A huge interval (learned: no timeout was asked about yet) then small ones.
    # Subtracting its square from the running sum of squares leaves rounding
    # error on the scale of 1e12's last bit; the resum at 8 intervals (two
    # turns of a window of 4) removes it.
    arrivals = list(accumulate([0.0, 1e6 + 0.1, *(0.1 * k for k in range(1, 8))]))
    detector = PhiAccrualDetector(window=4, min_std=1e-9)
    for arrival in arrivals:
        detector.record(arrival)
    intervals = detector.intervals
    assert len(intervals) == 4
    assert detector.mean == statistics.fmean(intervals)
    assert detector.std == pytest.approx(statistics.pstdev(intervals), rel=1e-12)
    # The test has teeth: the plain running sums have drifted by then.
    window: deque[float] = deque(maxlen=4)
    total = squares = 0.0
    for interval in (b - a for a, b in pairwise(arrivals)):
        if len(window) == 4:
            total -= window[0]
            squares -= window[0] ** 2
        window.append(interval)
        total += interval
        squares += interval * interval
    assert tuple(window) == intervals
    drifted = math.sqrt(squares / 4 - (total / 4) ** 2)
    assert drifted != pytest.approx(statistics.pstdev(intervals), rel=1e-9)


# -- phi accrual: the local-stall guard ------------------------------------------------


def test_frames_read_together_count_as_one_arrival() -> None:
    # A peer that sends two frames at once every second (say DATA and PING):
    # the zero intervals are not learned, the one-second rhythm is.
    detector = PhiAccrualDetector()
    for second in range(6):
        detector.record(float(second))
        detector.record(float(second))
    assert detector.intervals == (1.0,) * 5
    assert detector.suspect_at(5.0, 3.0) == 5.0 + (1.0 + 0.1 * Z8)


def test_an_interval_longer_than_the_timeout_is_not_learned() -> None:
    detector = PhiAccrualDetector()
    regular(detector, 5)
    detector.suspect_at(5.0, 3.0)
    detector.record(9.0)  # 4 s: we would have convicted at 8.0, had we been watching
    assert detector.intervals == (1.0,) * 5
    detector.record(10.0)  # the rhythm resumes from the late frame
    assert list(detector.intervals) == [1.0] * 6
    assert detector.suspect_at(10.0, 3.0) == 10.0 + (1.0 + 0.1 * Z8)


def test_before_any_timeout_is_known_long_intervals_are_learned() -> None:
    detector = PhiAccrualDetector()
    for arrival in [0.0, 4.0, 8.0]:
        detector.record(arrival)
    assert detector.intervals == (4.0, 4.0)


def test_a_stall_shorter_than_the_timeout_does_not_poison_the_window() -> None:
    # Our loop stalls from 10.0 to 12.5; the peer's PINGs of 11.0 and 12.0
    # are read together at 12.5.
    detector = PhiAccrualDetector()
    regular(detector, 10)
    before = detector.suspect_at(10.0, 3.0)
    assert before == 10.0 + (1.0 + 0.1 * Z8)  # 2.5 s is later than the verdict
    detector.record(12.5)
    detector.record(12.5)
    detector.record(13.5)
    assert detector.intervals == (1.0,) * 11  # the 2.5 s gap is dropped
    assert detector.std == 0.1
    assert detector.suspect_at(13.5, 3.0) == 13.5 + (1.0 + 0.1 * Z8)


def test_a_late_frame_that_comes_alone_is_learned() -> None:
    # Same times, but one frame at 12.5: the peer itself was late.
    detector = PhiAccrualDetector()
    regular(detector, 10)
    detector.suspect_at(10.0, 3.0)
    detector.record(12.5)
    assert detector.intervals == (1.0,) * 10  # held back until the next arrival
    detector.record(13.5)
    assert list(detector.intervals) == [*[1.0] * 10, 2.5, 1.0]
    std = detector.std
    assert std == pytest.approx(statistics.pstdev(detector.intervals))
    assert std is not None
    assert std > 0.4  # learned: the peer is given more room now
    detector.record(14.5)  # once learned, nothing is held any more: on with the rhythm
    assert list(detector.intervals) == [*[1.0] * 10, 2.5, 1.0, 1.0]


def test_an_arrival_before_the_last_counts_as_simultaneous() -> None:
    detector = PhiAccrualDetector()
    regular(detector, 3)
    detector.record(2.5)
    detector.record(4.0)
    assert detector.intervals == (1.0,) * 4


def test_late_intervals_are_held_only_once_there_is_a_rhythm() -> None:
    # With one interval there is no verdict to be late against.
    detector = PhiAccrualDetector()
    detector.suspect_at(0.0, 10.0)
    for arrival in [0.0, 1.0, 6.0, 6.0]:
        detector.record(arrival)
    assert detector.intervals == (1.0, 5.0)


def test_two_intervals_are_already_a_rhythm() -> None:
    """From the second interval on there is a verdict: phi rises, and a late interval is held."""
    detector = PhiAccrualDetector()
    regular(detector, 2)
    assert detector.intervals == (1.0, 1.0)
    assert detector.phi(3.0, 2.0) == pytest.approx(math.log10(2))  # the mean: even odds
    assert detector.suspect_at(2.0, 10.0) == 2.0 + (1.0 + 0.1 * Z8)
    detector.record(5.0)  # 3 s, later than the verdict: held back
    assert detector.intervals == (1.0, 1.0)
    detector.record(5.0)  # a frame read with it: they had been waiting for us
    detector.record(6.0)
    assert list(detector.intervals) == [1.0, 1.0, 1.0]


def test_the_verdict_and_the_timeout_themselves_are_not_longer() -> None:
    """The guard holds back intervals *longer* than the verdict, and ignores those *longer*
    than the timeout: one of exactly the verdict is learned at once, and one of exactly
    the timeout is held like any late interval, not ignored."""
    detector = PhiAccrualDetector()
    regular(detector, 0, start=-10)
    verdict = detector.suspect_at(0.0, 3.0)
    assert verdict == 1.0 + 0.1 * Z8
    detector.record(verdict)  # exactly the verdict after 0.0: on time, learned at once
    assert detector.intervals == (*[1.0] * 10, verdict)

    detector = PhiAccrualDetector()
    regular(detector, 5)
    detector.suspect_at(5.0, 3.0)
    detector.record(8.0)  # exactly the timeout: late, so held, but not ignored
    assert detector.intervals == (1.0,) * 5
    detector.record(9.0)  # it came alone: learned
    assert detector.intervals == (*[1.0] * 5, 3.0, 1.0)


# -- Akka's preset ---------------------------------------------------------------------


def test_akka_preset_has_akkas_defaults() -> None:
    """threshold 8, 1,000 samples, 100 ms minimum deviation, 3 s pause, 1 s first interval."""
    akka = PhiAccrualDetector.akka()
    assert repr(akka) == (
        "PhiAccrualDetector(threshold=8.0, window=1000, min_std=0.1, "
        "acceptable_pause=3.0, first_interval=1.0)"
    )
    assert akka.intervals == (0.75, 1.25)  # seeded from the first interval
    assert akka.suspect_at(0.0, 60.0) == 0.0 + (1.0 + 3.0 + 0.25 * Z8)
    assert PhiAccrualDetector.akka() is not akka  # one per connection


def test_akka_preset_suspects_a_regular_peer_after_4_56_s() -> None:
    """Once 1,000 real intervals have pushed the seeds out: 1 + 3 + 0.1 * 5.61 s."""
    akka = PhiAccrualDetector.akka()
    last = regular(akka, 1000)
    assert akka.intervals == (1.0,) * 1000
    assert akka.suspect_at(last, 60.0) == last + (1.0 + 3.0 + 0.1 * Z8)
    assert round(akka.suspect_at(last, 60.0) - last, 3) == 4.561
    akka.record(last + 1.0)  # the window holds 1,000 samples, as Akka's max-sample-size
    assert len(akka.intervals) == 1000


# -- phi accrual: parameters and shape -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.5}, r"threshold must be between 1 and 300, got 0\.5"),
        ({"threshold": 301.0}, "threshold must be between 1 and 300"),
        ({"threshold": math.nan}, "threshold must be between 1 and 300, got nan"),
        ({"window": 1}, "window must be an integer of at least 2"),
        ({"window": True}, "window must be an integer of at least 2"),
        ({"window": 2.5}, r"window must be an integer of at least 2 .*got 2\.5"),
        ({"min_std": 0.0}, "min_std must be a positive number of seconds, got 0.0"),
        ({"min_std": math.inf}, "min_std must be a positive number of seconds"),
        ({"min_std": math.nan}, "min_std must be a positive number of seconds"),
        ({"acceptable_pause": -0.1}, "acceptable_pause must be a finite number of seconds >= 0"),
        ({"acceptable_pause": math.inf}, "acceptable_pause must be a finite number"),
        ({"first_interval": 0.0}, "first_interval must be None or a positive number"),
        ({"first_interval": -1.0}, "first_interval must be None or a positive number"),
        ({"first_interval": math.inf}, "first_interval must be None or a positive number"),
    ],
)
def test_parameters_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PhiAccrualDetector(**kwargs)


def test_extreme_thresholds_are_accepted() -> None:
    for threshold in (1.0, 300.0):
        detector = PhiAccrualDetector(threshold=threshold)
        regular(detector, 3)
        assert math.isfinite(detector.suspect_at(3.0, 3.0))
    assert z_of(300.0) == pytest.approx(37.047, abs=1e-3)


def test_shape() -> None:
    detector: FailureDetector = PhiAccrualDetector()
    assert not hasattr(detector, "__dict__")
    assert repr(PhiAccrualDetector(first_interval=1.0)) == (
        "PhiAccrualDetector(threshold=8.0, window=100, min_std=0.1, "
        "acceptable_pause=0.0, first_interval=1.0)"
    )


# -- phi accrual: properties -----------------------------------------------------------


thresholds = st.floats(min_value=1.0, max_value=300.0)


gaps = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1e4))


@st.composite
def arrival_sequences(draw: st.DrawFn) -> list[float]:
    """Non-decreasing arrival times, with frames read together now and then."""
    start = draw(st.floats(min_value=-1e9, max_value=1e9))
    return list(accumulate(draw(st.lists(gaps, min_size=1, max_size=40)), initial=start))


def feed(detector: PhiAccrualDetector, arrivals: list[float], timeout: float) -> None:
    """As the core does: record each arrival, then ask for the deadline."""
    for arrival in arrivals:
        detector.record(arrival)
        assert math.isfinite(detector.suspect_at(arrival, timeout))


@given(
    arrivals=arrival_sequences(),
    timeout=st.floats(min_value=0.001, max_value=1e6),
    window=st.integers(min_value=2, max_value=8),
    min_std=st.floats(min_value=1e-6, max_value=10.0),
    pause=st.floats(min_value=0.0, max_value=100.0),
)
def test_the_verdict_is_finite_never_before_the_mean_and_memory_is_bounded(
    arrivals: list[float], timeout: float, window: int, min_std: float, pause: float
) -> None:
    detector = PhiAccrualDetector(window=window, min_std=min_std, acceptable_pause=pause)
    for arrival in arrivals:
        detector.record(arrival)
        assert len(detector.intervals) <= window
        last = arrival
        suspect = detector.suspect_at(last, timeout)
        assert math.isfinite(suspect)
        mean = detector.mean
        if mean is None:
            assert suspect == last + timeout
        else:
            assert suspect >= last + mean
            assert detector.std is not None
            assert detector.std >= min_std


@given(arrivals=arrival_sequences(), low=thresholds, high=thresholds)
def test_the_verdict_is_monotone_in_the_threshold(
    arrivals: list[float], low: float, high: float
) -> None:
    # The normal quantile is computed to within a few units in the last
    # place, so thresholds closer than that may come out in either order.
    assume(abs(high - low) >= 1e-6)
    low, high = sorted((low, high))
    lenient, strict = PhiAccrualDetector(threshold=low), PhiAccrualDetector(threshold=high)
    feed(lenient, arrivals, 3.0)
    feed(strict, arrivals, 3.0)
    last = arrivals[-1]
    assert lenient.suspect_at(last, 3.0) <= strict.suspect_at(last, 3.0)


@given(
    arrivals=arrival_sequences(),
    silences=st.lists(st.floats(min_value=-10.0, max_value=1e4), min_size=2, max_size=10),
    timeout=st.floats(min_value=0.01, max_value=1e3),
    pause=st.floats(min_value=0.0, max_value=10.0),
)
def test_suspicion_is_monotone_in_silence(
    arrivals: list[float], silences: list[float], timeout: float, pause: float
) -> None:
    """For phi (any pause), Akka's preset and the fixed timeout, after any arrivals."""
    detectors: list[PhiAccrualDetector | FixedTimeout] = [
        PhiAccrualDetector(acceptable_pause=pause),
        PhiAccrualDetector.akka(),
        FixedTimeout(),
    ]
    last = arrivals[-1]
    for detector in detectors:
        for arrival in arrivals:
            detector.record(arrival)
            detector.suspect_at(arrival, timeout)
        levels = [detector.suspicion(last + silence, last, timeout) for silence in sorted(silences)]
        assert levels == sorted(levels)
        assert all(level >= 0.0 for level in levels)


# -- phi accrual: in a connection, in virtual time -------------------------------------


#: The peer PINGs at 1, 2, ... PINGS seconds, then falls silent.
PINGS = 5


LAST = float(PINGS)


#: The peer's send interval as we see it, min(1.0, 3.0 / 2), and our timeout.
PEER_INTERVAL = 1.0


TIMEOUT = 3.0


def clamped(phi_time: float) -> float:
    """Where the core puts a detector's verdict (``HeartbeatProtocol.liveness_deadline``)."""
    return max(LAST + 2 * PEER_INTERVAL, min(phi_time, LAST + TIMEOUT))


@pytest.mark.parametrize(
    ("pause", "expected"),
    [
        # 1.561 s after the last PING: raised to the floor of two intervals.
        (0.0, LAST + 2.0),
        # 2.311 s: inside the window, the detector decides.
        (0.75, LAST + (1.0 + 0.75 + 0.1 * Z8)),
        # 3.561 s: capped at the configured timeout.
        (2.0, LAST + 3.0),
    ],
    ids=["floor", "detector", "timeout"],
)
async def test_a_silent_peer_is_convicted_where_the_core_clamps_the_phi_verdict(
    pause: float, expected: float, autojump_clock: MockClock
) -> None:
    made: list[PhiAccrualDetector] = []

    def factory() -> PhiAccrualDetector:
        made.append(PhiAccrualDetector(threshold=8.0, acceptable_pause=pause))
        return made[-1]

    async def body(conn: Connection) -> None:
        await trio.sleep_until(LAST + 0.5)  # the last PING is in
        assert conn.watchdog_deadline == expected
        await trio.sleep_forever()

    stream, peer = stream_and_peer(Role.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pings_then_silence, peer, PINGS)
        with pytest.raises(HeartbeatTimeout):
            await run_body(
                stream,
                body,
                role=Role.SERVER,
                config=CONFIG,
                options=ConnectionOptions(detector=factory),
            )
        assert trio.current_time() == expected
    assert expected == clamped(LAST + (1.0 + pause + 0.1 * Z8))
    (detector,) = made
    # The peer's HELLO at 0.0, then a PING a second.
    assert detector.intervals == (1.0,) * PINGS
    assert peer.frames[-1].type is FrameType.CLOSE
    assert peer.frames[-1].close_code == CloseCode.HEARTBEAT_TIMEOUT
    assert peer.frames[-1].at == expected


async def test_the_fixed_timeout_convicts_the_same_peer_later(autojump_clock: MockClock) -> None:
    async def body(conn: Connection) -> None:
        await trio.sleep_forever()

    stream, peer = stream_and_peer(Role.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pings_then_silence, peer, PINGS)
        with pytest.raises(HeartbeatTimeout):
            await run_body(stream, body, role=Role.SERVER, config=CONFIG)
        assert trio.current_time() == LAST + TIMEOUT
