"""Tests for the failure detectors (trio_heartbeat._detectors).

How the protocol core clamps a detector's verdict is tested in
test_protocol.py (``test_detector_is_clamped_to_the_safe_window``).
"""

from __future__ import annotations

import doctest

from hypothesis import given
from hypothesis import strategies as st

from trio_heartbeat import _detectors
from trio_heartbeat._detectors import FailureDetector, FixedTimeout

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


def test_doctests() -> None:
    results = doctest.testmod(_detectors)
    assert results.attempted > 0
    assert results.failed == 0
