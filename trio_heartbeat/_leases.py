"""Leased keys with revisions: the store behind the embedded service registry (sans-IO).

Theory of operation
-------------------
A service registry needs three things from its store, and etcd v3 has them:
keys that vanish by themselves when their owner stops renewing them, a
number that orders every change, and a way for a watcher to catch up from
where it left off. :class:`LeaseStore` is that model in miniature, with
etcd's words, so that the embedded registry and the etcd one behave alike:

* a **lease** is granted for ``ttl`` seconds (at least ``min_ttl``) and lives
  until ``now`` reaches its deadline; :meth:`~LeaseStore.keepalive` moves the
  deadline to ``now + ttl`` and answers the TTL, or ``None`` once the lease is
  gone (as etcd answers a keepalive without a TTL): the owner must register
  again;
* a **key** holds a value and, optionally, a lease; when the lease is revoked
  or expires, its keys are deleted with it;
* every operation that changes something takes the next **revision** (the
  store starts at 1, as etcd does); an operation that changes several keys
  (a lease that expires with its keys) is one revision with one
  :class:`Change` per key. :meth:`~LeaseStore.changes` gives every change
  after a revision, from a bounded history: a watcher that fell further
  behind gets ``None`` (the history was compacted) and must read the range
  again, exactly as an etcd watch after a compaction.

Time always comes in as ``now`` and must not go back; nothing here reads a
clock. Expiry is lazy: :meth:`~LeaseStore.expire` deletes what is due and
:meth:`~LeaseStore.next_expiry` says when to call it next (a heap of
deadlines, O(log n) per lease renewed). Everything a caller can grow is
bounded: keys, the size of a key and of a value, leases, the history.

>>> store = LeaseStore()
>>> lease = store.grant(3.0, now=0.0)
>>> store.put("services/echo/a", b"127.0.0.1:7400", lease=lease).revision
2
>>> store.keepalive(lease, now=2.0)
3.0
>>> [change.kind.name for change in store.expire(now=5.0)]
['DELETE']
>>> store.keepalive(lease, now=5.0) is None
True
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Final, final

__all__ = [
    "MAX_KEY_LENGTH",
    "Change",
    "ChangeKind",
    "Entry",
    "LeaseStore",
]

#: The longest key, in characters.
MAX_KEY_LENGTH: Final = 1024


class ChangeKind(Enum):
    """What happened to a key."""

    PUT = "put"
    DELETE = "delete"


@final
@dataclass(frozen=True, slots=True)
class Entry:
    """A key as the store holds it."""

    key: str
    value: bytes
    #: The lease it goes with, or ``None`` if it stays until deleted.
    lease: int | None
    #: The revision that created it, and the one that last changed it.
    create_revision: int
    mod_revision: int


@final
@dataclass(frozen=True, slots=True)
class Change:
    """One key changed at ``revision``: put (with its new value) or deleted (value ``b""``)."""

    kind: ChangeKind
    key: str
    value: bytes
    revision: int


@final
class _Lease:
    __slots__ = ("deadline", "keys", "ttl")

    def __init__(self, ttl: float, deadline: float) -> None:
        self.ttl = ttl
        self.deadline = deadline
        self.keys: dict[str, None] = {}


@final
class LeaseStore:
    """Keys, leases and revisions, as etcd v3 keeps them (see the module docstring).

    ``min_ttl`` is the shortest lease granted (etcd's is a few seconds);
    ``max_keys``, ``max_leases``, ``max_value_bytes`` and ``history`` bound
    what callers can make it hold. Refusals are :exc:`ValueError`.
    """

    def __init__(
        self,
        *,
        min_ttl: float = 1.0,
        max_keys: int = 10_000,
        max_leases: int = 10_000,
        max_value_bytes: int = 65_536,
        history: int = 1_000,
    ) -> None:
        if not (0 < min_ttl < math.inf):
            raise ValueError(f"min_ttl must be positive seconds, not {min_ttl!r}")
        for name, value in (
            ("max_keys", max_keys),
            ("max_leases", max_leases),
            ("max_value_bytes", max_value_bytes),
            ("history", history),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value!r}")
        self.min_ttl = min_ttl
        self.max_keys = max_keys
        self.max_leases = max_leases
        self.max_value_bytes = max_value_bytes
        self._entries: dict[str, Entry] = {}
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 1
        self._deadlines: list[tuple[float, int]] = []  # lazy: checked against the lease
        self._revision = 1
        self._history: deque[Change] = deque(maxlen=history)
        self._dropped_through = 0  # the newest revision with a change no longer kept
        self._last_now = -math.inf

    def __repr__(self) -> str:
        return (
            f"<LeaseStore revision {self._revision}, {len(self._entries)} key(s), "
            f"{len(self._leases)} lease(s)>"
        )

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def revision(self) -> int:
        """The revision of the last change (1 before any)."""
        return self._revision

    # -- leases ------------------------------------------------------------------------

    def grant(self, ttl: float, now: float) -> int:
        """A new lease that lives ``ttl`` seconds from ``now`` unless kept alive."""
        self._clock(now)
        if not (self.min_ttl <= ttl < math.inf):
            raise ValueError(f"ttl must be from {self.min_ttl!r} s and finite, not {ttl!r}")
        if len(self._leases) >= self.max_leases:
            raise ValueError(f"at most {self.max_leases} leases")
        lease, self._next_lease = self._next_lease, self._next_lease + 1
        self._leases[lease] = _Lease(ttl, now + ttl)
        heapq.heappush(self._deadlines, (now + ttl, lease))
        return lease

    def keepalive(self, lease: int, now: float) -> float | None:
        """Renew ``lease`` for its whole TTL from ``now``; its TTL, or ``None`` if it is gone.

        A lease whose deadline has come is gone even if :meth:`expire` has
        not deleted it yet.
        """
        self._clock(now)
        held = self._leases.get(lease)
        if held is None or held.deadline <= now:
            return None
        held.deadline = now + held.ttl
        heapq.heappush(self._deadlines, (held.deadline, lease))
        return held.ttl

    def time_to_live(self, lease: int, now: float) -> float | None:
        """Seconds ``lease`` has left at ``now``, or ``None`` if it is gone."""
        self._clock(now)
        held = self._leases.get(lease)
        if held is None or held.deadline <= now:
            return None
        return held.deadline - now

    def revoke(self, lease: int) -> tuple[Change, ...]:
        """End ``lease`` now, deleting its keys (one revision); nothing if it is gone."""
        held = self._leases.pop(lease, None)
        if held is None:
            return ()
        return self._delete_keys(list(held.keys))

    def expire(self, now: float) -> tuple[Change, ...]:
        """Revoke every lease whose deadline is ``now`` or earlier; the keys deleted."""
        self._clock(now)
        changes: list[Change] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, lease = heapq.heappop(self._deadlines)
            held = self._leases.get(lease)
            if held is not None and held.deadline == deadline:
                changes += self.revoke(lease)
        return tuple(changes)

    def next_expiry(self) -> float | None:
        """When the next lease runs out (call :meth:`expire` then), or ``None``."""
        while self._deadlines:
            deadline, lease = self._deadlines[0]
            held = self._leases.get(lease)
            if held is not None and held.deadline == deadline:
                return deadline
            heapq.heappop(self._deadlines)  # renewed or revoked since: stale
        return None

    # -- keys --------------------------------------------------------------------------

    def put(self, key: str, value: bytes, *, lease: int | None = None) -> Change:
        """Set ``key`` to ``value``, with ``lease`` (or none); the change, at a new revision."""
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
            raise ValueError(f"a key is a str of 1 to {MAX_KEY_LENGTH} characters, not {key!r}")
        if not isinstance(value, bytes) or len(value) > self.max_value_bytes:
            raise ValueError(f"a value is at most {self.max_value_bytes} bytes")
        held = None if lease is None else self._leases.get(lease)
        if lease is not None and held is None:
            raise ValueError(f"lease {lease} not found")
        before = self._entries.get(key)
        if before is None and len(self._entries) >= self.max_keys:
            raise ValueError(f"at most {self.max_keys} keys")
        if before is not None and before.lease is not None and before.lease != lease:
            self._leases[before.lease].keys.pop(key, None)
        if held is not None:
            held.keys[key] = None
        self._revision += 1
        created = self._revision if before is None else before.create_revision
        self._entries[key] = Entry(key, value, lease, created, self._revision)
        change = Change(ChangeKind.PUT, key, value, self._revision)
        self._remember(change)
        return change

    def delete(self, key: str) -> Change | None:
        """Delete ``key``; the change, or ``None`` if there was no such key."""
        if key not in self._entries:
            return None
        (change,) = self._delete_keys([key])
        return change

    def get(self, key: str) -> Entry | None:
        """The entry of ``key``, if any."""
        return self._entries.get(key)

    def range(self, prefix: str = "") -> list[Entry]:
        """Every entry whose key starts with ``prefix``, in key order."""
        return sorted(
            (entry for key, entry in self._entries.items() if key.startswith(prefix)),
            key=lambda entry: entry.key,
        )

    def changes(self, after: int) -> tuple[Change, ...] | None:
        """Every change at a revision later than ``after``, oldest first.

        ``None`` if some of them are no longer in the history: read the range
        again (its revision is :attr:`revision`) and go on from there.
        """
        if after >= self._revision:
            return ()
        if after < self._dropped_through:
            return None
        return tuple(change for change in self._history if change.revision > after)

    # -- helpers -----------------------------------------------------------------------

    def _delete_keys(self, keys: list[str]) -> tuple[Change, ...]:
        if not keys:
            return ()
        self._revision += 1
        changes = []
        for key in keys:
            entry = self._entries.pop(key)
            if entry.lease is not None and entry.lease in self._leases:
                self._leases[entry.lease].keys.pop(key, None)
            changes.append(Change(ChangeKind.DELETE, key, b"", self._revision))
        for change in changes:
            self._remember(change)
        return tuple(changes)

    def _remember(self, change: Change) -> None:
        history = self._history
        if len(history) == history.maxlen:
            self._dropped_through = history[0].revision
        history.append(change)

    def _clock(self, now: float) -> None:
        if not (-math.inf < now < math.inf):
            raise ValueError(f"now must be a finite time, not {now!r}")
        if now < self._last_now:
            raise ValueError(f"time went back: now={now!r} after {self._last_now!r}")
        self._last_now = now
