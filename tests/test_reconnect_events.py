"""What the reconnecting client reports (``_reconnect_events.py``): its states, its events, and how they read.

Every event is a frozen value, compared by value (a :class:`Connected`
without its connection), and :func:`describe` gives each kind one line for a
person to read: checked here for every kind directly, and through the log of a
supervisor that fails, backs off, connects and gives up on the memory network.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import cast

import pytest
import trio
import trio.testing
from helpers import ENDPOINT, close_first_with, reconnecting

from trio_heartbeat import (
    AttemptFailed,
    AttemptStarted,
    BackingOff,
    BrokenConnection,
    CloseCode,
    Connected,
    Connection,
    ConstantBackoff,
    Disconnected,
    HeartbeatTimeout,
    ReconnectFailed,
    Stopped,
    SupervisorEvent,
    SupervisorState,
    _reconnect_events,
)
from trio_heartbeat._reconnect_events import describe
from trio_heartbeat.testing import open_memory_network

# -- how the events read, in a supervisor's log ----------------------------------------


async def test_every_event_is_described_in_the_log(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_memory_network() as network:
        network.listen(ENDPOINT, close_first_with(CloseCode.POLICY_VIOLATION))
        with (
            caplog.at_level(logging.INFO, logger="trio_heartbeat.supervisor"),
            pytest.raises(ReconnectFailed),
        ):
            async with reconnecting(
                network, ("nowhere:1", ENDPOINT), backoff=ConstantBackoff(0.25)
            ):
                await trio.sleep_forever()
    messages = [r.getMessage() for r in caplog.records if r.name == "trio_heartbeat.supervisor"]
    assert messages[0] == "attempt 1: connecting to nowhere:1"
    assert messages[1].startswith("attempt 1 to nowhere:1 failed: cannot connect to nowhere:1: ")
    assert messages[2] == "backing off 0.250 s before attempt 2"
    assert messages[4] == f"connected to {ENDPOINT} (attempt 2)"
    assert messages[5].startswith(f"disconnected from {ENDPOINT} (up 1.00 s):")
    assert messages[6].startswith("stopped: not reconnecting after close code 1008")


# -- every kind, directly ---------------------------------------------------------------

#: Stands in for the connection a Connected event carries (never looked at here).
CONNECTION = cast(Connection, object())


#: One event of every kind, and the line describe() gives it.
EXAMPLES: list[tuple[SupervisorEvent, str]] = [
    (AttemptStarted(3, "a:1"), "attempt 3: connecting to a:1"),
    (
        AttemptFailed(2, "[::1]:7400", BrokenConnection(1006, "refused")),
        "attempt 2 to [::1]:7400 failed: refused",
    ),
    (Connected(1, "a:1", CONNECTION), "connected to a:1 (attempt 1)"),
    (
        Disconnected("a:1", HeartbeatTimeout(1011, "heartbeat timeout"), 12.3456),
        "disconnected from a:1 (up 12.35 s): closed with 1011: heartbeat timeout",
    ),
    (BackingOff(4, 0.25), "backing off 0.250 s before attempt 4"),
    (Stopped(None), "stopped"),
    (
        Stopped(ReconnectFailed("gave up after 3 attempt(s)", None, 3)),
        "stopped: gave up after 3 attempt(s)",
    ),
]


@pytest.mark.parametrize(
    ("event", "line"), EXAMPLES, ids=[type(event).__name__ for event, _ in EXAMPLES]
)
def test_describe_gives_every_event_one_line(event: SupervisorEvent, line: str) -> None:
    assert describe(event) == line
    assert "\n" not in describe(event)


def test_the_examples_cover_every_kind_of_event() -> None:
    exported = {getattr(_reconnect_events, name) for name in _reconnect_events.__all__}
    kinds = {
        kind
        for kind in exported
        if isinstance(kind, type)
        and issubclass(kind, SupervisorEvent)
        and kind is not SupervisorEvent
    }
    assert {type(event) for event, _ in EXAMPLES} == kinds
    assert len(kinds) == 6


def test_events_are_frozen_values_and_a_connected_compares_without_its_connection() -> None:
    assert AttemptStarted(1, "a:1") == AttemptStarted(1, "a:1")
    assert AttemptStarted(1, "a:1") != AttemptStarted(2, "a:1")
    other = cast(Connection, object())
    assert Connected(1, "a:1", CONNECTION) == Connected(1, "a:1", other)
    assert "connection" not in repr(Connected(1, "a:1", CONNECTION))
    with pytest.raises(dataclasses.FrozenInstanceError):
        BackingOff(1, 0.5).delay = 1.0  # type: ignore[misc]


def test_the_states_read_as_words() -> None:
    assert [state.value for state in SupervisorState] == [
        "disconnected",
        "connecting",
        "connected",
        "backing off",
        "closed",
    ]
