"""One side's THB/1 settings (``Config`` in ``_config.py``), checked once when they are made.

Every value THB/1 cannot carry, or that makes no sense, is refused with a
:exc:`ValueError` that names it; the edge values are accepted; the
millisecond values a HELLO announces are computed once, rounded to the
nearest millisecond. Pure values: no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
import doctest
import re

import pytest

from trio_heartbeat import Config, _config

# -- the announced values --------------------------------------------------------------


def test_config_announces_whole_milliseconds() -> None:
    config = Config(interval=0.5, timeout=1.5)
    assert (config.interval_ms, config.timeout_ms) == (500, 1500)
    assert Config(interval=0.0006).interval_ms == 1  # rounds to the nearest ms


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"interval": 0.0}, "interval must be between"),
        ({"interval": 0.0004999}, "interval must be between"),
        ({"timeout": -1.0}, "timeout must be between"),
        ({"timeout": 5e6}, "timeout must be between"),
        ({"interval": 4294967.296}, "interval must be between"),  # 2**32 ms: one too many
        ({"max_frame": 1023}, "max_frame must be at least 1024"),
        ({"max_frame": 1 << 32}, "max_frame must be at least 1024"),
        ({"handshake_timeout": 0.0}, "handshake_timeout must be positive"),
        ({"close_timeout": -0.5}, "close_timeout not negative"),
        ({"instance_id": "x" * 65}, "instance_id must be at most 64"),
        ({"instance_id": "é" * 33}, "instance_id must be at most 64"),
        ({"max_ping_strikes": 0}, "max_ping_strikes must be at least 3"),
        ({"max_ping_strikes": 2}, "max_ping_strikes must be at least 3"),
        ({"status": 7}, "is not a valid HealthStatus"),
    ],
)
def test_config_refuses_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config(**changes)  # type: ignore[arg-type]


def test_config_edge_values_are_fine() -> None:
    Config(close_timeout=0.0, max_ping_strikes=None, max_frame=1024, instance_id="x" * 64)


def test_the_largest_values_the_wire_carries_are_accepted() -> None:
    """HELLO's interval_ms, timeout_ms and max_frame are 4-byte fields (THB/1 §3.4): 0xFFFFFFFF fits.

    A handshake timeout may be as short as the caller likes, well under a second.
    """
    config = Config(
        interval=4294967.295, timeout=4294967.295, max_frame=0xFFFFFFFF, handshake_timeout=0.001
    )
    assert (config.interval_ms, config.timeout_ms) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert config.max_frame == 0xFFFFFFFF
    assert Config(handshake_timeout=1.0).handshake_timeout == 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"handshake_timeout": -1.0},
            "handshake_timeout must be positive and close_timeout not negative",
        ),
        ({"max_ping_strikes": 1}, "max_ping_strikes must be at least 3 (THB/1 §4.6), or None"),
    ],
)
def test_the_fixed_messages_read_exactly(changes: dict[str, object], message: str) -> None:
    """The words a person reads for the two messages that name no value."""
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        Config(**changes)  # type: ignore[arg-type]
    assert str(raised.value) == message


# -- a shared, immutable value ---------------------------------------------------------


def test_config_is_frozen_and_compares_by_its_settings() -> None:
    config = Config(interval=0.5, timeout=1.5, instance_id="node-1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.interval = 1.0  # type: ignore[misc]
    assert config == Config(interval=0.5, timeout=1.5, instance_id="node-1")
    assert config != Config(interval=0.5, timeout=1.5, instance_id="node-2")
    assert not hasattr(config, "__dict__")


def test_the_announced_values_follow_a_replaced_setting() -> None:
    config = dataclasses.replace(Config(), interval=0.25, timeout=0.75)
    assert (config.interval_ms, config.timeout_ms) == (250, 750)
    with pytest.raises(ValueError, match="timeout must be between"):
        dataclasses.replace(config, timeout=0.0)


def test_doctests() -> None:
    results = doctest.testmod(_config)
    assert results.attempted > 0
    assert results.failed == 0
