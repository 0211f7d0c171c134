"""The service registry's behaviour, the same suite against both stores: embedded and a real etcd.

Each test runs twice, in real time: once over the embedded store
(``open_memory_store``) and once over a real etcd on loopback (the ``etcd``
fixture; under CI a missing etcd fails these, never skips them). What they
pin, whichever the store: a registered instance is discovered and stays
while renewed, for several TTLs; NOT_SERVING withdraws it at once and
SERVING brings it back; a registrant that hangs (its calls never reach the
store) disappears within TTL + one renewal interval; discovery reports the
changes in the order they were made; and a reconnecting client that takes
its endpoints from discovery fails over from a killed instance to a live one,
and never dials the killed one once the registry has dropped it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from registry_helpers import FaultyStore

from trio_heartbeat import (
    AttemptStarted,
    Connected,
    DiscoveryNotice,
    HealthStatus,
    Instance,
    InstanceAdded,
    InstanceChanged,
    InstanceRemoved,
    KeyValueStore,
    SupervisorEvent,
    open_discovery,
    open_health_monitor,
    open_memory_store,
    open_reconnecting_client,
    open_registration,
    serve_tcp,
)

#: The lease of every registration here: etcd's minimum is 1 s in the fixture's fast mode.
TTL = 2.0
#: How much later than the rule etcd may act: it checks leases every 500 ms.
SLACK = 1.0

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["memory", "etcd"])
def open_store(request: pytest.FixtureRequest) -> Callable[[], Any]:
    """A function that opens a fresh store of the backend under test."""
    if request.param == "memory":
        return open_memory_store
    server = request.getfixturevalue("etcd")
    from trio_heartbeat.etcd import open_etcd_store

    return lambda: open_etcd_store([server.endpoint])


def instance(name: str, port: int = 7400) -> Instance:
    return Instance("echo", name, f"127.0.0.1:{port}")


@asynccontextmanager
async def following(store: KeyValueStore) -> AsyncIterator[list[tuple[float, DiscoveryNotice]]]:
    """Discovery of ``echo`` while the block runs: its notices, stamped with the time."""
    seen: list[tuple[float, DiscoveryNotice]] = []
    async with (
        open_discovery(store, "echo", check_interval=1.0) as discovery,
        trio.open_nursery() as nursery,
    ):

        async def collect() -> None:
            async for notice in discovery.changes(initial=True):
                seen.append((trio.current_time(), notice))

        nursery.start_soon(collect)
        yield seen
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool], within: float = 10.0) -> float:
    """Poll ``condition`` every 10 ms; the time it held, or fail after ``within`` seconds."""
    with trio.move_on_after(within):
        while not condition():  # noqa: ASYNC110 - what it waits for is in another store
            await trio.sleep(0.01)
        return trio.current_time()
    pytest.fail(f"not within {within} s")


def kinds(seen: list[tuple[float, DiscoveryNotice]]) -> list[tuple[str, str]]:
    return [
        (type(notice).__name__, notice.instance.instance_id)
        for _, notice in seen
        if isinstance(notice, InstanceAdded | InstanceChanged | InstanceRemoved)
    ]


async def test_a_registered_instance_is_discovered_and_stays_while_renewed(
    open_store: Callable[[], Any],
) -> None:
    async with open_store() as store, following(store) as seen:
        start = trio.current_time()
        async with open_registration(store, instance("a"), ttl=TTL):
            await until(lambda: kinds(seen) == [("InstanceAdded", "a")], within=2.0)
            assert seen[0][0] - start < 1.0
            await trio.sleep(3 * TTL)  # renewed at TTL/3: never gone meanwhile
            assert kinds(seen) == [("InstanceAdded", "a")]
        left = trio.current_time()
        gone = await until(lambda: len(kinds(seen)) == 2, within=2.0)
        assert kinds(seen)[1] == ("InstanceRemoved", "a")
        assert gone - left < 1.0  # revoked at shutdown, not left to run out


async def test_not_serving_withdraws_at_once_and_serving_registers_again(
    open_store: Callable[[], Any],
) -> None:
    async with (
        open_store() as store,
        open_health_monitor() as health,
        following(store) as seen,
        open_registration(store, instance("a"), ttl=TTL, health=health),
    ):
        await until(lambda: len(kinds(seen)) == 1, within=2.0)
        health.set_status(HealthStatus.DEGRADED)
        await until(lambda: len(kinds(seen)) == 2, within=2.0)
        changed = seen[-1][1]
        assert isinstance(changed, InstanceChanged)
        assert changed.instance.health is HealthStatus.DEGRADED
        withdrawn_at = trio.current_time()
        health.set_status(HealthStatus.NOT_SERVING)
        gone = await until(lambda: len(kinds(seen)) == 3, within=2.0)
        assert kinds(seen)[2] == ("InstanceRemoved", "a")
        assert gone - withdrawn_at < 0.5  # at once, not at the TTL
        await trio.sleep(TTL)  # nothing comes back while NOT_SERVING
        assert len(kinds(seen)) == 3
        health.set_status(HealthStatus.SERVING)
        await until(lambda: len(kinds(seen)) == 4, within=2.0)
        assert kinds(seen)[3] == ("InstanceAdded", "a")


async def test_a_hung_registrant_disappears_within_the_ttl_and_a_renewal(
    open_store: Callable[[], Any],
) -> None:
    async with open_store() as store, following(store) as seen:
        faulty = FaultyStore(store)
        async with open_registration(faulty, instance("a"), ttl=TTL):
            await until(lambda: len(kinds(seen)) == 1, within=2.0)
            await trio.sleep(0.3)
            frozen_at = trio.current_time()
            faulty.freeze()  # the process hangs: nothing it sends arrives
            gone = await until(lambda: len(kinds(seen)) == 2, within=TTL * 3)
            assert kinds(seen)[1] == ("InstanceRemoved", "a")
            assert gone - frozen_at <= TTL + TTL / 3 + SLACK
            faulty.thaw()  # back: its lease is gone, so it registers anew
            await until(lambda: len(kinds(seen)) == 3, within=TTL * 2)
            assert kinds(seen)[2] == ("InstanceAdded", "a")


async def test_the_watch_reports_changes_in_the_order_they_were_made(
    open_store: Callable[[], Any],
) -> None:
    async with open_store() as store, following(store) as seen:
        b_lease = await store.grant(30.0)
        steps: list[tuple[str, str]] = []
        for name, port in (("a", 7400), ("b", 7401), ("c", 7402)):
            await store.put(instance(name, port).key, instance(name, port).encode(), lease=b_lease)
            steps.append(("InstanceAdded", name))
        degraded = Instance("echo", "a", "127.0.0.1:7400", HealthStatus.DEGRADED)
        await store.put(degraded.key, degraded.encode(), lease=b_lease)
        steps.append(("InstanceChanged", "a"))
        await store.delete(instance("b").key)
        steps.append(("InstanceRemoved", "b"))
        await store.revoke(b_lease)  # a and c, in one revision, in key order
        steps += [("InstanceRemoved", "a"), ("InstanceRemoved", "c")]
        await until(lambda: len(kinds(seen)) == len(steps), within=3.0)
        assert kinds(seen) == steps
        revisions = [n.revision for _, n in seen if not isinstance(n, str)]  # type: ignore[union-attr]
        assert revisions == sorted(revisions)


async def echo_server(
    port_box: list[int], *, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    async def echo(conn: Any) -> None:
        async for message in conn:
            await conn.send(message)

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_tcp, echo, 0)
            port_box.append(server.port)
            task_status.started(scope)
            await trio.sleep_forever()


async def test_a_reconnecting_client_fails_over_to_a_live_instance(
    open_store: Callable[[], Any],
) -> None:
    events: list[tuple[float, SupervisorEvent]] = []
    async with open_store() as store, trio.open_nursery() as nursery:
        ports: list[int] = []
        servers = [await nursery.start(echo_server, ports) for _ in range(2)]
        a, b = (f"127.0.0.1:{port}" for port in ports)
        doomed = FaultyStore(store)  # a's registrant, which dies with it
        async with (
            open_registration(doomed, instance("a", ports[0]), ttl=TTL),
            open_registration(store, instance("b", ports[1]), ttl=TTL),
            open_discovery(store, "echo", check_interval=1.0) as discovery,
        ):
            await discovery.wait_for(lambda live: len(live) == 2)
            async with open_reconnecting_client(
                discovery.endpoints(start=0),  # a first: ids in order
                backoff=[0.1] * 100,
                connect_timeout=2.0,
                listeners=[lambda event: events.append((trio.current_time(), event))],
            ) as client:
                await client.send(b"hello")
                assert await client.receive() == b"hello"
                assert [e.endpoint for _, e in events if isinstance(e, Connected)] == [a]
                doomed.freeze()  # a is killed: its registrant never renews or revokes
                servers[0].cancel()
                await client.send(b"again")
                assert await client.receive() == b"again"
                assert [e.endpoint for _, e in events if isinstance(e, Connected)] == [a, b]
                dropped_at = await until(lambda: "a" not in discovery.instances, within=6.0)
                await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    dials = [(t, e.endpoint) for t, e in events if isinstance(e, AttemptStarted)]
    assert all(t < dropped_at for t, endpoint in dials if endpoint == a)


# -- etcd itself failing ----------------------------------------------------------------


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
async def test_etcd_stopped_and_back_instances_register_again_and_discovery_catches_up(
    etcd: Any, fault: str
) -> None:
    """etcd frozen (SIGSTOP) or killed (SIGKILL) for longer than the TTL, then back: every
    registration reports the outage and registers again, discovery says it is stale, keeps
    its last set and catches up, and nothing raises meanwhile."""
    from trio_heartbeat import RegistrationState
    from trio_heartbeat.etcd import open_etcd_store

    async with (
        open_etcd_store([etcd.endpoint], timeout=0.5) as store,
        open_registration(store, instance("a", 7400), ttl=TTL) as a,
        open_registration(store, instance("b", 7401), ttl=TTL) as b,
        open_discovery(store, "echo", check_interval=0.5) as discovery,
    ):
        await discovery.wait_for(lambda live: set(live) == {"a", "b"})
        if fault == "SIGSTOP":
            etcd.freeze()
        else:
            etcd.kill()
        await until(lambda: discovery.stale, within=5.0)
        await until(lambda: a.outage is not None and b.outage is not None, within=5.0)
        assert set(discovery.instances) == {"a", "b"}  # the last set known, said to be stale
        await trio.sleep(TTL * 2)  # longer than the leases
        assert a.state is RegistrationState.OUTAGE
        if fault == "SIGSTOP":
            etcd.thaw()
        else:
            await trio.to_thread.run_sync(etcd.restart)
        await until(lambda: a.outage is None and b.outage is None, within=15.0)
        await until(lambda: not discovery.stale, within=15.0)
        await trio.sleep(TTL * 2)  # and they stay: renewed under whatever lease they hold now
        assert set(discovery.instances) == {"a", "b"}
        assert {a.state, b.state} == {RegistrationState.REGISTERED}
        entries, _ = await store.range("trio-heartbeat/services/echo/")
        assert [entry.key.rsplit("/", 1)[1] for entry in entries] == ["a", "b"]


async def test_etcd_back_with_a_fresh_data_dir_is_followed_from_its_new_history(
    etcd: Any,
) -> None:
    """etcd restored or started afresh: revisions begin at 1 again. Discovery, which had
    read at a later revision, notices the revision go back and reads the new history."""
    import shutil

    from trio_heartbeat.etcd import open_etcd_store

    async with open_etcd_store([etcd.endpoint], timeout=0.5) as store:
        for n in range(100):  # a long history: the revision passes 100
            await store.put(f"elsewhere/{n}", b"x")
        async with (
            open_registration(store, instance("a", 7400), ttl=TTL) as a,
            open_discovery(store, "echo", check_interval=0.5) as discovery,
        ):
            await discovery.wait_for(lambda live: set(live) == {"a"})
            old_revision = discovery.revision
            assert old_revision > 100
            etcd.kill()
            shutil.rmtree(etcd.data_dir)
            await trio.to_thread.run_sync(etcd.start)
            async with open_registration(store, instance("b", 7401), ttl=TTL):
                await until(lambda: set(discovery.instances) == {"a", "b"}, within=15.0)
                assert discovery.revision < old_revision
                assert a.registrations == 2  # its lease was gone with the data: granted anew
