"""The command line's service registry: etcd URLs, ``serve --register``, ``connect --discover``
and ``registry list|watch``.

etcd is named by URL: ``etcd://HOST:PORT`` (several members comma-separated,
``etcd://h1:2379,h2:2379``), followed by ``/SERVICE`` where a service is
meant. The etcd client needs the ``etcd`` extra (httpx); it is imported only
when a command names etcd, so the rest of the command line never needs it.
The embedded registry lives in one process, so the command line, whose
servers and clients are separate processes, speaks etcd only.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, final

import trio

from ._discovery import DiscoveryFresh, DiscoveryNotice, DiscoveryStale, open_discovery
from ._endpoints import EndpointSource, format_endpoint, parse_endpoint
from ._errors import StoreUnavailable, UsageError
from ._frames import HealthStatus
from ._health_monitor import HealthMonitor
from ._instances import Instance, InstanceAdded, InstanceChanged, InstanceRemoved, LiveSet
from ._instances import service_prefix as _service_prefix
from ._publisher import publish_peers
from ._registration import MAX_TTL, MIN_TTL, Registration, RegistrationState
from ._restart import RestartType
from ._server import Server
from ._services import ChildSpec

if TYPE_CHECKING:
    from ._etcd import EtcdStore

__all__ = [
    "WITHDRAW_GRACE",
    "Registered",
    "check_registration",
    "discovered_endpoints",
    "parse_etcd_url",
    "registered",
    "run_registry_command",
]

logger = logging.getLogger("trio_heartbeat.cli")

_SCHEME = "etcd://"
_WILDCARDS = {"", "0.0.0.0", "::"}


def parse_etcd_url(text: str, *, option: str, service: bool) -> tuple[list[str], str]:
    """``(["host:port", ...], service)`` from ``etcd://HOST:PORT[,HOST:PORT...][/SERVICE]``.

    With ``service`` the ``/SERVICE`` part is required, without it refused.
    :exc:`UsageError` for anything else, naming ``option``.
    """
    shape = f"etcd://HOST:PORT{'/SERVICE' if service else ''}"
    if text == "memory":
        raise UsageError(
            f"{option} memory is not meaningful across processes: the embedded registry is a "
            f"library feature (trio_heartbeat.open_memory_store); use {shape}"
        )
    if not text.startswith(_SCHEME) or any(c in text for c in "?#@"):
        raise UsageError(f"{option} must be {shape}, not {text!r}")
    members, _, name = text[len(_SCHEME) :].partition("/")
    name = name.rstrip("/")
    if service and not name:
        raise UsageError(f"{option} needs the service: {shape}, not {text!r}")
    if not service and name:
        raise UsageError(f"{option} takes no service in the URL (use --service): {text!r}")
    endpoints = []
    for member in members.split(","):
        try:
            endpoints.append(format_endpoint(*parse_endpoint(member)))
        except ValueError as exc:
            raise UsageError(f"{option}: {exc}") from None
    if service:
        try:
            _service_prefix(name)
        except ValueError as exc:
            raise UsageError(f"{option}: {exc}") from None
    return endpoints, name


@asynccontextmanager
async def _etcd(endpoints: list[str]) -> AsyncIterator[EtcdStore]:
    try:
        from ._etcd import open_etcd_store
    except ImportError as exc:
        raise UsageError(
            f"etcd needs the 'etcd' extra (pip install 'trio-heartbeat[etcd]'): {exc}"
        ) from None
    async with open_etcd_store(endpoints) as store:
        yield store


# -- serve --register -------------------------------------------------------------


def check_registration(args: argparse.Namespace) -> None:
    """Refuse ``serve``'s registry options that cannot work, before anything is opened."""
    if args.register is None:
        if args.service is not None or args.advertise is not None or args.publish_peers:
            raise UsageError(
                "--service, --advertise and --publish-peers need --register etcd://HOST:PORT"
            )
        return
    parse_etcd_url(args.register, option="--register", service=False)
    if args.service is None:
        raise UsageError("--register needs --service NAME")
    if not MIN_TTL <= args.ttl <= MAX_TTL:
        raise UsageError(f"--ttl must be {MIN_TTL:g} to {MAX_TTL:.0f} s, not {args.ttl!r}")
    if args.publish_peers is not None and args.publish_peers == args.service:
        raise UsageError(
            "--publish-peers needs a service of its own: a peer with this server's id "
            "would take its record over"
        )
    if args.advertise is None and args.host in _WILDCARDS:
        shown = args.host or "''"
        raise UsageError(f"--register with --host {shown} needs --advertise HOST:PORT")
    try:
        if args.advertise is not None:
            parse_endpoint(args.advertise)
        Instance(args.service, args.id or "x", args.advertise or "x:1")
        if args.publish_peers is not None:
            _service_prefix(args.publish_peers)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--register: {exc}") from None


#: After the withdrawal and before the server says GOING_AWAY: time for the
#: clients' watches to hear it, so that none reconnects to this server.
WITHDRAW_GRACE = 0.5


@final
class Registered:
    """What ``serve`` needs of its registration: the child that keeps it, and the withdrawal."""

    def __init__(
        self,
        registration: Registration | None = None,
        health: HealthMonitor | None = None,
        publisher: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._registration = registration
        self._health = health
        #: The service supervisor's children (none without ``--register``).
        self.children: list[ChildSpec] = []
        if registration is not None:
            self.children.append(
                ChildSpec("registration", registration.run, restart=RestartType.PERMANENT)
            )
        if publisher is not None:
            self.children.append(
                ChildSpec("peer publisher", publisher, restart=RestartType.PERMANENT)
            )

    async def withdraw(self) -> None:
        """Before a drain: say NOT_SERVING, wait (a little) for the record to go, then give
        the clients' watches :data:`WITHDRAW_GRACE` to hear it."""
        if self._registration is None or self._health is None:
            return
        self._health.set_status(HealthStatus.NOT_SERVING)
        with trio.move_on_after(self._registration.revoke_timeout):
            await self._registration.wait_state(
                RegistrationState.WITHDRAWN, RegistrationState.OUTAGE, RegistrationState.STOPPED
            )
        await trio.sleep(WITHDRAW_GRACE)


@asynccontextmanager
async def registered(
    args: argparse.Namespace, server: Server, host: str, port: int
) -> AsyncIterator[Registered]:
    """With ``--register`` (checked by :func:`check_registration`): the child that keeps
    this server registered while it serves, and its withdrawal before the drain."""
    if args.register is None:
        yield Registered()
        return
    endpoints, _ = parse_etcd_url(args.register, option="--register", service=False)
    address = args.advertise or format_endpoint(host, port)
    instance = Instance(args.service, args.id or f"{socket.gethostname()}-{port}", address)
    async with _etcd(endpoints) as store:
        health = HealthMonitor()
        health.publish_to(server)
        registration = Registration(store, instance, ttl=args.ttl, health=health)
        logger.info(
            "registering %s as %s at %s (ttl %g s)",
            address,
            registration.key,
            args.register,
            args.ttl,
        )
        publisher = None
        if args.publish_peers is not None:
            publisher = partial(
                publish_peers, server.registry, store, args.publish_peers, ttl=args.ttl
            )
        yield Registered(registration, health, publisher)


# -- connect --discover -----------------------------------------------------------


@asynccontextmanager
async def discovered_endpoints(args: argparse.Namespace) -> AsyncIterator[EndpointSource]:
    """The endpoints ``connect`` dials: HOST:PORT as given, or the live instances of
    ``--discover etcd://HOST:PORT/SERVICE``."""
    if args.discover is None:
        if not args.endpoints:
            raise UsageError("connect needs HOST:PORT or --discover etcd://HOST:PORT/SERVICE")
        for endpoint in args.endpoints:
            try:
                parse_endpoint(endpoint)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        yield args.endpoints
        return
    if args.endpoints:
        raise UsageError("give HOST:PORT or --discover, not both")
    endpoints, service = parse_etcd_url(args.discover, option="--discover", service=True)
    async with _etcd(endpoints) as store, open_discovery(store, service) as discovery:
        live = discovery.instances
        if discovery.stale:
            logger.warning("discovering %s: etcd does not answer yet; waiting", service)
        else:
            logger.info("discovering %s: %d live instance(s)", service, len(live))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_log_changes, discovery.changes())
            yield discovery.endpoints()
            nursery.cancel_scope.cancel()


async def _log_changes(changes: AsyncIterator[DiscoveryNotice]) -> None:
    async for notice in changes:
        logger.info("discovery: %s", describe(notice))


def describe(notice: DiscoveryNotice) -> str:
    """One line per notice: ``added ID ADDRESS HEALTH``, ``stale: REASON``, ..."""
    if isinstance(notice, InstanceAdded | InstanceChanged | InstanceRemoved):
        verb = {InstanceAdded: "added", InstanceChanged: "changed", InstanceRemoved: "removed"}
        return f"{verb[type(notice)]} {_row(notice.instance)}"
    if isinstance(notice, DiscoveryStale):
        return f"stale: {notice.reason}"
    assert isinstance(notice, DiscoveryFresh)
    return f"fresh again after {notice.stale_for:.1f} s"


def _row(instance: Instance) -> str:
    return f"{instance.instance_id} {instance.address} {instance.health.name}"


# -- registry list | watch --------------------------------------------------------


async def run_registry_command(
    args: argparse.Namespace, emit: Callable[[str], Awaitable[None]]
) -> int:
    """``registry list URL``: the live instances, one ``ID ADDRESS HEALTH`` line each;
    ``registry watch URL``: the live ones as ``added`` lines, then each change as it
    happens, until interrupted. 1 if etcd cannot be reached (``list``)."""
    endpoints, service = parse_etcd_url(args.url, option=f"registry {args.action}", service=True)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(_etcd(endpoints))
        if args.action == "list":
            try:
                entries, revision = await store.range(_service_prefix(service))
            except StoreUnavailable as exc:
                logger.error("cannot reach etcd: %s", exc)
                return 1
            except (ValueError, RuntimeError) as exc:  # an answer it would not read
                logger.error("cannot read the service from etcd: %s", exc)
                return 1
            live = LiveSet(service)
            live.reset(entries, revision)
            for instance in live.instances.values():
                await emit(_row(instance))
            return 0
        discovery = await stack.enter_async_context(open_discovery(store, service))
        broken: BrokenPipeError | None = None  # raised once out of the nursery: not in a group
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                try:
                    async for notice in discovery.changes(initial=True):
                        await emit(describe(notice))
                except BrokenPipeError as exc:
                    broken = exc
                    nursery.cancel_scope.cancel()
        if broken is not None:
            raise broken
    return 0
