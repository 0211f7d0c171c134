"""Shared test helpers: a raw THB/1 peer, stream wrappers, task accounting.

Additive module: several test files use it, so extend it rather than change
what is here.

* :class:`RawPeer` plays the far end of a stream frame by frame, with the
  codec from ``trio_heartbeat._frames`` and no state machine, so a test says
  exactly what the peer sends and when, and sees every frame we send with the
  virtual time it arrived.
* :class:`WrappedStream` wraps any Trio stream to record ``aclose``, delay
  delivery, inject checkpoints, or break the transport on demand.
* :func:`connection_pair` runs both ends of a connection with the real runtime.
* :func:`count_tasks` counts the live tasks, to prove none was left behind.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
import trio.testing

from trio_heartbeat._connection import (
    Connection,
    ConnectionOptions,
    EventListener,
    open_stream_connection,
)
from trio_heartbeat._frames import (
    CloseCode,
    FrameDecoder,
    FrameType,
    HealthStatus,
    Hello,
    Role,
    decode_close,
    decode_hello,
    decode_ping,
    encode_close,
    encode_data,
    encode_hello,
    encode_ping,
    encode_pong,
)
from trio_heartbeat._protocol import Config

__all__ = [
    "RawPeer",
    "TimedFrame",
    "WrappedStream",
    "connection_pair",
    "count_tasks",
    "hello_frame",
    "opaque",
]


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
        return decode_ping(self.payload)[0]

    @property
    def status(self) -> HealthStatus:
        assert self.type in (FrameType.PING, FrameType.PONG)
        return decode_ping(self.payload)[1]

    @property
    def hello(self) -> Hello:
        assert self.type is FrameType.HELLO
        return decode_hello(self.payload)


class RawPeer:
    """The far end of a stream, driven by hand with the frame codec.

    ``role`` is the role the peer plays (the opposite of the connection under
    test). Every frame received is appended to :attr:`frames` with its arrival
    time; end-of-file, or a transport that fails, sets :attr:`eof_at`.

    >>> async def scenario(stream: trio.abc.Stream) -> None:  # doctest: +SKIP
    ...     peer = RawPeer(stream)
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

    # -- sending ------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Write raw bytes."""
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

    async def send_ping(self, data: bytes | None = None, status: HealthStatus | None = None) -> bytes:
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
            frame = self._decoder.next_frame()
            if frame is not None:
                timed = TimedFrame(trio.current_time(), frame.type, frame.payload)
                self.frames.append(timed)
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
        """Exchange HELLOs in this peer's role; returns the other side's HELLO."""
        if self.role is Role.SERVER:
            await self.send_hello()
            return await self.expect(FrameType.HELLO)
        hello = await self.expect(FrameType.HELLO)
        await self.send_hello()
        return hello

    async def drain(self) -> list[TimedFrame]:
        """Read until the stream ends; returns every frame received so far."""
        while await self.receive_frame() is not None:
            pass
        return self.frames

    async def serve(self) -> None:
        """Behave like a minimal well-mannered peer until the stream ends:
        echo DATA, answer PING with PONG, answer CLOSE with CLOSE."""
        closing = False
        while (frame := await self.receive_frame()) is not None:
            if closing:
                continue
            if frame.type is FrameType.DATA:
                await self.send_data(frame.payload)
            elif frame.type is FrameType.PING:
                await self.send_pong(frame.opaque)
            elif frame.type is FrameType.CLOSE:
                closing = True
                await self.send_close(frame.close_code, frame.close_reason)

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
        self._pending = trio.CancelScope()
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
            try:
                await self.inner.send_all(data)
            except trio.Cancelled:
                self.send_interrupted = True
                raise
            self.sent += data

        await self._run(operation)

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


def count_tasks() -> int:
    """How many tasks are alive in this run, the caller and the test harness included."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    return walk(trio.lowlevel.current_root_task())


@dataclass
class Pair:
    """Both ends of a :func:`connection_pair`."""

    client: Connection
    server: Connection
    client_stream: WrappedStream
    server_stream: WrappedStream
    server_events: list[object] = field(default_factory=list)


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
