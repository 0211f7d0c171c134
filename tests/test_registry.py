"""The liveness registry, watched through a real server in virtual time.

Raw peers over memory streams decide every frame and every moment, so the
registry's view (when a peer connected, when it was last heard, its round
trip, its health) can be checked to the exact virtual second.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import trio
import trio.testing
from helpers import RawPeer, client_hello, connection_pair, echo

from trio_heartbeat import (
    CloseCode,
    Config,
    Connection,
    Departure,
    Event,
    FrameType,
    HealthStatus,
    Liveness,
    LivenessRegistry,
    PongReceived,
    Role,
    Server,
    State,
    open_stream_connection,
)
from trio_heartbeat._frames import encode_close, encode_data, encode_ping, encode_pong
from trio_heartbeat._registry import DEPARTURES_KEPT
from trio_heartbeat.testing import faulty_stream_pair

CONFIG = Config(interval=1.0, timeout=3.0, handshake_timeout=2.0, close_timeout=1.0)


def attach(nursery: trio.Nursery, server: Server, address: str) -> RawPeer:
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_stream, server_end, address)
    return RawPeer(client_end)


async def next_frame_of(peer: RawPeer, frame_type: FrameType) -> bytes:
    frame = await peer.receive_frame()
    assert frame is not None
    assert frame.type is frame_type, frame
    return frame.payload


async def test_a_peer_is_listed_from_handshake_to_end_with_live_facts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    registry = server.registry
    changes: list[tuple[int, float, int]] = []

    async def watch() -> None:
        while True:
            await registry.wait_changed()
            changes.append((registry.version, trio.current_time(), len(registry)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(0.5)
        alpha = attach(nursery, server, "memory:alpha")
        await alpha.handshake(instance_id="alpha")
        await registry.wait_until(lambda r: "alpha" in r)
        info = registry.get("alpha")
        assert info is not None
        assert (info.peer_id, info.address, info.state) == ("alpha", "memory:alpha", State.OPEN)
        assert (info.connected_since, info.last_seen) == (0.5, 0.5)
        assert (info.rtt, info.health) == (None, HealthStatus.SERVING)
        # Our HELLO in; the server's HELLO and its verdict PING on ours out (the
        # verdict is left unanswered here).
        assert (info.frames_in, info.frames_out) == (1, 2)
        await next_frame_of(alpha, FrameType.PING)

        # Last seen moves with every frame, without a version bump.
        await trio.sleep(0.25)
        await alpha.send(encode_data(b"x"))
        assert await next_frame_of(alpha, FrameType.DATA) == b"x"
        info = registry.get("alpha")
        assert info is not None
        assert info.last_seen == 0.75
        assert (info.frames_in, info.bytes_in) == (2, alpha_hello_size() + 7)
        assert registry.version == 1

        # Round trip: the server pings after one idle interval; we answer late.
        ping = await next_frame_of(alpha, FrameType.PING)
        assert trio.current_time() == 1.75
        await trio.sleep(0.25)
        await alpha.send(encode_pong(ping[:8], HealthStatus.SERVING))
        await trio.testing.wait_all_tasks_blocked()  # the server has read it
        info = registry.get("alpha")
        assert info is not None
        assert (info.rtt, info.last_seen) == (0.25, 2.0)

        # A health change bumps the version and wakes waiters at once.
        await trio.sleep(0.5)
        await alpha.send(encode_ping(bytes(8), HealthStatus.DEGRADED))
        await registry.wait_changed()
        assert trio.current_time() == 2.5
        await trio.testing.wait_all_tasks_blocked()  # let the watcher record it too
        info = registry.get("alpha")
        assert info is not None
        assert info.health is HealthStatus.DEGRADED
        assert changes[-1] == (2, 2.5, 1)

        beta = attach(nursery, server, "memory:beta")
        await beta.handshake(instance_id="beta")
        await registry.wait_until(lambda r: len(r) == 2)
        assert [peer.peer_id for peer in registry] == ["alpha", "beta"]
        assert [peer.peer_id for peer in registry.snapshot()] == ["alpha", "beta"]
        assert "beta" in registry
        assert "gamma" not in registry
        assert registry.get("gamma") is None
        assert registry.connection("gamma") is None
        conn = registry.connection("beta")
        assert isinstance(conn, Connection)
        assert registry.connections()[1] is conn

        await alpha.send(encode_close(CloseCode.NORMAL))
        await beta.send(encode_close(CloseCode.NORMAL))
        await registry.wait_until(lambda r: len(r) == 0)
        assert trio.current_time() == 2.5
        assert registry.get("alpha") is None
        assert registry.snapshot() == []
        nursery.cancel_scope.cancel()
    assert [version for version, _, _ in changes] == [1, 2, 3, 4, 5]
    assert [(at, size) for _, at, size in changes] == [
        (0.5, 1),  # alpha joined
        (2.5, 1),  # alpha is DEGRADED
        (2.5, 2),  # beta joined
        (2.5, 1),
        (2.5, 0),
    ]


def alpha_hello_size() -> int:
    return len(client_hello(instance_id="alpha"))


async def test_an_idle_peer_has_a_round_trip_right_after_the_handshake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The client leads an idle connection's heartbeat, so the server never needs
    to PING it to know it is alive; the server's verdict PING on the client's HELLO
    (THB/1 §3.1) still gives the registry the peer's round trip one round trip
    after the handshake, not at the first RTT refresh minutes later."""
    measured: list[tuple[float, float | None]] = []

    def on_pong(conn: Connection, event: Event) -> None:
        if isinstance(event, PongReceived):
            info = server.registry.get("idle")
            measured.append((trio.current_time(), None if info is None else info.rtt))

    server = Server(echo, config=CONFIG, listeners=[on_pong])
    client_end, server_end, faults = faulty_stream_pair()
    # Each way: a round trip takes 1/16 s, and the client's lead of a tenth of
    # an interval (0.1 s) is more than that, so the client does lead.
    faults.set_delay(1 / 32)
    config = Config(interval=1.0, timeout=3.0, instance_id="idle")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end, "memory:idle")
        async with open_stream_connection(client_end, role=Role.CLIENT, config=config) as conn:
            opened = trio.current_time()
            await trio.sleep(10)  # idle: the client leads, every 0.9 s
            # The server's HELLO goes at 0, the client's arrives at 2/32 and the
            # verdict PING goes at once; its PONG is back at 4/32.
            assert measured == [(4 / 32, 2 / 32)]
            info = server.registry.get("idle")
            assert info is not None
            assert info.rtt == 2 / 32
            server_conn = server.registry.connection("idle")
            assert server_conn is not None
            assert server_conn.statistics().pings_sent == 1  # the verdict alone
            assert conn.statistics().pings_sent == 11  # 0.9 s after its last word, from 3/32
            assert opened == 3 / 32  # the verdict opened the client's block
        nursery.cancel_scope.cancel()


async def test_health_reported_before_listing_shows_in_the_entry_without_a_bump(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    async with trio.open_nursery() as nursery:
        peer = attach(nursery, server, "memory:early")
        await peer.read_hello()
        # HELLO and a PING with new health in one read: the health change is
        # seen before the server lists the connection.
        await peer.send(
            client_hello(instance_id="early") + encode_ping(bytes(8), HealthStatus.NOT_SERVING)
        )
        await server.registry.wait_until(lambda r: "early" in r)
        info = server.registry.get("early")
        assert info is not None
        assert info.health is HealthStatus.NOT_SERVING
        assert server.registry.version == 1
        nursery.cancel_scope.cancel()


async def test_wait_until_returns_the_moment_the_predicate_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    registry = server.registry
    await registry.wait_until(lambda r: len(r) == 0)  # already true: no wait
    assert trio.current_time() == 0

    async def join_later(nursery: trio.Nursery, delay: float, name: str) -> None:
        await trio.sleep(delay)
        peer = attach(nursery, server, f"memory:{name}")
        await peer.handshake(instance_id=name)
        await read_until_close(peer)

    async with trio.open_nursery() as nursery:
        for delay, name in [(1.0, "a"), (2.0, "b"), (3.0, "c")]:
            nursery.start_soon(join_later, nursery, delay, name)
        await registry.wait_until(lambda r: len(r) == 3)
        assert trio.current_time() == 3.0
        assert {peer.peer_id for peer in registry} == {"a", "b", "c"}
        nursery.cancel_scope.cancel()
    assert len(registry) == 0


async def read_until_close(peer: RawPeer) -> None:
    await peer.read_close()


async def test_the_registry_is_empty_after_every_kind_of_ending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(echo, config=CONFIG)
    registry = server.registry

    async def orderly(peer: RawPeer) -> None:
        await peer.send(encode_close(CloseCode.NORMAL))

    async def silent(peer: RawPeer) -> None:
        await trio.sleep_forever()  # cut off at the timeout

    async def garbage(peer: RawPeer) -> None:
        await peer.send(b"\xff" * 6)

    async def vanished(peer: RawPeer) -> None:
        await peer.aclose()

    endings = {"orderly": orderly, "silent": silent, "garbage": garbage, "vanished": vanished}
    async with trio.open_nursery() as nursery:
        peers = {name: attach(nursery, server, f"memory:{name}") for name in endings}
        for name, peer in peers.items():
            await peer.handshake(instance_id=name)
        await registry.wait_until(lambda r: len(r) == 4)
        for name, ending in endings.items():
            nursery.start_soon(ending, peers[name])
        await registry.wait_until(lambda r: len(r) == 1)
        assert [peer.peer_id for peer in registry] == ["silent"]
        await registry.wait_until(lambda r: len(r) == 0)
        assert trio.current_time() == CONFIG.timeout
        nursery.cancel_scope.cancel()
    assert server.statistics().active == 0
    assert server.statistics().closed_by_code == {
        CloseCode.NORMAL: 1,
        CloseCode.HEARTBEAT_TIMEOUT: 1,
        CloseCode.PROTOCOL_ERROR: 1,
        CloseCode.ABNORMAL_CLOSURE: 1,
    }


async def test_registry_bookkeeping_on_its_own(autojump_clock: trio.testing.MockClock) -> None:
    registry = LivenessRegistry()
    client_config = Config(instance_id="client-side")
    async with connection_pair(client_config=client_config) as pair:
        assert registry.add(pair.server) is None
        # A client-role connection is listed but never indexed by id.
        assert registry.add(pair.client) is None
        assert len(registry) == 2
        assert "client-side" in registry
        assert registry.connection("client-side") is pair.server
        registry.health_changed(pair.client)
        assert registry.version == 3
        registry.remove(pair.server)
        registry.remove(pair.server)  # a second removal changes nothing
        assert registry.version == 4
        assert "client-side" not in registry
        registry.health_changed(pair.server)  # no longer listed: no bump
        assert registry.version == 4
        assert [info.peer_id for info in registry] == [""]


async def test_ids_index_server_connections_only_and_a_newer_one_takes_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The id rule, on the registry alone: an empty id indexes nothing and replaces
    nothing; a second server connection under a non-empty id takes it over and
    unlists the first; unlisting a client-role connection that happens to carry
    the same id leaves the server connection's entry alone."""
    registry = LivenessRegistry()
    named = Config(instance_id="x")
    async with (
        connection_pair() as anonymous_one,
        connection_pair() as anonymous_two,
        connection_pair(client_config=named, server_config=named) as older,
        connection_pair(client_config=named) as newer,
    ):
        assert registry.add(anonymous_one.server) is None
        assert registry.add(anonymous_two.server) is None
        assert "" not in registry
        assert len(registry) == 2
        assert registry.add(older.server) is None
        assert registry.add(older.client) is None  # its peer, the server, is "x" too
        assert registry.add(newer.server) is older.server
        assert registry.connections() == [
            anonymous_one.server,
            anonymous_two.server,
            older.client,
            newer.server,
        ]
        assert registry.connection("x") is newer.server
        registry.remove(older.client)
        assert registry.connection("x") is newer.server
        (info,) = [peer for peer in registry if peer.peer_id == "x"]
        stats = newer.server.statistics()
        assert (info.bytes_in, info.bytes_out) == (stats.bytes_in, stats.bytes_out)
        assert (info.frames_in, info.frames_out) == (stats.frames_in, stats.frames_out)
        assert info.bytes_out > 0


async def test_a_silent_peer_is_suspect_then_heard_then_gone_with_the_reason_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The registry shows a peer's suspicion as it changes (each change wakes the waiters), and
    keeps the departures: when each peer left, and why, in the words of the verdict."""
    server = Server(echo, config=CONFIG)
    registry = server.registry
    changes: list[tuple[float, Liveness | None]] = []

    async def watch() -> None:
        while True:
            await registry.wait_changed()
            info = registry.get("alpha")
            changes.append((trio.current_time(), None if info is None else info.liveness))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        alpha = attach(nursery, server, "memory:alpha")
        await alpha.handshake(instance_id="alpha")  # heard at 0.0, then silent
        await trio.sleep_until(1.0)
        info = registry.get("alpha")
        assert info is not None
        assert info.liveness is Liveness.ALIVE
        assert info.suspicion == pytest.approx(math.log10(1.5))
        await trio.sleep_until(1.75)
        info = registry.get("alpha")
        assert info is not None
        assert info.liveness is Liveness.SUSPECT
        await alpha.send(encode_ping(bytes(8), HealthStatus.SERVING))  # heard at 1.75
        await registry.wait_until(lambda r: "alpha" not in r)
        assert trio.current_time() == 4.75
        nursery.cancel_scope.cancel()
    assert changes == [
        (0.0, Liveness.ALIVE),  # joined
        (1.5, Liveness.SUSPECT),
        (1.75, Liveness.ALIVE),
        (3.25, Liveness.SUSPECT),
        (4.75, None),  # convicted
    ]
    [departure] = registry.departures
    assert departure == Departure(
        "alpha", "memory:alpha", 4.75, 1011, "heartbeat timeout: peer silent", False
    )


def test_the_departures_keep_the_last_ones_only() -> None:
    registry = LivenessRegistry()
    assert registry.departures.maxlen == DEPARTURES_KEPT == 256


async def test_as_json_gives_every_peer_in_json_ready_values(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Names for statuses, None for what is not known yet, wall-clock seconds for times."""
    server = Server(echo, config=CONFIG)
    async with trio.open_nursery() as nursery:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, server_stream)
        async with open_stream_connection(
            client_stream, role=Role.CLIENT, config=Config(instance_id="node-7")
        ):
            await trio.sleep(0.5)
            before = time.time()
            (peer,) = server.registry.as_json()
            after = time.time()
        nursery.cancel_scope.cancel()
    assert json.loads(json.dumps(peer)) == peer
    assert (peer["id"], peer["health"], peer["state"], peer["liveness"]) == (
        "node-7",
        "SERVING",
        "OPEN",
        "ALIVE",
    )
    since = peer["connected_since"]
    assert isinstance(since, float)
    assert before - 0.5 - 1 <= since <= after - 0.5 + 1
    assert peer["rtt"] is None or isinstance(peer["rtt"], float)


async def test_json_entries_are_built_only_when_read_and_as_json_stops_at_its_limit(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """len() and a limit cost no entry; each entry read costs one statistics() call.

    The sequence holds the peers open when it was made: one that leaves
    afterwards is still in it, with its entry built as it is then.
    """
    server = Server(echo, config=CONFIG)
    registry = server.registry
    calls = 0
    real_statistics = Connection.statistics

    def counted(conn: Connection) -> object:
        nonlocal calls
        calls += 1
        return real_statistics(conn)

    async with trio.open_nursery() as nursery:
        peers = [attach(nursery, server, f"memory:{name}") for name in ("alpha", "beta", "gamma")]
        for peer, name in zip(peers, ("alpha", "beta", "gamma"), strict=True):
            await peer.handshake(instance_id=name)
        await trio.testing.wait_all_tasks_blocked()
        monkeypatch.setattr(Connection, "statistics", counted)
        entries = registry.json_entries()
        assert (len(entries), calls) == (3, 0)
        assert [entry["id"] for entry in registry.as_json(limit=2)] == ["alpha", "beta"]
        assert calls == 2
        assert entries[1]["id"] == "beta"
        assert [entry["id"] for entry in entries[1:]] == ["beta", "gamma"]
        assert calls == 5
        everyone = registry.as_json()
        assert [entry["address"] for entry in everyone] == [
            "memory:alpha",
            "memory:beta",
            "memory:gamma",
        ]
        # the same values, in the same order; the wall-clock times are read again for each
        # build, so two builds a moment apart may differ in the last (millisecond) digit
        clocks = ("connected_since", "last_seen")
        assert [{k: v for k, v in e.items() if k not in clocks} for e in entries] == [
            {k: v for k, v in e.items() if k not in clocks} for e in everyone
        ]
        for built, again in zip(entries, everyone, strict=True):
            for clock in clocks:
                assert abs(built[clock] - again[clock]) < 1.0  # type: ignore[operator]
        await peers[0].stream.aclose()  # alpha's transport ends
        await trio.testing.wait_all_tasks_blocked()
        assert len(registry) == 2
        assert [entry["id"] for entry in entries] == ["alpha", "beta", "gamma"]
        assert entries[0]["state"] == "ERROR"  # the transport ended without a CLOSE
        nursery.cancel_scope.cancel()
