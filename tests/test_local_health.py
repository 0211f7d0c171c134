"""Local health (``_local_health``): the score and stalls of our own loop, and what the watchdog
makes of them.

The stalls are clock jumps: :meth:`MockClock.jump` moves virtual time on
without running any task, as a stopped process or a blocked loop does, so the
timers that expired meanwhile fire late, by an exact amount.
"""

from __future__ import annotations

import math

import pytest
import trio
from helpers import (
    CONFIG,
    handshake_then_drain,
    handshake_then_serve,
    run_body,
    stream_and_peer,
)
from trio.testing import MockClock

from trio_heartbeat import (
    Connection,
    Conviction,
    Event,
    HeartbeatTimeout,
    Liveness,
    LocalHealth,
    PeerRecovered,
    PeerSuspected,
    local_health,
)
from trio_heartbeat._frames import FrameType

# -- the score and the stalls ------------------------------------------------------------


def test_a_punctual_loop_scores_zero() -> None:
    health = LocalHealth()
    for tick in range(100):
        assert not health.timer_fired(scheduled=float(tick), now=tick + 0.049)
    assert health.score(100.0) == 0
    assert health.multiplier(100.0) == 1.0
    assert health.stalls == 0
    assert health.last_stall is None


def test_each_episode_of_late_timers_raises_the_score_once() -> None:
    """Timers late together are one episode; episodes apart each count, up to the cap."""
    health = LocalHealth(late=0.05, stall=0.5, max_score=3, recovery=10.0)
    # Three timers 0.1 s late within one episode: one point.
    for now in (1.1, 1.12, 1.14):
        assert not health.timer_fired(scheduled=1.0, now=now)
    assert health.score(1.14) == 1
    assert health.multiplier(1.14) == 2.0
    # Episodes a moment apart: a point each, capped at max_score.
    for start in (2.0, 3.0, 4.0, 5.0):
        health.timer_fired(scheduled=start, now=start + 0.1)
    assert health.score(5.1) == 3
    assert health.stalls == 0  # late, never a stall


def test_the_score_comes_down_one_point_per_recovery_period_of_punctuality() -> None:
    health = LocalHealth(late=0.05, stall=0.5, max_score=8, recovery=2.0)
    for start in (0.0, 1.0, 2.0):
        health.timer_fired(scheduled=start, now=start + 0.25)
    assert health.score(2.25) == 3
    assert health.score(4.0) == 3
    assert health.score(4.25) == 2
    assert health.score(8.25) == 0
    assert health.score(100.0) == 0
    # A new episode builds on what is left, not on the old peak.
    health.timer_fired(scheduled=6.0, now=6.5)
    assert health.score(6.5) == 2


def test_a_stall_is_recorded_once_however_many_timers_it_made_late() -> None:
    health = LocalHealth()
    # A 5 s stall: every timer due in it fires as it ends, one after the other.
    assert health.timer_fired(scheduled=11.0, now=16.0)
    assert health.timer_fired(scheduled=10.5, now=16.01)
    assert health.timer_fired(scheduled=12.0, now=16.02)
    assert health.stalls == 1
    assert health.last_stall == (10.5, 16.02)
    # A later one is another stall.
    assert health.timer_fired(scheduled=20.0, now=21.0)
    assert health.stalls == 2
    assert health.last_stall == (20.0, 21.0)
    # Late, but not a stall.
    assert not health.timer_fired(scheduled=30.0, now=30.4)
    assert health.stalls == 2


def test_a_timer_can_count_a_shorter_lateness_as_a_stall() -> None:
    """A connection with a short interval counts half its peer's interval as a stall."""
    health = LocalHealth(late=0.05, stall=0.5)
    assert not health.timer_fired(scheduled=1.0, now=1.2)
    assert health.timer_fired(scheduled=2.0, now=2.2, stall=0.2)
    assert health.stalls == 1
    assert health.last_stall == (2.0, 2.2)
    assert not health.timer_fired(scheduled=3.0, now=3.1, stall=0.2)
    assert health.timer_fired(scheduled=4.0, now=4.5, stall=10.0)  # never above its own


@pytest.mark.parametrize(
    "kwargs",
    [
        {"late": 0.0},
        {"late": 1.0, "stall": 0.5},
        {"stall": math.inf},
        {"stall": math.nan},
        {"max_score": 0},
        {"max_score": True},
        {"max_score": 2.0},
        {"recovery": 0.0},
        {"recovery": math.inf},
    ],
)
def test_values_out_of_range_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        LocalHealth(**kwargs)  # type: ignore[arg-type]


def test_the_bounds_themselves_are_accepted() -> None:
    """``late == stall`` and ``max_score == 1`` are in range: a loop late at all is stalled."""
    health = LocalHealth(late=0.5, stall=0.5, max_score=1)
    assert health.timer_fired(scheduled=1.0, now=1.5)
    assert health.score(1.5) == 1
    assert health.timer_fired(scheduled=3.0, now=3.5)
    assert health.score(3.5) == 1  # capped


def test_the_defaults() -> None:
    """late 50 ms, stall 0.5 s, a score capped at 8 that loses a point per punctual second."""
    health = LocalHealth()
    assert repr(health) == "LocalHealth(late=0.05, stall=0.5, max_score=8, recovery=1.0)"
    for episode in range(10):
        health.timer_fired(scheduled=episode * 0.1, now=episode * 0.1 + 0.06)
    assert health.score(0.96) == 8
    assert health.score(1.96) == 7


def test_each_threshold_counts_at_its_exact_value() -> None:
    """A timer exactly ``late`` late is late, exactly ``stall`` late a stall; late timers exactly
    ``late`` apart are two episodes; a timer due exactly as a stall ended starts another."""
    health = LocalHealth(late=0.25, stall=1.0, max_score=8, recovery=100.0)
    assert not health.timer_fired(scheduled=1.0, now=1.25)
    assert health.score(1.25) == 1
    assert not health.timer_fired(scheduled=1.25, now=1.5)  # 0.25 s after the last late one
    assert health.score(1.5) == 2
    assert health.timer_fired(scheduled=2.0, now=3.0)
    assert (health.stalls, health.last_stall) == (1, (2.0, 3.0))
    assert health.timer_fired(scheduled=3.0, now=4.0)
    assert (health.stalls, health.last_stall) == (2, (3.0, 4.0))


def test_only_whole_recovery_periods_earn_a_point_back() -> None:
    """0.99 s is less than three periods of 0.33 s (as floats too): two points come back, not three."""
    health = LocalHealth(recovery=0.33)
    for now in (-0.2, -0.1, 0.0):
        health.timer_fired(scheduled=now - 0.1, now=now)
    assert health.score(0.0) == 3
    assert health.score(0.99) == 1


def test_the_repr_shows_the_settings() -> None:
    assert repr(LocalHealth(late=0.1, stall=1.0, max_score=4, recovery=2.0)) == (
        "LocalHealth(late=0.1, stall=1.0, max_score=4, recovery=2.0)"
    )


async def test_one_local_health_per_trio_run() -> None:
    health = local_health()
    assert local_health() is health

    async def other_run() -> LocalHealth:
        return local_health()

    # (A run of its own in a thread: a new run, a new LocalHealth.)
    other = await trio.to_thread.run_sync(trio.run, other_run)
    assert other is not health


# -- the watchdog, after a stall of ours --------------------------------------------------


def stall_at(clock: MockClock, when: float, seconds: float) -> object:
    """A block body that stalls the whole run for ``seconds`` at ``when``, then waits."""

    async def body(conn: Connection) -> None:
        await trio.sleep_until(when)
        clock.jump(seconds)
        await trio.sleep_forever()

    return body


async def test_a_stall_past_the_verdict_gives_the_silent_peer_a_fresh_window(
    autojump_clock: MockClock,
) -> None:
    """Last heard at 0, verdict due at 3.0; our loop is away from 1.0 to 6.0. The late timer
    does not convict: the silence restarts at 6.0, and the peer, silent still, is convicted
    one window later, at exactly 9.0, as a peer that went silent."""
    stream, peer = stream_and_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, stall_at(autojump_clock, 1.0, 5.0), config=CONFIG)  # type: ignore[arg-type]
        assert trio.current_time() == 9.0
    assert raised.value.reason == "heartbeat timeout: peer silent"
    assert raised.value.conviction is Conviction.PEER_SILENT
    assert peer.of_type(FrameType.CLOSE)[0].at == 9.0
    health = local_health()
    assert health.stalls == 1
    assert health.last_stall is not None
    assert health.last_stall[1] == 6.0


async def test_a_second_stall_with_nothing_heard_convicts_saying_we_were_stalled(
    autojump_clock: MockClock,
) -> None:
    """The fresh window is given once per silence: stalled again from 7.0 to 12.0, past the
    9.0 verdict, with nothing heard since the first, the watchdog convicts at 12.0 and says
    that we were stalled."""
    stream, peer = stream_and_peer()

    async def body(conn: Connection) -> None:
        await trio.sleep_until(1.0)
        autojump_clock.jump(5.0)
        await trio.sleep_until(7.0)
        autojump_clock.jump(5.0)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 12.0
    assert raised.value.reason == "heartbeat timeout: we were stalled"
    assert raised.value.conviction is Conviction.LOCAL_STALL
    assert peer.of_type(FrameType.CLOSE)[0].close_reason == "heartbeat timeout: we were stalled"


async def test_a_peer_heard_between_two_stalls_earns_another_window(
    autojump_clock: MockClock,
) -> None:
    """A frame between the stalls starts a new silence, so the second stall is excused too."""
    stream, peer = stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        await trio.sleep_until(6.5)
        await peer.send_data(b"still here")
        await peer.drain()

    async def body(conn: Connection) -> None:
        await trio.sleep_until(1.0)
        autojump_clock.jump(5.0)
        assert await conn.receive() == b"still here"
        await trio.sleep_until(7.0)
        autojump_clock.jump(5.0)  # past the 9.5 verdict of the new silence
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, body, config=CONFIG)
        assert trio.current_time() == 15.0  # 12.0 (the second stall's end) + 3 s
    assert raised.value.conviction is Conviction.PEER_SILENT


async def test_a_live_peer_is_kept_through_a_stall_of_ours(autojump_clock: MockClock) -> None:
    """A peer that answers our PINGs is heard as soon as we are back: never convicted."""
    stream, peer = stream_and_peer()

    async def body(conn: Connection) -> None:
        await trio.sleep_until(1.0)
        autojump_clock.jump(5.0)
        await trio.sleep_until(30.0)
        assert conn.closed is None
        assert conn.last_received is not None
        assert conn.last_received > 29.0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_serve, peer)
        await run_body(stream, body, config=CONFIG)
        nursery.cancel_scope.cancel()
    assert local_health().stalls == 1


async def test_a_short_lateness_is_no_stall_and_the_verdict_stands(
    autojump_clock: MockClock,
) -> None:
    """A timer 0.4 s late (under the 0.5 s stall) is only late: the silent peer is convicted
    when the watchdog wakes, 0.4 s after its verdict, and the score has gone up."""
    stream, peer = stream_and_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, stall_at(autojump_clock, 2.9, 0.5), config=CONFIG)  # type: ignore[arg-type]
        assert trio.current_time() == 3.4
    assert raised.value.conviction is Conviction.PEER_SILENT
    health = local_health()
    assert health.stalls == 0
    assert health.score(3.4) == 1


async def test_a_stall_excused_for_a_suspect_peer_neither_clears_nor_moves_its_last_frame(
    autojump_clock: MockClock,
) -> None:
    """The peer, silent since 0.0, is SUSPECT at 1.5; our loop is away from 2.0 to 7.0. The
    fresh window after our stall is no frame from the peer: it stays SUSPECT (no
    PeerRecovered), its last frame stays at 0.0, and it is convicted at 10.0."""
    stream, peer = stream_and_peer()
    heard: list[tuple[float, Event]] = []
    seen: list[tuple[Liveness, float | None]] = []

    def listener(conn: Connection, event: Event) -> None:
        if isinstance(event, PeerSuspected | PeerRecovered):
            heard.append((trio.current_time(), event))

    async def body(conn: Connection) -> None:
        await trio.sleep_until(2.0)
        autojump_clock.jump(5.0)
        await trio.sleep_until(8.0)
        seen.append((conn.liveness, conn.last_received))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handshake_then_drain, peer)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(stream, body, config=CONFIG, listeners=[listener])
        assert trio.current_time() == 10.0
    assert raised.value.conviction is Conviction.PEER_SILENT
    assert [(at, type(event)) for at, event in heard] == [(1.5, PeerSuspected)]
    assert seen == [(Liveness.SUSPECT, 0.0)]
