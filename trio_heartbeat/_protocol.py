"""The THB/1 connection state machine (sans-IO).

Theory of operation
-------------------
:class:`HeartbeatProtocol` holds everything one side of a THB/1 connection
knows, and does no I/O: the caller feeds it received bytes
(:meth:`~HeartbeatProtocol.receive_data`), pulls events
(:meth:`~HeartbeatProtocol.next_event`) until :data:`NEED_DATA`, takes the
bytes to write (:meth:`~HeartbeatProtocol.data_to_send`), and tells it the
time: every method that depends on time takes ``now``, so the same code runs
under a real clock, a ``MockClock`` and a hypothesis test.

Data flows one way: bytes go to the codec (``_frames``), which hands back
typed frames; each frame moves the machine (``_state``'s table) and becomes at
most one event (``_events``). The handshake is pure functions (``_handshake``);
the rate rule (``_rate``), the silence rule (``_silence``) and our PINGs
(``_pings``) each have an owner. Every ending goes through :meth:`_end`.

Two deadlines drive the runtime: :attr:`~HeartbeatProtocol.ping_deadline` (a
PING is due) and :attr:`~HeartbeatProtocol.abort_deadline` (the handshake
timeout, then the verdict on a silent peer, then the close timeout); when one
passes, the caller calls :meth:`~HeartbeatProtocol.handle_timeout`. A peer
that breaks the protocol makes :meth:`~HeartbeatProtocol.next_event` raise
:class:`RemoteProtocolError` (sticky, with a CLOSE carrying its code queued);
misuse by our own caller raises :class:`LocalProtocolError` and changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from enum import Enum
from math import inf
from typing import Final, Literal, final

from ._config import Config
from ._detectors import FailureDetector
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    ConnectionEnded,
    DataReceived,
    Event,
    FrameCounters,
    HandshakeComplete,
    PeerHealthChanged,
    PingReceived,
    PongReceived,
    _NeedData,
)
from ._frames import (
    HANDSHAKE_MAX_FRAME,
    NONCE_SIZE,
    Close,
    CloseCode,
    Frame,
    FrameDecoder,
    HealthStatus,
    Hello,
    Ping,
    Pong,
    Role,
    encode_close,
    encode_data,
    encode_hello,
    encode_ping,
    encode_pong,
)
from ._handshake import agree, build_hello, check_peer_hello
from ._pings import Heartbeat
from ._rate import PingRate
from ._silence import FIXED_TIMEOUT, SilenceRule
from ._state import TERMINAL, State, Trigger, transition

__all__ = ["HeartbeatProtocol"]

#: The reason of a verdict on a silent peer: its silence, or our own stall.
_VERDICT: Final = ("heartbeat timeout: peer silent", "heartbeat timeout: we were stalled")


class _Say(Enum):
    """What an ending sends the peer, unless our CLOSE is out: nothing (the transport
    is gone), CLOSE behind the DATA already encoded, or CLOSE at once (DATA dropped)."""

    NOTHING = "nothing"
    CLOSE_AFTER_DATA = "close after data"
    CLOSE_NOW = "close now"


@final
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

    A server queues its HELLO when it is created, a client its own once the
    server's has checked out. ``nonce`` is for test vectors (default: random).
    """

    __slots__ = (
        "_control",
        "_data",
        "_deadline",
        "_decoder",
        "_ended_event",
        "_ended_reported",
        "_eof",
        "_error",
        "_heartbeat",
        "_hello_sent",
        "_inbox",
        "_inbox_position",
        "_now",
        "_peer_send_interval",
        "_pending",
        "_rate",
        "_silence",
        "_state",
        "close_code",
        "close_reason",
        "closed_by_peer",
        "config",
        "counters",
        "health",
        "last_sent",
        "nonce",
        "peer",
        "peer_health",
        "role",
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
        self.health = HealthStatus(self.config.status)
        self.counters = FrameCounters()

        self._state = State.HANDSHAKE
        self._decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
        self._inbox: Sequence[Frame] = ()  # decoded in one batch, not yet events
        self._inbox_position = 0
        # Made on demand, dropped once sent: an idle connection holds no lists.
        self._control: list[bytes] | None = None
        self._data: list[bytes] | None = None
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

        self._silence = SilenceRule(
            detector if detector is not None else FIXED_TIMEOUT, self.config.timeout_ms / 1000
        )
        self._heartbeat = Heartbeat()
        self._peer_send_interval = inf
        # The handshake deadline while HANDSHAKE, the close deadline while CLOSING.
        self._deadline = now + self.config.handshake_timeout
        # Made once the peer may be OPEN; until then DATA and PING are refused.
        self._rate: PingRate | None = None
        self.last_sent = now
        if role is Role.SERVER:
            self._send_hello(now)

    # -- public read-only facts -------------------------------------------------

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._state

    @property
    def send_interval(self) -> float:
        """Seconds of silence after which this side PINGs (``inf`` before OPEN)."""
        return self._heartbeat.send_interval

    @property
    def peer_send_interval(self) -> float:
        """How often the peer PINGs when idle, as this side sees it (``inf`` before OPEN)."""
        return self._peer_send_interval

    @property
    def detector(self) -> FailureDetector:
        """The failure detector that judges the peer's silence."""
        return self._silence.detector

    @property
    def silence(self) -> SilenceRule:
        """The silence rule: when the peer is suspected, and convicted (``_silence``)."""
        return self._silence

    @property
    def last_received(self) -> float | None:
        """When the last frame arrived (``None`` before the first)."""
        return self._silence.last_heard

    @property
    def rtt(self) -> float | None:
        """The last PING round trip, in seconds (``None`` before the first PONG)."""
        return self._heartbeat.rtt

    @property
    def srtt(self) -> float | None:
        """The smoothed round trip (exponential average, weight 1/8), in seconds."""
        return self._heartbeat.srtt

    @property
    def ping_strikes(self) -> int:
        """The peer's too-early PINGs in a row (THB/1 §4's rate rule)."""
        return 0 if self._rate is None else self._rate.strikes

    @property
    def ping_deadline(self) -> float:
        """When :meth:`handle_timeout` queues the next PING (``inf`` if none): see ``_pings``."""
        if self._state is not State.OPEN:
            return inf
        return self._heartbeat.due(self.last_sent)

    @property
    def receiving(self) -> int:
        """Bytes received that make no whole frame yet: a frame still arriving."""
        return self._decoder.buffered

    @property
    def earliest_ping(self) -> float:
        """The first moment a PING would not count as a strike at the peer (rate rule)."""
        return self._heartbeat.earliest

    @property
    def liveness_deadline(self) -> float:
        """When the silent peer is declared dead (``inf`` unless OPEN); see ``_silence``."""
        if self._state is not State.OPEN:
            return inf
        return self._silence.deadline

    @property
    def abort_deadline(self) -> float:
        """When the connection is given up if nothing else happens first: the handshake
        deadline, then :attr:`liveness_deadline`, then the close deadline; ``inf`` once ended."""
        state = self._state
        if state is State.OPEN:
            return self.liveness_deadline
        if state in TERMINAL:
            return inf
        return self._deadline

    @property
    def control_pending(self) -> bool:
        """True while control frames (HELLO, PONG, CLOSE, PING) wait in :meth:`data_to_send`."""
        return self._control is not None

    @property
    def next_deadline(self) -> float:
        """The earlier of :attr:`ping_deadline` and :attr:`abort_deadline`."""
        if self._state is State.OPEN:
            # ping_deadline and liveness_deadline, inlined: this runs for every frame.
            return min(self._heartbeat.due(self.last_sent), self._silence.deadline)
        return self.abort_deadline  # no PING is planned unless OPEN

    # -- receiving ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray, now: float) -> None:
        """Feed bytes from the transport, received at ``now``; ``b""`` means end-of-file.

        Decoding happens in :meth:`next_event`; bytes after the end are ignored.
        """
        if self._state in TERMINAL:
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
            # Every ending goes through _end, which sets it: nothing is decoded after.
            return self._report_end()
        try:
            while True:
                inbox = self._inbox
                if self._inbox_position == len(inbox):
                    inbox = self._inbox = self._decoder.frames()
                    self._inbox_position = 0
                    if not inbox:
                        self._inbox = ()  # the empty batch need not stay
                        if self._eof:
                            lost = CloseCode.ABNORMAL_CLOSURE, "connection lost"
                            self._end(
                                Trigger.EOF, *lost, now=self._now, say=_Say.NOTHING, by_peer=True
                            )
                            return self._report_end()
                        return NEED_DATA
                frame = inbox[self._inbox_position]
                self._inbox_position += 1
                produced = self._handle_frame(frame, self._now)
                if produced is not None:
                    return produced
        except RemoteProtocolError as exc:
            self._end(Trigger.PROTOCOL_ERROR, exc.code, str(exc), now=self._now, say=_Say.CLOSE_NOW)
            self._error = exc
            raise

    def _handle_frame(self, frame: Frame, now: float) -> Event | None:
        counters = self.counters
        counters.frames_in += 1
        self._silence.heard(now)
        rate = self._rate
        if type(frame) is bytes:  # DATA: its payload, as the codec hands it over
            if rate is None:
                raise RemoteProtocolError(
                    "DATA before the handshake completed", CloseCode.PROTOCOL_ERROR
                )
            counters.data_frames_in += 1
            rate.data()
            return DataReceived(frame)
        if type(frame) is Close:
            return self._on_close(frame, now)
        if type(frame) is Hello:
            if self.peer is not None:
                raise RemoteProtocolError("unexpected second HELLO", CloseCode.PROTOCOL_ERROR)
            return self._on_hello(frame, now)
        assert isinstance(frame, Ping | Pong)
        if rate is None:
            raise RemoteProtocolError(
                f"{type(frame).__name__.upper()} before the handshake completed",
                CloseCode.PROTOCOL_ERROR,
            )
        if type(frame) is Ping:
            rate.ping(now)
            if self._state is State.OPEN:
                self._queue_control(encode_pong(frame.opaque, self.health), now)
            event: Event = PingReceived(frame.opaque, frame.status)
        else:
            counters.pongs_received += 1
            rtt = self._heartbeat.answered(frame.opaque, now)
            event = PongReceived(frame.opaque, frame.status, rtt)
        if frame.status is not self.peer_health:
            return self._health_change(frame.status, event)
        return event

    def _health_change(self, status: HealthStatus, then: Event) -> Event:
        # Two events from one frame: the health change first, then the PING/PONG.
        previous = self.peer_health
        self.peer_health = status
        assert previous is not None
        self._pending = then
        return PeerHealthChanged(status, previous)

    def _on_close(self, frame: Close, now: float) -> Event:
        # The peer's CLOSE ends the connection cleanly: answered with the same
        # code behind the DATA already encoded, unless ours is out already.
        ended = self._end(
            Trigger.REMOTE_CLOSE,
            frame.code,
            frame.reason,
            now=now,
            say=_Say.CLOSE_AFTER_DATA,
            by_peer=True,
            clean=True,
        )
        self._ended_reported = True
        return ended

    def _on_hello(self, hello: Hello, now: float) -> Event | None:
        check_peer_hello(self.role, self.config, self.nonce, hello)
        self.peer = hello
        self.peer_health = hello.status
        timing = agree(self.role, self.config, hello)
        server = self.role is Role.SERVER  # whose client leads: it PINGs only to measure
        self._heartbeat.agree(timing.send_interval, timing.ping_after, refresh=server)
        self._peer_send_interval = timing.peer_send_interval
        self._silence.agree(timing.peer_send_interval)
        if self._state is State.CLOSING:
            # Our CLOSE crossed the peer's HELLO. If our HELLO went out first, the
            # peer is OPEN and may have DATA (up to our max_frame) and PINGs in
            # flight, which we keep reading until its CLOSE. We send nothing more.
            if self._hello_sent:
                self._open_to_peer(now)
            return None
        if not server:
            self._send_hello(now, server_nonce=hello.nonce)
        self._open_to_peer(now)
        self._state = transition(self._state, Trigger.HANDSHAKE_DONE)
        if server:
            self.send_ping(now)  # the verdict on the client's HELLO, and a first round trip
        return HandshakeComplete(hello, timing.send_interval)

    def _open_to_peer(self, now: float) -> None:
        # Both HELLOs have crossed: from the peer's side the connection may be
        # OPEN, so DATA (up to our limit) and PINGs are valid from now on.
        self._decoder.max_frame = self.config.max_frame
        self._rate = PingRate(self._peer_send_interval, self.config.max_ping_strikes, since=now)

    # -- sending --------------------------------------------------------------

    def _send_hello(self, now: float, server_nonce: bytes | None = None) -> None:
        hello = build_hello(self.role, self.config, self.nonce, self.health, server_nonce)
        self._hello_sent = True
        self._queue_control(encode_hello(hello), now)

    def _queue_control(self, frame: bytes, now: float) -> None:
        if self._control is None:
            self._control = [frame]
        else:
            self._control.append(frame)
        self.counters.frames_out += 1
        self.last_sent = now

    def _queue_close(self, code: int, reason: str, now: float, *, keep_data: bool) -> None:
        frame = encode_close(code, reason)  # first: a bad code changes nothing
        if keep_data and self._data is not None:
            # Encoded DATA is committed to the stream: it goes ahead of our last frame.
            self._control = [*(self._control or ()), *self._data]
        self._data = None
        self._queue_control(frame, now)

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
        if self._data is None:
            self._data = [encode_data(payload)]
        else:
            self._data.append(encode_data(payload))
        counters = self.counters
        counters.frames_out += 1
        counters.data_frames_out += 1
        self.last_sent = now

    def send_ping(self, now: float) -> bytes:
        """Queue a PING at once and return its opaque bytes. The caller keeps to the rate
        rule: :attr:`earliest_ping` says when a PING will not count against us."""
        if self._state is not State.OPEN:
            raise LocalProtocolError(
                f"cannot send PING in state {self._state.name}", CloseCode.PROTOCOL_ERROR
            )
        opaque = self._heartbeat.sent(now)
        self.counters.pings_sent += 1
        self._queue_control(encode_ping(opaque, self.health), now)
        return opaque

    def set_health(self, status: HealthStatus, now: float) -> None:
        """Change the health status we report; while OPEN, :attr:`ping_deadline` moves to
        now, or to 5/8 of an interval after our last PING, so the peer hears of it at once."""
        status = HealthStatus(status)
        if status is self.health:
            return
        self.health = status
        # Before our HELLO is sent, the HELLO itself will carry the new status.
        if self._hello_sent and self._state in (State.HANDSHAKE, State.OPEN):
            self._heartbeat.announce(now)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", *, now: float) -> None:
        """Start the close handshake: queue CLOSE and wait for the peer's.

        Idempotent: once CLOSING or terminal, nothing more happens.
        """
        if self._state not in (State.HANDSHAKE, State.OPEN):
            return
        self._queue_close(code, reason, now, keep_data=True)
        self.close_code, self.close_reason, self.closed_by_peer = code, reason, False
        self._deadline = now + self.config.close_timeout
        self._state = transition(self._state, Trigger.LOCAL_CLOSE)

    def data_to_send(self) -> bytes:
        """Everything queued for the transport, control frames ahead of DATA."""
        control, data = self._control, self._data
        if data is None:
            if control is None:
                return b""
            chunks = control
        else:
            chunks = data if control is None else control + data
        self._control = self._data = None
        out = b"".join(chunks)
        self.counters.bytes_out += len(out)
        return out

    # -- time -----------------------------------------------------------------

    def handle_timeout(self, now: float, *, stalled: bool = False) -> None:
        """Act on every deadline that has passed by ``now``.

        Queues the PING the send rule asks for, or gives up on the connection
        (handshake timeout, silent peer: 1011; close timeout: CLOSED), in which
        case the next :meth:`next_event` returns :class:`ConnectionEnded`. A
        verdict on a silent peer says "peer silent", or "we were stalled" with
        ``stalled`` (our own loop was away)."""
        state = self._state
        if state in TERMINAL:
            return
        if now >= self.abort_deadline:
            if state is State.CLOSING:
                trigger, reason = Trigger.CLOSE_TIMEOUT, "close timeout"
            elif state is State.HANDSHAKE:
                trigger, reason = Trigger.TIMEOUT, "handshake timeout"
            else:
                trigger, reason = Trigger.TIMEOUT, _VERDICT[stalled]
            self._end(trigger, CloseCode.HEARTBEAT_TIMEOUT, reason, now=now, say=_Say.CLOSE_NOW)
            return
        if now >= self.ping_deadline:
            self.send_ping(now)

    def pause_liveness(self, now: float) -> None:
        """We cannot read (our application is slow, our loop was away): until
        :meth:`resume_liveness`, no early verdict, only the timeout (THB/1 §4.2)."""
        self._silence.pause(now)

    def resume_liveness(self, now: float) -> None:
        """The reader is reading again: the silence clock restarts from ``now`` at the latest."""
        paused_for = self._silence.resume(now)
        if paused_for is not None and self._rate is not None:
            self._rate.excuse_pause(paused_for, now)

    # -- the ending -------------------------------------------------------------

    def _end(
        self,
        trigger: Trigger,
        code: int,
        reason: str,
        *,
        now: float,
        say: _Say,
        by_peer: bool = False,
        clean: bool = False,
    ) -> ConnectionEnded:
        """End the connection: every ending goes through here, and only once.

        ``code``, ``reason`` and ``by_peer`` say how it ended and ``say`` what
        the peer is told. Once our CLOSE is out nothing more is sent (THB/1
        §5), and unless the peer broke the protocol, the close we started is
        what ended, with the code and reason we sent.
        """
        if self._state is not State.CLOSING:
            if say is not _Say.NOTHING:
                self._queue_close(code, reason, now, keep_data=say is _Say.CLOSE_AFTER_DATA)
        elif trigger is not Trigger.PROTOCOL_ERROR:
            assert self.close_code is not None
            code, reason, by_peer = self.close_code, self.close_reason, False
        self.close_code, self.close_reason, self.closed_by_peer = code, reason, by_peer
        self._state = transition(self._state, trigger)
        ended = self._ended_event = ConnectionEnded(code, reason, by_peer, clean)
        return ended

    def _report_end(self) -> Event | Literal[_NeedData.NEED_DATA]:
        if self._ended_reported or self._ended_event is None:
            return NEED_DATA
        self._ended_reported = True
        return self._ended_event
