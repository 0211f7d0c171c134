"""What a service supervisor reports (``_service_events.py``): frozen values, compared whole.

A listener or a test matches events by value, so each kind compares equal
exactly when its fields are equal, is immutable, and the base class groups
them; the counters are one frozen record.
"""

from __future__ import annotations

import dataclasses
import doctest

import pytest

from trio_heartbeat import _service_events
from trio_heartbeat._errors import SupervisorGaveUp
from trio_heartbeat._restart import ExitKind
from trio_heartbeat._service_events import (
    ChildAbandoned,
    ChildExited,
    ChildRestarting,
    ChildStarted,
    ChildStopped,
    ServiceEvent,
    ServiceStatistics,
    SupervisorStopped,
)

ERROR = RuntimeError("boom")
GAVE_UP = SupervisorGaveUp("gave up", "w", ExitKind.FAILED, ERROR)
EVENTS = [
    ChildStarted("w"),
    ChildExited("w", ExitKind.FAILED, ERROR),
    ChildRestarting("w", 0.125, ("w", "x")),
    ChildStopped("w"),
    ChildAbandoned("w", 5.0),
    SupervisorStopped(GAVE_UP),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_each_event_is_a_frozen_value(event: ServiceEvent) -> None:
    """Equal to a copy with the same fields, unequal once one field differs, immutable."""
    assert isinstance(event, ServiceEvent)
    fields = dataclasses.fields(event)
    assert dataclasses.replace(event) == event
    first = fields[0].name
    other = dataclasses.replace(event, **{first: None})
    assert other != event
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(event, first, None)


def test_events_of_different_kinds_never_compare_equal() -> None:
    """A stop and a start of the same child are different news."""
    started: ServiceEvent = ChildStarted("w")
    assert started != ChildStopped("w")
    assert ChildExited("w", ExitKind.HUNG, None) != ChildExited("w", ExitKind.NORMAL, None)


def test_statistics_are_one_frozen_record() -> None:
    stats = ServiceStatistics(1, 2, 3, 4, 5, 6, 7, ("a",))
    assert (stats.starts, stats.hung_exits, stats.running) == (1, 4, ("a",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.starts = 0  # type: ignore[misc]


def test_doctests() -> None:
    results = doctest.testmod(_service_events)
    assert (results.failed, results.attempted) == (0, 1)
