"""Benchmarks for trio-heartbeat: not tests, and never run by pytest.

Run them all with ``python -m benchmarks``, or some by name with
``python -m benchmarks codec``. Each ``bench_<name>.py`` module exposes
``run(settings: Settings) -> list[Result]``; the shared timing and the report
format live in :mod:`benchmarks._report`. Every figure is printed beside a
baseline measured in the same run, because absolute numbers only mean
something on the machine that produced them. See ``docs/benchmarks.md``.
"""

from __future__ import annotations
