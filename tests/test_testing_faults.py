"""The fault controls of the test kit (``testing/_faults.py``): settings, counters, and who they reach.

A :class:`Faults` holds both directions' settings, checked as they are set,
and the terminal events: ``heal`` turns the settings off for one direction or
both, a reset reaches every connection that shares the controls (and none made
later), and the byte counters add up, per connection and over all of them.
Every timing test runs under ``MockClock(autojump_threshold=0)`` (the
``autojump_clock`` fixture), so "arrives at exactly 0.25" is an equality, not a
bound. Times are chosen to be exact binary fractions.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_heartbeat.testing import Direction, Faults, faulty_stream_pair

# -- statistics ------------------------------------------------------------------------


async def test_statistics_add_up(autojump_clock: MockClock) -> None:
    client, server, faults = faulty_stream_pair()
    faults.set_delay(1.0)
    await client.send_all(b"x" * 10)
    await trio.sleep(1)
    await client.send_all(b"y" * 5)
    assert await server.receive_some() == b"x" * 10
    stats = faults.statistics().outbound
    assert (stats.bytes_sent, stats.bytes_delivered, stats.bytes_buffered) == (15, 10, 5)
    await server.aclose()  # the 5 unread bytes are dropped
    stats = client.statistics().outbound
    assert (stats.bytes_sent, stats.bytes_delivered, stats.bytes_dropped) == (15, 10, 5)
    assert stats.bytes_buffered == 0
    assert client.faults is faults


# -- the controls reach every connection that shares them ------------------------------


async def test_reset_reaches_every_pair_sharing_the_controls(autojump_clock: MockClock) -> None:
    shared = Faults()
    first = faulty_stream_pair(shared)
    second = faulty_stream_pair(shared)
    shared.reset()
    for client, server, _ in (first, second):
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()
    client, server, _ = faulty_stream_pair(shared)  # made later: unaffected
    await client.send_all(b"ok")
    assert await server.receive_some() == b"ok"


# -- validation, and heal --------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("delay", -1.0),
        ("delay", float("nan")),
        ("jitter", float("inf")),
        ("rate", 0),
        ("read_limit", 0),
        ("read_interval", -0.5),
    ],
)
def test_settings_are_validated(attribute: str, value: float) -> None:
    faults = Faults()
    with pytest.raises(ValueError, match=attribute):
        setattr(faults.outbound, attribute, value)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        faulty_stream_pair(buffer_size=0)
    with pytest.raises(ValueError, match="peer_sees"):
        Faults().half_open(peer_sees="rst")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Faults().blackhole("outbound")  # type: ignore[arg-type]


def test_heal_turns_every_setting_off() -> None:
    faults = Faults()
    faults.blackhole()
    faults.set_delay(1, 2)
    faults.limit_rate(10)
    faults.slow_reader(1, 3)
    faults.heal(Direction.INBOUND)
    assert faults.outbound.blackholed
    assert (faults.outbound.delay, faults.outbound.jitter, faults.outbound.rate) == (1, 2, 10)
    assert (faults.outbound.read_limit, faults.outbound.read_interval) == (1, 3)
    inbound = faults.inbound
    assert not inbound.blackholed
    assert (inbound.delay, inbound.jitter, inbound.rate, inbound.read_limit) == (0, 0, None, None)
