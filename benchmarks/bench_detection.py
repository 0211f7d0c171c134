"""Real-time detection: how soon a server convicts peers that freeze, among many that do not.

Theory of operation
-------------------
A heartbeat library promises an upper bound: a peer that goes silent is
declared dead within the configured ``timeout``. The detector tests decide
that in virtual time; this benchmark checks the promise on a real clock, with
real sockets, and with the server busy with other peers while it convicts.

One server holds 1,000 idle connections (``Config(interval=1.0,
timeout=3.0)``). The clients are the lean THB/1 clients of the idle benchmark
(:mod:`benchmarks._idle_peers`, ``--role client``): each connection PINGs
every 0.9 s and answers the server's PINGs. They live in child processes of
at most :data:`PER_CLIENT_PROCESS` connections; the 100 connections of one of
them are the *frozen* peers. Once every connection is up and has had
:data:`SETTLE` seconds to settle (:data:`LEARNING_SETTLE` for the default
detector, which may learn the peers' rhythm: the frozen peers have then sent
about 20 heartbeats, and an adaptive detector answers the plain timeout while
it warms up), the benchmark
reads the server's clock and sends that process ``SIGSTOP``: its
connections stay open, the kernel keeps acknowledging the server's bytes, and
nothing more comes from them, which is what a frozen VM or a hung process
looks like to a server. It then watches for the timeout plus :data:`AFTER`
seconds and records, for every connection, how it ended.

The server runs in the benchmark process, not in a child: the moment before
``os.kill`` and every conviction are read from the same clock
(``trio.current_time()``, the one the server's deadlines are on), in the same
process, with no clock to translate, and every server event comes to a
listener with its connection (``Server(listeners=[...])``). The benchmark's
own work during the measurement is one sleep. A conviction is a
:class:`~trio_heartbeat.ConnectionEnded` with code 1011 and a reason that
starts with "heartbeat timeout"; its time is when the listener hears it.

The figures, per subject:

* **freeze -> conviction** of each frozen peer: p50, p99 and max. Target
  (ours): every frozen peer convicted, and p99 at most the timeout plus
  :data:`MARGIN` (50 ms). A detector may convict sooner than the timeout (an
  adaptive one should); the target is an upper bound.
* **silence at conviction**: from the peer's last frame to its conviction;
  the freeze falls somewhere in the 0.9 s between two PINGs, so this is the
  figure a detector's verdict is made of.
* **late**: each conviction's lateness after its own deadline, the one in
  force after the peer's last frame (``conn.watchdog_deadline``, read by the
  listener after every event of a frozen peer; for the baseline, the last
  read plus the timeout). This is what the machine and the event loop add to
  the detector's verdict, and the baseline for the first figure.
* **healthy peers lost**: connections of the processes that were not frozen
  that ended before the end of the watch, convicted or otherwise. Target
  (ours): none.

The subjects, each with its own server and fresh clients, one after another:

* the **baseline**: a raw Trio server that answers each PING and gives up on
  a peer silent for the timeout through a cancel scope whose deadline moves
  with every read, the idiom trio-heartbeat's watchdog is built on; its row
  shows what Trio and the machine give the simplest possible detector;
* a trio-heartbeat :class:`~trio_heartbeat.Server` with
  :class:`~trio_heartbeat.FixedTimeout`;
* the same with the default detector (named in its row).

Which connections are frozen: the frozen process opens its connections first,
and the others start only once the server has all of them (a completed
handshake, or an accepted socket for the baseline).

Nothing may outlive the benchmark, and nothing stays frozen: the frozen child
gets ``SIGCONT`` before any child is stopped, however the measurement ends
(an exception, a cancellation), and every child is stopped, then killed if
it does not exit (:func:`benchmarks._peers.open_child`). The frozen child also
runs in a process group of its own: should the benchmark process itself be
killed, that group is orphaned with a stopped member, and the kernel sends it
``SIGHUP`` and ``SIGCONT``, which ends it.

The benchmark process needs a descriptor per connection: it raises its soft
limit on open files to the hard limit (as each child does) and refuses to
start if that is too low. ``--scale`` scales the connections, frozen and
healthy alike (never fewer than one of each), the ramp and the settling
times; the timeout, and so the watch, stay as they are. ``--repeats`` does not apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Final

import trio

from trio_heartbeat import (
    Connection,
    ConnectionOptions,
    FailureDetector,
    FixedTimeout,
    HeartbeatProtocol,
    Role,
    Server,
)

from ._frozen_peers import (
    FROZEN_GROUP,
    HEALTHY_GROUP,
    PATIENCE,
    Watch,
    frozen_child,
    process_state,
    watched_connection,
)
from ._idle_peers import BACKLOG, HEARTBEAT, LOOPBACK
from ._peers import Child, open_child, raise_fd_limit
from ._report import Check, Result, Settings, machine_description

__all__ = [
    "AFTER",
    "CONNECTIONS",
    "FROZEN",
    "LEARNING_SETTLE",
    "MARGIN",
    "PER_CLIENT_PROCESS",
    "SUBJECTS",
    "Measurement",
    "Plan",
    "default_detector_name",
    "main",
    "run",
]

BENCHMARK: Final = "detection"
#: Connections at scale 1, frozen ones included.
CONNECTIONS: Final = 1_000
#: Frozen connections at scale 1: those of one client process.
FROZEN: Final = 100
#: The most connections one client process opens.
PER_CLIENT_PROCESS: Final = 100
#: The target: p99 of freeze -> conviction at most the timeout plus this (seconds).
MARGIN: Final = 0.050
#: Seconds over which the healthy connections are opened, at scale 1 (the frozen ones: half).
RAMP: Final = 2.0
#: Seconds between the last connection and the freeze, at scale 1.
SETTLE: Final = 5.0
#: The same for the default detector, which may learn: with the ramp before it,
#: the frozen peers have sent about 20 heartbeats by the freeze.
LEARNING_SETTLE: Final = 15.0
#: The shortest settling time at any scale.
MIN_SETTLE: Final = 1.0
#: Seconds watched after the timeout has passed since the freeze.
AFTER: Final = 1.0
#: Descriptors the benchmark process needs besides its connections (listener, pipes, ...).
FD_MARGIN: Final = 64


def default_detector_name() -> str:
    """The class name of the detector a connection gets when its options name none."""
    factory = ConnectionOptions().detector
    detector = (
        factory() if factory is not None else HeartbeatProtocol(Role.SERVER, now=0.0).detector
    )
    return type(detector).__name__


#: The subjects, in the order they run; the first is the baseline.
SUBJECTS: Final = {
    "watched": "raw Trio + silence deadline",
    "fixed": "trio-heartbeat, FixedTimeout",
    "default": "trio-heartbeat, default detector",
}
#: The detector factory of each trio-heartbeat subject (``None``: the default).
_DETECTORS: Final[dict[str, Callable[[], FailureDetector] | None]] = {
    "fixed": FixedTimeout,
    "default": None,
}


def _label(subject: str) -> str:
    if subject == "default":
        return f"{SUBJECTS[subject]} ({default_detector_name()})"
    return SUBJECTS[subject]


@dataclass(frozen=True, slots=True)
class Plan:
    """How many peers, frozen and not, and how long each phase lasts (seconds)."""

    frozen: int
    healthy: int
    ramp: float
    settle: float
    learning_settle: float
    timeout: float = HEARTBEAT.timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> Plan:
        """The plan for ``settings``: everything but the timeout scales."""
        fraction = min(1.0, settings.scale)
        return cls(
            frozen=settings.scaled(FROZEN),
            healthy=settings.scaled(CONNECTIONS - FROZEN),
            ramp=RAMP * fraction,
            settle=max(MIN_SETTLE, SETTLE * fraction),
            learning_settle=max(MIN_SETTLE, LEARNING_SETTLE * fraction),
        )

    def settle_for(self, subject: str) -> float:
        """Seconds from the last connection to the freeze: longer for a detector that learns."""
        return self.learning_settle if subject == "default" else self.settle

    @property
    def connections(self) -> int:
        """All the connections of one subject's server."""
        return self.frozen + self.healthy

    @property
    def healthy_shares(self) -> list[int]:
        """How many connections each of the processes that are not frozen opens."""
        processes = math.ceil(self.healthy / PER_CLIENT_PROCESS)
        share, extra = divmod(self.healthy, processes)
        return [share + (index < extra) for index in range(processes)]

    @property
    def watch(self) -> float:
        """Seconds from the freeze to the end of the measurement."""
        return self.timeout + AFTER

    @property
    def lifetime(self) -> float:
        """How long any child may live: every phase, and a generous margin."""
        return self.ramp + max(self.settle, self.learning_settle) + self.watch + 2 * PATIENCE


# -- the servers and the clients -----------------------------------------------------


async def _wait_closed(conn: Connection) -> None:
    await conn.wait_closed()


async def _serve(subject: str, plan: Plan, watch: Watch, nursery: trio.Nursery) -> int:
    """Start ``subject``'s server in ``nursery``; return its port."""
    if subject == "watched":
        handler = partial(watched_connection, watch, plan.timeout)
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, handler, 0, host=LOOPBACK, backlog=BACKLOG)
        )
        port: int = listeners[0].socket.getsockname()[1]
        return port
    factory = _DETECTORS[subject]
    # The default subject passes no detector at all: whatever ConnectionOptions defaults to.
    options = ConnectionOptions() if factory is None else ConnectionOptions(detector=factory)
    server = Server(
        _wait_closed,
        config=HEARTBEAT,
        options=options,
        max_connections=plan.connections + FD_MARGIN,
        listeners=[watch.on_event],
    )
    await nursery.start(partial(server.serve_tcp, 0, LOOPBACK, backlog=BACKLOG))
    return server.port


async def _connected(child: Child, share: int) -> None:
    ramp = json.loads(await child.expect("connected", within=PATIENCE))
    if ramp["failed"]:
        raise RuntimeError(
            f"{ramp['failed']} of {share} connections failed to open: {ramp['examples']}"
        )


# -- one subject -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one subject's server did with the frozen and the healthy peers (times in seconds)."""

    subject: str
    frozen: int
    healthy: int
    timeout: float
    detection: tuple[float, ...]
    silence: tuple[float, ...]
    lateness: tuple[float, ...]
    frozen_endings: Counter[str]
    healthy_convicted: int
    healthy_endings: Counter[str]

    @property
    def convicted(self) -> int:
        """Frozen peers convicted within the watch."""
        return len(self.detection)

    @property
    def missed(self) -> int:
        """Frozen peers not convicted within the watch (still up, or ended otherwise)."""
        return self.frozen - self.convicted

    @property
    def healthy_lost(self) -> int:
        """Healthy peers that ended within the watch, convicted or otherwise."""
        return self.healthy_endings.total()

    def detection_percentile(self, p: float) -> float:
        """The ``p``-th percentile (nearest rank) of freeze -> conviction; a missed peer is ``inf``."""
        return percentile([*self.detection, *[math.inf] * self.missed], p)


def percentile(samples: Sequence[float], p: float) -> float:
    """The ``p``-th percentile of ``samples`` by the nearest-rank method; ``nan`` if empty.

    >>> percentile([0.5, 0.1, 0.4, 0.2, 0.3], 50)
    0.3
    """
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def _summarise(subject: str, plan: Plan, watch: Watch, frozen_at: float) -> Measurement:
    detection: list[float] = []
    silence: list[float] = []
    lateness: list[float] = []
    frozen_endings: Counter[str] = Counter()
    healthy_endings: Counter[str] = Counter()
    healthy_convicted = 0
    until = frozen_at + plan.watch
    for peer in watch.peers.values():
        if peer.ended_at is not None and peer.ended_at > until:
            peer.ended_at = None  # ended once the watch was over: stopped by the benchmark
        if peer.group == FROZEN_GROUP:
            if peer.ended_at is None:
                frozen_endings["not convicted"] += 1
                continue
            frozen_endings[peer.ending] += 1
            if not peer.convicted:
                continue
            detection.append(peer.ended_at - frozen_at)
            if peer.last_received is not None:
                silence.append(peer.ended_at - peer.last_received)
            if peer.deadline is not None:
                lateness.append(peer.ended_at - peer.deadline)
        elif peer.ended_at is not None:
            healthy_endings[peer.ending] += 1
            healthy_convicted += peer.convicted
    return Measurement(
        subject=subject,
        frozen=plan.frozen,
        healthy=plan.healthy,
        timeout=plan.timeout,
        detection=tuple(detection),
        silence=tuple(silence),
        lateness=tuple(lateness),
        frozen_endings=frozen_endings,
        healthy_convicted=healthy_convicted,
        healthy_endings=healthy_endings,
    )


async def _measure(subject: str, plan: Plan) -> Measurement:
    try:
        return await _measure_in_nursery(subject, plan)
    except BaseExceptionGroup as group:
        # The server's nursery wraps whatever went wrong; one error is raised as itself.
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise


async def _measure_in_nursery(subject: str, plan: Plan) -> Measurement:
    gc.collect()  # the previous subject's garbage is not this one's to collect
    watch = Watch()
    frozen_at = math.nan
    client = ("--role", "client", "--kind", "watched" if subject == "watched" else "thb")
    async with trio.open_nursery() as nursery:
        port = str(await _serve(subject, plan, watch, nursery))
        async with AsyncExitStack() as stack:
            frozen = await stack.enter_async_context(
                frozen_child(
                    *client,
                    "--connections",
                    str(plan.frozen),
                    "--port",
                    port,
                    "--ramp",
                    f"{plan.ramp / 2}",
                    lifetime=plan.lifetime,
                )
            )
            await _connected(frozen, plan.frozen)
            await watch.wait_for(plan.frozen, "the frozen group")
            watch.labelling = HEALTHY_GROUP
            healthy = []
            for share in plan.healthy_shares:
                child = await stack.enter_async_context(
                    open_child(
                        "_idle_peers",
                        *client,
                        "--connections",
                        str(share),
                        "--port",
                        port,
                        "--ramp",
                        f"{plan.ramp}",
                        lifetime=plan.lifetime,
                    )
                )
                healthy.append((child, share))
            for child, share in healthy:
                await _connected(child, share)
            await watch.wait_for(plan.connections, "every peer")
            await trio.sleep(plan.settle_for(subject))
            frozen_at = trio.current_time()
            os.kill(frozen.pid, signal.SIGSTOP)
            await trio.sleep_until(frozen_at + plan.watch)
            watch.recording = False  # the connections closing from here on are not counted
            if process_state(frozen.pid) != "T":
                raise RuntimeError(f"the frozen client (pid {frozen.pid}) was not stopped")
        nursery.cancel_scope.cancel()
    return _summarise(subject, plan, watch, frozen_at)


async def _measure_all(plan: Plan) -> list[Measurement]:
    limit = raise_fd_limit()
    if limit < plan.connections + FD_MARGIN:
        raise RuntimeError(
            f"{plan.connections:,} connections need {plan.connections + FD_MARGIN:,} open files "
            f"in the benchmark process, but the hard limit (ulimit -Hn) is {limit:,}"
        )
    return [await _measure(subject, plan) for subject in SUBJECTS]


# -- reporting ------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return "-" if math.isnan(value) else "never" if math.isinf(value) else f"{value:.3f}"


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:,.1f}"


def checks(measurements: Sequence[Measurement]) -> list[Check]:
    """The targets, judged on every trio-heartbeat subject."""
    out: list[Check] = []
    for m in measurements:
        if m.subject == "watched":
            continue
        label = _label(m.subject)
        p99, worst = m.detection_percentile(99), m.detection_percentile(100)
        bound = m.timeout + MARGIN
        out.append(
            Check(
                BENCHMARK,
                f"{label}: every frozen peer convicted, "
                f"p99 freeze -> conviction <= timeout + {MARGIN * 1000:g} ms ({bound:g} s)",
                f"{m.convicted} of {m.frozen} convicted, p99 {_seconds(p99)} s, "
                f"max {_seconds(worst)} s",
                m.missed == 0 and p99 <= bound,
            )
        )
        others = m.healthy_lost - m.healthy_convicted
        out.append(
            Check(
                BENCHMARK,
                f"{label}: no healthy peer convicted",
                f"{m.healthy_convicted} of {m.healthy:,} convicted, {others} ended otherwise",
                m.healthy_lost == 0,
            )
        )
    return out


def describe(measurements: Sequence[Measurement], plan: Plan) -> str:
    """The table of every subject's figures, the endings seen, and the verdicts."""
    header = [
        "subject",
        "convicted",
        "p50 s",
        "p99 s",
        "max s",
        "silence p50 s",
        "silence max s",
        "late p50 ms",
        "late p99 ms",
        "late max ms",
        "healthy lost",
    ]
    table = [header]
    notes: list[str] = []
    for m in measurements:
        baseline = " (baseline)" if m.subject == "watched" else ""
        table.append(
            [
                _label(m.subject) + baseline,
                f"{m.convicted} of {m.frozen}",
                _seconds(m.detection_percentile(50)),
                _seconds(m.detection_percentile(99)),
                _seconds(m.detection_percentile(100)),
                _seconds(percentile(m.silence, 50)),
                _seconds(percentile(m.silence, 100)),
                _ms(percentile(m.lateness, 50)),
                _ms(percentile(m.lateness, 99)),
                _ms(percentile(m.lateness, 100)),
                f"{m.healthy_lost} of {m.healthy:,}",
            ]
        )
        for group, endings in (
            (FROZEN_GROUP, m.frozen_endings),
            (HEALTHY_GROUP, m.healthy_endings),
        ):
            for ending, count in endings.most_common():
                notes.append(f"  {m.subject}: {count:,} {group} peers: {ending}")
        if len(m.lateness) < m.convicted:
            unknown = m.convicted - len(m.lateness)
            notes.append(f"  {m.subject}: {unknown} convictions with no known deadline")
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        f"{BENCHMARK}: freeze -> conviction, {plan.connections:,} idle connections, "
        f"{plan.frozen:,} frozen by SIGSTOP, interval {HEARTBEAT.interval:g} s, "
        f"timeout {plan.timeout:g} s"
    ]
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  " + "  ".join(cells))
    lines += notes
    lines += [check.line for check in checks(measurements)]
    return "\n".join(lines)


def run(settings: Settings | None = None, *, settle: float | None = None) -> list[Result | Check]:
    """Freeze a tenth of the peers of each subject's server; print the table; return the targets.

    ``settle`` overrides the settling times the scale implies (seconds before
    the freeze: how much a learning detector has seen), for every subject. Every child process is
    resumed and stopped before this returns, also on error. Raises
    :class:`RuntimeError` if a connection fails to open or the frozen child
    did not stop, and :class:`~benchmarks._peers.ChildError` if a child dies
    or stops answering.
    """
    plan = Plan.from_settings(settings or Settings())
    if settle is not None:
        plan = dataclasses.replace(plan, settle=settle, learning_settle=settle)
    measurements = trio.run(_measure_all, plan)
    print(describe(measurements, plan))
    return [*checks(measurements)]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.bench_detection [--scale S] [--settle S]``: this benchmark alone."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_detection",
        description="Run the detection benchmark alone.",
    )
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help=f"seconds before the freeze (default: {SETTLE:g}, {LEARNING_SETTLE:g} for the default)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.scale <= 0 or (args.settle is not None and args.settle < 0):
        parser.error("--scale must be positive and --settle at least 0")
    print(machine_description())
    print(f"command: {' '.join(['python -m benchmarks.bench_detection', *argv])}")
    report = run(Settings(scale=args.scale), settle=args.settle)
    failed = [row for row in report if isinstance(row, Check) and not row.passed]
    print(f"targets met: {len(report) - len(failed)} of {len(report)}")


if __name__ == "__main__":
    main()
