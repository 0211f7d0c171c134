"""What the protocol core reports: the events :meth:`HeartbeatProtocol.next_event`
returns, and the counters it keeps.

Events are frozen, slotted values, made once per frame or ending and never
changed. The core turns frames (from the codec) into events; the Trio runtime
turns events into deliveries, wake-ups and listener calls. :data:`NEED_DATA`
is not an event: it says that the bytes received so far hold no more.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, final

from ._frames import HealthStatus, Hello

__all__ = [
    "NEED_DATA",
    "ConnectionEnded",
    "DataReceived",
    "Event",
    "FrameCounters",
    "HandshakeComplete",
    "Liveness",
    "PeerHealthChanged",
    "PeerRecovered",
    "PeerSuspected",
    "PingReceived",
    "PongReceived",
]


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`HeartbeatProtocol.next_event` when no more events can be
#: produced from the bytes received so far.
NEED_DATA: Final = _NeedData.NEED_DATA


class Event:
    """Base class of everything :meth:`HeartbeatProtocol.next_event` returns."""

    __slots__ = ()


@final
@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """Both HELLOs are exchanged: the connection is OPEN.

    ``send_interval`` is how often (seconds) this side will PING when idle.
    """

    peer: Hello
    send_interval: float


@final
@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """A DATA frame's payload."""

    data: bytes


@final
@dataclass(frozen=True, slots=True)
class PingReceived(Event):
    """The peer pinged; the PONG is already queued ahead of any DATA."""

    opaque: bytes
    status: HealthStatus


@final
@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """A PONG arrived; ``rtt`` is set when it answered one of our PINGs."""

    opaque: bytes
    status: HealthStatus
    rtt: float | None


@final
@dataclass(frozen=True, slots=True)
class PeerHealthChanged(Event):
    """The health status the peer reports (in HELLO, PING or PONG) changed."""

    status: HealthStatus
    previous: HealthStatus


class Liveness(Enum):
    """What our side makes of the peer's silence, before any verdict.

    ``ALIVE``: heard from within one and a half of its send intervals.
    ``SUSPECT``: a heartbeat is overdue; the next frame makes it ALIVE again,
    and the failure detector's verdict, if it comes, ends the connection.
    """

    ALIVE = "ALIVE"
    SUSPECT = "SUSPECT"


@final
@dataclass(frozen=True, slots=True)
class PeerSuspected(Event):
    """The peer became SUSPECT after ``silence`` seconds without a frame (reversible).

    ``suspicion`` is the silence rule's level at that moment. Reported to
    listeners by the Trio runtime; the core's :meth:`next_event` never returns it.
    """

    silence: float
    suspicion: float


@final
@dataclass(frozen=True, slots=True)
class PeerRecovered(Event):
    """A SUSPECT peer was heard from again, after ``silence`` seconds: ALIVE again.

    Reported to listeners by the Trio runtime, like :class:`PeerSuspected`.
    """

    silence: float


@final
@dataclass(frozen=True, slots=True)
class ConnectionEnded(Event):
    """The connection reached a terminal state; always the last event.

    ``code`` is the CLOSE code sent or received, or 1006 when the transport
    ended with no CLOSE at all. ``by_peer`` says who started the close;
    ``clean`` is true when CLOSE frames were exchanged both ways.
    """

    code: int
    reason: str
    by_peer: bool
    clean: bool


@final
@dataclass(slots=True)
class FrameCounters:
    """What one side has sent and received, in frames and bytes. Only counts; read, never write."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    pings_sent: int = 0
    pongs_received: int = 0
    data_frames_in: int = 0
    data_frames_out: int = 0
