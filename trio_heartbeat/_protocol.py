"""The THB/1 connection state machine (sans-IO).

Theory of operation
-------------------
:class:`HeartbeatProtocol` holds everything one side of a THB/1 connection
knows, and does no I/O: the caller feeds it received bytes with
:meth:`~HeartbeatProtocol.receive_data`, pulls events with
:meth:`~HeartbeatProtocol.next_event` until it returns :data:`NEED_DATA`, asks
it for bytes to write with :meth:`~HeartbeatProtocol.data_to_send`, and tells
it the time. Every method that depends on time takes ``now`` (seconds, on any
monotonic clock the caller likes; the Trio runtime passes
``trio.current_time()``), so the same code runs under a real clock, a
``MockClock`` and a hypothesis test.

Two deadlines drive the runtime, both plain floats:

* :attr:`~HeartbeatProtocol.ping_deadline`: when the send rule (§4) wants a
  PING, because nothing has been sent for the send interval, or because the
  health status changed and the rate rule now allows a PING.
* :attr:`~HeartbeatProtocol.abort_deadline`: when the connection must be
  given up if nothing happens first: the handshake timeout before OPEN, the
  failure detector's verdict on a silent peer while OPEN, the close timeout
  while CLOSING. The Trio runtime uses it as the deadline of the cancel scope
  around the whole connection.

When one of them passes, the caller calls
:meth:`~HeartbeatProtocol.handle_timeout`, which queues the PING or gives up
on the peer. A peer that breaks the protocol makes
:meth:`~HeartbeatProtocol.next_event` raise :class:`RemoteProtocolError`; the
connection is then in the sticky ``ERROR`` state, remembers the close code,
and has queued a CLOSE frame with that code, which the caller should flush
without waiting before it aborts the transport. Misuse by our own caller
raises :class:`LocalProtocolError` and changes nothing.

State changes are listed in one table, :data:`TRANSITIONS`; the docs draw
their state diagram from it.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass, field
from enum import Enum
from hashlib import sha256
from math import inf
from typing import Final, Literal

from ._detectors import FailureDetector, FixedTimeout
from ._errors import LocalProtocolError, RemoteProtocolError
from ._frames import (
    AUTH_SIZE,
    HANDSHAKE_MAX_FRAME,
    MAX_ID_BYTES,
    MIN_MAX_FRAME,
    NONCE_SIZE,
    CloseCode,
    FrameDecoder,
    FrameType,
    HealthStatus,
    Hello,
    Role,
    decode_close,
    decode_hello,
    decode_status,
    encode_close,
    encode_data,
    encode_hello,
    encode_ping,
    encode_pong,
)

__all__ = [
    "NEED_DATA",
    "TRANSITIONS",
    "Config",
    "ConnectionEnded",
    "DataReceived",
    "Event",
    "HandshakeComplete",
    "HeartbeatProtocol",
    "PeerHealthChanged",
    "PingReceived",
    "PongReceived",
    "State",
    "Trigger",
    "compute_auth",
]

_MAX_OUTSTANDING_PINGS: Final = 32
#: A client PINGs after this fraction of its send interval of silence, not the
#: whole of it. Both sides run the same send rule, and their timers would race:
#: the server's PONG restarts the server's timer only a one-way delay after the
#: client's PING restarted the client's, so any lateness of the client makes the
#: server PING too, and every idle connection carries two heartbeats instead of
#: one. Leading by a tenth keeps the client ahead through that much jitter, so an
#: idle server only answers. On a link whose round trip is over a tenth of the
#: interval, or after a stall, the server's timer can still fire first, and the
#: server PINGs too; the client's PONG then restarts the client's timer.
#: The rate rule is untouched (a PING sooner than half the interval is a
#: strike), and sending sooner than the send rule asks is always allowed.
CLIENT_LEAD: Final = 0.9
#: Stateless, so every connection can share it.
_FIXED_TIMEOUT: Final = FixedTimeout()
_OPAQUE = struct.Struct(">Q")
#: A time before any other, one float object shared by every connection.
_NEVER: Final = -inf


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

#: Every legal state change. A trigger missing for a state is ignored there
#: (for example a CLOSE timeout once the connection is already CLOSED).
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

# A tuple, not a set: membership by identity, without Enum's Python-level __hash__.
_TERMINAL: Final = (State.CLOSED, State.ERROR)


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`HeartbeatProtocol.next_event` when no more events can be
#: produced from the bytes received so far.
NEED_DATA: Final = _NeedData.NEED_DATA


# -- events ------------------------------------------------------------------


class Event:
    """Base class of everything :meth:`HeartbeatProtocol.next_event` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """Both HELLOs are exchanged: the connection is OPEN.

    ``send_interval`` is how often (seconds) this side will PING when idle.
    """

    peer: Hello
    send_interval: float


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """A DATA frame's payload."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PingReceived(Event):
    """The peer pinged; the PONG is already queued ahead of any DATA."""

    opaque: bytes
    status: HealthStatus


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """A PONG arrived; ``rtt`` is set when it answered one of our PINGs."""

    opaque: bytes
    status: HealthStatus
    rtt: float | None


@dataclass(frozen=True, slots=True)
class PeerHealthChanged(Event):
    """The health status the peer reports (in HELLO, PING or PONG) changed."""

    status: HealthStatus
    previous: HealthStatus


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


# -- configuration -------------------------------------------------------------


def _ms(seconds: float, name: str) -> int:
    value = round(seconds * 1000)
    if not 1 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must be between 1 ms and about 49 days, not {seconds!r} s")
    return value


@dataclass(frozen=True, slots=True)
class Config:
    """One side's THB/1 settings. Times are in seconds.

    >>> Config(interval=0.5, timeout=1.5, instance_id="node-1").interval_ms
    500

    ``interval`` and ``timeout`` are announced in HELLO (rounded to whole
    milliseconds). ``accept_interval`` and ``accept_timeout`` are the ranges of
    the *peer's* HELLO values this side will honour; outside them the peer is
    refused with 1008. ``secret`` is the pre-shared HMAC key of PROTOCOL.md §6:
    a server with a secret refuses clients that do not prove they hold it, a
    client with a secret signs its HELLO. ``max_ping_strikes`` is how many
    too-early PINGs in a row close the connection with 1008 (``None`` never
    does); a PING at the agreed spacing, or a DATA frame, clears the count.
    """

    interval: float = 1.0
    timeout: float = 3.0
    max_frame: int = 1 << 20
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    instance_id: str = ""
    status: HealthStatus = HealthStatus.SERVING
    secret: bytes | None = None
    accept_interval: tuple[float, float] = (0.005, 3600.0)
    accept_timeout: tuple[float, float] = (0.01, 3600.0)
    max_ping_strikes: int | None = 3
    #: ``interval`` as announced on the wire, in whole milliseconds.
    interval_ms: int = field(init=False, repr=False, compare=False)
    #: ``timeout`` as announced on the wire, in whole milliseconds.
    timeout_ms: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once, and shared by every connection (and HELLO) made with this config.
        object.__setattr__(self, "interval_ms", _ms(self.interval, "interval"))
        object.__setattr__(self, "timeout_ms", _ms(self.timeout, "timeout"))
        if not MIN_MAX_FRAME <= self.max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame must be at least {MIN_MAX_FRAME}, not {self.max_frame}")
        if self.handshake_timeout <= 0 or self.close_timeout < 0:
            raise ValueError("handshake_timeout must be positive and close_timeout not negative")
        if len(self.instance_id.encode("utf-8")) > MAX_ID_BYTES:
            raise ValueError(f"instance_id must be at most {MAX_ID_BYTES} bytes in UTF-8")
        if self.max_ping_strikes is not None and self.max_ping_strikes < 1:
            raise ValueError("max_ping_strikes must be at least 1, or None")
        HealthStatus(self.status)


def compute_auth(key: bytes, server_nonce: bytes, client_nonce: bytes, client_id: str) -> bytes:
    """The HELLO ``auth`` field of PROTOCOL.md §6: an HMAC-SHA256 over both nonces and the id."""
    message = b"THB1-auth" + server_nonce + client_nonce + client_id.encode("utf-8")
    return hmac.new(key, message, sha256).digest()


# -- the state machine ---------------------------------------------------------


@dataclass(slots=True)
class _Counters:
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    pings_sent: int = 0
    pongs_received: int = 0
    data_frames_in: int = 0
    data_frames_out: int = 0
    ping_strikes: int = 0
    # PINGs awaiting their PONG; made on the first PING (an idle server never sends one).
    outstanding: dict[bytes, float] | None = None


class HeartbeatProtocol:
    """One side of a THB/1 connection, as a state machine with time passed in.

    >>> server = HeartbeatProtocol(Role.SERVER, Config(), now=0.0)
    >>> client = HeartbeatProtocol(Role.CLIENT, Config(), now=0.0)
    >>> client.receive_data(server.data_to_send(), now=0.0)
    >>> client.next_event()  # doctest: +ELLIPSIS
    HandshakeComplete(peer=Hello(role=<Role.SERVER: 0>, ...)
    >>> server.receive_data(client.data_to_send(), now=0.0)
    >>> type(server.next_event()).__name__, server.state
    ('HandshakeComplete', <State.OPEN: 'OPEN'>)

    A server queues its HELLO as soon as it is created; a client sends its
    own once the server's has arrived and checked out. ``nonce`` is for tests
    and test vectors; by default every connection draws 16 fresh random bytes.
    """

    # Thousands of these live in a server: no per-instance __dict__.
    __slots__ = (
        "_close_deadline",
        "_control",
        "_data",
        "_decoder",
        "_ended_event",
        "_ended_reported",
        "_eof",
        "_error",
        "_handshake_deadline",
        "_health_changed_at",
        "_health_ping_due",
        "_hello_sent",
        "_inbox",
        "_inbox_position",
        "_last_ping_received",
        "_last_ping_sent",
        "_next_opaque",
        "_now",
        "_paused_since",
        "_peer_hello_at",
        "_peer_send_interval",
        "_pending",
        "_ping_after",
        "_send_interval",
        "_state",
        "_timeout",
        "_untimed_pings",
        "_untimed_until",
        "close_code",
        "close_reason",
        "closed_by_peer",
        "config",
        "counters",
        "detector",
        "health",
        "hello",
        "last_received",
        "last_sent",
        "nonce",
        "peer",
        "peer_health",
        "role",
        "rtt",
        "srtt",
    )

    def __init__(
        self,
        role: Role,
        config: Config | None = None,
        *,
        now: float,
        nonce: bytes | None = None,
        detector: FailureDetector | None = None,
    ) -> None:
        self.role = role
        self.config = config if config is not None else Config()
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self.detector: FailureDetector = detector if detector is not None else _FIXED_TIMEOUT
        self.health = HealthStatus(self.config.status)

        self._state = State.HANDSHAKE
        self._decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
        # Frames decoded in one batch and not yet turned into events.
        self._inbox: list[tuple[FrameType, bytes]] = []
        self._inbox_position = 0
        self._control: list[bytes] = []
        self._data: list[bytes] = []
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._ended_event: ConnectionEnded | None = None
        self._ended_reported = False
        self._hello_sent = False
        self._pending: Event | None = None
        self._now = now

        self.peer: Hello | None = None
        self.peer_health: HealthStatus | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_by_peer = False

        self._timeout = self.config.timeout_ms / 1000
        self._send_interval = inf
        self._ping_after = inf
        self._peer_send_interval = inf
        self._handshake_deadline = now + self.config.handshake_timeout
        self._close_deadline = inf
        self._paused_since: float | None = None
        # PINGs that may arrive back to back without a strike (see resume_liveness).
        self._untimed_pings = 0
        self._untimed_until = _NEVER

        self.last_received: float | None = None
        self.last_sent = now
        self._last_ping_sent: float | None = None
        self._last_ping_received: float | None = None
        self._peer_hello_at = now
        self._health_ping_due = False
        self._health_changed_at = now
        self._next_opaque = 0
        self.rtt: float | None = None
        self.srtt: float | None = None
        self.counters = _Counters()

        if role is Role.SERVER:
            self._send_hello(now, auth=b"")

    # -- public read-only facts -------------------------------------------------

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._state

    @property
    def send_interval(self) -> float:
        """Seconds of silence after which this side PINGs (``inf`` before OPEN)."""
        return self._send_interval

    @property
    def peer_send_interval(self) -> float:
        """How often the peer PINGs when idle, as this side sees it (``inf`` before OPEN)."""
        return self._peer_send_interval

    @property
    def ping_deadline(self) -> float:
        """When :meth:`handle_timeout` will queue the next PING (``inf`` if none is planned).

        A server PINGs after :attr:`send_interval` of silence; a client after
        :data:`CLIENT_LEAD` of it, so that it leads and the server only answers.
        """
        if self._state is not State.OPEN:
            return inf
        due = self.last_sent + self._ping_after
        if self._health_ping_due:
            due = min(due, max(self.earliest_ping, self._health_changed_at))
        return due

    @property
    def earliest_ping(self) -> float:
        """The first moment a PING would not count as a strike at the peer (rate rule)."""
        if self._last_ping_sent is None:
            return _NEVER
        return self._last_ping_sent + self._send_interval / 2

    @property
    def liveness_deadline(self) -> float:
        """When the silent peer will be declared dead (``inf`` while paused or not OPEN)."""
        if self._state is not State.OPEN or self._paused_since is not None:
            return inf
        assert self.last_received is not None
        last = self.last_received
        detector = self.detector
        if type(detector) is FixedTimeout:
            # The clamp below leaves a fixed timeout as it is; this runs for
            # every frame received, so skip the call.
            return last + self._timeout
        suggested = detector.suspect_at(last, self._timeout)
        floor = last + 2 * self._peer_send_interval
        return min(last + self._timeout, max(floor, suggested))

    @property
    def abort_deadline(self) -> float:
        """When the connection is given up if nothing else happens first.

        The handshake deadline before OPEN, :attr:`liveness_deadline` while
        OPEN, the close deadline while CLOSING, ``inf`` once terminal.
        """
        state = self._state
        if state is State.OPEN:
            return self.liveness_deadline
        if state is State.HANDSHAKE:
            return self._handshake_deadline
        if state is State.CLOSING:
            return self._close_deadline
        return inf

    @property
    def control_pending(self) -> bool:
        """True while control frames (HELLO, PONG, CLOSE, PING) wait in :meth:`data_to_send`."""
        return bool(self._control)

    @property
    def next_deadline(self) -> float:
        """The earlier of :attr:`ping_deadline` and :attr:`abort_deadline`."""
        if self._state is State.OPEN:
            return min(self.ping_deadline, self.liveness_deadline)
        return self.abort_deadline  # no PING is planned unless OPEN

    # -- receiving ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray, now: float) -> None:
        """Feed bytes from the transport, received at ``now``; ``b""`` means end-of-file.

        Decoding happens in :meth:`next_event`. Bytes arriving after the
        connection ended are ignored.
        """
        if self._state in _TERMINAL:
            return
        if not data:
            self._eof = True
        else:
            self.counters.bytes_in += len(data)
            self._decoder.receive_data(data)
        self._now = now

    def next_event(self) -> Event | Literal[_NeedData.NEED_DATA]:
        """Return the next event, or :data:`NEED_DATA` when the received bytes are used up.

        Raises :class:`RemoteProtocolError` if the peer broke the protocol;
        the error is sticky and a CLOSE with its code is queued.
        """
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        if self._error is not None:
            raise self._error
        if self._ended_event is not None:
            return self._report_end()
        if self._state in _TERMINAL:
            # Not reached today: every way into CLOSED or ERROR sets _error or
            # _ended_event first. Kept so that no future terminal path can make
            # the core decode frames after the end.
            return NEED_DATA  # pragma: no cover
        try:
            while True:
                inbox = self._inbox
                if self._inbox_position == len(inbox):
                    inbox = self._inbox = self._decoder.frames()
                    self._inbox_position = 0
                    if not inbox:
                        if self._eof:
                            self._end_by_eof()
                            return self._report_end()
                        return NEED_DATA
                frame_type, payload = inbox[self._inbox_position]
                self._inbox_position += 1
                produced = self._handle_frame(frame_type, payload, self._now)
                if produced is not None:
                    return produced
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def _handle_frame(self, frame_type: FrameType, payload: bytes, now: float) -> Event | None:
        counters = self.counters
        counters.frames_in += 1
        self.last_received = now
        self.detector.record(now)
        state = self._state
        if frame_type is FrameType.DATA:
            if state is not State.OPEN and not self._peer_may_be_open():
                raise RemoteProtocolError(
                    "DATA before the handshake completed", CloseCode.PROTOCOL_ERROR
                )
            counters.data_frames_in += 1
            counters.ping_strikes = 0
            return DataReceived(payload)
        if frame_type is FrameType.CLOSE:
            return self._on_close(payload, now)
        if frame_type is FrameType.HELLO:
            if self.peer is not None:
                raise RemoteProtocolError("unexpected second HELLO", CloseCode.PROTOCOL_ERROR)
            return self._on_hello(decode_hello(payload), now)
        if state is not State.OPEN and not self._peer_may_be_open():
            raise RemoteProtocolError(
                f"{frame_type.name} before the handshake completed", CloseCode.PROTOCOL_ERROR
            )
        opaque = payload[:8]
        status = decode_status(payload[8])
        if frame_type is FrameType.PING:
            self._on_ping(opaque, now)
            event: Event = PingReceived(opaque, status)
        else:
            counters.pongs_received += 1
            outstanding = counters.outstanding
            sent_at = None if outstanding is None else outstanding.pop(opaque, None)
            rtt = None
            if sent_at is not None:
                rtt = now - sent_at
                self.rtt = rtt
                self.srtt = rtt if self.srtt is None else self.srtt + (rtt - self.srtt) / 8
            event = PongReceived(opaque, status, rtt)
        if status is not self.peer_health:
            return self._health_change(status, event)
        return event

    def _health_change(self, status: HealthStatus, then: Event) -> Event:
        # Two events from one frame: report the health change first and let the
        # PING/PONG event follow on the next call. PING/PONG events carry the
        # status too, so nothing is lost if the caller stops early.
        previous = self.peer_health
        self.peer_health = status
        assert previous is not None
        self._pending = then
        return PeerHealthChanged(status, previous)

    def _peer_may_be_open(self) -> bool:
        # Only HELLO and CLOSE are valid from a peer that is not OPEN, and it
        # cannot be OPEN before both HELLOs crossed (even if our CLOSE followed).
        return self._hello_sent and self.peer is not None

    def _on_ping(self, opaque: bytes, now: float) -> None:
        last = self._last_ping_received
        self._last_ping_received = now
        strikes_allowed = self.config.max_ping_strikes
        interval = self._peer_send_interval
        since = last if last is not None else self._peer_hello_at
        if now - since > interval:
            # A late PING (after the previous one, or the first after HELLO):
            # the ones sent after it may have queued with it behind a backlog
            # in the network (a slow link, a full buffer) and now come bunched.
            # As many as an honest peer could have sent in the extra time are
            # not strikes; a flood still is, at twice the agreed rate.
            bunched = int((now - since - interval) / (interval / 2))
            if bunched:
                left = self._untimed_pings if now <= self._untimed_until else 0
                self._untimed_pings = max(left, bunched)
                self._untimed_until = max(self._untimed_until, now + interval)
        # Compared as the sender computes earliest_ping (last + half), not as a
        # difference: a PING sent at exactly that moment must never be a strike
        # by a rounding step.
        if last is None or now >= last + interval / 2:
            # A PING at the agreed spacing: earlier strikes were jitter (a late
            # read, a PING bunched behind a late one), not a flood. Only strikes
            # in a row count; the protocol lets a receiver be this lenient, since
            # closing with 1008 is a MAY.
            self.counters.ping_strikes = 0
        elif self._untimed_pings and now <= self._untimed_until:
            # The backlog of a pause arrives as soon as we read again; an
            # allowance left over after that would excuse a later flood.
            self._untimed_pings -= 1
        else:
            self.counters.ping_strikes += 1
            if strikes_allowed is not None and self.counters.ping_strikes >= strikes_allowed:
                raise RemoteProtocolError(
                    f"{self.counters.ping_strikes} PINGs in a row sooner than the agreed rate",
                    CloseCode.POLICY_VIOLATION,
                )
        if self._state is State.OPEN:
            self._queue_control(encode_pong(opaque, self.health), now)

    def _on_close(self, payload: bytes, now: float) -> Event:
        code, reason = decode_close(payload)
        if self._state is State.CLOSING:
            # The peer answered (or crossed) our CLOSE: keep the code we sent.
            self._transition(Trigger.REMOTE_CLOSE)
            self._ended_event = ConnectionEnded(
                self.close_code if self.close_code is not None else code,
                self.close_reason,
                by_peer=False,
                clean=True,
            )
        else:
            # As in close(): DATA already queued stays ahead of our last frame.
            self._control.extend(self._data)
            self._data.clear()
            self._queue_control(encode_close(code, reason), now)
            self.close_code, self.close_reason, self.closed_by_peer = code, reason, True
            self._transition(Trigger.REMOTE_CLOSE)
            self._ended_event = ConnectionEnded(code, reason, by_peer=True, clean=True)
        self._ended_reported = True
        return self._ended_event

    def _on_hello(self, hello: Hello, now: float) -> Event | None:
        expected = Role.SERVER if self.role is Role.CLIENT else Role.CLIENT
        if hello.role is not expected:
            raise RemoteProtocolError(
                f"peer HELLO has role {hello.role.name}, expected {expected.name}",
                CloseCode.PROTOCOL_ERROR,
            )
        config = self.config
        low, high = config.accept_interval
        if not low <= hello.interval_ms / 1000 <= high:
            raise RemoteProtocolError(
                f"peer interval {hello.interval_ms} ms is outside {low}..{high} s",
                CloseCode.POLICY_VIOLATION,
            )
        low, high = config.accept_timeout
        if not low <= hello.timeout_ms / 1000 <= high:
            raise RemoteProtocolError(
                f"peer timeout {hello.timeout_ms} ms is outside {low}..{high} s",
                CloseCode.POLICY_VIOLATION,
            )
        if self.role is Role.SERVER and config.secret is not None:
            expected_auth = compute_auth(config.secret, self.nonce, hello.nonce, hello.instance_id)
            if len(hello.auth) != AUTH_SIZE or not hmac.compare_digest(hello.auth, expected_auth):
                raise RemoteProtocolError(
                    "client authentication failed", CloseCode.POLICY_VIOLATION
                )
        self.peer = hello
        self.peer_health = hello.status
        self._peer_hello_at = now
        self._send_interval = min(config.interval_ms, hello.timeout_ms / 2) / 1000
        lead = CLIENT_LEAD if self.role is Role.CLIENT else 1.0
        self._ping_after = self._send_interval * lead
        self._peer_send_interval = min(hello.interval_ms, config.timeout_ms / 2) / 1000
        if self._state is State.CLOSING:
            # Our CLOSE crossed the peer's HELLO. If our HELLO went out first, the
            # peer is OPEN and may have DATA (up to our max_frame) and PINGs in
            # flight, which we keep reading until its CLOSE. We send nothing more.
            if self._hello_sent:
                self._decoder.max_frame = config.max_frame
            return None
        if self.role is Role.CLIENT:
            auth = b""
            if config.secret is not None:
                auth = compute_auth(config.secret, hello.nonce, self.nonce, config.instance_id)
            self._send_hello(now, auth)
        self._decoder.max_frame = config.max_frame
        self._transition(Trigger.HANDSHAKE_DONE)
        return HandshakeComplete(hello, self._send_interval)

    # -- sending --------------------------------------------------------------

    def _send_hello(self, now: float, auth: bytes) -> None:
        config = self.config
        hello = Hello(
            role=self.role,
            status=self.health,
            interval_ms=config.interval_ms,
            timeout_ms=config.timeout_ms,
            max_frame=config.max_frame,
            nonce=self.nonce,
            instance_id=config.instance_id,
            auth=auth,
        )
        self.hello = hello
        self._hello_sent = True
        self._queue_control(encode_hello(hello), now)

    def _queue_control(self, frame: bytes, now: float) -> None:
        self._control.append(frame)
        self.counters.frames_out += 1
        self.last_sent = now

    def send_data(self, payload: bytes, now: float) -> None:
        """Queue a DATA frame. Raises :class:`LocalProtocolError` unless OPEN.

        A payload over the peer's ``max_frame`` is refused with code 1009
        rather than sent, since the peer would only close on it.
        """
        if self._state is not State.OPEN:
            raise LocalProtocolError(
                f"cannot send DATA in state {self._state.name}", CloseCode.PROTOCOL_ERROR
            )
        assert self.peer is not None
        if len(payload) > self.peer.max_frame:
            raise LocalProtocolError(
                f"DATA of {len(payload)} bytes exceeds the peer's limit of {self.peer.max_frame}",
                CloseCode.TOO_BIG,
            )
        self._data.append(encode_data(payload))
        counters = self.counters
        counters.frames_out += 1
        counters.data_frames_out += 1
        self.last_sent = now

    def send_ping(self, now: float) -> bytes:
        """Queue a PING at once and return its opaque bytes.

        The caller is responsible for the rate rule; :attr:`earliest_ping`
        says when a PING will not count against us.
        """
        if self._state is not State.OPEN:
            raise LocalProtocolError(
                f"cannot send PING in state {self._state.name}", CloseCode.PROTOCOL_ERROR
            )
        self._next_opaque += 1
        opaque = _OPAQUE.pack(self._next_opaque)
        outstanding = self.counters.outstanding
        if outstanding is None:
            outstanding = self.counters.outstanding = {}
        elif len(outstanding) >= _MAX_OUTSTANDING_PINGS:
            del outstanding[next(iter(outstanding))]
        outstanding[opaque] = now
        self.counters.pings_sent += 1
        self._last_ping_sent = now
        self._health_ping_due = False
        self._queue_control(encode_ping(opaque, self.health), now)
        return opaque

    def set_health(self, status: HealthStatus, now: float) -> None:
        """Change the health status we report; the peer hears of it within one PING.

        While OPEN, a change makes :attr:`ping_deadline` the earliest moment
        the rate rule allows, so the caller's next :meth:`handle_timeout`
        sends it.
        """
        status = HealthStatus(status)
        if status is self.health:
            return
        self.health = status
        # Before our HELLO is sent, the HELLO itself will carry the new status.
        if self._hello_sent and self._state in (State.HANDSHAKE, State.OPEN):
            self._health_ping_due = True
            self._health_changed_at = now

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", *, now: float) -> None:
        """Start the close handshake: queue CLOSE and wait for the peer's.

        Idempotent: once CLOSING or terminal, nothing more happens.
        """
        if self._state not in (State.HANDSHAKE, State.OPEN):
            return
        frame = encode_close(code, reason)
        # DATA the core already encoded is committed to the stream: it stays
        # ahead of the CLOSE, which is the last frame this side ever sends.
        self._control.extend(self._data)
        self._data.clear()
        self._queue_control(frame, now)
        self.close_code, self.close_reason, self.closed_by_peer = code, reason, False
        self._close_deadline = now + self.config.close_timeout
        self._transition(Trigger.LOCAL_CLOSE)

    def data_to_send(self) -> bytes:
        """Everything queued for the transport, control frames ahead of DATA."""
        if self._data:
            chunks = self._control + self._data
            self._data.clear()
        elif self._control:
            chunks = self._control
        else:
            return b""
        self._control = []
        out = b"".join(chunks)
        self.counters.bytes_out += len(out)
        return out

    # -- time -----------------------------------------------------------------

    def handle_timeout(self, now: float) -> None:
        """Act on every deadline that has passed by ``now``.

        Queues the PING the send rule asks for, or gives up on the connection
        (handshake timeout, silent peer: 1011; close timeout: CLOSED), in which
        case the next :meth:`next_event` returns :class:`ConnectionEnded`.
        """
        state = self._state
        if state in _TERMINAL:
            return
        if now >= self.abort_deadline:
            if state is State.CLOSING:
                self._transition(Trigger.CLOSE_TIMEOUT)
                assert self.close_code is not None
                self._ended_event = ConnectionEnded(
                    self.close_code, self.close_reason, by_peer=False, clean=False
                )
                return
            reason = "handshake timeout" if state is State.HANDSHAKE else "heartbeat timeout"
            self._abort(CloseCode.HEARTBEAT_TIMEOUT, reason, now)
            return
        if now >= self.ping_deadline:
            self.send_ping(now)

    def pause_liveness(self, now: float) -> None:
        """The reader stopped reading (our application is slow): suspend conviction.

        A peer cannot be heard while we are not reading, so its silence proves
        nothing. :attr:`liveness_deadline` is ``inf`` until :meth:`resume_liveness`.
        """
        if self._paused_since is None:
            self._paused_since = now

    def resume_liveness(self, now: float) -> None:
        """The reader is reading again: the silence clock restarts from ``now`` at the latest."""
        if self._paused_since is not None:
            # PINGs the peer sent while we were not reading come in all at
            # once now; their spacing on the wire is lost. As many as an honest
            # peer could have sent meanwhile are not strikes.
            paused_for = now - self._paused_since
            self._untimed_pings = int(paused_for / (self._peer_send_interval / 2)) + 1
            self._untimed_until = now + self._peer_send_interval
            self._paused_since = None
            if self.last_received is not None:
                self.last_received = max(self.last_received, now)

    # -- endings --------------------------------------------------------------

    def _transition(self, trigger: Trigger) -> None:
        self._state = TRANSITIONS[(self._state, trigger)]

    def _abort(self, code: int, reason: str, now: float) -> None:
        # The silence rule: send CLOSE if it can go without waiting, never wait
        # for an answer. The caller flushes data_to_send() best-effort.
        # handle_timeout ends CLOSING itself, so today this is always true; the
        # check keeps a CLOSING side from ever sending a second CLOSE.
        if self._state is not State.CLOSING:  # pragma: no branch
            self._data.clear()
            self._queue_control(encode_close(code, reason), now)
            self.close_code, self.close_reason, self.closed_by_peer = code, reason, False
        self._transition(Trigger.TIMEOUT)
        self._ended_event = ConnectionEnded(code, reason, by_peer=False, clean=False)

    def _end_by_eof(self) -> None:
        if self._state is State.CLOSING:
            assert self.close_code is not None
            self._transition(Trigger.EOF)
            self._ended_event = ConnectionEnded(
                self.close_code, self.close_reason, by_peer=False, clean=False
            )
            return
        self._transition(Trigger.EOF)
        self.close_code = CloseCode.ABNORMAL_CLOSURE
        self.close_reason = "connection lost"
        self.closed_by_peer = True
        self._ended_event = ConnectionEnded(
            CloseCode.ABNORMAL_CLOSURE, "connection lost", by_peer=True, clean=False
        )

    def _fail(self, exc: RemoteProtocolError) -> None:
        # next_event never decodes in a terminal state, so today this is always
        # true; the check keeps a finished connection's close code as it was.
        if self._state not in _TERMINAL:  # pragma: no branch
            if self._state is not State.CLOSING:
                self._data.clear()
                self._control.append(encode_close(exc.code, str(exc)))
            self.close_code, self.close_reason, self.closed_by_peer = exc.code, str(exc), False
            self._transition(Trigger.PROTOCOL_ERROR)
        self._error = exc

    def _report_end(self) -> Event | Literal[_NeedData.NEED_DATA]:
        if self._ended_reported or self._ended_event is None:
            return NEED_DATA
        self._ended_reported = True
        return self._ended_event
