"""Run the benchmarks: ``python -m benchmarks [NAME ...] [--scale S] [--repeats N]``.

With no names, every ``bench_<name>.py`` module in this package runs, in
alphabetical order. The report starts with the machine and the exact command,
so that a pasted report says where its figures came from. The exit status is
0 even when a target is missed: timings are for people to read, not for CI to
gate on; a benchmark whose code gives a wrong answer raises and exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ._report import Check, Result, Settings, format_results, machine_description

_PREFIX = "bench_"
_DEFAULTS = Settings()


def available() -> list[str]:
    """The names of the benchmark modules, without their ``bench_`` prefix."""
    package = Path(__file__).parent
    return sorted(
        info.name.removeprefix(_PREFIX)
        for info in pkgutil.iter_modules([str(package)])
        if info.name.startswith(_PREFIX)
    )


def load(name: str) -> Callable[[Settings], Sequence[Result | Check]]:
    """The ``run`` function of the benchmark called ``name``: its rows, then its absolute targets."""
    module = importlib.import_module(f"{__package__}.{_PREFIX}{name}")
    run: Callable[[Settings], Sequence[Result | Check]] = module.run
    return run


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    names = available()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run trio-heartbeat's benchmarks and print each figure beside its baseline.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(names)})",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=_DEFAULTS.scale,
        help="multiply the work per sample by this (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=_DEFAULTS.repeats,
        help="timed samples per subject (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.scale <= 0 or args.repeats < 1:
        parser.error("--scale must be positive and --repeats at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen benchmarks, print the report; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    settings = Settings(scale=args.scale, repeats=args.repeats)
    print(machine_description())
    print(f"command: {' '.join(['python -m benchmarks', *argv])}")
    results: list[Result] = []
    checks: list[Check] = []
    for name in args.names or available():
        started = time.perf_counter()
        batch = load(name)(settings)
        rows = [row for row in batch if isinstance(row, Result)]
        print(f"\n{format_results(rows)}")
        print(f"\n({name}: {time.perf_counter() - started:.1f} s)")
        results += rows
        checks += [row for row in batch if isinstance(row, Check)]
    # Every target printed is counted: the ratios of the tables and the
    # absolute targets the benchmarks printed with their own figures.
    judged = [result for result in results if result.passed is not None]
    missed = [result for result in judged if not result.passed]
    failed = [check for check in checks if not check.passed]
    met = len(judged) + len(checks) - len(missed) - len(failed)
    print(f"\ntargets met: {met} of {len(judged) + len(checks)}")
    for result in missed:
        print(f"  FAIL {result.benchmark}: {result.case}, {result.subject}: {result.ratio:.2f}")
    for check in failed:
        print(f"  FAIL {check.benchmark}: {check.target}: {check.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
