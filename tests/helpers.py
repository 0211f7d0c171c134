"""Shared test helpers: a raw THB/1 peer that speaks bytes, servers on loopback, resource counts.

The raw peer has no runtime behind it: it reads and writes frames built with
the codec's own encoders, so a test can say exactly what goes on the wire (a
flood of PINGs, a header with no payload, silence) and read exactly what the
server answers.

For connection tests there is also :class:`ScriptedPeer`, a raw peer of either
role that records the virtual time each frame arrives, :class:`WrappedStream`
(record ``aclose``, delay delivery, inject checkpoints, break on demand) and
:func:`connection_pair`, both ends of a connection over memory streams.

Helpers shared by several test modules live here and nowhere else (no test
module imports another), in sections by the layer they serve: the sans-IO core
wired by hand (:func:`open_pair`, :func:`feed`, :func:`expect_error`,
:func:`run_prompt_pair`); one connection over memory streams with a scripted
peer (:func:`stream_and_peer`, :func:`served_connection`, :func:`run_body`, a
:class:`StallingStream` that leaves a write half done, and ways to watch the
writer task); and reconnecting clients on the memory network
(:class:`Recorder`, :func:`reconnecting`, :func:`close_first_with`).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import trio
import trio.testing
from trio.lowlevel import Task
from vectors import SERVER_NONCE

from trio_heartbeat import Connection, Server, serve_tcp
from trio_heartbeat._config import Config
from trio_heartbeat._connection import EventListener
from trio_heartbeat._errors import ConnectionClosed, RemoteProtocolError
from trio_heartbeat._events import NEED_DATA, Event, HandshakeComplete, PingReceived, PongReceived
from trio_heartbeat._frames import (
    HEADER_SIZE,
    Close,
    CloseCode,
    Frame,
    FrameDecoder,
    FrameType,
    HealthStatus,
    Hello,
    Ping,
    Role,
    decode_close,
    decode_hello,
    encode_close,
    encode_data,
    encode_hello,
    encode_ping,
    encode_pong,
)
from trio_heartbeat._handshake import compute_auth
from trio_heartbeat._options import ConnectionOptions
from trio_heartbeat._protocol import HeartbeatProtocol
from trio_heartbeat._reconnect_events import (
    AttemptFailed,
    AttemptStarted,
    BackingOff,
    Connected,
    Disconnected,
    Stopped,
    SupervisorEvent,
)
from trio_heartbeat._state import State
from trio_heartbeat._stream_connection import open_stream_connection
from trio_heartbeat._supervisor import open_reconnecting_client
from trio_heartbeat._writer import _TASK_NAME as _WRITER_NAME
from trio_heartbeat.testing import MemoryNetwork

LOOPBACK = "127.0.0.1"
#: The nonce every raw client puts in its HELLO.
CLIENT_NONCE = bytes(range(16, 32))


class WireFrame(NamedTuple):
    """A decoded frame as the wire has it: its type and its payload bytes.

    The codec hands out typed frames; tests that script raw peers compare
    types and payloads byte for byte, so the peers here keep both.
    """

    type: FrameType
    payload: bytes


def wire_frame(frame: Frame) -> WireFrame:
    """``frame`` (as the codec decodes it) back as its wire type and payload."""
    if type(frame) is bytes:
        return WireFrame(FrameType.DATA, frame)
    if isinstance(frame, Hello):
        return WireFrame(FrameType.HELLO, encode_hello(frame)[HEADER_SIZE:])
    if isinstance(frame, Close):
        return WireFrame(FrameType.CLOSE, encode_close(frame.code, frame.reason)[HEADER_SIZE:])
    assert not isinstance(frame, bytes)
    encode = encode_ping if isinstance(frame, Ping) else encode_pong
    kind = FrameType.PING if isinstance(frame, Ping) else FrameType.PONG
    return WireFrame(kind, encode(frame.opaque, frame.status)[HEADER_SIZE:])


def client_hello(
    *,
    interval_ms: int = 1000,
    timeout_ms: int = 3000,
    max_frame: int = 1 << 20,
    instance_id: str = "",
    auth: bytes = b"",
    status: HealthStatus = HealthStatus.SERVING,
    nonce: bytes = CLIENT_NONCE,
) -> bytes:
    """A whole client HELLO frame, header included."""
    return encode_hello(
        Hello(
            role=Role.CLIENT,
            status=status,
            interval_ms=interval_ms,
            timeout_ms=timeout_ms,
            max_frame=max_frame,
            nonce=nonce,
            instance_id=instance_id,
            auth=auth,
        )
    )


class RawPeer:
    """A THB/1 client made of bytes over any Trio stream; it does only what the test says.

    Every frame it receives is kept in :attr:`frames`. A transport that ends
    or resets shows up as ``None`` from :meth:`receive_frame`, never as an
    exception, so a test can assert on what arrived before the end.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.frames: list[WireFrame] = []
        self.server_hello: Hello | None = None
        self.close_reason = ""
        self._decoder = FrameDecoder(max_frame=0xFFFFFFFF)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_frame(self) -> WireFrame | None:
        """The next whole frame, or ``None`` once the stream has ended (EOF or reset)."""
        while True:
            decoded = self._decoder.next_frame()
            if decoded is not None:
                frame = wire_frame(decoded)
                self.frames.append(frame)
                return frame
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self._decoder.receive_data(data)

    async def read_hello(self) -> Hello:
        """Read the server's HELLO; fails the test if anything else comes first."""
        frame = await self.receive_frame()
        assert frame is not None, "stream ended before the server's HELLO"
        assert frame.type is FrameType.HELLO, frame
        self.server_hello = decode_hello(frame.payload)
        return self.server_hello

    async def handshake(
        self,
        *,
        instance_id: str = "",
        secret: bytes | None = None,
        interval_ms: int = 1000,
        timeout_ms: int = 3000,
        status: HealthStatus = HealthStatus.SERVING,
    ) -> Hello:
        """Read the server's HELLO and answer with ours (signed when ``secret`` is given)."""
        hello = await self.read_hello()
        auth = b""
        if secret is not None:
            auth = compute_auth(secret, hello.nonce, CLIENT_NONCE, instance_id)
        await self.send(
            client_hello(
                interval_ms=interval_ms,
                timeout_ms=timeout_ms,
                instance_id=instance_id,
                auth=auth,
                status=status,
            )
        )
        return hello

    async def read_close(self, *, answer_pings: bool = True) -> int:
        """Read frames until a CLOSE and return its code (its reason goes to :attr:`close_reason`).

        With ``answer_pings`` every PING on the way gets its PONG, so the
        server keeps hearing from us; without, we are a silent peer.
        """
        while True:
            frame = await self.receive_frame()
            assert frame is not None, f"stream ended without a CLOSE after {self.frames}"
            if frame.type is FrameType.CLOSE:
                code, self.close_reason = decode_close(frame.payload)
                return code
            if frame.type is FrameType.PING and answer_pings:
                # The server may have hung up meanwhile; its CLOSE may still be buffered.
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.send(encode_pong(frame.payload[:8], HealthStatus.SERVING))

    async def read_until_end(self) -> list[WireFrame]:
        """Read until the stream ends; return the frames that arrived meanwhile."""
        start = len(self.frames)
        while await self.receive_frame() is not None:
            pass
        return self.frames[start:]

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@asynccontextmanager
async def open_raw_peer(port: int) -> AsyncIterator[RawPeer]:
    """A :class:`RawPeer` over a fresh loopback TCP connection, closed on the way out."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    peer = RawPeer(stream)
    try:
        yield peer
    finally:
        await peer.aclose()


async def echo(conn: Connection) -> None:
    """Send every message back. ``b"close"`` ends the handler (so the server closes
    with 1000) and ``b"raise"`` makes it fail (so the server closes with 1001)."""
    async for message in conn:
        if message == b"close":
            return
        if message == b"raise":
            raise RuntimeError("the handler was asked to fail")
        await conn.send(message)


async def assert_echo(conn: Connection, payload: bytes = b"still served") -> None:
    """One round trip through an :func:`echo` server, with a generous bound."""
    await conn.send(payload)
    with trio.fail_after(10):
        assert await conn.receive() == payload


@asynccontextmanager
async def serving(handler: Any = echo, **kwargs: Any) -> AsyncIterator[Server]:
    """Run :func:`serve_tcp` on a free loopback port for the block; cancelled on the way out."""
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(serve_tcp, handler, 0, host=LOOPBACK, **kwargs)
        )
        yield server
        nursery.cancel_scope.cancel()


async def wait_empty(server: Server, bound: float = 10) -> None:
    """Wait (within a generous bound) until the server holds no connection at all."""
    with trio.fail_after(bound):
        await server.registry.wait_until(lambda registry: len(registry) == 0)
        # A connection still in its handshake is counted but never listed, and
        # nothing signals its end: poll for it.
        while server.statistics().active:  # noqa: ASYNC110
            await trio.sleep(0.001)


def open_fds() -> int:
    """How many file descriptors this process has open (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def living_tasks() -> int:
    """How many Trio tasks exist right now."""
    return trio.lowlevel.current_statistics().tasks_living


# -- scripted peers, wrapped streams, connection pairs (connection tests) ------


#: The opaque bytes of the PING a scripted server sends as its verdict on a client's HELLO.
VERDICT = bytes(8)


def opaque(number: int) -> bytes:
    """Eight opaque PING bytes that spell ``number``."""
    return struct.pack(">Q", number)


def hello_frame(
    role: Role,
    *,
    interval: float = 1.0,
    timeout: float = 3.0,
    max_frame: int = 1 << 20,
    status: HealthStatus = HealthStatus.SERVING,
    instance_id: str = "",
    nonce: bytes = bytes(16),
    auth: bytes = b"",
) -> bytes:
    """A whole HELLO frame, header included; times in seconds."""
    return encode_hello(
        Hello(
            role=role,
            status=status,
            interval_ms=round(interval * 1000),
            timeout_ms=round(timeout * 1000),
            max_frame=max_frame,
            nonce=nonce,
            instance_id=instance_id,
            auth=auth,
        )
    )


@dataclass(frozen=True, slots=True)
class TimedFrame:
    """One frame a :class:`RawPeer` received, and the virtual time it arrived."""

    at: float
    type: FrameType
    payload: bytes

    @property
    def close_code(self) -> int:
        assert self.type is FrameType.CLOSE
        return decode_close(self.payload)[0]

    @property
    def close_reason(self) -> str:
        assert self.type is FrameType.CLOSE
        return decode_close(self.payload)[1]

    @property
    def opaque(self) -> bytes:
        assert self.type in (FrameType.PING, FrameType.PONG)
        return self.payload[:8]

    @property
    def status(self) -> HealthStatus:
        assert self.type in (FrameType.PING, FrameType.PONG)
        return HealthStatus(self.payload[8])

    @property
    def hello(self) -> Hello:
        assert self.type is FrameType.HELLO
        return decode_hello(self.payload)


class ScriptedPeer:
    """The far end of a stream, driven by hand with the frame codec.

    ``role`` is the role the peer plays (the opposite of the connection under
    test). Every frame received is appended to :attr:`frames` with its arrival
    time, but the PONG that answers a server's verdict (part of the handshake,
    see :meth:`send_verdict`); end-of-file, or a transport that fails, sets
    :attr:`eof_at`.

    >>> async def scenario(stream: trio.abc.Stream) -> None:  # doctest: +SKIP
    ...     peer = ScriptedPeer(stream)
    ...     await peer.handshake()
    ...     await peer.send_data(b"hi")
    ...     frames = await peer.drain()
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        role: Role = Role.SERVER,
        *,
        interval: float = 1.0,
        timeout: float = 3.0,
        max_frame: int = 1 << 20,
        status: HealthStatus = HealthStatus.SERVING,
    ) -> None:
        self.stream = stream
        self.role = role
        self.interval = interval
        self.timeout = timeout
        self.max_frame = max_frame
        self.status = status
        self.frames: list[TimedFrame] = []
        self.eof_at: float | None = None
        self._decoder = FrameDecoder(max_frame=0xFFFFFFFF)
        self._next_opaque = 0
        self._send_lock = trio.StrictFIFOLock()

    # -- sending ------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Write raw bytes; safe to call from several tasks (say a script and :meth:`serve`)."""
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send_hello(self, **overrides: object) -> None:
        values: dict[str, object] = {
            "interval": self.interval,
            "timeout": self.timeout,
            "max_frame": self.max_frame,
            "status": self.status,
        }
        values.update(overrides)
        await self.send(hello_frame(self.role, **values))  # type: ignore[arg-type]

    async def send_data(self, payload: bytes) -> None:
        await self.send(encode_data(payload))

    async def send_ping(
        self, data: bytes | None = None, status: HealthStatus | None = None
    ) -> bytes:
        """Send a PING and return its opaque bytes (numbered 1, 2, ... by default)."""
        if data is None:
            self._next_opaque += 1
            data = opaque(self._next_opaque)
        await self.send(encode_ping(data, self.status if status is None else status))
        return data

    async def send_pong(self, data: bytes, status: HealthStatus | None = None) -> None:
        await self.send(encode_pong(data, self.status if status is None else status))

    async def send_close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        await self.send(encode_close(code, reason))

    # -- receiving ----------------------------------------------------------

    async def receive_frame(self) -> TimedFrame | None:
        """The next frame, or ``None`` once the stream has ended (EOF or failure)."""
        while True:
            decoded = self._decoder.next_frame()
            if decoded is not None:
                frame = wire_frame(decoded)
                timed = TimedFrame(trio.current_time(), frame.type, frame.payload)
                if not (frame.type is FrameType.PONG and frame.payload[:8] == VERDICT):
                    self.frames.append(timed)  # the verdict's PONG is the handshake's
                return timed
            if self.eof_at is not None:
                return None
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.eof_at = trio.current_time()
                return None
            self._decoder.receive_data(data)

    async def expect(self, frame_type: FrameType) -> TimedFrame:
        """The next frame, which must be of ``frame_type``."""
        frame = await self.receive_frame()
        assert frame is not None, f"expected {frame_type.name}, got end of stream"
        assert frame.type is frame_type, f"expected {frame_type.name}, got {frame}"
        return frame

    async def handshake(self) -> TimedFrame:
        """Exchange HELLOs in this peer's role; returns the other side's HELLO.

        As a server, it then gives its verdict on the client's HELLO as our
        server does (THB/1 §3.1): a PING, whose PONG it takes, so that the
        client's block opens and the frames that follow are the test's own.
        The verdict's opaque bytes are all zero; :meth:`send_ping` still
        numbers its PINGs from 1.
        """
        if self.role is Role.SERVER:
            await self.send_hello()
            hello = await self.expect(FrameType.HELLO)
            await self.send_verdict()
            return hello
        hello = await self.expect(FrameType.HELLO)
        await self.send_hello()
        return hello

    async def send_verdict(self) -> None:
        """As a server, accept the client's HELLO: PING, and take the PONG that answers."""
        await self.send_ping(VERDICT)
        await self.expect(FrameType.PONG)

    async def drain(self) -> list[TimedFrame]:
        """Read until the stream ends; returns every frame received so far."""
        while await self.receive_frame() is not None:
            pass
        return self.frames

    async def serve(self) -> None:
        """Behave like a minimal well-mannered peer until the stream ends:
        echo DATA, answer PING with PONG, answer CLOSE with CLOSE, and as a
        server, PING a client's HELLO (the verdict, as our server does). Once a
        write fails, it only reads, to the end."""
        closing = False
        while (frame := await self.receive_frame()) is not None:
            if closing:
                continue
            answer = b""
            if frame.type is FrameType.HELLO and self.role is Role.SERVER:
                answer = encode_ping(VERDICT, self.status)
            elif frame.type is FrameType.DATA:
                answer = encode_data(frame.payload)
            elif frame.type is FrameType.PING:
                answer = encode_pong(frame.opaque, self.status)
            elif frame.type is FrameType.CLOSE:
                closing = True
                answer = encode_close(frame.close_code, frame.close_reason)
            if answer:
                try:
                    await self.send(answer)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    closing = True  # the other side hung up: read what is left

    def of_type(self, frame_type: FrameType) -> list[TimedFrame]:
        """The frames received so far of one type."""
        return [frame for frame in self.frames if frame.type is frame_type]

    def times(self, frame_type: FrameType) -> list[float]:
        """Arrival times of the frames of one type."""
        return [frame.at for frame in self.of_type(frame_type)]


class WrappedStream(trio.abc.Stream):
    """A stream around another, for fault injection and bookkeeping.

    ``receive_delay`` sleeps after each read before handing the data over (a
    slow link); ``checkpoints`` adds a checkpoint before and after every
    operation, so a cancellation sweep hits more places. :meth:`break_now`
    makes the current and every later operation raise
    :class:`trio.BrokenResourceError` (a reset). ``aclose_calls`` counts
    closes; ``send_interrupted`` is set when a ``send_all`` was cancelled
    partway (the bytes may be lost).
    """

    def __init__(
        self,
        inner: trio.abc.Stream,
        *,
        receive_delay: float = 0.0,
        checkpoints: bool = False,
    ) -> None:
        self.inner = inner
        self.receive_delay = receive_delay
        self.checkpoints = checkpoints
        self.aclose_calls = 0
        self.send_interrupted = False
        self.sent = bytearray()
        self._broken = False
        self._scopes: set[trio.CancelScope] = set()

    @property
    def closed(self) -> bool:
        return self.aclose_calls > 0

    def break_now(self) -> None:
        """Fail every pending and future operation with BrokenResourceError."""
        self._broken = True
        for scope in self._scopes:
            scope.cancel()

    async def _run(self, operation: Callable[[], Awaitable[object]]) -> object:
        if self._broken:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("connection reset (injected)")
        if self.checkpoints:
            await trio.lowlevel.checkpoint()
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                result = await operation()
            finally:
                self._scopes.discard(scope)
        if scope.cancelled_caught or self._broken:
            raise trio.BrokenResourceError("connection reset (injected)")
        if self.checkpoints:
            await trio.lowlevel.checkpoint()
        return result

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async def operation() -> None:
            await self.inner.send_all(data)
            self.sent += data

        try:
            await self._run(operation)
        except trio.Cancelled:
            self.send_interrupted = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        async def operation() -> bytes | bytearray:
            data = await self.inner.receive_some(max_bytes)
            if self.receive_delay and data:
                await trio.sleep(self.receive_delay)
            return data

        result = await self._run(operation)
        assert isinstance(result, (bytes, bytearray))
        return result

    async def aclose(self) -> None:
        self.aclose_calls += 1
        await self.inner.aclose()


@dataclass(slots=True)
class Pair:
    """Both ends of a :func:`connection_pair`."""

    client: Connection
    server: Connection
    client_stream: WrappedStream
    server_stream: WrappedStream


@asynccontextmanager
async def connection_pair(
    *,
    client_config: Config | None = None,
    server_config: Config | None = None,
    client_options: ConnectionOptions | None = None,
    server_options: ConnectionOptions | None = None,
    client_listeners: list[EventListener] | None = None,
    server_listeners: list[EventListener] | None = None,
    receive_delay: float = 0.0,
) -> AsyncIterator[Pair]:
    """Run a client and a server connection over a memory stream pair.

    The server side stays open until its peer closes; when the block exits,
    the client closes (CLOSE 1000) and both ends wind down. ``receive_delay``
    delays delivery in both directions (see :class:`WrappedStream`).
    """
    raw_client, raw_server = trio.testing.memory_stream_pair()
    client_stream = WrappedStream(raw_client, receive_delay=receive_delay)
    server_stream = WrappedStream(raw_server, receive_delay=receive_delay)
    server_ready: list[Connection] = []
    ready = trio.Event()

    async def run_server() -> None:
        async with open_stream_connection(
            server_stream,
            role=Role.SERVER,
            config=server_config,
            options=server_options,
            listeners=server_listeners,
        ) as conn:
            server_ready.append(conn)
            ready.set()
            await conn.wait_closed()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_server)
        async with open_stream_connection(
            client_stream,
            role=Role.CLIENT,
            config=client_config,
            options=client_options,
            listeners=client_listeners,
        ) as client:
            await ready.wait()
            yield Pair(client, server_ready[0], client_stream, server_stream)


# -- the sans-IO core, wired by hand (core tests) --------------------------------------


def state(protocol: HeartbeatProtocol) -> State:
    """The state, read through a call so that mypy does not carry narrowing across steps."""
    return protocol.state


def drain(protocol: HeartbeatProtocol) -> list[Event]:
    """Every event available now."""
    events: list[Event] = []
    while (event := protocol.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        events.append(event)
    return events


def frames(data: bytes) -> list[WireFrame]:
    """Decode bytes a protocol queued; they must be whole frames."""
    decoder = FrameDecoder(0xFFFFFFFF)
    decoder.receive_data(data)
    out: list[WireFrame] = []
    while (frame := decoder.next_frame()) is not None:
        out.append(wire_frame(frame))
    assert decoder.buffered == 0
    return out


def types(data: bytes) -> list[FrameType]:
    return [frame.type for frame in frames(data)]


def feed(protocol: HeartbeatProtocol, data: bytes, now: float) -> list[Event]:
    protocol.receive_data(data, now)
    return drain(protocol)


def new_pair(
    server_config: Config | None = None,
    client_config: Config | None = None,
    *,
    now: float = 0.0,
) -> tuple[HeartbeatProtocol, HeartbeatProtocol]:
    """A server and a client at ``now``, with the nonces of the §7 vectors."""
    server = HeartbeatProtocol(Role.SERVER, server_config, now=now, nonce=SERVER_NONCE)
    client = HeartbeatProtocol(Role.CLIENT, client_config, now=now, nonce=CLIENT_NONCE)
    return server, client


def open_pair(
    server_config: Config | None = None,
    client_config: Config | None = None,
    *,
    now: float = 0.0,
) -> tuple[HeartbeatProtocol, HeartbeatProtocol]:
    """A server and a client that completed the handshake at ``now``.

    The server's verdict on the client's HELLO (its PING #1, THB/1 §3.1) is
    still queued; :func:`accepted_pair` delivers it.
    """
    server, client = new_pair(server_config, client_config, now=now)
    [done] = feed(client, server.data_to_send(), now)
    assert isinstance(done, HandshakeComplete)
    [done] = feed(server, client.data_to_send(), now)
    assert isinstance(done, HandshakeComplete)
    assert server.state is state(client) is State.OPEN
    return server, client


def accepted_pair(
    server_config: Config | None = None,
    client_config: Config | None = None,
    *,
    now: float = 0.0,
) -> tuple[HeartbeatProtocol, HeartbeatProtocol]:
    """:func:`open_pair`, and the server's verdict (its PING #1, queued as it
    accepted the client's HELLO) delivered and answered at ``now``: nothing queued."""
    server, client = open_pair(server_config, client_config, now=now)
    verdict = server.data_to_send()
    assert verdict == encode_ping(opaque(1), server.health)
    assert feed(client, verdict, now) == [PingReceived(opaque(1), server.health)]
    pong = client.data_to_send()
    assert pong == encode_pong(opaque(1), client.health)
    assert feed(server, pong, now) == [PongReceived(opaque(1), client.health, 0.0)]
    return server, client


def expect_error(
    protocol: HeartbeatProtocol, data: bytes, now: float, code: int, *, closes: bool = True
) -> str:
    """Feed ``data``; a RemoteProtocolError with ``code`` must follow; return its message.

    Unless the side had already sent its CLOSE (``closes=False``), a CLOSE with
    the error's code must be queued.
    """
    protocol.receive_data(data, now)
    with pytest.raises(RemoteProtocolError) as info:
        drain(protocol)
    assert info.value.code == code
    assert state(protocol) is State.ERROR
    assert protocol.close_code == code
    queued = frames(protocol.data_to_send())
    if closes:
        assert queued[-1].type is FrameType.CLOSE
        assert decode_close(queued[-1].payload)[0] == code
    else:
        assert queued == []
    return str(info.value)


def run_prompt_pair(
    server: HeartbeatProtocol,
    client: HeartbeatProtocol,
    until: float,
    client_health: Sequence[tuple[float, HealthStatus]] = (),
) -> tuple[list[float], list[float]]:
    """Drive an open pair over a network with no delay until ``until``, as a runtime would.

    The clock stops at every deadline of either side (and at each
    ``client_health`` change), ``handle_timeout`` runs exactly then, and every
    byte queued is delivered at once. Returns the times of the PINGs the
    server and the client sent.
    """
    pings: dict[Role, list[float]] = {Role.SERVER: [], Role.CLIENT: []}
    changes = sorted(client_health)
    while True:
        now = min(server.next_deadline, client.next_deadline, *(at for at, _ in changes[:1]))
        if now > until:
            return pings[Role.SERVER], pings[Role.CLIENT]
        while changes and changes[0][0] == now:
            client.set_health(changes.pop(0)[1], now)
        for side in (client, server):
            side.handle_timeout(now)
        moved = True
        while moved:
            moved = False
            for side, peer in ((client, server), (server, client)):
                data = side.data_to_send()
                if data:
                    moved = True
                    for frame in frames(data):
                        if frame.type is FrameType.PING:
                            pings[side.role].append(now)
                    feed(peer, data, now)


# -- one connection over memory streams (runtime tests) --------------------------------


#: One second between PINGs, dead after three of silence: the defaults, spelled out.
CONFIG = Config(interval=1.0, timeout=3.0)


#: Bytes in a HELLO with no id and no auth, header included.
HELLO_SIZE = 6 + 36


def idle_ping_times(step: float, until: float, *, start: float = 0.0) -> list[float]:
    """When a side that sent its last frame at ``start`` PINGs while idle, up to ``until``.

    Every PING is due ``step`` after the one before, counted the way the core
    counts it (so the floats match exactly): ``send_interval`` for a server,
    ``send_interval * CLIENT_LEAD`` for a client.
    """
    times = []
    at = start
    while (at := at + step) <= until:
        times.append(at)
    return times


async def hang_up_on_close(peer: ScriptedPeer) -> None:
    """What a well-behaved peer does on our CLOSE: stop sending (which ends our
    lingering close), then read to the end."""
    while (frame := await peer.receive_frame()) is not None and frame.type is not FrameType.CLOSE:
        pass
    stream = peer.stream
    assert isinstance(stream, trio.abc.HalfCloseableStream)
    await stream.send_eof()
    await peer.drain()


def stream_and_peer(
    role: Role = Role.SERVER, *, timeout: float = 3.0, max_frame: int = 1 << 20
) -> tuple[WrappedStream, ScriptedPeer]:
    """Our end of a memory stream pair (wrapped, to see ``aclose``) and a peer on the other."""
    ours, theirs = trio.testing.memory_stream_pair()
    peer = ScriptedPeer(theirs, role, timeout=timeout, max_frame=max_frame)
    return WrappedStream(ours), peer


def lockstep_stream_and_peer() -> tuple[WrappedStream, ScriptedPeer]:
    """As :func:`stream_and_peer`, but every write waits until the peer reads it."""
    ours, theirs = trio.testing.lockstep_stream_pair()
    return WrappedStream(ours), ScriptedPeer(theirs)


@asynccontextmanager
async def served_connection(
    stream: trio.abc.Stream, peer: ScriptedPeer, *, hello_only: bool = False, **kwargs: Any
) -> AsyncIterator[Connection]:
    """Open a connection on ``stream`` while ``peer`` greets it, then serves it.

    The peer runs in a nursery of its own: :meth:`ScriptedPeer.handshake` (or,
    with ``hello_only``, just :meth:`ScriptedPeer.send_hello`, without waiting
    for our HELLO), then :meth:`ScriptedPeer.serve`. ``kwargs`` go to
    ``open_stream_connection``. Leaving the block closes the connection; the
    peer answers our CLOSE and reads to the end of the stream, so the block
    exits only once the peer is done. An error from the block or the
    connection cancels the peer and comes out of the peer's nursery, wrapped
    in an ``ExceptionGroup``.

    >>> async with served_connection(stream, peer, config=CONFIG) as conn:  # doctest: +SKIP
    ...     await conn.send(b"echoed")
    ...     assert await conn.receive() == b"echoed"
    """

    async def script() -> None:
        if hello_only:
            await peer.send_hello()
        else:
            await peer.handshake()
        await peer.serve()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_stream_connection(stream, **kwargs) as conn:
            yield conn


async def run_body(
    stream: trio.abc.Stream, body: Callable[[Connection], Awaitable[object]], **kwargs: Any
) -> None:
    """Run ``body`` in an ``open_stream_connection`` block; what the block raises comes out."""
    async with open_stream_connection(stream, **kwargs) as conn:
        await body(conn)


async def wait_forever(conn: Connection) -> None:
    """A block that only waits, until something cancels it."""
    await trio.sleep_forever()


async def handshake_then_drain(peer: ScriptedPeer) -> None:
    """A peer that completes the handshake, then only listens."""
    await peer.handshake()
    await peer.drain()


async def pings_then_silence(peer: ScriptedPeer, pings: int) -> None:
    """The peer's HELLO at 0.0, a PING every second up to ``pings``, then silence."""
    await peer.handshake()
    for second in range(1, pings + 1):
        await trio.sleep_until(float(second))
        await peer.send_ping()
    await peer.drain()


async def handshake_then_serve(peer: ScriptedPeer) -> None:
    """The peer's side of a healthy connection: handshake, then answer everything."""
    await peer.handshake()
    await peer.serve()


#: Bound, in virtual time, on the memory-stream tests: a hang fails instead of stalling.
VIRTUAL_BOUND = 10.0


def how_it_ended(conn: Connection) -> tuple[type[ConnectionClosed], int, bool]:
    """The kind, code and side of a connection's end, for one assert."""
    closed = conn.closed
    assert closed is not None, "the connection has not ended"
    return type(closed), closed.code, closed.by_peer


class StepCounter(trio.abc.Instrument):
    """Counts the steps one task ends: a task that never yields ends none."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


class StallingStream(WrappedStream):
    """A stream whose next ``send_all`` stops partway, as a full TCP buffer does.

    After :meth:`stall_next_write`, the next write sends its first ``after``
    bytes and waits for :attr:`resume` before sending the rest, so that a
    frame can be left half on the wire.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.resume = trio.Event()
        self._stall_after: int | None = None

    def stall_next_write(self, after: int) -> None:
        self._stall_after = after

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        after, self._stall_after = self._stall_after, None
        if after is not None:
            await super().send_all(data[:after])
            try:
                await self.resume.wait()
            except trio.Cancelled:
                self.send_interrupted = True
                raise
            data = data[after:]
        await super().send_all(data)


def stalling_stream_and_peer(peer_role: Role = Role.SERVER) -> tuple[StallingStream, ScriptedPeer]:
    """Our end of a memory stream pair that can stall a write midway, and a peer."""
    ours, theirs = trio.testing.memory_stream_pair()
    return StallingStream(ours), ScriptedPeer(theirs, peer_role)


async def resume_at(stream: StallingStream, when: float) -> None:
    """Let a stalled write finish at ``when``."""
    await trio.sleep_until(when)
    stream.resume.set()


def task_names() -> list[str]:
    """The names of every task in this run, walked from the root task down."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    names: list[str] = []
    pending = [root]
    while pending:
        task = pending.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return names


class WriterLog(trio.abc.Instrument):
    """When each connection writer task started and ended (``trio.current_time()``)."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.ended: list[float] = []

    def task_spawned(self, task: Task) -> None:
        if task.name == _WRITER_NAME:
            self.started.append(trio.current_time())

    def task_exited(self, task: Task) -> None:
        if task.name == _WRITER_NAME:
            self.ended.append(trio.current_time())


@contextmanager
def watch_writers() -> Iterator[WriterLog]:
    """A :class:`WriterLog` installed for the block."""
    log = WriterLog()
    trio.lowlevel.add_instrument(log)
    try:
        yield log
    finally:
        trio.lowlevel.remove_instrument(log)


class WhoWrites(WrappedStream):
    """Records every ``send_all``: when, from which task, and the frame types in it.

    Each write here carries whole frames (the runtime never splits a frame
    across ``send_all`` calls), so each is decoded on its own.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.writes: list[tuple[float, str, list[FrameType]]] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        decoder = FrameDecoder(max_frame=0xFFFFFFFF)
        decoder.receive_data(bytes(data))
        kinds = []
        while (frame := decoder.next_frame()) is not None:
            kinds.append(wire_frame(frame).type)
        at, name = trio.current_time(), trio.lowlevel.current_task().name
        await super().send_all(data)
        self.writes.append((at, name, kinds))


def memory_stream_and_peer() -> tuple[WhoWrites, ScriptedPeer]:
    """Our end of a memory stream pair (recording its writes) and a server peer on the other."""
    ours, theirs = trio.testing.memory_stream_pair()
    return WhoWrites(ours), ScriptedPeer(theirs)


# -- reconnecting clients on the memory network (service tests) ------------------------


ENDPOINT = "server:9000"


class Recorder:
    """A supervisor listener that notes each event with the virtual time it came at.

    It fails the test on a reconnect storm: more than :attr:`STORM` events at
    one instant. Virtual time stands still while a client reconnects at once
    over and over, so no time limit would ever end that test; the failure
    (``pytest.fail`` is a BaseException, which the supervisor does not catch
    from a listener) ends the client and says why.
    """

    STORM = 1000

    def __init__(self) -> None:
        self.events: list[tuple[float, SupervisorEvent]] = []
        self._instant = (-math.inf, 0)  # the latest instant, and its events

    def __call__(self, event: SupervisorEvent) -> None:
        now = trio.current_time()
        at, count = self._instant
        self._instant = (now, count + 1 if now == at else 1)
        if self._instant[1] > self.STORM:
            pytest.fail(f"a reconnect storm: over {self.STORM} events at {now} s", pytrace=False)
        self.events.append((now, event))

    def of(self, kind: type[SupervisorEvent]) -> list[tuple[float, Any]]:
        return [(at, event) for at, event in self.events if isinstance(event, kind)]

    def times(self, kind: type[SupervisorEvent]) -> list[float]:
        return [at for at, _ in self.of(kind)]

    def summary(self) -> list[tuple[Any, ...]]:
        """The events as comparable tuples (exceptions compare by identity, codes do not)."""
        return [(at, *_summarize(event)) for at, event in self.events]


def _summarize(event: SupervisorEvent) -> tuple[Any, ...]:
    if isinstance(event, AttemptStarted):
        return ("attempt", event.attempt, event.endpoint)
    if isinstance(event, AttemptFailed):
        return ("failed", event.attempt, event.endpoint, event.error.code)
    if isinstance(event, Connected):
        return ("connected", event.attempt, event.endpoint)
    if isinstance(event, Disconnected):
        return ("disconnected", event.endpoint, event.error.code, event.uptime)
    if isinstance(event, BackingOff):
        return ("backoff", event.attempt, event.delay)
    assert isinstance(event, Stopped)
    return ("stopped", None if event.error is None else event.error.last_error)


def reconnecting(
    network: MemoryNetwork,
    endpoints: Any = (ENDPOINT,),
    record: Recorder | None = None,
    **kwargs: Any,
) -> Any:
    """``open_reconnecting_client`` over the memory network, with a recorder attached."""
    if isinstance(endpoints, tuple):
        endpoints = list(endpoints)
    return open_reconnecting_client(
        endpoints,
        connector=network.connect,
        listeners=[record] if record is not None else None,
        **kwargs,
    )


def close_first_with(code: int, after: float = 1.0) -> Callable[[Connection], Any]:
    """A handler that closes its first connection with ``code`` after a while, and echoes later ones."""
    served = 0

    async def handler(conn: Connection) -> None:
        nonlocal served
        served += 1
        if served == 1:
            await trio.sleep(after)
            await conn.aclose(code)
        else:
            await echo(conn)

    return handler


# -- the test kit's streams (test kit tests) -------------------------------------------


async def receive_exactly(stream: trio.abc.ReceiveStream, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        chunk = await stream.receive_some(nbytes - len(data))
        assert chunk, "unexpected EOF"
        data += chunk
    return data


async def blocks_for(afn: Callable[[], Any], seconds: float) -> bool:
    """True if ``await afn()`` was still waiting after ``seconds`` (and got cancelled)."""
    with trio.move_on_after(seconds) as scope:
        await afn()
    return scope.cancelled_caught


class PlainStream(trio.abc.Stream):
    """A stream that is not half-closeable, to wrap."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


# -- `python -m trio_heartbeat serve` in a subprocess -----------------------------

#: Bound on starting the interpreter and reading its ``listening on`` line.
SERVE_STARTUP = 10.0
_serve_serial = itertools.count()


@dataclass
class ServeProcess:
    """A running ``python -m trio_heartbeat serve``; see :func:`run_serve_process`."""

    process: trio.Process
    host: str
    port: int
    stderr_path: Path

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stderr(self) -> str:
        """Everything the server has logged so far."""
        return self.stderr_path.read_text()


async def reap(process: trio.Process) -> None:
    """Kill ``process`` (resumed first, if a test stopped it), wait for it, close its pipes:
    shielded, for a ``finally`` that a cancellation may be running through."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)
        process.kill()
        await process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                await pipe.aclose()


@asynccontextmanager
async def run_serve_process(log_dir: Path, *options: str) -> AsyncIterator[ServeProcess]:
    """Start ``serve`` with ``options`` and wait for its ``listening on HOST:PORT`` line.

    stderr (the server's log) goes to a fresh file in ``log_dir``. The process
    is always killed and waited for on the way out, even when the block is
    cancelled or the process has already exited.

    >>> async with run_serve_process(tmp_path, "--port", "0") as server:  # doctest: +SKIP
    ...     stream = await trio.open_tcp_stream(server.host, server.port)
    """
    stderr_path = log_dir / f"serve-{next(_serve_serial)}.stderr"
    with stderr_path.open("wb") as stderr_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_heartbeat", "serve", *options],
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )
    try:
        assert process.stdout is not None
        received = b""
        with trio.fail_after(SERVE_STARTUP):
            while b"\n" not in received:
                chunk = await process.stdout.receive_some()
                assert chunk, f"serve exited before listening:\n{stderr_path.read_text()}"
                received += chunk
        line = received.partition(b"\n")[0]
        match = re.fullmatch(rb"listening on (127\.0\.0\.1):(\d+)", line)
        assert match is not None, line
        yield ServeProcess(process, match[1].decode(), int(match[2]), stderr_path)
    finally:
        await reap(process)


class SpinGuard(trio.abc.Instrument):
    """Cancels ``scope`` once the task named ``task_name`` takes more than ``limit`` steps in
    one instant of virtual time: a loop that spins (under autojump the clock would stop for
    good) fails its test instead of hanging it. ``spun_at`` says when."""

    def __init__(self, limit: int, task_name: str = "trio_heartbeat service supervisor") -> None:
        self.scope = trio.CancelScope()
        self.limit = limit
        self.task_name = task_name
        self.spun_at: float | None = None
        self._at = -1.0
        self._steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name != self.task_name:
            return
        now = trio.current_time()
        self._steps = self._steps + 1 if now == self._at else 0
        self._at = now
        if self._steps > self.limit and self.spun_at is None:
            self.spun_at = now
            self.scope.cancel()
