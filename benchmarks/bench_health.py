"""Health and breakers: a check-in, and a call through a breaker, against the least they cost.

Theory of operation
-------------------
Both are on the application's hot path: a worker checks in every time round
its loop, and every request to a peer goes through its breaker. Each is timed
beside the least any implementation of the same job must do, in the same run:

* **check-in**: :meth:`HealthComponent.check_in` on a monitor of 1,000
  components (each one in turn, with the monitor's timer task running), against
  a bare software watchdog that stores ``now + period`` in a dict under the
  component's name: read the clock, write the deadline. The target is
  :data:`CHECK_IN_TARGET` of the bare rate.
* **breaker call**: ``await breaker.call(fn)`` on a CLOSED :class:`Breaker`
  (the heartbeat defaults: a window of 20 calls, rates from 10) against a bare
  breaker with the same rules: an ``if`` on a state flag, the clock read before
  and after, a ring of the last 20 outcomes with running totals, and the
  failure and slow-call rules as integer comparisons, around the same
  ``await fn()``. ``fn`` is an async function
  that returns at once, so what is timed is the breaker's own work. The target
  is :data:`CALL_TARGET` of the bare rate.

Each sample runs a loop of calls inside one ``trio.run``; the run's own cost is
the same for both subjects of a case and is amortized over the loop.
"""

from __future__ import annotations

from functools import partial
from typing import Final

import trio

from trio_heartbeat import Breaker, HealthComponent, open_health_monitor

from ._report import Result, Settings, measure_interleaved

__all__ = ["CALL_TARGET", "CHECK_IN_TARGET", "run"]

BENCHMARK: Final = "health"
#: The least acceptable check-in rate, as a fraction of the bare watchdog's.
CHECK_IN_TARGET: Final = 0.25
#: The least acceptable rate of calls through a breaker, as a fraction of the bare one's.
CALL_TARGET: Final = 0.25
#: Components on the monitor.
COMPONENTS: Final = 1000
#: Calls per sample at scale 1.
CALLS_PER_SAMPLE: Final = 20_000


async def _answer() -> int:
    return 1


def _check_ins(calls: int) -> int:
    async def main() -> int:
        async with open_health_monitor() as health:
            components: list[HealthComponent] = [
                health.register(f"worker-{n}", 3600.0) for n in range(COMPONENTS)
            ]
            for n in range(calls):
                components[n % COMPONENTS].check_in()
            return len(health)

    return trio.run(main)


def _bare_check_ins(calls: int) -> int:
    async def main() -> int:
        names = [f"worker-{n}" for n in range(COMPONENTS)]
        deadlines = dict.fromkeys(names, 0.0)
        clock = trio.current_time
        for n in range(calls):
            deadlines[names[n % COMPONENTS]] = clock() + 3600.0
        return len(deadlines)

    return trio.run(main)


def _breaker_calls(calls: int) -> int:
    async def main() -> int:
        breaker = Breaker()
        total = 0
        for _ in range(calls):
            total += await breaker.call(_answer)
        return total

    return trio.run(main)


def _bare_breaker_calls(calls: int) -> int:
    async def main() -> int:
        # A count window of 20 outcomes as a ring with running totals, and the
        # failure and slow-call rules as integer comparisons: what any breaker with
        # these rules must keep and check per call.
        size, closed, total = 20, True, 0
        failed, slow = [False] * size, [False] * size
        failures = slow_calls = recorded = 0
        clock = trio.current_time
        for n in range(calls):
            if not closed:
                raise RuntimeError("the bare breaker never opens")
            started = clock()
            total += await _answer()
            was_slow = clock() - started > 10.0
            slot = n % size
            failures -= failed[slot]
            slow_calls += was_slow - slow[slot]
            failed[slot], slow[slot] = False, was_slow
            recorded = min(recorded + 1, size)
            if recorded >= 10 and (2 * failures >= recorded or slow_calls == recorded):
                closed = False
        return total

    return trio.run(main)


def run(settings: Settings | None = None) -> list[Result]:
    """Time both cases; each subject row names its bare baseline and its target."""
    settings = settings or Settings()
    calls = settings.scaled(CALLS_PER_SAMPLE)
    if _breaker_calls(calls) != calls or _bare_breaker_calls(calls) != calls:
        raise RuntimeError("a call through a breaker did not return its answer")
    if _check_ins(calls) != COMPONENTS:
        raise RuntimeError("the monitor lost a component")
    results: list[Result] = []
    cases = [
        ("check-in (1,000 components)", "bare watchdog (dict)", _bare_check_ins, _check_ins,
         "HealthComponent.check_in", CHECK_IN_TARGET),
        ("call through a breaker", "bare breaker (ring of 20)", _bare_breaker_calls,
         _breaker_calls, "Breaker.call", CALL_TARGET),
    ]  # fmt: skip
    for case, bare_name, bare, ours, our_name, target in cases:
        timings = measure_interleaved(
            {bare_name: partial(bare, calls), our_name: partial(ours, calls)}, settings.repeats
        )
        baseline = Result(BENCHMARK, case, bare_name, "calls", calls, 0, timings[bare_name])
        results.append(baseline)
        results.append(
            Result(
                BENCHMARK, case, our_name, "calls", calls, 0, timings[our_name], baseline, target
            )
        )
    return results
