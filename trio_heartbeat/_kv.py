"""The key-value store the service registry needs, as a protocol both backends satisfy.

Registration and discovery talk to a store with etcd v3's operations: leases
granted for a TTL and kept alive, keys put under a lease, ranges read at a
revision, and watches that resume from a revision. :class:`KeyValueStore`
spells those operations out; the embedded
:class:`~trio_heartbeat._memory_store.MemoryStore` and the etcd client
(:mod:`trio_heartbeat.etcd`) both satisfy it, so the registry above does not
know which one it talks to.

The rules every implementation keeps:

- a lease id is a positive integer; :meth:`KeyValueStore.keepalive` answers the
  TTL it renewed the lease for, or ``None`` once the lease is gone (expired or
  revoked), which means "register again";
- revisions grow by one or more with every change; :meth:`KeyValueStore.range`
  answers the revision it read at, and a watch from that revision hears every
  later change under the prefix, oldest first, or raises
  :exc:`~trio_heartbeat.WatchCompacted` when those changes are no longer kept;
- a store that cannot be reached raises :exc:`~trio_heartbeat.StoreUnavailable`;
  one whose answer it refused to read (over its size bound, malformed) raises
  :exc:`ValueError`, and one whose refusal it did not expect
  :exc:`RuntimeError`. Registration and discovery take each of
  :data:`STORE_FAILURES` as a failure of the store, and retry with backoff: a
  hostile or broken store can make the registry stale, never end it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Final, Protocol

from ._errors import StoreUnavailable
from ._leases import Change, Entry

__all__ = ["STORE_FAILURES", "KeyValueStore"]

#: What the registry takes as a failure of the store (retried with backoff).
STORE_FAILURES: Final = (StoreUnavailable, ValueError, RuntimeError)


class KeyValueStore(Protocol):
    """What registration and discovery need of a store (etcd v3's model)."""

    async def grant(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds from now; its id."""
        ...

    async def keepalive(self, lease: int) -> float | None:
        """Renew ``lease``: the TTL it was renewed for, or ``None`` if it is gone."""
        ...

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now and delete its keys (a lease already gone is no error)."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Set ``key`` (under ``lease``, if given); the revision of the change."""
        ...

    async def delete(self, key: str) -> None:
        """Delete ``key``, if there is one."""
        ...

    async def range(self, prefix: str = "") -> tuple[list[Entry], int]:  # pragma: no mutate
        """Every entry whose key starts with ``prefix``, in key order, and the revision read at."""
        ...

    def watch(self, prefix: str, after: int) -> AsyncGenerator[tuple[Change, ...], None]:
        """Batches of the changes under ``prefix`` after revision ``after``, oldest first
        (an async generator: close it, with :func:`contextlib.aclosing`, when done)."""
        ...
