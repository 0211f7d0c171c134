"""Discovery (``_discovery.py``) over the embedded store, in virtual time, exact times.

What it pins: the block starts with the live set read from the store (under
its own prefix); every registration, change of health, withdrawal and expiry
comes out as one event, in order, at the instant it happens; ``initial`` lists
the set first, and says if it is stale; a watch that fell behind the store's
history is answered by a fresh read whose differences come out as events; a
store that stops answering is noticed by the periodic check while the watch is
quiet (a check that fails once is enough), the last set is kept and called
stale, and the store's return brings a fresh read, after the backoff, and the
differences; a store down at the start is retried at the backoff's pace and
checked once it is watched; each of these says so in the registry's log; a
reader that fell behind the event history is told the differences instead of
what it missed, and one exactly at the history's edge is told every event;
the endpoint source gives live addresses in turn, from the place ``start``
fixes, SERVING ones first, waits while there are none, and never one that was
dropped; a value that is not a record is counted and left out; bad arguments
are refused; nothing is left running.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import pytest
import trio
import trio.testing
from helpers import task_names
from registry_helpers import FaultyStore
from trio.testing import MockClock

from trio_heartbeat import HealthStatus
from trio_heartbeat._discovery import (
    DiscoveryFresh,
    DiscoveryNotice,
    DiscoveryStale,
    open_discovery,
)
from trio_heartbeat._errors import StoreUnavailable, WatchCompacted
from trio_heartbeat._instances import (
    Instance,
    InstanceAdded,
    InstanceChanged,
    InstanceRemoved,
    instance_key,
)
from trio_heartbeat._leases import Change, ChangeKind, Entry
from trio_heartbeat._memory_store import MemoryStore, open_memory_store

A = Instance("echo", "a", "127.0.0.1:7400")
B = Instance("echo", "b", "127.0.0.1:7401")
C = Instance("echo", "c", "127.0.0.1:7402")


async def register(store: MemoryStore, instance: Instance, ttl: float = 3.0) -> int:
    lease = await store.grant(ttl)
    await store.put(instance.key, instance.encode(), lease=lease)
    return lease


async def collect(
    changes: AsyncIterator[DiscoveryNotice], into: list[tuple[float, DiscoveryNotice]]
) -> None:
    async for notice in changes:
        into.append((trio.current_time(), notice))


async def test_the_set_and_every_change_in_order_at_its_instant(autojump_clock: MockClock) -> None:
    async with open_memory_store() as store:
        await register(store, A)
        await store.put(instance_key("other", "x"), B.encode())
        async with open_discovery(store, "echo") as discovery, trio.open_nursery() as nursery:
            assert discovery.instances == {"a": A}
            assert discovery.revision == 3
            assert (discovery.stale, discovery.stale_since, discovery.stale_reason) == (
                False,
                None,
                "",
            )
            assert discovery.malformed == 0
            assert repr(discovery) == "<Discovery 'echo': 1 live>"
            seen: list[tuple[float, DiscoveryNotice]] = []
            nursery.start_soon(collect, discovery.changes(initial=True), seen)
            await trio.sleep(1.0)
            lease_b = await register(store, B, ttl=2.0)
            await trio.sleep(0.5)
            degraded = Instance("echo", "b", B.address, HealthStatus.DEGRADED)
            await store.put(B.key, degraded.encode(), lease=lease_b)
            await trio.sleep(5.0)  # A expires at 3.0, B at 3.0
            await register(store, C)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert seen == [
            (0.0, InstanceAdded(A, 3)),
            (1.0, InstanceAdded(B, 4)),
            (1.5, InstanceChanged(degraded, B, 5)),
            (3.0, InstanceRemoved(A, 6)),
            (3.0, InstanceRemoved(degraded, 7)),
            (6.5, InstanceAdded(C, 8)),
        ]
        assert discovery.instances == {"c": C}
    assert not [name for name in task_names() if "discover" in name]


def registry_log(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """What the operator read in the registry's log: (level, message)."""
    return [
        (record.levelname, record.getMessage())
        for record in caplog.records
        if record.name == "trio_heartbeat.registry"
    ]


async def test_a_compacted_watch_is_answered_by_a_fresh_read(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_heartbeat.registry")
    async with open_memory_store(history=4) as memory:
        store = FaultyStore(memory)
        async with open_discovery(store, "echo") as discovery, trio.open_nursery() as nursery:
            seen: list[tuple[float, DiscoveryNotice]] = []
            nursery.start_soon(collect, discovery.changes(), seen)
            store.freeze()  # the watch's next batch waits: the history moves past it
            for instance in (A, B, C):
                await register(memory, instance)
            await memory.delete(A.key)
            for port in range(7, 10):
                await memory.put(B.key, Instance("echo", "b", f"h:{port}").encode())
            await trio.sleep(1.0)
            store.thaw()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert discovery.instances == {"b": Instance("echo", "b", "h:9"), "c": C}
        # the first batch was in hand (A added); the rest is the fresh read's differences
        assert [type(n).__name__ for _, n in seen] == [
            "InstanceAdded",
            "InstanceRemoved",
            "InstanceAdded",
            "InstanceAdded",
        ]
        assert [t for t, _ in seen] == [1.0] * 4
        assert store.times("range") == [0.0, 1.0]
        assert registry_log(caplog) == [
            (
                "INFO",
                "trio-heartbeat/services/echo/: watch compacted"
                " (changes after revision 2 are no longer kept); reading again",
            )
        ]


async def test_an_outage_keeps_the_last_set_and_says_it_is_stale(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_heartbeat.registry")
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        await register(memory, A, ttl=100.0)
        async with (
            open_discovery(store, "echo", check_interval=2.0, backoff=[1.0]) as discovery,
            trio.open_nursery() as nursery,
        ):
            seen: list[tuple[float, DiscoveryNotice]] = []
            nursery.start_soon(collect, discovery.changes(), seen)
            await trio.sleep(0.5)
            store.down = True
            await trio.sleep(2.0)  # the quiet watch's check at 2.0 failed
            assert discovery.stale
            assert discovery.stale_since == 2.0
            assert "down" in discovery.stale_reason
            await memory.revoke(1)  # meanwhile, A goes away, and B comes
            await register(memory, B, ttl=100.0)
            assert discovery.instances == {"a": A}  # the last set known
            assert repr(discovery) == "<Discovery 'echo': 1 live, stale>"
            late = discovery.changes(initial=True)  # a reader that starts now is told both
            assert [await anext(late), await anext(late)] == [
                InstanceAdded(A, 2),
                DiscoveryStale("the store is down (test)", 2.0),
            ]
            await trio.sleep(5.0)
            store.down = False
            await discovery.wait_for(lambda instances: "b" in instances)
            assert trio.current_time() == 9.0  # retries at 3.0, then every check_interval
            assert (discovery.stale, discovery.stale_reason) == (False, "")
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert seen == [
            (2.0, DiscoveryStale("the store is down (test)", 2.0)),
            (9.0, InstanceRemoved(A, 4)),
            (9.0, InstanceAdded(B, 4)),
            (9.0, DiscoveryFresh(4, 7.0)),
        ]
        assert registry_log(caplog) == [
            (
                "WARNING",
                "trio-heartbeat/services/echo/: the store is unreachable"
                " (the store is down (test)); keeping the last set",
            ),
            ("INFO", "trio-heartbeat/services/echo/: the store is back after 7.0 s"),
        ]


async def test_a_store_down_at_start_is_retried_at_the_backoffs_pace_then_checked(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        store.down = True
        await register(memory, A, ttl=100.0)
        async with open_discovery(store, "echo", check_interval=2.0, backoff=[5.0]) as discovery:
            await trio.sleep(4.5)  # checks at 2.0 and 4.0: nothing to check without a watch
            assert (discovery.stale_since, discovery.instances) == (0.0, {})
            store.down = False
            assert await discovery.wait_for() == {"a": A}
            assert trio.current_time() == 5.0
            await trio.sleep(3.5)
            assert store.times("range") == [5.0, 6.0, 8.0]  # the watch is checked from now on
            store.down = True
            await trio.sleep(2.0)
            assert discovery.stale_since == 10.0


async def test_a_store_unreachable_at_start_gives_an_empty_stale_set(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        store.down = True
        await register(memory, A)
        async with open_discovery(store, "echo", backoff=[0.25]) as discovery:
            assert discovery.stale
            assert discovery.instances == {}
            store.down = False
            assert await discovery.wait_for() == {"a": A}
            assert trio.current_time() == 0.25


async def test_a_reader_that_fell_behind_is_told_the_differences(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as store, open_discovery(store, "echo", history=2) as discovery:
        await register(store, A)
        await trio.testing.wait_all_tasks_blocked()
        changes = discovery.changes()
        lease = await register(store, B)
        await register(store, C)
        await store.revoke(lease)
        await store.delete(A.key)
        await trio.testing.wait_all_tasks_blocked()
        # four events, two kept: it hears that A left and C came, not B's visit
        revision = discovery.revision
        assert [await anext(changes), await anext(changes)] == [
            InstanceRemoved(A, revision),
            InstanceAdded(C, revision),
        ]
        lease = await register(store, B)
        await trio.testing.wait_all_tasks_blocked()
        assert await anext(changes) == InstanceAdded(B, discovery.revision)  # in step again
        # exactly as far behind as the history reaches: every event, none folded
        c1, c2 = Instance("echo", "c", "h:1"), Instance("echo", "c", "h:2")
        first = await store.put(C.key, c1.encode())
        second = await store.put(C.key, c2.encode())
        await trio.testing.wait_all_tasks_blocked()
        assert [await anext(changes), await anext(changes)] == [
            InstanceChanged(c1, C, first),
            InstanceChanged(c2, c1, second),
        ]
        await store.revoke(lease)
        await trio.testing.wait_all_tasks_blocked()
        assert await anext(changes) == InstanceRemoved(B, discovery.revision)
        for port in (3, 4, 5):
            await store.put(C.key, Instance("echo", "c", f"h:{port}").encode())
        await trio.testing.wait_all_tasks_blocked()
        # behind again: the one difference from what it was told (B's leaving is not news)
        c5 = Instance("echo", "c", "h:5")
        assert await anext(changes) == InstanceChanged(c5, c2, discovery.revision)
        await register(store, A)
        await trio.testing.wait_all_tasks_blocked()
        assert await anext(changes) == InstanceAdded(A, discovery.revision)


async def test_the_endpoints_rotate_over_live_instances_serving_first(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as store, open_discovery(store, "echo") as discovery:
        endpoints = discovery.endpoints(start=0)
        assert aiter(endpoints) is endpoints
        async with trio.open_nursery() as nursery:
            got: list[tuple[float, str]] = []

            async def first() -> None:
                endpoint = await anext(endpoints)
                got.append((trio.current_time(), endpoint))

            nursery.start_soon(first)
            await trio.sleep(2.0)
            await register(store, A, ttl=100.0)
        assert got == [(2.0, A.address)]
        lease_b = await register(store, B, ttl=100.0)
        await register(store, C, ttl=100.0)
        await trio.testing.wait_all_tasks_blocked()
        assert [await anext(endpoints) for _ in range(4)] == [
            B.address,
            C.address,
            A.address,
            B.address,
        ]
        # a given start fixes the place: source k starts at the k-th instance, in id order
        started = [await anext(discovery.endpoints(start=k)) for k in range(12)]
        assert started == [A.address, B.address, C.address] * 4
        await store.put(A.key, Instance("echo", "a", A.address, HealthStatus.DEGRADED).encode())
        await store.revoke(lease_b)
        await trio.testing.wait_all_tasks_blocked()
        assert {await anext(endpoints) for _ in range(4)} == {C.address}
        await store.delete(C.key)
        await trio.testing.wait_all_tasks_blocked()
        assert await anext(endpoints) == A.address  # DEGRADED, when it is all there is
        await register(store, B)
        await trio.testing.wait_all_tasks_blocked()
        firsts = {await anext(discovery.endpoints()) for _ in range(64)}
        assert firsts == {B.address}  # SERVING first, whatever the start
        await store.put(A.key, A.encode())
        await trio.testing.wait_all_tasks_blocked()
        firsts = {await anext(discovery.endpoints()) for _ in range(64)}
        assert firsts == {A.address, B.address}  # each source starts somewhere of its own


async def test_a_registry_under_another_prefix_is_followed_there(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        await memory.put(instance_key("echo", "a", "fleet/"), A.encode())
        await memory.put(B.key, B.encode())  # the same service under the default prefix
        async with open_discovery(store, "echo", prefix="fleet/") as discovery:
            assert discovery.instances == {"a": A}
            await memory.put(C.key, C.encode())
            await memory.put(instance_key("echo", "c", "fleet/"), C.encode())
            await discovery.wait_for(lambda instances: len(instances) == 2)
            assert discovery.instances == {"a": A, "c": C}
            assert [call for call in store.calls if call[1] == "range"] == [
                (0.0, "range", "fleet/echo/")
            ]


async def test_a_value_that_is_not_a_record_is_left_out_and_counted(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as store:
        await store.put(instance_key("echo", "x"), b"\x00 not json")
        await register(store, A)
        async with open_discovery(store, "echo") as discovery:
            assert discovery.instances == {"a": A}
            assert discovery.malformed == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"check_interval": 0.0}, ValueError, r"^check_interval must be positive and finite"),
        ({"check_interval": float("nan")}, ValueError, r"not nan$"),
        ({"history": 0}, ValueError, r"^history must be a positive int, not 0$"),
        ({"history": True}, ValueError, r"not True$"),
        ({"backoff": iter([1.0])}, TypeError, r"^backoff must be re-iterable"),
    ],
)
async def test_bad_arguments_are_refused(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    async with open_memory_store() as store:
        with pytest.raises(error, match=message):
            async with open_discovery(store, "echo", **kwargs):  # type: ignore[arg-type]
                pass  # pragma: no cover
        with pytest.raises(ValueError, match=r"^service must be 1 to 128"):
            async with open_discovery(store, ""):
                pass  # pragma: no cover


async def test_the_blocks_own_error_comes_out_as_itself(autojump_clock: MockClock) -> None:
    async with open_memory_store() as store:
        with pytest.raises(StoreUnavailable, match=r"^mine$"):
            async with open_discovery(store, "echo"):
                raise StoreUnavailable("mine")


async def test_an_ended_discovery_is_freed_without_the_collector(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as store:
        await register(store, A)
        gc.collect()
        gc.disable()
        try:
            async with open_discovery(store, "echo") as discovery:
                changes = discovery.changes(initial=True)
                assert await anext(changes) == InstanceAdded(A, 2)
            ref = weakref.ref(discovery)
            del discovery, changes
            assert ref() is None
        finally:
            gc.enable()


async def test_a_broken_watch_makes_the_set_stale_at_once(autojump_clock: MockClock) -> None:
    async with open_memory_store() as memory:
        store = FaultyStore(memory)
        await register(memory, A)
        async with open_discovery(store, "echo", backoff=[0.5]) as discovery:
            await trio.sleep(1.0)
            store.down = True
            await memory.delete(A.key)  # the watch's next batch fails: the stream broke
            await trio.testing.wait_all_tasks_blocked()
            assert discovery.stale_since == 1.0
            assert discovery.instances == {"a": A}
            store.down = False
            await discovery.wait_for(lambda instances: not instances)
            assert trio.current_time() == 1.5
            assert not discovery.stale


class EndingWatch(FaultyStore):
    """A watch that ends after its first batch (as a store may end a stream)."""

    async def watch(self, prefix: str, after: int) -> AsyncGenerator[tuple[Change, ...], None]:
        async with aclosing(self.store.watch(prefix, after)) as batches:
            async for batch in batches:
                yield batch
                return


async def test_a_watch_that_ends_is_followed_by_a_fresh_read(autojump_clock: MockClock) -> None:
    async with open_memory_store() as memory:
        store = EndingWatch(memory)
        async with open_discovery(store, "echo") as discovery:
            await trio.sleep(1.0)
            await register(memory, A)
            await trio.sleep(1.0)
            await register(memory, B)
            await discovery.wait_for(lambda instances: len(instances) == 2)
            assert trio.current_time() == 2.0
            await trio.testing.wait_all_tasks_blocked()
            assert store.times("range") == [0.0, 1.0, 2.0]


class RefusingStore(FaultyStore):
    """Its first two ranges fail as a broken or hostile store's do: an answer over the
    client's bound (ValueError), then a refusal nobody expected (RuntimeError)."""

    failures: list[Exception]

    async def range(self, prefix: str = "") -> tuple[list[Entry], int]:
        if self.failures:
            await trio.lowlevel.checkpoint()
            raise self.failures.pop(0)
        return await super().range(prefix)


async def test_a_store_that_answers_nonsense_makes_the_set_stale_never_ends_it(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        store = RefusingStore(memory)
        store.failures = [ValueError("an answer over 16 MiB"), RuntimeError("etcd refused")]
        await register(memory, A, ttl=100.0)
        async with open_discovery(store, "echo", backoff=[0.25, 0.5]) as discovery:
            assert discovery.stale
            assert discovery.stale_reason == "an answer over 16 MiB"
            assert await discovery.wait_for() == {"a": A}
            assert trio.current_time() == 0.75
            assert (discovery.stale, discovery.stale_reason) == (False, "")
            # a check that gets nonsense back makes the set stale too, even if the
            # next read works: that read waits for the backoff, from its start again
            changes = discovery.changes()
            store.failures = [RuntimeError("etcd refused again")]
            assert await anext(changes) == DiscoveryStale("etcd refused again", 5.0)
            assert await anext(changes) == DiscoveryFresh(discovery.revision, 0.25)
            assert trio.current_time() == 5.25
            store.failures = [StoreUnavailable("down for a moment", "test:1")]
            assert await anext(changes) == DiscoveryStale("down for a moment", 10.0)
            assert await anext(changes) == DiscoveryFresh(discovery.revision, 0.25)
            assert trio.current_time() == 10.25  # checked on, after the failed check too


async def test_readers_and_waiters_are_let_go_when_the_block_ends(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as store:
        await register(store, A)
        async with open_discovery(store, "echo") as discovery:
            changes = discovery.changes(initial=True)
            endpoints = discovery.endpoints()
            assert await anext(changes) == InstanceAdded(A, 2)
        with pytest.raises(StopAsyncIteration):
            await anext(changes)
        with pytest.raises(StopAsyncIteration):  # nothing after the block: not the last set
            await anext(endpoints)
        with pytest.raises(trio.ClosedResourceError, match=r"^this discovery has ended$"):
            await discovery.wait_for()  # even though an instance was live at the end
        await store.delete(A.key)
        let_go: list[tuple[str, float]] = []

        async def wait_on(name: str, iterator: AsyncIterator[object]) -> None:
            with pytest.raises(StopAsyncIteration):  # nothing to give, and nothing will come
                await anext(iterator)
            let_go.append((name, trio.current_time()))

        async with trio.open_nursery() as outside, open_discovery(store, "echo") as empty:
            outside.start_soon(wait_on, "endpoints", empty.endpoints())
            outside.start_soon(wait_on, "changes", empty.changes())
            await trio.sleep(1.0)
        assert sorted(let_go) == [("changes", 1.0), ("endpoints", 1.0)]
        with pytest.raises(trio.ClosedResourceError, match=r"^this discovery has ended$"):
            await empty.wait_for()


class Replaceable(FaultyStore):
    """A store whose data can be swapped for another's: etcd restored, or started afresh."""


async def test_a_store_whose_history_started_again_is_read_afresh(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_heartbeat.registry")
    async with open_memory_store() as old, open_memory_store() as fresh:
        for port in range(1, 30):  # the old history is long: revision 30
            await old.put(A.key, Instance("echo", "a", f"h:{port}").encode())
        store = Replaceable(old)
        async with open_discovery(store, "echo", check_interval=2.0) as discovery:
            assert discovery.revision == 30
            await trio.sleep(0.5)
            store.store = fresh  # etcd came back with a fresh data dir: revision 1 again
            await register(fresh, B)
            await trio.sleep(0.1)
            lease = await register(fresh, C)
            await discovery.wait_for(lambda live: set(live) == {"b", "c"})
            assert trio.current_time() == 2.0  # the next check saw the revision go back
            await fresh.revoke(lease)  # and the watch from the new history hears the rest
            await discovery.wait_for(lambda live: set(live) == {"b"})
            assert trio.current_time() == 2.0
            assert discovery.revision == 4
        assert registry_log(caplog) == [
            (
                "WARNING",
                "trio-heartbeat/services/echo/: the store's revision went back from 30 to 3"
                " (its history started again); reading it afresh",
            )
        ]


async def test_a_not_serving_record_is_listed_but_never_dialled(autojump_clock: MockClock) -> None:
    async with open_memory_store() as store, open_discovery(store, "echo") as discovery:
        down = Instance("echo", "a", A.address, HealthStatus.NOT_SERVING)
        await store.put(A.key, down.encode())  # written by someone else: we never do
        await trio.testing.wait_all_tasks_blocked()
        assert discovery.instances == {"a": down}
        endpoints = discovery.endpoints()
        with trio.move_on_after(5.0):
            await anext(endpoints)
            pytest.fail("a NOT_SERVING instance was given to dial")  # pragma: no cover
        await register(store, B)
        assert await anext(endpoints) == B.address


class SlowRanges(FaultyStore):
    """Each range's answer takes half a second to arrive (a store under load)."""

    async def range(self, prefix: str = "") -> tuple[list[Entry], int]:
        answer = await super().range(prefix)
        await trio.sleep(0.5)
        return answer


async def test_writes_during_a_check_are_no_history_started_again(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch moves past the revision a slow check read at: that is the store going on,
    not going back, and the watch is kept."""
    async with open_memory_store() as memory:
        store = SlowRanges(memory)
        async with open_discovery(store, "echo", check_interval=1.0) as discovery:
            for n in range(40):  # a write every 0.1 s, throughout the checks
                await memory.put(A.key, Instance("echo", "a", f"h:{n + 1}").encode())
                await trio.sleep(0.1)
            assert discovery.instances == {"a": Instance("echo", "a", "h:40")}
        assert store.times("watch") == [0.5]  # never torn down and started again
        assert not [r for r in caplog.records if "went back" in r.getMessage()]


class Compacting(FaultyStore):
    """Every watch is compacted at once (a store gone wrong, or a hostile one), except the
    first, which gives one batch first when ``first_batch`` is set."""

    def __init__(self, store: MemoryStore, *, first_batch: bool = False) -> None:
        super().__init__(store)
        self.first_batch = first_batch
        self.watches = 0

    async def watch(self, prefix: str, after: int) -> AsyncGenerator[tuple[Change, ...], None]:
        self.watches += 1
        await self._enter("watch", after)
        if self.first_batch and self.watches == 1:
            yield (Change(ChangeKind.PUT, A.key, A.encode(), after + 1),)
        raise WatchCompacted(after)


async def test_watches_compacted_at_once_are_retried_on_the_backoff_not_in_a_spin(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        store = Compacting(memory)
        async with open_discovery(store, "echo", backoff=[0.5, 1.0], check_interval=2.0):
            await trio.sleep(10.0)
        # a read at 0; then each compacted watch waits the backoff: 0.5, 1.0, then 2.0 each
        assert store.times("range") == [0.0, 0.5, 1.5, 3.5, 5.5, 7.5, 9.5]


async def test_a_compaction_after_a_batch_is_read_again_at_once_and_the_next_paced(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory:
        store = Compacting(memory, first_batch=True)
        async with open_discovery(store, "echo", backoff=[0.5, 1.0], check_interval=2.0):
            await trio.sleep(4.0)
        # the watch that gave a batch is read again at once (0.0); the ones compacted at
        # once wait the backoff, from its start: 0.5, then 1.0, then check_interval
        assert store.times("range") == [0.0, 0.0, 0.5, 1.5, 3.5]
