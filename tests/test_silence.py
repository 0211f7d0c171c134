"""THB/1's silence rule (``SilenceRule`` in ``_silence.py``): when a silent peer is declared dead.

A side that hears nothing for its own ``timeout`` convicts the peer, and any
frame counts as hearing from it; a failure detector may convict sooner, but
its verdict is clamped to never less than two of the peer's send intervals;
while our reader is held up the rule is paused, and the silence counts again
from the resumption. Most tests drive the whole sans-IO core in virtual time,
with every deadline checked exactly; :class:`SilenceRule` is also tested on
its own, and one connection shows the clamp in the runtime.
"""

from __future__ import annotations

import doctest
import math
from math import inf

import pytest
import trio
from helpers import (
    CONFIG,
    drain,
    feed,
    handshake_then_drain,
    new_pair,
    open_pair,
    run_body,
    state,
    stream_and_peer,
    types,
)
from trio.testing import MockClock

from trio_heartbeat import NEED_DATA, Config, ConnectionEnded, HeartbeatProtocol, State, _silence
from trio_heartbeat._connection import Connection
from trio_heartbeat._errors import HeartbeatTimeout
from trio_heartbeat._frames import (
    FrameType,
    HealthStatus,
    Role,
    encode_close,
    encode_data,
    encode_ping,
    encode_pong,
)
from trio_heartbeat._options import ConnectionOptions
from trio_heartbeat._silence import FIXED_TIMEOUT, SilenceRule

# -- the silence rule ------------------------------------------------------------------


def test_silent_peer_is_dead_exactly_at_last_received_plus_timeout() -> None:
    server, client = open_pair(Config(), Config(timeout=1.5))
    feed(client, encode_data(b"x"), 4.25)
    assert client.last_received == 4.25
    assert client.liveness_deadline == client.abort_deadline == 5.75
    client.send_data(b"unsent", 5.0)
    client.handle_timeout(5.75 - 2**-20)
    assert state(client) is State.OPEN
    assert drain(client) == []
    assert FrameType.CLOSE not in types(client.data_to_send())
    client.handle_timeout(5.75)
    assert state(client) is State.ERROR
    assert drain(client) == [
        ConnectionEnded(1011, "heartbeat timeout: peer silent", by_peer=False, clean=False)
    ]
    # The CLOSE says why (the §7 vector's code, with the verdict's cause), and queued
    # DATA is dropped.
    assert client.data_to_send() == encode_close(1011, "heartbeat timeout: peer silent")
    assert client.close_code == 1011
    assert client.abort_deadline == client.next_deadline == inf
    assert client.next_event() is NEED_DATA
    client.handle_timeout(100.0)  # terminal: nothing more happens
    assert client.data_to_send() == b""


def test_any_frame_counts_as_liveness() -> None:
    server, client = open_pair()
    for now, data in [
        (1.0, encode_pong(bytes(8), HealthStatus.SERVING)),  # unmatched PONG: not an error
        (2.0, encode_ping(bytes(8), HealthStatus.SERVING)),
        (3.0, encode_data(b"")),
    ]:
        feed(client, data, now)
        assert client.last_received == now
        assert client.abort_deadline == now + 3.0


def test_liveness_deadline_is_inf_unless_open() -> None:
    server, client = new_pair()
    assert client.liveness_deadline == inf
    assert client.abort_deadline == client.next_deadline == 10.0  # the handshake timeout


# -- the detector clamp ----------------------------------------------------------------


class Suggests:
    """A detector that answers ``last_arrival + delay`` and remembers what it saw."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.arrivals: list[float] = []

    def record(self, arrival: float) -> None:
        self.arrivals.append(arrival)

    def suspect_at(self, last_arrival: float, timeout: float) -> float:
        assert timeout == 2.0
        return last_arrival + self.delay


@pytest.mark.parametrize(
    ("delay", "deadline"),
    [
        (0.0, 10.0 + 2 * 0.5),  # too early: one lost heartbeat is never enough
        (-5.0, 11.0),
        (0.75, 11.0),
        (1.0, 11.0),  # exactly the floor
        (1.5, 11.5),  # inside the window: the detector decides
        (2.0, 12.0),  # exactly the bound
        (7.0, 12.0),  # too late: clamped to the timeout
        (inf, 12.0),
    ],
)
def test_detector_is_clamped_to_the_safe_window(delay: float, deadline: float) -> None:
    detector = Suggests(delay)
    server = HeartbeatProtocol(Role.SERVER, Config(interval=0.5), now=0.0)
    client = HeartbeatProtocol(Role.CLIENT, Config(timeout=2.0), now=0.0, detector=detector)
    feed(client, server.data_to_send(), 0.0)
    assert client.peer_send_interval == 0.5  # min(0.5, 2.0 / 2)
    feed(client, encode_data(b"x"), 10.0)
    assert detector.arrivals == [0.0, 10.0]
    assert client.liveness_deadline == deadline
    client.handle_timeout(deadline - 2**-20)
    assert state(client) is State.OPEN
    client.handle_timeout(deadline)
    assert state(client) is State.ERROR
    assert drain(client) == [ConnectionEnded(1011, "heartbeat timeout: peer silent", False, False)]


async def test_custom_detector_convicts_sooner_but_never_before_two_peer_intervals(
    autojump_clock: MockClock,
) -> None:
    class Impatient:
        def record(self, arrival: float) -> None:
            pass

        def suspect_at(self, last_arrival: float, timeout: float) -> float:
            return last_arrival  # "dead at once", which the core clamps

    async def body(conn: Connection) -> None:
        assert conn.watchdog_deadline == 2.0
        await trio.sleep_forever()

    stream, peer = stream_and_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout):
            await run_body(
                stream, body, config=CONFIG, options=ConnectionOptions(detector=Impatient)
            )
        # Floor: two of the peer's send intervals, min(1.0, 3.0 / 2) each.
        assert trio.current_time() == 2.0


# -- pausing and resuming --------------------------------------------------------------


def test_pause_and_resume_liveness() -> None:
    """A pause takes the early verdict away but never the timeout; resuming restarts the silence."""
    server, client = open_pair()
    feed(client, encode_data(b"x"), 1.0)
    client.pause_liveness(2.0)
    client.pause_liveness(2.5)  # a second pause changes nothing
    assert client.liveness_deadline == client.abort_deadline == 4.0  # the timeout alone
    client.handle_timeout(3.5)  # a long silence, but we were not reading
    assert state(client) is State.OPEN
    assert types(client.data_to_send()) == [FrameType.PING]  # still pinging
    client.resume_liveness(3.5)
    assert client.last_received == 1.0  # the last frame, still
    assert client.abort_deadline == 6.5  # the silence counts from the resumption
    client.resume_liveness(5.0)  # not paused: nothing happens
    assert client.abort_deadline == 6.5
    client.pause_liveness(5.0)
    client.handle_timeout(6.5 - 2**-20)
    assert state(client) is State.OPEN
    client.handle_timeout(6.5)  # 3.5 + the 3 s timeout: the verdict comes, paused or not
    assert state(client) is State.ERROR


def test_resume_never_moves_last_received_backwards() -> None:
    _, client = open_pair()
    client.pause_liveness(1.0)
    feed(client, encode_data(b"x"), 5.0)  # read while "paused": the frame still counts
    client.resume_liveness(4.0)
    assert client.last_received == 5.0
    assert client.abort_deadline == 8.0


def test_pause_during_handshake() -> None:
    server = HeartbeatProtocol(Role.SERVER, now=0.0)
    server.pause_liveness(1.0)
    assert server.abort_deadline == 10.0  # the handshake timeout still applies
    server.resume_liveness(2.0)
    assert server.last_received is None


# -- SilenceRule on its own ------------------------------------------------------------


class Recording:
    """A detector that remembers every arrival and answers ``last_arrival + delay``."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.arrivals: list[float] = []

    def record(self, arrival: float) -> None:
        self.arrivals.append(arrival)

    def suspect_at(self, last_arrival: float, timeout: float) -> float:
        return last_arrival + self.delay


def test_no_deadline_before_the_first_frame() -> None:
    rule = SilenceRule(FIXED_TIMEOUT, timeout=3.0)
    assert rule.last_heard is None
    assert rule.deadline == inf


def test_each_frame_is_heard_and_passed_to_the_detector() -> None:
    detector = Recording(delay=10.0)
    rule = SilenceRule(detector, timeout=3.0)
    for now in (1.0, 2.5, 2.5):
        rule.heard(now)
    assert detector.arrivals == [1.0, 2.5, 2.5]
    assert rule.last_heard == 2.5
    assert rule.deadline == 2.5 + 3.0  # the detector's 12.5 is clamped to the timeout


@pytest.mark.parametrize(
    ("delay", "deadline"),
    [(0.0, 10.0 + 1.0), (0.75, 10.0 + 1.0), (1.5, 11.5), (5.0, 10.0 + 2.0)],
    ids=["floor", "below-the-floor", "detector", "timeout"],
)
def test_the_verdict_is_clamped_between_two_peer_intervals_and_the_timeout(
    delay: float, deadline: float
) -> None:
    rule = SilenceRule(Recording(delay), timeout=2.0)
    rule.agree(peer_send_interval=0.5)
    rule.heard(10.0)
    assert rule.deadline == deadline


def test_before_the_handshake_agrees_there_is_no_floor() -> None:
    rule = SilenceRule(Recording(0.25), timeout=2.0)
    rule.heard(1.0)
    assert rule.deadline == 1.25


def test_a_pause_leaves_only_the_timeout_and_the_silence_counts_from_the_resumption() -> None:
    rule = SilenceRule(FIXED_TIMEOUT, timeout=3.0)
    rule.heard(1.0)
    rule.pause(2.0)
    rule.pause(2.5)  # a second pause changes nothing
    assert rule.deadline == 4.0  # the timeout still bounds it
    assert rule.suspect_deadline == inf  # no suspicion while we cannot hear
    assert rule.suspicion(3.0) == 0.0
    assert rule.resume(6.0) == 4.0  # paused since 2.0
    assert rule.last_heard == 1.0  # the last frame, still
    assert rule.deadline == 9.0
    assert rule.resume(7.0) is None  # not paused


def test_a_pause_takes_the_early_verdict_and_the_stretch_away_but_not_the_timeout() -> None:
    rule = SilenceRule(Recording(0.5), timeout=3.0)
    rule.agree(1.0)
    rule.heard(10.0)
    assert rule.deadline == 12.0  # the detector's 10.5, raised to the floor of two intervals
    rule.stretch = 5.0
    assert rule.deadline == 12.5  # our loop is slow: 0.5 s stretched five times
    rule.stretch = 100.0
    assert rule.deadline == 13.0  # never past the timeout
    rule.stretch = 1.0
    rule.pause(11.0)
    assert rule.deadline == 13.0  # we cannot hear: the timeout alone
    rule.resume(11.5)
    assert rule.deadline == 13.5


def test_suspect_after_one_and_a_half_send_intervals_until_the_next_frame() -> None:
    rule = SilenceRule(FIXED_TIMEOUT, timeout=3.0)
    rule.heard(1.0)
    assert rule.suspect_deadline == inf  # no interval agreed yet: no rhythm to be late for
    rule.agree(0.8)
    assert rule.suspect_deadline == 1.0 + 1.2
    rule.heard(2.0)
    assert rule.suspect_deadline == 2.0 + 1.2
    assert rule.suspect_deadline < rule.deadline == 5.0


def test_the_suspicion_level_without_a_model_rises_to_infinity_at_the_timeout() -> None:
    rule = SilenceRule(FIXED_TIMEOUT, timeout=4.0)
    assert rule.suspicion(5.0) == 0.0  # nothing heard yet: nothing to suspect
    rule.heard(10.0)
    assert rule.suspicion(10.0) == 0.0
    assert rule.suspicion(9.0) == 0.0  # a clock read before the frame: no suspicion
    assert rule.suspicion(12.0) == pytest.approx(math.log10(2))  # half the timeout
    assert rule.suspicion(13.6) == pytest.approx(1.0)  # 90%
    assert rule.suspicion(14.0) == rule.suspicion(20.0) == math.inf
    levels = [rule.suspicion(10.0 + step / 10) for step in range(41)]
    assert levels == sorted(levels)


def test_a_detector_without_a_suspicion_level_gets_the_fixed_timeouts() -> None:
    """The protocol asks only for ``record`` and ``suspect_at``: a detector with no ``suspicion``
    of its own gets ``-log10(1 - silence / timeout)``, whatever its verdict."""
    rule = SilenceRule(Recording(0.5), timeout=4.0)
    assert not hasattr(rule.detector, "suspicion")
    rule.heard(10.0)
    assert rule.suspicion(10.0) == 0.0
    assert rule.suspicion(12.0) == -math.log10(0.5)  # half the timeout
    assert rule.suspicion(13.0) == -math.log10(0.25)
    assert rule.suspicion(14.0) == math.inf


def test_the_suspicion_level_is_the_detectors_own_when_it_has_one() -> None:
    class Leveled(Recording):
        def suspicion(self, now: float, last_arrival: float, timeout: float) -> float:
            return (now - last_arrival) * 100 + timeout

    rule = SilenceRule(Leveled(1.0), timeout=3.0)
    rule.heard(1.0)
    assert rule.suspicion(1.5) == 53.0


def test_a_frame_decoded_after_a_resumption_never_moves_the_silence_back() -> None:
    """A frame read before a pause but decoded after the resumption (stamped with the time it
    was read) counts as the last frame, but the silence still counts from the resumption;
    and the last frame never moves back."""
    rule = SilenceRule(FIXED_TIMEOUT, timeout=3.0)
    rule.heard(1.0)
    rule.pause(2.0)
    rule.resume(5.0)
    assert rule.deadline == 8.0
    rule.heard(1.5)
    assert (rule.last_heard, rule.deadline) == (1.5, 8.0)
    rule.heard(0.5)
    assert (rule.last_heard, rule.deadline) == (1.5, 8.0)
    rule.heard(6.0)
    assert (rule.last_heard, rule.deadline) == (6.0, 9.0)


def test_resuming_never_moves_the_last_frame_back() -> None:
    rule = SilenceRule(FIXED_TIMEOUT, timeout=3.0)
    rule.pause(1.0)
    rule.heard(5.0)  # read while paused: it still counts
    assert rule.resume(4.0) == 3.0
    assert rule.last_heard == 5.0
    # And a pause before any frame leaves "never heard" as it is.
    silent = SilenceRule(FIXED_TIMEOUT, timeout=3.0)
    silent.pause(1.0)
    silent.resume(2.0)
    assert silent.last_heard is None


def test_doctests() -> None:
    results = doctest.testmod(_silence)
    assert results.attempted > 0
    assert results.failed == 0
