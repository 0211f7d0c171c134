"""The THB/1 state machine (``HeartbeatProtocol`` in ``_protocol.py``), composing the rules.

What the machine itself does, in virtual time: the events it hands out and
their order, the frame limits before and after the handshake, the protocol
errors it raises (and the CLOSE it queues for each), the local errors it
refuses with, the echo rule (a PONG ahead of any queued DATA), every way a
connection ends (a close handshake, crossing closes, a close timeout,
end-of-file, the sticky error state), sessions fed whole, bytewise and in
random splits, and fuzzing. Every ``now`` is passed explicitly and every
deadline is checked exactly; times are binary fractions so that float
arithmetic is exact. The rules the machine composes have test modules of their
own (``test_handshake``, ``test_pings``, ``test_rate``, ``test_silence``,
``test_state``, ``test_config``), and ``test_protocol_stateful`` drives two
machines with hypothesis.
"""

from __future__ import annotations

import doctest
import gc
from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise
from math import inf

import pytest
from helpers import (
    CLIENT_NONCE,
    WireFrame,
    accepted_pair,
    client_hello,
    drain,
    expect_error,
    feed,
    frames,
    new_pair,
    opaque,
    open_pair,
    state,
    types,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from vectors import CLIENT_HELLO, OPAQUE, PING, PONG, SERVER_HELLO, SERVER_NONCE

from trio_heartbeat import (
    NEED_DATA,
    Config,
    ConnectionEnded,
    DataReceived,
    Event,
    FixedTimeout,
    HandshakeComplete,
    HeartbeatProtocol,
    LocalProtocolError,
    PeerHealthChanged,
    PingReceived,
    PongReceived,
    RemoteProtocolError,
    State,
    _protocol,
)
from trio_heartbeat._frames import (
    HEADER_SIZE,
    CloseCode,
    FrameType,
    HealthStatus,
    Role,
    decode_hello,
    encode_close,
    encode_data,
    encode_frame,
    encode_hello,
    encode_ping,
    encode_pong,
)
from trio_heartbeat._handshake import CLIENT_LEAD, compute_auth
from trio_heartbeat._pings import RTT_REFRESH

# -- making one ------------------------------------------------------------------------


def test_nonce_must_be_sixteen_bytes() -> None:
    with pytest.raises(ValueError, match="nonce must be 16 bytes"):
        HeartbeatProtocol(Role.SERVER, now=0.0, nonce=bytes(15))


def test_fresh_nonce_for_every_connection() -> None:
    first = HeartbeatProtocol(Role.CLIENT, now=0.0)
    second = HeartbeatProtocol(Role.CLIENT, now=0.0)
    assert len(first.nonce) == 16
    assert first.nonce != second.nonce
    assert isinstance(first.detector, FixedTimeout)
    assert first.config == Config()


def test_a_fresh_machine_knows_nothing_of_its_peer_or_an_ending() -> None:
    """Before anything is heard: no peer, no peer health, no close; last_sent is
    the creation time, whether a HELLO went out then (server) or not (client)."""
    for role in Role:
        protocol = HeartbeatProtocol(role, now=5.0)
        assert protocol.last_sent == 5.0
        assert (protocol.peer, protocol.peer_health, protocol.close_code) == (None, None, None)
        assert protocol.close_reason == ""
        assert protocol.closed_by_peer is False


class _Impatient:
    """A failure detector that would convict half a second after the last frame."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []

    def record(self, arrival: float) -> None:
        self.arrivals.append(arrival)

    def suspect_at(self, last_arrival: float, timeout: float) -> float:
        return last_arrival + 0.5


def test_the_detector_given_judges_the_silence_within_the_floor() -> None:
    """A detector passed in is the one consulted: it hears every frame, and its
    verdict is clamped to no sooner than two of the peer's send intervals."""
    detector = _Impatient()
    server = HeartbeatProtocol(Role.SERVER, now=0.0, nonce=SERVER_NONCE)
    client = HeartbeatProtocol(Role.CLIENT, now=0.0, nonce=CLIENT_NONCE, detector=detector)
    assert client.detector is detector
    feed(client, server.data_to_send(), 0.25)
    assert detector.arrivals == [0.25]
    assert client.liveness_deadline == 0.25 + 2 * 1.0


def test_doctests() -> None:
    results = doctest.testmod(_protocol)
    assert results.attempted > 0
    assert results.failed == 0


# -- the rules, composed ---------------------------------------------------------------


def test_the_machine_reports_what_its_rules_know() -> None:
    """Its facts are its rules' facts: the silence rule's last frame, the
    heartbeat's round trips and rate-rule spacing, the rate rule's strikes."""
    server, client = new_pair()
    assert server.ping_strikes == 0  # no rate rule before the handshake
    assert client.liveness_deadline == inf  # no verdict on a peer not yet heard
    client.pause_liveness(0.5)
    client.resume_liveness(1.0)  # no rate rule to excuse anything: nothing breaks
    assert client.abort_deadline == client.next_deadline == 10.0  # the handshake timeout
    server, client = open_pair()
    assert (client.last_received, client.rtt, client.srtt, client.ping_strikes) == (
        0.0,
        None,
        None,
        0,
    )
    assert client.earliest_ping == -inf
    assert client.next_deadline == client.ping_deadline == 1.0 * CLIENT_LEAD
    client.send_ping(1.0)
    feed(server, client.data_to_send(), 1.0)
    feed(client, server.data_to_send(), 1.25)
    assert (client.rtt, client.srtt, client.last_received) == (0.25, 0.25, 1.25)
    assert client.earliest_ping == 1.5
    assert client.liveness_deadline == 1.25 + 3.0
    assert client.next_deadline == min(client.ping_deadline, client.liveness_deadline)
    feed(server, encode_ping(bytes(8), HealthStatus.SERVING), 1.125)  # early: a strike
    assert server.ping_strikes == 1
    deadline = client.ping_deadline
    client.set_health(HealthStatus.SERVING, 1.5)  # no change: nothing to announce
    assert client.ping_deadline == deadline


def test_a_pause_reaches_both_the_silence_rule_and_the_rate_rule() -> None:
    server, _ = open_pair()
    feed(server, encode_ping(bytes(8), HealthStatus.SERVING), 1.0)
    server.pause_liveness(1.0)
    assert server.liveness_deadline == 4.0  # the timeout alone, from the last frame
    server.resume_liveness(3.0)
    # The silence rule counts from the resumption (the last frame stays where it was) ...
    assert server.last_received == 1.0
    assert server.liveness_deadline == 6.0
    # ... and the rate rule excuses the PINGs bunched by the pause: one on
    # time, then 2 / 0.5 + 1 = 5 more, then a strike.
    for _ in range(6):
        feed(server, encode_ping(bytes(8), HealthStatus.SERVING), 3.0)
    assert server.ping_strikes == 0
    feed(server, encode_ping(bytes(8), HealthStatus.SERVING), 3.0)
    assert server.ping_strikes == 1


# -- the handshake, as the machine runs it ---------------------------------------------


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_handshake_fed_whole_and_bytewise(how: str) -> None:
    server, client = new_pair()
    hello = server.data_to_send()
    chunks = [hello] if how == "whole" else [hello[i : i + 1] for i in range(len(hello))]
    events: list[Event] = []
    for chunk in chunks:
        assert state(client) is State.HANDSHAKE
        events += feed(client, chunk, 0.0)
    assert [type(event) for event in events] == [HandshakeComplete]
    assert state(client) is State.OPEN
    assert client.peer is not None
    assert client.peer_health is HealthStatus.SERVING


def test_handshake_sets_peer_facts_and_frame_limit() -> None:
    server, client = new_pair(
        Config(max_frame=4096), Config(max_frame=2048, status=HealthStatus.NOT_SERVING)
    )
    assert server.send_interval == server.peer_send_interval == inf
    assert server.ping_deadline == inf
    feed(client, server.data_to_send(), 0.0)
    client_hello = client.data_to_send()
    assert decode_hello(client_hello[HEADER_SIZE:]).status is HealthStatus.NOT_SERVING
    feed(server, client_hello, 0.0)
    assert server.peer is not None
    assert server.peer.max_frame == 2048
    assert server.peer_health is HealthStatus.NOT_SERVING
    # Our own limit applies once OPEN.
    server.receive_data(encode_data(bytes(4096)), 0.0)
    assert drain(server) == [DataReceived(bytes(4096))]
    expect_error(server, encode_data(bytes(4097))[:HEADER_SIZE], 0.0, 1009)


@pytest.mark.parametrize("role", list(Role))
def test_handshake_timeout(role: Role) -> None:
    protocol = HeartbeatProtocol(role, Config(handshake_timeout=2.5), now=1.0)
    protocol.data_to_send()
    assert protocol.abort_deadline == protocol.next_deadline == 3.5
    protocol.handle_timeout(3.5 - 2**-20)
    assert state(protocol) is State.HANDSHAKE
    protocol.handle_timeout(3.5)
    assert state(protocol) is State.ERROR
    assert drain(protocol) == [ConnectionEnded(1011, "handshake timeout", False, False)]
    assert protocol.data_to_send() == encode_close(1011, "handshake timeout")
    assert protocol.close_code == 1011
    assert not protocol.closed_by_peer


def test_handshake_with_a_secret_signs_and_checks_the_client_hello() -> None:
    """THB/1 §6 through the machine: the client signs its HELLO over the server's
    nonce and its own, the server checks it with its own nonce; a wrong secret is 1008."""
    keyed = Config(secret=b"shared", instance_id="c1")
    server, client = new_pair(Config(secret=b"shared"), keyed)
    feed(client, server.data_to_send(), 0.0)
    signed = client.data_to_send()
    expected = compute_auth(b"shared", SERVER_NONCE, CLIENT_NONCE, "c1")
    assert decode_hello(signed[HEADER_SIZE:]).auth == expected
    assert [type(event) for event in feed(server, signed, 0.0)] == [HandshakeComplete]
    server, client = new_pair(Config(secret=b"other"), keyed)
    feed(client, server.data_to_send(), 0.0)
    message = expect_error(server, client.data_to_send(), 0.0, 1008)
    assert message == "client authentication failed"


def test_a_health_change_before_our_hello_rides_on_the_hello() -> None:
    """A client whose HELLO is not out yet plans no early PING for a health
    change: the HELLO carries it, and the send rule starts from the HELLO."""
    server, client = new_pair()
    client.set_health(HealthStatus.DEGRADED, 0.0)
    feed(client, server.data_to_send(), 0.5)
    assert decode_hello(client.data_to_send()[HEADER_SIZE:]).status is HealthStatus.DEGRADED
    assert client.last_sent == 0.5
    assert client.ping_deadline == 0.5 + 1.0 * CLIENT_LEAD


# -- 1002: protocol errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "data", "message"),
    [
        (Role.SERVER, encode_data(b"x"), "DATA before the handshake"),
        (Role.CLIENT, encode_data(b""), "DATA before the handshake"),
        (Role.SERVER, PING, "PING before the handshake"),
        (Role.CLIENT, PONG, "PONG before the handshake"),
        (Role.SERVER, SERVER_HELLO, "role SERVER, expected CLIENT"),
        (Role.CLIENT, client_hello(), "role CLIENT, expected SERVER"),
        (Role.CLIENT, bytes.fromhex("07 00 00 00 00 00"), "unknown frame type"),
        (Role.CLIENT, bytes.fromhex("02 01 00 00 00 00"), "reserved flags"),
        (Role.CLIENT, bytes.fromhex("05 00 00 00 00 01 00"), "CLOSE payload must be"),
        (Role.CLIENT, SERVER_HELLO[:6] + b"THB0" + SERVER_HELLO[10:], "bad HELLO magic"),
        (Role.CLIENT, SERVER_HELLO[:10] + b"\x05" + SERVER_HELLO[11:], "unknown HELLO role"),
        (Role.CLIENT, SERVER_HELLO[:11] + b"\x03" + SERVER_HELLO[12:], "health status 3"),
        (Role.CLIENT, SERVER_HELLO[:12] + bytes(4) + SERVER_HELLO[16:], "at least 1 ms"),
        (Role.CLIENT, SERVER_HELLO[:20] + bytes(4) + SERVER_HELLO[24:], "max_frame 0"),
        (Role.CLIENT, SERVER_HELLO[:-2] + b"\x01\x00", "shorter than its id length"),
        (Role.CLIENT, SERVER_HELLO[:-1] + b"\x03", "auth length must be 0 or 32"),
        (Role.CLIENT, bytes.fromhex("01 00 00 00 00 25") + SERVER_HELLO[6:] + b"\0", "match"),
    ],
)
def test_protocol_errors_before_open(role: Role, data: bytes, message: str) -> None:
    protocol = HeartbeatProtocol(role, now=0.0)
    protocol.data_to_send()
    assert message in expect_error(protocol, data, 0.0, 1002)


@pytest.mark.parametrize(
    "data",
    [
        SERVER_HELLO,
        encode_ping(OPAQUE, HealthStatus.SERVING)[:-1] + b"\x03",
        encode_pong(OPAQUE, HealthStatus.SERVING)[:-1] + b"\xff",
        bytes.fromhex("05 00 00 00 00 04 03 e8 c3 28"),
        bytes.fromhex("04 00 00 00 00 08") + bytes(8),
    ],
    ids=["second-hello", "ping-status", "pong-status", "close-not-utf8", "pong-size"],
)
def test_protocol_errors_after_open(data: bytes) -> None:
    _, client = open_pair()
    expect_error(client, data, 1.0, 1002)


def test_second_hello_from_the_client_is_a_protocol_error() -> None:
    server, _ = open_pair()
    # Word for word: the reason travels in our CLOSE.
    assert expect_error(server, CLIENT_HELLO, 0.0, 1002) == "unexpected second HELLO"


@pytest.mark.parametrize(
    ("role", "data", "reason"),
    [
        (Role.SERVER, encode_data(b"x"), "DATA before the handshake completed"),
        (Role.SERVER, PING, "PING before the handshake completed"),
        (Role.CLIENT, PONG, "PONG before the handshake completed"),
    ],
)
def test_protocol_error_reasons_travel_in_the_close(role: Role, data: bytes, reason: str) -> None:
    """The reason of a protocol error is what the peer reads in our CLOSE, word for word."""
    protocol = HeartbeatProtocol(role, now=0.0, nonce=SERVER_NONCE)
    protocol.data_to_send()
    protocol.receive_data(data, 0.0)
    with pytest.raises(RemoteProtocolError, match=f"^{reason}$"):
        protocol.next_event()
    assert protocol.data_to_send() == encode_close(1002, reason)


@pytest.mark.parametrize("max_strikes", [3, 4])
def test_a_ping_flood_is_refused_with_1008_at_the_configured_strikes(max_strikes: int) -> None:
    """THB/1 §4.6 through the machine: the config's max_ping_strikes is the
    rate rule's limit; the PING that reaches it ends the connection with 1008."""
    server, _ = accepted_pair(Config(max_ping_strikes=max_strikes))
    ping = encode_ping(bytes(8), HealthStatus.SERVING)
    feed(server, ping, 1.0)  # on time
    for strike in range(1, max_strikes):
        feed(server, ping, 1.0)
        assert server.ping_strikes == strike
    message = expect_error(server, ping, 1.0, 1008)
    assert message == f"{max_strikes} PINGs in a row sooner than the agreed rate"


# -- 1009: frame limits ----------------------------------------------------------------


def test_too_big_is_refused_from_the_header_alone() -> None:
    server, _ = open_pair(Config(max_frame=1024))
    # Only the six header bytes of a 4 GiB frame: the error does not wait for the payload.
    server.receive_data(bytes.fromhex("02 00 ff ff ff ff"), 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code == CloseCode.TOO_BIG
    assert state(server) is State.ERROR


def test_handshake_limit_is_512_bytes_then_max_frame() -> None:
    client = HeartbeatProtocol(Role.CLIENT, now=0.0)
    big_hello = encode_hello(replace(decode_hello(SERVER_HELLO[HEADER_SIZE:]), auth=bytes(32)))
    assert len(big_hello) - HEADER_SIZE < 512
    assert [type(e) for e in feed(client, big_hello, 0.0)] == [HandshakeComplete]

    server = HeartbeatProtocol(Role.SERVER, now=0.0)
    expect_error(server, bytes.fromhex("01 00 00 00 02 01"), 0.0, 1009)  # 513 bytes
    server = HeartbeatProtocol(Role.SERVER, now=0.0)
    expect_error(server, encode_data(bytes(512)), 0.0, 1002)  # not too big, but too early


def test_data_at_the_limit_is_delivered() -> None:
    server, client = open_pair(Config(max_frame=1024), Config(max_frame=2048))
    assert feed(server, encode_data(bytes(1024)), 1.0) == [DataReceived(bytes(1024))]
    assert feed(client, encode_data(bytes(2048)), 1.0) == [DataReceived(bytes(2048))]
    expect_error(client, bytes.fromhex("02 00 00 00 08 01"), 1.0, 1009)


# -- sending DATA, and local errors ----------------------------------------------------


def test_send_data_round_trip_and_counters() -> None:
    server, client = open_pair()
    client.send_data(b"hello", 1.0)
    client.send_data(b"", 1.0)
    wire = client.data_to_send()
    assert wire == encode_data(b"hello") + encode_data(b"")
    assert client.data_to_send() == b""
    assert feed(server, wire, 1.0) == [DataReceived(b"hello"), DataReceived(b"")]
    assert client.counters.data_frames_out == 2
    assert server.counters.data_frames_in == 2
    assert server.counters.frames_in == 3  # and the HELLO
    assert client.counters.bytes_out == server.counters.bytes_in


def test_send_data_before_open_is_a_local_error() -> None:
    server, client = new_pair()
    for side in (server, client):
        with pytest.raises(LocalProtocolError, match="in state HANDSHAKE") as info:
            side.send_data(b"x", 0.0)
        assert info.value.code == CloseCode.PROTOCOL_ERROR
    assert client.data_to_send() == b""


def test_send_data_after_close_is_a_local_error() -> None:
    server, client = open_pair()
    client.close(now=1.0)
    with pytest.raises(LocalProtocolError, match="in state CLOSING"):
        client.send_data(b"x", 1.0)
    feed(server, client.data_to_send(), 1.0)
    feed(client, server.data_to_send(), 1.0)
    for side in (server, client):
        assert state(side) is State.CLOSED
        with pytest.raises(LocalProtocolError, match="in state CLOSED"):
            side.send_data(b"x", 1.0)


def test_send_data_over_the_peers_max_frame_is_refused_with_1009() -> None:
    server, client = open_pair(Config(max_frame=1024), Config(max_frame=4096))
    client.send_data(bytes(1024), 1.0)
    with pytest.raises(LocalProtocolError, match="exceeds the peer's limit of 1024") as info:
        client.send_data(bytes(1025), 2.0)
    assert info.value.code == CloseCode.TOO_BIG
    # Nothing changed: only the first frame is queued and the send timer did not move.
    assert client.data_to_send() == encode_data(bytes(1024))
    assert client.last_sent == 1.0
    server.send_data(bytes(4096), 1.0)
    assert state(client) is State.OPEN


def test_send_ping_before_open_is_a_local_error() -> None:
    server, _ = new_pair()
    with pytest.raises(LocalProtocolError, match="cannot send PING in state HANDSHAKE") as info:
        server.send_ping(0.0)
    assert info.value.code == CloseCode.PROTOCOL_ERROR


def test_control_pending_says_whether_control_frames_wait() -> None:
    server, client = new_pair()
    # The server's HELLO is queued at creation; a client speaks only after it.
    assert (server.control_pending, client.control_pending) == (True, False)
    server.data_to_send()
    assert (server.control_pending, client.control_pending) == (False, False)


def test_an_idle_open_connection_holds_no_queues() -> None:
    # A server holds thousands of idle connections: the queues of frames
    # decoded and to send are made when needed and dropped once used up.
    server, client = open_pair()
    for core in (server, client):
        core.send_data(b"x", 1.0)
        core.send_ping(1.0)
        core.data_to_send()
        assert core.next_event() is NEED_DATA
        held = [ref for ref in gc.get_referents(core) if isinstance(ref, list)]
        assert held == []


def test_frame_counters_count_each_frame_once() -> None:
    """frames_out counts every frame queued (HELLO, DATA, PING), pings_sent our
    PINGs, pongs_received the PONGs that came back: one each, never more."""
    server, client = open_pair()
    assert client.counters.frames_out == 1  # the HELLO
    client.send_data(b"a", 1.0)
    client.send_data(b"b", 1.0)
    assert client.counters.frames_out == 3
    client.send_ping(1.0)
    client.send_ping(1.0)
    assert (client.counters.frames_out, client.counters.pings_sent) == (5, 2)
    feed(server, client.data_to_send(), 1.0)
    assert client.counters.pongs_received == 0
    feed(client, server.data_to_send(), 1.25)  # the verdict PING and two PONGs
    assert client.counters.pongs_received == 2
    assert (server.counters.pings_sent, server.counters.frames_out) == (1, 4)


def test_handle_timeout_pings_at_the_ping_deadline_exactly() -> None:
    """The send rule's deadline is inclusive: handle_timeout at ping_deadline queues the PING."""
    server, _ = open_pair()
    server.data_to_send()  # the verdict PING, sent at 0.0
    assert server.ping_deadline == 1.0
    server.handle_timeout(1.0 - 2**-20)
    assert server.data_to_send() == b""
    server.handle_timeout(1.0)
    assert server.data_to_send() == encode_ping(opaque(2), HealthStatus.SERVING)
    assert server.last_sent == 1.0


def test_the_server_refreshes_its_round_trip_however_busy() -> None:
    """A server PINGs RTT_REFRESH send intervals after its last PING even while
    its DATA keeps the send rule quiet; a client, which PINGs when idle anyway, does not."""
    server, client = open_pair()  # the server's verdict PING went out at 0.0
    client.send_ping(0.0)
    busy = RTT_REFRESH * 1.0 - 0.5
    server.send_data(b"busy", busy)
    client.send_data(b"busy", busy)
    assert server.ping_deadline == RTT_REFRESH * 1.0
    assert client.ping_deadline == busy + 1.0 * CLIENT_LEAD


# -- the echo rule, and the order of events --------------------------------------------


def test_ping_vector_is_answered_with_the_pong_vector_ahead_of_data() -> None:
    server, client = accepted_pair()
    server.set_health(HealthStatus.NOT_SERVING, 1.0)
    server.send_data(b"queued first", 1.0)
    events = feed(server, PING, 1.0)
    assert events == [PingReceived(OPAQUE, HealthStatus.SERVING)]
    wire = server.data_to_send()
    assert wire == PONG + encode_data(b"queued first")


def test_pong_ahead_of_all_data_queued_in_the_same_turn() -> None:
    server, client = open_pair()
    client.send_data(b"a", 1.0)
    feed(client, encode_ping(b"12345678", HealthStatus.SERVING), 1.0)
    client.send_data(b"b", 1.0)
    feed(client, encode_ping(b"abcdefgh", HealthStatus.SERVING) + encode_data(b"c"), 1.0)
    assert frames(client.data_to_send()) == [
        WireFrame(FrameType.PONG, b"12345678\x00"),
        WireFrame(FrameType.PONG, b"abcdefgh\x00"),
        WireFrame(FrameType.DATA, b"a"),
        WireFrame(FrameType.DATA, b"b"),
    ]


def test_peer_health_change_comes_before_the_ping_or_pong_event() -> None:
    server, client = open_pair()
    events = feed(client, encode_ping(b"p" * 8, HealthStatus.DEGRADED), 1.0)
    assert events == [
        PeerHealthChanged(HealthStatus.DEGRADED, HealthStatus.SERVING),
        PingReceived(b"p" * 8, HealthStatus.DEGRADED),
    ]
    assert client.peer_health is HealthStatus.DEGRADED
    events = feed(client, encode_pong(b"q" * 8, HealthStatus.NOT_SERVING), 2.0)
    assert events == [
        PeerHealthChanged(HealthStatus.NOT_SERVING, HealthStatus.DEGRADED),
        PongReceived(b"q" * 8, HealthStatus.NOT_SERVING, None),
    ]
    # No change: no PeerHealthChanged.
    events = feed(client, encode_ping(b"r" * 8, HealthStatus.NOT_SERVING), 3.0)
    assert events == [PingReceived(b"r" * 8, HealthStatus.NOT_SERVING)]


def test_health_change_survives_a_caller_that_stops_early() -> None:
    server, client = open_pair()
    client.receive_data(encode_ping(b"p" * 8, HealthStatus.DEGRADED) + encode_data(b"x"), 1.0)
    assert isinstance(client.next_event(), PeerHealthChanged)
    client.receive_data(encode_data(b"y"), 1.5)
    assert drain(client) == [
        PingReceived(b"p" * 8, HealthStatus.DEGRADED),
        DataReceived(b"x"),
        DataReceived(b"y"),
    ]


# -- closing ---------------------------------------------------------------------------


def test_client_closes_and_server_answers_with_the_same_code() -> None:
    server, client = accepted_pair()
    client.close(4001, "bye", now=1.0)
    assert state(client) is State.CLOSING
    assert client.abort_deadline == 1.0 + 5.0
    assert client.ping_deadline == inf
    assert client.data_to_send() == encode_close(4001, "bye")
    client.close(now=1.5)  # idempotent
    assert client.data_to_send() == b""
    [ended] = feed(server, encode_close(4001, "bye"), 1.0)
    assert ended == ConnectionEnded(4001, "bye", by_peer=True, clean=True)
    assert state(server) is State.CLOSED
    assert server.closed_by_peer
    assert server.data_to_send() == encode_close(4001, "bye")
    [ended] = feed(client, encode_close(4001, "bye"), 1.25)
    assert ended == ConnectionEnded(4001, "bye", by_peer=False, clean=True)
    assert state(client) is State.CLOSED
    assert (client.close_code, server.close_code) == (4001, 4001)
    # Terminal: nothing more, whatever happens.
    for side in (client, server):
        side.receive_data(encode_data(b"late"), 2.0)
        side.receive_data(b"", 2.0)
        side.handle_timeout(100.0)
        side.close(now=100.0)
        assert drain(side) == []
        assert side.data_to_send() == b""
        assert side.abort_deadline == side.ping_deadline == inf


def test_every_close_we_queue_moves_last_sent() -> None:
    """Our CLOSE is a frame sent like any other: starting a close, answering the
    peer's and giving up on a silent peer each move last_sent to that moment.
    Starting a close is ours, not the peer's, from the start."""
    server, client = accepted_pair()
    client.close(now=2.0)
    assert (client.last_sent, client.closed_by_peer) == (2.0, False)
    feed(server, client.data_to_send(), 2.5)
    assert server.last_sent == 2.5
    server, client = open_pair()
    client.handle_timeout(3.0)  # nothing heard since 0.0: the peer is dead
    assert drain(client) == [ConnectionEnded(1011, "heartbeat timeout: peer silent", False, False)]
    assert client.data_to_send() == encode_close(1011, "heartbeat timeout: peer silent")
    assert client.last_sent == 3.0


def test_server_closes_with_going_away() -> None:
    server, client = accepted_pair()
    server.close(CloseCode.GOING_AWAY, now=1.0)
    [ended] = feed(client, server.data_to_send(), 1.0)
    assert ended == ConnectionEnded(1001, "", by_peer=True, clean=True)
    assert type(ended.code) is CloseCode
    [ended] = feed(server, client.data_to_send(), 1.0)
    assert ended == ConnectionEnded(1001, "", by_peer=False, clean=True)


def test_crossing_closes_each_keep_their_own_code() -> None:
    server, client = accepted_pair()
    server.close(1001, "draining", now=1.0)
    client.close(1000, "done", now=1.0)
    to_client, to_server = server.data_to_send(), client.data_to_send()
    [ended] = feed(client, to_client, 1.0)
    assert ended == ConnectionEnded(1000, "done", by_peer=False, clean=True)
    [ended] = feed(server, to_server, 1.0)
    assert ended == ConnectionEnded(1001, "draining", by_peer=False, clean=True)
    assert client.data_to_send() == server.data_to_send() == b""


def test_data_in_flight_is_delivered_while_closing() -> None:
    server, client = accepted_pair()
    server.send_data(b"in flight", 1.0)
    client.close(now=1.0)
    events = feed(client, server.data_to_send(), 1.5)
    assert events == [DataReceived(b"in flight")]
    assert state(client) is State.CLOSING
    # PINGs in flight are not answered any more: CLOSE was our last frame.
    events = feed(client, encode_ping(b"p" * 8, HealthStatus.SERVING), 1.5)
    assert events == [PingReceived(b"p" * 8, HealthStatus.SERVING)]
    assert client.data_to_send() == encode_close(1000)


def test_close_sends_already_queued_data_first() -> None:
    server, client = open_pair()
    client.send_data(b"last words", 1.0)
    client.close(now=1.0)
    assert types(client.data_to_send()) == [FrameType.DATA, FrameType.CLOSE]


@pytest.mark.parametrize("code", [-1, 0x10000])
def test_close_with_a_code_that_does_not_fit_raises_and_changes_nothing(code: int) -> None:
    server, client = open_pair()
    client.send_data(b"still queued", 1.0)
    with pytest.raises(ValueError, match="close code must be 0 to 65535"):
        client.close(code, now=1.0)
    assert state(client) is State.OPEN
    assert client.close_code is None
    assert types(client.data_to_send()) == [FrameType.DATA]
    client.close(CloseCode.NORMAL, now=1.0)  # a valid close still works
    assert state(client) is State.CLOSING
    assert client.data_to_send() == encode_close(CloseCode.NORMAL)


def test_remote_close_answer_goes_after_data_already_queued() -> None:
    server, client = accepted_pair()
    server.send_data(b"queued", 1.0)
    feed(server, encode_ping(b"p" * 8, HealthStatus.SERVING) + encode_close(1000), 1.0)
    # No frame after the CLOSE: the queued DATA goes first, the PONG ahead of it.
    assert types(server.data_to_send()) == [FrameType.PONG, FrameType.DATA, FrameType.CLOSE]


def test_close_timeout() -> None:
    server, client = open_pair(client_config=Config(close_timeout=0.5))
    client.close(1000, "bye", now=2.0)
    client.data_to_send()
    assert client.abort_deadline == 2.5
    client.handle_timeout(2.5 - 2**-20)
    assert state(client) is State.CLOSING
    client.handle_timeout(2.5)
    assert state(client) is State.CLOSED
    assert drain(client) == [ConnectionEnded(1000, "bye", by_peer=False, clean=False)]
    assert client.data_to_send() == b""


def test_close_during_the_handshake() -> None:
    server, client = new_pair()
    server.data_to_send()
    client.close(1000, now=0.0)
    assert client.data_to_send() == encode_close(1000)  # no HELLO before it
    [ended] = feed(server, encode_close(1000), 0.0)
    assert ended == ConnectionEnded(1000, "", by_peer=True, clean=True)
    [ended] = feed(client, server.data_to_send(), 0.0)
    assert ended == ConnectionEnded(1000, "", by_peer=False, clean=True)


def test_server_at_capacity_closes_1013_and_client_sees_it() -> None:
    client = HeartbeatProtocol(Role.CLIENT, now=0.0)
    [ended] = feed(client, encode_close(CloseCode.TRY_AGAIN_LATER, "full"), 0.0)
    assert ended == ConnectionEnded(1013, "full", by_peer=True, clean=True)
    assert client.data_to_send() == encode_close(1013, "full")


def test_server_close_crossing_the_client_hello() -> None:
    server, client = new_pair(Config(max_frame=2048))
    feed(client, server.data_to_send(), 0.0)  # the client is OPEN ...
    server.close(CloseCode.GOING_AWAY, now=0.0)  # ... when the server starts draining
    client.send_data(bytes(2000), 0.25)
    client.send_ping(0.25)
    client.send_ping(0.25)
    client.send_ping(0.25)
    events = feed(server, client.data_to_send(), 0.5)
    # The HELLO in flight is no error; DATA in flight is delivered, PINGs are not answered.
    assert [type(event) for event in events] == [PingReceived] * 3 + [DataReceived]
    assert state(server) is State.CLOSING
    assert server.peer is not None
    assert server.peer_send_interval == 1.0
    assert server.data_to_send() == encode_close(1001)  # no PONGs after it
    [ended] = feed(client, encode_close(1001), 0.5)
    assert ended == ConnectionEnded(1001, "", by_peer=True, clean=True)
    [ended] = feed(server, client.data_to_send(), 0.5)
    assert ended == ConnectionEnded(1001, "", by_peer=False, clean=True)


def test_client_close_crossing_the_server_hello() -> None:
    server, client = new_pair()
    client.close(1000, now=0.0)
    assert feed(client, server.data_to_send(), 0.0) == []
    assert state(client) is State.CLOSING
    assert client.data_to_send() == encode_close(1000)  # still no HELLO
    # The server never completed its handshake, so nothing but HELLO or CLOSE may follow.
    expect_error(client, encode_data(b"x"), 0.0, 1002, closes=False)


def test_frames_before_the_peer_hello_while_closing_are_protocol_errors() -> None:
    server = HeartbeatProtocol(Role.SERVER, now=0.0)
    server.close(now=0.0)
    server.data_to_send()
    ping = encode_ping(bytes(8), HealthStatus.SERVING)
    message = expect_error(server, ping, 0.0, 1002, closes=False)
    assert "before the handshake" in message


def test_protocol_error_while_closing_sends_no_second_close() -> None:
    server, client = open_pair()
    client.close(1000, now=1.0)
    assert types(client.data_to_send()) == [FrameType.CLOSE]
    client.receive_data(bytes.fromhex("09 00 00 00 00 00"), 1.0)
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert state(client) is State.ERROR
    assert client.close_code == info.value.code == 1002
    assert client.data_to_send() == b""


def test_close_reason_is_truncated_not_refused() -> None:
    server, client = open_pair()
    client.close(1000, "x" * 500, now=1.0)
    [ended] = feed(server, client.data_to_send(), 1.0)
    assert ended == ConnectionEnded(1000, "x" * 123, by_peer=True, clean=True)


def test_a_close_with_1006_is_a_protocol_error_and_is_not_echoed() -> None:
    # THB/1 §5.5: 1006 only describes an ending without CLOSE; it never travels.
    server, client = open_pair()
    payload = (1006).to_bytes(2, "big") + b"lost?"
    frame = bytes((0x05, 0)) + len(payload).to_bytes(4, "big") + payload
    message = expect_error(client, frame, 1.0, 1002)
    assert "1006" in message
    with pytest.raises(ValueError, match="1006 is never sent"):
        server.close(CloseCode.ABNORMAL_CLOSURE, now=1.0)
    assert state(server) is State.OPEN  # refused before anything changed


def test_the_close_for_a_protocol_error_counts_as_a_frame_sent() -> None:
    # Every CLOSE is counted in frames_out and moves last_sent, the protocol
    # error's too (it was queued without either).
    server, client = open_pair()
    sent = client.counters.frames_out
    expect_error(client, bytes.fromhex("09 00 00 00 00 00"), 2.5, 1002)
    assert client.counters.frames_out == sent + 1
    assert client.last_sent == 2.5


# -- end of file -----------------------------------------------------------------------


def test_eof_during_handshake() -> None:
    server = HeartbeatProtocol(Role.SERVER, now=0.0)
    [ended] = feed(server, b"", 1.0)
    assert ended == ConnectionEnded(1006, "connection lost", by_peer=True, clean=False)
    assert state(server) is State.ERROR
    assert server.close_code == CloseCode.ABNORMAL_CLOSURE
    assert server.closed_by_peer


def test_eof_while_open_after_the_last_frames() -> None:
    server, client = open_pair()
    client.receive_data(encode_data(b"a") + encode_data(b"b")[:3], 1.0)
    client.receive_data(b"", 1.0)
    events = drain(client)
    assert events == [
        DataReceived(b"a"),
        ConnectionEnded(1006, "connection lost", by_peer=True, clean=False),
    ]
    assert state(client) is State.ERROR
    assert client.next_event() is NEED_DATA


def test_eof_while_closing() -> None:
    server, client = open_pair()
    client.close(4002, "app", now=1.0)
    [ended] = feed(client, b"", 1.5)
    assert ended == ConnectionEnded(4002, "app", by_peer=False, clean=False)
    assert state(client) is State.CLOSED


@pytest.mark.parametrize("terminal", [State.CLOSED, State.ERROR])
def test_eof_after_the_end_is_ignored(terminal: State) -> None:
    server, client = open_pair()
    if terminal is State.CLOSED:
        feed(client, encode_close(1000), 1.0)
    else:
        client.handle_timeout(3.0)
        drain(client)
    assert client.state is terminal
    assert feed(client, b"", 2.0) == []
    assert client.state is terminal


# -- the sticky error state ------------------------------------------------------------


def test_error_state_is_sticky() -> None:
    server, client = open_pair()
    client.send_data(b"dropped", 1.0)
    client.receive_data(encode_data(b"ok") + bytes.fromhex("02 04 00 00 00 00"), 1.0)
    assert client.next_event() == DataReceived(b"ok")
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    error = info.value
    assert error.code == 1002
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as again:
            client.next_event()
        assert again.value is error
    assert state(client) is State.ERROR
    assert client.close_code == 1002
    assert client.close_reason == str(error)
    assert not client.closed_by_peer
    # The CLOSE is queued for a best-effort flush; the unsent DATA is dropped.
    assert client.data_to_send() == encode_close(1002, str(error))
    # Nothing else changes it.
    client.receive_data(encode_close(1000), 2.0)
    client.handle_timeout(100.0)
    client.close(now=100.0)
    client.set_health(HealthStatus.DEGRADED, 100.0)
    with pytest.raises(LocalProtocolError):
        client.send_data(b"x", 100.0)
    with pytest.raises(LocalProtocolError):
        client.send_ping(100.0)
    assert client.data_to_send() == b""
    assert client.close_code == 1002
    with pytest.raises(RemoteProtocolError) as again:
        client.next_event()
    assert again.value is error


# -- whole, bytewise, random splits ----------------------------------------------------


#: What a client sends a server in a whole session, and what the server makes of it.
CLIENT_STREAM = b"".join(
    [
        client_hello(status=HealthStatus.DEGRADED, instance_id="c"),
        encode_data(b"one"),
        encode_ping(b"A" * 8, HealthStatus.DEGRADED),
        encode_pong(b"B" * 8, HealthStatus.SERVING),
        encode_data(bytes(600)),
        encode_close(1000, "done"),
    ]
)


def session_events(chunks: Sequence[bytes]) -> list[object]:
    server = HeartbeatProtocol(Role.SERVER, now=0.0)
    events: list[object] = []
    for chunk in chunks:
        events += feed(server, chunk, 0.0)
    return [type(event) if isinstance(event, HandshakeComplete) else event for event in events]


EXPECTED_SESSION = [
    HandshakeComplete,
    DataReceived(b"one"),
    PingReceived(b"A" * 8, HealthStatus.DEGRADED),
    PeerHealthChanged(HealthStatus.SERVING, HealthStatus.DEGRADED),
    PongReceived(b"B" * 8, HealthStatus.SERVING, None),
    DataReceived(bytes(600)),
    ConnectionEnded(1000, "done", by_peer=True, clean=True),
]


def test_session_fed_whole_and_bytewise() -> None:
    assert session_events([CLIENT_STREAM]) == EXPECTED_SESSION
    assert session_events([CLIENT_STREAM[i : i + 1] for i in range(len(CLIENT_STREAM))]) == (
        EXPECTED_SESSION
    )


@settings(max_examples=100)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(CLIENT_STREAM)), max_size=20))
def test_session_fed_in_random_splits(cuts: list[int]) -> None:
    points = sorted({0, len(CLIENT_STREAM), *cuts})
    chunks = [CLIENT_STREAM[a:b] for a, b in pairwise(points)]
    assert session_events(chunks) == EXPECTED_SESSION


# -- fuzzing ---------------------------------------------------------------------------


def fuzz(protocol: HeartbeatProtocol, data: bytes, cuts: Sequence[int]) -> None:
    """Only events or RemoteProtocolError may come out, and an error is final."""
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    now = 0.0
    for a, b in pairwise(points):
        now += 0.125
        protocol.receive_data(data[a:b], now)
        try:
            while (event := protocol.next_event()) is not NEED_DATA:
                assert isinstance(event, Event)
                if isinstance(event, DataReceived):
                    assert protocol.peer is not None
        except RemoteProtocolError as exc:
            assert exc.code in (1002, 1008, 1009)
            assert state(protocol) is State.ERROR
            assert protocol.close_code == exc.code
            return
        protocol.data_to_send()
        protocol.handle_timeout(now)


fuzz_cuts = st.lists(st.integers(min_value=0, max_value=3000), max_size=10)


@settings(max_examples=300)
@given(role=st.sampled_from(Role), data=st.binary(max_size=1000), cuts=fuzz_cuts)
def test_fuzz_receive_with_arbitrary_bytes(role: Role, data: bytes, cuts: list[int]) -> None:
    fuzz(HeartbeatProtocol(role, now=0.0), data, cuts)


frame_bytes = st.one_of(
    st.binary(min_size=1, max_size=10).map(encode_data),
    st.tuples(st.binary(min_size=8, max_size=8), st.sampled_from(HealthStatus)).map(
        lambda args: encode_ping(*args)
    ),
    st.tuples(st.binary(min_size=8, max_size=8), st.sampled_from(HealthStatus)).map(
        lambda args: encode_pong(*args)
    ),
    # Built by hand, not with encode_close, which refuses 1006 (it never travels):
    # a peer may still send one, and must be refused with 1002.
    st.integers(0, 0xFFFF).map(lambda code: encode_frame(FrameType.CLOSE, code.to_bytes(2, "big"))),
    st.binary(max_size=40),
)


@settings(max_examples=300)
@given(
    role=st.sampled_from(Role),
    tail=st.lists(frame_bytes, max_size=8),
    cuts=fuzz_cuts,
)
def test_fuzz_receive_with_arbitrary_bytes_after_a_valid_hello(
    role: Role, tail: list[bytes], cuts: list[int]
) -> None:
    hello = SERVER_HELLO if role is Role.CLIENT else CLIENT_HELLO
    protocol = HeartbeatProtocol(role, now=0.0, nonce=SERVER_NONCE)
    fuzz(protocol, hello + b"".join(tail), cuts)
