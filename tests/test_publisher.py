"""Publishing a server's peers (``_publisher.py``): the liveness registry, discoverable.

In virtual time, on the test kit's memory network, exact times. What it
pins: each connected peer with a usable id is published as an instance of
the service (its address, the health it reports, its liveness as metadata),
at once or ``min_interval`` after a burst began; a peer that leaves is
deleted at once, as is one whose connection dies; a
change of health is written again; ids that cannot be keys and peers without
an id are left out; the lease is renewed every TTL/3; a lease found gone is
granted again and everything written anew, while a lease that outlived an
outage is kept; a failing store is retried on the backoff (by default full
jitter from 0.1 s doubling to TTL/3, then every TTL/3 once a given backoff runs
out); leaving revokes every record at once, a revoke that hangs is abandoned
after ``revoke_timeout``; a publisher that hangs leaves the records to vanish
with its lease; a prefix of its own keys every record under it; bad arguments
are refused at the call; and its warnings are pinned word for word.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from registry_helpers import FaultyStore, assert_full_jitter
from trio.testing import MockClock

from trio_heartbeat import (
    BrokenConnection,
    Config,
    Connection,
    HealthStatus,
    Instance,
    LivenessRegistry,
    open_discovery,
    open_memory_store,
    open_stream_connection,
)
from trio_heartbeat._errors import StoreUnavailable
from trio_heartbeat._memory_store import MemoryStore
from trio_heartbeat._publisher import peer_records, publish_peers
from trio_heartbeat.testing import MemoryNetwork, open_memory_network


async def idle(conn: Connection) -> None:
    async for _ in conn:
        pass


@asynccontextmanager
async def peer(
    network: MemoryNetwork, name: str, *, health: HealthStatus = HealthStatus.SERVING
) -> AsyncIterator[Connection]:
    """A client connected to ``hub:1`` as ``name``."""
    stream = await network.connect("hub", 1)
    config = Config(instance_id=name, status=health)
    async with open_stream_connection(stream, config=config) as conn:
        yield conn


async def published(store: MemoryStore) -> dict[str, Instance]:
    entries, _ = await store.range("trio-heartbeat/services/workers/")
    return {
        entry.key.rsplit("/", 1)[1]: Instance.decode(
            "workers", entry.key.rsplit("/", 1)[1], entry.value
        )
        for entry in entries
    }


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The registry's warnings so far."""
    return [
        line.getMessage()
        for line in caplog.records
        if line.name == "trio_heartbeat.registry" and line.levelno == logging.WARNING
    ]


DOWN = "the store is down (test)"


async def test_peers_are_published_and_withdrawn_as_they_come_and_go(
    autojump_clock: MockClock,
) -> None:
    async with (
        open_memory_store() as memory,
        open_memory_network() as network,
        trio.open_nursery() as nursery,
    ):
        store = FaultyStore(memory)
        host = network.listen("hub:1", idle)
        assert host.server is not None
        await nursery.start(publish_peers, host.server.registry, store, "workers")
        assert await published(memory) == {}
        async with peer(network, "w1") as w1, peer(network, "w2", health=HealthStatus.DEGRADED):
            await trio.sleep(0.25)
            seen = await published(memory)
            assert sorted(seen) == ["w1", "w2"]
            assert seen["w1"].health is HealthStatus.SERVING
            assert seen["w2"].health is HealthStatus.DEGRADED
            assert seen["w1"].metadata == {"liveness": "ALIVE"}
            assert seen["w1"].address.startswith("memory:")
            assert store.times("put") == [0.1, 0.1]  # one burst, after min_interval
            w1.set_health(HealthStatus.NOT_SERVING)
            await trio.sleep(0.25)
            assert (await published(memory))["w1"].health is HealthStatus.NOT_SERVING
        await trio.sleep(0.25)
        assert await published(memory) == {}
        assert len(store.times("delete")) == 2
        assert store.times("keepalive") == []  # not yet: the renewal is at ttl / 3
        await trio.sleep(10.0)
        assert store.times("keepalive") == pytest.approx([10 / 3, 20 / 3, 10.0])
        nursery.cancel_scope.cancel()
    assert store.times("revoke") == [10.75]


async def test_a_peer_whose_connection_dies_is_deleted_at_once(autojump_clock: MockClock) -> None:
    async with (
        open_memory_store() as memory,
        open_memory_network() as network,
        trio.open_nursery() as nursery,
    ):
        host = network.listen("hub:1", idle)
        assert host.server is not None
        publish = partial(publish_peers, min_interval=0.0)
        await nursery.start(publish, host.server.registry, memory, "workers")

        async def crash() -> None:
            async with peer(network, "w1"):
                await trio.sleep(1.0)
                assert sorted(await published(memory)) == ["w1"]
                host.kill()  # a crash: no CLOSE, the server's side is cancelled
                await trio.testing.wait_all_tasks_blocked()
                assert await published(memory) == {}
                assert trio.current_time() == 1.0

        with pytest.raises(BrokenConnection):  # the client's side of the crash
            await crash()
        nursery.cancel_scope.cancel()


async def test_leaving_withdraws_every_record_at_once(autojump_clock: MockClock) -> None:
    async with open_memory_store() as memory, open_memory_network() as network:
        host = network.listen("hub:1", idle)
        assert host.server is not None
        async with peer(network, "w1"), peer(network, "w2"):
            async with trio.open_nursery() as nursery:
                await nursery.start(publish_peers, host.server.registry, memory, "workers")
                await trio.sleep(1.0)
                assert sorted(await published(memory)) == ["w1", "w2"]
                nursery.cancel_scope.cancel()
            assert await published(memory) == {}
            assert trio.current_time() == 1.0


async def test_a_publisher_that_hangs_leaves_its_records_to_run_out(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        open_memory_store() as memory,
        open_memory_network() as network,
        open_discovery(memory, "workers") as discovery,
        trio.open_nursery() as nursery,
    ):
        store = FaultyStore(memory)
        host = network.listen("hub:1", idle)
        assert host.server is not None
        publish = partial(publish_peers, ttl=3.0, min_interval=0.0)
        await nursery.start(publish, host.server.registry, store, "workers")
        async with peer(network, "w1"):
            await discovery.wait_for()
            assert trio.current_time() == 0.0
            await trio.sleep(2.5)
            store.freeze()  # the hub hangs: its renewal at 3.0 never reaches the store
            await discovery.wait_for(lambda live: not live)
            assert trio.current_time() == 5.0  # renewed at 2.0, gone at 2.0 + 3.0
            store.thaw()  # back: the lease is gone, so it is granted again and all rewritten
            await discovery.wait_for()
            assert store.times("grant") == [0.0, 5.0]
            # renewed at 1.0 and 2.0; the renewal held up since 3.0 finds the lease
            # gone, and the next step is a new grant, not another question
            assert [(t, op) for t, op, _ in store.calls if op != "put"] == [
                (0.0, "grant"),
                (1.0, "keepalive"),
                (2.0, "keepalive"),
                (5.0, "keepalive"),
                (5.0, "grant"),
            ]
            assert warnings(caplog) == ["workers: the peers' lease ran out; publishing them again"]
            nursery.cancel_scope.cancel()


async def test_a_failing_store_is_retried_on_the_backoff(autojump_clock: MockClock) -> None:
    async with (
        open_memory_store() as memory,
        open_memory_network() as network,
        trio.open_nursery() as nursery,
    ):
        store = FaultyStore(memory)
        store.down = True
        host = network.listen("hub:1", idle)
        assert host.server is not None
        publish = partial(publish_peers, backoff=[0.5, 1.0])
        await nursery.start(publish, host.server.registry, store, "workers")
        async with peer(network, "w1"):
            await trio.sleep(1.25)
            store.down = False
            await trio.sleep(1.0)  # retried at 0.5, 1.5: written then
            assert sorted(await published(memory)) == ["w1"]
            assert store.times("grant") == [1.5]
            assert store.times("put") == [1.5]
        nursery.cancel_scope.cancel()


async def test_peers_without_a_usable_id_are_left_out(autojump_clock: MockClock) -> None:
    async with open_memory_network() as network:
        host = network.listen("hub:1", idle)
        assert host.server is not None
        async with peer(network, ""), peer(network, "a/b"), peer(network, "ok"):
            await trio.testing.wait_all_tasks_blocked()
            records = peer_records(host.server.registry, "workers")
            assert list(records) == ["trio-heartbeat/services/workers/ok"]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ttl": 0.5}, ValueError, r"^ttl must be at least 1 s and finite, not 0.5$"),
        ({"ttl": float("inf")}, ValueError, r"^ttl must be at least 1 s and finite, not inf$"),
        ({"ttl": float("nan")}, ValueError, r"^ttl must be at least 1 s and finite, not nan$"),
        ({"min_interval": -1.0}, ValueError, r"^min_interval must be 0 or more"),
        ({"min_interval": float("inf")}, ValueError, r"^min_interval must be 0 or more"),
        ({"revoke_timeout": 0.0}, ValueError, r"^revoke_timeout must be positive"),
        ({"revoke_timeout": float("inf")}, ValueError, r"^revoke_timeout must be positive"),
        ({"backoff": iter([1.0])}, TypeError, r"^backoff must be re-iterable"),
        ({"service": "a b"}, ValueError, r"^service must be printable"),
    ],
)
async def test_bad_arguments_are_refused_at_the_call(
    autojump_clock: MockClock, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    arguments: dict[str, object] = {"service": "workers"}
    arguments.update(kwargs)
    async with open_memory_store() as memory:
        with trio.fail_after(1.0), pytest.raises(error, match=message):
            await publish_peers(LivenessRegistry(), memory, **arguments)  # type: ignore[arg-type]


async def test_a_lease_lost_in_an_outage_is_granted_again_and_all_rewritten(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory, open_memory_network() as network:
        store = FaultyStore(memory)
        host = network.listen("hub:1", idle)
        assert host.server is not None
        publish = partial(publish_peers, ttl=3.0, min_interval=0.0, backoff=[1.0])
        async with peer(network, "w1"), trio.open_nursery() as nursery:
            await nursery.start(publish, host.server.registry, store, "workers")
            await trio.testing.wait_all_tasks_blocked()
            store.down = True  # the renewal at 1.0 fails; the lease runs out at 3.0
            await trio.sleep(4.5)
            assert await published(memory) == {}
            store.down = False  # the retry at 5.0 finds the lease gone
            await trio.sleep(1.0)
            assert sorted(await published(memory)) == ["w1"]
            assert store.times("grant") == [0.0, 5.0]
            assert store.times("keepalive") == [5.0]
            store.down = True  # and leaving while the store is down: the records run out
            nursery.cancel_scope.cancel()
        assert sorted(await published(memory)) == ["w1"]
        await trio.sleep(3.0)
        assert await published(memory) == {}
        failed = f"workers: publishing peers failed ({DOWN}); retrying"
        assert warnings(caplog) == [
            *[failed] * 4,  # the renewal at 1.0, the retries at 2.0, 3.0 and 4.0
            "workers: the peers' lease ran out; publishing them again",
            f"workers: peers not withdrawn ({DOWN}); they run out",
        ]


async def test_a_peer_that_arrives_while_others_are_written_is_not_missed(
    autojump_clock: MockClock,
) -> None:
    async with open_memory_store() as memory, open_memory_network() as network:
        host = network.listen("hub:1", idle)
        assert host.server is not None
        publish = partial(publish_peers, ttl=60.0, min_interval=0.0)

        async def second_peer() -> None:
            await trio.sleep(0.5)  # while w1's put is under way
            async with peer(network, "w2"):
                await trio.sleep_forever()

        async with peer(network, "w1"), trio.open_nursery() as nursery:
            nursery.start_soon(second_peer)
            store = FaultyStore(memory)
            store.put_delay = 1.0  # a store far away
            await nursery.start(publish, host.server.registry, store, "workers")
            assert trio.current_time() == 1.0
            assert sorted(await published(memory)) == ["w1"]
            await trio.sleep(1.5)  # w2 is written at once (by 2.0), not at the next change
            assert sorted(await published(memory)) == ["w1", "w2"]
            nursery.cancel_scope.cancel()


async def test_a_lease_that_outlives_an_outage_is_kept_and_nothing_rewritten(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_memory_store() as memory, open_memory_network() as network:
        store = FaultyStore(memory)
        host = network.listen("hub:1", idle)
        assert host.server is not None
        publish = partial(publish_peers, ttl=9.0, min_interval=0.0, backoff=[0.5, 1.0])
        async with peer(network, "w1"), trio.open_nursery() as nursery:
            await nursery.start(publish, host.server.registry, store, "workers")
            await trio.sleep(2.0)
            store.down = True  # the renewal at 3.0 fails: retried at 3.5, 4.5, then every 3 s
            await trio.sleep(5.0)
            assert sorted(await published(memory)) == ["w1"]  # the lease lives until 9.0
            store.down = False
            await trio.sleep(4.0)  # back at 7.5, renewed on time at 10.5
            assert [(t, op, arg) for t, op, arg in store.calls if op != "put"] == [
                (0.0, "grant", 9.0),
                (7.5, "keepalive", 1),
                (10.5, "keepalive", 1),
            ]
            assert store.times("put") == [0.0]  # what the store holds was not written again
            nursery.cancel_scope.cancel()
    assert warnings(caplog) == [f"workers: publishing peers failed ({DOWN}); retrying"] * 3


@pytest.mark.parametrize(("revoke_timeout", "left_at"), [(None, 2.0), (0.5, 0.5)])
async def test_a_revoke_that_hangs_is_abandoned_after_revoke_timeout(
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
    revoke_timeout: float | None,
    left_at: float,
) -> None:
    async with open_memory_store() as memory, open_memory_network() as network:
        store = FaultyStore(memory)
        host = network.listen("hub:1", idle)
        assert host.server is not None
        publish = partial(publish_peers, ttl=1.0, min_interval=0.0)  # the shortest TTL
        if revoke_timeout is not None:  # else the default's
            publish = partial(publish, revoke_timeout=revoke_timeout)
        async with peer(network, "w1"):
            async with trio.open_nursery() as nursery:
                await nursery.start(publish, host.server.registry, store, "workers")
                assert sorted(await published(memory)) == ["w1"]
                store.freeze()  # the store stops answering; then the publisher is stopped
                nursery.cancel_scope.cancel()
            assert trio.current_time() == left_at
            assert warnings(caplog) == ["workers: the revoke took too long; the peers run out"]
            await trio.sleep(1.0)
            assert await published(memory) == {}  # the records ran out with the lease, at 1.0


async def test_a_prefix_of_its_own_keys_every_record_under_it(autojump_clock: MockClock) -> None:
    async with open_memory_store() as memory, open_memory_network() as network:
        host = network.listen("hub:1", idle)
        assert host.server is not None
        publish = partial(publish_peers, prefix="fleet/", min_interval=0.0)
        async with peer(network, "w1"), trio.open_nursery() as nursery:
            await nursery.start(publish, host.server.registry, memory, "workers")
            entries, _ = await memory.range("")
            assert [entry.key for entry in entries] == ["fleet/workers/w1"]
            assert list(peer_records(host.server.registry, "workers", "fleet/")) == [
                "fleet/workers/w1"
            ]
            nursery.cancel_scope.cancel()


async def test_the_default_backoff_is_full_jitter_from_a_tenth_of_a_second_to_a_third_of_the_ttl(
    autojump_clock: MockClock,
) -> None:
    # Twenty outages of 12 s each, with a TTL of 3 s.
    outages: list[list[float]] = []
    async with open_memory_store() as memory, trio.open_nursery() as nursery:
        store = FaultyStore(memory)
        publish = partial(publish_peers, ttl=3.0)
        await nursery.start(publish, LivenessRegistry(), store, "workers")
        for _ in range(20):
            store.down = True
            store.refused.clear()
            await trio.sleep(13.0)  # the renewal within 1 s fails, then 12 s of retries or more
            store.down = False
            tried = store.refused.copy()  # the failed renewal, then each retry
            outages.append([later - earlier for earlier, later in itertools.pairwise(tried)])
            await trio.sleep(1.0)  # the next retry, at most 1 s later, finds the store back
        nursery.cancel_scope.cancel()
    assert_full_jitter(outages)


async def test_a_burst_longer_than_a_renewal_is_written_whole_and_the_lease_kept(
    autojump_clock: MockClock,
) -> None:
    """Forty peers at once take 4 s to write, past the renewals at 1.0, 2.0 and 3.0: the
    renewals happen on time beside the write, and the write is never cut short (every
    peer is published, with no later change needed to finish)."""
    async with open_memory_store() as memory, open_memory_network() as network:
        store = FaultyStore(memory)
        store.put_delay = 0.1
        host = network.listen("hub:1", idle)
        assert host.server is not None
        publish = partial(publish_peers, ttl=3.0, min_interval=0.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(publish, host.server.registry, store, "workers")
            async with AsyncExitStack() as peers:
                for n in range(40):
                    await peers.enter_async_context(peer(network, f"w{n}"))
                await trio.sleep(10.0)
                assert len(await published(memory)) == 40
                assert store.times("keepalive")[:3] == [1.0, 2.0, 3.0]
                assert store.times("grant") == [0.0]  # the lease never ran out
            nursery.cancel_scope.cancel()


class AnswerLost(FaultyStore):
    """The first put is done, but its answer never comes back (StoreUnavailable)."""

    lost = False

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        revision = await super().put(key, value, lease=lease)
        if not self.lost:
            self.lost = True
            raise StoreUnavailable("the answer was lost", "test:1")
        return revision


async def test_a_put_whose_answer_was_lost_is_deleted_when_its_peer_leaves(
    autojump_clock: MockClock,
) -> None:
    """The store did the put but the publisher never heard so: the key is unsure, and a
    peer that leaves before the retry still has its record deleted (no ghost)."""
    async with open_memory_store() as memory, open_memory_network() as network:
        host = network.listen("hub:1", idle)
        assert host.server is not None
        publish = partial(publish_peers, ttl=60.0, min_interval=0.0, backoff=[1.0])
        async with trio.open_nursery() as nursery:
            await nursery.start(publish, host.server.registry, AnswerLost(memory), "workers")
            async with peer(network, "w1"):
                await trio.sleep(0.5)
                assert sorted(await published(memory)) == ["w1"]  # done, though unheard
            await trio.sleep(1.0)  # the retry, at 1.0, finds w1 gone: its key is deleted
            assert await published(memory) == {}
            nursery.cancel_scope.cancel()
