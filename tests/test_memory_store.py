"""The embedded key-value store (``_memory_store.py``): etcd's operations in this process, in virtual time.

What it pins: a key put with a lease disappears at exactly the lease's
deadline (grant + TTL, or the last keepalive + TTL), with no call needed; a
keepalive answers the TTL while the lease lives and ``None`` once it is gone;
revoke deletes at once; a put with a lease that is gone is refused; a watch
gives every change under its prefix after a revision, in order, batching what
happened since its last batch, wakes at exactly the instant of a change (an
expiry included), skips other prefixes, and raises WatchCompacted (one error, never a group) once it
fell behind the history; the block's own error comes out as itself; no task
is left.
"""

from __future__ import annotations

import pickle

import pytest
import trio
from helpers import task_names
from trio.testing import MockClock

from trio_heartbeat._errors import WatchCompacted
from trio_heartbeat._leases import Change, ChangeKind
from trio_heartbeat._memory_store import open_memory_store


async def test_a_leased_key_vanishes_at_exactly_its_deadline(autojump_clock: MockClock) -> None:
    async with open_memory_store() as store:
        lease = await store.grant(3.0)
        await store.put("svc/a", b"addr", lease=lease)
        await trio.sleep(2.0)
        assert await store.keepalive(lease) == 3.0  # deadline 5.0 now
        assert await store.time_to_live(lease) == 3.0
        await trio.sleep(2.999)
        assert [e.key for e in (await store.range("svc/"))[0]] == ["svc/a"]
        await trio.sleep(0.001)
        entries, revision = await store.range("svc/")
        assert (entries, revision) == ([], 3)
        assert await store.keepalive(lease) is None
        assert await store.time_to_live(lease) is None
        with pytest.raises(ValueError, match=r"^lease 1 not found$"):
            await store.put("svc/a", b"addr", lease=lease)
    assert not [name for name in task_names() if "memory store" in name]


async def test_revoke_and_delete_take_effect_at_once(autojump_clock: MockClock) -> None:
    async with open_memory_store() as store:
        lease = await store.grant(5.0)
        await store.put("a", b"1", lease=lease)
        await store.put("b", b"2")
        await store.revoke(lease)
        await store.delete("b")
        await store.delete("nothing")
        assert (await store.range())[0] == []
        assert store.revision == 5
        assert repr(store) == "<MemoryStore <LeaseStore revision 5, 0 key(s), 0 lease(s)>>"
        assert trio.current_time() == 0.0


async def test_a_watch_gives_each_revision_under_its_prefix_as_it_happens(
    autojump_clock: MockClock,
) -> None:
    """From revision 1: the put at 1.0, the other prefix skipped, the expiry at 4.0 (the
    lease of 3 s granted at 1.0) heard at exactly 4.0."""
    heard: list[tuple[float, tuple[Change, ...]]] = []
    async with open_memory_store() as store, trio.open_nursery() as nursery:

        async def watch() -> None:
            async for changes in store.watch("svc/", after=1):
                heard.append((trio.current_time(), changes))

        nursery.start_soon(watch)
        await trio.sleep(1.0)
        lease = await store.grant(3.0)
        await store.put("svc/a", b"x", lease=lease)
        await store.put("other/b", b"y")
        await trio.sleep(5.0)
        nursery.cancel_scope.cancel()
    assert heard == [
        (1.0, (Change(ChangeKind.PUT, "svc/a", b"x", 2),)),
        (4.0, (Change(ChangeKind.DELETE, "svc/a", b"", 4),)),
    ]


async def test_a_watch_that_fell_behind_the_history_is_told_to_read_again(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store(history=2) as store:
        for n in range(3):
            await store.put("k", bytes([n]))
        with pytest.raises(WatchCompacted, match=r"^changes after revision 1 are no longer kept$"):
            async for _ in store.watch("", after=1):
                pass  # pragma: no cover - never reached
        changes = store.watch("", after=2)
        assert [c.revision for c in await changes.__anext__()] == [3, 4]  # one batch
        await store.put("k", b"")
        assert [c.revision for c in await changes.__anext__()] == [5]
        await changes.aclose()
    error = pickle.loads(pickle.dumps(WatchCompacted(7)))
    assert (type(error), error.revision, str(error)) == (
        WatchCompacted,
        7,
        "changes after revision 7 are no longer kept",
    )


async def test_the_blocks_own_error_comes_out_as_itself(autojump_clock: MockClock) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with open_memory_store():
            raise Boom
    assert not [name for name in task_names() if "memory store" in name]


async def test_a_watch_hears_a_delete_and_range_lists_every_key_by_default(
    autojump_clock: MockClock,
) -> None:
    heard: list[tuple[float, tuple[Change, ...]]] = []
    async with open_memory_store() as store, trio.open_nursery() as nursery:
        await store.put("b", b"1")
        await store.put("a", b"2")
        assert [e.key for e in (await store.range())[0]] == ["a", "b"]

        async def watch() -> None:
            async for changes in store.watch("", after=store.revision):
                heard.append((trio.current_time(), changes))

        nursery.start_soon(watch)
        await trio.sleep(2.0)
        await store.delete("a")
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert heard == [(2.0, (Change(ChangeKind.DELETE, "a", b"", 4),))]
