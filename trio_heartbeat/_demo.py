"""``python -m trio_heartbeat demo``: failure detection and reconnection, narrated.

One process, real TCP on loopback: an echo server, a fault-injecting proxy in
front of it, and a reconnecting client talking through the proxy. The demo
walks through a healthy link, added latency, a silent network (the proxy
swallows every byte but keeps both sockets open, as a dead NAT or a pulled
cable would), a health change, and a server that drains and comes back.
Every line says what the library saw and when, relative to the start.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ._backoff import FullJitterBackoff
from ._config import Config
from ._connection import Connection
from ._events import Event, PeerHealthChanged, PongReceived
from ._frames import HealthStatus
from ._reconnect_events import (
    AttemptFailed,
    BackingOff,
    Connected,
    Disconnected,
    SupervisorEvent,
    SupervisorState,
)
from ._server import Server
from ._supervisor import open_reconnecting_client
from .testing import FaultProxy

__all__ = ["run_demo"]


@dataclass
class _Narrator:
    start: float
    write: Callable[[str], object]
    #: Report the round trip at most this often, so that scene 2 shows one at any speed.
    rtt_every: float = 1.0
    last_rtt_report: float = float("-inf")
    detections: list[float] = field(default_factory=list)

    def say(self, who: str, text: str) -> None:
        elapsed = trio.current_time() - self.start
        self.write(f"[{elapsed:6.2f}s] {who:<7} {text}\n")

    def scene(self, title: str) -> None:
        self.write(f"\n== {title}\n")

    def on_supervisor(self, event: SupervisorEvent) -> None:
        if isinstance(event, Connected):
            self.say("client", f"connected to {event.endpoint} (attempt {event.attempt})")
        elif isinstance(event, Disconnected):
            self.say("client", f"connection lost (it was up {event.uptime:.2f} s): {event.error}")
        elif isinstance(event, AttemptFailed):
            self.say("client", f"attempt {event.attempt} failed: {event.error}")
        elif isinstance(event, BackingOff):
            self.say("client", f"backing off {event.delay:.2f} s (full jitter)")

    def on_connection(self, conn: Connection, event: Event) -> None:
        if isinstance(event, PongReceived) and event.rtt is not None:
            now = trio.current_time()
            if now - self.last_rtt_report >= self.rtt_every:
                self.last_rtt_report = now
                self.say("client", f"round trip {event.rtt * 1000:.1f} ms")
        elif isinstance(event, PeerHealthChanged):
            self.say("client", f"server health {event.previous.name} -> {event.status.name}")


async def _echo(conn: Connection) -> None:
    async for message in conn:
        await conn.send(message)


async def _watch_registry(server: Server, narrator: _Narrator) -> None:
    seen = -1
    while True:
        if len(server.registry) != seen:
            seen = len(server.registry)
            peers = ", ".join(f"{peer.peer_id or '?'}@{peer.address}" for peer in server.registry)
            narrator.say("server", f"registry: {seen} peer(s) {peers}")
        await server.registry.wait_changed()


async def run_demo(fast: bool = False, write: Callable[[str], object] | None = None) -> int:
    """Run the narrated demo; ``fast`` shrinks every pause (for tests). Returns 0 on success."""
    out = write if write is not None else _stdout_write
    scale = 0.2 if fast else 1.0
    interval, timeout = 0.25 * scale, 1.0 * scale
    config = Config(interval=interval, timeout=timeout, handshake_timeout=2.0 * scale)
    narrator = _Narrator(trio.current_time(), out, rtt_every=1.0 * scale)
    out(
        "trio-heartbeat demo: an echo server, a fault-injecting proxy, a reconnecting client.\n"
        f"Heartbeat every {interval:.2f} s when idle; a peer silent for {timeout:.2f} s is dead.\n"
    )

    async with trio.open_nursery() as nursery:
        server = Server(
            _echo, config=Config(interval=interval, timeout=timeout, instance_id="demo-server")
        )
        await nursery.start(server.serve_tcp, 0, "127.0.0.1")
        port = server.port
        registry_watch = trio.CancelScope()

        async def watch(current: Server) -> None:
            with registry_watch:
                await _watch_registry(current, narrator)

        nursery.start_soon(watch, server)
        proxy = FaultProxy()
        await nursery.start(proxy.serve, "127.0.0.1", port)
        narrator.say("server", f"listening on 127.0.0.1:{port}, proxy on 127.0.0.1:{proxy.port}")

        async with open_reconnecting_client(
            [("127.0.0.1", proxy.port)],
            config=Config(
                interval=interval,
                timeout=timeout,
                instance_id="demo-client",
                handshake_timeout=config.handshake_timeout,
            ),
            backoff=FullJitterBackoff(base=0.5 * scale, factor=2.0, cap=2.0 * scale, seed=7),
            healthy_after=2.0 * scale,
            connect_timeout=2.0 * scale,
            listeners=[narrator.on_supervisor],
            connection_listeners=[narrator.on_connection],
        ) as client:
            counter = itertools.count(1)

            async def exchange(label: str) -> None:
                message = f"{label} #{next(counter)}".encode()
                await client.send(message)
                reply = await client.receive()
                narrator.say("client", f"sent {message.decode()!r}, echo {reply.decode()!r}")

            narrator.scene("1. A healthy link: PINGs only when idle, DATA echoed")
            await client.wait_connected()
            for _ in range(2):
                await exchange("hello")
                await trio.sleep(1.0 * scale)

            narrator.scene("2. 100 ms of added latency each way: the round trip shows it")
            proxy.faults.set_delay(0.1 * scale)
            await trio.sleep(2.2 * scale)
            await exchange("slow")
            proxy.faults.heal()

            narrator.scene("3. A silent network: bytes vanish, no FIN, no RST")
            silenced_at = trio.current_time()
            proxy.faults.blackhole()
            narrator.say("proxy", "blackholing both directions")
            await client.wait_state(SupervisorState.BACKING_OFF, SupervisorState.CONNECTING)
            detected = trio.current_time() - silenced_at
            narrator.say(
                "client",
                f"declared the server dead {detected:.2f} s after the network "
                f"went silent (timeout {timeout:.2f} s)",
            )
            narrator.detections.append(detected)
            await trio.sleep(1.5 * scale)
            narrator.say("proxy", "network healed")
            proxy.faults.heal()
            proxy.reset_all()  # the stalled attempt's socket is dead weight: reset it
            client.nudge()
            await client.wait_connected()
            await exchange("back")

            narrator.scene("4. The server reports DEGRADED health inside its heartbeats")
            server.set_health(HealthStatus.DEGRADED)
            await trio.sleep(1.0 * scale)
            server.set_health(HealthStatus.SERVING)
            await trio.sleep(0.5 * scale)

            narrator.scene("5. The server drains (CLOSE 1001) and restarts on the same port")
            registry_watch.cancel()
            await server.drain(grace=1.0 * scale)
            narrator.say("server", "drained and stopped")
            await trio.sleep(1.0 * scale)
            server = Server(
                _echo, config=Config(interval=interval, timeout=timeout, instance_id="demo-server")
            )
            await nursery.start(server.serve_tcp, port, "127.0.0.1")
            narrator.say("server", f"back on 127.0.0.1:{port}")
            registry_watch = trio.CancelScope()
            nursery.start_soon(watch, server)
            await client.wait_connected()
            await exchange("again")
            stats = client.connection.statistics() if client.connection else None

        narrator.scene("Done")
        if stats is not None:
            rtt = (
                "no round trip measured"
                if stats.srtt is None
                else (f"smoothed round trip {stats.srtt * 1000:.1f} ms")
            )
            narrator.say(
                "client",
                f"last connection: {stats.frames_out} frames out, {stats.frames_in} in, {rtt}",
            )
        narrator.say("client", f"{client.connections} connections over {client.attempts} attempts")
        await server.drain(grace=0.5 * scale)
        nursery.cancel_scope.cancel()
    return 0


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
