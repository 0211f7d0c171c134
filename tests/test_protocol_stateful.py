"""The stateful property test of ``_protocol``: a client and a server HeartbeatProtocol
wired together, driven by hypothesis.

The machine plays the network and the runtime around two sans-IO cores:

* bytes a side queues are flushed at once into the peer's in-flight buffer,
  through a *wire tap* that decodes them and checks what crossed;
* delivery is a rule of its own, in random chunk sizes, so withholding it
  models a silent peer or a slow network;
* the clock moves only by the ``advance`` rule, which stops at every deadline
  on the way and calls ``handle_timeout`` exactly then, as a runtime would;
* a side that reaches a terminal state closes its stream: what is in flight
  to it is lost, and its peer sees end-of-file after the bytes already sent.

The rules move time in multiples of 1/16 s and every configured interval is
a binary fraction; the client PINGs after ``CLIENT_LEAD`` of its send
interval, which the model computes the way the core does, so deadlines are
exact and checked with ``==``. Both sides allow any PING rate
(``max_ping_strikes=None``): delivery bursts after a withheld period would
otherwise be strikes, and the strike rule has its own example tests in
test_rate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from helpers import WireFrame, wire_frame
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from trio_heartbeat import (
    NEED_DATA,
    Config,
    ConnectionEnded,
    DataReceived,
    Event,
    FixedTimeout,
    HandshakeComplete,
    HeartbeatProtocol,
    LocalProtocolError,
    PeerHealthChanged,
    PingReceived,
    PongReceived,
    State,
)
from trio_heartbeat._detectors import FailureDetector
from trio_heartbeat._frames import (
    FrameDecoder,
    FrameType,
    HealthStatus,
    Role,
    decode_close,
    decode_hello,
)
from trio_heartbeat._handshake import CLIENT_LEAD
from trio_heartbeat._pings import ANNOUNCE_MARGIN

TICK = 1 / 16
TERMINAL = (State.CLOSED, State.ERROR)
#: The protocol core remembers this many outstanding PINGs for RTT.
REMEMBERED_PINGS = 32


class MeanGapDetector:
    """A toy adaptive detector: four mean gaps after the last arrival.

    Frames that arrive together have a gap of 0, so it often suggests
    deadlines far too early, and before two arrivals it suggests none at all
    (``inf``): the core's clamp must keep both inside the safe window.
    """

    def __init__(self) -> None:
        self.previous: float | None = None
        self.mean: float | None = None

    def record(self, arrival: float) -> None:
        if self.previous is not None:
            gap = arrival - self.previous
            self.mean = gap if self.mean is None else (3 * self.mean + gap) / 4
        self.previous = arrival

    def suspect_at(self, last_arrival: float, timeout: float) -> float:
        if self.mean is None:
            return float("inf")
        return last_arrival + 4 * self.mean


configs = st.builds(
    Config,
    interval=st.sampled_from([0.25, 0.5, 1.0]),
    timeout=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    max_frame=st.sampled_from([1024, 4096]),
    handshake_timeout=st.sampled_from([2.0, 4.0]),
    close_timeout=st.sampled_from([0.5, 2.0]),
    status=st.sampled_from(HealthStatus),
    max_ping_strikes=st.just(None),
)
side_indexes = st.sampled_from([0, 1])


def control(frames: list[WireFrame]) -> list[FrameType]:
    """The types of the frames other than DATA (which may have been queued earlier)."""
    return [frame_type for frame_type, _ in frames if frame_type is not FrameType.DATA]


def note(label: str) -> None:
    """Count a scenario in hypothesis' statistics (pytest --hypothesis-show-statistics)."""
    event(label)


@dataclass(eq=False)
class Side:
    """One end: its protocol core, its stream, and what the test has seen of it."""

    name: str
    proto: HeartbeatProtocol
    config: Config
    adaptive: bool
    peer: Side = field(init=False, repr=False)

    # The stream into this side.
    inbound: bytearray = field(default_factory=bytearray)
    inbound_total: int = 0  # bytes ever put in flight to this side
    fed_total: int = 0  # bytes fed to this side
    eof_pending: bool = False  # the peer closed its stream: EOF after the bytes in flight
    stream_closed: bool = False  # this side closed its stream (it reached a terminal state)

    # What the wire tap saw this side send.
    tap: FrameDecoder = field(default_factory=lambda: FrameDecoder(0xFFFFFFFF))
    hello_sent: bool = False
    close_sent: int | None = None  # the code of the CLOSE it sent
    last_sent: float = 0.0
    queued: int = 0  # DATA frames queued and not yet flushed
    last_ping: float | None = None
    sent: list[bytes] = field(default_factory=list)  # DATA payloads
    pings: dict[bytes, tuple[float, HealthStatus]] = field(default_factory=dict)
    ping_order: list[bytes] = field(default_factory=list)

    # What this side's events said.
    opened: bool = False
    ended: ConnectionEnded | None = None
    received: list[bytes] = field(default_factory=list)
    ponged: set[bytes] = field(default_factory=set)
    #: PINGs the peer answered while OPEN: opaque -> inbound offset the PONG ends by.
    awaited_pongs: dict[bytes, int] = field(default_factory=dict)
    known_peer_health: HealthStatus | None = None
    health_followup: HealthStatus | None = None

    # The model of the core's clocks.
    last_heard: float | None = None
    #: Where the silence counts from: the last frame, or a later resumption.
    origin: float | None = None
    paused: bool = False
    health_ping_due: bool = False
    initiated: int | None = None  # the code of a close() we called while it could close
    #: (frames received, abort_deadline) when last checked while OPEN and not paused.
    deadline_seen: tuple[int, float] | None = None

    @property
    def send_interval(self) -> float:
        return min(self.config.interval, self.peer.config.timeout / 2)

    @property
    def ping_after(self) -> float:
        """Seconds of silence after which this side PINGs: the client leads the send rule."""
        if self.proto.role is Role.CLIENT:
            return self.send_interval * CLIENT_LEAD
        return self.send_interval

    @property
    def peer_send_interval(self) -> float:
        return min(self.peer.config.interval, self.config.timeout / 2)

    def deliverable(self) -> bool:
        return not self.stream_closed and bool(self.inbound or self.eof_pending)


class WiredPair(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.sides: list[Side] = []
        self.app_ping = False

    # -- setup ---------------------------------------------------------------------

    @initialize(
        client_config=configs,
        server_config=configs,
        adaptive=st.tuples(st.booleans(), st.booleans()),
    )
    def start(
        self, client_config: Config, server_config: Config, adaptive: tuple[bool, bool]
    ) -> None:
        sides = []
        for name, role, config, smart in (
            ("client", Role.CLIENT, client_config, adaptive[0]),
            ("server", Role.SERVER, server_config, adaptive[1]),
        ):
            detector: FailureDetector = MeanGapDetector() if smart else FixedTimeout()
            proto = HeartbeatProtocol(role, config, now=0.0, detector=detector)
            sides.append(Side(name, proto, config, smart))
        client, server = sides
        client.peer, server.peer = server, client
        self.sides = sides
        self.flush(server)  # the server's HELLO goes out at once
        assert server.hello_sent
        assert not client.hello_sent

    # -- plumbing -------------------------------------------------------------------

    def flush(self, side: Side) -> list[WireFrame]:
        """Put what ``side`` queued on the wire; close its stream once it is terminal."""
        out = side.proto.data_to_send()
        if side.stream_closed:
            assert out == b"", f"{side.name} queued bytes after it ended"
            return []
        frames = self.tap(side, out) if out else []
        peer = side.peer
        if out and not peer.stream_closed:
            peer.inbound += out
            peer.inbound_total += len(out)
        if side.proto.state in TERMINAL:
            side.queued = 0  # DATA queued when the connection was given up is dropped
            side.stream_closed = True
            side.inbound.clear()  # lost: nobody reads this stream any more
            side.eof_pending = False
            peer.eof_pending = True
        return frames

    def tap(self, side: Side, out: bytes) -> list[WireFrame]:
        """Decode and check the frames ``side`` just sent."""
        side.tap.receive_data(out)
        frames = []
        while found := side.tap.frames():
            frames += [wire_frame(frame) for frame in found]
        assert side.tap.buffered == 0, "only whole frames are queued"
        health = side.proto.health
        data_seen = False
        for frame_type, payload in frames:
            assert side.close_sent is None, f"{side.name} sent {frame_type.name} after CLOSE"
            if frame_type is not FrameType.DATA:
                # Control frames go out the moment they are queued; DATA may wait
                # (its send time is noted by the send_data rule).
                side.last_sent = self.now
            if frame_type in (FrameType.PING, FrameType.PONG):
                assert not data_seen, "heartbeats go ahead of queued DATA"
            data_seen = data_seen or frame_type is FrameType.DATA
            if frame_type is FrameType.HELLO:
                assert not side.hello_sent
                side.hello_sent = True
                assert decode_hello(payload).status is health
                continue
            if frame_type is FrameType.CLOSE:
                side.close_sent = decode_close(payload)[0]
                if side.proto.state is not State.ERROR:
                    # Closing (or answering a CLOSE) is orderly: DATA the application
                    # queued goes out first. Only giving up drops it.
                    assert side.queued == 0, "queued DATA dropped by an orderly close"
                continue
            # Only an OPEN side sends DATA, PING and PONG.
            assert side.hello_sent
            assert side.proto.peer is not None
            if frame_type is FrameType.DATA:
                side.sent.append(payload)
                side.queued -= 1
                continue
            opaque, status = payload[:8], HealthStatus(payload[8])
            assert status is health, "PING and PONG carry the sender's current health"
            if frame_type is FrameType.PONG:
                assert opaque in side.peer.pings, "a PONG echoes the opaque bytes of a PING"
                side.peer.awaited_pongs[opaque] = side.peer.inbound_total + len(out)
                continue
            assert opaque not in side.pings
            if not self.app_ping and side.last_ping is not None:
                # The rate rule: the core never pings faster. Sender and receiver
                # both compare ``now >= last + S/2`` (see
                # test_a_client_health_ping_at_the_earliest_moment_is_no_strike).
                assert self.now >= side.last_ping + side.send_interval / 2
            side.pings[opaque] = (self.now, status)
            side.ping_order.append(opaque)
            side.last_ping = self.now
            side.health_ping_due = False
        return frames

    def drain(self, side: Side) -> list[WireFrame]:
        """Take every event from ``side``, check each, then flush what it queued."""
        to_answer: list[bytes] = []
        while (event := side.proto.next_event()) is not NEED_DATA:
            assert isinstance(event, Event)
            self.check_event(side, event, to_answer)
        frames = self.flush(side)
        # The echo rule: every PING taken while OPEN is answered, in order, at once.
        assert [p[:8] for t, p in frames if t is FrameType.PONG] == to_answer
        return frames

    def check_handshake_done(self, side: Side) -> None:
        # No DATA, PING or PONG before the handshake: either this side is OPEN, or it
        # closed after both HELLOs crossed and the peer's frames were in flight.
        if side.opened:
            return
        peer_hello = side.proto.peer
        assert side.proto.state is State.CLOSING
        assert peer_hello is not None
        assert side.hello_sent
        note("frames after a HELLO that crossed our CLOSE")

    def check_event(self, side: Side, event: Event, to_answer: list[bytes]) -> None:
        proto = side.proto
        assert side.ended is None, "ConnectionEnded is the last event"
        if side.known_peer_health is None and proto.peer is not None and not side.opened:
            # A HELLO that crossed our CLOSE makes no HandshakeComplete; its status counts.
            side.known_peer_health = proto.peer.status
        if side.health_followup is not None:
            assert isinstance(event, (PingReceived, PongReceived))
            assert event.status is side.health_followup
            side.health_followup = None
        if isinstance(event, HandshakeComplete):
            assert not side.opened
            side.opened = True
            assert proto.state is State.OPEN
            assert event.send_interval == proto.send_interval == side.send_interval
            assert proto.peer_send_interval == side.peer_send_interval
            assert event.peer.nonce == side.peer.proto.nonce
            side.known_peer_health = event.peer.status
        elif isinstance(event, DataReceived):
            self.check_handshake_done(side)
            side.received.append(event.data)
            assert side.received == side.peer.sent[: len(side.received)], "DATA in order"
        elif isinstance(event, PingReceived):
            self.check_handshake_done(side)
            assert event.status is side.peer.pings[event.opaque][1]
            assert event.status is side.known_peer_health is proto.peer_health
            if proto.state is State.OPEN:
                to_answer.append(event.opaque)
        elif isinstance(event, PongReceived):
            self.check_handshake_done(side)
            sent_at, _ = side.pings[event.opaque]
            assert event.status is side.known_peer_health is proto.peer_health
            first = event.opaque not in side.ponged
            side.ponged.add(event.opaque)
            later = len(side.ping_order) - side.ping_order.index(event.opaque) - 1
            if first and later < REMEMBERED_PINGS:
                assert event.rtt is not None
            if event.rtt is not None:
                note("RTT measured")
                assert event.rtt == proto.rtt == self.now - sent_at
            side.awaited_pongs.pop(event.opaque, None)
        elif isinstance(event, PeerHealthChanged):
            assert event.previous is side.known_peer_health
            assert event.status is not event.previous
            note("peer health changed")
            side.known_peer_health = side.health_followup = event.status
        else:
            assert isinstance(event, ConnectionEnded)
            assert proto.state in TERMINAL
            assert event.code != 1006, "every stream end follows a CLOSE here"
            side.ended = event
            how = "by peer" if event.by_peer else "clean" if event.clean else "unclean"
            note(f"{side.name} ended {how} in {proto.state.name} with {event.code}")
            if event.by_peer:
                assert event.clean
                assert event.code == side.peer.close_sent, "the answer carries the same code"
            elif event.clean:
                assert event.code == side.initiated == side.close_sent
            else:
                assert event.code in (1011, side.initiated)

    def deliver(self, side: Side, size: int) -> None:
        proto = side.proto
        frames_before = proto.counters.frames_in
        if side.inbound:
            chunk = bytes(side.inbound[:size])
            del side.inbound[:size]
            side.fed_total += len(chunk)
            proto.receive_data(chunk, self.now)
        else:
            side.eof_pending = False
            proto.receive_data(b"", self.now)
        self.drain(side)
        if proto.counters.frames_in > frames_before:
            side.last_heard = side.origin = self.now
        # Every PONG the peer put on the wire ahead of these bytes has been seen.
        for opaque, offset in side.awaited_pongs.items():
            assert offset > side.fed_total, f"PONG for {opaque.hex()} never reported"

    def fire(self, side: Side) -> None:
        """Call handle_timeout at ``side``'s deadline, as a runtime would, and check why."""
        proto = side.proto
        state = proto.state
        aborting = proto.abort_deadline <= self.now
        if state is State.OPEN and aborting:
            # The silence rule: declared dead exactly at the detector's clamped
            # deadline, never before twice the peer's send interval, never after
            # the own timeout.
            assert proto.last_received == side.last_heard
            last = side.origin
            assert last is not None
            assert self.now == proto.abort_deadline
            if side.paused:
                note("silent peer declared dead at the timeout while we could not read")
                assert self.now == last + side.config.timeout
            elif side.adaptive:
                note("silent peer declared dead by the adaptive detector")
                assert last + 2 * side.peer_send_interval <= self.now <= last + side.config.timeout
            else:
                note("silent peer declared dead by the fixed timeout")
                assert self.now == last + side.config.timeout
        proto.handle_timeout(self.now)
        frames = self.drain(side)
        if not aborting:
            assert state is State.OPEN
            assert control(frames) == [FrameType.PING]
        elif state is State.OPEN:
            assert side.ended == ConnectionEnded(
                1011, "heartbeat timeout: peer silent", False, False
            )
            assert side.close_sent == 1011
        elif state is State.HANDSHAKE:
            assert side.ended == ConnectionEnded(1011, "handshake timeout", False, False)
            assert side.close_sent == 1011
        else:
            assert state is State.CLOSING
            assert side.ended == ConnectionEnded(side.initiated or 0, "bye", False, False)
            assert proto.state is State.CLOSED

    def settle(self) -> None:
        """Fire every deadline that is due now (a PING can make another one due)."""
        for _ in range(100):
            due = [side for side in self.sides if side.proto.next_deadline <= self.now]
            if not due:
                return
            self.fire(due[0])
        raise AssertionError("deadlines keep firing at the same moment")

    def deliver_everything(self) -> None:
        while deliverable := [side for side in self.sides if side.deliverable()]:
            for side in deliverable:
                self.deliver(side, len(side.inbound))
            self.settle()

    def do_close(self, side: Side, code: int) -> None:
        could_close = side.proto.state in (State.HANDSHAKE, State.OPEN)
        side.proto.close(code, "bye", now=self.now)
        if could_close:
            side.initiated = code
            assert side.proto.state is State.CLOSING
        self.flush(side)
        if could_close:
            assert side.close_sent == code

    # -- rules ----------------------------------------------------------------------

    @precondition(lambda self: any(side.deliverable() for side in self.sides))
    @rule(index=side_indexes, size=st.integers(min_value=1, max_value=200))
    def deliver_some(self, index: int, size: int) -> None:
        side = self.sides[index]
        if not side.deliverable():
            side = side.peer
        self.deliver(side, size)
        self.settle()

    @rule()
    def deliver_all(self) -> None:
        self.deliver_everything()

    @rule(ticks=st.integers(min_value=1, max_value=48))
    def advance(self, ticks: int) -> None:
        target = self.now + ticks * TICK
        while (due := min(side.proto.next_deadline for side in self.sides)) <= target:
            assert due > self.now
            self.now = due
            self.settle()
        self.now = target

    @rule(index=side_indexes, payload=st.binary(max_size=64), flush=st.booleans())
    def send_data(self, index: int, payload: bytes, flush: bool) -> None:
        """Queue DATA; the writer flushes it at once or later (``flush_queued``)."""
        side = self.sides[index]
        if side.proto.state is State.OPEN:
            side.proto.send_data(payload, self.now)
            side.last_sent = self.now
            side.queued += 1
            if flush:
                frames = self.flush(side)
                assert frames[-1] == (FrameType.DATA, payload)
                assert [t for t, _ in frames] == [FrameType.DATA] * len(frames)
        else:
            try:
                side.proto.send_data(payload, self.now)
            except LocalProtocolError as exc:
                assert exc.code == 1002
            else:
                raise AssertionError("send_data succeeded while not OPEN")
            assert control(self.flush(side)) == []

    @precondition(lambda self: any(side.queued for side in self.sides))
    @rule()
    def flush_queued(self) -> None:
        for side in self.sides:
            self.flush(side)

    @precondition(lambda self: any(side.proto.state is State.OPEN for side in self.sides))
    @rule(index=side_indexes)
    def send_too_big(self, index: int) -> None:
        side = self.sides[index]
        if side.proto.state is not State.OPEN:
            side = side.peer
        try:
            side.proto.send_data(bytes(side.peer.config.max_frame + 1), self.now)
        except LocalProtocolError as exc:
            assert exc.code == 1009
        else:
            raise AssertionError("a DATA over the peer's max_frame was accepted")
        assert control(self.flush(side)) == []

    @rule(index=side_indexes)
    def send_ping(self, index: int) -> None:
        side = self.sides[index]
        if side.proto.state is State.OPEN:
            self.app_ping = True
            try:
                opaque = side.proto.send_ping(self.now)
                frames = self.flush(side)
            finally:
                self.app_ping = False
            assert control(frames) == [FrameType.PING]
            assert frames[0] == (FrameType.PING, opaque + bytes((side.proto.health,)))
        else:
            try:
                side.proto.send_ping(self.now)
            except LocalProtocolError:
                pass
            else:
                raise AssertionError("send_ping succeeded while not OPEN")
        self.settle()

    @rule(index=side_indexes, status=st.sampled_from(HealthStatus))
    def set_health(self, index: int, status: HealthStatus) -> None:
        side = self.sides[index]
        proto = side.proto
        changed = status is not proto.health
        proto.set_health(status, self.now)
        assert proto.health is status
        assert control(self.flush(side)) == []
        if changed and side.hello_sent and proto.state in (State.HANDSHAKE, State.OPEN):
            side.health_ping_due = True
        if changed and proto.state is State.OPEN:
            # At once if the rate rule allows it, else an eighth of an interval after it
            # does; never later than the send rule.
            margin = proto.send_interval * ANNOUNCE_MARGIN
            allowed = max(proto.earliest_ping + margin, self.now)
            assert proto.ping_deadline == min(allowed, side.last_sent + side.ping_after)
        self.settle()

    @rule(index=side_indexes, code=st.sampled_from([1000, 1001, 4000, 4001]))
    def close(self, index: int, code: int) -> None:
        self.do_close(self.sides[index], code)
        self.settle()

    @rule(index=side_indexes)
    def pause(self, index: int) -> None:
        side = self.sides[index]
        side.proto.pause_liveness(self.now)
        side.paused = True
        if side.proto.state is State.OPEN:
            # No early verdict while we cannot read: the timeout alone.
            expected = float("inf") if side.origin is None else side.origin + side.config.timeout
            assert side.proto.abort_deadline == side.proto.liveness_deadline == expected

    @rule(index=side_indexes)
    def resume(self, index: int) -> None:
        side = self.sides[index]
        side.proto.resume_liveness(self.now)
        if side.paused and side.origin is not None:
            side.origin = max(side.origin, self.now)
        side.paused = False
        self.settle()

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def deadlines_are_in_the_future(self) -> None:
        for side in self.sides:
            proto = side.proto
            if proto.state in TERMINAL:
                assert side.ended is not None, "the end is reported at once"
                assert proto.next_deadline == float("inf")
            else:
                assert proto.next_deadline > self.now

    @invariant()
    def send_rule(self) -> None:
        for side in self.sides:
            proto = side.proto
            if proto.state is not State.OPEN:
                assert proto.ping_deadline == float("inf")
                continue
            assert proto.last_sent == side.last_sent
            regular = side.last_sent + side.ping_after
            if side.health_ping_due:
                assert proto.earliest_ping <= proto.ping_deadline <= regular
            else:
                assert proto.ping_deadline == regular
            assert self.now < regular

    @invariant()
    def liveness_deadline_is_clamped_and_never_moves_back(self) -> None:
        for side in self.sides:
            proto = side.proto
            if proto.state is not State.OPEN:
                side.deadline_seen = None
                continue
            assert proto.last_received == side.last_heard
            last = side.origin
            assert last is not None
            deadline = proto.abort_deadline
            if side.paused:
                assert deadline == last + side.config.timeout
                side.deadline_seen = None
                continue
            if side.adaptive:
                assert last + 2 * side.peer_send_interval <= deadline <= last + side.config.timeout
            else:
                assert deadline == last + side.config.timeout
            heard = proto.counters.frames_in
            if side.deadline_seen is not None and side.deadline_seen[0] == heard:
                assert deadline >= side.deadline_seen[1], "deadline moved backwards"
            side.deadline_seen = (heard, deadline)

    # -- the end ------------------------------------------------------------------------

    def teardown(self) -> None:
        if not self.sides:
            return
        # A prompt network, then an orderly close of whatever is still open, then
        # time runs until both sides are done.
        self.deliver_everything()
        for side in self.sides:
            if side.proto.state is State.OPEN:
                # Unflushed DATA on both sides when the CLOSE is sent and answered:
                # it must go out ahead of either CLOSE, and arrive.
                side.proto.send_data(b"last words", self.now)
                side.last_sent = self.now
                side.queued += 1
        for side in self.sides:
            if side.proto.state in (State.HANDSHAKE, State.OPEN):
                self.do_close(side, 1000)
                self.deliver_everything()
        for _ in range(20):
            if all(side.stream_closed for side in self.sides):
                break
            self.now = min(side.proto.next_deadline for side in self.sides)
            self.settle()
            self.deliver_everything()
        note(f"final states {self.sides[0].proto.state.name}/{self.sides[1].proto.state.name}")
        for side in self.sides:
            peer = side.peer
            ended = side.ended
            assert side.stream_closed
            assert ended is not None
            assert side.proto.close_code == ended.code
            # The CLOSE on the wire carries the code the side ended with (the answer too).
            assert side.close_sent in (None, ended.code)
            if ended.by_peer:
                # The close handshake: both CLOSED, with the code the first CLOSE carried.
                assert side.proto.state is State.CLOSED
                assert ended.code == peer.proto.close_code == peer.close_sent
            if ended.clean:
                # Everything the peer sent before its CLOSE arrived, PONGs included.
                assert side.received == peer.sent
                assert not side.awaited_pongs
            if side.proto.state is State.ERROR:
                assert ended.code == 1011


WiredPair.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestWiredPair = WiredPair.TestCase
