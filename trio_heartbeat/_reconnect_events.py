"""What the reconnecting client reports: its states, its events, and how they read.

The supervisor loop of :func:`open_reconnecting_client` reports every step
(an attempt started or failed, connected, disconnected, backing off, stopped)
as a frozen :class:`SupervisorEvent` to its listeners and to the log, and
moves between the :class:`SupervisorState` values as it goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeAlias, final

from ._connection import Connection
from ._errors import ConnectionClosed, ReconnectFailed

__all__ = [
    "AttemptFailed",
    "AttemptStarted",
    "BackingOff",
    "Connected",
    "Disconnected",
    "Stopped",
    "SupervisorEvent",
    "SupervisorListener",
    "SupervisorState",
    "describe",
]


class SupervisorState(Enum):
    """What the supervisor is doing."""

    #: Not connected, and not yet trying (before the first attempt).
    DISCONNECTED = "disconnected"
    #: An attempt is under way.
    CONNECTING = "connecting"
    #: A connection is open.
    CONNECTED = "connected"
    #: Waiting out a backoff delay before the next attempt.
    BACKING_OFF = "backing off"
    #: Stopped for good: closed by the caller, or given up.
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SupervisorEvent:
    """Base class of everything the supervisor reports."""


@final
@dataclass(frozen=True, slots=True)
class AttemptStarted(SupervisorEvent):
    """Attempt number ``attempt`` (from 1, counted over the client's life) has begun."""

    attempt: int
    endpoint: str


@final
@dataclass(frozen=True, slots=True)
class AttemptFailed(SupervisorEvent):
    """An attempt did not reach OPEN."""

    attempt: int
    endpoint: str
    error: ConnectionClosed


@final
@dataclass(frozen=True, slots=True)
class Connected(SupervisorEvent):
    """An attempt succeeded: the connection is OPEN."""

    attempt: int
    endpoint: str
    connection: Connection = field(compare=False, repr=False)


@final
@dataclass(frozen=True, slots=True)
class Disconnected(SupervisorEvent):
    """A connection that was OPEN ended, after ``uptime`` seconds."""

    endpoint: str
    error: ConnectionClosed
    uptime: float


@final
@dataclass(frozen=True, slots=True)
class BackingOff(SupervisorEvent):
    """Waiting ``delay`` seconds before attempt ``attempt``."""

    attempt: int
    delay: float


@final
@dataclass(frozen=True, slots=True)
class Stopped(SupervisorEvent):
    """The supervisor stopped for good; ``error`` is ``None`` when the caller closed it."""

    error: ReconnectFailed | None


#: Called synchronously with every :class:`SupervisorEvent`, in order.
SupervisorListener: TypeAlias = Callable[[SupervisorEvent], None]


def describe(event: SupervisorEvent) -> str:
    """One line for a person to read (the log line of every event)."""
    if isinstance(event, AttemptStarted):
        return f"attempt {event.attempt}: connecting to {event.endpoint}"
    if isinstance(event, AttemptFailed):
        return f"attempt {event.attempt} to {event.endpoint} failed: {event.error}"
    if isinstance(event, Connected):
        return f"connected to {event.endpoint} (attempt {event.attempt})"
    if isinstance(event, Disconnected):
        return f"disconnected from {event.endpoint} (up {event.uptime:.2f} s): {event.error}"
    if isinstance(event, BackingOff):
        return f"backing off {event.delay:.3f} s before attempt {event.attempt}"
    assert isinstance(event, Stopped)
    return f"stopped: {event.error}" if event.error else "stopped"
