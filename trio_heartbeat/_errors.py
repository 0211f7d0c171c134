"""The exception vocabulary of trio-heartbeat.

Two families, kept apart on purpose:

* :class:`ProtocolError` and its subclasses come from the sans-IO core. A
  :class:`RemoteProtocolError` means the peer broke THB/1; it carries the CLOSE
  code that the core has already queued for the peer. A :class:`LocalProtocolError`
  means our own caller asked for something the protocol forbids (sending DATA
  before the handshake, say); nothing is sent and the connection is unchanged.
* :class:`ConnectionClosed` and its subclasses come from the Trio runtime and
  describe how a connection ended, again with the close code and reason. Transport
  failures from the operating system are translated into them at the I/O edge,
  with the original exception chained as ``__cause__``.

Every exception here survives :mod:`pickle` and :func:`copy.copy` with its
attributes and notes (``__cause__`` and the traceback are not pickled, as for
any Python exception), so they can cross process boundaries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from ._breaker import BreakerState
    from ._restart import ExitKind

#: The close code of an ending without any CLOSE frame (CloseCode.ABNORMAL_CLOSURE).
_NO_CLOSE = 1006

__all__ = [
    "BrokenConnection",
    "CircuitOpen",
    "ConnectionClosed",
    "ConnectionRejected",
    "Conviction",
    "HeartbeatError",
    "HeartbeatTimeout",
    "LocalProtocolError",
    "NoEndpointLeft",
    "ProtocolError",
    "ReconnectFailed",
    "RemoteProtocolError",
    "StoreUnavailable",
    "SupervisorGaveUp",
    "UndeliveredMessages",
    "UnknownEndpoint",
    "UsageError",
    "WatchCompacted",
    "describe_os_error",
]


class HeartbeatError(Exception):
    """Base class of every exception that trio-heartbeat raises on purpose."""


class ProtocolError(HeartbeatError):
    """A THB/1 rule was broken.

    ``code`` is the CLOSE code that fits the violation (THB/1 §5.5), for
    example 1002 for a malformed frame or 1009 for a frame over the limit.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        # ``args`` holds only the message, so the default would call
        # ``cls(message)`` and fail; the instance dict carries ``code`` and
        # anything added later, such as ``__notes__``.
        return (type(self), (str(self), self.code), self.__dict__)


@final
class LocalProtocolError(ProtocolError):
    """Our side tried to do something THB/1 does not allow (a usage error)."""


@final
class RemoteProtocolError(ProtocolError):
    """The peer sent something THB/1 does not allow.

    By the time this is raised the sans-IO core is in its sticky ``ERROR``
    state and has queued a CLOSE frame with :attr:`code` for the peer.
    """


class ConnectionClosed(HeartbeatError):
    """The connection has ended; ``code`` and ``reason`` say how.

    ``code`` is a close code of THB/1 §5.5, or 1006 when the
    connection ended without any CLOSE frame (the transport was lost).
    ``by_peer`` is true when the peer sent the first CLOSE.
    """

    def __init__(self, code: int, reason: str = "", *, by_peer: bool = False) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.by_peer = by_peer

    def __str__(self) -> str:
        # One short line for a person: 'closed with 1011: heartbeat timeout',
        # 'closed with 1001 by the peer: server draining'; an ending without a
        # CLOSE (1006) is its reason alone ('connection lost: connection reset').
        if self.code == _NO_CLOSE:
            return self.reason or "connection lost"
        who = " by the peer" if self.by_peer else ""
        reason = f": {self.reason}" if self.reason else ""
        return f"closed with {self.code}{who}{reason}"

    def __reduce__(self) -> tuple[object, ...]:
        # ``by_peer`` is keyword-only, so it cannot travel in ``args``.
        return (
            _rebuild_closed,
            (type(self), self.code, self.reason, self.by_peer),
            self.__dict__,
        )


def _rebuild_closed(
    cls: type[ConnectionClosed], code: int, reason: str, by_peer: bool
) -> ConnectionClosed:
    return cls(code, reason, by_peer=by_peer)


class Conviction(Enum):
    """Which way a verdict on a silent peer went: see :attr:`HeartbeatTimeout.conviction`."""

    #: The peer went silent while we were listening.
    PEER_SILENT = "peer silent"
    #: Our own event loop was stalled when the verdict came: the fault may be ours.
    LOCAL_STALL = "we were stalled"


@final
class HeartbeatTimeout(ConnectionClosed):
    """The peer was silent for longer than the failure detector allows (1011).

    Also raised when the handshake does not finish within its timeout, and when
    a write makes no progress for the write timeout (a peer that stopped reading).
    :attr:`conviction` tells a verdict on a silent peer from the others.
    """

    @property
    def conviction(self) -> Conviction | None:
        """For a verdict on a silent peer, whether the peer went silent or we were stalled.

        ``None`` for a handshake or write timeout. Read from the reason, which
        says the same to the log, the listeners and the peer:
        ``heartbeat timeout: peer silent`` or ``heartbeat timeout: we were stalled``.
        """
        for conviction in Conviction:
            if self.reason == f"heartbeat timeout: {conviction.value}":
                return conviction
        return None


@final
class BrokenConnection(ConnectionClosed):
    """The transport failed under us: reset, EOF without CLOSE, or an OS error.

    The underlying exception, if there was one, is chained as ``__cause__``.
    """


@final
class ConnectionRejected(ConnectionClosed):
    """The server refused the connection during the handshake.

    Typical codes: 1013 (at capacity, retry later) and 1008 (authentication
    failed or HELLO values refused).
    """


@final
class ReconnectFailed(HeartbeatError):
    """The reconnecting client stopped reconnecting.

    Either a connection ended with a close code it does not retry (1008 or
    4000 by default), the backoff policy ran out of delays, or the endpoint
    source had no endpoint left to try. ``last_error`` is the
    :class:`ConnectionClosed` of the last connection or attempt (``None`` if
    there was none), and ``attempts`` counts the attempts since the last
    connection that stayed up ``healthy_after`` seconds (the events number
    them over the client's life). When the caller closed the client,
    ``attempts`` is the total over its life. ``undelivered`` holds the
    messages ``send()`` had accepted when the client gave up, oldest first,
    to retry or keep (a note says how many): nothing is dropped in silence.
    """

    def __init__(self, message: str, last_error: ConnectionClosed | None, attempts: int) -> None:
        super().__init__(message)
        self.last_error = last_error
        self.attempts = attempts
        self.undelivered: list[bytes] = []

    def __reduce__(self) -> tuple[object, ...]:
        # ``args`` holds only the message; the default would call ``cls(message)``.
        return (type(self), (str(self), self.last_error, self.attempts), self.__dict__)


@final
class UndeliveredMessages(HeartbeatError):
    """Messages that ``send()`` accepted could not be delivered before the close.

    Raised when a reconnecting client is closed (its ``async with`` block left,
    or ``aclose()``) with messages it never handed to a connection, or that a
    connection was given and never wrote. ``messages`` are those messages,
    oldest first, to retry or keep; ``reason`` says why (how the last
    connection or attempt ended).
    """

    def __init__(self, messages: Sequence[bytes], reason: str) -> None:
        count = len(messages)
        noun = "message" if count == 1 else "messages"
        super().__init__(f"{count} {noun} accepted by send() not delivered: {reason}")
        self.messages = list(messages)
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        # ``args`` holds only the message; the default would call ``cls(message)``.
        return (type(self), (self.messages, self.reason), self.__dict__)


@final
class CircuitOpen(HeartbeatError):
    """A :class:`Breaker` refused the call: no request was made.

    ``state`` is the breaker's state at the refusal; ``retry_after`` is how many
    seconds until it will admit trial calls, when that is known (``OPEN``), and
    ``None`` otherwise (forced open until liveness returns, or ``HALF_OPEN``
    with every trial slot taken).
    """

    def __init__(self, state: BreakerState, retry_after: float | None = None) -> None:
        wait = "" if retry_after is None else f", retry after {retry_after:.3f} s"
        super().__init__(f"circuit breaker is {state.value}{wait}")
        self.state = state
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        # ``args`` holds only the message; rebuild from the fields and keep
        # anything else in the instance dict (``__notes__`` among them).
        return (type(self), (self.state, self.retry_after), self.__dict__)


@final
class UnknownEndpoint(HeartbeatError, KeyError):
    """The endpoint is not one of an :class:`OutlierEjection`'s."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.endpoint = endpoint

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return f"not an endpoint of this outlier ejection: {self.endpoint}"


@final
class SupervisorGaveUp(HeartbeatError):
    """A service supervisor's restart budget ran out: it stopped its children and ended.

    ``child`` is the child whose exit would have exceeded the budget, ``kind``
    how it ended and ``error`` its exception (``None`` for a NORMAL or HUNG
    end without one), also chained as ``__cause__``.
    """

    def __init__(self, message: str, child: str, kind: ExitKind, error: BaseException | None):
        super().__init__(message)
        self.child = child
        self.kind = kind
        self.error = error

    def __reduce__(self) -> tuple[object, ...]:
        # ``args`` holds only the message; the default would call ``cls(message)``.
        return (type(self), (str(self), self.child, self.kind, self.error), self.__dict__)


@final
class WatchCompacted(HeartbeatError):
    """A watch fell behind the store's history: read the range again and watch from there."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"changes after revision {revision} are no longer kept")
        self.revision = revision

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.revision,), self.__dict__)


@final
class StoreUnavailable(HeartbeatError):
    """The registry's store (etcd) could not be reached or did not answer in time.

    The registry retries with backoff; ``endpoint`` is the store it last tried.
    """

    def __init__(self, message: str, endpoint: str = "") -> None:
        super().__init__(message)
        self.endpoint = endpoint

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0], self.endpoint), self.__dict__)


@final
class NoEndpointLeft(HeartbeatError):
    """An endpoint source has nothing (more) to try; the reconnecting client gives up on it."""


@final
class UsageError(HeartbeatError):
    """A command-line value that cannot be used; ``python -m trio_heartbeat`` prints it and exits 2."""


def describe_os_error(exc: BaseException) -> str:
    """What went wrong, in the operating system's words: ``"connection refused"``.

    An error that wraps others (Trio's "all attempts to connect ... failed",
    a stream error raised from an OS error) is described by the first OS error
    inside it; anything else by its own message.
    """
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if isinstance(current, OSError) and (current.errno is not None or current.strerror):
            # The system's own words for the errno: Trio's connect errors put
            # a repr of the address in strerror.
            words = os.strerror(current.errno) if current.errno is not None else current.strerror
            assert words  # for mypy: one of the two is there
            return words[:1].lower() + words[1:]
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    return str(exc) or type(exc).__name__
