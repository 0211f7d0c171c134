"""Publishing a server's liveness registry through the service registry: its peers, discoverable.

Theory of operation
-------------------
A heartbeat server already knows, better than any registry could, which of
its peers are alive: each one's connection is watched by its reader, and a
silent peer is gone from the :class:`~trio_heartbeat.LivenessRegistry` at the
instant it is convicted. :func:`publish_peers` makes that knowledge the
fleet's: every connected peer that said who it is (a non-empty instance id in
its HELLO, usable as a name) becomes one :class:`~trio_heartbeat.Instance` of
``service`` in a :class:`~trio_heartbeat.KeyValueStore`, with its address,
the health it reports, and its liveness (``ALIVE`` or ``SUSPECT``) as
metadata. Other processes follow them with
:func:`~trio_heartbeat.open_discovery`, as they would any service.

All the records hang on one lease of the publisher's, renewed every
``ttl / 3``: a peer that leaves is deleted at once, and if the server itself
dies or hangs, every record it published goes with its lease, within the
TTL. The publisher wakes at each change of the registry, waits
``min_interval`` for the rest of a burst, and writes only the differences,
so a thousand peers arriving together cost a thousand puts, not a million.
A store that fails (:data:`~trio_heartbeat._kv.STORE_FAILURES`) is retried
with backoff; a lease found gone is granted again and everything written
anew. Leaving revokes the lease (bounded by ``revoke_timeout``), which
deletes every record in one step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from typing import NoReturn

import trio

from ._backoff import FullJitterBackoff
from ._frames import HealthStatus
from ._groups import open_background
from ._instances import DEFAULT_REGISTRY_PREFIX, Instance, instance_key, service_prefix
from ._kv import STORE_FAILURES, KeyValueStore
from ._registry import LivenessRegistry

__all__ = ["publish_peers"]

logger = logging.getLogger("trio_heartbeat.registry")


def peer_records(
    registry: LivenessRegistry, service: str, prefix: str = DEFAULT_REGISTRY_PREFIX
) -> dict[str, bytes]:
    """The records the registry's peers make now, by key: those with an id and an address
    that are usable as an instance (the others are left out)."""
    records: dict[str, bytes] = {}
    for conn in registry.connections():
        peer_id, address = conn.peer_id, conn.remote_address
        if not peer_id or not address:
            continue
        health = conn.peer_health
        liveness = conn.liveness.value
        try:
            instance = Instance(
                service,
                peer_id,
                address,
                HealthStatus.SERVING if health is None else health,
                {"liveness": liveness},
            )
        except (TypeError, ValueError):
            continue  # an id no key can carry ("a/b", spaces): not discoverable
        records[instance_key(service, peer_id, prefix)] = instance.encode()
    return records


async def publish_peers(
    registry: LivenessRegistry,
    store: KeyValueStore,
    service: str,
    *,
    ttl: float = 10.0,
    prefix: str = DEFAULT_REGISTRY_PREFIX,
    min_interval: float = 0.1,
    backoff: Iterable[float] | None = None,
    revoke_timeout: float = 2.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Keep ``registry``'s peers published as instances of ``service`` in ``store``, until
    cancelled; then withdraw them all (one revoke).

    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with trio.open_nursery() as nursery, open_memory_store() as store:
    ...         server = await nursery.start(serve_tcp, handler, 7400)
    ...         nursery.start_soon(publish_peers, server.registry, store, "workers")

    Reports started once the first publication has ended, written or failed.
    ``ttl`` is at least 1 s; ``backoff`` paces the retries (by default full
    jitter from 0.1 s doubling to ``ttl / 3``).
    """
    service_prefix(service, prefix)  # a name that cannot be a key fails now
    if not (math.isfinite(ttl) and ttl >= 1.0):
        raise ValueError(f"ttl must be at least 1 s and finite, not {ttl!r}")
    if not (math.isfinite(min_interval) and min_interval >= 0):
        raise ValueError(f"min_interval must be 0 or more and finite, not {min_interval!r}")
    if not (math.isfinite(revoke_timeout) and revoke_timeout > 0):
        raise ValueError(f"revoke_timeout must be positive and finite, not {revoke_timeout!r}")
    if isinstance(backoff, Iterator):
        raise TypeError("backoff must be re-iterable (a list or a backoff policy), not an iterator")
    policy = FullJitterBackoff(base=0.1, factor=2.0, cap=ttl / 3) if backoff is None else backoff
    publisher = _Publisher(registry, store, service, prefix, ttl, min_interval)
    started = False
    delays = iter(policy)
    try:
        while True:
            try:
                await publisher.lease_held()
                await publisher.write()
                delays = iter(policy)
                if not started:
                    started = True
                    task_status.started()
                await publisher.follow()
            except STORE_FAILURES as exc:
                logger.warning("%s: publishing peers failed (%s); retrying", service, exc)
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(next(delays, ttl / 3))
    finally:
        await publisher.revoke(revoke_timeout)


class _Publisher:
    """One publication: the lease, and what was written under it."""

    def __init__(
        self,
        registry: LivenessRegistry,
        store: KeyValueStore,
        service: str,
        prefix: str,
        ttl: float,
        min_interval: float,
    ) -> None:
        self.registry = registry
        self.store = store
        self.service = service
        self.prefix = prefix
        self.ttl = ttl
        self.min_interval = min_interval
        self.lease: int | None = None
        #: What the store holds under the lease, by key (``None``: a request under way).
        self.written: dict[str, bytes | None] = {}
        self.version = -1  # the registry's version that was written
        self.renew_at = math.inf

    async def lease_held(self) -> None:
        """A lease that lives: the one held if it still does, else a new one (and then
        everything is to be written again)."""
        if self.lease is not None and await self.store.keepalive(self.lease) is None:
            logger.warning("%s: the peers' lease ran out; publishing them again", self.service)
            self.lease = None
        if self.lease is None:
            self.written.clear()
            self.lease = await self.store.grant(self.ttl)
        self.renew_at = trio.current_time() + self.ttl / 3

    async def write(self) -> None:
        """Put what changed and delete who left. A key is marked unsure (``None``) before
        its request goes out and written only once answered: a put or delete cut short
        (cancelled, failed) is done again at the next write, never forgotten."""
        assert self.lease is not None
        self.version = self.registry.version  # a change from now on is written again
        wanted = peer_records(self.registry, self.service, self.prefix)
        for key in [key for key in self.written if key not in wanted]:
            self.written[key] = None
            await self.store.delete(key)
            del self.written[key]
        for key, value in wanted.items():
            if self.written.get(key) != value:
                self.written[key] = None
                await self.store.put(key, value, lease=self.lease)
                self.written[key] = value

    async def follow(self) -> None:
        """Write at each change (a burst at a time) and renew on time, each in a task of
        its own, so that neither holds up or cuts short the other; return when the lease
        is gone."""
        async with open_background() as nursery:
            nursery.start_soon(self._write_at_each_change)
            while True:
                await trio.sleep_until(self.renew_at)
                assert self.lease is not None
                if await self.store.keepalive(self.lease) is None:
                    logger.warning(
                        "%s: the peers' lease ran out; publishing them again", self.service
                    )
                    self.lease = None
                    return  # the writer is cancelled with the block
                self.renew_at = trio.current_time() + self.ttl / 3

    async def _write_at_each_change(self) -> NoReturn:
        while True:
            if self.registry.version == self.version:  # no change since: wait for one
                await self.registry.wait_changed()
            await trio.sleep(self.min_interval)
            await self.write()

    async def revoke(self, within: float) -> None:
        lease, self.lease = self.lease, None
        if lease is None:
            return
        with trio.move_on_after(within) as scope:
            scope.shield = True
            try:
                await self.store.revoke(lease)
            except STORE_FAILURES as exc:
                logger.warning("%s: peers not withdrawn (%s); they run out", self.service, exc)
        if scope.cancelled_caught:
            logger.warning("%s: the revoke took too long; the peers run out", self.service)
