"""The exception vocabulary (``_errors.py``): every error class of the package.

Every exception must survive pickle and copy with its attributes, its type and
its notes: several of them keep their values outside ``args``, which the
default reduction would lose or fail to rebuild from. The public ones are
checked against ``trio_heartbeat``'s names, the two the package keeps to
itself (:class:`NoEndpointLeft`, :class:`UsageError`) beside them, and
together they cover every class ``_errors`` defines.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest

import trio_heartbeat
from trio_heartbeat import (
    BreakerState,
    BrokenConnection,
    CircuitOpen,
    CloseCode,
    ConnectionClosed,
    ConnectionRejected,
    ExitKind,
    HeartbeatError,
    HeartbeatTimeout,
    LocalProtocolError,
    ProtocolError,
    ReconnectFailed,
    RemoteProtocolError,
    StoreUnavailable,
    SupervisorGaveUp,
    UndeliveredMessages,
    UnknownEndpoint,
    WatchCompacted,
    _errors,
)
from trio_heartbeat._errors import (
    Conviction,
    NoEndpointLeft,
    UsageError,
    describe_os_error,
)

#: One or more instances of each public exception, with every attribute set.
EXAMPLES: list[HeartbeatError] = [
    HeartbeatError("something went wrong"),
    ProtocolError("a rule was broken", CloseCode.PROTOCOL_ERROR),
    LocalProtocolError("DATA of 2048 bytes exceeds the peer's limit", CloseCode.TOO_BIG),
    RemoteProtocolError("unknown frame type 0x09", 1002),
    ConnectionClosed(4001, "application says bye", by_peer=True),
    ConnectionClosed(CloseCode.NORMAL),
    HeartbeatTimeout(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout: peer silent"),
    BrokenConnection(CloseCode.ABNORMAL_CLOSURE, "connection reset"),
    ConnectionRejected(CloseCode.TRY_AGAIN_LATER, "at capacity", by_peer=True),
    ReconnectFailed(
        "gave up after 3 attempt(s): the backoff policy ran out",
        ConnectionRejected(CloseCode.TRY_AGAIN_LATER, "at capacity", by_peer=True),
        3,
    ),
    ReconnectFailed("the reconnecting client is closed", None, 0),
    UndeliveredMessages([b"a", b"b"], "connection refused"),
    CircuitOpen(BreakerState.OPEN, 4.5),
    CircuitOpen(BreakerState.FORCED_OPEN),
    UnknownEndpoint("db-7:5432"),
    SupervisorGaveUp("child db failed", "db", ExitKind.FAILED, KeyError("lost")),
    SupervisorGaveUp("child worker hung", "worker", ExitKind.HUNG, None),
    WatchCompacted(7),
    StoreUnavailable("etcd did not answer within 2.0 s", "127.0.0.1:2379"),
    StoreUnavailable("no store answered"),
]

#: The exceptions the package keeps to itself: not exported, still picklable.
INTERNAL_EXAMPLES: list[HeartbeatError] = [
    NoEndpointLeft("the endpoint source ran dry"),
    UsageError("--timeout must be longer than --interval"),
]


def pickler(protocol: int) -> Callable[[HeartbeatError], Any]:
    def round_trip(exc: HeartbeatError) -> Any:
        return pickle.loads(pickle.dumps(exc, protocol))

    return round_trip


COPIERS: dict[str, Callable[[HeartbeatError], Any]] = {
    **{f"pickle-{protocol}": pickler(protocol) for protocol in range(pickle.HIGHEST_PROTOCOL + 1)},
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
}


def described(exc: BaseException) -> dict[str, Any]:
    """Everything about an exception that a copy must keep, nested exceptions included."""
    return {
        "type": type(exc),
        "args": exc.args,
        "str": str(exc),
        "attributes": {
            name: described(value) if isinstance(value, BaseException) else value
            for name, value in vars(exc).items()
        },
    }


def test_the_examples_cover_every_public_exception() -> None:
    public = {
        value
        for name, value in vars(trio_heartbeat).items()
        if not name.startswith("_") and isinstance(value, type) and issubclass(value, BaseException)
    }
    assert {type(exc) for exc in EXAMPLES} == public


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS.keys())
@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda exc: type(exc).__name__)
def test_round_trip_keeps_type_and_attributes(
    exc: HeartbeatError, copier: Callable[[HeartbeatError], Any]
) -> None:
    copied = copier(exc)
    assert copied is not exc
    assert described(copied) == described(exc)


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS.keys())
@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda exc: type(exc).__name__)
def test_round_trip_keeps_notes_and_added_attributes(
    exc: HeartbeatError, copier: Callable[[HeartbeatError], Any]
) -> None:
    exc = copy.copy(exc)  # EXAMPLES are shared between tests: note a copy
    exc.add_note("while talking to server:9000")
    exc.endpoint = "server:9000"  # type: ignore[attr-defined]
    copied = copier(exc)
    assert copied.__notes__ == ["while talking to server:9000"]
    assert copied.endpoint == "server:9000"
    assert described(copied) == described(exc)


def test_the_attributes_themselves_come_back() -> None:
    """The same facts as the generic comparison, spelled out for the important fields."""
    closed = pickle.loads(pickle.dumps(ConnectionRejected(1013, "at capacity", by_peer=True)))
    assert type(closed) is ConnectionRejected
    assert (closed.code, closed.reason, closed.by_peer) == (1013, "at capacity", True)
    assert str(closed) == "closed with 1013 by the peer: at capacity"

    protocol = pickle.loads(pickle.dumps(RemoteProtocolError("bad header", CloseCode.TOO_BIG)))
    assert type(protocol) is RemoteProtocolError
    assert protocol.code is CloseCode.TOO_BIG
    assert str(protocol) == "bad header"

    failed = pickle.loads(pickle.dumps(ReconnectFailed("gave up", HeartbeatTimeout(1011), 4)))
    assert type(failed) is ReconnectFailed
    assert str(failed) == "gave up"
    assert failed.attempts == 4
    assert type(failed.last_error) is HeartbeatTimeout
    assert failed.last_error.code == 1011
    assert not failed.last_error.by_peer


def test_the_reconnect_errors_carry_what_was_not_delivered() -> None:
    """A fresh ReconnectFailed holds an empty list (the client fills it when it gives up);
    UndeliveredMessages holds its messages and reason, and counts them in its line."""
    failed = ReconnectFailed("the reconnecting client is closed", None, 0)
    assert failed.undelivered == []
    failed.undelivered.append(b"late")  # a list of its own, not shared with others
    assert ReconnectFailed("again", None, 0).undelivered == []

    one = UndeliveredMessages((b"a",), "connection refused")
    assert (one.messages, one.reason) == ([b"a"], "connection refused")
    assert str(one) == "1 message accepted by send() not delivered: connection refused"
    two = UndeliveredMessages([b"a", b"b"], "closed with 1001 by the peer")
    assert (two.messages, two.reason) == ([b"a", b"b"], "closed with 1001 by the peer")
    assert str(two) == "2 messages accepted by send() not delivered: closed with 1001 by the peer"
    assert str(UndeliveredMessages([], "x")) == "0 messages accepted by send() not delivered: x"


# -- the exceptions the package keeps to itself ------------------------------------------


def test_the_examples_cover_every_class_errors_defines() -> None:
    defined = {getattr(_errors, name) for name in _errors.__all__} - {describe_os_error, Conviction}
    assert {type(exc) for exc in EXAMPLES + INTERNAL_EXAMPLES} == defined
    exported = [value for name, value in vars(trio_heartbeat).items() if not name.startswith("_")]
    assert not [exc for exc in INTERNAL_EXAMPLES if type(exc) in exported]


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS.keys())
@pytest.mark.parametrize("exc", INTERNAL_EXAMPLES, ids=lambda exc: type(exc).__name__)
def test_internal_exceptions_round_trip_with_notes(
    exc: HeartbeatError, copier: Callable[[HeartbeatError], Any]
) -> None:
    exc = copy.copy(exc)
    exc.__notes__ = ["while reading the command line"]
    copied = copier(exc)
    assert copied is not exc
    assert described(copied) == described(exc)
    assert copied.__notes__ == ["while reading the command line"]
    assert isinstance(copied, HeartbeatError)


def test_the_two_families_stay_apart() -> None:
    """Protocol errors and endings share only the base class."""
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(HeartbeatTimeout, ConnectionClosed)
    assert not issubclass(ProtocolError, ConnectionClosed)
    assert not issubclass(ConnectionClosed, ProtocolError)
    for exc in EXAMPLES + INTERNAL_EXAMPLES:
        assert isinstance(exc, HeartbeatError)
    assert str(ConnectionClosed(1000)) == "closed with 1000"


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (
            HeartbeatTimeout(1011, "heartbeat timeout: peer silent"),
            "closed with 1011: heartbeat timeout: peer silent",
        ),
        (
            ConnectionClosed(1001, "server draining", by_peer=True),
            "closed with 1001 by the peer: server draining",
        ),
        (ConnectionRejected(1008, by_peer=True), "closed with 1008 by the peer"),
        (
            BrokenConnection(1006, "connection lost: connection reset"),
            "connection lost: connection reset",
        ),
        (BrokenConnection(1006), "connection lost"),
    ],
    ids=["timeout", "by-peer", "no-reason", "abnormal", "abnormal-bare"],
)
def test_an_ending_reads_as_one_short_line(exc: ConnectionClosed, line: str) -> None:
    """No Python reprs, no 'initiated by the local side': what a person needs (#10)."""
    assert str(exc) == line


def test_an_os_error_is_described_in_the_systems_words() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    assert describe_os_error(refused) == "connection refused"
    # Trio's "all attempts failed" wraps the OS errors in a group and a cause.
    wrapped = OSError("all attempts to connect to 127.0.0.1:1 failed")
    wrapped.__cause__ = ExceptionGroup("attempts", [refused])
    assert describe_os_error(wrapped) == "connection refused"
    trio_style = OSError(111, "error connecting to ('127.0.0.1', 1): Connection refused")
    assert describe_os_error(trio_style) == "connection refused"  # no Python repr
    # Either half of an OSError is enough: the errno alone, or the words alone.
    assert describe_os_error(OSError(111, "")) == "connection refused"
    assert describe_os_error(OSError(None, "No route to host")) == "no route to host"
    assert describe_os_error(ValueError("odd")) == "odd"
    assert describe_os_error(ValueError()) == "ValueError"


@pytest.mark.parametrize(
    ("reason", "conviction"),
    [
        ("heartbeat timeout: peer silent", Conviction.PEER_SILENT),
        ("heartbeat timeout: we were stalled", Conviction.LOCAL_STALL),
        ("handshake timeout", None),
        ("write timeout: the peer stopped reading", None),
        ("heartbeat timeout: peer silent, or so", None),
    ],
)
def test_a_heartbeat_timeout_says_which_way_the_verdict_went(
    reason: str, conviction: Conviction | None
) -> None:
    """The verdict's cause is read from the reason, which is what the log and the peer see too."""
    exc = HeartbeatTimeout(1011, reason)
    assert exc.conviction is conviction
    assert pickle.loads(pickle.dumps(exc)).conviction is conviction
