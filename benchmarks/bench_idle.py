"""Idle scale: one server process holding 5,000 connections that heartbeat every second.

Theory of operation
-------------------
What a heartbeat library costs a server is mostly what it costs when nothing
else happens: many connections, each exchanging one PING and one PONG a
second. For each subject the benchmark starts a server process and, in
separate client processes (at most :data:`PER_CLIENT_PROCESS` connections
each), opens the connections, paced evenly over a ramp. Once all are up and
a settling time has passed, it measures the server process alone, from
``/proc``, over a window:

* **CPU**: user plus system time of the server process during the window.
  The report's rows give it as heartbeats per CPU second, where one
  heartbeat is one connection kept alive for one second (the job asked for);
  the ratio to the baseline is the inverse of the CPU ratio. Target:
  trio-heartbeat uses at most :data:`CPU_TARGET` times the baseline's CPU.
* **Memory**: ``VmRSS`` with every connection up, minus ``VmRSS`` before the
  first client connected, per connection. Target: at most
  :data:`RSS_TARGET` bytes per connection.
* **PONG delay**: the round trip of every PING the clients sent during the
  window, as the clients measured it. Target: none later than
  :data:`~benchmarks._idle_peers.LATE` (100 ms), and no connection lost. The
  clients run on the same machine, so this includes their own scheduling
  delays.

The subjects (see :mod:`benchmarks._idle_peers`), all answering the same lean
clients, which PING 0.9 s after they last sent anything, as trio-heartbeat
clients do:

* the **baseline**, a raw Trio server doing the same job with the least code:
  it answers each 15-byte PING with the PONG that echoes it, one task per
  connection, and gives up on a peer silent for the timeout, through a cancel
  scope whose deadline moves with every read (Trio's idiom for a deadline, and
  the one the runtime's watchdog is built on);
* the same raw server **without the silence deadline**, a reference for what
  the failure detection alone costs: it would hold a dead peer forever;
* a trio-heartbeat :class:`~trio_heartbeat.Server` with
  ``Config(interval=1.0, timeout=3.0)``, whose clients announce the same in
  their HELLO;
* the ``websockets`` asyncio server pinging every client every second (a
  reference for CPU and memory; its clients measure nothing).

Connections that fail to open or drop are counted and reported, not raised:
under overload they are the result. The settling time is long enough for the
garbage collections that the ramp's allocations set off to be over: the
window measures heartbeats, not the collector catching up with a connection
storm.

Each process raises its soft limit on open files to the hard limit; a run
needs about one descriptor per connection in the server and in each client.
The work scales with ``--scale``: the connections, the ramp, the settling time
and the window (never shorter than half a second). ``--repeats`` does not
apply: each subject is measured once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Final

import trio

from ._idle_peers import LATE
from ._peers import cpu_seconds, open_child, raise_fd_limit, rss_bytes
from ._report import Check, Result, Settings, Timing, format_results, machine_description

__all__ = [
    "CONNECTIONS",
    "CPU_TARGET",
    "PER_CLIENT_PROCESS",
    "RSS_TARGET",
    "Measurement",
    "Plan",
    "main",
    "run",
]

BENCHMARK: Final = "idle"
#: Connections at scale 1.
CONNECTIONS: Final = 5_000
#: The most connections one client process opens.
PER_CLIENT_PROCESS: Final = 2_500
#: The largest acceptable server CPU time of trio-heartbeat, as a multiple of the baseline's.
CPU_TARGET: Final = 1.3
#: The largest acceptable server memory per connection, in bytes (10 KiB).
RSS_TARGET: Final = 10 * 1024
#: Seconds over which the connections are opened, at scale 1.
RAMP: Final = 6.0
#: Seconds between the last connection and the window, at scale 1.
SETTLE: Final = 10.0
#: Seconds of measurement, at scale 1.
WINDOW: Final = 10.0
#: The shortest window at any scale.
MIN_WINDOW: Final = 0.5
#: Descriptors a process needs besides its connections (listener, pipes, epoll, ...).
FD_MARGIN: Final = 64

SUBJECTS: Final = {
    "watched": "raw Trio PING/PONG + silence deadline",
    "raw": "raw Trio PING/PONG, no detection",
    "thb": "trio-heartbeat serve_tcp",
    "websockets": "websockets (asyncio) server",
}


@dataclass(frozen=True, slots=True)
class Plan:
    """How big one run is, and how long each phase lasts (seconds)."""

    connections: int
    ramp: float
    settle: float
    window: float

    @classmethod
    def from_settings(
        cls, settings: Settings, connections: int | None = None, window: float | None = None
    ) -> Plan:
        """The plan for ``settings``, with the connections or the window overridden if given."""
        fraction = min(1.0, settings.scale)
        return cls(
            connections=connections if connections is not None else settings.scaled(CONNECTIONS),
            ramp=RAMP * fraction,
            settle=SETTLE * fraction,
            window=window if window is not None else max(MIN_WINDOW, WINDOW * fraction),
        )

    @property
    def client_shares(self) -> list[int]:
        """How many connections each client process opens."""
        processes = math.ceil(self.connections / PER_CLIENT_PROCESS)
        share, extra = divmod(self.connections, processes)
        return [share + (index < extra) for index in range(processes)]

    @property
    def lifetime(self) -> float:
        """How long any child may live: every phase, and a generous margin."""
        return self.ramp + self.settle + self.window + 120.0


@dataclass(frozen=True, slots=True)
class Measurement:
    """What the benchmark saw of one subject's server.

    ``opened`` connections came up and ``failed`` never did; ``dropped`` of
    the opened ones ended before the end of the window (``dropped_in_window``
    of them during it). Delays are ``None`` for subjects whose clients do not
    measure them.
    """

    kind: str
    opened: int
    failed: int
    dropped: int
    dropped_in_window: int
    window_seconds: float
    cpu_seconds: float
    rss_empty: int
    rss_full: int
    delays_us: tuple[int, ...] | None
    server_pings: int | None

    @property
    def alive(self) -> int:
        """Connections up at the end of the window."""
        return self.opened - self.dropped

    @property
    def rss_per_connection(self) -> float:
        """Bytes of resident memory per connection up."""
        return (self.rss_full - self.rss_empty) / max(1, self.alive)

    @property
    def heartbeats(self) -> int:
        """Connection-seconds in the window: the heartbeats the job asks for, at one a second."""
        return max(1, round(self.alive * self.window_seconds))

    @property
    def lost(self) -> int:
        """Connections that never came up or went down: each is a heartbeat that never came back."""
        return self.failed + self.dropped

    @property
    def worst_delay_us(self) -> int | None:
        """The slowest PONG of the window, in microseconds."""
        return max(self.delays_us) if self.delays_us else None

    def delay_percentile_us(self, p: float) -> int | None:
        """The ``p``-th percentile (nearest rank) of the PONG delays, in microseconds."""
        if not self.delays_us:
            return None
        ordered = sorted(self.delays_us)
        return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]

    @property
    def late(self) -> int | None:
        """How many PONGs came later than :data:`~benchmarks._idle_peers.LATE`."""
        if self.delays_us is None:
            return None
        return sum(delay > LATE * 1e6 for delay in self.delays_us)


# -- measuring one subject --------------------------------------------------------


async def _measure(kind: str, plan: Plan) -> Measurement:
    role = ("--kind", kind, "--connections")
    async with open_child(
        "_idle_peers", "--role", "server", *role, str(plan.connections), lifetime=plan.lifetime
    ) as server:
        port = await server.expect("port", within=60)
        rss_empty = rss_bytes(server.pid)
        async with AsyncExitStack() as stack:
            clients = []
            for share in plan.client_shares:
                client = await stack.enter_async_context(
                    open_child(
                        "_idle_peers",
                        "--role",
                        "client",
                        *role,
                        str(share),
                        "--port",
                        port,
                        "--ramp",
                        f"{plan.ramp}",
                        lifetime=plan.lifetime,
                    )
                )
                clients.append(client)
            ramps = [
                json.loads(await client.expect("connected", within=plan.ramp + 90))
                for client in clients
            ]
            opened = sum(ramp["connected"] for ramp in ramps)
            if not opened:
                raise RuntimeError(f"{kind}: no connection opened: {ramps[0]['examples']}")
            await trio.sleep(plan.settle)
            for client in clients:
                await client.send_line("start")
            cpu_before, started = cpu_seconds(server.pid), time.perf_counter()
            await trio.sleep(plan.window)
            cpu_after, ended = cpu_seconds(server.pid), time.perf_counter()
            rss_full = rss_bytes(server.pid)
            for client in clients:
                await client.send_line("stop")
            reports = [json.loads(await client.expect("stats", within=60)) for client in clients]
    for ramp in ramps:
        if ramp["failed"]:
            print(
                f"  {kind}: {ramp['failed']:,} connections failed to open, e.g. {ramp['examples']}"
            )
    reasons: Counter[str] = Counter()
    for report in reports:
        reasons.update(report["reasons"])
    for reason, count in reasons.most_common(5):
        print(f"  {kind}: {count:,} connections dropped: {reason}")
    delays = tuple(delay for report in reports for delay in report["delays_us"])
    return Measurement(
        kind=kind,
        opened=opened,
        failed=sum(ramp["failed"] for ramp in ramps),
        dropped=sum(report["dropped"] for report in reports),
        dropped_in_window=sum(report["dropped_in_window"] for report in reports),
        window_seconds=ended - started,
        cpu_seconds=cpu_after - cpu_before,
        rss_empty=rss_empty,
        rss_full=rss_full,
        delays_us=None if kind == "websockets" else delays,
        server_pings=None if kind == "websockets" else sum(r["server_pings"] for r in reports),
    )


async def _measure_all(plan: Plan, kinds: Sequence[str]) -> list[Measurement]:
    # Each child raises its own limit the same way; the server needs the most.
    limit = raise_fd_limit()
    if limit < plan.connections + FD_MARGIN:
        raise RuntimeError(
            f"{plan.connections:,} connections need {plan.connections + FD_MARGIN:,} open files "
            f"in the server process, but the hard limit (ulimit -Hn) is {limit:,}"
        )
    return [await _measure(kind, plan) for kind in kinds]


# -- reporting ------------------------------------------------------------------


def _cpu_results(measurements: Sequence[Measurement], plan: Plan) -> list[Result]:
    case = (
        f"server CPU, {plan.connections:,} connections heartbeating every second, "
        f"{plan.window:g} s window"
    )
    rows: list[Result] = []
    for measurement in measurements:
        baseline = rows[0] if rows else None
        target = 1 / CPU_TARGET if measurement.kind == "thb" else None
        timing = Timing((round(measurement.cpu_seconds * 1e9),))
        rows.append(
            Result(
                BENCHMARK,
                case,
                SUBJECTS[measurement.kind],
                "heartbeats",
                measurement.heartbeats,
                0,
                timing,
                baseline,
                target,
            )
        )
    return rows


def _ms(microseconds: int | None) -> str:
    return "-" if microseconds is None else f"{microseconds / 1000:,.1f}"


def describe(measurements: Sequence[Measurement], plan: Plan) -> str:
    """The memory, CPU and PONG-delay table, and the verdicts on the absolute targets."""
    header = [
        "subject",
        "up",
        "failed",
        "dropped",
        "RSS empty MB",
        "RSS full MB",
        "per conn. KiB",
        "CPU s",
        "CPU %",
        "PONGs",
        "p50 ms",
        "p99 ms",
        "worst ms",
        "late",
        "server PINGs",
    ]
    table = [header]
    for m in measurements:
        table.append(
            [
                SUBJECTS[m.kind],
                f"{m.alive:,}",
                f"{m.failed:,}",
                f"{m.dropped:,}",
                f"{m.rss_empty / 1e6:,.1f}",
                f"{m.rss_full / 1e6:,.1f}",
                f"{m.rss_per_connection / 1024:,.2f}",
                f"{m.cpu_seconds:.2f}",
                f"{m.cpu_seconds / m.window_seconds:.1%}",
                "-" if m.delays_us is None else f"{len(m.delays_us):,}",
                _ms(m.delay_percentile_us(50)),
                _ms(m.delay_percentile_us(99)),
                _ms(m.worst_delay_us),
                "-" if m.late is None else f"{m.late:,}",
                "-" if m.server_pings is None else f"{m.server_pings:,}",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        f"{BENCHMARK}: memory, CPU and PONG delays of the server, {plan.connections:,} connections, "
        f"{plan.window:g} s window"
    ]
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  " + "  ".join(cells))
    lines += [check.line for check in checks(measurements)]
    return "\n".join(lines)


def checks(measurements: Sequence[Measurement]) -> list[Check]:
    """The absolute targets, judged on trio-heartbeat's measurement."""
    out: list[Check] = []
    for m in measurements:
        if m.kind != "thb":
            continue
        per_connection = m.rss_per_connection
        out.append(
            Check(
                BENCHMARK,
                f"RSS per connection <= {RSS_TARGET / 1024:g} KiB",
                f"{per_connection / 1024:,.2f} KiB",
                per_connection <= RSS_TARGET,
            )
        )
        worst = m.worst_delay_us
        late = f"no PONG later than {LATE * 1000:g} ms"
        if worst is None:
            out.append(Check(BENCHMARK, late, "no PONG in the window", False))
            continue
        lost = f", {m.lost:,} connections lost" if m.lost else ""
        figure = f"worst {_ms(worst)} ms, {m.late:,} late{lost}"
        out.append(Check(BENCHMARK, late, figure, worst <= LATE * 1e6 and not m.lost))
    return out


def run(
    settings: Settings | None = None,
    *,
    connections: int | None = None,
    window: float | None = None,
) -> list[Result | Check]:
    """Measure each subject's server at idle scale; print the memory and delay table.

    Returns the CPU rows for the report, then the absolute targets (printed
    with the table, counted in the summary). ``connections`` and ``window``
    override what the scale implies. Every child process is stopped before
    this returns, also on error. Raises :class:`RuntimeError` if a connection
    fails to open or fails during the run, and
    :class:`~benchmarks._peers.ChildError` if a child dies or stops answering.
    Without ``websockets`` installed its rows are left out.
    """
    plan = Plan.from_settings(settings or Settings(), connections, window)
    kinds = [kind for kind in SUBJECTS if kind != "websockets" or _websockets_available()]
    measurements = trio.run(_measure_all, plan, kinds)
    print(describe(measurements, plan))
    print()
    return [*_cpu_results(measurements, plan), *checks(measurements)]


def _websockets_available() -> bool:
    return importlib.util.find_spec("websockets") is not None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.bench_idle [--connections N] [--window S]``: this benchmark alone."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_idle", description="Run the idle benchmark alone."
    )
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--window", type=float, default=WINDOW)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.connections < 1 or args.window <= 0:
        parser.error("--connections must be at least 1 and --window positive")
    print(machine_description())
    print(f"command: {' '.join(['python -m benchmarks.bench_idle', *argv])}")
    report = run(connections=args.connections, window=args.window)
    print(format_results([row for row in report if isinstance(row, Result)]))


if __name__ == "__main__":
    main()
