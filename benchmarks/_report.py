"""Timing and reporting shared by every benchmark.

Theory of operation
-------------------
A benchmark times a few *subjects* on the same input in the same process: our
code, and a baseline that does the least any implementation of the same job
must do. Absolute rates only describe the machine that produced them; the
ratio to a baseline measured in the same run is what carries over from one
machine to another, so every figure is printed both ways.

Samples of the subjects are interleaved (A, B, C, A, B, C, ...) rather than
taken in blocks, so that a CPU that speeds up or slows down during the run
(frequency scaling, a noisy neighbour) affects every subject alike. Each sample
is one call timed with :func:`time.perf_counter_ns`. Garbage collection is off
while sampling, as :mod:`timeit` does, so that a collection triggered by one
subject is not billed to another. Every subject is called once untimed first,
to warm caches and let the benchmark check its output.

The headline figure is the best sample, the one least disturbed by the rest of
the machine; the median is shown beside it as a measure of the noise. Ratios
are ratios of rates, so a subject faster than its baseline has a ratio above 1.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

import trio_heartbeat

__all__ = [
    "Check",
    "Result",
    "Settings",
    "Timing",
    "format_results",
    "machine_description",
    "measure_interleaved",
]


@dataclass(frozen=True, slots=True)
class Settings:
    """How much work a benchmark does: a whole run, or a smoke test.

    ``scale`` multiplies the work done per sample (frames per buffer, messages
    per connection, ...); ``repeats`` is the number of timed samples per
    subject. The defaults are the ones the published figures were taken with.

    >>> Settings(scale=0.001).scaled(100_000)
    100
    """

    scale: float = 1.0
    repeats: int = 20

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, not {self.scale}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, not {self.repeats}")

    def scaled(self, count: int) -> int:
        """``count`` times the scale, and never less than one."""
        return max(1, round(count * self.scale))


@dataclass(frozen=True, slots=True)
class Timing:
    """The samples of one subject, in nanoseconds per sample."""

    samples_ns: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.samples_ns:
            raise ValueError("a timing needs at least one sample")

    @property
    def best_ns(self) -> int:
        """The fastest sample: the one least disturbed by the rest of the machine."""
        return max(1, min(self.samples_ns))

    @property
    def median_ns(self) -> float:
        """The median sample."""
        return max(1.0, statistics.median(self.samples_ns))


def measure_interleaved(
    subjects: Mapping[str, Callable[[], object]], repeats: int
) -> dict[str, Timing]:
    """Time each subject ``repeats`` times, interleaving their samples.

    Each subject is called once untimed first. Garbage collection is disabled
    while sampling and restored to its previous state afterwards, also when a
    subject raises; the exception propagates unchanged.

    >>> timings = measure_interleaved({"noop": lambda: None}, repeats=3)
    >>> len(timings["noop"].samples_ns)
    3
    """
    samples: dict[str, list[int]] = {name: [] for name in subjects}
    for subject in subjects.values():
        subject()
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, subject in subjects.items():
                start = clock()
                subject()
                samples[name].append(clock() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing(tuple(taken)) for name, taken in samples.items()}


@dataclass(frozen=True, slots=True)
class Result:
    """One row of a report: a subject's rate on one case, and its baseline.

    ``operations`` and ``nbytes`` are the work done by one sample (frames and
    wire bytes, for the codec). ``baseline`` is the row this one is compared
    with, measured in the same run; a row without one *is* a baseline.
    ``target``, when set, is the least acceptable ratio to the baseline.
    """

    benchmark: str
    case: str
    subject: str
    unit: str
    operations: int
    nbytes: int
    timing: Timing
    baseline: Result | None = None
    target: float | None = None

    @property
    def rate(self) -> float:
        """Operations per second, from the best sample."""
        return self.operations * 1e9 / self.timing.best_ns

    @property
    def median_rate(self) -> float:
        """Operations per second, from the median sample."""
        return self.operations * 1e9 / self.timing.median_ns

    @property
    def bytes_per_second(self) -> float:
        """Bytes per second, from the best sample."""
        return self.nbytes * 1e9 / self.timing.best_ns

    @property
    def ns_per_operation(self) -> float:
        """Nanoseconds per operation, from the best sample."""
        return self.timing.best_ns / self.operations

    @property
    def spread(self) -> float:
        """How far the median sample is above the best, as a fraction of the best."""
        return self.timing.median_ns / self.timing.best_ns - 1.0

    @property
    def ratio(self) -> float:
        """This rate over the baseline's rate (best samples); 1.0 for a baseline."""
        if self.baseline is None:
            return 1.0
        return self.rate / self.baseline.rate

    @property
    def median_ratio(self) -> float:
        """This rate over the baseline's rate, from the median samples."""
        if self.baseline is None:
            return 1.0
        return self.median_rate / self.baseline.median_rate

    @property
    def passed(self) -> bool | None:
        """Whether :attr:`ratio` meets :attr:`target`; ``None`` when there is no target."""
        if self.target is None:
            return None
        return self.ratio >= self.target

    @property
    def verdict(self) -> str:
        """``"baseline"``, ``">= 0.50 PASS"``, ``">= 0.50 FAIL"``, or ``""`` without a target."""
        if self.baseline is None:
            return "baseline"
        if self.target is None:
            return ""
        return f">= {self.target:.2f} {'PASS' if self.passed else 'FAIL'}"


@dataclass(frozen=True, slots=True)
class Check:
    """An absolute target, such as a bound on memory per connection, and how it went.

    Printed by its benchmark beside the figures it judges, and counted in the
    report's summary with the ratio targets of the :class:`Result` rows.
    """

    benchmark: str
    target: str
    figure: str
    passed: bool

    @property
    def line(self) -> str:
        """``"  target: <target>: <figure> PASS"`` (or ``FAIL``)."""
        return f"  target: {self.target}: {self.figure} {'PASS' if self.passed else 'FAIL'}"


def _cpu_model() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown CPU"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        # "model name" on x86; other architectures use other keys.
        if key.strip() in ("model name", "Model", "cpu model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or "unknown CPU"


def machine_description() -> str:
    """One line naming the machine and software a run was measured on.

    The CPU model comes from ``/proc/cpuinfo`` where there is one; "usable"
    counts the cores this process may run on, which a container may restrict.
    """
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = cores
    return (
        f"CPU: {_cpu_model()}, {cores} cores ({usable} usable); "
        f"{platform.system()} {platform.release()}; "
        f"{platform.python_implementation()} {platform.python_version()}; "
        f"trio {trio.__version__}; trio-heartbeat {trio_heartbeat.__version__}"
    )


_COLUMNS = ("subject", "{unit}/s", "MB/s", "ns/{op}", "spread", "ratio", "(median)", "target")


def _row(result: Result) -> tuple[str, ...]:
    return (
        result.subject,
        f"{result.rate:,.0f}",
        f"{result.bytes_per_second / 1e6:,.1f}" if result.nbytes else "-",
        f"{result.ns_per_operation:,.1f}",
        f"{result.spread:.1%}",
        f"{result.ratio:.2f}",
        f"({result.median_ratio:.2f})",
        result.verdict,
    )


def _format_case(case: Sequence[Result]) -> list[str]:
    first = case[0]
    op = first.unit.removesuffix("s")
    header = tuple(column.format(unit=first.unit, op=op) for column in _COLUMNS)
    rows = [header, *(_row(result) for result in case)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    volume = f"{first.operations:,} {first.unit}"
    if first.nbytes:
        volume += f", {first.nbytes / 1e6:,.1f} MB"
    lines = [
        f"{first.benchmark}: {first.case} "
        f"({volume} per sample, best of {len(first.timing.samples_ns)})"
    ]
    for row in rows:
        # Names read best left-aligned, figures right-aligned.
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:-1], strict=True)]
        cells.append(row[-1])
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def format_results(results: Sequence[Result]) -> str:
    """Render results as one table per case, in the order they were produced.

    Rows of the same benchmark and case are grouped under one heading; the
    columns are the rate, the throughput in MB/s (10**6 bytes), the time per
    operation, the spread of the samples, the ratio to the baseline from the
    best samples and (in parentheses) from the medians, and the verdict.
    """
    cases: dict[tuple[str, str], list[Result]] = {}
    for result in results:
        cases.setdefault((result.benchmark, result.case), []).append(result)
    blocks = ["\n".join(_format_case(case)) for case in cases.values()]
    return "\n\n".join(blocks)
