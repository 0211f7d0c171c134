"""Throughput: small DATA messages on one connection over loopback TCP.

Theory of operation
-------------------
Every subject does the same job. A client in the benchmark process sends
``n`` messages of one size as fast as it can, then an empty message; a server
in a child process counts the messages and, on the empty one, answers with
the count as 8 big-endian bytes. A sample is the time from the first send
until that answer is in, and it is checked: a count other than ``n`` raises.
Running the server in its own process puts it on its own core, as in
production, so a sample measures the pipeline, not one event loop doing both
ends.

The subjects:

* **raw Trio, send_all per message** (the baseline): each message is a
  4-byte length prefix and the payload, written with one
  ``SocketStream.send_all``: the least any Trio program that writes each
  message as it comes can do.
* **raw Trio, batched**: the same frames joined into writes of up to
  256 KiB, the batch limit of the runtime's writer: what perfect coalescing
  would give.
* **trio-heartbeat**: ``await conn.send(payload)`` on a connection from
  :func:`~trio_heartbeat.open_connection` to :func:`~trio_heartbeat.serve_tcp`;
  the server's handler counts with ``async for``. Its target is
  :data:`TARGET` times the baseline's rate: the writer takes every queued
  message in one ``send_all``, so it should need far fewer system calls.
* **websockets** (reference, no target): the same job with the ``websockets``
  library's asyncio client and server, compression off. Its client runs on an
  asyncio loop in a thread of the benchmark process, one sample at a time.

Samples of the subjects are interleaved, as in ``measure_interleaved``, and
garbage collection is off in the benchmark process while sampling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, Final

import trio

from trio_heartbeat import Connection, open_connection, serve_tcp

from ._peers import AsyncioThread, announce, open_child, stdin_lines
from ._report import Result, Settings, Timing

__all__ = ["MESSAGES_PER_SAMPLE", "TARGET", "main", "run"]

BENCHMARK: Final = "throughput"
#: The least acceptable rate of trio-heartbeat, as a multiple of the baseline's.
TARGET: Final = 2.0
#: Messages per sample at scale 1, by payload size.
MESSAGES_PER_SAMPLE: Final = {64: 5_000, 4096: 1_000}
LOOPBACK: Final = "127.0.0.1"
#: The batched baseline's largest write: the runtime writer's batch limit.
BATCH_BYTES: Final = 256 * 1024
#: A sample that takes longer than this is an error, not a figure.
SAMPLE_SECONDS: Final = 120.0
#: How long a server child lives at most, whatever happens to the parent.
SERVER_LIFETIME: Final = 1800.0

_PREFIX = struct.Struct(">I")
_COUNT = struct.Struct(">Q")
_END = _PREFIX.pack(0)

Sample = Callable[[int], Awaitable[int]]


def _size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def _websockets_available() -> bool:
    return importlib.util.find_spec("websockets") is not None


# -- the servers, each in a child process ---------------------------------------


async def _count_raw(stream: trio.SocketStream) -> None:
    buffer = bytearray()
    count = 0
    unpack = _PREFIX.unpack_from
    while data := await stream.receive_some():
        buffer += data
        position = 0
        end = len(buffer)
        while end - position >= 4:
            (length,) = unpack(buffer, position)
            if end - position - 4 < length:
                break
            position += 4 + length
            if length:
                count += 1
            else:
                await stream.send_all(_COUNT.pack(count))
                count = 0
        del buffer[:position]


async def _count_thb(conn: Connection) -> None:
    count = 0
    async for message in conn:
        if message:
            count += 1
        else:
            await conn.send(_COUNT.pack(count))
            count = 0


async def _serve_trio(kind: str, lifetime: float) -> None:
    async with trio.open_nursery() as nursery:
        if kind == "raw":
            listeners = await nursery.start(partial(trio.serve_tcp, _count_raw, 0, host=LOOPBACK))
            port = listeners[0].socket.getsockname()[1]
        else:
            server = await nursery.start(partial(serve_tcp, _count_thb, 0, host=LOOPBACK))
            port = server.port
        announce("port", port)
        with trio.move_on_after(lifetime):
            async for _command in stdin_lines():
                pass
        nursery.cancel_scope.cancel()


async def _serve_websockets(lifetime: float) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def count(ws: ServerConnection) -> None:
        messages = 0
        async for message in ws:
            if message:
                messages += 1
            else:
                await ws.send(_COUNT.pack(messages))
                messages = 0

    async with serve(count, LOOPBACK, 0, compression=None, ping_interval=None) as server:
        announce("port", server.sockets[0].getsockname()[1])
        with contextlib.suppress(asyncio.TimeoutError):  # it lived out its lifetime
            await asyncio.wait_for(_asyncio_stdin_closed(), lifetime)


async def _asyncio_stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        pass


# -- the clients, in the benchmark process ----------------------------------------


def _check(count: int, expected: int, subject: str) -> None:
    if count != expected:
        raise RuntimeError(f"{subject}: the server counted {count} messages, not {expected}")


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise RuntimeError("the server closed the connection")
        data += chunk
    return data


def _raw_per_message(stream: trio.SocketStream, payload: bytes) -> Sample:
    frame = _PREFIX.pack(len(payload)) + payload

    async def sample(n: int) -> int:
        send_all = stream.send_all
        start = time.perf_counter_ns()
        for _ in range(n):
            await send_all(frame)
        await send_all(_END)
        reply = await _receive_exactly(stream, 8)
        elapsed = time.perf_counter_ns() - start
        _check(_COUNT.unpack(reply)[0], n, "raw Trio, send_all per message")
        return elapsed

    return sample


def _raw_batched(stream: trio.SocketStream, payload: bytes) -> Sample:
    frame = _PREFIX.pack(len(payload)) + payload
    per_write = max(1, BATCH_BYTES // len(frame))

    async def sample(n: int) -> int:
        start = time.perf_counter_ns()
        for first in range(0, n, per_write):
            await stream.send_all(frame * min(per_write, n - first))
        await stream.send_all(_END)
        reply = await _receive_exactly(stream, 8)
        elapsed = time.perf_counter_ns() - start
        _check(_COUNT.unpack(reply)[0], n, "raw Trio, batched")
        return elapsed

    return sample


def _heartbeat(conn: Connection, payload: bytes) -> Sample:
    async def sample(n: int) -> int:
        send = conn.send
        start = time.perf_counter_ns()
        for _ in range(n):
            await send(payload)
        await send(b"")
        reply = await conn.receive()
        elapsed = time.perf_counter_ns() - start
        _check(_COUNT.unpack(reply)[0], n, "trio-heartbeat")
        return elapsed

    return sample


def _websockets(thread: AsyncioThread, ws: Any, payload: bytes) -> Sample:
    async def on_asyncio(n: int) -> int:
        send = ws.send
        start = time.perf_counter_ns()
        for _ in range(n):
            await send(payload)
        await send(b"")
        reply = await ws.recv()
        elapsed = time.perf_counter_ns() - start
        _check(_COUNT.unpack(reply)[0], n, "websockets")
        return elapsed

    async def sample(n: int) -> int:
        return await thread.run(on_asyncio(n))

    return sample


# -- the run ------------------------------------------------------------------


async def _sample_interleaved(
    subjects: dict[str, Sample], n: int, repeats: int
) -> dict[str, Timing]:
    samples: dict[str, list[int]] = {name: [] for name in subjects}
    with trio.fail_after(SAMPLE_SECONDS * (repeats + 1) * len(subjects)):
        for sample in subjects.values():
            await sample(n)  # warm-up, and the first check of the count
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for _ in range(repeats):
                for name, sample in subjects.items():
                    samples[name].append(await sample(n))
        finally:
            if gc_was_enabled:
                gc.enable()
    return {name: Timing(tuple(taken)) for name, taken in samples.items()}


async def _run(settings: Settings) -> list[Result]:
    with_websockets = _websockets_available()
    results: list[Result] = []
    async with AsyncExitStack() as stack:
        ports: dict[str, int] = {}
        for kind in ("raw", "thb", *(("websockets",) if with_websockets else ())):
            child = await stack.enter_async_context(
                open_child(
                    "bench_throughput", "--role", "server", "--kind", kind, lifetime=SERVER_LIFETIME
                )
            )
            ports[kind] = int(await child.expect("port", within=30))
        stream = await trio.open_tcp_stream(LOOPBACK, ports["raw"])
        stack.push_async_callback(stream.aclose)
        conn = await stack.enter_async_context(open_connection(LOOPBACK, ports["thb"]))
        ws_thread: AsyncioThread | None = None
        ws: Any = None
        if with_websockets:
            from websockets.asyncio.client import connect

            ws_thread = stack.enter_context(AsyncioThread(timeout=SAMPLE_SECONDS))
            uri = f"ws://{LOOPBACK}:{ports['websockets']}"

            async def connect_ws() -> Any:
                return await connect(uri, compression=None, ping_interval=None, proxy=None)

            ws = await ws_thread.run(connect_ws())

            async def close_ws(thread: AsyncioThread = ws_thread) -> None:
                await thread.run(ws.close())

            stack.push_async_callback(close_ws)
        for size, count in MESSAGES_PER_SAMPLE.items():
            payload = bytes(i % 251 for i in range(size))
            subjects = {
                "raw Trio, send_all per message": _raw_per_message(stream, payload),
                "raw Trio, batched send_all": _raw_batched(stream, payload),
                "trio-heartbeat, conn.send()": _heartbeat(conn, payload),
            }
            if ws_thread is not None:
                subjects["websockets (asyncio), ws.send()"] = _websockets(ws_thread, ws, payload)
            n = settings.scaled(count)
            timings = await _sample_interleaved(subjects, n, settings.repeats)
            results += _results(size, n, timings)
    return results


def _results(size: int, n: int, timings: dict[str, Timing]) -> list[Result]:
    case = f"send {_size_label(size)} DATA messages on one connection"
    rows: list[Result] = []
    for name, timing in timings.items():
        baseline = rows[0] if rows else None
        target = TARGET if name.startswith("trio-heartbeat") else None
        rows.append(
            Result(BENCHMARK, case, name, "messages", n, n * size, timing, baseline, target)
        )
    return rows


def run(settings: Settings | None = None) -> list[Result]:
    """Time ``n`` messages of 64 B and of 4 KiB through each subject; see the module docstring.

    Starts one server process per subject and stops them all before it
    returns, also on error. Raises :class:`RuntimeError` if a server counts
    the wrong number of messages, and :class:`trio.TooSlowError` if a sample
    takes longer than :data:`SAMPLE_SECONDS`. Without ``websockets``
    installed, its rows are left out.
    """
    return trio.run(_run, settings or Settings())


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point of the server child processes (``--role server --kind KIND``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_throughput")
    parser.add_argument("--role", choices=["server"], required=True)
    parser.add_argument("--kind", choices=["raw", "thb", "websockets"], required=True)
    parser.add_argument("--lifetime", type=float, default=SERVER_LIFETIME)
    args = parser.parse_args(argv)
    if args.kind == "websockets":
        asyncio.run(_serve_websockets(args.lifetime))
    else:
        trio.run(_serve_trio, args.kind, args.lifetime)


if __name__ == "__main__":
    main()
