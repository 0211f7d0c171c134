"""``python -m trio_heartbeat``: serve, connect, demo.

stdout carries only what a script would want to parse (``listening on HOST:PORT``
from ``serve``; received messages from ``connect``); everything a person reads
as it happens (connections, close codes, round trips, reconnect attempts) goes
to stderr, one line per event.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import trio

from ._backoff import FullJitterBackoff
from ._breaker import BreakerTransition
from ._circuit import Breaker
from ._cli_args import _config, _options, build_parser
from ._cli_registry import (
    check_registration,
    discovered_endpoints,
    registered,
    run_registry_command,
)
from ._config import Config
from ._connection import Connection
from ._endpoints import EndpointSource
from ._errors import ReconnectFailed, SupervisorGaveUp, UndeliveredMessages, UsageError
from ._events import (
    ConnectionEnded,
    Event,
    HandshakeComplete,
    PeerHealthChanged,
    PingReceived,
    PongReceived,
)
from ._frames import HealthStatus, Role
from ._handshake import CLIENT_LEAD
from ._liveness_breaker import bind_breaker
from ._restart import RestartType
from ._server import Server
from ._services import ChildSpec, ServiceSupervisor, open_service_supervisor
from ._supervisor import open_reconnecting_client
from ._systemd import notify_systemd

if TYPE_CHECKING:
    from ._probes import ProbeServer

__all__ = ["main"]

logger = logging.getLogger("trio_heartbeat.cli")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(message)s", "%H:%M:%S"))
    root = logging.getLogger("trio_heartbeat")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


# -- serve -----------------------------------------------------------------------


async def _echo(conn: Connection) -> None:
    async for message in conn:
        await conn.send(message)


#: File descriptors kept beyond the connections: listeners, the probes, logs, systemd.
FD_RESERVE = 64


def _fit_file_limit(max_connections: int) -> int:
    """The connection cap the process's file limit can honour, raising its soft limit if need be.

    Past the limit, ``accept`` fails for everyone, the probe port included
    (``/livez`` then times out): the server's own cap must come first. Like
    Go's runtime, the soft limit is raised as far as the hard one allows.
    """
    if sys.platform == "win32":  # pragma: no cover - no such limit
        return max_connections
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if new_soft > soft:
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
                soft = new_soft
        if soft < wanted:
            fitted = max(1, soft - FD_RESERVE)
            logger.warning(
                "--max-connections %d is more than the file limit allows (%d): serving at most %d",
                max_connections,
                soft,
                fitted,
            )
            return fitted
    return max_connections


def _announce(line: str) -> None:
    """A line for scripts on stdout: one that read what it needed and left (``| head -1``,
    to learn the port) is no reason to stop serving."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        _let_go_of_stdout()


async def _drain_on_signal(
    server: Server, nursery: trio.Nursery, withdraw: Callable[[], Awaitable[None]]
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        begun = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if begun or server.draining:
                logger.warning("second %s: stopping now", name)
                nursery.cancel_scope.cancel()
                return
            begun = True
            logger.info("%s: draining %d connection(s)", name, len(server.registry))
            # In the background, so that a second signal can cut the drain short;
            # out of the registry first, so that no client is sent back here.
            nursery.start_soon(_withdraw_then_drain, server, withdraw)


async def _withdraw_then_drain(server: Server, withdraw: Callable[[], Awaitable[None]]) -> None:
    await withdraw()
    await server.drain()


async def _open_probes(
    server: Server, args: argparse.Namespace, alive: Callable[[], bool]
) -> tuple[ProbeServer, list[trio.SocketListener]]:
    """The HTTP probes of ``serve --health-port``, listening; h11 is needed only then."""
    try:
        from ._probes import ProbeServer
    except ImportError as exc:
        raise UsageError(
            f"--health-port needs the 'health' extra (pip install 'trio-heartbeat[health]'): {exc}"
        ) from None
    probes = ProbeServer(
        livez=alive,  # answered at all: the loop runs; and the supervisor did not give up
        readyz=lambda: server.config.status is HealthStatus.SERVING and not server.draining,
        peers=server.registry.json_entries,
    )
    try:
        listeners = await trio.open_tcp_listeners(args.health_port, host=args.health_host)
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {args.health_host}:{args.health_port} (--health-port): {exc}"
        ) from exc
    return probes, listeners


async def serve(args: argparse.Namespace) -> int:
    """Run the echo server until drained (Ctrl-C / SIGTERM), or stopped by a second signal.

    A supervisor restarts a server that failed on the same port; once it gives
    up, ``/livez`` answers 503, the watchdog pings stop and ``serve`` exits 1.
    """
    config = _config(args)
    check_registration(args)
    server = Server(
        _echo,
        config=config,
        options=_options(args),
        max_connections=_fit_file_limit(args.max_connections),
        drain_timeout=args.drain_timeout,
    )
    supervisors: list[ServiceSupervisor] = []

    def alive() -> bool:
        return all(supervisor.error is None for supervisor in supervisors)

    try:
        listeners = await trio.open_tcp_listeners(args.port, host=args.host)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    try:
        probes = await _open_probes(server, args, alive) if args.health_port is not None else None
    except UsageError:
        for listener in listeners:
            await listener.aclose()
        raise
    host, port = listeners[0].socket.getsockname()[:2]
    first = [listeners]
    drained = trio.Event()

    async def run_server() -> None:
        # The listeners opened above; after a failure, the same port bound again,
        # unless a drain began meanwhile (a signal while the restart waited).
        if first or not server.draining:
            current = first.pop() if first else await trio.open_tcp_listeners(port, host=args.host)
            await server.serve_listeners(current)
        drained.set()

    child = ChildSpec("server", run_server, restart=RestartType.TRANSIENT)
    gave_up: list[SupervisorGaveUp] = []
    try:
        async with (
            registered(args, server, host, port) as registry,
            trio.open_nursery() as nursery,
        ):
            async with open_service_supervisor([child, *registry.children]) as supervisor:
                supervisors.append(supervisor)
                _announce(f"listening on {host}:{port}")
                if probes is not None:
                    probe_host, probe_port = await nursery.start(
                        probes[0].serve_listeners, probes[1]
                    )
                    _announce(f"health on {probe_host}:{probe_port}")
                nursery.start_soon(_drain_on_signal, server, nursery, registry.withdraw)
                # Under systemd (NOTIFY_SOCKET): READY, STATUS, the watchdog, STOPPING.
                nursery.start_soon(partial(notify_systemd, server, healthy=alive))
                await drained.wait()
            nursery.cancel_scope.cancel()  # drained: stop watching for signals
    except* SupervisorGaveUp as group:
        gave_up.extend(group.exceptions)  # type: ignore[arg-type]
    if gave_up:
        logger.error("stopped: %s", gave_up[0])
        return 1
    stats = server.statistics()
    logger.info("stopped: %d served, %d refused", stats.completed_handshakes, stats.refused)
    return 0


# -- connect -----------------------------------------------------------------------


@dataclass
class _RttReporter:
    every: float
    #: Driven by the client's liveness; each heartbeat from a SERVING peer is a call.
    breaker: Breaker | None = None
    last_report: float = float("-inf")
    #: The server's HELLO, until its verdict (the next frame) says we are in.
    handshake: HandshakeComplete | None = None

    def __call__(self, conn: Connection, event: Event) -> None:
        if isinstance(event, HandshakeComplete):
            self.handshake = event  # a refused client must not read "handshake done"
            return
        if isinstance(event, ConnectionEnded):
            self.handshake = None
            logger.debug("connection ended with %d %s", event.code, event.reason)
            return
        if self.handshake is not None:
            self._accepted(conn, self.handshake)
            self.handshake = None
        if isinstance(event, (PingReceived, PongReceived)):
            logger.debug(
                "%s %s, peer %s", type(event).__name__, event.opaque.hex(), event.status.name
            )
        if isinstance(event, (PingReceived, PongReceived)) and self.breaker is not None:
            # connect makes no calls of its own: a SERVING heartbeat is its successful one.
            now = trio.current_time()
            permit = self.breaker.core.try_acquire(now)
            if permit is not None and event.status is HealthStatus.SERVING:
                permit.success(now)
            elif permit is not None:
                permit.release()
        if isinstance(event, PongReceived) and event.rtt is not None:
            now = trio.current_time()
            if now - self.last_report >= self.every:
                self.last_report = now
                srtt = conn.srtt if conn.srtt is not None else event.rtt
                logger.info("rtt %.3f ms (smoothed %.3f ms)", event.rtt * 1000, srtt * 1000)
        elif isinstance(event, PeerHealthChanged):
            logger.info("peer health %s -> %s", event.previous.name, event.status.name)

    @staticmethod
    def _accepted(conn: Connection, handshake: HandshakeComplete) -> None:
        # A client leads the heartbeat: idle, it PINGs before its send interval is up.
        lead = CLIENT_LEAD if conn.role is Role.CLIENT else 1.0
        name = handshake.peer.instance_id
        logger.info(
            "handshake done%s, peer health %s, pinging every %.3f s",
            f", peer id '{name}'" if name else "",
            conn.peer_health.name if conn.peer_health is not None else "unknown",
            handshake.send_interval * lead,
        )


def _report_breaker(transition: BreakerTransition) -> None:
    logger.info(
        "breaker %s -> %s: %s",
        transition.previous.name,
        transition.state.name,
        transition.reason,
    )


async def _read_stdin_lines(send: trio.MemorySendChannel[bytes]) -> None:
    # os.read in a thread, abandoned on cancel: stdin stays blocking for the
    # terminal, and an abandoned os.read holds no lock of sys.stdin's that the
    # interpreter would need at exit (a blocked readline aborts the process).
    fd = sys.stdin.fileno()
    pending = b""
    async with send:
        while True:
            chunk = await trio.to_thread.run_sync(os.read, fd, 65536, abandon_on_cancel=True)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                await send.send(line.rstrip(b"\r"))
        if pending:
            await send.send(pending.rstrip(b"\r"))


async def connect(args: argparse.Namespace) -> int:
    """Connect, reconnecting until interrupted; stdin lines out, DATA in.

    At the end of input it waits until no message has come for ``--linger``
    seconds (the replies to the last lines may still be on their way), closes
    with CLOSE 1000 and returns 0. Returns 1 if lines could not be sent (they
    are named on stderr) or the client gives up (close code 1008 or 4000);
    141, quietly, when stdout is closed under it (``| head -1``), as a Unix
    tool killed by SIGPIPE; a malformed endpoint is a :class:`UsageError`.
    SIGINT or SIGTERM closes as the end of input does, without the linger;
    a second one stops at once.
    """
    config = _config(args)
    async with discovered_endpoints(args) as endpoints:
        return await _connect(args, config, endpoints)


async def _connect(args: argparse.Namespace, config: Config, endpoints: EndpointSource) -> int:
    backoff = FullJitterBackoff(base=2.0, factor=2.0, cap=args.backoff_cap)
    out = sys.stdout.buffer
    status = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            # The first signal closes as the end of input does, delivering
            # what was read (for the close timeout at most); a second one
            # stops at once.
            body = trio.CancelScope()

            async def stop_on_signal() -> None:
                async for signum in signals:
                    if body.cancel_called:
                        logger.info("%s again: stopping now", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return
                    logger.info("%s: closing", signal.Signals(signum).name)
                    body.cancel()

            nursery.start_soon(stop_on_signal)
            lines_in, lines_out = trio.open_memory_channel[bytes](16)
            nursery.start_soon(_read_stdin_lines, lines_in)
            breaker = Breaker()
            breaker.add_listener(_report_breaker)
            try:
                async with open_reconnecting_client(
                    endpoints,
                    config=config,
                    options=_options(args),
                    backoff=backoff,
                    connection_listeners=[_RttReporter(args.rtt_every, breaker)],
                ) as client:
                    bind_breaker(breaker, client)  # for the client's life
                    last_message = trio.current_time()

                    async def pump_stdin() -> None:
                        async for line in lines_out:
                            await client.send(line)
                        logger.info("end of input: closing after %g s of quiet", args.linger)
                        quiet_until = trio.current_time() + args.linger
                        while trio.current_time() < quiet_until:
                            await trio.sleep_until(quiet_until)
                            quiet_until = max(quiet_until, last_message + args.linger)
                        inner.cancel_scope.cancel()  # leaving the block closes the client

                    with body:
                        async with trio.open_nursery() as inner:
                            inner.start_soon(pump_stdin)
                            async for message in client:
                                last_message = trio.current_time()
                                try:
                                    out.write(message + b"\n")
                                    out.flush()
                                except BrokenPipeError:
                                    # Whoever read our stdout has gone (| head -1):
                                    # stop, quietly, as a Unix tool would.
                                    _let_go_of_stdout()
                                    status = 141
                                    nursery.cancel_scope.cancel()
                                    return status
            except ReconnectFailed as exc:
                logger.error("giving up: %s", exc)
                if exc.undelivered:
                    logger.error("not sent: %s", _lines(exc.undelivered))
                status = 1
            except UndeliveredMessages as exc:
                logger.error("not sent: %s", _lines(exc.messages))
                logger.error("because: %s", exc.reason)
                status = 1
            # The signal watcher and the stdin reader never end by themselves.
            nursery.cancel_scope.cancel()
    return status


def _lines(messages: Sequence[bytes], most: int = 3, width: int = 20) -> str:
    """``2 lines: 'a', 'b'``, the first few of them and each cut short, for a person to read."""
    shown = ", ".join(f"'{_shortened(line, width)}'" for line in messages[:most])
    more = f" and {len(messages) - most} more" if len(messages) > most else ""
    noun = "line" if len(messages) == 1 else "lines"
    return f"{len(messages)} {noun}: {shown}{more}"


def _shortened(line: bytes, width: int) -> str:
    text = line.decode("utf-8", "replace").encode("unicode_escape").decode("ascii")
    return text if len(text) <= width else text[: width - 3] + "..."


def _let_go_of_stdout() -> None:
    # Python flushes stdout again at exit and would complain of the broken
    # pipe: point the descriptor at /dev/null, so there is nothing to complain of.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# -- registry -----------------------------------------------------------------------


def _registry(args: argparse.Namespace) -> int:
    """``registry list|watch``: 141, quietly, when stdout is closed under it."""
    try:
        return trio.run(run_registry_command, args, _emit)
    except BrokenPipeError:
        _let_go_of_stdout()
        return 141


async def _emit(line: str) -> None:
    # A write in a thread, abandoned on cancel: a reader that stopped reading
    # (a full pipe) blocks the thread, never the loop, so a signal still stops it.
    data = (line + "\n").encode("utf-8", "backslashreplace")
    await trio.to_thread.run_sync(_write_stdout, data, abandon_on_cancel=True)


def _write_stdout(data: bytes) -> None:
    fd = sys.stdout.fileno()
    while data:
        data = data[os.write(fd, data) :]


# -- entry point ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    if sys.stdout is None:  # started with stdout closed (>&-): what it prints goes nowhere
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    args = build_parser().parse_args(argv)
    if args.command != "demo":
        _setup_logging(args.verbose)
    try:
        if args.command == "serve":
            return trio.run(serve, args)
        if args.command == "connect":
            return trio.run(connect, args)
        if args.command == "registry":
            return _registry(args)
        from ._demo import run_demo

        return trio.run(run_demo, args.fast)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
