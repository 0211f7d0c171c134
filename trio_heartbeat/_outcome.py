"""How a connection ended, and which exception says so: the ending vocabulary of the runtime.

A connection records how it ended once, as an :class:`Outcome`, and raises a
fresh exception from it each time someone asks (``receive()``, the block's
exit, ``wait_closed()``). The functions here turn each cause into its
outcome; none of them has side effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, final

from ._errors import (
    BrokenConnection,
    ConnectionClosed,
    ConnectionRejected,
    HeartbeatTimeout,
    RemoteProtocolError,
    describe_os_error,
)
from ._events import ConnectionEnded
from ._frames import CloseCode
from ._transport import stream_error

__all__ = [
    "OVER_BUDGET",
    "WRITE_TIMEOUT",
    "Outcome",
    "from_ending",
    "left_early",
    "protocol_error",
    "transport_failed",
]


@final
@dataclass(frozen=True, slots=True)
class Outcome:
    """How the connection ended, kept as data so that each raise gets a fresh exception.

    ``failure`` says whether the ending cancels the connection's scope (and so
    the caller's block) and is raised when the block is left.
    """

    kind: type[ConnectionClosed]
    code: int
    reason: str
    by_peer: bool
    failure: bool
    cause: BaseException | None = None

    def exception(self) -> ConnectionClosed:
        """A fresh exception that says how the connection ended, with the cause chained."""
        exc = self.kind(self.code, self.reason, by_peer=self.by_peer)
        exc.__cause__ = self.cause
        return exc


#: The peer stopped reading: a write made no progress for the write timeout.
WRITE_TIMEOUT: Final = Outcome(
    HeartbeatTimeout,
    CloseCode.HEARTBEAT_TIMEOUT,
    "write timeout: the peer stopped reading",
    by_peer=False,
    failure=True,
)


#: Cut off for holding the most bytes when a shared buffer budget ran out.
OVER_BUDGET: Final = Outcome(
    ConnectionClosed,
    CloseCode.TRY_AGAIN_LATER,
    "buffer budget exceeded",
    by_peer=False,
    failure=True,
)


def from_ending(event: ConnectionEnded, *, closed: bool, refused: bool) -> Outcome:
    """The outcome of the core's :class:`ConnectionEnded`.

    ``closed`` is true when CLOSE frames ended it (the core is CLOSED): an
    orderly end, unless ``refused`` (the peer's CLOSE refused us during or
    right after the handshake), which is a failure. Otherwise a 1011 is a
    heartbeat timeout and anything else a broken connection.
    """
    if closed:
        kind = ConnectionRejected if refused else ConnectionClosed
        return Outcome(kind, event.code, event.reason, event.by_peer, failure=refused)
    if event.code == CloseCode.HEARTBEAT_TIMEOUT:
        return Outcome(HeartbeatTimeout, event.code, event.reason, False, True)
    return Outcome(BrokenConnection, event.code, event.reason, event.by_peer, True)


def protocol_error(exc: RemoteProtocolError) -> Outcome:
    """The peer broke the protocol: a failure, with the error as the cause."""
    return Outcome(ConnectionClosed, exc.code, str(exc), False, True, exc)


def transport_failed(exc: BaseException, *, by_peer: bool) -> Outcome:
    """The stream failed under us: a broken connection (1006), with the stream's error as cause.

    A stream of the caller's own that lets an :class:`OSError` out is reported
    as Trio's streams would report it, so every transport reads alike. The
    error and the errors behind it are kept without their tracebacks: those
    lead through our finished frames (and their callers') to the connection,
    which would live on with its buffers until a full garbage collection.
    """
    if isinstance(exc, OSError):
        exc = stream_error(exc)
    _drop_tracebacks(exc)
    return Outcome(
        BrokenConnection,
        CloseCode.ABNORMAL_CLOSURE,
        f"connection lost: {describe_os_error(exc)}",
        by_peer,
        True,
        exc,
    )


def _drop_tracebacks(exc: BaseException) -> None:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and not any(current is done for done in seen):
        seen.append(current)
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


def left_early(code: int | None, reason: str, by_peer: bool) -> Outcome:
    """The block was left while the connection was live: an ending, not a failure."""
    if code is None:
        code = CloseCode.ABNORMAL_CLOSURE
    return Outcome(ConnectionClosed, code, reason, by_peer, False)
