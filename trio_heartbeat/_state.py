"""Where a THB/1 connection stands, and every way it can move: one table.

The core changes state only through :func:`transition`, which looks the pair
``(state, trigger)`` up in :data:`TRANSITIONS`; the docs draw their state
diagram from the same table, so the two cannot disagree.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

__all__ = ["TERMINAL", "TRANSITIONS", "State", "Trigger", "transition"]


class State(Enum):
    """Where a connection stands. ``CLOSED`` and ``ERROR`` are terminal and sticky."""

    #: HELLOs not yet both sent and received; only HELLO and CLOSE are valid.
    HANDSHAKE = "HANDSHAKE"
    #: Handshake done: DATA flows, heartbeats run.
    OPEN = "OPEN"
    #: We sent CLOSE and wait for the peer's, still delivering DATA in flight.
    CLOSING = "CLOSING"
    #: Closed by a CLOSE frame (either side's); the stream can be closed.
    CLOSED = "CLOSED"
    #: Given up without a close handshake: protocol error, timeout or lost
    #: transport. The stream should be aborted.
    ERROR = "ERROR"


class Trigger(Enum):
    """What can move a connection from one :class:`State` to another."""

    #: Both HELLOs have now been sent and received.
    HANDSHAKE_DONE = "handshake done"
    #: Our side sent CLOSE first.
    LOCAL_CLOSE = "local close"
    #: The peer's CLOSE arrived (we answer it if we had not sent ours).
    REMOTE_CLOSE = "remote close"
    #: The close timeout expired while waiting for the peer's CLOSE.
    CLOSE_TIMEOUT = "close timeout"
    #: The transport reported end-of-file.
    EOF = "eof"
    #: Silence beyond the failure detector's deadline, or the handshake timeout.
    TIMEOUT = "timeout"
    #: The peer broke the protocol.
    PROTOCOL_ERROR = "protocol error"


_S = State
_T = Trigger

#: Every legal state change. The core never fires a trigger that a state does
#: not list here: :func:`transition` raises ``KeyError`` for one.
TRANSITIONS: Final[dict[tuple[State, Trigger], State]] = {
    (_S.HANDSHAKE, _T.HANDSHAKE_DONE): _S.OPEN,
    (_S.HANDSHAKE, _T.LOCAL_CLOSE): _S.CLOSING,
    (_S.HANDSHAKE, _T.REMOTE_CLOSE): _S.CLOSED,
    (_S.HANDSHAKE, _T.EOF): _S.ERROR,
    (_S.HANDSHAKE, _T.TIMEOUT): _S.ERROR,
    (_S.HANDSHAKE, _T.PROTOCOL_ERROR): _S.ERROR,
    (_S.OPEN, _T.LOCAL_CLOSE): _S.CLOSING,
    (_S.OPEN, _T.REMOTE_CLOSE): _S.CLOSED,
    (_S.OPEN, _T.EOF): _S.ERROR,
    (_S.OPEN, _T.TIMEOUT): _S.ERROR,
    (_S.OPEN, _T.PROTOCOL_ERROR): _S.ERROR,
    (_S.CLOSING, _T.REMOTE_CLOSE): _S.CLOSED,
    (_S.CLOSING, _T.CLOSE_TIMEOUT): _S.CLOSED,
    (_S.CLOSING, _T.EOF): _S.CLOSED,
    (_S.CLOSING, _T.PROTOCOL_ERROR): _S.ERROR,
}

#: The states nothing leaves. A tuple, not a set: membership by identity,
#: without Enum's Python-level ``__hash__``.
TERMINAL: Final = (State.CLOSED, State.ERROR)


def transition(state: State, trigger: Trigger) -> State:
    """The state ``trigger`` moves ``state`` to, by :data:`TRANSITIONS`.

    >>> transition(State.OPEN, Trigger.LOCAL_CLOSE)
    <State.CLOSING: 'CLOSING'>
    """
    return TRANSITIONS[(state, trigger)]
