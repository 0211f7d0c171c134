"""Our heartbeat (``Heartbeat`` in ``_pings.py``): the send rule, health announcements, round trips.

A side PINGs after its send interval of silence (a client after
``CLIENT_LEAD`` of it, so that an idle connection carries one heartbeat, not
two); a change of our health is announced with a PING as soon as the rate
rule allows; a PONG that echoes one of our PINGs measures a round trip, and at
most 32 PINGs are remembered. Most tests drive the whole sans-IO core in
virtual time (every ``now`` passed explicitly, every deadline checked with
``==``; times are binary fractions, and a client's deadlines are computed the
way the core computes them); :class:`Heartbeat` is also tested on its own.
"""

from __future__ import annotations

import doctest
from math import inf

import pytest
from helpers import WireFrame, feed, frames, new_pair, open_pair, run_prompt_pair, state, types
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_heartbeat import (
    Config,
    HandshakeComplete,
    PeerHealthChanged,
    PingReceived,
    PongReceived,
    State,
    _pings,
)
from trio_heartbeat._frames import FrameType, HealthStatus, encode_pong
from trio_heartbeat._handshake import CLIENT_LEAD
from trio_heartbeat._pings import Heartbeat

# -- the send rule ---------------------------------------------------------------------


def test_ping_deadline_is_last_sent_plus_send_interval_and_the_client_leads() -> None:
    server, client = open_pair(Config(interval=0.5), Config(), now=8.0)
    # The client PINGs after CLIENT_LEAD of its send interval of silence.
    assert client.send_interval == 1.0
    lead = client.send_interval * CLIENT_LEAD
    assert client.last_sent == 8.0  # its HELLO
    assert client.ping_deadline == 8.0 + lead
    client.send_data(b"x", 8.5)  # any frame resets the timer
    due = 8.5 + lead
    assert client.ping_deadline == due
    assert client.next_deadline == due  # sooner than the 3 s silence deadline
    client.data_to_send()
    client.handle_timeout(due - 2**-10)
    assert client.data_to_send() == b""
    client.handle_timeout(due)
    [ping] = frames(client.data_to_send())
    assert ping.type is FrameType.PING
    assert client.last_sent == due
    assert client.ping_deadline == due + lead
    assert client.counters.pings_sent == 1
    # The server PINGs after exactly its send interval, its own (shorter) one.
    assert server.send_interval == 0.5
    assert server.ping_deadline == server.last_sent + 0.5 == 8.5
    server.handle_timeout(8.5 - 2**-10)
    assert server.data_to_send() == b""
    server.handle_timeout(8.5)
    assert types(server.data_to_send()) == [FrameType.PING]
    assert server.ping_deadline == 9.0


def test_server_pings_at_once_if_its_hello_is_old() -> None:
    server, client = new_pair()
    feed(client, server.data_to_send(), 0.0)
    feed(server, client.data_to_send(), 2.0)
    # Nothing sent since the HELLO at 0.0: the send interval has already passed.
    assert server.ping_deadline == 1.0
    server.handle_timeout(2.0)
    assert types(server.data_to_send()) == [FrameType.PING]


def test_ping_and_pong_count_as_sent_frames() -> None:
    server, client = open_pair()
    opaque = client.send_ping(0.5)
    feed(server, client.data_to_send(), 0.5)
    assert server.ping_deadline == 1.5  # the PONG, not only our own PINGs, resets the timer
    assert frames(server.data_to_send()) == [WireFrame(FrameType.PONG, opaque + b"\x00")]
    assert client.ping_deadline == 0.5 + 1.0 * CLIENT_LEAD


@pytest.mark.parametrize(
    ("server_config", "client_config"),
    [
        (Config(), Config()),
        (Config(interval=0.25, timeout=1.0), Config(interval=0.25, timeout=1.0)),
        # Half the server's timeout sets the client's pace, its own interval the server's.
        (Config(interval=1.0, timeout=1.0), Config(interval=1.0, timeout=3.0)),
    ],
)
def test_an_idle_server_only_answers_the_client_that_leads(
    server_config: Config, client_config: Config
) -> None:
    server, client = open_pair(server_config, client_config)
    interval = client.send_interval
    assert server.send_interval >= interval
    until = 20 * server.send_interval
    server_pings, client_pings = run_prompt_pair(server, client, until)
    # Each client PING is answered at once, and the PONG restarts the
    # server's timer before it would fire: the server never PINGs.
    assert server_pings == []
    assert server.counters.pings_sent == 0
    expected = []
    at = 0.0
    while (at := at + interval * CLIENT_LEAD) <= until:
        expected.append(at)
    assert client_pings == expected
    assert client.counters.pings_sent == client.counters.pongs_received == len(expected)
    # The lead never makes the client's PINGs strikes under the rate rule.
    assert server.ping_strikes == 0
    assert state(server) is state(client) is State.OPEN


@settings(max_examples=100)
@given(
    server_config=st.builds(
        Config,
        interval=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
        timeout=st.sampled_from([1.0, 1.5, 2.0, 3.0, 6.0]),
    ),
    client_config=st.builds(
        Config,
        interval=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
        timeout=st.sampled_from([1.0, 1.5, 2.0, 3.0, 6.0]),
    ),
)
def test_an_idle_pair_has_one_heartbeat_and_no_strikes(
    server_config: Config, client_config: Config
) -> None:
    server, client = open_pair(server_config, client_config)
    interval = client.send_interval
    assert server.peer_send_interval == interval  # what the rate rule measures against
    until = 20 * max(server.send_interval, interval)
    server_pings, client_pings = run_prompt_pair(server, client, until)
    assert server.ping_strikes == client.ping_strikes == 0
    assert state(server) is state(client) is State.OPEN
    # Only one side heartbeats, the other only answers: the client, unless the
    # server's own send interval is shorter than the client's lead.
    if server.send_interval > interval * CLIENT_LEAD:
        assert server_pings == []
        assert len(client_pings) == int(until / (interval * CLIENT_LEAD))
    else:
        assert client_pings == []
        assert len(server_pings) == int(until / server.send_interval)


# -- round trips -----------------------------------------------------------------------


def test_rtt_and_srtt_from_pongs() -> None:
    server, client = open_pair()
    assert (client.rtt, client.srtt) == (None, None)
    opaque = client.send_ping(5.0)
    assert opaque == (1).to_bytes(8, "big")
    assert client.earliest_ping == 5.5
    feed(server, client.data_to_send(), 5.0)
    events = feed(client, server.data_to_send(), 5.25)
    assert events == [PongReceived(opaque, HealthStatus.SERVING, 0.25)]
    assert client.rtt == client.srtt == 0.25

    second = client.send_ping(6.0)
    assert second != opaque
    feed(server, client.data_to_send(), 6.0)
    [pong] = feed(client, server.data_to_send(), 6.5)
    assert pong == PongReceived(second, HealthStatus.SERVING, 0.5)
    assert client.rtt == 0.5
    assert client.srtt == 0.25 + (0.5 - 0.25) / 8
    assert client.counters.pongs_received == 2

    # An unmatched (or repeated) PONG is no error and has no RTT.
    [pong] = feed(client, encode_pong(second, HealthStatus.SERVING), 7.0)
    assert pong == PongReceived(second, HealthStatus.SERVING, None)
    assert client.rtt == 0.5
    assert client.last_received == 7.0


def test_only_the_latest_32_pings_are_remembered() -> None:
    server, client = open_pair(Config(max_ping_strikes=None))
    opaques = [client.send_ping(float(i)) for i in range(33)]
    feed(server, client.data_to_send(), 40.0)
    pongs = feed(client, server.data_to_send(), 40.0)
    assert [pong.opaque for pong in pongs] == opaques  # type: ignore[attr-defined]
    assert pongs[0] == PongReceived(opaques[0], HealthStatus.SERVING, None)
    assert pongs[1] == PongReceived(opaques[1], HealthStatus.SERVING, 39.0)
    assert pongs[-1] == PongReceived(opaques[-1], HealthStatus.SERVING, 8.0)


# -- health announcements --------------------------------------------------------------


def test_set_health_schedules_a_ping_as_early_as_the_rate_rule_allows() -> None:
    server, client = open_pair()
    assert client.send_interval == 1.0
    assert client.earliest_ping == -inf
    # No PING sent yet: the rate rule allows one at once.
    client.set_health(HealthStatus.DEGRADED, 0.25)
    assert client.ping_deadline == 0.25
    client.handle_timeout(0.25)
    [ping] = frames(client.data_to_send())
    assert ping == WireFrame(FrameType.PING, (1).to_bytes(8, "big") + b"\x01")
    lead = client.send_interval * CLIENT_LEAD  # a client's regular PING
    assert client.ping_deadline == 0.25 + lead

    # Too soon after that PING: the deadline is the earliest allowed moment.
    client.set_health(HealthStatus.NOT_SERVING, 0.5)
    assert client.earliest_ping == 0.75
    assert client.ping_deadline == 0.75
    client.handle_timeout(0.75 - 2**-20)
    assert client.data_to_send() == b""
    client.handle_timeout(0.75)
    assert frames(client.data_to_send())[0].payload[-1] == 2

    # Late enough: at once.
    client.set_health(HealthStatus.SERVING, 1.5)
    assert client.ping_deadline == 1.5
    # The same status again changes nothing.
    client.handle_timeout(1.5)
    client.data_to_send()
    client.set_health(HealthStatus.SERVING, 1.75)
    assert client.ping_deadline == 1.5 + lead

    # A health PING never waits longer than the send rule would.
    client.send_ping(3.0)
    client.send_data(b"x", 3.25)
    client.set_health(HealthStatus.DEGRADED, 3.25)
    assert client.earliest_ping == 3.5
    assert client.ping_deadline == 3.5
    assert state(server) is State.OPEN


def test_set_health_before_open_goes_into_the_client_hello() -> None:
    server, client = new_pair()
    client.set_health(HealthStatus.DEGRADED, 0.0)
    feed(client, server.data_to_send(), 0.0)
    [done] = feed(server, client.data_to_send(), 0.0)
    assert isinstance(done, HandshakeComplete)
    assert done.peer.status is HealthStatus.DEGRADED
    assert client.ping_deadline == 1.0 * CLIENT_LEAD  # the HELLO carried it: no extra PING


def test_server_health_change_during_handshake_is_pinged_once_open() -> None:
    server, client = new_pair()
    feed(client, server.data_to_send(), 0.0)  # the server HELLO says SERVING
    server.set_health(HealthStatus.NOT_SERVING, 0.25)
    feed(server, client.data_to_send(), 0.5)
    assert server.ping_deadline == 0.25
    server.handle_timeout(0.5)
    events = feed(client, server.data_to_send(), 0.5)
    assert events[0] == PeerHealthChanged(HealthStatus.NOT_SERVING, HealthStatus.SERVING)
    assert isinstance(events[1], PingReceived)


def test_set_health_when_closed_only_changes_the_status() -> None:
    server, client = open_pair()
    client.close(now=1.0)
    client.set_health(HealthStatus.DEGRADED, 1.0)
    assert client.health is HealthStatus.DEGRADED
    assert client.ping_deadline == inf


# -- Heartbeat on its own --------------------------------------------------------------


def test_nothing_is_due_before_the_handshake_agrees_the_interval() -> None:
    heartbeat = Heartbeat()
    assert heartbeat.send_interval == inf
    assert heartbeat.due(last_sent=5.0) == inf
    assert heartbeat.earliest == -inf  # no PING yet: the rate rule allows one at once
    assert (heartbeat.last_ping, heartbeat.rtt, heartbeat.srtt) == (None, None, None)


def test_the_send_rule_counts_from_the_last_frame_sent() -> None:
    heartbeat = Heartbeat()
    heartbeat.agree(send_interval=1.0, ping_after=0.9)
    assert heartbeat.due(last_sent=5.0) == 5.9
    assert heartbeat.due(last_sent=7.25) == 7.25 + 0.9
    heartbeat.sent(now=8.0)
    assert heartbeat.earliest == 8.5  # half the send interval after the last PING


def test_opaque_bytes_count_up_and_round_trips_are_measured() -> None:
    heartbeat = Heartbeat()
    heartbeat.agree(send_interval=1.0, ping_after=1.0)
    first, second = heartbeat.sent(now=1.0), heartbeat.sent(now=2.0)
    assert (first, second) == ((1).to_bytes(8, "big"), (2).to_bytes(8, "big"))
    assert heartbeat.last_ping == 2.0
    assert heartbeat.answered(second, now=2.5) == 0.5
    assert (heartbeat.rtt, heartbeat.srtt) == (0.5, 0.5)
    assert heartbeat.answered(first, now=3.0) == 2.0
    assert heartbeat.rtt == 2.0
    assert heartbeat.srtt == 0.5 + (2.0 - 0.5) / 8
    # Answered once only, and a PONG for a PING we never sent measures nothing.
    assert heartbeat.answered(first, now=3.5) is None
    assert heartbeat.answered(b"stranger", now=3.5) is None
    assert heartbeat.rtt == 2.0


def test_a_pong_before_any_ping_measures_nothing() -> None:
    assert Heartbeat().answered(bytes(8), now=1.0) is None


def test_only_the_latest_32_pings_wait_for_their_pong() -> None:
    heartbeat = Heartbeat()
    opaques = [heartbeat.sent(now=float(n)) for n in range(33)]
    assert heartbeat.answered(opaques[0], now=40.0) is None  # forgotten: the oldest
    assert heartbeat.answered(opaques[1], now=40.0) == 39.0
    assert heartbeat.answered(opaques[32], now=40.0) == 8.0


def test_an_announcement_goes_as_soon_as_the_rate_rule_allows() -> None:
    heartbeat = Heartbeat()
    heartbeat.agree(send_interval=1.0, ping_after=0.9)
    heartbeat.announce(now=0.25)
    assert heartbeat.due(last_sent=0.0) == 0.25  # no PING yet: at once
    heartbeat.sent(now=0.25)
    assert heartbeat.due(last_sent=0.25) == 0.25 + 0.9  # announced: the send rule again
    heartbeat.announce(now=0.5)
    assert heartbeat.due(last_sent=0.25) == 0.75  # not before half an interval after 0.25
    heartbeat.announce(now=1.0)
    assert heartbeat.due(last_sent=0.25) == 1.0  # later than that: at once
    # Never later than the send rule would send anyway.
    assert heartbeat.due(last_sent=0.0) == 0.9


def test_doctests() -> None:
    results = doctest.testmod(_pings)
    assert results.attempted > 0
    assert results.failed == 0
