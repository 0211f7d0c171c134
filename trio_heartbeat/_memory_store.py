"""The embedded key-value store: leased keys, revisions and watches in this process (Trio).

Theory of operation
-------------------
The service registry keeps its records in a store that speaks etcd v3's
language: leases granted for a TTL and kept alive, keys put with a lease,
ranges read at a revision, watches that resume from a revision. For a fleet
that store is etcd; for one process it is :class:`MemoryStore`, the same
operations over the sans-IO :class:`~trio_heartbeat._leases.LeaseStore`, so
that the registry above does not know which it talks to.

:func:`open_memory_store` runs one task beside the block: it sleeps until the
next lease runs out (``trio.current_time()``, so virtual time in tests) and
expires it at exactly that instant, its keys with it; a grant or a keepalive
wakes it to look again. Every change (a put, a delete, a revoke, an expiry)
sets the store's *changed* event, which is all a watcher waits on: a watch
holds no queue of its own, it reads :meth:`LeaseStore.changes` after the last
revision it gave out. So a watcher that is slow costs nothing but its place
in the store's bounded history, and one that fell behind it gets
:exc:`WatchCompacted` (read the range again, and watch from its revision),
exactly as an etcd watch after a compaction.

>>> async def main() -> None:  # doctest: +SKIP
...     async with open_memory_store() as store:
...         lease = await store.grant(3.0)
...         await store.put("services/echo/a", b"127.0.0.1:7400", lease=lease)
...         entries, revision = await store.range("services/echo/")
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn, final

import trio

from ._errors import WatchCompacted
from ._groups import open_background
from ._leases import Change, Entry, LeaseStore

__all__ = ["MemoryStore", "open_memory_store"]


@final
class MemoryStore:
    """Leases, keys and watches in this process; get one from :func:`open_memory_store`.

    The operations are async, as etcd's are, though none of them waits here
    but :meth:`watch`; each is a checkpoint.
    """

    def __init__(self, leases: LeaseStore) -> None:
        self._leases = leases
        self._changed = trio.Event()  # set at every change, then replaced
        self._rearm = trio.Event()  # a lease's deadline moved: the timer looks again

    def __repr__(self) -> str:
        return f"<MemoryStore {self._leases!r}>"

    @property
    def revision(self) -> int:
        """The revision of the last change."""
        return self._leases.revision

    async def grant(self, ttl: float) -> int:
        """A lease of ``ttl`` seconds from now."""
        await trio.lowlevel.checkpoint()
        lease = self._leases.grant(ttl, trio.current_time())
        self._rearm.set()
        return lease

    async def keepalive(self, lease: int) -> float | None:
        """Renew ``lease`` for its TTL: the TTL, or ``None`` if it is gone (register again)."""
        await trio.lowlevel.checkpoint()
        ttl = self._leases.keepalive(lease, trio.current_time())
        self._rearm.set()
        return ttl

    async def time_to_live(self, lease: int) -> float | None:
        """Seconds ``lease`` has left, or ``None`` if it is gone."""
        await trio.lowlevel.checkpoint()
        return self._leases.time_to_live(lease, trio.current_time())

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now, and delete its keys."""
        await trio.lowlevel.checkpoint()
        self._report(self._leases.revoke(lease))

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Set ``key``; the revision of the change (:exc:`ValueError` for a lease that is gone)."""
        await trio.lowlevel.checkpoint()
        if lease is not None and self._leases.time_to_live(lease, trio.current_time()) is None:
            raise ValueError(f"lease {lease} not found")
        change = self._leases.put(key, value, lease=lease)
        self._report((change,))
        return change.revision

    async def delete(self, key: str) -> None:
        """Delete ``key``, if there is one."""
        await trio.lowlevel.checkpoint()
        change = self._leases.delete(key)
        self._report(() if change is None else (change,))

    async def range(self, prefix: str = "") -> tuple[list[Entry], int]:
        """Every entry under ``prefix`` in key order, and the revision they were read at."""
        await trio.lowlevel.checkpoint()
        return self._leases.range(prefix), self._leases.revision

    async def watch(self, prefix: str, after: int) -> AsyncGenerator[tuple[Change, ...], None]:
        """Every change under ``prefix`` after revision ``after``, oldest first, in batches:
        each batch is what happened since the last one (as an etcd watch response may hold
        several revisions).

        Raises :exc:`WatchCompacted` once the changes it still owes are no
        longer kept. Runs until cancelled.
        """
        while True:
            changed = self._changed
            changes = self._leases.changes(after)
            if changes is None:
                raise WatchCompacted(after)
            if changes:
                after = changes[-1].revision
                ours = tuple(change for change in changes if change.key.startswith(prefix))
                if ours:
                    yield ours
                    continue
            await changed.wait()

    # -- the expiry timer --------------------------------------------------------------

    async def _expire_forever(self) -> NoReturn:
        while True:
            self._rearm = trio.Event()
            self._report(self._leases.expire(trio.current_time()))
            deadline = self._leases.next_expiry()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._rearm.wait()

    def _report(self, changes: tuple[Change, ...]) -> None:
        if changes:
            self._changed.set()
            self._changed = trio.Event()


@asynccontextmanager
async def open_memory_store(
    *,
    min_ttl: float = 1.0,
    max_keys: int = 10_000,
    max_leases: int = 10_000,
    history: int = 1_000,
) -> AsyncIterator[MemoryStore]:
    """A :class:`MemoryStore` whose leases expire on time while the block runs.

    The bounds are :class:`~trio_heartbeat._leases.LeaseStore`'s.
    """
    leases = LeaseStore(min_ttl=min_ttl, max_keys=max_keys, max_leases=max_leases, history=history)
    store = MemoryStore(leases)
    async with open_background() as nursery:
        nursery.start_soon(store._expire_forever, name="trio_heartbeat memory store expiry")
        yield store
