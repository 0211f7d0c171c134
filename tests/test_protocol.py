"""Example and property tests for the THB/1 state machine (trio_heartbeat._protocol).

One test per rule of THB/1 (docs/protocol.md), in virtual time: every ``now`` is passed
explicitly and every deadline is checked exactly. Times are chosen as binary
fractions so that float arithmetic is exact; a client's PING deadlines, which
involve ``CLIENT_LEAD``, are computed here the way the core computes them. The
client/server pair used by most tests is wired by hand, so each test shows
which bytes cross when.
"""

from __future__ import annotations

import doctest
from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise
from math import inf

import pytest
from helpers import WireFrame, wire_frame
from hypothesis import given, settings
from hypothesis import strategies as st
from vectors import (
    CLIENT_HELLO,
    CLIENT_NONCE,
    CLOSE_1011,
    OPAQUE,
    PING,
    PONG,
    SERVER_HELLO,
    SERVER_NONCE,
)

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
    FrameDecoder,
    FrameType,
    HealthStatus,
    Hello,
    Role,
    decode_close,
    decode_hello,
    encode_close,
    encode_data,
    encode_hello,
    encode_ping,
    encode_pong,
)
from trio_heartbeat._handshake import CLIENT_LEAD, compute_auth
from trio_heartbeat._state import TRANSITIONS, Trigger

#: The client of the §7 vector, as a Config.
VECTOR_CLIENT_CONFIG = Config(
    interval=0.5, timeout=1.5, max_frame=65536, instance_id="node-1", secret=b"secret"
)


# -- helpers --------------------------------------------------------------------


def state(protocol: HeartbeatProtocol) -> State:
    """The state, read through a call so that mypy does not carry narrowing across steps."""
    return protocol.state


def drain(protocol: HeartbeatProtocol) -> list[Event]:
    """Every event available now."""
    events: list[Event] = []
    while (event := protocol.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        events.append(event)
    return events


def frames(data: bytes) -> list[WireFrame]:
    """Decode bytes a protocol queued; they must be whole frames."""
    decoder = FrameDecoder(0xFFFFFFFF)
    decoder.receive_data(data)
    out: list[WireFrame] = []
    while (frame := decoder.next_frame()) is not None:
        out.append(wire_frame(frame))
    assert decoder.buffered == 0
    return out


def types(data: bytes) -> list[FrameType]:
    return [frame.type for frame in frames(data)]


def feed(protocol: HeartbeatProtocol, data: bytes, now: float) -> list[Event]:
    protocol.receive_data(data, now)
    return drain(protocol)


def new_pair(
    server_config: Config | None = None,
    client_config: Config | None = None,
    *,
    now: float = 0.0,
) -> tuple[HeartbeatProtocol, HeartbeatProtocol]:
    """A server and a client at ``now``, with the nonces of the §7 vectors."""
    server = HeartbeatProtocol(Role.SERVER, server_config, now=now, nonce=SERVER_NONCE)
    client = HeartbeatProtocol(Role.CLIENT, client_config, now=now, nonce=CLIENT_NONCE)
    return server, client


def open_pair(
    server_config: Config | None = None,
    client_config: Config | None = None,
    *,
    now: float = 0.0,
) -> tuple[HeartbeatProtocol, HeartbeatProtocol]:
    """A server and a client that completed the handshake at ``now``, nothing queued."""
    server, client = new_pair(server_config, client_config, now=now)
    [done] = feed(client, server.data_to_send(), now)
    assert isinstance(done, HandshakeComplete)
    [done] = feed(server, client.data_to_send(), now)
    assert isinstance(done, HandshakeComplete)
    assert server.state is state(client) is State.OPEN
    return server, client


def expect_error(
    protocol: HeartbeatProtocol, data: bytes, now: float, code: int, *, closes: bool = True
) -> str:
    """Feed ``data``; a RemoteProtocolError with ``code`` must follow; return its message.

    Unless the side had already sent its CLOSE (``closes=False``), a CLOSE with
    the error's code must be queued.
    """
    protocol.receive_data(data, now)
    with pytest.raises(RemoteProtocolError) as info:
        drain(protocol)
    assert info.value.code == code
    assert state(protocol) is State.ERROR
    assert protocol.close_code == code
    queued = frames(protocol.data_to_send())
    if closes:
        assert queued[-1].type is FrameType.CLOSE
        assert decode_close(queued[-1].payload)[0] == code
    else:
        assert queued == []
    return str(info.value)


def client_hello(**changes: object) -> bytes:
    values: dict[str, object] = {
        "role": Role.CLIENT,
        "status": HealthStatus.SERVING,
        "interval_ms": 1000,
        "timeout_ms": 3000,
        "max_frame": 1 << 20,
        "nonce": CLIENT_NONCE,
    }
    values.update(changes)
    return encode_hello(Hello(**values))  # type: ignore[arg-type]


# -- configuration ----------------------------------------------------------------


def test_config_announces_whole_milliseconds() -> None:
    config = Config(interval=0.5, timeout=1.5)
    assert (config.interval_ms, config.timeout_ms) == (500, 1500)
    assert Config(interval=0.0006).interval_ms == 1  # rounds to the nearest ms


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"interval": 0.0}, "interval must be between"),
        ({"interval": 0.0004999}, "interval must be between"),
        ({"timeout": -1.0}, "timeout must be between"),
        ({"timeout": 5e6}, "timeout must be between"),
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


def test_need_data_repr() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"


def test_transition_table_shape() -> None:
    # Terminal states have no way out; OPEN is reached only from HANDSHAKE.
    assert all(state not in (State.CLOSED, State.ERROR) for state, _ in TRANSITIONS)
    assert [key for key, target in TRANSITIONS.items() if target is State.OPEN] == [
        (State.HANDSHAKE, Trigger.HANDSHAKE_DONE)
    ]
    assert (State.CLOSING, Trigger.TIMEOUT) not in TRANSITIONS


def test_doctests() -> None:
    results = doctest.testmod(_protocol)
    assert results.attempted > 0
    assert results.failed == 0


# -- handshake and the §7 vectors ---------------------------------------------------


def test_server_hello_is_the_vector() -> None:
    server = HeartbeatProtocol(Role.SERVER, Config(), now=0.0, nonce=SERVER_NONCE)
    assert state(server) is State.HANDSHAKE
    assert server.data_to_send() == SERVER_HELLO
    assert server.data_to_send() == b""


def test_client_hello_is_the_vector() -> None:
    client = HeartbeatProtocol(Role.CLIENT, VECTOR_CLIENT_CONFIG, now=0.0, nonce=CLIENT_NONCE)
    assert client.data_to_send() == b""  # the client waits for the server's HELLO
    [done] = feed(client, SERVER_HELLO, 0.0)
    assert done == HandshakeComplete(decode_hello(SERVER_HELLO[HEADER_SIZE:]), 0.5)
    assert client.data_to_send() == CLIENT_HELLO


def authenticating_server() -> HeartbeatProtocol:
    server = HeartbeatProtocol(Role.SERVER, Config(secret=b"secret"), now=0.0, nonce=SERVER_NONCE)
    assert server.data_to_send() == SERVER_HELLO  # the secret is not announced
    return server


def test_authenticated_client_hello_vector_is_accepted() -> None:
    server = authenticating_server()
    [done] = feed(server, CLIENT_HELLO, 0.0)
    assert isinstance(done, HandshakeComplete)
    assert done.peer.instance_id == "node-1"
    assert state(server) is State.OPEN
    # send_interval = min(own 1000 ms, client timeout 1500 / 2)
    assert done.send_interval == server.send_interval == 0.75
    assert server.peer_send_interval == 0.5  # min(client 500 ms, own timeout 3000 / 2)


@pytest.mark.parametrize("index", [HEADER_SIZE + 36 + 6, len(CLIENT_HELLO) - 1])
def test_client_hello_with_a_flipped_auth_byte_is_refused(index: int) -> None:
    tampered = bytearray(CLIENT_HELLO)
    tampered[index] ^= 0x01
    message = expect_error(authenticating_server(), bytes(tampered), 0.0, 1008)
    assert "authentication failed" in message


def test_client_hello_without_auth_is_refused() -> None:
    unsigned = encode_hello(replace(decode_hello(CLIENT_HELLO[HEADER_SIZE:]), auth=b""))
    expect_error(authenticating_server(), unsigned, 0.0, 1008)


def test_client_hello_signed_for_another_server_nonce_is_refused() -> None:
    server = HeartbeatProtocol(
        Role.SERVER, Config(secret=b"secret"), now=0.0, nonce=bytes(range(1, 17))
    )
    expect_error(server, CLIENT_HELLO, 0.0, 1008)


def test_client_hello_with_wrong_key_is_refused() -> None:
    server = HeartbeatProtocol(Role.SERVER, Config(secret=b"other"), now=0.0, nonce=SERVER_NONCE)
    expect_error(server, CLIENT_HELLO, 0.0, 1008)


def test_server_without_secret_ignores_auth() -> None:
    server = HeartbeatProtocol(Role.SERVER, Config(), now=0.0, nonce=SERVER_NONCE)
    tampered = bytearray(CLIENT_HELLO)
    tampered[-1] ^= 0xFF
    [done] = feed(server, bytes(tampered), 0.0)
    assert isinstance(done, HandshakeComplete)


def test_client_signs_with_the_server_nonce_it_received() -> None:
    server, client = new_pair(Config(secret=b"k"), Config(secret=b"k", instance_id="me"))
    feed(client, server.data_to_send(), 0.0)
    hello = decode_hello(client.data_to_send()[HEADER_SIZE:])
    assert hello.auth == compute_auth(b"k", SERVER_NONCE, CLIENT_NONCE, "me")
    # And a client without a secret sends no auth at all.
    server, client = new_pair()
    feed(client, server.data_to_send(), 0.0)
    assert decode_hello(client.data_to_send()[HEADER_SIZE:]).auth == b""


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


@pytest.mark.parametrize(
    ("server_config", "hello", "message"),
    [
        (Config(accept_interval=(0.5, 2.0)), client_hello(interval_ms=499), "interval 499 ms"),
        (Config(accept_interval=(0.5, 2.0)), client_hello(interval_ms=2001), "interval 2001 ms"),
        (Config(accept_timeout=(1.0, 4.0)), client_hello(timeout_ms=999), "timeout 999 ms"),
        (Config(accept_timeout=(1.0, 4.0)), client_hello(timeout_ms=4001), "timeout 4001 ms"),
        (Config(), client_hello(interval_ms=4), "interval 4 ms"),
        (Config(), client_hello(timeout_ms=9), "timeout 9 ms"),
    ],
)
def test_hello_values_outside_the_accepted_range_are_refused_with_1008(
    server_config: Config, hello: bytes, message: str
) -> None:
    server = HeartbeatProtocol(Role.SERVER, server_config, now=0.0)
    server.data_to_send()
    assert message in expect_error(server, hello, 0.0, 1008)


@pytest.mark.parametrize(
    "hello",
    [
        client_hello(interval_ms=500),
        client_hello(interval_ms=2000),
        client_hello(timeout_ms=1000),
        client_hello(timeout_ms=4000),
    ],
)
def test_accepted_ranges_are_inclusive(hello: bytes) -> None:
    config = Config(accept_interval=(0.5, 2.0), accept_timeout=(1.0, 4.0))
    server = HeartbeatProtocol(Role.SERVER, config, now=0.0)
    assert [type(event) for event in feed(server, hello, 0.0)] == [HandshakeComplete]


def test_client_refuses_server_hello_values_too() -> None:
    client = HeartbeatProtocol(Role.CLIENT, Config(accept_timeout=(5.0, 10.0)), now=0.0)
    expect_error(client, SERVER_HELLO, 0.0, 1008)
    assert client.data_to_send() == b""  # the CLOSE was taken above; no HELLO ever queued


# -- 1002: protocol errors -----------------------------------------------------------


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
    assert "second HELLO" in expect_error(server, CLIENT_HELLO, 0.0, 1002)


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


# -- sending DATA ---------------------------------------------------------------------------


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
    with pytest.raises(LocalProtocolError, match="cannot send PING in state HANDSHAKE"):
        server.send_ping(0.0)


# -- the send rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_config", "client_config", "server_interval", "client_interval"),
    [
        # own interval is the smaller
        (Config(interval=0.5, timeout=3.0), Config(interval=0.25, timeout=2.0), 0.5, 0.25),
        # half the peer's timeout is the smaller
        (Config(interval=1.0, timeout=1.0), Config(interval=2.0, timeout=0.5), 0.25, 0.5),
        # equal
        (Config(interval=0.5, timeout=2.0), Config(interval=1.0, timeout=1.0), 0.5, 1.0),
    ],
)
def test_send_interval_is_min_of_own_interval_and_half_peer_timeout(
    server_config: Config, client_config: Config, server_interval: float, client_interval: float
) -> None:
    server, client = open_pair(server_config, client_config)
    assert server.send_interval == server_interval == client.peer_send_interval
    assert client.send_interval == client_interval == server.peer_send_interval


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


def run_prompt_pair(
    server: HeartbeatProtocol,
    client: HeartbeatProtocol,
    until: float,
    client_health: Sequence[tuple[float, HealthStatus]] = (),
) -> tuple[list[float], list[float]]:
    """Drive an open pair over a network with no delay until ``until``, as a runtime would.

    The clock stops at every deadline of either side (and at each
    ``client_health`` change), ``handle_timeout`` runs exactly then, and every
    byte queued is delivered at once. Returns the times of the PINGs the
    server and the client sent.
    """
    pings: dict[Role, list[float]] = {Role.SERVER: [], Role.CLIENT: []}
    changes = sorted(client_health)
    while True:
        now = min(server.next_deadline, client.next_deadline, *(at for at, _ in changes[:1]))
        if now > until:
            return pings[Role.SERVER], pings[Role.CLIENT]
        while changes and changes[0][0] == now:
            client.set_health(changes.pop(0)[1], now)
        for side in (client, server):
            side.handle_timeout(now)
        moved = True
        while moved:
            moved = False
            for side, peer in ((client, server), (server, client)):
                data = side.data_to_send()
                if data:
                    moved = True
                    for frame in frames(data):
                        if frame.type is FrameType.PING:
                            pings[side.role].append(now)
                    feed(peer, data, now)


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


def test_a_client_health_ping_at_the_earliest_moment_is_no_strike() -> None:
    # Regular PINGs at 0.9 and 1.8; the change at 1.8125 is PINGed as soon as
    # the rate rule allows, at 1.8 + 0.5. Measured as a difference, 2.3 - 1.8 =
    # 0.4999999999999998 < 0.5 would make it a strike for a PING the rule allowed.
    server, client = open_pair()
    regular = 1.0 * CLIENT_LEAD
    server_pings, client_pings = run_prompt_pair(
        server, client, 3.0, [(1.8125, HealthStatus.DEGRADED)]
    )
    assert server_pings == []
    assert client_pings[:2] == [regular, regular + regular]
    assert len(client_pings) == 3
    assert client_pings[2] < client_pings[1] + regular  # sooner than the regular one
    assert server.ping_strikes == 0


# -- the silence rule and the detector clamp ---------------------------------------------------


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
    assert drain(client) == [ConnectionEnded(1011, "heartbeat timeout", by_peer=False, clean=False)]
    # The CLOSE is the §7 vector byte for byte, and queued DATA is dropped.
    assert client.data_to_send() == CLOSE_1011
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
    assert drain(client) == [ConnectionEnded(1011, "heartbeat timeout", False, False)]


def test_liveness_deadline_is_inf_unless_open() -> None:
    server, client = new_pair()
    assert client.liveness_deadline == inf
    assert client.abort_deadline == client.next_deadline == 10.0  # the handshake timeout


# -- pausing liveness ---------------------------------------------------------------------


def test_pause_and_resume_liveness() -> None:
    server, client = open_pair()
    feed(client, encode_data(b"x"), 1.0)
    client.pause_liveness(2.0)
    client.pause_liveness(2.5)  # a second pause changes nothing
    assert client.liveness_deadline == client.abort_deadline == inf
    client.handle_timeout(50.0)  # long silence, but we were not reading
    assert state(client) is State.OPEN
    assert types(client.data_to_send()) == [FrameType.PING]  # still pinging
    assert client.next_deadline == 50.0 + 1.0 * CLIENT_LEAD
    client.resume_liveness(60.0)
    assert client.last_received == 60.0
    assert client.abort_deadline == 63.0
    client.resume_liveness(70.0)  # not paused: nothing happens
    assert client.abort_deadline == 63.0
    client.handle_timeout(63.0)
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


# -- the echo rule, RTT and health -------------------------------------------------------------


def test_ping_vector_is_answered_with_the_pong_vector_ahead_of_data() -> None:
    server, client = open_pair()
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


# -- the rate rule: PING strikes ---------------------------------------------------------------


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


# -- handshake timeout ------------------------------------------------------------------------


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


# -- closing ------------------------------------------------------------------------------------


def test_client_closes_and_server_answers_with_the_same_code() -> None:
    server, client = open_pair()
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


def test_server_closes_with_going_away() -> None:
    server, client = open_pair()
    server.close(CloseCode.GOING_AWAY, now=1.0)
    [ended] = feed(client, server.data_to_send(), 1.0)
    assert ended == ConnectionEnded(1001, "", by_peer=True, clean=True)
    assert type(ended.code) is CloseCode
    [ended] = feed(server, client.data_to_send(), 1.0)
    assert ended == ConnectionEnded(1001, "", by_peer=False, clean=True)


def test_crossing_closes_each_keep_their_own_code() -> None:
    server, client = open_pair()
    server.close(1001, "draining", now=1.0)
    client.close(1000, "done", now=1.0)
    to_client, to_server = server.data_to_send(), client.data_to_send()
    [ended] = feed(client, to_client, 1.0)
    assert ended == ConnectionEnded(1000, "done", by_peer=False, clean=True)
    [ended] = feed(server, to_server, 1.0)
    assert ended == ConnectionEnded(1001, "draining", by_peer=False, clean=True)
    assert client.data_to_send() == server.data_to_send() == b""


def test_data_in_flight_is_delivered_while_closing() -> None:
    server, client = open_pair()
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
    server, client = open_pair()
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


# -- end of file ----------------------------------------------------------------------------


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


# -- the sticky error state -------------------------------------------------------------------


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


# -- whole, bytewise, random splits ---------------------------------------------------------------

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


# -- fuzzing --------------------------------------------------------------------------------------


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
    st.integers(0, 0xFFFF).map(encode_close),
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


def test_control_pending_says_whether_control_frames_wait() -> None:
    server, client = new_pair()
    # The server's HELLO is queued at creation; a client speaks only after it.
    assert (server.control_pending, client.control_pending) == (True, False)
    server.data_to_send()
    assert (server.control_pending, client.control_pending) == (False, False)


# -- the rate rule: only strikes in a row count -------------------------------------------------


def test_alternating_early_and_on_time_pings_never_close() -> None:
    """Jitter makes every other PING early; each on-time one clears the strike,
    so the count never builds up, however long it goes on."""
    server, _ = open_pair()
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
