from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings

# Property tests judge behaviour, not speed: on a loaded 2-core CI machine under
# coverage, data generation and single examples can be slow without anything
# being wrong, so neither per-example deadlines nor the slowness health check
# may fail a run.
settings.register_profile(
    "thb", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("thb")


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead whenever every task is blocked."""
    return trio.testing.MockClock(autojump_threshold=0)
