"""Shared test helpers: a raw THB/1 peer that speaks bytes, servers on loopback, resource counts.

The raw peer has no runtime behind it: it reads and writes frames built with
the codec's own encoders, so a test can say exactly what goes on the wire (a
flood of PINGs, a header with no payload, silence) and read exactly what the
server answers.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from trio_heartbeat import Connection, Server, serve_tcp
from trio_heartbeat._frames import (
    Frame,
    FrameDecoder,
    FrameType,
    HealthStatus,
    Hello,
    Role,
    decode_close,
    decode_hello,
    encode_hello,
    encode_pong,
)
from trio_heartbeat._protocol import compute_auth

LOOPBACK = "127.0.0.1"
#: The nonce every raw client puts in its HELLO.
CLIENT_NONCE = bytes(range(16, 32))


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
        self.frames: list[Frame] = []
        self.server_hello: Hello | None = None
        self.close_reason = ""
        self._decoder = FrameDecoder(max_frame=0xFFFFFFFF)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_frame(self) -> Frame | None:
        """The next whole frame, or ``None`` once the stream has ended (EOF or reset)."""
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
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
                try:
                    await self.send(encode_pong(frame.payload[:8], HealthStatus.SERVING))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the server hung up meanwhile; its CLOSE may still be buffered

    async def read_until_end(self) -> list[Frame]:
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
        server: Server = await nursery.start(partial(serve_tcp, handler, 0, host=LOOPBACK, **kwargs))
        yield server
        nursery.cancel_scope.cancel()


async def wait_empty(server: Server, bound: float = 10) -> None:
    """Wait (within a generous bound) until the server holds no connection at all."""
    with trio.fail_after(bound):
        await server.registry.wait_until(lambda registry: len(registry) == 0)
        while server.statistics().active:
            await trio.sleep(0.01)


def open_fds() -> int:
    """How many file descriptors this process has open (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def living_tasks() -> int:
    """How many Trio tasks exist right now."""
    return trio.lowlevel.current_statistics().tasks_living
