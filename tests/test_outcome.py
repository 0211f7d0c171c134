"""How a connection ended, and which exception says so (``_outcome.py``).

Pure functions, no I/O: :func:`from_ending` maps the core's
:class:`ConnectionEnded` to an outcome (an orderly close, a refusal, a
heartbeat timeout, a broken connection), :func:`protocol_error`,
:func:`transport_failed` and :func:`left_early` cover the runtime's own
causes, and :meth:`Outcome.exception` makes a fresh exception each time, with
the cause chained. How each outcome then surfaces in a connection is in
``test_connection.py``.
"""

from __future__ import annotations

import errno

import pytest
import trio

from trio_heartbeat._errors import (
    BrokenConnection,
    ConnectionClosed,
    ConnectionRejected,
    HeartbeatTimeout,
    RemoteProtocolError,
)
from trio_heartbeat._events import ConnectionEnded
from trio_heartbeat._frames import CloseCode
from trio_heartbeat._outcome import (
    WRITE_TIMEOUT,
    Outcome,
    from_ending,
    left_early,
    protocol_error,
    transport_failed,
)


def facts(outcome: Outcome) -> tuple[type[ConnectionClosed], int, str, bool, bool]:
    return outcome.kind, outcome.code, outcome.reason, outcome.by_peer, outcome.failure


# -- from_ending ------------------------------------------------------------------------


@pytest.mark.parametrize("by_peer", [False, True], ids=["ours", "the-peers"])
def test_a_close_handshake_is_an_orderly_end(by_peer: bool) -> None:
    ending = ConnectionEnded(4001, "app says bye", by_peer=by_peer, clean=True)
    outcome = from_ending(ending, closed=True, refused=False)
    assert facts(outcome) == (ConnectionClosed, 4001, "app says bye", by_peer, False)


@pytest.mark.parametrize("code", [CloseCode.TRY_AGAIN_LATER, CloseCode.POLICY_VIOLATION])
def test_a_refusal_is_a_rejection_and_a_failure(code: int) -> None:
    ending = ConnectionEnded(code, "no", by_peer=True, clean=True)
    outcome = from_ending(ending, closed=True, refused=True)
    assert facts(outcome) == (ConnectionRejected, code, "no", True, True)


def test_a_silent_peer_is_a_heartbeat_timeout_by_us() -> None:
    ending = ConnectionEnded(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", False, False)
    outcome = from_ending(ending, closed=False, refused=False)
    assert facts(outcome) == (
        HeartbeatTimeout,
        CloseCode.HEARTBEAT_TIMEOUT,
        "heartbeat timeout",
        False,
        True,
    )


@pytest.mark.parametrize(
    ("code", "by_peer"),
    [(CloseCode.ABNORMAL_CLOSURE, True), (CloseCode.PROTOCOL_ERROR, False), (4002, False)],
    ids=["eof", "protocol-error", "other"],
)
def test_any_other_ending_without_a_close_handshake_is_a_broken_connection(
    code: int, by_peer: bool
) -> None:
    ending = ConnectionEnded(code, "lost", by_peer=by_peer, clean=False)
    outcome = from_ending(ending, closed=False, refused=False)
    assert facts(outcome) == (BrokenConnection, code, "lost", by_peer, True)


def test_a_close_timeout_is_closed_and_not_a_failure() -> None:
    """The close timeout leaves the core CLOSED, not cleanly: still an orderly end."""
    ending = ConnectionEnded(CloseCode.NORMAL, "bye", by_peer=False, clean=False)
    outcome = from_ending(ending, closed=True, refused=False)
    assert facts(outcome) == (ConnectionClosed, CloseCode.NORMAL, "bye", False, False)


# -- the runtime's own causes ---------------------------------------------------------------


def test_a_protocol_error_keeps_its_code_and_message_and_is_the_cause() -> None:
    error = RemoteProtocolError("unknown frame type 0x09", CloseCode.PROTOCOL_ERROR)
    outcome = protocol_error(error)
    assert facts(outcome) == (
        ConnectionClosed,
        CloseCode.PROTOCOL_ERROR,
        "unknown frame type 0x09",
        False,
        True,
    )
    assert outcome.cause is error
    assert outcome.exception().__cause__ is error


def test_transport_failed_translates_an_os_error_with_the_cause() -> None:
    os_error = ConnectionResetError(errno.ECONNRESET, "reset by peer")
    outcome = transport_failed(os_error, by_peer=True)
    assert facts(outcome)[:2] == (BrokenConnection, CloseCode.ABNORMAL_CLOSURE)
    assert (outcome.by_peer, outcome.failure) == (True, True)
    # Reported as Trio's streams report it, with the OS error behind it.
    cause = outcome.cause
    assert isinstance(cause, trio.BrokenResourceError)
    assert cause.__cause__ is os_error
    assert (
        outcome.reason == "connection lost: connection reset by peer"
    )  # the system's words for the errno


def test_transport_failed_on_a_closed_descriptor_is_a_closed_resource() -> None:
    outcome = transport_failed(OSError(errno.EBADF, "bad file descriptor"), by_peer=False)
    assert isinstance(outcome.cause, trio.ClosedResourceError)
    assert not outcome.by_peer


def test_transport_failed_keeps_a_trio_error_as_it_is() -> None:
    error = trio.BrokenResourceError("reset")
    outcome = transport_failed(error, by_peer=False)
    assert outcome.cause is error
    assert outcome.reason == "connection lost: reset"


def test_leaving_early_is_an_ending_not_a_failure() -> None:
    assert facts(left_early(CloseCode.GOING_AWAY, "cancelled", False)) == (
        ConnectionClosed,
        CloseCode.GOING_AWAY,
        "cancelled",
        False,
        False,
    )
    # No code at all (the core never closed): the transport's 1006.
    assert left_early(None, "", True).code == CloseCode.ABNORMAL_CLOSURE


def test_the_write_timeout_is_a_heartbeat_timeout_by_us() -> None:
    assert facts(WRITE_TIMEOUT) == (
        HeartbeatTimeout,
        CloseCode.HEARTBEAT_TIMEOUT,
        "write timeout: the peer stopped reading",
        False,
        True,
    )


# -- the exception an outcome raises ---------------------------------------------------------


def test_each_exception_is_fresh_and_says_the_same() -> None:
    cause = trio.BrokenResourceError("gone")
    outcome = Outcome(BrokenConnection, 1006, "lost", True, True, cause)
    first, second = outcome.exception(), outcome.exception()
    assert first is not second
    for exc in (first, second):
        assert type(exc) is BrokenConnection
        assert (exc.code, exc.reason, exc.by_peer) == (1006, "lost", True)
        assert exc.__cause__ is cause


def test_an_outcome_is_a_frozen_value() -> None:
    outcome = left_early(1000, "", False)
    assert outcome == left_early(1000, "", False)
    with pytest.raises(AttributeError):
        outcome.code = 1001  # type: ignore[misc]


def traceback_of(exc: BaseException) -> object:
    """``exc.__traceback__``, read afresh (mypy would narrow it from an earlier assert)."""
    return exc.__traceback__


def test_a_transport_error_is_kept_without_tracebacks() -> None:
    """Their frames lead to the connection, which would outlive its end (#10)."""
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        except OSError as os_error:
            raise trio.BrokenResourceError("socket connection broken") from os_error
    except trio.BrokenResourceError as raised:
        error = raised
    assert error.__traceback__ is not None
    assert error.__cause__ is not None
    cause = error.__cause__
    outcome = transport_failed(error, by_peer=True)
    assert outcome.cause is error
    assert [traceback_of(error), traceback_of(cause)] == [None, None]
    assert outcome.reason == "connection lost: connection reset by peer"


def test_every_error_behind_a_translated_os_error_loses_its_traceback() -> None:
    """An OSError from a stream of the caller's own is translated: the
    translation has the OSError as its cause and no context of its own. The
    walk goes on through the cause, then through the OSError's context (the
    error it was raised while handling), and clears each traceback."""
    try:
        try:
            raise ValueError("being handled")
        except ValueError:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")  # noqa: B904 - on purpose
    except OSError as raised:
        os_error = raised
    handled = os_error.__context__
    assert isinstance(handled, ValueError)
    assert traceback_of(os_error) is not None
    assert traceback_of(handled) is not None
    outcome = transport_failed(os_error, by_peer=True)
    assert isinstance(outcome.cause, trio.BrokenResourceError)
    assert outcome.cause.__cause__ is os_error
    assert outcome.cause.__context__ is None
    assert [traceback_of(os_error), traceback_of(handled)] == [None, None]


def test_dropping_tracebacks_ends_on_errors_chained_in_a_circle() -> None:
    """Errors whose chain leads back to the first (made by hand here) are each
    cleared once, and the walk ends: ``_drop_tracebacks`` guards against
    cycles. A walk that lost track of what it had seen would go round for
    ever (pytest-timeout would stop it)."""
    errors: list[BaseException] = []
    for error in (trio.BrokenResourceError("outer"), ValueError("inner")):
        try:
            raise error
        except (trio.BrokenResourceError, ValueError) as raised:
            errors.append(raised)
    outer, inner = errors
    outer.__cause__ = inner
    inner.__context__ = outer
    assert None not in (traceback_of(outer), traceback_of(inner))
    outcome = transport_failed(outer, by_peer=False)
    assert outcome.cause is outer
    assert [traceback_of(outer), traceback_of(inner)] == [None, None]
