"""Registration (``_registration.py``) over the embedded store, in virtual time, exact times.

What it pins: an instance is registered at once under a lease of its TTL and
renewed every TTL/3 exactly; its health is part of the record and a change
between SERVING and DEGRADED is written at once, under the same lease;
NOT_SERVING revokes at once and it registers again, under a new lease, when
healthy; leaving the block revokes at once; a registrant that hangs disappears
at its last renewal + TTL; one frozen past its TTL registers again when it
thaws; an unreachable store is retried on the backoff's delays (by
default full jitter from 0.1 s doubling to TTL/3), reported while it lasts,
and the lease kept if it survived; a revoke that cannot finish is abandoned
after ``revoke_timeout``; bad arguments are refused; it runs as a service
supervisor's child, and runs again when restarted. The log lines an operator
reads are pinned word for word.
"""

from __future__ import annotations

import gc
import itertools
import logging
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from registry_helpers import FaultyStore, assert_full_jitter
from trio.testing import MockClock

from trio_heartbeat import ChildSpec, HealthStatus, open_health_monitor, open_service_supervisor
from trio_heartbeat._instances import DEFAULT_REGISTRY_PREFIX, Instance
from trio_heartbeat._leases import ChangeKind
from trio_heartbeat._memory_store import MemoryStore, open_memory_store
from trio_heartbeat._registration import Registration, RegistrationState, open_registration

A = Instance("echo", "a", "127.0.0.1:7400", metadata={"zone": "z1"})
KEY = "trio-heartbeat/services/echo/a"


def where(registration: Registration) -> tuple[RegistrationState, int | None, float | None, int]:
    """State, lease, outage and registrations (one value, so that mypy does not narrow each)."""
    return (
        registration.state,
        registration.lease,
        registration.outage,
        registration.registrations,
    )


async def record(store: MemoryStore) -> Instance | None:
    entries, _ = await store.range(A.key)
    return Instance.decode("echo", "a", entries[0].value) if entries else None


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """The registry's log lines so far, as (level, message)."""
    return [
        (line.levelname, line.getMessage())
        for line in caplog.records
        if line.name == "trio_heartbeat.registry"
    ]


@pytest.fixture
def registry_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """``caplog``, with the registry's INFO lines captured too."""
    caplog.set_level(logging.INFO, logger="trio_heartbeat.registry")
    return caplog


async def test_registered_at_once_and_renewed_every_third_of_the_ttl(
    autojump_clock: MockClock, registry_log: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        async with open_registration(store, A, ttl=3.0) as registration:
            assert registration.state is RegistrationState.REGISTERED
            assert registration.lease == 1
            assert registration.registrations == 1
            assert await record(memory) == A
            assert registration.key == A.key
            assert registration.renew_interval == 1.0
            assert repr(registration) == f"<Registration {A.key!r} registered, lease 1>"
            await trio.sleep(10.5)
            assert await memory.time_to_live(1) == 2.5
        assert store.times("grant") == [0.0]
        assert store.times("put") == [0.0]
        assert store.times("keepalive") == [1.0 * n for n in range(1, 11)]
        assert store.times("revoke") == [10.5]
        assert await record(memory) is None
        assert where(registration) == (RegistrationState.STOPPED, None, None, 1)
        assert logged(registry_log) == [
            ("INFO", f"{KEY} registered (SERVING, ttl 3 s)"),
            ("INFO", f"{KEY} withdrawn: stopping"),
        ]


async def test_degraded_is_published_at_once_under_the_same_lease(
    autojump_clock: MockClock, registry_log: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory, open_health_monitor() as health:
        store = FaultyStore(memory)
        async with open_registration(store, A, ttl=3.0, health=health) as registration:
            await trio.sleep(0.5)
            health.set_status(HealthStatus.DEGRADED)
            await trio.testing.wait_all_tasks_blocked()
            assert (await record(memory)) == Instance(
                "echo", "a", A.address, HealthStatus.DEGRADED, A.metadata
            )
            await trio.sleep(2.0)  # still renewed while DEGRADED, on the same timetable
            health.set_status(HealthStatus.SERVING)
            await trio.testing.wait_all_tasks_blocked()
            assert await record(memory) == A
            assert registration.lease == 1
            assert registration.registrations == 1
        assert store.times("put") == [0.0, 0.5, 2.5]
        assert store.times("keepalive") == [1.0, 2.0]
        assert await record(memory) is None  # the rewritten record went with the lease
        assert logged(registry_log) == [
            ("INFO", f"{KEY} registered (SERVING, ttl 3 s)"),
            ("INFO", f"{KEY} health SERVING -> DEGRADED"),
            ("INFO", f"{KEY} health DEGRADED -> SERVING"),
            ("INFO", f"{KEY} withdrawn: stopping"),
        ]


async def test_not_serving_withdraws_at_once_and_healthy_registers_again(
    autojump_clock: MockClock, registry_log: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory, open_health_monitor() as health:
        store = FaultyStore(memory)
        async with open_registration(store, A, ttl=3.0, health=health) as registration:
            await trio.sleep(1.25)
            health.set_status(HealthStatus.NOT_SERVING)
            state = await registration.wait_state(RegistrationState.WITHDRAWN)
            assert state is RegistrationState.WITHDRAWN
            assert trio.current_time() == 1.25
            assert await record(memory) is None
            assert registration.lease is None
            await trio.sleep(20.0)  # no renewal, no registration while NOT_SERVING
            health.set_status(HealthStatus.SERVING)
            await registration.wait_state(RegistrationState.REGISTERED)
            assert trio.current_time() == 21.25
            assert await record(memory) == A
            assert where(registration) == (RegistrationState.REGISTERED, 2, None, 2)
        assert store.times("revoke") == [1.25, 21.25]
        assert store.times("keepalive") == [1.0]
        assert store.times("grant") == [0.0, 21.25]
        assert logged(registry_log) == [
            ("INFO", f"{KEY} registered (SERVING, ttl 3 s)"),
            ("INFO", f"{KEY} withdrawn: NOT_SERVING"),
            ("INFO", f"{KEY} registered (SERVING, ttl 3 s)"),
            ("INFO", f"{KEY} withdrawn: stopping"),
        ]


async def test_starting_not_serving_registers_nothing_until_healthy(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory, open_health_monitor() as health:
        health.set_status(HealthStatus.NOT_SERVING)
        async with open_registration(memory, A, ttl=3.0, health=health) as registration:
            assert registration.state is RegistrationState.WITHDRAWN
            assert await record(memory) is None
            await trio.sleep(4.0)
            health.set_status(HealthStatus.DEGRADED)
            await registration.wait_state(RegistrationState.REGISTERED)
            assert trio.current_time() == 4.0
            assert (await record(memory)) is not None
            assert (await record(memory)).health is HealthStatus.DEGRADED  # type: ignore[union-attr]


async def test_a_hung_registrant_disappears_at_its_last_renewal_plus_the_ttl(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        async with open_registration(store, A, ttl=3.0) as registration:
            await trio.sleep(2.5)
            store.freeze()  # the process hangs: its calls never reach the store
            async with memory_watch(memory) as deleted_at:
                await trio.sleep(10.0)
            assert deleted_at == [5.0]  # renewed at 2.0, gone at 2.0 + 3.0 (< 2.5 + 3 + 1)
            store.thaw()  # back after 10 s: the lease is gone, so it registers anew
            await trio.testing.wait_all_tasks_blocked()
            await registration.wait_state(RegistrationState.REGISTERED)
            assert registration.lease == 2
            assert registration.registrations == 2
            assert await record(memory) == A
            assert store.times("grant") == [0.0, 12.5]


@asynccontextmanager
async def memory_watch(store: MemoryStore) -> AsyncIterator[list[float]]:
    """The times of the deletes of the instance's key while the block runs."""
    times: list[float] = []
    revision = store.revision

    async def follow() -> None:
        async for batch in store.watch(A.key, revision):
            times.extend(trio.current_time() for c in batch if c.kind is ChangeKind.DELETE)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        yield times
        nursery.cancel_scope.cancel()


async def test_an_outage_is_retried_on_the_backoff_and_the_lease_kept(
    autojump_clock: MockClock, registry_log: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        async with open_registration(store, A, ttl=9.0, backoff=[0.5, 1.0]) as registration:
            await trio.sleep(2.5)
            store.down = True
            state = await registration.wait_state(RegistrationState.OUTAGE)
            assert state is RegistrationState.OUTAGE
            assert registration.outage == 3.0
            store.calls.clear()
            await trio.sleep(3.0)  # retries at 3.5, 4.5, then every ttl/3 (7.5, ...)
            store.down = False
            await registration.wait_state(RegistrationState.REGISTERED)
            assert trio.current_time() == 7.5
            # the lease lived through the outage: kept, not granted again
            assert where(registration) == (RegistrationState.REGISTERED, 1, None, 1)
            assert [(t, op) for t, op, _ in store.calls] == [(7.5, "keepalive"), (7.5, "put")]
            store.down = True
            await trio.sleep(0.5 + 3.0 + 0.25)  # down longer than the lease: 7.5 + 9 < 17.5
            assert registration.state is RegistrationState.OUTAGE
            assert registration.outage == 10.5
            await trio.sleep(7.0)  # retried at 11.0, 12.0, 15.0, 18.0
            store.down = False
            await registration.wait_state(RegistrationState.REGISTERED)
            assert trio.current_time() == 21.0  # the first retry since, at once under a new lease
            assert where(registration) == (RegistrationState.REGISTERED, 2, None, 2)
            assert await record(memory) == A
            assert [(t, op) for t, op, _ in store.calls[2:]] == [
                (21.0, "keepalive"),
                (21.0, "grant"),
                (21.0, "put"),
            ]
        down = "the store is unreachable (the store is down (test)); retrying"
        assert logged(registry_log) == [
            ("INFO", f"{KEY} registered (SERVING, ttl 9 s)"),
            ("WARNING", f"{KEY}: {down}"),
            ("INFO", f"{KEY} registered (SERVING, ttl 9 s)"),
            ("INFO", f"{KEY}: the store is back after 4.5 s"),
            ("WARNING", f"{KEY}: {down}"),
            ("INFO", f"{KEY}: lease 1 is gone; registering again"),
            ("INFO", f"{KEY} registered (SERVING, ttl 9 s)"),
            ("INFO", f"{KEY}: the store is back after 10.5 s"),
            ("INFO", f"{KEY} withdrawn: stopping"),
        ]


async def test_an_unreachable_store_at_start_reports_an_outage(autojump_clock: MockClock) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        store.down = True
        async with open_registration(store, A, ttl=3.0, backoff=[2.0]) as registration:
            assert registration.state is RegistrationState.OUTAGE
            assert registration.outage == 0.0
            store.down = False
            await registration.wait_state(RegistrationState.REGISTERED)
            assert trio.current_time() == 2.0
        assert (registration.state, registration.lease) == (RegistrationState.STOPPED, None)


async def test_a_revoke_that_hangs_is_abandoned_after_revoke_timeout(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        async with open_registration(store, A, ttl=3.0, revoke_timeout=0.75):
            store.freeze()
        assert trio.current_time() == 0.75
        store.thaw()
        await trio.sleep(3.0)
        assert await record(memory) is None  # it ran out by itself
        assert logged(caplog) == [
            ("WARNING", f"{KEY}: the revoke took too long; it runs out by itself")
        ]


async def test_a_store_down_at_shutdown_leaves_the_lease_to_run_out(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        async with open_registration(store, A, ttl=3.0) as registration:
            store.down = True
        assert trio.current_time() == 0.0
        assert registration.state is RegistrationState.STOPPED
        assert await record(memory) == A
        await trio.sleep(3.0)
        assert await record(memory) is None
        assert logged(caplog) == [("WARNING", f"{KEY}: not withdrawn; it runs out by itself")]


async def test_a_registration_runs_as_a_supervised_child(autojump_clock: MockClock) -> None:
    async with open_memory_store() as memory:
        registration = Registration(memory, A, ttl=3.0)
        async with open_service_supervisor([ChildSpec("registry", registration.run)]):
            await registration.wait_state(RegistrationState.REGISTERED)
            assert await record(memory) == A
        assert await record(memory) is None
        with pytest.raises(ValueError, match=r"^wait_state needs at least one state$"):
            await registration.wait_state()


async def test_one_registration_runs_once_at_a_time(autojump_clock: MockClock) -> None:
    async with open_memory_store() as memory, open_registration(memory, A, ttl=3.0) as registration:
        with pytest.raises(RuntimeError, match=r"^this Registration is already running$"):
            await registration.run()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ttl": 0.5}, ValueError, r"^ttl must be 1 to 9e\+09 s, not 0.5$"),
        ({"ttl": 9e9 + 1}, ValueError, r"^ttl must be 1 to 9e\+09 s, not 9000000001.0$"),
        ({"ttl": float("inf")}, ValueError, r"not inf$"),
        ({"ttl": float("nan")}, ValueError, r"not nan$"),
        ({"revoke_timeout": 0}, ValueError, r"^revoke_timeout must be positive and finite"),
        ({"backoff": iter([1.0])}, TypeError, r"^backoff must be re-iterable"),
        ({"instance": "a"}, TypeError, r"^instance must be an Instance, not str$"),
        (
            {"instance": Instance("echo", "a", "h:1", HealthStatus.NOT_SERVING)},
            ValueError,
            r"^a NOT_SERVING instance is never registered \(use a HealthMonitor\)$",
        ),
    ],
)
async def test_bad_arguments_are_refused(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    async with open_memory_store() as memory:
        arguments: dict[str, object] = {"instance": A}
        arguments.update(kwargs)
        instance = arguments.pop("instance")
        with pytest.raises(error, match=message):
            Registration(memory, instance, **arguments)  # type: ignore[arg-type]


async def test_an_ended_registration_is_freed_without_the_collector(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        gc.collect()
        gc.disable()
        try:
            async with open_registration(memory, A, ttl=3.0) as registration:
                await trio.sleep(1.5)
            ref = weakref.ref(registration)
            del registration
            assert ref() is None
        finally:
            gc.enable()


async def test_a_withdrawal_the_store_cannot_hear_leaves_the_lease_to_run_out(
    autojump_clock: MockClock, registry_log: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory, open_health_monitor() as health:
        store = FaultyStore(memory)
        async with open_registration(store, A, ttl=3.0, health=health) as registration:
            await trio.sleep(0.5)
            store.down = True
            health.set_status(HealthStatus.NOT_SERVING)
            await registration.wait_state(RegistrationState.WITHDRAWN)
            assert registration.lease is None
            assert trio.current_time() == 0.5
            store.down = False
            assert await record(memory) == A
            await trio.sleep(2.5)
            assert await record(memory) is None  # at the lease's deadline, 3.0
        assert logged(registry_log) == [
            ("INFO", f"{KEY} registered (SERVING, ttl 3 s)"),
            ("WARNING", f"{KEY}: could not revoke lease 1; it runs out by itself"),
            ("INFO", f"{KEY} withdrawn: NOT_SERVING"),
        ]


class LeaseLostBeforePut(FaultyStore):
    """The first put finds its lease gone (it ran out between the grant and the put)."""

    lost = False

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        if not self.lost:
            self.lost = True
            raise ValueError(f"lease {lease} not found")
        return await super().put(key, value, lease=lease)


async def test_a_lease_lost_before_the_put_is_granted_again(
    autojump_clock: MockClock, registry_log: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory:
        store = LeaseLostBeforePut(memory)
        async with open_registration(store, A, ttl=3.0, backoff=[0.5]) as registration:
            assert registration.state is RegistrationState.OUTAGE
            await registration.wait_state(RegistrationState.REGISTERED)
            assert trio.current_time() == 0.5
            assert registration.lease == 2
            assert await record(memory) == A
            # the lost lease is not asked about again: a new one, at once
            assert [(t, op) for t, op, _ in store.calls] == [
                (0.0, "grant"),
                (0.5, "grant"),
                (0.5, "put"),
            ]
        assert logged(registry_log)[:3] == [
            (
                "WARNING",
                f"{KEY}: the store is unreachable (the lease ran out before the record was put);"
                " retrying",
            ),
            ("INFO", f"{KEY} registered (SERVING, ttl 3 s)"),
            ("INFO", f"{KEY}: the store is back after 0.5 s"),
        ]


async def test_the_blocks_own_error_comes_out_as_itself(autojump_clock: MockClock) -> None:
    async with open_memory_store() as memory:
        with pytest.raises(KeyError, match=r"^'mine'$"):
            async with open_registration(memory, A, ttl=3.0):
                raise KeyError("mine")
        assert await record(memory) is None


class SlowFirstRevoke(FaultyStore):
    """The first revoke takes a second (etcd busy); later ones are prompt."""

    revokes = 0

    async def revoke(self, lease: int) -> None:
        self.revokes += 1
        if self.revokes == 1:
            await trio.sleep(1.0)
        await super().revoke(lease)


async def test_a_withdrawal_cut_short_by_the_shutdown_is_revoked_by_the_shutdown(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory, open_health_monitor() as health:
        store = SlowFirstRevoke(memory)
        async with open_registration(store, A, ttl=30.0, health=health):
            health.set_status(HealthStatus.NOT_SERVING)  # the drain begins: withdraw...
            await trio.sleep(0.5)  # ...and the process stops before the revoke answered
        assert trio.current_time() == 0.5
        assert store.times("revoke") == [0.5]  # the shutdown's own, at once
        assert await record(memory) is None


class RefusingStore(FaultyStore):
    """Its first grants fail as a broken or hostile store's do (RuntimeError, ValueError)."""

    failures: list[Exception]

    async def grant(self, ttl: float) -> int:
        if self.failures:
            await trio.lowlevel.checkpoint()
            raise self.failures.pop(0)
        return await super().grant(ttl)


async def test_a_store_that_answers_nonsense_is_an_outage_never_the_end(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        store = RefusingStore(memory)
        store.failures = [RuntimeError("etcd refused"), ValueError("an answer over 16 MiB")]
        async with open_registration(store, A, ttl=3.0, backoff=[0.5, 0.25]) as registration:
            assert where(registration) == (RegistrationState.OUTAGE, None, 0.0, 0)
            await registration.wait_state(RegistrationState.REGISTERED)
            assert trio.current_time() == 0.75
            assert await record(memory) == A


async def test_without_a_monitor_the_record_says_the_instances_own_health(
    autojump_clock: MockClock,
) -> None:
    degraded = Instance("echo", "a", "127.0.0.1:7400", HealthStatus.DEGRADED)
    async with open_memory_store() as memory, open_registration(memory, degraded, ttl=3.0):
        await trio.sleep(5.0)
        assert await record(memory) == degraded


async def test_the_defaults_are_a_ten_second_ttl_and_a_two_second_revoke(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        registration = Registration(store, A)
        assert where(registration) == (RegistrationState.UNREGISTERED, None, None, 0)
        assert repr(registration) == f"<Registration {KEY!r} unregistered, lease None>"
        assert registration.prefix == DEFAULT_REGISTRY_PREFIX
        async with trio.open_nursery() as nursery:
            await nursery.start(registration.run)
            assert await memory.time_to_live(1) == 10.0
            await trio.sleep(4.0)
            store.freeze()  # leaving, the revoke never answers
            nursery.cancel_scope.cancel()
        assert trio.current_time() == 6.0
        assert store.times("keepalive") == [10 / 3]


async def test_the_shortest_ttl_is_one_second(autojump_clock: MockClock) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        async with open_registration(store, A, ttl=1.0) as registration:
            assert await memory.time_to_live(1) == 1.0
            assert registration.renew_interval == 1 / 3
            await trio.sleep(0.5)
            assert store.times("keepalive") == [1 / 3]
            assert await record(memory) == A


async def test_the_longest_ttl_is_etcds_own_maximum(autojump_clock: MockClock) -> None:
    async with (
        open_memory_store() as memory,
        open_registration(memory, A, ttl=9e9) as registration,
    ):
        assert registration.state is RegistrationState.REGISTERED
        assert await memory.time_to_live(1) == 9e9


async def test_a_prefix_of_its_own_keys_the_record_under_it(autojump_clock: MockClock) -> None:
    async with (
        open_memory_store() as memory,
        open_registration(memory, A, ttl=3.0, prefix="fleet/") as registration,
    ):
        assert (registration.prefix, registration.key) == ("fleet/", "fleet/echo/a")
        entries, _ = await memory.range("")
        assert [(entry.key, entry.value, entry.lease) for entry in entries] == [
            ("fleet/echo/a", A.encode(), 1)
        ]


async def test_the_default_backoff_is_full_jitter_from_a_tenth_of_a_second_to_a_third_of_the_ttl(
    autojump_clock: MockClock,
) -> None:
    # Twenty outages of 12 s each, with a TTL of 3 s.
    outages: list[list[float]] = []
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        async with open_registration(store, A, ttl=3.0) as registration:
            for _ in range(20):
                store.down = True
                store.refused.clear()
                await registration.wait_state(RegistrationState.OUTAGE)
                await trio.sleep(12.0)
                store.down = False
                tried = store.refused.copy()  # the failed renewal, then each retry
                outages.append([later - earlier for earlier, later in itertools.pairwise(tried)])
                await registration.wait_state(RegistrationState.REGISTERED)
    assert_full_jitter(outages)


class SlowLaterGrants(FaultyStore):
    """The first grant is prompt; each later one takes a second."""

    grants = 0

    async def grant(self, ttl: float) -> int:
        self.grants += 1
        if self.grants > 1:
            await trio.sleep(1.0)
        return await super().grant(ttl)


async def test_a_lease_gone_at_a_renewal_is_unregistered_until_a_new_one_is_granted(
    autojump_clock: MockClock, registry_log: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory:
        store = SlowLaterGrants(memory)
        async with open_registration(store, A, ttl=3.0) as registration:
            await trio.sleep(0.5)
            await memory.revoke(1)  # the store lost it (restarted from an old snapshot, say)
            await trio.sleep(1.0)  # the renewal at 1.0 finds it gone; the new grant takes 1 s
            assert where(registration) == (RegistrationState.UNREGISTERED, None, None, 1)
            state = await registration.wait_state(RegistrationState.REGISTERED)
            assert state is RegistrationState.REGISTERED
            assert trio.current_time() == 2.0
            assert where(registration) == (RegistrationState.REGISTERED, 2, None, 2)
            assert await record(memory) == A
            assert [(t, op) for t, op, _ in store.calls] == [
                (0.0, "grant"),
                (0.0, "put"),
                (1.0, "keepalive"),
                (2.0, "grant"),
                (2.0, "put"),
            ]
        assert logged(registry_log) == [
            ("INFO", f"{KEY} registered (SERVING, ttl 3 s)"),
            ("WARNING", f"{KEY}: lease 1 ran out; registering again"),
            ("INFO", f"{KEY} registered (SERVING, ttl 3 s)"),
            ("INFO", f"{KEY} withdrawn: stopping"),
        ]


class BuggyFirstRenewal(FaultyStore):
    """The first keepalive fails with an error no store should raise (a bug)."""

    failed = False

    async def keepalive(self, lease: int) -> float | None:
        if not self.failed:
            self.failed = True
            await trio.lowlevel.checkpoint()
            raise KeyError("a bug in the store")
        return await super().keepalive(lease)


async def test_a_registration_that_failed_runs_again_when_its_supervisor_restarts_it(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        store = BuggyFirstRenewal(memory)
        registration = Registration(store, A, ttl=3.0)
        spec = ChildSpec("registry", registration.run)
        async with open_service_supervisor([spec], backoff=[0.25]):
            await trio.sleep(1.125)  # the renewal at 1.0 failed: run ended, its lease revoked
            assert where(registration) == (RegistrationState.STOPPED, None, None, 1)
            assert await record(memory) is None
            await trio.sleep(0.25)  # restarted at 1.25: the same Registration runs again
            assert where(registration) == (RegistrationState.REGISTERED, 2, None, 2)
            assert await record(memory) == A
        assert store.times("grant") == [0.0, 1.25]


@pytest.mark.parametrize("status", [HealthStatus.NOT_SERVING, HealthStatus.DEGRADED])
async def test_a_health_change_while_the_first_record_is_written_is_not_lost(
    autojump_clock: MockClock, status: HealthStatus
) -> None:
    async with open_memory_store() as memory, open_health_monitor() as health:
        store = FaultyStore(memory)
        store.put_delay = 0.05  # the health may change meanwhile
        async with trio.open_nursery() as nursery:
            registration = Registration(store, A, ttl=9.0, health=health)
            nursery.start_soon(registration.run)
            await trio.sleep(0.01)  # the first put is under way
            health.set_status(status)
            await trio.sleep(0.2)
            written = await record(memory)
            if status is HealthStatus.NOT_SERVING:  # withdrawn as soon as the put was done
                assert written is None
                assert store.times("revoke") == [0.05]
            else:  # and rewritten, not left saying SERVING until the next change
                assert written is not None
                assert written.health is HealthStatus.DEGRADED
                assert store.times("put") == [0.05, 0.1]  # written, then rewritten at once
            nursery.cancel_scope.cancel()
