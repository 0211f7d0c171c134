"""Cancelling the server, its liveness registry and the reconnecting client, everywhere.

The sweep of ``test_cancellation.py`` (after httpcore's
``tests/test_cancellations.py``), carried from one connection to the services
built on connections: one scenario is run again and again, cancelled at a
different moment each time, either before the k-th task step of the run (an
instrument counts the steps of every task) or at each deadline of a
virtual-time sweep. Every run must end cleanly:

* every library call the cancellation reaches (``Server.handle_stream``,
  ``Server.drain``, ``open_stream_connection``, the registry's waiters,
  ``open_reconnecting_client`` and the client's own calls) raises a plain
  :class:`trio.Cancelled`, never an exception group, and the caller's scope
  absorbs it;
* no task outlives the cancelled block, and every stream is closed;
* the server counts no connection any more, and its registry is empty and
  agrees with itself at every step; waiters outside the block wake;
* each peer heard one CLOSE with the right code, if it could hear anything;
* nothing ``send`` accepted is duplicated or reordered, and a cancelled
  ``receive`` loses nothing.

The sweeps found bugs. Each one has its smallest reproduction at the end of
this file (strict xfails until issue #10 fixed them), and the sweeps now
tolerate none of them.

Only public names are used: ``trio_heartbeat`` and ``trio_heartbeat.testing``.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest
import trio
import trio.testing
from trio.testing import MockClock

import trio_heartbeat as thb
from trio_heartbeat import CloseCode, FrameType, HealthStatus
from trio_heartbeat.testing import MemoryHost, open_memory_network

SERVER_CONFIG = thb.Config(interval=1.0, timeout=3.0, handshake_timeout=5.0, close_timeout=1.0)
CLIENT_CONFIG = thb.Config(interval=1.0, timeout=3.0, close_timeout=1.0)
ENDPOINT = "server:9000"


def client_config(instance_id: str) -> thb.Config:
    return thb.Config(interval=1.0, timeout=3.0, close_timeout=1.0, instance_id=instance_id)


# -- shared pieces ---------------------------------------------------------------------------


class StepInstrument(trio.abc.Instrument):
    """Counts task steps, runs ``check`` (which must not raise) before each, and
    cancels ``scope`` (if set by then) before step ``cancel_at`` (0: never)."""

    def __init__(self, cancel_at: int = 0) -> None:
        self.scope: trio.CancelScope | None = None
        self.check: Callable[[], None] | None = None
        self.cancel_at = cancel_at
        self.steps = 0
        self.fired = False  # the run reached step cancel_at

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        if self.check is not None:
            self.check()
        if self.steps == self.cancel_at:
            self.fired = True
            if self.scope is not None:
                self.scope.cancel()


def living_tasks() -> int:
    return trio.lowlevel.current_statistics().tasks_living


def is_plain_cancelled(exc: BaseException | None) -> bool:
    return type(exc) is trio.Cancelled


class RecordingStream(trio.abc.Stream):
    """A stream around another that records what was written and how it ended."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sent = bytearray()
        self.closed = False
        self.send_interrupted = False  # a send_all was cancelled
        self.send_failed = False  # a send_all found the other end gone

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.inner.send_all(data)
        except trio.Cancelled:
            self.send_interrupted = True
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.send_failed = True
            raise
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()

    def frames(self) -> list[WireFrame]:
        """Every whole frame written so far."""
        return wire_frames(bytes(self.sent))


class WireFrame(NamedTuple):
    type: FrameType
    payload: bytes


def wire_frames(data: bytes) -> list[WireFrame]:
    """The whole frames in ``data``, read by THB/1 §2.1 alone: a 6-byte header
    (type, flags, payload length) and the payload."""
    frames = []
    while len(data) >= 6:
        frame_type, _, length = struct.unpack_from(">BBI", data)
        if len(data) < 6 + length:
            break
        frames.append(WireFrame(FrameType(frame_type), data[6 : 6 + length]))
        data = data[6 + length :]
    return frames


def close_code(frame: WireFrame) -> int:
    """A CLOSE frame's code: the payload's first two bytes (THB/1 §2.5)."""
    assert frame.type is FrameType.CLOSE
    code: int = struct.unpack_from(">H", frame.payload)[0]
    return code


async def record_escape(
    escaped: dict[str, BaseException | None], name: str, call: Awaitable[object]
) -> None:
    """Await ``call`` and note what escaped it under ``name`` (``None``: it returned)."""
    try:
        await call
    except BaseException as exc:
        escaped[name] = exc
        raise
    escaped[name] = None


async def echo(conn: thb.Connection) -> None:
    async for message in conn:
        await conn.send(message)


def collector(got: list[bytes]) -> Callable[[thb.Connection], Awaitable[None]]:
    """A handler that notes every message it receives in ``got``."""

    async def collect(conn: thb.Connection) -> None:
        async for message in conn:
            got.append(message)

    return collect


def recording_echo(got: list[bytes]) -> Callable[[thb.Connection], Awaitable[None]]:
    """An echo handler that notes every message it receives in ``got``."""

    async def handler(conn: thb.Connection) -> None:
        async for message in conn:
            got.append(message)
            await conn.send(message)

    return handler


def served_by(peer_id: str, address: str) -> Callable[[thb.LivenessRegistry], bool]:
    def predicate(registry: thb.LivenessRegistry) -> bool:
        conn = registry.connection(peer_id)
        return conn is not None and conn.remote_address == address

    return predicate


def health_of(peer_id: str, status: HealthStatus) -> Callable[[thb.LivenessRegistry], bool]:
    def predicate(registry: thb.LivenessRegistry) -> bool:
        info = registry.get(peer_id)
        return info is not None and info.health is status

    return predicate


# -- the registry agrees with itself -----------------------------------------------------------


def registry_problems(registry: thb.LivenessRegistry) -> list[str]:
    """Every way ``registry`` disagrees with itself right now.

    Listed connections and snapshots match one to one, in order, and none has
    ended; an id answers alike in ``get``, ``connection`` and ``in``, with the
    newest listed connection that carries it (a newer one takes an id over).
    """
    problems: list[str] = []
    conns = registry.connections()
    infos = registry.snapshot()
    if not len(registry) == len(conns) == len(infos):
        problems.append(f"len {len(registry)}, {len(conns)} conns, {len(infos)} infos")
    for conn, info in zip(conns, infos, strict=False):
        if info.peer_id != (conn.peer_id or "") or info.address != conn.remote_address:
            problems.append(f"snapshot {info} is not {conn.remote_address}")
        if conn.closed is not None or info.state is thb.State.CLOSED:
            problems.append(f"{conn.remote_address} listed, {info.state}")
    newest: dict[str, thb.Connection] = {}
    for conn in conns:
        if conn.peer_id:
            newest[conn.peer_id] = conn
    for peer_id in [*newest, "nobody"]:
        found = registry.connection(peer_id)
        got = registry.get(peer_id)
        present = peer_id in registry
        if not (found is not None) == (got is not None) == present:
            problems.append(f"{peer_id!r}: connection {found}, get {got}, in {present}")
        if found is not None and found not in conns:
            problems.append(f"{peer_id!r} answers with an unlisted connection")
        if got is not None and got.peer_id != peer_id:
            problems.append(f"get({peer_id!r}) is {got}")
        listed = newest.get(peer_id)
        if listed is not found:
            problems.append(f"{peer_id!r} is {found}, the newest listed {listed}")
    return problems


# -- 1. the server, cancelled at every step ------------------------------------------------------

#: The CLOSE codes each server-side connection of the scenario may end with.
EXPECTED_CLOSES: dict[str, set[int]] = {
    "alpha": {CloseCode.REPLACED, CloseCode.GOING_AWAY},  # taken over by delta
    "beta": {CloseCode.NORMAL, CloseCode.GOING_AWAY},  # leaves by itself
    "gamma": {CloseCode.GOING_AWAY},  # never says HELLO
    "delta": {CloseCode.GOING_AWAY},  # drained
    "epsilon": {CloseCode.GOING_AWAY},  # refused: the server has drained
}

#: What the cancellation reaches.
EVERYTHING = "everything"  # the server's tasks, the clients and the driver
SERVER_ONLY = "server only"  # the server's tasks and the driver; the clients live on
DRAIN_ONLY = "drain only"  # the drain() call, which is then made again


@dataclass
class ServerRun:
    """What one run of :func:`server_scenario` left behind."""

    server: thb.Server
    mode: str
    streams: dict[str, RecordingStream] = field(default_factory=dict)  # server ends
    client_streams: list[RecordingStream] = field(default_factory=list)
    escaped: dict[str, BaseException | None] = field(default_factory=dict)
    endings: dict[str, thb.ConnectionClosed] = field(default_factory=dict)  # clients'
    ended_at: dict[str, float] = field(default_factory=dict)
    hung: list[str] = field(default_factory=list)  # raw peers that never saw the end
    changes: list[int] = field(default_factory=list)
    drain_step: int = 0
    finished: bool = False
    cancelled: bool = False
    cancelled_at: float | None = None
    tasks_before: int = 0
    tasks_after: int = 0
    outside_waiter_woke: bool = False
    problems: list[str] = field(default_factory=list)


async def server_scenario(
    run: ServerRun, servers: trio.Nursery, clients: trio.Nursery, instrument: StepInstrument
) -> None:
    """Clients come, talk and go, one never says HELLO, one id is taken over, the
    server changes health, drains, and refuses a latecomer.

    The server's tasks go to ``servers``, the clients' to ``clients``.
    """
    server = run.server
    registry = server.registry
    beta_left = trio.Event()
    delta_echoed = trio.Event()

    def attach(name: str) -> RecordingStream:
        client_end, server_end = trio.testing.memory_stream_pair()
        ours, theirs = RecordingStream(server_end), RecordingStream(client_end)
        run.streams[name] = ours
        run.client_streams.append(theirs)
        servers.start_soon(
            record_escape, run.escaped, f"handle_stream {name}", server.handle_stream(ours, name)
        )
        return theirs

    async def client(name: str, instance_id: str, stream: RecordingStream) -> None:
        async def talk() -> None:
            try:
                async with thb.open_stream_connection(
                    stream, config=client_config(instance_id)
                ) as conn:
                    await conn.send(name.encode())
                    assert await conn.receive() == name.encode()
                    if name == "delta":
                        delta_echoed.set()
                    if name == "beta":
                        return  # leaves: CLOSE 1000
                    async for _ in conn:
                        pass  # until it ends
            except thb.ConnectionClosed as exc:
                run.endings[name] = exc
            else:
                assert conn.closed is not None
                run.endings[name] = conn.closed
            finally:
                run.ended_at[name] = trio.current_time()

        await record_escape(run.escaped, f"client {name}", talk())
        if name == "beta":
            beta_left.set()

    async def raw(name: str, stream: RecordingStream) -> None:
        async with stream:
            with trio.move_on_after(60) as bound:
                while await stream.receive_some():
                    pass  # never says HELLO; reads to the end
            if bound.cancelled_caught:
                run.hung.append(name)

    async def watch() -> None:
        while True:
            await registry.wait_changed()
            run.changes.append(registry.version)

    async def until_three() -> None:
        await registry.wait_until(lambda r: r.version >= 3)
        assert registry.version >= 3

    servers.start_soon(record_escape, run.escaped, "wait_changed", watch())
    servers.start_soon(record_escape, run.escaped, "wait_until", until_three())
    # Attached here, not in the clients' tasks: the servers' nursery may be gone by then.
    clients.start_soon(client, "alpha", "alpha", attach("alpha"))
    clients.start_soon(client, "beta", "beta", attach("beta"))
    clients.start_soon(raw, "gamma", attach("gamma"))
    await registry.wait_until(lambda r: "alpha" in r and "beta" in r)
    await beta_left.wait()
    await registry.wait_until(lambda r: "beta" not in r)
    server.set_health(HealthStatus.NOT_SERVING)
    clients.start_soon(client, "delta", "alpha", attach("delta"))
    await registry.wait_until(served_by("alpha", "delta"))
    await delta_echoed.wait()
    if run.mode == DRAIN_ONLY:
        run.drain_step = instrument.steps
        with trio.CancelScope() as scope:
            instrument.scope = scope
            await record_escape(run.escaped, "drain", server.drain(grace=0.5))
        if scope.cancelled_caught:
            run.cancelled = True
            await server.drain(grace=0.5)  # safe to call again: it finishes the job
    else:
        await record_escape(run.escaped, "drain", server.drain(grace=0.5))
    clients.start_soon(raw, "epsilon", attach("epsilon"))


async def run_server_once(mode: str, instrument: StepInstrument) -> ServerRun:
    run = ServerRun(thb.Server(echo, config=SERVER_CONFIG, drain_timeout=0.5), mode)
    registry = run.server.registry

    async def outside_waiter() -> None:
        await registry.wait_until(lambda r: r.version > 0 and len(r) == 0)
        run.outside_waiter_woke = True

    def check() -> None:
        run.problems.extend(registry_problems(registry))

    run.tasks_before = living_tasks()
    async with trio.open_nursery() as outside:
        outside.start_soon(outside_waiter)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            instrument.scope = None if mode == DRAIN_ONLY else scope
            instrument.check = check
            trio.lowlevel.add_instrument(instrument)
            try:
                async with trio.open_nursery() as nursery:
                    clients = outside if mode == SERVER_ONLY else nursery
                    await server_scenario(run, nursery, clients, instrument)
                    # The watchers have had their part; they would wait forever.
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.cancel_scope.cancel()
                run.finished = not scope.cancel_called
            finally:
                run.cancelled_at = trio.current_time() if scope.cancel_called else None
                trio.lowlevel.remove_instrument(instrument)
        if mode != DRAIN_ONLY:
            run.cancelled = scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        if not run.outside_waiter_woke:
            outside.cancel_scope.cancel()
    run.tasks_after = living_tasks()
    return run


def check_server_run(run: ServerRun) -> None:
    server = run.server
    for name, exc in run.escaped.items():
        assert exc is None or is_plain_cancelled(exc), (name, repr(exc))
    if run.mode == DRAIN_ONLY:
        assert run.finished
    else:
        assert run.finished != run.cancelled
    # Nothing is left: no task, no open stream, no count, no entry.
    assert run.tasks_after == run.tasks_before
    for name, stream in run.streams.items():
        assert stream.closed, name  # a cancelled refusal (epsilon's) included
    # No raw peer waited for the end in vain.
    assert run.hung == [], run.hung
    for stream in run.client_streams:
        assert stream.closed
    stats = server.statistics()
    assert (stats.active, stats.handshaking) == (0, 0), stats
    assert len(server.registry) == 0
    assert server.registry.connections() == []
    assert server.registry.snapshot() == []
    assert "alpha" not in server.registry
    assert server.registry.get("alpha") is None
    assert registry_problems(server.registry) == []
    assert run.problems == [], run.problems[:5]
    # Every change woke the watcher, in order; the waiter outside woke once all was gone.
    assert run.changes == sorted(set(run.changes))
    assert run.outside_waiter_woke == (server.registry.version > 0)
    # Each peer was told: one CLOSE, last, with the right code, if it could hear it.
    for name, stream in run.streams.items():
        frames = stream.frames()
        closes = [frame for frame in frames if frame.type is FrameType.CLOSE]
        assert len(closes) <= 1, (name, frames)
        if closes:
            assert frames[-1] is closes[0], (name, frames)
            assert close_code(closes[0]) in EXPECTED_CLOSES[name], (name, frames)
        elif frames and not (stream.send_interrupted or stream.send_failed):
            raise AssertionError(f"{name} heard no CLOSE: {frames}")
    if run.mode == EVERYTHING:
        return
    # The clients lived on: each learnt from the server how it ended, and no later
    # than the cancellation.
    for name, ending in run.endings.items():
        if run.streams[name].send_interrupted:
            continue  # the CLOSE may have been cut off: a broken stream is right
        # A server cancelled before its verdict on a client's HELLO refuses it
        # (1001 as its first frame after its HELLO): the client was never in.
        sent = [frame.type for frame in run.streams[name].frames()]
        refused = sent[:2] == [FrameType.HELLO, FrameType.CLOSE]
        expected = thb.ConnectionRejected if refused else thb.ConnectionClosed
        assert type(ending) is expected, (name, repr(ending))
        assert ending.code in EXPECTED_CLOSES[name], (name, ending)
        assert ending.by_peer == (ending.code != CloseCode.NORMAL), (name, ending)
        if run.cancelled_at is not None:
            assert run.ended_at[name] <= run.cancelled_at, (name, run.ended_at)


@pytest.mark.parametrize("mode", [EVERYTHING, SERVER_ONLY])
async def test_server_cancelled_before_every_task_step(
    autojump_clock: MockClock, mode: str
) -> None:
    step = 0
    while True:
        step += 1
        instrument = StepInstrument(step)
        run = await run_server_once(mode, instrument)
        check_server_run(run)
        if not instrument.fired:
            assert run.finished
            break
        assert run.cancelled
        assert step < 5000, "the scenario never finished"
    assert step > 100  # about 270 on trio 0.35


async def test_server_drain_cancelled_at_every_step_then_drained_again(
    autojump_clock: MockClock,
) -> None:
    """A drain cut short leaves a server that the next drain() finishes cleanly."""
    first = await run_server_once(DRAIN_ONLY, StepInstrument())
    check_server_run(first)
    assert not first.cancelled
    cancelled = 0
    step = first.drain_step
    while True:
        step += 1
        instrument = StepInstrument(step)
        run = await run_server_once(DRAIN_ONLY, instrument)
        check_server_run(run)
        cancelled += run.cancelled
        if not instrument.fired:
            break
        assert step < 5000, "the scenario never finished"
    assert cancelled > 10  # about 50 of about 80 runs land inside the drain


# -- 2. the registry's waiters, cancelled at every step while peers come and go -------------------

#: What the waiters wait for, in turn.
PREDICATES: list[tuple[str, Callable[[thb.LivenessRegistry], bool]]] = [
    ("two", lambda r: len(r) == 2),
    ("a degraded", health_of("a", HealthStatus.DEGRADED)),
    ("a taken over", served_by("a", "p3")),
    ("a not serving", health_of("a", HealthStatus.NOT_SERVING)),
    ("b gone", lambda r: "b" not in r and r.version > 0),
    ("empty", lambda r: len(r) == 0 and r.version > 0),
]
#: Registry changes in one scenario: 3 peers join, 2 change health, 2 end; the
#: third end is the replaced peer's, unlisted in the change that lists its successor.
CHANGES = 7


@dataclass
class RegistryRun:
    """What one run of :func:`registry_scenario` left behind."""

    server: thb.Server
    escaped: dict[str, BaseException | None] = field(default_factory=dict)
    wakes: list[tuple[int, int]] = field(default_factory=list)  # (version before, after)
    held: list[str] = field(default_factory=list)  # wait_until() predicates, on return
    problems: list[str] = field(default_factory=list)
    fresh_woke: bool = False
    tasks_before: int = 0
    tasks_after: int = 0


async def peer(
    server: thb.Server,
    nursery: trio.Nursery,
    name: str,
    instance_id: str,
    leave: trio.Event,
    health: HealthStatus = HealthStatus.SERVING,
) -> None:
    """A client of ``server`` that reports ``health`` and stays until ``leave``
    (or until a newer client takes its id over)."""
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_stream, server_end, name)
    async with thb.open_stream_connection(client_end, config=client_config(instance_id)) as conn:
        if health is not HealthStatus.SERVING:
            conn.set_health(health)
        async with trio.open_nursery() as race:

            async def until_asked() -> None:
                await leave.wait()
                race.cancel_scope.cancel()

            race.start_soon(until_asked)
            ending = await conn.wait_closed()
            assert ending.code == CloseCode.REPLACED, ending  # the only early end
            race.cancel_scope.cancel()


async def registry_scenario(server: thb.Server, nursery: trio.Nursery) -> None:
    """Peers join, change health, take an id over and leave (never cancelled)."""
    registry = server.registry
    p1_out, p2_out, p3_out = trio.Event(), trio.Event(), trio.Event()
    nursery.start_soon(peer, server, nursery, "p1", "a", p1_out, HealthStatus.DEGRADED)
    nursery.start_soon(peer, server, nursery, "p2", "b", p2_out)
    await registry.wait_until(health_of("a", HealthStatus.DEGRADED))
    await registry.wait_until(lambda r: len(r) == 2)
    nursery.start_soon(peer, server, nursery, "p3", "a", p3_out, HealthStatus.NOT_SERVING)
    await registry.wait_until(health_of("a", HealthStatus.NOT_SERVING))
    assert len(registry) == 2  # p1, replaced, went as p3 came
    p2_out.set()
    await registry.wait_until(lambda r: "b" not in r)
    p3_out.set()
    await registry.wait_until(lambda r: len(r) == 0)


async def waiters(run: RegistryRun, scope: trio.CancelScope) -> None:
    """Two loops on wait_changed() and a chain of wait_until(), all inside ``scope``."""
    registry = run.server.registry

    async def watch() -> None:
        while True:
            before = registry.version
            await registry.wait_changed()
            run.wakes.append((before, registry.version))

    async def chain() -> None:
        for name, predicate in PREDICATES:
            await registry.wait_until(predicate)
            assert predicate(registry), name  # it held when wait_until() returned
            run.held.append(name)

    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(record_escape, run.escaped, "wait_changed 1", watch())
            nursery.start_soon(record_escape, run.escaped, "wait_changed 2", watch())
            nursery.start_soon(record_escape, run.escaped, "wait_until", chain())


async def run_registry_once(instrument: StepInstrument) -> RegistryRun:
    run = RegistryRun(thb.Server(echo, config=SERVER_CONFIG))
    registry = run.server.registry

    def check() -> None:
        run.problems.extend(registry_problems(registry))

    async def fresh_waiter() -> None:
        await registry.wait_changed()
        run.fresh_woke = True

    run.tasks_before = living_tasks()
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        instrument.scope = scope
        instrument.check = check
        nursery.start_soon(waiters, run, scope)
        trio.lowlevel.add_instrument(instrument)
        try:
            await registry_scenario(run.server, nursery)
            scope.cancel()  # unless the instrument did: the loops would wait forever
            # Waiting still works after all those cancellations: a newcomer wakes it.
            async with trio.open_nursery() as fresh:
                fresh.start_soon(fresh_waiter)
                await trio.testing.wait_all_tasks_blocked()
                leave = trio.Event()
                fresh.start_soon(peer, run.server, nursery, "p4", "d", leave)
                await registry.wait_until(lambda r: "d" in r)
                leave.set()
            await registry.wait_until(lambda r: len(r) == 0)
        finally:
            trio.lowlevel.remove_instrument(instrument)
    run.tasks_after = living_tasks()
    return run


def check_registry_run(run: RegistryRun) -> None:
    registry = run.server.registry
    assert set(run.escaped) == {"wait_changed 1", "wait_changed 2", "wait_until"}
    for name, exc in run.escaped.items():
        assert exc is None or is_plain_cancelled(exc), (name, repr(exc))
    # Every wake followed a change; the chain saw its predicates hold, in order.
    for before, after in run.wakes:
        assert before < after <= CHANGES, run.wakes
    assert run.held == [name for name, _ in PREDICATES][: len(run.held)]
    assert (run.escaped["wait_until"] is None) == (len(run.held) == len(PREDICATES))
    # The cancellations changed nothing: every change counted, and waiters still wake.
    assert registry.version == CHANGES + 2
    assert run.fresh_woke
    assert run.problems == [], run.problems[:5]
    assert registry_problems(registry) == []
    assert len(registry) == 0
    stats = run.server.statistics()
    assert (stats.active, stats.handshaking) == (0, 0)
    assert run.tasks_after == run.tasks_before


async def test_registry_waiters_cancelled_before_every_task_step(
    autojump_clock: MockClock,
) -> None:
    held: set[int] = set()
    step = 0
    while True:
        step += 1
        instrument = StepInstrument(step)
        run = await run_registry_once(instrument)
        check_registry_run(run)
        held.add(len(run.held))
        if not instrument.fired:
            break
        assert step < 5000, "the scenario never finished"
    # The cancellation landed in each wait of the chain in turn, and after it.
    assert held == set(range(len(PREDICATES) + 1))


# -- 3. the reconnecting client, cancelled at every step and every moment -------------------------


@dataclass
class ClientRun:
    """What one run of :func:`client_scenario` left behind."""

    server: thb.Server
    host: MemoryHost
    server_got: list[bytes]
    client: thb.ReconnectingClient | None = None
    received: list[bytes] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)
    escaped: BaseException | None = None
    phase: str = "start"
    finished: bool = False
    cancelled: bool = False
    tasks_before: int = 0
    tasks_after: int = 0
    server_lag: float = 0.0


async def client_scenario(client: thb.ReconnectingClient, run: ClientRun) -> None:
    """Connect, talk, lose the server, back off, come back, talk, close."""
    host = run.host
    run.phase = "connecting"
    await client.send(b"0")
    run.sent.append(b"0")
    run.received.append(await client.receive())
    run.phase = "lost"
    host.kill()
    host.down()
    await client.wait_state(thb.SupervisorState.BACKING_OFF)
    await client.send(b"1")  # buffered while nobody listens
    run.sent.append(b"1")
    await trio.sleep(1.5)  # one refused attempt, 1.0 after the loss
    run.phase = "reconnecting"
    host.up()
    await client.wait_connected()
    run.received.append(await client.receive())
    await client.send(b"2")
    run.sent.append(b"2")
    run.received.append(await client.receive())
    run.phase = "closing"
    await client.aclose()


async def run_client_once(
    instrument: StepInstrument | None, after: float = float("inf"), *, delay: float = 0.0
) -> ClientRun:
    async with open_memory_network() as network:
        got: list[bytes] = []
        server = thb.Server(recording_echo(got), config=SERVER_CONFIG)
        run = ClientRun(server, network.listen(ENDPOINT, server), got)
        run.host.faults.set_delay(delay)
        run.tasks_before = living_tasks()
        with trio.move_on_after(after) as scope:
            if instrument is not None:
                instrument.scope = scope
                trio.lowlevel.add_instrument(instrument)
            try:
                async with thb.open_reconnecting_client(
                    [ENDPOINT],
                    connector=network.connect,
                    config=CLIENT_CONFIG,
                    backoff=thb.ConstantBackoff(1.0),
                    connect_timeout=2.0,
                ) as client:
                    run.client = client
                    await client_scenario(client, run)
                run.finished = True
            except BaseException as exc:
                run.escaped = exc
                raise
            finally:
                if instrument is not None:
                    trio.lowlevel.remove_instrument(instrument)
        run.cancelled = scope.cancelled_caught
        # The server side must see the end at once (its peer is gone), not at a timeout.
        ended_at = trio.current_time()
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(10):
            while run.host.active or server.statistics().active:  # noqa: ASYNC110
                await trio.sleep(0.001)
        run.server_lag = trio.current_time() - ended_at
        await trio.testing.wait_all_tasks_blocked()
        run.tasks_after = living_tasks()
    return run


def check_client_run(run: ClientRun, *, delay: float = 0.0) -> None:
    exc = run.escaped
    # Never a group, never ReconnectFailed, never an error of the library's.
    assert exc is None or is_plain_cancelled(exc), repr(exc)
    assert run.cancelled == (exc is not None)
    assert run.finished != run.cancelled
    client = run.client
    if client is not None:
        assert client.state is thb.SupervisorState.CLOSED
        assert client.connection is None
        assert client.error is None  # closed by us, never given up
    assert run.tasks_after == run.tasks_before
    # The server side saw every connection end, and at once.
    if delay:
        assert run.server_lag <= 2 * delay + 0.002, run.server_lag  # the last bytes' way
    else:
        assert run.server_lag == 0.0, run.server_lag
    stats = run.server.statistics()
    assert (stats.active, stats.handshaking, len(run.server.registry)) == (0, 0, 0)
    assert run.host.active == 0
    # Every connection that opened was counted as ended (so were some handshakes),
    # none by a timeout or a protocol error: by CLOSE, or by a transport gone.
    ended = sum(stats.closed_by_code.values())
    assert stats.completed_handshakes <= ended <= stats.accepted - stats.refused, stats
    assert set(stats.closed_by_code) <= {
        CloseCode.NORMAL,
        CloseCode.GOING_AWAY,
        CloseCode.ABNORMAL_CLOSURE,
    }, stats
    # Nothing reordered or duplicated, however it went.
    for seen in (run.server_got, run.received):
        assert seen == sorted(set(seen)), seen
        assert set(seen) <= {b"0", b"1", b"2"}
    assert set(run.received) <= set(run.server_got)
    if run.finished:
        assert run.server_got == run.received == run.sent == [b"0", b"1", b"2"]


async def test_reconnecting_client_cancelled_before_every_task_step(
    autojump_clock: MockClock,
) -> None:
    phases: set[str] = set()
    step = 0
    while True:
        step += 1
        instrument = StepInstrument(step)
        run = await run_client_once(instrument)
        check_client_run(run)
        if not instrument.fired:
            assert run.finished
            break
        phases.add(run.phase)
        assert step < 5000, "the scenario never finished"
    # The sweep went through every phase of the client's life.
    assert phases == {"connecting", "lost", "reconnecting", "closing"}


@pytest.mark.parametrize(
    ("start", "stop", "expected"),
    [
        # The first connection, its echo, the kill and the first backoff...
        (0.0, 0.2, {"connecting", "lost"}),
        # ...the refused attempt, the host up again, the reconnect, the last
        # echoes, the close and after.
        (0.95, 2.25, {"lost", "reconnecting", "closing", "finished"}),
    ],
)
async def test_reconnecting_client_cancelled_at_every_moment(
    autojump_clock: MockClock, start: float, stop: float, expected: set[str]
) -> None:
    """Every chunk takes 0.01 s to cross the memory network here, so a deadline
    sweep with a finer step lands on every read, write, timer and wakeup in turn."""
    phases: set[str] = set()
    runs = round((stop - start) / 0.0025)
    for n in range(runs):
        run = await run_client_once(None, start + n * 0.0025, delay=0.01)
        check_client_run(run, delay=0.01)
        phases.add("finished" if run.finished else run.phase)
    assert phases == expected


# -- 3b. one call of the reconnecting client cancelled, at every step ------------------------------


class CancelTheCall(trio.abc.Instrument):
    """Before the ``cancel_at``-th task step, cancels the client call under way."""

    def __init__(self, cancel_at: int) -> None:
        self.cancel_at = cancel_at
        self.steps = 0
        self.current: tuple[str, trio.CancelScope] | None = None
        self.cancelled: str | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        if self.steps == self.cancel_at and self.current is not None:
            self.cancelled, scope = self.current
            scope.cancel()


@dataclass
class CallsRun:
    """What one run of :func:`calls_scenario` left behind."""

    server_got: list[bytes]
    received: list[bytes] = field(default_factory=list)
    accepted: list[bytes] = field(default_factory=list)  # sends that returned
    refused: list[bytes] = field(default_factory=list)  # sends that raised Cancelled
    escaped: list[tuple[str, BaseException]] = field(default_factory=list)


async def calls_scenario(
    client: thb.ReconnectingClient, host: MemoryHost, run: CallsRun, canceller: CancelTheCall
) -> None:
    """Every waiting call of the client, each retried until it is not cancelled
    (except ``send``: a cancelled send did not send, by Trio's rules)."""

    async def call(name: str, function: Callable[[], Awaitable[object]]) -> object:
        while True:
            with trio.CancelScope() as scope:
                canceller.current = (name, scope)
                try:
                    return await function()
                except BaseException as exc:
                    run.escaped.append((name, exc))
                    raise
                finally:
                    canceller.current = None
            if name.startswith("send"):
                return None

    async def send(message: bytes) -> None:
        sent = False

        async def attempt() -> None:
            nonlocal sent
            await client.send(message)
            sent = True

        await call(f"send {message!r}", attempt)
        (run.accepted if sent else run.refused).append(message)

    async def receive_the_echoes() -> None:
        await trio.testing.wait_all_tasks_blocked()  # every echo is in
        while len(run.received) < len(run.server_got):
            message = await call("receive", client.receive)
            assert isinstance(message, bytes)
            run.received.append(message)

    async def wait_connected() -> None:
        conn = await call("wait_connected", client.wait_connected)
        assert isinstance(conn, thb.Connection)
        assert conn is client.connection
        assert conn.state is thb.State.OPEN

    async def wait_state(state: thb.SupervisorState) -> None:
        assert await call(f"wait_state {state.name}", lambda: client.wait_state(state)) is state

    await wait_connected()
    await send(b"0")
    await send(b"1")
    await receive_the_echoes()
    host.kill()
    host.down()
    await wait_state(thb.SupervisorState.BACKING_OFF)
    await send(b"2")
    await send(b"3")
    await wait_state(thb.SupervisorState.CONNECTING)  # the refused attempt at 1.0
    await wait_state(thb.SupervisorState.BACKING_OFF)
    host.up()
    await wait_connected()
    await receive_the_echoes()
    await call("aclose", client.aclose)


async def run_calls_once(cancel_at: int) -> tuple[CallsRun, CancelTheCall]:
    canceller = CancelTheCall(cancel_at)
    async with open_memory_network() as network:
        got: list[bytes] = []
        run = CallsRun(got)
        host = network.listen(ENDPOINT, recording_echo(got), config=SERVER_CONFIG)
        trio.lowlevel.add_instrument(canceller)
        try:
            async with thb.open_reconnecting_client(
                [ENDPOINT],
                connector=network.connect,
                config=CLIENT_CONFIG,
                backoff=thb.ConstantBackoff(1.0),
            ) as client:
                await calls_scenario(client, host, run, canceller)
        finally:
            trio.lowlevel.remove_instrument(canceller)
        assert client.state is thb.SupervisorState.CLOSED
        assert client.error is None
    return run, canceller


def check_calls_run(run: CallsRun) -> None:
    for name, exc in run.escaped:
        assert is_plain_cancelled(exc), (name, repr(exc))
    # A cancelled receive lost nothing: every echo came, once, in order.
    assert run.received == run.server_got
    # Nothing accepted was lost (no connection died with it in hand), nothing was
    # duplicated or reordered, and a send that raised Cancelled sent nothing.
    assert run.server_got == run.accepted, (run.accepted, run.refused, run.server_got)


async def test_each_call_of_the_reconnecting_client_cancelled_at_every_step(
    autojump_clock: MockClock,
) -> None:
    cancelled: set[str] = set()
    step = 0
    while True:
        step += 1
        run, canceller = await run_calls_once(step)
        check_calls_run(run)
        if canceller.steps < step:
            break
        if canceller.cancelled is not None:
            cancelled.add(canceller.cancelled.split()[0])
        assert step < 5000, "the scenario never finished"
    # Every kind of call was cancelled somewhere in the sweep.
    assert cancelled == {"wait_connected", "send", "receive", "wait_state", "aclose"}


# -- never a group: the three context managers that run tasks of their own -------------------------
#
# Before 67d3948 each of these raised a group of Cancelled (the sweeps found it);
# they stay as regressions, with the sweeps above, which demand a plain Cancelled.


async def test_a_reconnecting_client_cancelled_from_outside_raises_one_cancelled(
    autojump_clock: MockClock,
) -> None:
    escaped: list[BaseException] = []
    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo)
        with trio.move_on_after(1.0) as scope:
            try:
                async with thb.open_reconnecting_client(
                    [ENDPOINT], connector=network.connect
                ) as client:
                    await client.wait_connected()
                    await trio.sleep_forever()
            except BaseException as exc:
                escaped.append(exc)
                raise
    assert scope.cancelled_caught
    assert [type(exc) for exc in escaped] == [trio.Cancelled], escaped


async def test_a_memory_network_cancelled_from_outside_raises_one_cancelled(
    autojump_clock: MockClock,
) -> None:
    escaped: list[BaseException] = []
    with trio.move_on_after(1.0) as scope:
        try:
            async with open_memory_network() as network:
                network.listen(ENDPOINT, echo)
                stream = await network.connect("server", 9000)
                async with thb.open_stream_connection(stream):
                    await trio.sleep_forever()
        except BaseException as exc:
            escaped.append(exc)
            raise
    assert scope.cancelled_caught
    assert [type(exc) for exc in escaped] == [trio.Cancelled], escaped


async def test_serve_tcp_cancelled_from_outside_raises_one_cancelled() -> None:
    server = thb.Server(echo)
    escaped: list[BaseException] = []

    async def serve(*, task_status: trio.TaskStatus[thb.Server] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await server.serve_tcp(0, "127.0.0.1", task_status=task_status)
        except BaseException as exc:
            escaped.append(exc)
            raise

    with trio.fail_after(10), trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            async with thb.open_connection("127.0.0.1", server.port):
                await server.registry.wait_until(lambda r: len(r) == 1)
                scope.cancel()  # the accept loop and a connection's task, at once
                await trio.sleep_forever()
    assert scope.cancelled_caught
    assert server.statistics().active == 0
    assert [type(exc) for exc in escaped] == [trio.Cancelled], escaped


# -- bugs the sweeps found, fixed since: the smallest reproductions ---------------------------


async def mute_client(stream: trio.abc.Stream, instance_id: str) -> None:
    """Say HELLO to a server as a client with ``instance_id``, then never read again."""
    core = thb.HeartbeatProtocol(
        thb.Role.CLIENT, thb.Config(instance_id=instance_id), now=trio.current_time()
    )
    while core.state is not thb.State.OPEN:
        core.receive_data(await stream.receive_some(), now=trio.current_time())
        while core.next_event() is not thb.NEED_DATA:
            pass
    await stream.send_all(core.data_to_send())


async def test_a_cancelled_refusal_closes_the_stream(autojump_clock: MockClock) -> None:
    """Before issue #10, Server._refuse() closed the stream after its CLOSE write, not in
    a finally: a refusal (draining, at capacity) cancelled during that write left the
    stream open, and the refused peer waited for an end that never came."""
    server = thb.Server(echo)
    await server.drain()  # nothing to drain; everyone is refused from now on
    _, server_end = trio.testing.memory_stream_pair()
    stream = RecordingStream(server_end)
    with trio.CancelScope() as scope:
        scope.cancel()
        await server.handle_stream(stream, "late")
    assert scope.cancelled_caught
    assert stream.closed


async def test_an_ended_connection_is_not_listed(autojump_clock: MockClock) -> None:
    """Before issue #10, the registry dropped a connection when its handler returned,
    not when it ended: one whose peer closed in order stayed listed (state CLOSED)
    while the handler ran."""

    async def busy(conn: thb.Connection) -> None:
        await trio.sleep(10.0)  # works on without reading

    server = thb.Server(busy, config=SERVER_CONFIG)
    async with trio.open_nursery() as nursery:
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, server_end, "p")
        async with thb.open_stream_connection(client_end, config=client_config("p")):
            await server.registry.wait_until(lambda r: "p" in r)
        # Our CLOSE 1000 was answered: the connection has ended on both sides.
        await trio.sleep(1.0)
        assert [info.state for info in server.registry.snapshot()] == []


async def test_a_replaced_peer_is_unlisted_at_once(autojump_clock: MockClock) -> None:
    """Once a newer connection takes its id over, the older one leaves the registry
    in the same change, though it is still closing: an id always names the one
    connection listed under it, even once the newer one has gone too."""
    server = thb.Server(echo, config=SERVER_CONFIG)
    registry = server.registry
    async with trio.open_nursery() as nursery:
        old_end, old_server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, old_server_end, "old")
        await mute_client(old_end, "p")  # will never answer its CLOSE 4000
        await registry.wait_until(lambda r: "p" in r)
        version = registry.version
        new_end, new_server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, new_server_end, "new")
        async with thb.open_stream_connection(new_end, config=client_config("p")):
            await registry.wait_until(served_by("p", "new"))
            assert registry.version == version + 1  # one change: the old out, the new in
            assert [info.address for info in registry.snapshot()] == ["new"]
            assert registry_problems(registry) == []
        await registry.wait_until(lambda r: len(r) == 0)  # the newer one is gone...
        assert registry_problems(registry) == []
        assert "p" not in registry
        # ...while the older one still waits for the answer to its CLOSE 4000.
        assert server.statistics().active == 1
        assert trio.current_time() < SERVER_CONFIG.close_timeout
        nursery.cancel_scope.cancel()


async def test_a_cancelled_send_of_the_reconnecting_client_sends_nothing(
    autojump_clock: MockClock,
) -> None:
    """Before issue #10, ReconnectingClient.send() appended to its buffer before its
    checkpoint: a send that raised Cancelled had queued the message anyway, so a
    caller who sent it again, as Trio's rules allow, sent it twice."""
    got: list[bytes] = []
    async with open_memory_network() as network:
        network.listen(ENDPOINT, collector(got))
        async with thb.open_reconnecting_client([ENDPOINT], connector=network.connect) as client:
            await client.wait_connected()
            with trio.CancelScope() as scope:
                scope.cancel()
                await client.send(b"once")
            assert scope.cancelled_caught  # the send raised Cancelled...
            await client.send(b"once")  # ...so the caller sends it again
            await trio.sleep(1.0)
    assert got == [b"once"]


async def test_after_aclose_the_reconnecting_client_is_closed(autojump_clock: MockClock) -> None:
    """Before issue #10, ReconnectingClient.aclose() returned before the supervisor had
    stopped: the state was still CONNECTED (or BACKING_OFF), .connection the closed
    connection, and send() accepted a message that was never sent instead of raising
    ReconnectFailed."""
    async with open_memory_network() as network:
        network.listen(ENDPOINT, echo)
        async with thb.open_reconnecting_client([ENDPOINT], connector=network.connect) as client:
            await client.wait_connected()
            await client.aclose()
            with pytest.raises(thb.ReconnectFailed):
                await client.send(b"after the close")
            assert client.state is thb.SupervisorState.CLOSED
            assert client.connection is None


async def test_messages_sent_just_before_leaving_are_not_dropped(
    autojump_clock: MockClock,
) -> None:
    """Before issue #10, leaving open_reconnecting_client()'s block closed the
    connection at once: messages send() accepted that the pump had not handed over
    yet stayed in the buffer and were dropped without a word."""
    # Whether the pump runs before the block is left is up to the scheduler, so
    # try until the message is still in the buffer as the block is left.
    for _ in range(50):
        got: list[bytes] = []
        async with open_memory_network() as network:
            network.listen(ENDPOINT, collector(got))
            async with thb.open_reconnecting_client(
                [ENDPOINT], connector=network.connect
            ) as client:
                await client.wait_connected()
                await client.send(b"last words")
                in_the_buffer = client.buffered == 1
            await trio.sleep(1.0)
        if in_the_buffer:
            assert got == [b"last words"]
            return
    raise AssertionError("the message never stayed in the buffer")


async def test_messages_received_before_a_reset_are_delivered(autojump_clock: MockClock) -> None:
    """Before issue #10, a connection that failed (reset, timeout) cancelled its block,
    and with it the supervisor's forwarder: the message in its hands and the
    connection's receive queue were lost, though the connection had received them (an
    orderly close kept them)."""

    async def burst(conn: thb.Connection) -> None:
        for n in range(5):
            await conn.send(b"%d" % n)
        await trio.sleep_forever()

    got: list[bytes] = []
    async with open_memory_network() as network:
        host = network.listen(ENDPOINT, burst)
        async with thb.open_reconnecting_client(
            [ENDPOINT],
            connector=network.connect,
            backoff=thb.ConstantBackoff(1.0),
            receive_buffer=1,
        ) as client:
            conn = await client.wait_connected()
            await trio.testing.wait_all_tasks_blocked()
            assert conn.statistics().data_frames_in == 5  # all five are in our hands...
            host.kill()
            host.down()
            await client.wait_state(thb.SupervisorState.BACKING_OFF)
            with trio.move_on_after(0.5):
                while True:
                    got.append(await client.receive())
    assert got == [b"0", b"1", b"2", b"3", b"4"]  # ...so none may be lost
