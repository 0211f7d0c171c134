"""Helpers for the registry's tests: a store that can be taken down or frozen, and call records.

:class:`FaultyStore` wraps any :class:`~trio_heartbeat.KeyValueStore` and,
while ``down``, answers every call with :exc:`StoreUnavailable` (an etcd that
cannot be reached); while ``frozen``, every call blocks until it is thawed (the
caller's process hung: nothing it sends arrives); with ``put_delay``, each
put takes that long first. It records each call it passes on, with the time,
so a test can assert when renewals happened.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

import trio

from trio_heartbeat._errors import StoreUnavailable
from trio_heartbeat._kv import KeyValueStore
from trio_heartbeat._leases import Change, Entry


class FaultyStore:
    """A store that can be down (every call fails) or frozen (every call waits)."""

    def __init__(self, store: KeyValueStore) -> None:
        self.store = store
        self.down = False
        self._thawed = trio.Event()
        self._thawed.set()
        #: (time, operation, first argument) of every call passed on.
        self.calls: list[tuple[float, str, object]] = []
        #: When each call was tried while the store was down (and refused).
        self.refused: list[float] = []
        #: How long each put takes before it reaches the store (a store far away).
        self.put_delay = 0.0

    @property
    def frozen(self) -> bool:
        return not self._thawed.is_set()

    def freeze(self) -> None:
        if not self.frozen:
            self._thawed = trio.Event()

    def thaw(self) -> None:
        self._thawed.set()

    async def _enter(self, operation: str, argument: object) -> None:
        await self._thawed.wait()
        if self.down:
            self.refused.append(trio.current_time())
            await trio.lowlevel.checkpoint()
            raise StoreUnavailable("the store is down (test)", "test:1")
        self.calls.append((trio.current_time(), operation, argument))

    def times(self, operation: str) -> list[float]:
        return [time for time, name, _ in self.calls if name == operation]

    async def grant(self, ttl: float) -> int:
        await self._enter("grant", ttl)
        return await self.store.grant(ttl)

    async def keepalive(self, lease: int) -> float | None:
        await self._enter("keepalive", lease)
        return await self.store.keepalive(lease)

    async def revoke(self, lease: int) -> None:
        await self._enter("revoke", lease)
        await self.store.revoke(lease)

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        if self.put_delay:
            await trio.sleep(self.put_delay)
        await self._enter("put", value)
        return await self.store.put(key, value, lease=lease)

    async def delete(self, key: str) -> None:
        await self._enter("delete", key)
        await self.store.delete(key)

    async def range(self, prefix: str = "") -> tuple[list[Entry], int]:
        await self._enter("range", prefix)
        return await self.store.range(prefix)

    async def watch(self, prefix: str, after: int) -> AsyncGenerator[tuple[Change, ...], None]:
        await self._enter("watch", after)
        async with aclosing(self.store.watch(prefix, after)) as batches:
            async for batch in batches:
                await self._enter("watched", batch)
                yield batch


def assert_full_jitter(outages: list[list[float]]) -> None:
    """The delays between the retries of each outage (from the first, numbered 0) are
    the registry's default backoff with a TTL of 3 s: each at most min(1 s, 0.1 s * 2**n),
    and the capped ones spread over the whole range from 0 to 1 s. Random: a policy with
    another base, factor or cap fails this all but surely over twenty outages."""
    for delays in outages:
        for n, delay in enumerate(delays):
            assert 0.0 <= delay <= min(1.0, 0.1 * 2**n) + 1e-9, (n, delays)
    capped = [delay for delays in outages for delay in delays[4:]]
    assert len(capped) >= 200
    assert min(capped) < 0.1
    assert max(capped) > 0.9
