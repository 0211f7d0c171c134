"""The THB/1 handshake (``_handshake.py``): building our HELLO, judging the peer's, agreeing on timing.

The HELLOs are checked byte for byte against the test vectors of THB/1 §7
(``tests/vectors.py``), authentication against a tampered, unsigned,
wrongly keyed or wrongly addressed HELLO, and the accepted ranges at and just
past their bounds; the intervals both sides keep follow from the two HELLOs.
Most tests drive the whole sans-IO core, as a peer would see it; the pure
functions ``build_hello``, ``check_peer_hello`` and ``agree`` are also tested
on their own. No clock, no I/O: every ``now`` is passed in.
"""

from __future__ import annotations

import doctest
from dataclasses import replace

import pytest
from helpers import client_hello, expect_error, feed, new_pair, open_pair, state
from vectors import CLIENT_HELLO, CLIENT_NONCE, KEY, SERVER_HELLO, SERVER_NONCE

from trio_heartbeat import Config, HandshakeComplete, HeartbeatProtocol, State, _handshake
from trio_heartbeat._errors import RemoteProtocolError
from trio_heartbeat._frames import (
    HEADER_SIZE,
    HealthStatus,
    Hello,
    Role,
    decode_hello,
    encode_hello,
)
from trio_heartbeat._handshake import (
    CLIENT_LEAD,
    Timing,
    agree,
    build_hello,
    check_peer_hello,
    compute_auth,
)

#: The client of the §7 vector, as a Config.
VECTOR_CLIENT_CONFIG = Config(
    interval=0.5, timeout=1.5, max_frame=65536, instance_id="node-1", secret=b"secret"
)


# -- the §7 vectors, and authentication ------------------------------------------------


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


# -- the accepted ranges ---------------------------------------------------------------


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


# -- the agreed timing -----------------------------------------------------------------


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


# -- the pure functions on their own ---------------------------------------------------

#: A server HELLO as check_peer_hello sees it: 1 s interval, 3 s timeout.
PEER_SERVER = Hello(Role.SERVER, HealthStatus.SERVING, 1000, 3000, 1 << 20, SERVER_NONCE)


def test_compute_auth_is_the_vector_and_covers_every_input() -> None:
    auth = compute_auth(KEY, SERVER_NONCE, CLIENT_NONCE, "node-1")
    assert auth == decode_hello(CLIENT_HELLO[HEADER_SIZE:]).auth
    assert len(auth) == 32
    changed = [
        compute_auth(b"other", SERVER_NONCE, CLIENT_NONCE, "node-1"),
        compute_auth(KEY, CLIENT_NONCE, CLIENT_NONCE, "node-1"),
        compute_auth(KEY, SERVER_NONCE, SERVER_NONCE, "node-1"),
        compute_auth(KEY, SERVER_NONCE, CLIENT_NONCE, "node-2"),
    ]
    assert auth not in changed
    assert len(set(changed)) == len(changed)


def test_build_hello_announces_the_config() -> None:
    config = Config(interval=0.5, timeout=1.5, max_frame=4096, instance_id="srv", secret=b"k")
    hello = build_hello(Role.SERVER, config, SERVER_NONCE, HealthStatus.DEGRADED)
    assert hello == Hello(
        Role.SERVER, HealthStatus.DEGRADED, 500, 1500, 4096, SERVER_NONCE, "srv", b""
    )  # a server never signs, and never announces its secret


def test_build_hello_signs_a_clients_hello_with_the_server_nonce() -> None:
    hello = build_hello(
        Role.CLIENT, VECTOR_CLIENT_CONFIG, CLIENT_NONCE, HealthStatus.SERVING, SERVER_NONCE
    )
    assert encode_hello(hello) == CLIENT_HELLO
    unsigned = build_hello(
        Role.CLIENT, Config(instance_id="node-1"), CLIENT_NONCE, HealthStatus.SERVING
    )
    assert unsigned.auth == b""


def test_check_peer_hello_accepts_a_good_hello() -> None:
    check_peer_hello(Role.CLIENT, Config(), CLIENT_NONCE, PEER_SERVER)  # raises if refused
    check_peer_hello(Role.CLIENT, Config(accept_interval=(1.0, 1.0)), CLIENT_NONCE, PEER_SERVER)


@pytest.mark.parametrize(
    ("role", "config", "hello", "code", "message"),
    [
        (Role.SERVER, Config(), PEER_SERVER, 1002, "peer HELLO has role SERVER, expected CLIENT"),
        (
            Role.CLIENT,
            Config(accept_interval=(2.0, 3.0)),
            PEER_SERVER,
            1008,
            "peer interval 1000 ms is outside 2000..3000 ms",
        ),
        (
            Role.CLIENT,
            Config(accept_timeout=(0.5, 2.999)),
            PEER_SERVER,
            1008,
            "peer timeout 3000 ms is outside 500..2999 ms",
        ),
        (
            Role.SERVER,
            Config(secret=KEY),
            decode_hello(CLIENT_HELLO[HEADER_SIZE:]),
            1008,
            "client authentication failed",  # signed for another server nonce
        ),
        (
            Role.SERVER,
            Config(secret=KEY),
            replace(decode_hello(CLIENT_HELLO[HEADER_SIZE:]), auth=b""),
            1008,
            "client authentication failed",
        ),
    ],
    ids=["role", "interval", "timeout", "wrong-nonce", "unsigned"],
)
def test_check_peer_hello_refuses_with_the_code_thb1_names(
    role: Role, config: Config, hello: Hello, code: int, message: str
) -> None:
    """The code, and the message word for word: it is the CLOSE reason the peer reads."""
    with pytest.raises(RemoteProtocolError) as raised:
        check_peer_hello(role, config, bytes(range(1, 17)), hello)
    assert raised.value.code == code
    assert str(raised.value) == message


def test_check_peer_hello_verifies_auth_against_our_own_nonce() -> None:
    client = decode_hello(CLIENT_HELLO[HEADER_SIZE:])
    check_peer_hello(Role.SERVER, Config(secret=KEY), SERVER_NONCE, client)  # no error
    # A client checks no auth at all: the server does not sign.
    check_peer_hello(Role.CLIENT, Config(secret=KEY), CLIENT_NONCE, PEER_SERVER)


@pytest.mark.parametrize(
    ("role", "ours", "peer_interval_ms", "peer_timeout_ms", "expected"),
    [
        # send interval: min(own interval, peer timeout / 2); a client leads by CLIENT_LEAD.
        (Role.SERVER, Config(interval=1.0, timeout=3.0), 1000, 3000, (1.0, 1.0, 1.0)),
        (Role.CLIENT, Config(interval=1.0, timeout=3.0), 1000, 3000, (1.0, 1.0 * CLIENT_LEAD, 1.0)),
        (Role.SERVER, Config(interval=1.0, timeout=3.0), 2000, 1000, (0.5, 0.5, 1.5)),
        (
            Role.CLIENT,
            Config(interval=0.25, timeout=1.0),
            2000,
            6000,
            (0.25, 0.25 * CLIENT_LEAD, 0.5),
        ),
    ],
)
def test_agree_on_the_send_rule_and_the_peers_spacing(
    role: Role,
    ours: Config,
    peer_interval_ms: int,
    peer_timeout_ms: int,
    expected: tuple[float, float, float],
) -> None:
    peer_role = Role.CLIENT if role is Role.SERVER else Role.SERVER
    peer = Hello(
        peer_role, HealthStatus.SERVING, peer_interval_ms, peer_timeout_ms, 1024, bytes(16)
    )
    timing = agree(role, ours, peer)
    assert timing == Timing(*expected)
    assert (timing.send_interval, timing.ping_after, timing.peer_send_interval) == expected


def test_the_client_leads_by_a_tenth() -> None:
    assert CLIENT_LEAD == 0.9


def test_doctests() -> None:
    results = doctest.testmod(_handshake)
    assert results.attempted >= 2
    assert results.failed == 0


# -- the floors: what a peer may ask of us by default (#10) ------------------------------


@pytest.mark.parametrize(
    ("interval_ms", "timeout_ms", "refused"),
    [
        (100, 300, None),  # at both floors: accepted
        (99, 3000, "peer interval 99 ms is outside 100..3600000 ms"),
        (5, 3000, "peer interval 5 ms is outside 100..3600000 ms"),  # 200 PINGs a second to answer
        (1000, 299, "peer timeout 299 ms is outside 300..3600000 ms"),
        (
            1000,
            10,
            "peer timeout 10 ms is outside 300..3600000 ms",
        ),  # we would PING 200 times a second
        (3_600_000, 3_600_000, None),
        (3_600_001, 3_600_001, "peer interval 3600001 ms is outside 100..3600000 ms"),
    ],
    ids=[
        "floors",
        "interval-99",
        "interval-5",
        "timeout-299",
        "timeout-10",
        "an-hour",
        "past-an-hour",
    ],
)
def test_by_default_a_peer_cannot_make_us_ping_or_answer_often(
    interval_ms: int, timeout_ms: int, refused: str | None
) -> None:
    """A peer that asks for intervals below the floors is refused with 1008, not served."""
    hello = replace(PEER_SERVER, role=Role.CLIENT, interval_ms=interval_ms, timeout_ms=timeout_ms)
    if refused is None:
        check_peer_hello(Role.SERVER, Config(), bytes(16), hello)
        return
    with pytest.raises(RemoteProtocolError, match=refused) as raised:
        check_peer_hello(Role.SERVER, Config(), bytes(16), hello)
    assert raised.value.code == 1008


def test_a_side_never_refuses_values_as_short_as_its_own() -> None:
    """Two sides configured alike always agree, even below the default floors."""
    fast = Config(interval=0.02, timeout=0.05)
    assert fast.accepted_intervals == (0.02, 3600.0)
    assert fast.accepted_timeouts == (0.05, 3600.0)
    hello = replace(PEER_SERVER, interval_ms=20, timeout_ms=50)
    check_peer_hello(Role.CLIENT, fast, bytes(16), hello)
    with pytest.raises(RemoteProtocolError, match="peer interval 19 ms"):
        check_peer_hello(Role.CLIENT, fast, bytes(16), replace(hello, interval_ms=19))


def test_explicit_ranges_replace_the_default_floors() -> None:
    config = Config(accept_interval=(0.005, 10.0), accept_timeout=(0.01, 10.0))
    assert (config.accepted_intervals, config.accepted_timeouts) == ((0.005, 10.0), (0.01, 10.0))
    check_peer_hello(
        Role.CLIENT, config, bytes(16), replace(PEER_SERVER, interval_ms=5, timeout_ms=10)
    )
