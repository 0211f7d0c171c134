"""Failure detectors: false convictions and detection time on seeded synthetic traces.

Theory of operation
-------------------
A trace is the arrival times, at the receiver, of a peer's heartbeats: one is
due every second, and :data:`HEARTBEATS` are due per scenario at scale 1. Each
scenario is generated from its own ``random.Random(seed)``, so every run
replays the same traces:

* **clean LAN**: one-way delay uniform in [0.1 ms, 0.9 ms], no loss;
* **50 ms jitter, 0.1% loss**: delay uniform in 100 ms +- 50 ms (netem's
  ``delay 100ms 50ms``), each heartbeat lost with probability 0.001;
* **heavy tail, 1% loss**: delay lognormal with a median of 20 ms and a sigma
  of 0.8 (a p99.99 of 0.39 s, one in 10^6 later than 0.89 s), 1% loss;
* **sender stalls, 1% loss**: delay uniform in [0.1 ms, 0.9 ms]; after a
  heartbeat sent on time, with probability 0.001, the sender stalls from a
  uniformly random moment of the next second for 1 to 2 s (uniform); the
  heartbeats due during the stall go out together at its end, as one frame;
  1% loss.

Losses are independent, and a lost heartbeat never arrives (a datagram's
view: over TCP a loss shows as a retransmission a few hundred milliseconds
late, which is milder). Frames are delivered in order, as on a stream: a
heartbeat is never received before the one sent before it.

Each detector replays every trace through the real :class:`SilenceRule` of the
protocol core, which agreed on the peer's 1 s send interval (so its floor is
2 s): after each arrival, the rule's deadline minus that arrival is the
silence a peer that failed right then would need before it is convicted (the
*detection silence*), and the next arrival coming later than the deadline is a
*false conviction* (counted; the replay goes on). :class:`FixedTimeout` runs
with the default timeout of 3 s; the other detectors with a far cap of 60 s,
so that the detector alone decides. The subjects: FixedTimeout,
``PhiAccrualDetector()``, ``PhiAccrualDetector.akka()`` and
``AdaptiveDetector()``, and once more ``AdaptiveDetector()`` under the default
3 s timeout, as a connection with the default configuration runs it: the core
caps its verdict at the timeout, so where the detector would wait longer (a
lossy link) the timeout's false convictions come back.

The table prints, per scenario and detector, the false convictions, the
median and p99 detection silence, and the replay's cost per heartbeat (the
rule's ``heard`` and ``deadline`` with the detector behind them, plus the
replay loop, which is the same for everyone). The report's rows give the same
cost as a rate, beside FixedTimeout's as the baseline. The targets
(:data:`MEDIAN_TARGETS`, and no false conviction anywhere) are judged on
AdaptiveDetector; Akka's preset median is printed beside its figure.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from trio_heartbeat._adaptive import AdaptiveDetector
from trio_heartbeat._detectors import FailureDetector, FixedTimeout, PhiAccrualDetector
from trio_heartbeat._silence import SilenceRule

from ._report import Check, Result, Settings, Timing, format_results, machine_description

__all__ = [
    "DETECTORS",
    "HEARTBEATS",
    "MEDIAN_TARGETS",
    "SCENARIOS",
    "Outcome",
    "Scenario",
    "replay",
    "run",
    "trace",
]

BENCHMARK: Final = "detectors"
#: Heartbeats due per scenario at scale 1, one a second.
HEARTBEATS: Final = 1_000_000
PERIOD: Final = 1.0
#: The protocol timeout of the fixed timeout, and the far cap of the others.
TIMEOUT: Final = 3.0
FAR_CAP: Final = 60.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """How one trace is made: delays, losses and sender stalls."""

    name: str
    seed: int
    delay: Callable[[random.Random], float]
    loss: float = 0.0
    stall: float = 0.0  # probability, per heartbeat, that a stall follows it


def _lan(rng: random.Random) -> float:
    return rng.uniform(0.0001, 0.0009)


def _jitter(rng: random.Random) -> float:
    return rng.uniform(0.05, 0.15)


def _lognormal(rng: random.Random) -> float:
    return rng.lognormvariate(math.log(0.020), 0.8)


SCENARIOS: Final = (
    Scenario("clean LAN", 1, _lan),
    Scenario("50 ms jitter, 0.1% loss", 2, _jitter, loss=0.001),
    Scenario("heavy tail, 1% loss", 3, _lognormal, loss=0.01),
    Scenario("sender stalls, 1% loss", 4, _lan, loss=0.01, stall=0.001),
)

#: The largest acceptable median detection silence of AdaptiveDetector, per scenario.
MEDIAN_TARGETS: Final = {"clean LAN": 2.1, "50 ms jitter, 0.1% loss": 3.3}

FIXED: Final = "FixedTimeout (3 s)"
ADAPTIVE: Final = "AdaptiveDetector()"
ADAPTIVE_CAPPED: Final = "AdaptiveDetector(), 3 s timeout"
AKKA: Final = "PhiAccrualDetector.akka()"
#: The subjects: a name, a detector factory and the timeout the rule runs with.
DETECTORS: Final[tuple[tuple[str, Callable[[], FailureDetector], float], ...]] = (
    (FIXED, FixedTimeout, TIMEOUT),
    ("PhiAccrualDetector()", PhiAccrualDetector, FAR_CAP),
    (AKKA, PhiAccrualDetector.akka, FAR_CAP),
    (ADAPTIVE, AdaptiveDetector, FAR_CAP),
    (ADAPTIVE_CAPPED, AdaptiveDetector, TIMEOUT),
)


def trace(scenario: Scenario, heartbeats: int) -> array[float]:
    """The arrival times of ``heartbeats`` due heartbeats, lost ones left out."""
    rng = random.Random(scenario.seed)
    arrivals: array[float] = array("d")
    stall_start = stall_end = -1.0
    last_sent = last_arrival = -math.inf
    for index in range(heartbeats):
        sent = due = index * PERIOD
        if stall_start < due < stall_end:
            sent = stall_end  # held up by the stall, out at its end
            if sent == last_sent:
                continue  # due during the same stall: one frame
        elif scenario.stall and rng.random() < scenario.stall:
            # The sender stalls some time before the next heartbeat is due.
            stall_start = due + rng.random() * PERIOD
            stall_end = stall_start + rng.uniform(1.0, 2.0)
        last_sent = sent
        if scenario.loss and rng.random() < scenario.loss:
            continue
        last_arrival = max(last_arrival, sent + scenario.delay(rng))
        arrivals.append(last_arrival)
    return arrivals


@dataclass(frozen=True, slots=True)
class Outcome:
    """One detector's replay of one trace."""

    false_convictions: int
    median: float
    p99: float
    elapsed_ns: int
    heartbeats: int

    @property
    def us_per_heartbeat(self) -> float:
        """The replay's cost per arrival, in microseconds."""
        return self.elapsed_ns / 1000 / max(1, self.heartbeats)


def replay(arrivals: Sequence[float], detector: FailureDetector, timeout: float) -> Outcome:
    """Feed ``arrivals`` to a :class:`SilenceRule` with ``detector``; count and measure."""
    rule = SilenceRule(detector, timeout)
    rule.agree(PERIOD)
    offsets: array[float] = array("d")
    append = offsets.append
    heard = rule.heard
    false = 0
    deadline = math.inf
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for arrival in arrivals:
            if arrival > deadline:
                false += 1
            heard(arrival)
            deadline = rule.deadline
            append(deadline - arrival)
        elapsed = time.perf_counter_ns() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    ordered = sorted(offsets)
    return Outcome(
        false_convictions=false,
        median=percentile(ordered, 50),
        p99=percentile(ordered, 99),
        elapsed_ns=max(1, elapsed),
        heartbeats=len(offsets),
    )


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of sorted values."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _table(outcomes: dict[str, dict[str, Outcome]], heartbeats: int) -> str:
    header = ("detector", "false", "median s", "p99 s", "us/heartbeat")
    lines = [
        f"{BENCHMARK}: false convictions and detection silence, "
        f"{heartbeats:,} heartbeats per scenario, one a second"
    ]
    for scenario, row in outcomes.items():
        table = [header]
        for name, outcome in row.items():
            table.append(
                (
                    name,
                    f"{outcome.false_convictions:,}",
                    f"{outcome.median:.3f}",
                    f"{outcome.p99:.3f}",
                    f"{outcome.us_per_heartbeat:.2f}",
                )
            )
        widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
        lines.append(f"  {scenario}")
        for cells in table:
            text = [cells[0].ljust(widths[0])]
            text += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
            lines.append("    " + "  ".join(text))
    return "\n".join(lines)


def checks(outcomes: dict[str, dict[str, Outcome]]) -> list[Check]:
    """The targets, judged on AdaptiveDetector, with Akka's preset beside the medians."""
    out: list[Check] = []
    for scenario, row in outcomes.items():
        adaptive = row[ADAPTIVE]
        out.append(
            Check(
                BENCHMARK,
                f"{scenario}: no false conviction",
                f"{adaptive.false_convictions:,}",
                adaptive.false_convictions == 0,
            )
        )
    for scenario, bound in MEDIAN_TARGETS.items():
        adaptive = outcomes[scenario][ADAPTIVE]
        out.append(
            Check(
                BENCHMARK,
                f"{scenario}: median detection <= {bound:g} s",
                f"{adaptive.median:.3f} s (Akka's preset {outcomes[scenario][AKKA].median:.3f} s)",
                adaptive.median <= bound,
            )
        )
    return out


def run(settings: Settings | None = None) -> list[Result | Check]:
    """Replay every scenario through every detector; print the table.

    Returns the cost rows (heartbeats replayed per second, FixedTimeout as the
    baseline of each scenario), then the targets, printed with the table.
    """
    settings = settings or Settings()
    heartbeats = settings.scaled(HEARTBEATS)
    outcomes: dict[str, dict[str, Outcome]] = {}
    results: list[Result | Check] = []
    for scenario in SCENARIOS:
        arrivals = trace(scenario, heartbeats)
        row = outcomes[scenario.name] = {}
        baseline: Result | None = None
        for name, factory, timeout in DETECTORS:
            outcome = row[name] = replay(arrivals, factory(), timeout)
            result = Result(
                BENCHMARK,
                f"{scenario.name}: replay cost",
                name,
                "heartbeats",
                outcome.heartbeats,
                0,
                Timing((outcome.elapsed_ns,)),
                baseline,
            )
            baseline = baseline or result
            results.append(result)
    found = checks(outcomes)
    print(_table(outcomes, heartbeats))
    print("\n".join(check.line for check in found))
    print()
    return [*results, *found]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.bench_detectors [--scale S]``: this benchmark alone."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_detectors",
        description="Run the failure detector benchmark alone.",
    )
    parser.add_argument("--scale", type=float, default=1.0)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    print(machine_description())
    print(f"command: {' '.join(['python -m benchmarks.bench_detectors', *argv])}")
    report = run(Settings(scale=args.scale))
    print(format_results([row for row in report if isinstance(row, Result)]))


if __name__ == "__main__":
    main()
