"""Registering an instance while it is healthy: a lease renewed at TTL/3, withdrawn at once.

Theory of operation
-------------------
:class:`Registration` keeps one :class:`~trio_heartbeat.Instance` in a
:class:`~trio_heartbeat.KeyValueStore` (the embedded store or etcd) for as long
as it should be there, and not a moment longer:

- it grants a lease of ``ttl`` seconds and puts the instance's key under it,
  then renews the lease every ``ttl / 3`` seconds. A process that dies or
  hangs (SIGSTOP, a blocked loop) stops renewing, and the store deletes the
  key when the lease runs out: at most ``ttl`` after the last renewal, so
  within ``ttl + ttl / 3`` of the moment it stopped;
- with a :class:`~trio_heartbeat.HealthMonitor`, it follows the process's
  health: SERVING and DEGRADED are registered (the health is part of the
  record, so discovery can prefer SERVING instances), and a change between
  them rewrites the record at once; NOT_SERVING revokes the lease at once,
  and the instance registers again, under a new lease, when it is healthy;
- leaving :meth:`Registration.run` (cancelled, or its nursery ending) revokes
  the lease, within ``revoke_timeout``: a clean shutdown disappears at once;
- a keepalive answered "lease gone" (the store restarted, or the process was
  frozen longer than the TTL) registers again under a new lease;
- a store that cannot be reached (:exc:`~trio_heartbeat.StoreUnavailable`)
  is retried with backoff, for ever; the outage is logged when it starts and
  ends, and :attr:`Registration.outage` says since when. When the store is
  back, the old lease is kept alive if it still lives, or a new one granted.

``run`` is a plain coroutine that runs until cancelled, so it can be a
:class:`~trio_heartbeat.ChildSpec` of a service supervisor (it is restarted
if it ever fails) or a task in any nursery; :func:`open_registration` runs it
beside a block.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import NoReturn, final

import trio

from ._backoff import FullJitterBackoff
from ._errors import StoreUnavailable
from ._frames import HealthStatus
from ._groups import open_background
from ._health_monitor import HealthMonitor
from ._instances import DEFAULT_REGISTRY_PREFIX, Instance, instance_key
from ._kv import STORE_FAILURES, KeyValueStore

__all__ = ["RegistrationState", "Registration", "open_registration"]

logger = logging.getLogger("trio_heartbeat.registry")

#: The shortest TTL a registration may ask for, in seconds.
MIN_TTL = 1.0
#: The longest TTL a registration may ask for: etcd's own maximum, about 285 years.
MAX_TTL = 9_000_000_000.0
_HEALTHY = (HealthStatus.SERVING, HealthStatus.DEGRADED)


class RegistrationState(enum.Enum):
    """Where a :class:`Registration` stands."""

    #: Not started, or between a withdrawal and the next registration.
    UNREGISTERED = "unregistered"
    #: The instance's key is in the store under a live lease.
    REGISTERED = "registered"
    #: Withdrawn because the process is NOT_SERVING; registers again when healthy.
    WITHDRAWN = "withdrawn"
    #: The store cannot be reached; retrying with backoff.
    OUTAGE = "outage"
    #: ``run`` has ended (the lease was revoked, if the store answered in time).
    STOPPED = "stopped"


@final
class Registration:
    """Keeps ``instance`` registered in ``store`` while it is healthy.

    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with open_memory_store() as store, open_health_monitor() as health:
    ...         instance = Instance("echo", "a", "127.0.0.1:7400")
    ...         async with open_registration(store, instance, ttl=3.0, health=health):
    ...             ...  # registered while SERVING or DEGRADED

    Without ``health``, the record says the instance's own health (SERVING
    or DEGRADED) for as long as it runs. ``ttl`` is at least 1 second (etcd
    may grant a little more than asked).
    ``backoff`` is an iterable of delays, started over after each success;
    by default full jitter from 0.1 s doubling to ``ttl / 3``.
    """

    __slots__ = (
        "__weakref__",
        "_backoff",
        "_health",
        "_key",
        "_lease",
        "_running",
        "_state_changed",
        "_store",
        "instance",
        "outage",
        "prefix",
        "registrations",
        "revoke_timeout",
        "state",
        "ttl",
    )

    def __init__(
        self,
        store: KeyValueStore,
        instance: Instance,
        *,
        ttl: float = 10.0,
        health: HealthMonitor | None = None,
        prefix: str = DEFAULT_REGISTRY_PREFIX,
        backoff: Iterable[float] | None = None,
        revoke_timeout: float = 2.0,
    ) -> None:
        if not isinstance(instance, Instance):
            raise TypeError(f"instance must be an Instance, not {type(instance).__name__}")
        if instance.health is HealthStatus.NOT_SERVING:
            raise ValueError("a NOT_SERVING instance is never registered (use a HealthMonitor)")
        if not MIN_TTL <= ttl <= MAX_TTL:  # nan is neither
            raise ValueError(f"ttl must be {MIN_TTL:g} to {MAX_TTL:g} s, not {ttl!r}")
        if not (math.isfinite(revoke_timeout) and revoke_timeout > 0):
            raise ValueError(f"revoke_timeout must be positive and finite, not {revoke_timeout!r}")
        if isinstance(backoff, Iterator):
            raise TypeError(
                "backoff must be re-iterable (a list or a backoff policy), not an iterator"
            )
        self._store = store
        self.instance = instance
        self.ttl = float(ttl)
        self._health = health
        self.prefix = prefix
        self._key = instance_key(instance.service, instance.instance_id, prefix)
        self._backoff: Iterable[float] = (
            FullJitterBackoff(base=0.1, factor=2.0, cap=self.ttl / 3)
            if backoff is None
            else backoff
        )
        self.revoke_timeout = float(revoke_timeout)
        self._lease: int | None = None
        self._running = False
        self._state_changed = trio.Event()
        #: Where it stands now.
        self.state = RegistrationState.UNREGISTERED
        #: Since when (``trio.current_time()``) the store has been unreachable, or ``None``.
        self.outage: float | None = None
        #: How many leases it has been granted (1 after the first registration).
        self.registrations = 0

    def __repr__(self) -> str:
        return f"<Registration {self._key!r} {self.state.value}, lease {self._lease}>"

    @property
    def key(self) -> str:
        """The instance's key in the store."""
        return self._key

    @property
    def lease(self) -> int | None:
        """The lease it holds now, or ``None``."""
        return self._lease

    @property
    def renew_interval(self) -> float:
        """Seconds between renewals: a third of the TTL."""
        return self.ttl / 3

    async def wait_state(self, *states: RegistrationState) -> RegistrationState:
        """Sleep until :attr:`state` is one of ``states``; return it."""
        if not states:
            raise ValueError("wait_state needs at least one state")
        await trio.lowlevel.checkpoint()
        while self.state not in states:
            await self._state_changed.wait()
        return self.state

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Register, renew, follow health and retry outages until cancelled; then revoke.

        Reports started once the first attempt has ended (registered,
        withdrawn because unhealthy, or the store unreachable).
        """
        if self._running:
            raise RuntimeError("this Registration is already running")
        self._running = True
        started = False

        def report_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        delays = iter(self._backoff)
        try:
            while True:
                try:
                    if self._health is not None and self._status() is HealthStatus.NOT_SERVING:
                        await self._withdraw()
                        report_started()
                        await self._health.wait_status(*_HEALTHY)
                    published = await self._register()
                    self._outage_over()
                    delays = iter(self._backoff)
                    report_started()
                    await self._renew_while_healthy(published)
                except STORE_FAILURES as exc:
                    self._outage_began(exc)
                    report_started()
                    await trio.sleep(next(delays, self.renew_interval))
        finally:
            self._running = False
            lease, self._lease = self._lease, None
            if lease is not None:
                with trio.move_on_after(self.revoke_timeout) as scope:
                    scope.shield = True
                    try:
                        await self._store.revoke(lease)
                        logger.info("%s withdrawn: stopping", self._key)
                    except STORE_FAILURES:
                        logger.warning("%s: not withdrawn; it runs out by itself", self._key)
                if scope.cancelled_caught:
                    logger.warning("%s: the revoke took too long; it runs out by itself", self._key)
            self._set_state(RegistrationState.STOPPED)

    # -- the steps -------------------------------------------------------------------

    def _status(self) -> HealthStatus:
        return self.instance.health if self._health is None else self._health.status

    def _record(self, status: HealthStatus) -> bytes:
        instance = self.instance
        if instance.health is not status:
            instance = Instance(
                instance.service, instance.instance_id, instance.address, status, instance.metadata
            )
        return instance.encode()

    async def _register(self) -> HealthStatus:
        """Put the record under the lease it holds if that still lives, else under a new one;
        the health the record says (it may have changed while the store answered)."""
        status = self._status()
        if self._lease is not None and await self._store.keepalive(self._lease) is None:
            logger.info("%s: lease %d is gone; registering again", self._key, self._lease)
            self._lease = None
        if self._lease is None:
            self._lease = await self._store.grant(self.ttl)
            self.registrations += 1
        try:
            await self._store.put(self._key, self._record(status), lease=self._lease)
        except ValueError:  # the lease ran out between the grant and the put
            self._lease = None
            raise StoreUnavailable("the lease ran out before the record was put") from None
        logger.info("%s registered (%s, ttl %g s)", self._key, status, self.ttl)
        self._set_state(RegistrationState.REGISTERED)
        return status

    async def _renew_while_healthy(self, published: HealthStatus) -> None:
        """Renew every TTL/3 and rewrite the record when the health changes; return when the
        lease is gone (register again) or after a withdrawal (NOT_SERVING)."""
        next_renewal = trio.current_time() + self.renew_interval
        while True:
            status = published
            with trio.move_on_at(next_renewal):
                if self._health is not None:
                    status = await self._health.wait_status(
                        *(other for other in HealthStatus if other is not published)
                    )
                else:
                    await trio.sleep_forever()
            assert self._lease is not None
            if status is HealthStatus.NOT_SERVING:
                await self._withdraw()
                return
            if status is not published:
                await self._store.put(self._key, self._record(status), lease=self._lease)
                logger.info("%s health %s -> %s", self._key, published, status)
                published = status
                continue
            if await self._store.keepalive(self._lease) is None:
                logger.warning("%s: lease %d ran out; registering again", self._key, self._lease)
                self._lease = None
                self._set_state(RegistrationState.UNREGISTERED)
                return
            next_renewal = trio.current_time() + self.renew_interval

    async def _withdraw(self) -> None:
        lease = self._lease
        if lease is not None:
            # The lease is forgotten only once revoked: cancelled on the way (the
            # process stopping), run's own revoke, shielded, tries again.
            try:
                await self._store.revoke(lease)
            except STORE_FAILURES:
                logger.warning(
                    "%s: could not revoke lease %d; it runs out by itself", self._key, lease
                )
            self._lease = None
            logger.info("%s withdrawn: NOT_SERVING", self._key)
        self._set_state(RegistrationState.WITHDRAWN)

    def _outage_began(self, exc: Exception) -> None:
        if self.outage is None:
            self.outage = trio.current_time()
            logger.warning("%s: the store is unreachable (%s); retrying", self._key, exc)
        self._set_state(RegistrationState.OUTAGE)

    def _outage_over(self) -> None:
        if self.outage is not None:
            logger.info(
                "%s: the store is back after %.1f s", self._key, trio.current_time() - self.outage
            )
            self.outage = None

    def _set_state(self, state: RegistrationState) -> None:
        if state is not self.state:
            self.state = state
            self._state_changed.set()
            self._state_changed = trio.Event()


@asynccontextmanager
async def open_registration(
    store: KeyValueStore,
    instance: Instance,
    *,
    ttl: float = 10.0,
    health: HealthMonitor | None = None,
    prefix: str = DEFAULT_REGISTRY_PREFIX,
    backoff: Iterable[float] | None = None,
    revoke_timeout: float = 2.0,
) -> AsyncIterator[Registration]:
    """Run a :class:`Registration` beside the block; it is withdrawn when the block ends.

    The block starts once the first attempt has ended: registered, withdrawn
    (the process is NOT_SERVING) or in an outage (:attr:`Registration.state`).
    """
    registration = Registration(
        store,
        instance,
        ttl=ttl,
        health=health,
        prefix=prefix,
        backoff=backoff,
        revoke_timeout=revoke_timeout,
    )
    async with open_background() as nursery:
        await nursery.start(registration.run)
        yield registration
