"""The receiver's side of the THB/1 rate rule (``PingRate`` in ``_rate.py``): strikes for PINGs that come too fast.

A PING sooner than half the peer's send interval after the previous one is a
strike, and ``max_ping_strikes`` of them *in a row* close the connection with
1008: an on-time PING or a DATA frame clears the count. PINGs that come
bunched because the spacing was lost on the way (behind a late PING, or while
our own reader was paused) are excused, as many as an honest peer could have
sent, and only while that backlog arrives. Most tests drive the whole sans-IO
core in virtual time; :class:`PingRate` is also tested on its own, and one
connection shows a flood closed with 1008 over a memory stream.
"""

from __future__ import annotations

import doctest

import pytest
import trio
from helpers import (
    CONFIG,
    accepted_pair,
    expect_error,
    feed,
    hang_up_on_close,
    open_pair,
    run_prompt_pair,
    state,
    stream_and_peer,
    types,
)
from trio.testing import MockClock

from trio_heartbeat import (
    Config,
    Event,
    HeartbeatProtocol,
    RemoteProtocolError,
    State,
    _rate,
)
from trio_heartbeat._errors import ConnectionClosed
from trio_heartbeat._frames import CloseCode, FrameType, HealthStatus, encode_data, encode_ping
from trio_heartbeat._handshake import CLIENT_LEAD
from trio_heartbeat._rate import PingRate
from trio_heartbeat._stream_connection import open_stream_connection

# -- strikes in a row ------------------------------------------------------------------


def ping_at(protocol: HeartbeatProtocol, now: float, fill: int = 0) -> list[Event]:
    return feed(protocol, encode_ping(bytes((fill,)) * 8, HealthStatus.SERVING), now)


def test_third_early_ping_closes_with_1008() -> None:
    server, _ = open_pair()
    assert server.peer_send_interval == 1.0  # early means less than 0.5 s after the last
    ping_at(server, 1.0)
    ping_at(server, 1.25)
    assert server.ping_strikes == 1
    ping_at(server, 1.5)
    assert server.ping_strikes == 2
    server.data_to_send()
    message = expect_error(server, encode_ping(bytes(8), HealthStatus.SERVING), 1.75, 1008)
    assert "3 PINGs in a row sooner than the agreed rate" in message


def test_a_ping_half_an_interval_later_is_no_strike() -> None:
    server, _ = open_pair()
    for i in range(10):
        ping_at(server, 1.0 + i * 0.5)
    assert server.ping_strikes == 0
    assert state(server) is State.OPEN


def test_strikes_reset_when_data_arrives() -> None:
    server, _ = open_pair()
    ping_at(server, 1.0)
    ping_at(server, 1.0)
    ping_at(server, 1.0)
    assert server.ping_strikes == 2
    feed(server, encode_data(b"x"), 1.0)
    assert server.ping_strikes == 0
    ping_at(server, 1.0)
    ping_at(server, 1.0)
    assert state(server) is State.OPEN
    server.data_to_send()
    expect_error(server, encode_ping(bytes(8), HealthStatus.SERVING), 1.0, 1008)


def test_strike_limit_is_configurable() -> None:
    server, _ = open_pair(Config(max_ping_strikes=None))
    for _ in range(100):
        ping_at(server, 1.0)
    assert server.ping_strikes == 99
    assert state(server) is State.OPEN
    server, _ = open_pair(Config(max_ping_strikes=4))
    for _ in range(4):
        ping_at(server, 1.0)
    assert server.ping_strikes == 3
    server.data_to_send()
    expect_error(server, encode_ping(bytes(8), HealthStatus.SERVING), 1.0, 1008)


def test_alternating_early_and_on_time_pings_never_close() -> None:
    """Jitter makes every other PING early; each on-time one clears the strike,
    so the count never builds up, however long it goes on."""
    server, _ = accepted_pair()
    assert server.peer_send_interval == 1.0  # early: less than 0.5 s after the previous PING
    now = 1.0
    ping_at(server, now)
    strikes = [server.ping_strikes]
    for n in range(1, 20):
        now += 0.25 if n % 2 else 0.5  # early, on time, early, ...
        ping_at(server, now)
        strikes.append(server.ping_strikes)
    assert strikes == [0] + [1, 0] * 9 + [1]
    assert state(server) is State.OPEN
    # Every PING was answered, none refused.
    assert types(server.data_to_send()) == [FrameType.PONG] * 20


@pytest.mark.parametrize("limit", [3, 4, 5])
def test_exactly_max_ping_strikes_early_pings_in_a_row_close_with_1008(limit: int) -> None:
    server, _ = open_pair(Config(max_ping_strikes=limit))
    ping_at(server, 1.0)
    for n in range(1, limit):
        ping_at(server, 1.0 + n * 0.125)
        assert server.ping_strikes == n
    assert state(server) is State.OPEN
    server.data_to_send()
    message = expect_error(
        server, encode_ping(bytes(8), HealthStatus.SERVING), 1.0 + limit * 0.125, 1008
    )
    assert f"{limit} PINGs in a row sooner than the agreed rate" in message


def test_an_on_time_ping_after_two_early_ones_resets_the_count() -> None:
    server, _ = open_pair()
    ping_at(server, 1.0)
    ping_at(server, 1.125)
    ping_at(server, 1.25)
    assert server.ping_strikes == 2
    ping_at(server, 1.75)  # exactly half an interval after the last: on time
    assert server.ping_strikes == 0
    # A fresh row: two more early ones are tolerated, the third of the row is not.
    ping_at(server, 1.875)
    ping_at(server, 2.0)
    assert server.ping_strikes == 2
    assert state(server) is State.OPEN
    server.data_to_send()
    expect_error(server, encode_ping(bytes(8), HealthStatus.SERVING), 2.125, 1008)


# -- bunched PINGs are excused ---------------------------------------------------------


def test_pings_bunched_by_a_pause_are_not_strikes() -> None:
    server, _ = open_pair()
    ping_at(server, 1.0)
    server.pause_liveness(1.0)
    server.resume_liveness(3.0)
    # Not reading for 2 s: an honest peer may have sent a PING every 0.5 s, and
    # they all arrive together now. That many (2 / 0.5 + 1 = 5) are forgiven.
    ping_at(server, 3.0)  # on time anyway: 2 s after the last
    for _ in range(5):
        ping_at(server, 3.0)
    assert server.ping_strikes == 0
    ping_at(server, 3.0)
    assert server.ping_strikes == 1


def test_a_short_pause_forgives_one_bunched_ping() -> None:
    server, _ = open_pair()
    ping_at(server, 1.0)
    server.pause_liveness(1.0)
    server.resume_liveness(1.0)
    ping_at(server, 1.0)
    assert server.ping_strikes == 0
    ping_at(server, 1.0)
    assert server.ping_strikes == 1


def test_pause_allowance_expires_after_the_backlog() -> None:
    server, _ = open_pair()
    ping_at(server, 1.0)
    server.pause_liveness(1.0)
    server.resume_liveness(3.0)  # 5 bunched PINGs forgiven, but only while the backlog arrives
    ping_at(server, 3.0)
    ping_at(server, 3.0)
    assert server.ping_strikes == 0
    # Well after the backlog (one peer send interval later), early PINGs are strikes again.
    later = 3.0 + server.peer_send_interval + 0.25
    ping_at(server, later)
    ping_at(server, later)
    assert server.ping_strikes == 1


def test_pings_bunched_behind_a_late_one_are_not_strikes() -> None:
    # A slow link: the peer pinged every second, but its PINGs queued behind
    # DATA and arrive together 2 s late. The late one explains the bunch.
    server, _ = open_pair()
    assert server.peer_send_interval == 1.0
    ping_at(server, 1.0)
    ping_at(server, 4.0)  # 2 s later than due: up to 4 bunched PINGs are excused
    for _ in range(4):
        ping_at(server, 4.0)
    assert server.ping_strikes == 0
    ping_at(server, 4.0)
    assert server.ping_strikes == 1


def test_a_flood_after_a_late_ping_still_closes_with_1008() -> None:
    server, _ = open_pair()
    ping_at(server, 1.0)
    ping_at(server, 2.5)  # half a second late: one bunched PING is excused
    ping_at(server, 2.5)
    assert server.ping_strikes == 0
    ping_at(server, 2.5)
    ping_at(server, 2.5)
    with pytest.raises(RemoteProtocolError) as raised:
        ping_at(server, 2.5)
    assert raised.value.code == CloseCode.POLICY_VIOLATION


# -- the sender's side meets the receiver's --------------------------------------------


def test_a_client_health_ping_at_the_earliest_moment_is_no_strike() -> None:
    # Regular PINGs at 0.9 and 1.8; the change at 1.8125 is PINGed as soon as
    # the rate rule allows, at 1.8 + 0.5. Measured as a difference, 2.3 - 1.8 =
    # 0.4999999999999998 < 0.5 would make it a strike for a PING the rule allowed.
    server, client = accepted_pair()
    regular = 1.0 * CLIENT_LEAD
    server_pings, client_pings = run_prompt_pair(
        server, client, 3.0, [(1.8125, HealthStatus.DEGRADED)]
    )
    assert server_pings == []  # past its verdict, the server only answers
    assert client_pings[:2] == [regular, regular + regular]
    assert len(client_pings) == 3
    assert client_pings[2] < client_pings[1] + regular  # sooner than the regular one
    assert server.ping_strikes == 0


# -- in a connection, in virtual time --------------------------------------------------


async def test_ping_flood_is_closed_with_policy_violation(autojump_clock: MockClock) -> None:
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        for n in range(4):
            await trio.sleep_until(1.0 + n * 0.125)
            await peer.send_ping()
        await hang_up_on_close(peer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(ConnectionClosed) as raised:
            async with open_stream_connection(stream, config=CONFIG):
                await trio.sleep_forever()
        # First PING at 1.0 is fine; 1.125, 1.25 and 1.375 are strikes one to three.
        assert trio.current_time() == 1.375
    assert raised.value.code == CloseCode.POLICY_VIOLATION
    assert isinstance(raised.value.__cause__, RemoteProtocolError)
    assert peer.frames[-1].close_code == CloseCode.POLICY_VIOLATION


# -- PingRate on its own ---------------------------------------------------------------


def test_the_first_ping_is_judged_against_the_hello() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=3, since=10.0)
    assert rate.strikes == 0  # none before any PING
    rate.ping(10.25)  # sooner than half an interval after the HELLO: still no strike
    assert rate.strikes == 0
    rate.ping(10.5)
    assert rate.strikes == 1  # 0.25 after the first PING


def test_strikes_in_a_row_then_1008_at_the_limit() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=4, since=0.0)
    rate.ping(1.0)
    for n, now in enumerate([1.1, 1.2, 1.3], start=1):
        rate.ping(now)
        assert rate.strikes == n
    with pytest.raises(RemoteProtocolError) as raised:
        rate.ping(1.4)
    assert raised.value.code == CloseCode.POLICY_VIOLATION
    assert str(raised.value) == "4 PINGs in a row sooner than the agreed rate"


def test_half_an_interval_exactly_is_on_time() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=3, since=0.0)
    rate.ping(1.0)
    rate.ping(1.1)
    assert rate.strikes == 1
    rate.ping(1.6)  # 1.1 + 0.5, compared as the sender computes it
    assert rate.strikes == 0


def test_data_clears_the_strikes() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=3, since=0.0)
    for now in (1.0, 1.1, 1.2):
        rate.ping(now)
    assert rate.strikes == 2
    rate.data()
    assert rate.strikes == 0


def test_without_a_limit_strikes_are_only_counted() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=None, since=0.0)
    for _ in range(50):
        rate.ping(1.0)
    assert rate.strikes == 49


def test_a_pause_excuses_the_pings_an_honest_peer_could_have_sent() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=None, since=0.0)
    rate.ping(1.0)
    rate.excuse_pause(paused_for=1.0, now=2.0)  # 1.0 / 0.5 + 1 = 3 excused until 3.0
    rate.ping(2.0)  # a second after the last: on time, nothing used
    for _ in range(3):
        rate.ping(2.0)
    assert rate.strikes == 0
    rate.ping(2.0)
    assert rate.strikes == 1


def test_what_is_left_of_a_pause_allowance_expires_one_interval_later() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=None, since=0.0)
    rate.ping(1.0)
    rate.excuse_pause(paused_for=2.0, now=3.0)  # 5 excused until 4.0
    rate.ping(3.0)  # on time
    rate.ping(3.0)  # excused: 4 left
    assert rate.strikes == 0
    rate.ping(4.25)  # on time (and too little late to excuse anything itself)
    rate.ping(4.25)  # the 4 left have expired at 4.0
    assert rate.strikes == 1


def test_a_late_ping_excuses_the_ones_bunched_behind_it() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=None, since=0.0)
    rate.ping(1.0)
    rate.ping(3.0)  # a second late: (3 - 1 - 1) / 0.5 = 2 bunched ones excused
    rate.ping(3.0)
    rate.ping(3.0)
    assert rate.strikes == 0
    rate.ping(3.0)
    assert rate.strikes == 1


def test_doctests() -> None:
    results = doctest.testmod(_rate)
    assert results.attempted > 0
    assert results.failed == 0


# -- PingRate's boundaries, one by one (found by mutation testing, #15) -----------------


def test_a_ping_sooner_than_half_the_interval_is_a_strike_and_half_is_not() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=None, since=0.0)
    rate.ping(1.0)
    rate.ping(1.4)  # 0.4 after the last: sooner than half the interval
    assert rate.strikes == 1
    rate.ping(1.9)  # exactly half after: on time again
    assert rate.strikes == 0


def test_an_allowance_for_bunched_pings_is_not_extended_by_an_on_time_one() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=None, since=0.0)
    rate.ping(3.0)  # 2 s late: up to 4 bunched PINGs excused, until 4.0
    rate.ping(3.5)
    rate.ping(4.2)
    rate.ping(4.3)  # too soon, after the allowance's end
    assert rate.strikes == 1


def test_an_expired_allowance_does_not_add_to_a_new_one() -> None:
    rate = PingRate(peer_send_interval=1.0, max_strikes=None, since=0.0)
    rate.ping(3.0)  # 4 excused until 4.0, none used
    rate.ping(5.0)  # 2 s after the last: 2 excused (not 4 left over + 2)
    for now in (5.01, 5.02, 5.03, 5.04):
        rate.ping(now)
    assert rate.strikes == 2


def test_an_allowance_holds_up_to_its_last_moment() -> None:
    paused = PingRate(peer_send_interval=1.0, max_strikes=None, since=0.0)
    paused.excuse_pause(5.0, now=2.0)  # 11 excused, until 3.0
    paused.ping(3.0)  # at that very moment, late: the 11 stand (a new bunch is 4)
    for now in (3.01, 3.02, 3.03, 3.04, 3.05, 3.06):
        paused.ping(now)
    assert paused.strikes == 0
    bunched = PingRate(peer_send_interval=1.0, max_strikes=None, since=0.0)
    bunched.ping(3.0)  # 4 excused until 4.0
    bunched.ping(3.6)
    bunched.ping(4.0)  # too soon, at the allowance's last moment: excused
    assert bunched.strikes == 0
