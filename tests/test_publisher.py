"""Publishing a server's peers (``_publisher.py``): the liveness registry, discoverable.

In virtual time, on the test kit's memory network, exact times. What it
pins: each connected peer with a usable id is published as an instance of
the service (its address, the health it reports, its liveness as metadata),
at once or ``min_interval`` after a burst began; a peer that leaves is
deleted at once, as is one whose connection dies; a
change of health is written again; ids that cannot be keys and peers without
an id are left out; the lease is renewed every TTL/3; a lease found gone is
granted again and everything written anew; a failing store is retried on the
backoff; leaving revokes every record at once; and a publisher that hangs
leaves the records to vanish with its lease.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from registry_helpers import FaultyStore
from trio.testing import MockClock

from trio_heartbeat import (
    BrokenConnection,
    Config,
    Connection,
    HealthStatus,
    Instance,
    open_discovery,
    open_memory_store,
    open_stream_connection,
)
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
    autojump_clock: MockClock,
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
        ({"min_interval": -1.0}, ValueError, r"^min_interval must be 0 or more"),
        ({"revoke_timeout": 0.0}, ValueError, r"^revoke_timeout must be positive"),
        ({"backoff": iter([1.0])}, TypeError, r"^backoff must be re-iterable"),
        ({"service": "a b"}, ValueError, r"^service must be printable"),
    ],
)
async def test_bad_arguments_are_refused(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    arguments: dict[str, object] = {"service": "workers"}
    arguments.update(kwargs)
    async with open_memory_store() as memory, open_memory_network() as network:
        host = network.listen("hub:1", idle)
        assert host.server is not None
        with pytest.raises(error, match=message):
            await publish_peers(host.server.registry, memory, **arguments)  # type: ignore[arg-type]


async def test_a_lease_lost_in_an_outage_is_granted_again_and_all_rewritten(
    autojump_clock: MockClock,
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


class SlowPuts(FaultyStore):
    """Each put takes a second (a store far away)."""

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        await trio.sleep(1.0)
        return await super().put(key, value, lease=lease)


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
            await nursery.start(publish, host.server.registry, SlowPuts(memory), "workers")
            assert trio.current_time() == 1.0
            assert sorted(await published(memory)) == ["w1"]
            await trio.sleep(1.5)  # w2 is written at once (by 2.0), not at the next change
            assert sorted(await published(memory)) == ["w1", "w2"]
            nursery.cancel_scope.cancel()
