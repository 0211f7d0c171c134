"""Round trip: PING to PONG on loopback, against a raw Trio ping-pong.

Theory of operation
-------------------
A client in the benchmark process measures round trips to servers in a child
process, one at a time, with the connection idle in between, as heartbeats
are. Each sample is the time from the start of the ping until the client has
the answer:

* **raw Trio ping-pong** (the baseline): ``send_all`` of a 15-byte THB/1
  PING frame on a plain socket; the server answers every 15 bytes it reads
  with a 15-byte PONG, and the client reads until it has all 15.
* **trio-heartbeat, await conn.ping()**: the whole call, as the application
  sees it: the PING written from the caller's task, the server's reader
  answering with the PONG itself, and the client's reader waking the caller.
  Its target is a p50 no more than :data:`TARGET` times the baseline's p50.
* **trio-heartbeat, PONG rtt**: the round trip ``ping()`` returns, measured
  by the connection itself from just before its ``send_all`` to just after the
  ``receive_some`` that brought the PONG (no task wake-ups at our end).
* **websockets, await ws.ping()** (reference): ``ping()`` and its pong
  waiter, on an asyncio loop in a thread of this process.

The subjects are sampled in turn, with a :data:`GAP` of idle time before
every sample. The connection's heartbeat interval is :data:`INTERVAL`, so
that ``ping()`` is always allowed to send at once (the rate rule lets a PING
out half an interval after the last). If the connection sent a heartbeat of
its own meanwhile, the benchmark waits again before sampling; if one went out
just before the timed ``ping()`` (a stalled machine can delay the benchmark
past the interval), that sample is thrown away and taken again, and the number
of such samples is printed. No sample includes a wait for the rate rule. The server does not count
early PINGs against the client (``max_ping_strikes=None``): at this rate a
loaded machine's jitter alone could make three of them look early. Nor does
it refuse the client's interval, which is below the default floor of 0.1 s
(``accept_interval``).

The rows report rates from the fastest sample, and the ``(median)`` ratio is
the ratio of p50s, on which the target is judged. The p50, p90 and p99 of
every subject are printed in a table of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, Final

import trio

from trio_heartbeat import Config, Connection, open_connection, serve_tcp

from ._peers import AsyncioThread, announce, open_child, stdin_lines
from ._report import Result, Settings, Timing

__all__ = ["GAP", "INTERVAL", "ROUND_TRIPS", "TARGET", "main", "percentile", "run"]

BENCHMARK: Final = "rtt"
CASE: Final = "PING -> PONG round trip on loopback, idle between pings"
#: The largest acceptable p50 of ``await conn.ping()``, as a multiple of the baseline's.
TARGET: Final = 1.5
#: Round trips per subject at scale 1.
ROUND_TRIPS: Final = 1_000
#: Idle time before every sample, in seconds.
GAP: Final = 0.005
#: The client's heartbeat interval, in seconds: long enough that it never
#: pings by itself between samples, short enough that ``ping()`` never waits.
INTERVAL: Final = 0.025
LOOPBACK: Final = "127.0.0.1"
PING: Final = bytes.fromhex("03 00 00 00 00 09 00 01 02 03 04 05 06 07 00")
PONG: Final = bytes.fromhex("04 00 00 00 00 09 00 01 02 03 04 05 06 07 00")
#: A round trip slower than this is an error, not a figure.
SAMPLE_SECONDS: Final = 30.0
SERVER_LIFETIME: Final = 1800.0

Sample = Callable[[], Awaitable[int]]
PERCENTILES: Final = (50, 90, 99)


def percentile(samples: Sequence[int], p: float) -> int:
    """The ``p``-th percentile of ``samples`` by the nearest-rank method.

    >>> percentile([5, 1, 4, 2, 3], 50)
    3
    """
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


class _JudgedOnMedian(Result):
    """A row whose target applies to the ratio of medians (p50s), not of best samples."""

    __slots__ = ()

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.median_ratio >= self.target


# -- the servers, in a child process ---------------------------------------------


async def _pong_raw(stream: trio.SocketStream) -> None:
    pending = 0
    while data := await stream.receive_some():
        pending += len(data)
        while pending >= len(PING):
            pending -= len(PING)
            await stream.send_all(PONG)


async def _wait_closed(conn: Connection) -> None:
    await conn.wait_closed()


async def _serve_trio(lifetime: float) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _pong_raw, 0, host=LOOPBACK))
        server = await nursery.start(
            partial(
                serve_tcp,
                _wait_closed,
                0,
                host=LOOPBACK,
                config=Config(max_ping_strikes=None, accept_interval=(INTERVAL, 3600.0)),
            )
        )
        announce("ports", listeners[0].socket.getsockname()[1], server.port)
        with trio.move_on_after(lifetime):
            async for _command in stdin_lines():
                pass
        nursery.cancel_scope.cancel()


async def _serve_websockets(lifetime: float) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def idle(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(idle, LOOPBACK, 0, compression=None, ping_interval=None) as server:
        announce("port", server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def stdin_closed() -> None:
            while await reader.readline():
                pass

        with contextlib.suppress(asyncio.TimeoutError):  # it lived out its lifetime
            await asyncio.wait_for(stdin_closed(), lifetime)


# -- the clients, in the benchmark process ----------------------------------------


def _raw(stream: trio.SocketStream) -> Sample:
    async def sample() -> int:
        start = time.perf_counter_ns()
        await stream.send_all(PING)
        received = 0
        while received < len(PONG):
            data = await stream.receive_some(len(PONG) - received)
            if not data:
                raise RuntimeError("the raw server closed the connection")
            received += len(data)
        return time.perf_counter_ns() - start

    return sample


class _Heartbeat:
    """``await conn.ping()`` samples, and the round trips the connection itself measured."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.core_rtts_ns: list[int] = []
        self._pings_sent = conn.statistics().pings_sent
        self._last_ping = -math.inf
        #: Samples taken again because the connection's own heartbeat got in the way.
        self.retaken = 0

    async def sample(self) -> int:
        conn = self.conn
        while True:
            await trio.sleep_until(self._last_ping + INTERVAL * 0.6)
            before = conn.statistics().pings_sent
            if before != self._pings_sent:
                # The connection pinged by itself since our last PING: let the
                # rate rule's half interval pass again, so that ping() does not wait.
                self._pings_sent = before
                self._last_ping = trio.current_time()
                continue
            self._last_ping = trio.current_time()
            start = time.perf_counter_ns()
            rtt = await conn.ping()
            elapsed = time.perf_counter_ns() - start
            self._pings_sent = conn.statistics().pings_sent
            if self._pings_sent == before + 1:
                self.core_rtts_ns.append(round(rtt * 1e9))
                return elapsed
            # A heartbeat of the connection's own went out between our check and
            # our PING, so ours waited for the rate rule: that is not a round
            # trip. Sample again.
            self.retaken += 1


def _websockets(thread: AsyncioThread, ws: Any) -> Sample:
    async def on_asyncio() -> int:
        start = time.perf_counter_ns()
        pong = await ws.ping()
        await pong
        return time.perf_counter_ns() - start

    async def sample() -> int:
        return await thread.run(on_asyncio())

    return sample


# -- the run ------------------------------------------------------------------


async def _sample_interleaved(subjects: dict[str, Sample], count: int) -> dict[str, list[int]]:
    samples: dict[str, list[int]] = {name: [] for name in subjects}
    for sample in subjects.values():
        with trio.fail_after(SAMPLE_SECONDS):
            await sample()  # warm-up
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(count):
            for name, sample in subjects.items():
                await trio.sleep(GAP)
                with trio.fail_after(SAMPLE_SECONDS):
                    samples[name].append(await sample())
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


async def _run(settings: Settings) -> list[Result]:
    with_websockets = importlib.util.find_spec("websockets") is not None
    count = max(settings.repeats, settings.scaled(ROUND_TRIPS))
    async with AsyncExitStack() as stack:
        trio_servers = await stack.enter_async_context(
            open_child("bench_rtt", "--role", "server", "--kind", "trio", lifetime=SERVER_LIFETIME)
        )
        raw_port, thb_port = map(int, (await trio_servers.expect("ports", within=30)).split())
        stream = await trio.open_tcp_stream(LOOPBACK, raw_port)
        stack.push_async_callback(stream.aclose)
        conn = await stack.enter_async_context(
            open_connection(LOOPBACK, thb_port, config=Config(interval=INTERVAL, timeout=10.0))
        )
        heartbeat = _Heartbeat(conn)
        subjects: dict[str, Sample] = {
            "raw Trio ping-pong": _raw(stream),
            "trio-heartbeat, await conn.ping()": heartbeat.sample,
        }
        if with_websockets:
            from websockets.asyncio.client import connect

            ws_server = await stack.enter_async_context(
                open_child(
                    "bench_rtt",
                    "--role",
                    "server",
                    "--kind",
                    "websockets",
                    lifetime=SERVER_LIFETIME,
                )
            )
            uri = f"ws://{LOOPBACK}:{int(await ws_server.expect('port', within=30))}"
            thread = stack.enter_context(AsyncioThread(timeout=SAMPLE_SECONDS))

            async def connect_ws() -> Any:
                return await connect(uri, compression=None, ping_interval=None, proxy=None)

            ws = await thread.run(connect_ws())

            async def close_ws() -> None:
                await thread.run(ws.close())

            stack.push_async_callback(close_ws)
            subjects["websockets (asyncio), await ws.ping()"] = _websockets(thread, ws)
        samples = await _sample_interleaved(subjects, count)
    heartbeat.core_rtts_ns[:1] = []  # the warm-up's
    rows = {
        "raw Trio ping-pong": samples["raw Trio ping-pong"],
        "trio-heartbeat, await conn.ping()": samples["trio-heartbeat, await conn.ping()"],
        "trio-heartbeat, PONG rtt (connection's own)": heartbeat.core_rtts_ns,
        **{name: taken for name, taken in samples.items() if name.startswith("websockets")},
    }
    _print_percentiles(rows)
    if heartbeat.retaken:
        print(
            f"  ({heartbeat.retaken} ping() samples retaken: the connection's own PING got in first)"
        )
    results: list[Result] = []
    for name, taken in rows.items():
        baseline = results[0] if results else None
        target = 1 / TARGET if name.endswith("conn.ping()") else None
        timing = Timing(tuple(taken))
        results.append(
            _JudgedOnMedian(BENCHMARK, CASE, name, "round trips", 1, 0, timing, baseline, target)
        )
    return results


def _print_percentiles(rows: dict[str, list[int]]) -> None:
    baseline = percentile(next(iter(rows.values())), 50)
    header = ["subject", *(f"p{p} us" for p in PERCENTILES), "p50 / baseline p50"]
    table = [header]
    for name, taken in rows.items():
        figures = [f"{percentile(taken, p) / 1000:,.1f}" for p in PERCENTILES]
        table.append([name, *figures, f"{percentile(taken, 50) / baseline:.2f}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"{BENCHMARK}: {CASE}, percentiles of {len(next(iter(rows.values()))):,} round trips")
    for row in table:
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        print("  " + "  ".join(cells))


def run(settings: Settings | None = None) -> list[Result]:
    """Time PING round trips of each subject; see the module docstring.

    Starts the servers in child processes and stops them before it returns,
    also on error. Raises :class:`trio.TooSlowError` if a round trip takes
    longer than :data:`SAMPLE_SECONDS`. Without ``websockets`` installed its
    row is left out.
    """
    return trio.run(_run, settings or Settings())


def main(argv: Sequence[str] | None = None) -> None:
    """The entry point of the server child processes (``--role server --kind trio|websockets``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_rtt")
    parser.add_argument("--role", choices=["server"], required=True)
    parser.add_argument("--kind", choices=["trio", "websockets"], required=True)
    parser.add_argument("--lifetime", type=float, default=SERVER_LIFETIME)
    args = parser.parse_args(argv)
    if args.kind == "websockets":
        asyncio.run(_serve_websockets(args.lifetime))
    else:
        trio.run(_serve_trio, args.lifetime)


if __name__ == "__main__":
    main()
