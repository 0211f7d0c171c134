"""The Trio circuit breaker (``_circuit``): exact virtual times for every move.

Every test runs under ``autojump_clock``, so each ``trio.current_time()``
assert is exact. The config below has no jitter: a trip opens for 5 s, then
10 s, 20 s, ... up to 60 s.
"""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import trio
import trio.testing

from trio_heartbeat._breaker import BreakerConfig, BreakerState, BreakerTransition
from trio_heartbeat._circuit import (
    HEARTBEAT_BREAKER_CONFIG,
    Breaker,
    default_record_failure,
)
from trio_heartbeat._errors import CircuitOpen, HeartbeatError

S = BreakerState

CONFIG = BreakerConfig(
    window_size=4,
    minimum_number_of_calls=4,
    permitted_calls_in_half_open=2,
    slow_call_duration=2.0,
    slow_call_rate_threshold=50.0,
    wait_in_open=5.0,
    max_wait_in_open=60.0,
    open_jitter=0.0,
)


class Boom(Exception):
    pass


def state_of(breaker: Breaker) -> BreakerState:
    """The state as of now (a call, so that type checkers do not narrow it)."""
    return breaker.state


async def fail_after_sleep(delay: float) -> None:
    await trio.sleep(delay)
    raise Boom("peer said no")


async def answer_after_sleep(delay: float) -> str:
    await trio.sleep(delay)
    return "answer"


async def trip(breaker: Breaker) -> None:
    """Four calls failing 1 s each: the breaker opens at the end of the fourth."""
    for _ in range(4):
        with pytest.raises(Boom):
            await breaker.call(fail_after_sleep, 1.0)


async def test_opens_after_failures_at_the_exact_time(autojump_clock: trio.abc.Clock) -> None:
    """The fourth failure opens the breaker at its own end, for exactly wait_in_open."""
    breaker = Breaker(CONFIG)
    heard: list[BreakerTransition] = []
    breaker.add_listener(heard.append)
    for _ in range(3):
        with pytest.raises(Boom):
            await breaker.call(fail_after_sleep, 1.0)
        assert state_of(breaker) is S.CLOSED
    with pytest.raises(Boom):
        await breaker.call(fail_after_sleep, 1.0)
    assert trio.current_time() == 4.0
    assert state_of(breaker) is S.OPEN
    assert [(t.previous, t.state, t.at) for t in heard] == [(S.CLOSED, S.OPEN, 4.0)]
    assert heard[0].reason.startswith("failure rate 100.0%")
    stats = breaker.statistics()
    assert (stats.open_until, stats.trips, stats.failures) == (9.0, 1, 4)


async def test_rejects_with_circuit_open_and_retry_after(autojump_clock: trio.abc.Clock) -> None:
    """While OPEN nothing is called, and retry_after counts down to open_until."""
    breaker = Breaker(CONFIG)
    await trip(breaker)
    await trio.sleep(1.5)
    called = []

    async def record() -> None:
        called.append(trio.current_time())

    with pytest.raises(CircuitOpen) as info:
        await breaker.call(record)
    assert type(info.value) is CircuitOpen
    assert isinstance(info.value, HeartbeatError)
    assert (info.value.state, info.value.retry_after) == (S.OPEN, 3.5)
    assert called == []
    assert trio.current_time() == 5.5  # a rejection takes no time
    assert breaker.statistics().rejected == 1


async def test_half_open_after_the_wait_then_closes(autojump_clock: trio.abc.Clock) -> None:
    """At open_until the breaker admits two trials (no third); their success closes it."""
    breaker = Breaker(CONFIG)
    await trip(breaker)
    await trio.sleep_until(8.999)
    assert state_of(breaker) is S.OPEN
    await trio.sleep_until(9.0)
    assert state_of(breaker) is S.HALF_OPEN
    assert breaker.statistics().state_since == 9.0
    results: list[str] = []

    async with trio.open_nursery() as nursery:

        async def trial() -> None:
            results.append(await breaker.call(answer_after_sleep, 1.0))

        nursery.start_soon(trial)
        nursery.start_soon(trial)
        await trio.sleep(0.5)
        with pytest.raises(CircuitOpen) as info:
            await breaker.call(answer_after_sleep, 1.0)
        assert (info.value.state, info.value.retry_after) == (S.HALF_OPEN, None)
    assert results == ["answer", "answer"]
    assert trio.current_time() == 10.0
    assert state_of(breaker) is S.CLOSED
    assert breaker.statistics().state_since == 10.0


async def test_reopens_with_a_longer_wait(autojump_clock: trio.abc.Clock) -> None:
    """Failed trials open it again for twice as long; a close resets the wait."""
    breaker = Breaker(CONFIG)
    await trip(breaker)
    await trio.sleep_until(9.0)
    for _ in range(2):
        with pytest.raises(Boom):
            await breaker.call(fail_after_sleep, 1.0)
    assert trio.current_time() == 11.0
    stats = breaker.statistics()
    assert (stats.state, stats.open_until, stats.consecutive_trips) == (S.OPEN, 21.0, 2)
    await trio.sleep_until(21.0)
    for _ in range(2):
        await breaker.call(answer_after_sleep, 0.0)
    assert state_of(breaker) is S.CLOSED
    await trip(breaker)
    assert breaker.statistics().open_until == trio.current_time() + 5.0


async def test_cancelled_call_is_released_not_failed(autojump_clock: trio.abc.Clock) -> None:
    """A cancelled call counts for nothing in CLOSED and gives its trial slot back."""
    breaker = Breaker(CONFIG)
    for _ in range(5):
        with trio.move_on_after(1.0):
            await breaker.call(trio.sleep_forever)
    stats = breaker.statistics()
    assert (stats.state, stats.calls, stats.in_flight) == (S.CLOSED, 0, 0)

    await trip(breaker)
    await trio.sleep(5.0)
    assert state_of(breaker) is S.HALF_OPEN
    with trio.move_on_after(1.0) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(breaker.call, trio.sleep_forever)
            nursery.start_soon(breaker.call, trio.sleep_forever)
    assert scope.cancelled_caught
    stats = breaker.statistics()
    assert (stats.state, stats.calls, stats.in_flight) == (S.HALF_OPEN, 0, 0)
    # Both slots are free again: two trials run and close the breaker.
    for _ in range(2):
        await breaker.call(answer_after_sleep, 0.0)
    assert state_of(breaker) is S.CLOSED


async def test_cancelled_before_admission_takes_nothing(autojump_clock: trio.abc.Clock) -> None:
    """Entering under a cancelled scope raises Cancelled at the checkpoint, no permit taken."""
    breaker = Breaker(CONFIG)
    with trio.CancelScope() as scope:
        scope.cancel()
        async with breaker:
            pytest.fail("admitted under a cancelled scope")  # pragma: no cover
    assert breaker.statistics().in_flight == 0


async def test_slow_calls_counted_by_duration(autojump_clock: trio.abc.Clock) -> None:
    """Successes longer than slow_call_duration are slow; half of four trips the breaker."""
    breaker = Breaker(CONFIG)
    for delay in (2.0, 2.5, 1.0, 3.0):  # 2.0 is not *longer* than 2.0
        await breaker.call(answer_after_sleep, delay)
    assert trio.current_time() == 8.5
    stats = breaker.statistics()
    assert (stats.state, stats.slow_calls, stats.failures) == (S.OPEN, 2, 0)
    assert stats.open_until == 13.5


async def test_fallback_when_rejected(autojump_clock: trio.abc.Clock) -> None:
    """An open breaker answers through the fallback, which gets the CircuitOpen."""
    breaker = Breaker(CONFIG)
    await trip(breaker)
    seen: list[Exception] = []

    async def degraded(exc: Exception) -> str:
        seen.append(exc)
        return "cached"

    answer = await breaker.call_with_fallback(answer_after_sleep, 1.0, fallback=degraded)
    assert answer == "cached"
    assert [type(exc) for exc in seen] == [CircuitOpen]
    assert trio.current_time() == 4.0


async def test_fallback_when_the_call_fails(autojump_clock: trio.abc.Clock) -> None:
    """A failed call is still recorded, then the fallback answers (unless told not to)."""
    breaker = Breaker(CONFIG)
    seen: list[Exception] = []

    async def degraded(exc: Exception) -> None:
        seen.append(exc)

    await breaker.call_with_fallback(fail_after_sleep, 1.0, fallback=degraded)
    assert [type(exc) for exc in seen] == [Boom]
    assert breaker.statistics().failures == 1
    with pytest.raises(Boom):
        await breaker.call_with_fallback(fail_after_sleep, 1.0, fallback=degraded, on_failure=False)
    assert len(seen) == 1
    assert breaker.statistics().failures == 2
    ok = await breaker.call_with_fallback(answer_after_sleep, 1.0, fallback=degraded)
    assert ok == "answer"


async def test_predicate_decides_what_is_a_failure(autojump_clock: trio.abc.Clock) -> None:
    """An exception the predicate refuses is released and propagates past the fallback."""
    breaker = Breaker(CONFIG, record_failure=lambda exc: not isinstance(exc, KeyError))

    async def lookup() -> None:
        raise KeyError("missing")

    async def degraded(exc: Exception) -> None:  # pragma: no cover - must not run
        raise AssertionError(exc)

    with pytest.raises(KeyError):
        await breaker.call_with_fallback(lookup, fallback=degraded)
    stats = breaker.statistics()
    assert (stats.calls, stats.failures, stats.in_flight) == (0, 0, 0)


async def test_raising_predicate_releases_the_permit(autojump_clock: trio.abc.Clock) -> None:
    """If record_failure itself raises, its error propagates and no permit is left held."""

    def broken(exc: BaseException) -> bool:
        raise RuntimeError("bad predicate")

    breaker = Breaker(CONFIG, record_failure=broken)
    with pytest.raises(RuntimeError, match="bad predicate") as info:
        await breaker.call(fail_after_sleep, 0.0)
    assert isinstance(info.value.__context__, Boom)
    assert breaker.statistics().in_flight == 0


def test_default_predicate() -> None:
    """Exceptions count; Cancelled-like BaseExceptions and KeyboardInterrupt do not."""
    assert default_record_failure(Boom())
    assert default_record_failure(ExceptionGroup("g", [Boom()]))
    assert not default_record_failure(KeyboardInterrupt())
    assert not default_record_failure(BaseExceptionGroup("g", [KeyboardInterrupt()]))


async def test_raising_listener_is_logged_and_harmless(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener that raises is logged; later listeners run and the breaker moves on."""
    breaker = Breaker(CONFIG)

    def broken(transition: BreakerTransition) -> None:
        raise RuntimeError("listener bug")

    heard: list[BreakerState] = []
    breaker.add_listener(broken)
    breaker.add_listener(lambda transition: heard.append(transition.state))
    with caplog.at_level(logging.ERROR, logger="trio_heartbeat"):
        await trip(breaker)
    assert heard == [S.OPEN]
    assert state_of(breaker) is S.OPEN
    assert [r.name for r in caplog.records] == ["trio_heartbeat"]
    assert "listener bug" in caplog.text
    opened = BreakerTransition(S.CLOSED, S.OPEN, 4.0, "failure rate 100.0% >= 50.0%")
    record = caplog.records[0]
    assert record.getMessage() == f"breaker listener {broken!r} failed on {opened!r}"
    assert record.exc_info is not None
    assert type(record.exc_info[1]) is RuntimeError
    breaker.remove_listener(broken)
    await trio.sleep_until(9.0)
    assert state_of(breaker) is S.HALF_OPEN
    assert heard == [S.OPEN, S.HALF_OPEN]
    assert len(caplog.records) == 1


async def test_wait_state_wakes_at_open_until(autojump_clock: trio.abc.Clock) -> None:
    """A waiter for HALF_OPEN returns at exactly open_until, with nobody else calling; a
    waiter for the state the breaker is already in returns at once (a virtual-time bound
    turns a waiter that never looks at the state into a failure, not a hang)."""
    breaker = Breaker(CONFIG)
    with trio.fail_after(1.0):
        assert await breaker.wait_state(S.CLOSED, S.HALF_OPEN) is S.CLOSED
    assert trio.current_time() == 0.0
    await trip(breaker)
    assert await breaker.wait_state(S.HALF_OPEN) is S.HALF_OPEN
    assert trio.current_time() == 9.0
    with pytest.raises(ValueError, match=r"^wait_state needs at least one state$"):
        await breaker.wait_state()


async def test_wait_closed_follows_liveness(autojump_clock: trio.abc.Clock) -> None:
    """Forced open waits for liveness (no timer); then trials close it and the waiter wakes."""
    breaker = Breaker(CONFIG)
    assert breaker.force_open("peer convicted")
    assert not breaker.force_open("again")
    with pytest.raises(CircuitOpen) as info:
        await breaker.call(answer_after_sleep, 0.0)
    assert (info.value.state, info.value.retry_after) == (S.FORCED_OPEN, None)
    closed_at: list[float] = []

    async def waiter() -> None:
        await breaker.wait_closed()
        closed_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(100.0)
        assert closed_at == []
        assert breaker.liveness_restored()
        assert not breaker.liveness_restored()
        await breaker.call(answer_after_sleep, 1.0)
        await breaker.call(answer_after_sleep, 1.0)
    assert closed_at == [102.0]


async def test_force_open_and_liveness_restored_are_heard_at_the_current_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Listeners hear force_open's reason word for word, and both moves at the time of the
    call: forced open at 2.5, lifted at 3.5."""
    breaker = Breaker(CONFIG)
    heard: list[BreakerTransition] = []
    breaker.add_listener(heard.append)
    await trio.sleep(2.5)
    assert breaker.force_open("peer convicted")
    await trio.sleep(1.0)
    assert breaker.liveness_restored()
    assert heard == [
        BreakerTransition(S.CLOSED, S.FORCED_OPEN, 2.5, "peer convicted"),
        BreakerTransition(S.FORCED_OPEN, S.HALF_OPEN, 3.5, "liveness restored"),
    ]


async def test_a_breaker_starts_closed_at_the_time_it_is_made(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Made at 5.0, it has been CLOSED since 5.0 (not since the clock's zero), and its
    statistics and repr say so."""
    await trio.sleep(5.0)
    breaker = Breaker(CONFIG)
    stats = breaker.statistics()
    assert (stats.state, stats.state_since, stats.calls) == (S.CLOSED, 5.0, 0)
    assert repr(breaker).startswith("<Breaker <CircuitBreaker CLOSED since 5.0: ")


async def test_nested_blocks_in_one_task(autojump_clock: trio.abc.Clock) -> None:
    """Nested ``async with`` in one task settle their own permits, inner first."""
    breaker = Breaker(CONFIG)
    async with breaker:
        with pytest.raises(Boom):
            async with breaker:
                raise Boom
        assert breaker.statistics().in_flight == 1
    stats = breaker.statistics()
    assert (stats.calls, stats.failures, stats.in_flight) == (2, 1, 0)


async def test_no_exception_group_leaks(autojump_clock: trio.abc.Clock) -> None:
    """Errors leave the breaker as themselves, never wrapped in a group."""
    breaker = Breaker(CONFIG)
    with pytest.raises(Boom) as failed:
        await breaker.call(fail_after_sleep, 0.0)
    assert type(failed.value) is Boom
    breaker = Breaker(CONFIG)
    await trip(breaker)
    with pytest.raises(CircuitOpen) as refused:
        async with breaker:
            pass  # pragma: no cover
    assert type(refused.value) is CircuitOpen


async def test_default_config_and_repr(autojump_clock: trio.abc.Clock) -> None:
    """The heartbeat-scale defaults are used, and opening waits 5 s (jitter 20%)."""
    breaker = Breaker()
    assert breaker.config is HEARTBEAT_BREAKER_CONFIG
    assert breaker.core.config is HEARTBEAT_BREAKER_CONFIG
    assert "CLOSED" in repr(breaker)
    for _ in range(10):
        with pytest.raises(Boom):
            await breaker.call(fail_after_sleep, 0.0)
    stats = breaker.statistics()
    assert stats.state is S.OPEN
    assert stats.open_until is not None
    assert 4.0 <= stats.open_until - trio.current_time() <= 6.0


async def test_a_hung_trial_opens_the_default_breaker_again_after_30_s(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Forced open, restored at 1.0: a trial that never returns holds one slot until 31.0,
    when the breaker opens again; the task waiting in wait_state wakes at exactly then,
    and the hung call, cancelled at last, changes nothing."""
    breaker = Breaker()
    breaker.force_open("convicted")
    await trio.sleep(1.0)
    breaker.liveness_restored()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(breaker.call, trio.sleep_forever)
        assert await breaker.wait_state(S.OPEN) is S.OPEN
        assert trio.current_time() == 31.0
        nursery.cancel_scope.cancel()
    assert breaker.state is S.OPEN
    assert breaker.statistics().in_flight == 0


@pytest.mark.parametrize("retry_after", [None, 2.5])
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_circuit_open_pickles(retry_after: float | None, protocol: int) -> None:
    """CircuitOpen survives pickle and copy with its state, retry_after and notes."""
    exc = CircuitOpen(S.OPEN, retry_after)
    exc.add_note("while calling the peer")
    for copied in (
        pickle.loads(pickle.dumps(exc, protocol)),
        copy.copy(exc),
        copy.deepcopy(exc),
    ):
        assert type(copied) is CircuitOpen
        assert (copied.state, copied.retry_after) == (S.OPEN, retry_after)
        assert str(copied) == str(exc)
        assert copied.__notes__ == ["while calling the peer"]


async def test_a_listener_that_moves_the_breaker_again_supersedes_the_move_it_heard(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The first listener answers HALF_OPEN with force_open: the second hears the forced
    open and never the stale HALF_OPEN after it, so its last word is the true state."""
    breaker = Breaker(CONFIG)
    first: list[BreakerState] = []
    later: list[BreakerState] = []

    def reopen(transition: BreakerTransition) -> None:
        first.append(transition.state)
        if transition.state is S.HALF_OPEN:
            breaker.force_open("still not serving")

    breaker.add_listener(reopen)
    breaker.add_listener(lambda transition: later.append(transition.state))
    breaker.force_open("convicted")
    breaker.liveness_restored()
    assert breaker.state is S.FORCED_OPEN
    assert first == [S.FORCED_OPEN, S.HALF_OPEN, S.FORCED_OPEN]
    assert later == [S.FORCED_OPEN, S.FORCED_OPEN]


async def test_a_listener_that_moves_the_breaker_away_and_back_supersedes_the_move(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The first listener answers a forced open by lifting it and forcing it open again:
    the state ends as it was, yet the later listener hears the newer moves last, never
    the stale first one after them."""
    breaker = Breaker(CONFIG)
    later: list[tuple[BreakerState, BreakerState, str]] = []

    def bounce(transition: BreakerTransition) -> None:
        if transition.reason == "convicted":
            breaker.liveness_restored()
            breaker.force_open("convicted again")

    breaker.add_listener(bounce)
    breaker.add_listener(lambda t: later.append((t.previous, t.state, t.reason)))
    breaker.force_open("convicted")
    assert later == [
        (S.FORCED_OPEN, S.HALF_OPEN, "liveness restored"),
        (S.HALF_OPEN, S.FORCED_OPEN, "convicted again"),
    ]
