"""The child processes of the idle benchmark: one server, and clients that heartbeat.

Theory of operation
-------------------
``python -m benchmarks._idle_peers --role server --kind KIND`` serves on a
loopback port, says ``port N`` and then does nothing but its job until its
stdin closes. ``--role client`` opens its share of the connections, paced
evenly over ``--ramp`` seconds so that the heartbeats of a whole run spread
over the second instead of arriving in one burst, says ``connected {json}``
once every connection is up or has failed, and then obeys its stdin: ``start``
clears the statistics, ``stop`` reports them as ``stats {json}``, and closing
stdin ends the process. Both roles also end by themselves after
``--lifetime`` seconds.

The kinds, the same job each: every connection heartbeats once a second.

* ``thb``: a :class:`~trio_heartbeat.Server` with ``Config(interval=1.0,
  timeout=3.0)`` whose handler waits for the connection to end.
* ``raw``: a plain Trio server that answers every 15-byte THB/1 PING with the
  PONG that echoes its opaque bytes: no handshake, no timeouts, no state.
* ``watched``: ``raw`` plus the silence rule, as a cancel scope whose deadline
  moves with every read: the least failure detection a heartbeat server can
  have, and the idiom trio-heartbeat's watchdog uses.
* ``websockets``: the ``websockets`` asyncio server, pinging every client
  every second (``ping_interval=1.0``); its clients are ``websockets``
  clients, which answer and record nothing.

The clients of ``raw``, ``watched`` and ``thb`` are the same lean THB/1
client, written out here with a single task per connection. It sends a PING
whenever it has sent nothing for :data:`~trio_heartbeat._handshake.CLIENT_LEAD`
of the second (0.9 s), as a trio-heartbeat client does, times the PONG that
echoes it, and answers the server's own PINGs at once; for ``thb`` it first
exchanges HELLOs (interval 1 s, timeout 3 s). Every server gets the same
clients, so they all answer the same PINGs. It is lean on purpose: the server
is what is measured, and full :func:`~trio_heartbeat.open_connection` clients
cost more CPU per connection than the server does, enough to starve a small
machine running both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import struct
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import trio

from trio_heartbeat import Config, Connection, HealthStatus, Hello, Role, Server
from trio_heartbeat._frames import (
    HEADER_SIZE,
    NONCE_SIZE,
    OPAQUE_SIZE,
    PING_SIZE,
    decode_close,
    encode_hello,
)
from trio_heartbeat._handshake import CLIENT_LEAD

from ._peers import announce, raise_fd_limit, stdin_lines

__all__ = ["HEARTBEAT", "KINDS", "LATE", "LOOPBACK", "main"]

LOOPBACK: Final = "127.0.0.1"
KINDS: Final = ("raw", "watched", "thb", "websockets")
#: The heartbeat settings of both sides.
HEARTBEAT: Final = Config(interval=1.0, timeout=3.0)
#: A PONG that takes longer than this is late.
LATE: Final = 0.1
_HEADER = struct.Struct(">BBI")
_OPAQUE = struct.Struct(">Q")
_HELLO, _PING_TYPE, _PONG, _CLOSE = 1, 3, 4, 5
_PING_HEADER = _HEADER.pack(_PING_TYPE, 0, PING_SIZE)
_PONG_HEADER = _HEADER.pack(_PONG, 0, PING_SIZE)
_SERVING = bytes((HealthStatus.SERVING,))
_FRAME = HEADER_SIZE + PING_SIZE
_PONG_TYPE_BYTE = bytes((_PONG,))
#: The listen backlog: a whole ramp of connections may wait to be accepted.
BACKLOG: Final = 4096


# -- servers ------------------------------------------------------------------


async def _answer_pings(stream: trio.SocketStream) -> None:
    """The raw baseline: answer every 15-byte PING with the PONG that echoes its opaque bytes."""
    buffer = b""
    # A client that goes away with a PONG unread resets the connection: that
    # is how every run ends, not an error.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await stream.receive_some():
            buffer += data
            while len(buffer) >= _FRAME:
                await stream.send_all(_PONG_TYPE_BYTE + buffer[1:_FRAME])
                buffer = buffer[_FRAME:]


async def _answer_pings_watched(stream: trio.SocketStream) -> None:
    """The raw baseline plus the silence rule, the least a heartbeat server must add.

    A cancel scope whose deadline moves with every read gives up on a peer
    that has sent nothing for the timeout: Trio's own idiom for a deadline,
    and the one trio-heartbeat's watchdog is built on.
    """
    buffer = b""
    with (
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        trio.CancelScope() as watchdog,
    ):
        while True:
            watchdog.deadline = trio.current_time() + HEARTBEAT.timeout
            data = await stream.receive_some()
            if not data:
                return
            buffer += data
            while len(buffer) >= _FRAME:
                await stream.send_all(_PONG_TYPE_BYTE + buffer[1:_FRAME])
                buffer = buffer[_FRAME:]


async def _wait_closed(conn: Connection) -> None:
    await conn.wait_closed()


async def _serve_trio(kind: str, connections: int, lifetime: float) -> None:
    with trio.move_on_after(lifetime):
        async with trio.open_nursery() as nursery:
            if kind in ("raw", "watched"):
                answer = _answer_pings if kind == "raw" else _answer_pings_watched
                listeners = await nursery.start(
                    partial(trio.serve_tcp, answer, 0, host=LOOPBACK, backlog=BACKLOG)
                )
                port = listeners[0].socket.getsockname()[1]
            else:
                server = Server(_wait_closed, config=HEARTBEAT, max_connections=connections + 64)
                await nursery.start(partial(server.serve_tcp, 0, LOOPBACK, backlog=BACKLOG))
                port = server.port
            announce("port", port)
            async for _command in stdin_lines():
                pass
            nursery.cancel_scope.cancel()


async def _serve_websockets(lifetime: float) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def idle(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(
        idle,
        LOOPBACK,
        0,
        compression=None,
        ping_interval=HEARTBEAT.interval,
        ping_timeout=HEARTBEAT.timeout,
        backlog=BACKLOG,
    ) as server:
        announce("port", server.sockets[0].getsockname()[1])
        with contextlib.suppress(asyncio.TimeoutError):  # it lived out its lifetime
            await asyncio.wait_for(_asyncio_commands(None), lifetime)


# -- clients ------------------------------------------------------------------


@dataclass
class _Statistics:
    """What one client process saw: PONG delays and server PINGs between ``start`` and
    ``stop``, and every connection that ended after it was up."""

    measuring: bool = False
    delays_us: list[int] = field(default_factory=list)
    server_pings: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_in_window: int = 0

    def start(self) -> None:
        self.measuring = True
        self.delays_us.clear()
        self.server_pings = 0
        self.dropped_in_window = 0

    def record(self, seconds: float) -> None:
        if self.measuring:
            self.delays_us.append(round(seconds * 1e6))

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.dropped_in_window += self.measuring

    def server_ping(self) -> None:
        self.server_pings += self.measuring

    def report(self) -> str:
        return json.dumps(
            {
                "delays_us": sorted(self.delays_us),
                "server_pings": self.server_pings,
                "dropped": self.dropped.total(),
                "dropped_in_window": self.dropped_in_window,
                "reasons": dict(self.dropped),
            }
        )


@dataclass
class _Ramp:
    """Counts connections as they come up or fail to; ``done`` is set once all have."""

    expected: int
    connected: int = 0
    failures: list[str] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    def settle(self, failure: BaseException | None = None) -> None:
        if failure is None:
            self.connected += 1
        else:
            self.failures.append(repr(failure))
        if self.connected + len(self.failures) == self.expected:
            self.done.set()

    def report(self) -> str:
        failed = len(self.failures)
        return json.dumps(
            {"connected": self.connected, "failed": failed, "examples": self.failures[:3]}
        )


def _client_hello() -> bytes:
    return encode_hello(
        Hello(
            role=Role.CLIENT,
            status=HealthStatus.SERVING,
            interval_ms=HEARTBEAT.interval_ms,
            timeout_ms=HEARTBEAT.timeout_ms,
            max_frame=HEARTBEAT.max_frame,
            nonce=os.urandom(NONCE_SIZE),
            instance_id="",
            auth=b"",
        )
    )


class _Frames:
    """The whole frames arriving on a stream, as ``(type, payload)``; no checks at all."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> tuple[int, bytes]:
        while True:
            buffer = self._buffer
            if len(buffer) >= HEADER_SIZE:
                frame_type, _flags, length = _HEADER.unpack_from(buffer)
                end = HEADER_SIZE + length
                if len(buffer) >= end:
                    self._buffer = buffer[end:]
                    return frame_type, buffer[HEADER_SIZE:end]
            data = await self._stream.receive_some()
            if not data:
                raise trio.BrokenResourceError("the server closed the connection")
            self._buffer += data


async def _lean_connection(
    kind: str, port: int, at: float, ramp: _Ramp, statistics: _Statistics
) -> None:
    """One connection of a lean client: PING every second, time each PONG, answer PINGs.

    For ``thb`` it first exchanges HELLOs, as THB/1 requires; the raw server
    knows no handshake and never pings.
    """
    await trio.sleep_until(at)
    try:
        stream = await trio.open_tcp_stream(LOOPBACK, port)
    except OSError as exc:
        ramp.settle(exc)
        return
    async with stream:
        frames = _Frames(stream)
        try:
            if kind == "thb":
                with trio.fail_after(HEARTBEAT.handshake_timeout):
                    frame_type, _payload = await frames.next()
                if frame_type != _HELLO:
                    raise trio.BrokenResourceError(f"the server sent frame type {frame_type}")
                await stream.send_all(_client_hello())
        except (OSError, trio.BrokenResourceError) as exc:
            ramp.settle(exc)
            return
        except trio.TooSlowError:
            ramp.settle(TimeoutError(f"no HELLO within {HEARTBEAT.handshake_timeout:g} s"))
            return
        ramp.settle()
        try:
            sequence = 0
            while True:
                sequence += 1
                opaque = _OPAQUE.pack(sequence)
                sent_at = trio.current_time()
                await stream.send_all(_PING_HEADER + opaque + _SERVING)
                # Read until the next PING is due, as a trio-heartbeat client
                # sends it: CLIENT_LEAD of the interval after this one, even if
                # we are late (never two PINGs in a hurry). Meanwhile: our
                # PONG, and the server's PINGs, which are answered at once.
                with trio.move_on_at(sent_at + HEARTBEAT.interval * CLIENT_LEAD):
                    while True:
                        frame_type, payload = await frames.next()
                        if frame_type == _PONG and payload[:OPAQUE_SIZE] == opaque:
                            statistics.record(trio.current_time() - sent_at)
                        elif frame_type == _PING_TYPE:
                            statistics.server_ping()
                            await stream.send_all(_PONG_HEADER + payload[:OPAQUE_SIZE] + _SERVING)
                        elif frame_type == _CLOSE:
                            code, reason = decode_close(payload)
                            statistics.drop(f"server sent CLOSE {code} ({reason})")
                            return
        except (trio.BrokenResourceError, OSError) as exc:
            statistics.drop(f"{type(exc).__name__}: {exc}")


async def _trio_client(
    kind: str, port: int, connections: int, ramp_seconds: float, lifetime: float
) -> None:
    statistics = _Statistics()
    ramp = _Ramp(connections)
    with trio.move_on_after(lifetime):
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            for index in range(connections):
                at = start + ramp_seconds * index / connections
                nursery.start_soon(_lean_connection, kind, port, at, ramp, statistics)
            await ramp.done.wait()
            announce("connected", ramp.report())
            async for command in stdin_lines():
                if command == "start":
                    statistics.start()
                elif command == "stop":
                    announce("stats", statistics.report())
            nursery.cancel_scope.cancel()


async def _asyncio_commands(statistics: _Statistics | None) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = line.decode().strip()
        if statistics is not None and command == "start":
            statistics.start()
        elif statistics is not None and command == "stop":
            announce("stats", statistics.report())


async def _websockets_client(port: int, connections: int, ramp_seconds: float) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException

    statistics = _Statistics()
    uri = f"ws://{LOOPBACK}:{port}"
    connected: list[None] = []
    failures: list[str] = []
    all_settled = asyncio.Event()
    stop = asyncio.Event()

    def settle(failure: BaseException | None = None) -> None:
        if failure is None:
            connected.append(None)
        else:
            failures.append(repr(failure))
        if len(connected) + len(failures) == connections:
            all_settled.set()

    async def one(delay: float) -> None:
        await asyncio.sleep(delay)
        up = False
        try:
            async with connect(
                uri, compression=None, ping_interval=None, proxy=None, open_timeout=60
            ) as ws:
                up = True
                settle()
                waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(ws.wait_closed())]
                _done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in pending:
                    waiter.cancel()
                if not stop.is_set():
                    statistics.drop(f"closed with {ws.close_code}")
        except (TimeoutError, OSError, WebSocketException) as exc:
            if up:
                statistics.drop(f"{type(exc).__name__}: {exc}")
            else:
                settle(exc)

    tasks = [
        asyncio.create_task(one(ramp_seconds * index / connections)) for index in range(connections)
    ]
    await all_settled.wait()
    report = {"connected": len(connected), "failed": len(failures), "examples": failures[:3]}
    announce("connected", json.dumps(report))
    await _asyncio_commands(statistics)
    stop.set()
    await asyncio.wait(tasks, timeout=5)


# -- entry point ----------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Run one server or client of the idle benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._idle_peers")
    parser.add_argument("--role", choices=["server", "client"], required=True)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument("--ramp", type=float, default=0.0)
    parser.add_argument("--lifetime", type=float, required=True)
    args = parser.parse_args(argv)
    raise_fd_limit()
    if args.role == "server":
        if args.kind == "websockets":
            asyncio.run(_serve_websockets(args.lifetime))
        else:
            trio.run(_serve_trio, args.kind, args.connections, args.lifetime)
    elif args.kind == "websockets":
        with contextlib.suppress(asyncio.TimeoutError):  # it lived out its lifetime
            asyncio.run(
                asyncio.wait_for(
                    _websockets_client(args.port, args.connections, args.ramp), args.lifetime
                )
            )
    else:
        trio.run(_trio_client, args.kind, args.port, args.connections, args.ramp, args.lifetime)


if __name__ == "__main__":
    main()
