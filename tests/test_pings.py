"""Our heartbeat (``Heartbeat`` in ``_pings.py``): the send rule, the server's verdict and refreshes, health announcements, round trips.

A side PINGs after its send interval of silence (a client after
``CLIENT_LEAD`` of it, so that an idle connection carries one heartbeat, not
two). A server PINGs at once when it accepts a client's HELLO (its verdict,
which also gives it a first round trip), never when it refuses one, and then
at least every ``RTT_REFRESH`` of its send intervals: an idle pair carries the
client's PINGs, the verdict, and one server PING per ``RTT_REFRESH`` send
intervals. A change of our health is announced with a PING as soon as the
rate rule allows; a PONG that echoes one of our PINGs measures a round trip,
and at most 32 PINGs are remembered. Most tests drive the whole sans-IO core
in virtual time (every ``now`` passed explicitly, every deadline checked with
``==``; times are binary fractions, and a client's deadlines are computed the
way the core computes them); :class:`Heartbeat` is also tested on its own.
"""

from __future__ import annotations

import doctest
from math import inf

import pytest
from helpers import (
    WireFrame,
    accepted_pair,
    client_hello,
    drain,
    feed,
    frames,
    idle_ping_times,
    new_pair,
    opaque,
    open_pair,
    run_prompt_pair,
    state,
    types,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from vectors import KEY, SERVER_NONCE

from trio_heartbeat import (
    Config,
    DataReceived,
    HandshakeComplete,
    HeartbeatProtocol,
    PeerHealthChanged,
    PingReceived,
    PongReceived,
    RemoteProtocolError,
    State,
    _pings,
)
from trio_heartbeat._frames import (
    CloseCode,
    FrameType,
    HealthStatus,
    Role,
    encode_close,
    encode_ping,
    encode_pong,
)
from trio_heartbeat._handshake import CLIENT_LEAD
from trio_heartbeat._pings import RTT_REFRESH, Heartbeat

# -- the send rule ---------------------------------------------------------------------


def test_ping_deadline_is_last_sent_plus_send_interval_and_the_client_leads() -> None:
    server, client = accepted_pair(Config(interval=0.5), Config(), now=8.0)
    # The client PINGs after CLIENT_LEAD of its send interval of silence.
    assert client.send_interval == 1.0
    lead = client.send_interval * CLIENT_LEAD
    assert client.last_sent == 8.0  # its HELLO, and its PONG to the server's verdict
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
    # The server PINGs after exactly its send interval, its own (shorter) one,
    # counted from its last frame: the verdict.
    assert server.send_interval == 0.5
    assert server.counters.pings_sent == 1
    assert server.ping_deadline == server.last_sent + 0.5 == 8.5
    server.handle_timeout(8.5 - 2**-10)
    assert server.data_to_send() == b""
    server.handle_timeout(8.5)
    assert types(server.data_to_send()) == [FrameType.PING]
    assert server.ping_deadline == 9.0


def test_a_server_pings_once_at_once_however_old_its_hello() -> None:
    server, client = new_pair()
    feed(client, server.data_to_send(), 0.0)
    feed(server, client.data_to_send(), 2.0)
    # Nothing sent since the HELLO at 0.0, so the send rule's PING (due at 1.0)
    # is overdue: the verdict, queued as the HELLO is accepted, is that PING,
    # and the send rule counts from it.
    assert frames(server.data_to_send()) == [WireFrame(FrameType.PING, opaque(1) + b"\x00")]
    assert server.last_sent == 2.0
    assert server.ping_deadline == 3.0
    server.handle_timeout(2.0)
    assert server.data_to_send() == b""  # one PING, not two
    assert server.counters.pings_sent == 1


def test_ping_and_pong_count_as_sent_frames() -> None:
    server, client = accepted_pair()
    sent = client.send_ping(0.5)
    feed(server, client.data_to_send(), 0.5)
    assert server.ping_deadline == 1.5  # the PONG, not only our own PINGs, resets the timer
    assert frames(server.data_to_send()) == [WireFrame(FrameType.PONG, sent + b"\x00")]
    assert client.ping_deadline == 0.5 + 1.0 * CLIENT_LEAD


# -- the server's verdict, and its refreshes -------------------------------------------


def test_a_server_pings_its_verdict_in_the_bytes_that_follow_its_handshake() -> None:
    server, client = new_pair()
    feed(client, server.data_to_send(), 0.0)
    # A client may send PING and DATA at once, behind its HELLO.
    client.send_data(b"at once", 0.0)
    client_ping = client.send_ping(0.0)
    server.receive_data(client.data_to_send(), 0.25)
    assert isinstance(server.next_event(), HandshakeComplete)
    # The verdict is queued as the HELLO is accepted, before the frames behind
    # it are read and with no timeout to handle ...
    assert server.control_pending
    assert server.counters.pings_sent == 1
    assert drain(server) == [
        PingReceived(client_ping, HealthStatus.SERVING),
        DataReceived(b"at once"),
    ]
    # ... so the next bytes to send carry it, ahead of the PONG the client's PING asked for.
    sent = server.data_to_send()
    assert frames(sent) == [
        WireFrame(FrameType.PING, opaque(1) + b"\x00"),
        WireFrame(FrameType.PONG, client_ping + b"\x00"),
    ]
    # The rate rule and the send rule count from it.
    assert server.earliest_ping == 0.25 + 0.5
    assert server.ping_deadline == 0.25 + 1.0
    # Its PONG gives the server a first round trip.
    assert feed(client, sent, 0.375) == [
        PingReceived(opaque(1), HealthStatus.SERVING),
        PongReceived(client_ping, HealthStatus.SERVING, 0.375),
    ]
    assert feed(server, client.data_to_send(), 0.5) == [
        PongReceived(opaque(1), HealthStatus.SERVING, 0.25)
    ]
    assert server.rtt == server.srtt == 0.25


@pytest.mark.parametrize(
    ("hello", "message"),
    [
        (client_hello(interval_ms=50), "peer interval 50 ms is outside 100..3600000 ms"),
        (client_hello(timeout_ms=200), "peer timeout 200 ms is outside 300..3600000 ms"),
        (client_hello(auth=bytes(32)), "client authentication failed"),
    ],
    ids=["interval-floor", "timeout-floor", "auth"],
)
def test_a_hello_refused_with_1008_gets_its_close_and_no_verdict(
    hello: bytes, message: str
) -> None:
    server = HeartbeatProtocol(Role.SERVER, Config(secret=KEY), now=0.0, nonce=SERVER_NONCE)
    server.data_to_send()
    server.receive_data(hello, 0.5)
    with pytest.raises(RemoteProtocolError, match=message) as info:
        drain(server)
    assert info.value.code == CloseCode.POLICY_VIOLATION
    # The CLOSE is the only frame after the HELLO: a client sees no PING before it.
    assert server.data_to_send() == encode_close(CloseCode.POLICY_VIOLATION, message)
    assert server.counters.pings_sent == 0
    assert server.ping_deadline == inf


@pytest.mark.parametrize("code", [CloseCode.TRY_AGAIN_LATER, CloseCode.GOING_AWAY])
def test_a_server_that_closed_during_the_handshake_sends_no_verdict(code: CloseCode) -> None:
    # Closed while the client's HELLO is on its way (cut off over the server's
    # byte budget with 1013, or leaving with 1001): that HELLO is read, and
    # accepted by nobody. (A server at capacity or draining refuses a newcomer
    # with a bare CLOSE before any HELLO, which has no core to PING with.)
    server, client = new_pair()
    feed(client, server.data_to_send(), 0.0)
    client_hello_bytes = client.data_to_send()
    server.close(code, now=0.25)
    assert server.data_to_send() == encode_close(code)
    assert feed(server, client_hello_bytes, 0.5) == []
    assert server.peer is not None
    assert state(server) is State.CLOSING
    assert server.data_to_send() == b""  # our CLOSE was our last frame: no PING after it
    assert server.counters.pings_sent == 0
    assert server.ping_deadline == inf
    server.handle_timeout(0.5 + RTT_REFRESH)
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    ("server_config", "client_config"),
    [
        (Config(), Config()),
        (Config(interval=0.25, timeout=1.0), Config(interval=0.25, timeout=1.0)),
        # Half the server's timeout sets the client's pace, its own interval the server's.
        (Config(interval=1.0, timeout=1.0), Config(interval=1.0, timeout=3.0)),
    ],
)
def test_an_idle_server_pings_every_rtt_refresh_send_intervals_while_the_client_leads(
    server_config: Config, client_config: Config
) -> None:
    server, client = accepted_pair(server_config, client_config)
    lead = client.send_interval * CLIENT_LEAD
    assert server.send_interval > lead  # the client leads: the server only answers ...
    refresh = RTT_REFRESH * server.send_interval
    until = 2 * refresh + 10 * server.send_interval
    server_pings, client_pings = run_prompt_pair(server, client, until)
    # ... but for a PING exactly RTT_REFRESH send intervals after its last
    # one (the verdict at 0.0, then each refresh), though the PONGs it sends
    # meanwhile keep it from ever being silent for its send interval.
    assert server_pings == [refresh, refresh + refresh]
    assert server.counters.pings_sent == server.counters.pongs_received == 3
    # The client's PONG to a refresh restarts the client's timer.
    expected = (
        idle_ping_times(lead, refresh)
        + idle_ping_times(lead, 2 * refresh, start=refresh)
        + idle_ping_times(lead, until, start=2 * refresh)
    )
    assert client_pings == expected
    assert server.ping_strikes == client.ping_strikes == 0
    assert state(server) is state(client) is State.OPEN


def test_a_refresh_counts_from_the_servers_last_ping_whatever_sent_it() -> None:
    server, client = accepted_pair()
    assert run_prompt_pair(server, client, 50.0)[0] == []
    server.set_health(HealthStatus.DEGRADED, 50.0)  # announced with a PING at once
    refresh = RTT_REFRESH * server.send_interval
    server_pings, _ = run_prompt_pair(server, client, 50.0 + 2 * refresh)
    assert server_pings == [50.0, 50.0 + refresh, 50.0 + refresh + refresh]


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
    server, client = accepted_pair(server_config, client_config)
    interval = client.send_interval
    assert server.send_interval >= interval
    until = 20 * server.send_interval
    assert until < RTT_REFRESH * server.send_interval  # before its first refresh
    server_pings, client_pings = run_prompt_pair(server, client, until)
    # Each client PING is answered at once, and the PONG restarts the
    # server's timer before it would fire: past its verdict, the server never PINGs.
    assert server_pings == []
    assert server.counters.pings_sent == 1
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
def test_an_idle_pair_has_one_heartbeat_the_servers_refreshes_and_no_strikes(
    server_config: Config, client_config: Config
) -> None:
    server, client = accepted_pair(server_config, client_config)
    interval = client.send_interval
    lead = interval * CLIENT_LEAD
    assert server.peer_send_interval == interval  # what the rate rule measures against
    refresh = RTT_REFRESH * server.send_interval
    until = refresh + 20 * max(server.send_interval, interval)
    server_pings, client_pings = run_prompt_pair(server, client, until)
    assert server.ping_strikes == client.ping_strikes == 0
    assert state(server) is state(client) is State.OPEN
    # Only one side heartbeats, the other only answers: the client, unless the
    # server's own send interval is shorter than the client's lead. A server
    # that only answers still PINGs once per RTT_REFRESH of its send
    # intervals, and the client's PONG to it restarts the client's timer.
    if server.send_interval > lead:
        assert server_pings == [refresh]
        expected = idle_ping_times(lead, refresh) + idle_ping_times(lead, until, start=refresh)
        assert client_pings == expected
    else:
        assert client_pings == []
        assert server_pings == idle_ping_times(server.send_interval, until)


# -- round trips -----------------------------------------------------------------------


def test_rtt_and_srtt_from_pongs() -> None:
    server, client = accepted_pair()
    assert (client.rtt, client.srtt) == (None, None)
    first = client.send_ping(5.0)
    assert first == (1).to_bytes(8, "big")
    assert client.earliest_ping == 5.5
    feed(server, client.data_to_send(), 5.0)
    events = feed(client, server.data_to_send(), 5.25)
    assert events == [PongReceived(first, HealthStatus.SERVING, 0.25)]
    assert client.rtt == client.srtt == 0.25

    second = client.send_ping(6.0)
    assert second != first
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
    server, client = accepted_pair(Config(max_ping_strikes=None))
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

    # Too soon after that PING: an eighth of an interval after the earliest allowed moment.
    client.set_health(HealthStatus.NOT_SERVING, 0.5)
    assert client.earliest_ping == 0.75
    assert client.ping_deadline == 0.875
    client.handle_timeout(0.875 - 2**-20)
    assert client.data_to_send() == b""
    client.handle_timeout(0.875)
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
    assert client.ping_deadline == 3.625
    assert state(server) is State.OPEN


def test_set_health_before_open_goes_into_the_client_hello() -> None:
    server, client = new_pair()
    client.set_health(HealthStatus.DEGRADED, 0.0)
    feed(client, server.data_to_send(), 0.0)
    [done] = feed(server, client.data_to_send(), 0.0)
    assert isinstance(done, HandshakeComplete)
    assert done.peer.status is HealthStatus.DEGRADED
    assert client.ping_deadline == 1.0 * CLIENT_LEAD  # the HELLO carried it: no extra PING


def test_server_health_change_during_handshake_is_carried_by_its_verdict() -> None:
    server, client = new_pair()
    feed(client, server.data_to_send(), 0.0)  # the server HELLO says SERVING
    server.set_health(HealthStatus.NOT_SERVING, 0.25)
    feed(server, client.data_to_send(), 0.5)
    # The verdict, sent as the HELLO is accepted, announces the change: no second PING.
    sent = server.data_to_send()
    assert sent == encode_ping(opaque(1), HealthStatus.NOT_SERVING)
    assert server.ping_deadline == 0.5 + 1.0
    server.handle_timeout(0.5)
    assert server.data_to_send() == b""
    assert feed(client, sent, 0.5) == [
        PeerHealthChanged(HealthStatus.NOT_SERVING, HealthStatus.SERVING),
        PingReceived(opaque(1), HealthStatus.NOT_SERVING),
    ]


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


def test_refreshes_come_rtt_refresh_send_intervals_after_the_last_ping() -> None:
    heartbeat = Heartbeat()
    heartbeat.agree(send_interval=0.5, ping_after=0.5, refresh=True)
    assert RTT_REFRESH == 120
    assert heartbeat.due(last_sent=0.0) == 0.5  # no PING yet: the send rule alone
    heartbeat.sent(now=2.0)
    assert heartbeat.due(last_sent=2.0) == 2.5
    assert heartbeat.due(last_sent=61.75) == 2.0 + 60.0  # sooner than the send rule
    heartbeat.sent(now=10.0)  # any PING: counted from the last one
    assert heartbeat.due(last_sent=69.75) == 10.0 + 60.0
    # Without refreshes (a client's heartbeat), only the send rule.
    heartbeat = Heartbeat()
    heartbeat.agree(send_interval=0.5, ping_after=0.5)
    heartbeat.sent(now=10.0)
    assert heartbeat.due(last_sent=69.75) == 70.25


def test_an_announcement_goes_as_soon_as_the_rate_rule_allows() -> None:
    heartbeat = Heartbeat()
    heartbeat.agree(send_interval=1.0, ping_after=0.9)
    heartbeat.announce(now=0.25)
    assert heartbeat.due(last_sent=0.0) == 0.25  # no PING yet: at once
    heartbeat.sent(now=0.25)
    assert heartbeat.due(last_sent=0.25) == 0.25 + 0.9  # announced: the send rule again
    heartbeat.announce(now=0.5)
    # Half an interval after 0.25 is the rate rule's limit; an eighth more is the margin.
    assert heartbeat.due(last_sent=0.25) == 0.875
    heartbeat.announce(now=1.0)
    assert heartbeat.due(last_sent=0.25) == 1.0  # later than that: at once
    # Never later than the send rule would send anyway.
    assert heartbeat.due(last_sent=0.0) == 0.9


def test_doctests() -> None:
    results = doctest.testmod(_pings)
    assert results.attempted > 0
    assert results.failed == 0


def test_a_table_of_outstanding_pings_is_kept_only_while_some_are() -> None:
    # Thousands of idle server connections each PING once (the verdict):
    # once it is answered, none of them keeps an empty table.
    heartbeat = Heartbeat()
    heartbeat.agree(1.0, 1.0, refresh=True)
    first = heartbeat.sent(0.0)
    second = heartbeat.sent(0.5)
    assert heartbeat.answered(first, 0.25) == 0.25
    table = heartbeat._outstanding
    assert table == {second: 0.5}
    assert heartbeat.answered(second, 0.75) == 0.25
    assert heartbeat._outstanding is None
    assert heartbeat.answered(second, 1.0) is None  # a PONG echoed twice measures nothing


@given(changes=st.lists(st.floats(0.0, 0.7), min_size=1, max_size=40))
def test_announcements_never_go_closer_than_five_eighths_of_an_interval(
    changes: list[float],
) -> None:
    """Whatever the gaps between health changes, the PINGs that announce them leave at
    least 5/8 of the send interval between them: jitter up to an eighth on the way can
    never make them strikes (a flapping status used to cost the connection its 1008)."""
    heartbeat = Heartbeat()
    heartbeat.agree(send_interval=1.0, ping_after=0.9)
    now, last_sent = 0.0, 0.0
    sent_at: list[float] = []
    for gap in changes:
        now += gap
        heartbeat.announce(now)
        due = heartbeat.due(last_sent)
        if sent_at:
            assert due >= sent_at[-1] + 5 / 8
        now = max(now, due)
        heartbeat.sent(now)
        sent_at.append(now)
        last_sent = now
