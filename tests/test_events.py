"""What the protocol core reports (``_events.py``): its events, ``NEED_DATA`` and its counters.

Events are frozen, slotted values compared by value, made once and never
changed; ``NEED_DATA`` is no event and says so in its repr; the counters start
at zero and count up. Which events the core hands out, and in what order, is
in ``test_protocol.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from trio_heartbeat import NEED_DATA, _events
from trio_heartbeat._events import (
    ConnectionEnded,
    DataReceived,
    Event,
    FrameCounters,
    HandshakeComplete,
    PeerHealthChanged,
    PeerRecovered,
    PeerSuspected,
    PingReceived,
    PongReceived,
)
from trio_heartbeat._frames import HealthStatus, Hello, Role

HELLO = Hello(Role.SERVER, HealthStatus.SERVING, 1000, 3000, 1 << 20, bytes(16))

#: One of every event, with every field set.
EVENTS: list[Event] = [
    HandshakeComplete(HELLO, 0.75),
    DataReceived(b"payload"),
    PingReceived(bytes(8), HealthStatus.DEGRADED),
    PongReceived(bytes(8), HealthStatus.SERVING, 0.25),
    PeerHealthChanged(HealthStatus.NOT_SERVING, HealthStatus.SERVING),
    ConnectionEnded(1000, "bye", by_peer=True, clean=True),
    PeerSuspected(1.5, 0.3),
    PeerRecovered(1.75),
]

# -- NEED_DATA -------------------------------------------------------------------------


def test_need_data_repr() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"


def test_need_data_is_no_event() -> None:
    assert not isinstance(NEED_DATA, Event)
    assert NEED_DATA is NEED_DATA.__class__.NEED_DATA  # one value, compared by identity


# -- the events ----------------------------------------------------------------------


def test_every_event_kind_is_covered() -> None:
    kinds = {getattr(_events, name) for name in _events.__all__}
    kinds = {kind for kind in kinds if isinstance(kind, type) and issubclass(kind, Event)}
    assert {type(event) for event in EVENTS} == kinds - {Event}


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: type(event).__name__)
def test_events_are_frozen_slotted_values(event: Event) -> None:
    value: Any = event  # every Event subclass is a dataclass; the base is not
    assert not hasattr(value, "__dict__")
    copy = dataclasses.replace(value)
    assert copy == event
    assert copy is not event
    field = dataclasses.fields(value)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(event, field, None)


def test_events_compare_by_every_field() -> None:
    assert PongReceived(bytes(8), HealthStatus.SERVING, 0.25) != PongReceived(
        bytes(8), HealthStatus.SERVING, None
    )
    assert ConnectionEnded(1000, "", True, True) != ConnectionEnded(1000, "", False, True)
    assert ConnectionEnded(1000, "", True, True) != ConnectionEnded(1000, "", True, False)
    assert DataReceived(b"a") != DataReceived(b"b")


# -- the counters ----------------------------------------------------------------------


def test_counters_start_at_zero_and_are_plain_counts() -> None:
    counters = FrameCounters()
    assert dataclasses.astuple(counters) == (0,) * 8
    counters.frames_in += 2
    counters.bytes_in += 42
    assert (counters.frames_in, counters.bytes_in, counters.frames_out) == (2, 42, 0)
    assert not hasattr(counters, "__dict__")
