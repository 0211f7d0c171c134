"""Outlier ejection over several endpoints (``_outliers``): the cap, the rotation, the source.

Every async test runs under ``autojump_clock``, so each ``trio.current_time()``
assert is exact. The breakers' config has no jitter: two failed calls trip one
for 5 s. The reconnecting-client tests dial hosts of the test kit's in-memory
network; the cap itself is also checked by hypothesis, over random sequences
of trips, forced opens, restorations and waits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
from collections.abc import Callable

import pytest
import trio
import trio.testing
from helpers import Recorder, echo, reconnecting
from hypothesis import given
from hypothesis import strategies as st

from trio_heartbeat import ConstantBackoff, SupervisorState
from trio_heartbeat._breaker import BreakerConfig, BreakerState
from trio_heartbeat._errors import CircuitOpen, HeartbeatError, UnknownEndpoint
from trio_heartbeat._liveness_breaker import bind_breaker
from trio_heartbeat._outliers import (
    EjectionEvent,
    OutlierEjection,
    OutlierStatistics,
    ejection_cap,
)
from trio_heartbeat._reconnect_events import AttemptStarted, Connected
from trio_heartbeat.testing import open_memory_network

S = BreakerState
CONFIG = BreakerConfig(
    window_size=2,
    minimum_number_of_calls=2,
    permitted_calls_in_half_open=1,
    wait_in_open=5.0,
    max_wait_in_open=60.0,
    open_jitter=0.0,
)
A, B, C, D = "a:1", "b:1", "c:1", "d:1"
#: As CONFIG, but a trip keeps the breaker open for a minute.
LONG_OPEN = dataclasses.replace(CONFIG, wait_in_open=60.0, max_wait_in_open=60.0)


class Boom(Exception):
    pass


async def fail(endpoint: str, delay: float = 1.0) -> str:
    await trio.sleep(delay)
    raise Boom(endpoint)


async def answer(endpoint: str) -> str:
    await trio.lowlevel.checkpoint()
    return endpoint


async def trip(pool: OutlierEjection, endpoint: str) -> None:
    """Two calls to ``endpoint`` failing 1 s each: its breaker opens at the end of the second."""
    for _ in range(2):
        with pytest.raises(Boom):
            await pool.breaker(endpoint).call(fail, endpoint)


def binding_each_connection(pool: OutlierEjection) -> Callable[[object], None]:
    """A client listener that binds each new connection to its endpoint's breaker."""

    def bind(event: object) -> None:
        if isinstance(event, Connected):
            bind_breaker(pool.breaker(event.endpoint), event.connection)

    return bind


def events(heard: list[EjectionEvent]) -> list[tuple[str, bool, float]]:
    return [(event.endpoint, event.ejected, event.at) for event in heard]


async def test_ejected_when_the_breaker_opens_and_back_at_half_open(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """An opened breaker ejects its endpoint at once; the end of the open wait returns it;
    the trial that closes it is no event, and nothing is logged on the way."""
    pool = OutlierEjection([A, B, C], config=CONFIG)
    heard: list[EjectionEvent] = []
    pool.add_listener(heard.append)
    await trip(pool, A)
    assert trio.current_time() == 2.0
    assert pool.ejected() == (A,)
    assert pool.available() == [B, C]
    assert events(heard) == [(A, True, 2.0)]
    assert heard[0].reason.startswith("failure rate")
    await trio.sleep_until(7.0)
    assert pool.ejected() == ()
    assert events(heard) == [(A, True, 2.0), (A, False, 7.0)]
    assert pool.breaker(A).state is S.HALF_OPEN
    assert await pool.breaker(A).call(answer, A) == A  # the trial closes it: no event
    assert pool.breaker(A).state is S.CLOSED
    assert len(heard) == 2
    assert pool.statistics().ejections == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_forced_open_ejects_until_liveness_is_restored(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Liveness's forced open ejects at its instant and no timer returns it; restoring does."""
    pool = OutlierEjection([A, B], config=CONFIG)
    heard: list[EjectionEvent] = []
    pool.add_listener(heard.append)
    await trio.sleep(1.5)
    pool.breaker(A).force_open("peer convicted")
    await trio.sleep(100.0)
    assert pool.ejected() == (A,)
    pool.breaker(A).liveness_restored()
    assert pool.ejected() == ()
    assert [(e.endpoint, e.ejected, e.at, e.reason) for e in heard] == [
        (A, True, 1.5, "peer convicted"),
        (A, False, 101.5, "liveness restored"),
    ]


async def test_an_open_then_forced_endpoint_keeps_its_place(autojump_clock: trio.abc.Clock) -> None:
    """OPEN to FORCED_OPEN is no new ejection, and the endpoint keeps its rank under the cap."""
    pool = OutlierEjection([A, B, C, D], config=CONFIG, max_ejection_percent=25.0)
    await trip(pool, A)
    pool.breaker(B).force_open("disconnected")
    pool.breaker(A).force_open("disconnected")
    assert pool.ejected() == (A,)
    assert pool.statistics().over_cap == (B,)
    assert pool.statistics().ejections == 1


async def test_the_cap_keeps_the_third_failing_endpoint_in_the_rotation(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Four endpoints at 50%: the third to shut (on failures) stays available, calls reach it
    past its breaker."""
    pool = OutlierEjection([A, B, C, D], config=CONFIG)
    heard: list[EjectionEvent] = []
    pool.add_listener(heard.append)
    for endpoint in (A, B):
        pool.breaker(endpoint).force_open("peer convicted")
        await trio.sleep(1.0)
    await trip(pool, C)  # 2.0 .. 4.0: OPEN until 9.0
    await trio.sleep(0.5)
    assert pool.statistics().max_ejected == 2
    assert pool.ejected() == (A, B)
    assert pool.statistics().over_cap == (C,)
    assert pool.available() == [C, D]
    called = [await pool.call(answer) for _ in range(4)]
    assert called == [C, D, C, D]
    with pytest.raises(Boom):
        await pool.call(fail, 0.5)  # C's turn: it fails, counted apart
    assert pool.statistics() == OutlierStatistics(
        endpoints=4,
        max_ejected=2,
        ejected=(A, B),
        over_cap=(C,),
        ejections=2,
        over_cap_calls=3,
        over_cap_failures=1,
    )
    assert pool.breaker(C).state is S.OPEN
    assert pool.breaker(C).statistics().calls == 2  # the two that tripped it, nothing since
    pool.breaker(A).liveness_restored()  # A returns: C, still shut, takes its place
    assert pool.ejected() == (B, C)
    assert pool.statistics().over_cap == ()
    assert [(e.endpoint, e.ejected, e.at) for e in heard[-2:]] == [(A, False, 5.0), (C, True, 5.0)]
    assert heard[-1].reason == "room under the cap: a:1 returned"
    assert pool.statistics().ejections == 3


@pytest.mark.parametrize(
    ("endpoints", "percent", "cap"),
    [
        (4, 50.0, 2),
        (3, 10.0, 1),
        (1, 50.0, 1),
        (10, 25.0, 2),
        (10, 29.9, 2),
        (5, 0.0, 0),
        (5, 100, 5),
    ],
)
def test_the_cap_is_a_share_rounded_down_but_at_least_one(
    endpoints: int, percent: float, cap: int
) -> None:
    """floor(n * percent / 100), never under one unless the percent is zero."""
    assert ejection_cap(endpoints, percent) == cap


async def test_at_least_one_endpoint_is_ejected(autojump_clock: trio.abc.Clock) -> None:
    """10% of three endpoints rounds down to none, yet the first outlier is ejected."""
    pool = OutlierEjection([A, B, C], config=CONFIG, max_ejection_percent=10.0)
    pool.breaker(B).force_open("peer convicted")
    pool.breaker(C).force_open("peer convicted")
    assert pool.ejected() == (B,)
    assert pool.available() == [A, C]


async def test_zero_percent_ejects_nothing(autojump_clock: trio.abc.Clock) -> None:
    """At 0% every shut endpoint is over the cap: calls still reach one opened on failures,
    never one convicted by liveness."""
    pool = OutlierEjection([A, B, C], config=CONFIG, max_ejection_percent=0)
    await trip(pool, A)
    pool.breaker(C).force_open("peer convicted")
    assert pool.ejected() == ()
    assert pool.statistics().over_cap == (A, C)
    assert pool.available() == [A, B, C]  # all may be dialled
    assert [await pool.call(answer) for _ in range(4)] == [A, B, A, B]
    for _ in range(2):
        with pytest.raises(Boom):
            await pool.call(fail, 0.5)  # A's turn, over the cap: each failure counted
        assert await pool.call(answer) == B
    stats = pool.statistics()
    assert (stats.over_cap_calls, stats.over_cap_failures) == (4, 2)
    assert trio.current_time() == 3.0


async def test_calls_go_round_robin_over_the_available_endpoints(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Each call takes the next endpoint in turn, skipping the ejected ones, outcomes in their window."""
    pool = OutlierEjection([A, B, C], config=CONFIG)
    assert [await pool.call(answer) for _ in range(4)] == [A, B, C, A]
    pool.breaker(C).force_open("peer convicted")
    assert [await pool.call(answer) for _ in range(4)] == [B, A, B, A]
    assert [pool.breaker(e).statistics().calls for e in (A, B)] == [2, 2]


async def test_a_half_open_endpoint_with_no_trial_slot_is_passed_over(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A breaker that refuses although not ejected costs a refusal, and the next endpoint answers."""
    pool = OutlierEjection([A, B], config=CONFIG)
    pool.breaker(A).force_open("peer convicted")
    pool.breaker(A).liveness_restored()  # HALF_OPEN, one trial slot

    async def hold_the_trial() -> None:
        async with pool.breaker(A):
            await trio.sleep(10.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold_the_trial)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.available() == [A, B]
        assert await pool.call(answer) == B
        assert pool.breaker(A).statistics().rejected == 1


async def test_circuit_open_only_when_nothing_can_be_tried(autojump_clock: trio.abc.Clock) -> None:
    """One endpoint, ejected: CircuitOpen with the wait left, and fn is never called."""
    pool = OutlierEjection([A], config=CONFIG)
    await trip(pool, A)
    with pytest.raises(CircuitOpen) as info:
        await pool.call(answer)
    assert (info.value.state, info.value.retry_after) == (S.OPEN, 5.0)
    assert pool.available() == []
    assert pool() == [A]  # as a source it never runs dry
    pool.breaker(A).force_open("peer convicted")
    with pytest.raises(CircuitOpen) as info:
        await pool.call(answer)
    assert (info.value.state, info.value.retry_after) == (S.FORCED_OPEN, None)
    pool.breaker(A).liveness_restored()
    async with pool.breaker(A):  # the only trial slot taken
        with pytest.raises(CircuitOpen) as info:
            await pool.call(answer)
    assert (info.value.state, info.value.retry_after) == (S.HALF_OPEN, None)
    assert trio.current_time() == 2.0


async def test_call_with_fallback(autojump_clock: trio.abc.Clock) -> None:
    """The fallback answers a refusal and a failure; other errors, and on_failure=False, propagate."""

    async def degraded(exc: Exception) -> str:
        await trio.lowlevel.checkpoint()
        return type(exc).__name__

    pool = OutlierEjection([A], config=CONFIG, record_failure=lambda exc: isinstance(exc, Boom))
    assert await pool.call_with_fallback(fail, 0.5, fallback=degraded) == "Boom"
    with pytest.raises(Boom):  # the second failure in a row: the breaker trips
        await pool.call_with_fallback(fail, 0.5, fallback=degraded, on_failure=False)
    assert pool.ejected() == (A,)
    assert await pool.call_with_fallback(answer, fallback=degraded) == "CircuitOpen"
    await trio.sleep(5.0)
    assert await pool.call_with_fallback(answer, fallback=degraded) == A

    async def broken(endpoint: str) -> str:
        await trio.lowlevel.checkpoint()
        raise KeyError(endpoint)

    with pytest.raises(KeyError):
        await pool.call_with_fallback(broken, fallback=degraded)


async def test_a_failing_listener_is_logged_and_the_others_still_hear(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener that raises is logged; the next one hears; a removed one hears nothing."""
    pool = OutlierEjection([A, B], config=CONFIG)
    heard: list[EjectionEvent] = []
    removed: list[EjectionEvent] = []

    def faulty(event: EjectionEvent) -> None:
        raise RuntimeError("listener bug")

    pool.add_listener(faulty)
    pool.add_listener(heard.append)
    pool.add_listener(removed.append)
    pool.remove_listener(removed.append)
    with caplog.at_level(logging.ERROR, logger="trio_heartbeat"):
        pool.breaker(A).force_open("peer convicted")
    assert events(heard) == [(A, True, 0.0)]
    assert removed == []
    event = EjectionEvent(A, True, 0.0, "peer convicted")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"outlier listener {faulty!r} failed on {event!r}"
    ]
    with pytest.raises(ValueError, match="x"):
        pool.remove_listener(removed.append)


async def test_endpoints_are_normalised_and_checked(autojump_clock: trio.abc.Clock) -> None:
    """Any spelling names one endpoint; bad lists and percents are refused when built."""
    pool = OutlierEjection([("::1", 80), "h:1"], config=CONFIG)
    assert pool.endpoints == ("[::1]:80", "h:1")
    assert pool.breaker(("h", 1)) is pool.breaker("h:1")
    assert "2 endpoints" in repr(pool)
    with pytest.raises(UnknownEndpoint) as info:
        pool.breaker("other:1")
    error = info.value
    assert isinstance(error, KeyError)
    assert isinstance(error, HeartbeatError)
    assert str(error) == "not an endpoint of this outlier ejection: other:1"
    assert pickle.loads(pickle.dumps(error)).endpoint == "other:1"
    with pytest.raises(ValueError, match=r"^at least one endpoint is needed$"):
        OutlierEjection([])
    with pytest.raises(ValueError, match=r"^endpoints listed twice: h:1$"):
        OutlierEjection(["h:1", ("h", 1)])
    with pytest.raises(ValueError, match=r"^endpoints listed twice: g:1, h:1$"):
        OutlierEjection(["h:1", "g:1", ("h", 1), "g:1"])
    with pytest.raises(TypeError, match="not one"):
        OutlierEjection("h:1")
    with pytest.raises(ValueError, match="port"):
        OutlierEjection(["h:0"])
    for percent in (-1.0, 100.5, math.nan):
        with pytest.raises(ValueError, match="0 to 100"):
            OutlierEjection([A], max_ejection_percent=percent)
    for wrong in (True, "50"):
        with pytest.raises(TypeError, match="number"):
            OutlierEjection([A], max_ejection_percent=wrong)  # type: ignore[arg-type]


async def test_the_default_cap_is_half_rounded_down(autojump_clock: trio.abc.Clock) -> None:
    """Without ``max_ejection_percent``, 50%: 25 of 51 endpoints (51% would allow 26)."""
    pool = OutlierEjection([f"h{i}:1" for i in range(51)], config=CONFIG)
    assert pool.statistics().max_ejected == 25


async def test_the_wait_left_is_exact_under_a_second_too(autojump_clock: trio.abc.Clock) -> None:
    """One endpoint, OPEN from 2.0 until 7.0: refused at 6.75, retry_after is 0.25."""
    pool = OutlierEjection([A], config=CONFIG)
    await trip(pool, A)
    await trio.sleep_until(6.75)
    with pytest.raises(CircuitOpen) as info:
        await pool.call(answer)
    assert (info.value.state, info.value.retry_after) == (S.OPEN, 0.25)
    assert trio.current_time() == 6.75


async def test_the_arguments_reach_fn_after_the_endpoint(autojump_clock: trio.abc.Clock) -> None:
    """``call`` and ``call_with_fallback`` pass their arguments on, through a breaker and
    past one over the cap alike."""

    async def tagged(endpoint: str, tag: str, n: int) -> str:
        await trio.lowlevel.checkpoint()
        return f"{endpoint}/{tag}/{n}"

    async def unused(exc: Exception) -> str:
        raise AssertionError("no fallback expected") from exc

    pool = OutlierEjection([A, B, C], config=CONFIG, max_ejection_percent=0)
    assert await pool.call(tagged, "x", 1) == "a:1/x/1"
    assert await pool.call_with_fallback(tagged, "y", 2, fallback=unused) == "b:1/y/2"
    await trip(pool, C)  # over the cap at 0%: called past its breaker
    assert await pool.call(tagged, "z", 3) == "c:1/z/3"
    assert pool.statistics().over_cap_calls == 1


async def test_record_failure_is_every_breakers_rule(autojump_clock: trio.abc.Clock) -> None:
    """Errors that ``record_failure`` does not count leave the endpoint's breaker closed;
    counted ones trip it (two in a row here)."""

    async def broken(endpoint: str) -> str:
        await trio.lowlevel.checkpoint()
        raise KeyError(endpoint)

    pool = OutlierEjection([A], config=CONFIG, record_failure=lambda exc: isinstance(exc, Boom))
    for _ in range(2):
        with pytest.raises(KeyError):
            await pool.call(broken)
    assert pool.breaker(A).state is S.CLOSED
    assert pool.ejected() == ()
    for _ in range(2):
        with pytest.raises(Boom):
            await pool.call(fail)
    assert pool.ejected() == (A,)
    assert trio.current_time() == 2.0


# -- as the reconnecting client's endpoint source ----------------------------------------


async def test_the_client_never_dials_an_ejected_endpoint(autojump_clock: trio.abc.Clock) -> None:
    """With A ejected on its failure rate (open for 60 s), a client cycling through crashes
    dials B and C only."""
    pool = OutlierEjection([A, B, C], config=LONG_OPEN)
    await trip(pool, A)
    record = Recorder()
    async with open_memory_network() as network:
        hosts = {name: network.listen(name, echo) for name in (A, B, C)}
        async with reconnecting(network, pool, record, backoff=ConstantBackoff(1.0)) as client:
            for _ in range(4):
                await client.wait_connected()
                hosts[record.of(Connected)[-1][1].endpoint].kill()
                await trio.sleep(0.5)
            await client.wait_connected()
    assert [event.endpoint for _, event in record.of(AttemptStarted)] == [B, C, B, C, B]
    assert hosts[A].accepted == 0


async def test_an_endpoint_ejected_while_connected_is_not_dialled_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The client asks before every attempt: once A is ejected and drops, it goes to B."""
    pool = OutlierEjection([A, B], config=CONFIG)
    record = Recorder()
    async with open_memory_network() as network:
        host_a = network.listen(A, echo)
        network.listen(B, echo)
        async with reconnecting(network, pool, record, backoff=ConstantBackoff(1.0)) as client:
            await client.wait_connected()
            pool.breaker(A).force_open("disconnected")  # what a liveness binding does
            host_a.down()
            await trio.sleep(1.5)
            assert client.state is SupervisorState.CONNECTED
    assert [(at, e.endpoint) for at, e in record.of(AttemptStarted)] == [(0.0, A), (1.0, B)]
    assert record.times(Connected) == [0.0, 1.0]


async def test_a_peer_forced_open_is_dialled_again_once_no_other_admits_calls(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A and B at 50%, each connection bound to its endpoint's breaker. A dies at 1.0 and
    is back at 5.0; B dies for good at 10.0. Only a connection to A can lift A's forced
    open, so with no breaker admitting calls the client must dial A again: it does at
    11.0 (after its 1 s backoff), and A's SERVING verdict brings A back. (A pool that
    offered only endpoints not ejected kept dialling the dead B for ever.)"""
    pool = OutlierEjection([A, B], config=CONFIG)
    record = Recorder()
    bind = binding_each_connection(pool)

    async with open_memory_network() as network:
        host_a = network.listen(A, echo)
        host_b = network.listen(B, echo)
        async with reconnecting(network, pool, record, backoff=ConstantBackoff(1.0)) as client:
            client.add_listener(bind)
            await client.wait_connected()
            await trio.sleep_until(1.0)
            host_a.down()
            await trio.sleep_until(5.0)
            host_a.up(echo)
            await trio.sleep_until(10.0)
            host_b.down()
            await trio.sleep_until(12.0)
            assert client.state is SupervisorState.CONNECTED
            assert pool.breaker(A).state is S.HALF_OPEN
            assert pool.ejected() == (B,)
    attempts = [(at, e.endpoint) for at, e in record.of(AttemptStarted)]
    assert attempts == [(0.0, A), (2.0, B), (11.0, A)]
    assert record.times(Connected) == [0.0, 2.0, 11.0]
    assert [(at, e.endpoint) for at, e in record.of(Connected)][-1][1] == A


async def test_a_peer_forced_open_takes_its_turn_beside_a_dead_one_that_never_connected(
    autojump_clock: trio.abc.Clock,
) -> None:
    """B never listens, so no connection ever tells its breaker anything: it stays
    CLOSED. A drops at 1.0 (forced open) and is back at 2.0. The round still comes to
    A: B at 2.0 (after the 1 s backoff), A at 3.0, and the client is on A again.
    (Offering forced-open endpoints only when no breaker admits calls dialled the dead
    B for ever.)"""
    pool = OutlierEjection([A, B], config=CONFIG)
    record = Recorder()
    bind = binding_each_connection(pool)

    async with open_memory_network() as network:
        host_a = network.listen(A, echo)
        async with reconnecting(network, pool, record, backoff=ConstantBackoff(1.0)) as client:
            client.add_listener(bind)
            await client.wait_connected()
            await trio.sleep_until(1.0)
            host_a.down()
            await trio.sleep_until(2.0)
            host_a.up(echo)
            await trio.sleep_until(3.5)
            assert client.state is SupervisorState.CONNECTED
            assert pool.breaker(B).state is S.CLOSED
    attempts = [(at, e.endpoint) for at, e in record.of(AttemptStarted)]
    assert attempts == [(0.0, A), (2.0, B), (3.0, A)]
    assert record.times(Connected) == [0.0, 3.0]


async def test_the_callable_source_lists_the_available_endpoints(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Called, the pool is a list source too: an endpoint ejected on its failure rate is
    not in it, one that liveness forced open is."""
    pool = OutlierEjection([A, B, C, D], config=LONG_OPEN)
    await trip(pool, B)
    pool.breaker(D).force_open("peer convicted")
    record = Recorder()
    async with open_memory_network() as network:
        for name in (A, B, C, D):
            network.listen(name, echo)
        async with reconnecting(
            network, pool.__call__, record, backoff=ConstantBackoff(1.0)
        ) as client:
            await client.wait_connected()
    assert [e.endpoint for _, e in record.of(AttemptStarted)] == [A]
    assert pool() == [A, C, D]


async def test_each_dialling_round_starts_one_further_on(autojump_clock: trio.abc.Clock) -> None:
    """Two clients iterating the pool start at different endpoints, then go round."""
    pool = OutlierEjection([A, B, C], config=CONFIG)
    first, second = aiter(pool), aiter(pool)
    assert [await anext(first) for _ in range(4)] == [A, B, C, A]
    assert await anext(second) == B
    await trip(pool, C)  # ejected on its failure rate: out of the round
    assert [await anext(second) for _ in range(3)] == [A, B, A]


# -- the cap under any sequence --------------------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["trip", "force", "restore", "wait", "call"]), st.integers(0, 5)),
    max_size=40,
)


@given(
    count=st.integers(1, 6),
    percent=st.sampled_from([0.0, 10.0, 25.0, 50.0, 75.0, 100.0]),
    ops=OPS,
)
def test_the_ejected_never_exceed_the_cap(
    count: int, percent: float, ops: list[tuple[str, int]]
) -> None:
    """Ejected = the earliest shut breakers up to the cap, whatever happens, and events agree."""

    async def run() -> None:
        names = [f"h{i}:1" for i in range(count)]
        pool = OutlierEjection(names, config=CONFIG, max_ejection_percent=percent)
        cap = ejection_cap(count, percent)
        out: set[str] = set()

        def follow(event: EjectionEvent) -> None:
            (out.add if event.ejected else out.discard)(event.endpoint)

        pool.add_listener(follow)
        for op, which in ops:
            breaker = pool.breaker(names[which % count])
            if op == "trip":
                now = trio.current_time()
                for _ in range(2):
                    permit = breaker.core.try_acquire(now)
                    if permit is not None:
                        permit.failure(now)
            elif op == "force":
                breaker.force_open("convicted")
            elif op == "restore":
                breaker.liveness_restored()
            elif op == "wait":
                await trio.sleep(which * 1.5)
            else:
                try:
                    await pool.call(answer)
                except CircuitOpen:
                    # Nothing could be tried: each available one is convicted or full.
                    assert all(
                        pool.breaker(n).state in (S.HALF_OPEN, S.FORCED_OPEN)
                        for n in pool.available()
                    )
            ejected = pool.ejected()
            shut = [n for n in names if pool.breaker(n).state in (S.OPEN, S.FORCED_OPEN)]
            assert len(ejected) <= cap
            assert len(ejected) == min(cap, len(shut))
            assert set(ejected) <= set(shut)
            assert set(ejected) | set(pool.statistics().over_cap) == set(shut)
            assert out == set(ejected)
            assert pool() != []

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
