"""Discovering a service: its live instances, a stream of changes, and endpoints to dial.

Theory of operation
-------------------
:func:`open_discovery` runs one task that follows a service's prefix in a
:class:`~trio_heartbeat.KeyValueStore`: it reads the range, then watches
from the revision it read at, and feeds both to a sans-IO
:class:`~trio_heartbeat._instances.LiveSet`. A watch that fell behind the
store's history (:exc:`~trio_heartbeat.WatchCompacted`) is answered by
reading the range again; the differences come out as events, so nothing is
missed and nothing is told twice.

When the store cannot be reached, discovery keeps the last set it knew and
says it is *stale* (:attr:`Discovery.stale`, and a :class:`DiscoveryStale`
event), retries with backoff, and catches up with one fresh range read when
the store is back (a :class:`DiscoveryFresh` event, and the differences). A
watch on a quiet prefix hears nothing from a store that froze, so a second
task reads the range every ``check_interval`` seconds while watching, and a
read that fails ends the watch.

Readers never get a queue of their own: :meth:`Discovery.changes` reads a
bounded history of events by sequence number, and one that fell more than
``history`` events behind is told the difference between what it last knew
and the live set instead, so a slow reader costs a copy of the set at most.
:meth:`Discovery.endpoints` is an :data:`~trio_heartbeat.EndpointSource` for
:func:`~trio_heartbeat.open_reconnecting_client`: each endpoint it gives is
read from the live set at that moment (SERVING instances first, DEGRADED ones
only when no instance is SERVING), so a client never dials an instance the
registry has dropped, and it waits while the set is empty.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn, TypeAlias, final

import trio

from ._backoff import FullJitterBackoff
from ._errors import WatchCompacted
from ._frames import HealthStatus
from ._groups import open_background
from ._instances import (
    DEFAULT_REGISTRY_PREFIX,
    DiscoveryEvent,
    Instance,
    InstanceAdded,
    InstanceChanged,
    InstanceRemoved,
    LiveSet,
    service_prefix,
)
from ._kv import STORE_FAILURES, KeyValueStore

__all__ = [
    "Discovery",
    "DiscoveryFresh",
    "DiscoveryNotice",
    "DiscoveryStale",
    "open_discovery",
]

logger = logging.getLogger("trio_heartbeat.registry")


@final
@dataclass(frozen=True, slots=True)
class DiscoveryStale:
    """The store cannot be reached: the live set is the last one known, as of ``since``."""

    reason: str
    since: float


@final
@dataclass(frozen=True, slots=True)
class DiscoveryFresh:
    """The store answers again (or for the first time after a failed start)."""

    revision: int
    stale_for: float


#: Everything :meth:`Discovery.changes` can yield.
DiscoveryNotice: TypeAlias = DiscoveryEvent | DiscoveryStale | DiscoveryFresh


@final
class Discovery:
    """The live instances of one service, kept current; get one from :func:`open_discovery`."""

    __slots__ = (
        "__weakref__",
        "_backoff",
        "_changed",
        "_check_interval",
        "_closed",
        "_delivered",
        "_history",
        "_live",
        "_prefix",
        "_sequence",
        "_store",
        "_watch_error",
        "_watch_scope",
        "service",
        "stale_reason",
        "stale_since",
    )

    def __init__(
        self,
        store: KeyValueStore,
        service: str,
        *,
        prefix: str,
        backoff: Iterable[float],
        check_interval: float,
        history: int,
    ) -> None:
        self._store = store
        self.service = service
        self._prefix = service_prefix(service, prefix)
        self._live = LiveSet(service, prefix)
        self._backoff = backoff
        self._check_interval = check_interval
        self._history: deque[tuple[int, DiscoveryNotice]] = deque(maxlen=history)
        self._sequence = 0  # notices published so far
        self._changed = trio.Event()
        self._watch_scope: trio.CancelScope | None = None
        self._watch_error: Exception | None = None
        self._closed = False  # the block has ended: readers and waiters are let go
        self._delivered = False  # the last watch gave at least one batch
        #: Since when the set has been stale (``trio.current_time()``), or ``None``.
        self.stale_since: float | None = None
        #: Why it is stale, or ``""``.
        self.stale_reason = ""

    def __repr__(self) -> str:
        stale = ", stale" if self.stale else ""
        return f"<Discovery {self.service!r}: {len(self._live)} live{stale}>"

    @property
    def instances(self) -> dict[str, Instance]:
        """The live instances by id, in id order (a copy)."""
        return self._live.instances

    @property
    def revision(self) -> int:
        """The store revision the set is current at."""
        return self._live.revision

    @property
    def stale(self) -> bool:
        """Whether the store is unreachable, so the set may be out of date."""
        return self.stale_since is not None

    @property
    def malformed(self) -> int:
        """How many stored values could not be read as instances (left out)."""
        return self._live.malformed

    async def wait_for(
        self, predicate: Callable[[dict[str, Instance]], object] = bool
    ) -> dict[str, Instance]:
        """Sleep until ``predicate(instances)`` is true (by default: until any instance is
        live); return the instances. :exc:`trio.ClosedResourceError` once the
        discovery's block has ended."""
        await trio.lowlevel.checkpoint()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this discovery has ended")
            if predicate(instances := self.instances):
                return instances
            await self._changed.wait()

    def changes(self, *, initial: bool = False) -> AsyncIterator[DiscoveryNotice]:
        """Every notice from now on, in order; with ``initial``, an :class:`InstanceAdded`
        for each instance live now comes first (at the current revision), and a
        :class:`DiscoveryStale` if the set is stale now. It ends when the
        discovery's block ends."""
        return _Changes(self, initial)

    def endpoints(self, *, start: int | None = None) -> AsyncIterator[str]:
        """An endpoint source for :func:`~trio_heartbeat.open_reconnecting_client`: the
        address of the next live instance in turn, waiting while there is none;
        it ends (the client gives up) when the discovery's block ends.

        Each source starts at a random place in the turn (``start`` fixes it), so
        that many clients starting together do not all dial the same instance.
        """
        return _Rotation(self, random.randrange(1 << 16) if start is None else start)

    # -- following the store ---------------------------------------------------------

    async def _follow(self, *, task_status: trio.TaskStatus[None]) -> NoReturn:
        started = False
        delays = iter(self._backoff)
        compactions = iter(self._backoff)  # paces watches compacted before they gave anything
        while True:
            try:
                try:
                    entries, revision = await self._store.range(self._prefix)
                    self._publish(self._live.reset(entries, revision))
                    self._now_fresh()
                    delays = iter(self._backoff)
                finally:
                    if not started:  # after the first read, whatever it found
                        started = True
                        task_status.started()
                await self._watch()
            except WatchCompacted as exc:
                logger.info("%s: watch compacted (%s); reading again", self._prefix, exc)
                if self._delivered:
                    compactions = iter(self._backoff)
                else:  # compacted at once, again: a store gone wrong; no spinning on it
                    await trio.sleep(next(compactions, self._check_interval))
            except STORE_FAILURES as exc:
                self._now_stale(str(exc))
                await trio.sleep(next(delays, self._check_interval))

    async def _watch(self) -> None:
        self._watch_error = None
        self._delivered = False
        try:
            with trio.CancelScope() as self._watch_scope:
                watch = self._store.watch(self._prefix, self._live.revision)
                async with aclosing(watch) as batches:
                    async for batch in batches:
                        self._delivered = True
                        self._publish(self._live.apply(batch))
        finally:
            self._watch_scope = None
        if self._watch_error is not None:
            raise self._watch_error
        # A watch that ended by itself is followed by a fresh read.

    async def _check_forever(self) -> NoReturn:
        """While a watch runs: every ``check_interval``, make sure the store answers, and that
        its history did not start again (a revision older than ours: a watch from ours
        would hear nothing until the new history caught up)."""
        while True:
            await trio.sleep(self._check_interval)
            scope = self._watch_scope
            if scope is None:
                continue
            before = self._live.revision  # the watch may move past the read meanwhile
            try:
                _, revision = await self._store.range(self._prefix)
            except STORE_FAILURES as exc:
                if scope is self._watch_scope:
                    self._watch_error = exc
                    scope.cancel()
                continue
            if revision < before and scope is self._watch_scope:
                logger.warning(
                    "%s: the store's revision went back from %d to %d (its history started "
                    "again); reading it afresh",
                    self._prefix,
                    before,
                    revision,
                )
                scope.cancel()  # the watch ends; the loop reads the range again

    def _now_stale(self, reason: str) -> None:
        if self.stale_since is None:
            self.stale_since = trio.current_time()
            self.stale_reason = reason
            logger.warning(
                "%s: the store is unreachable (%s); keeping the last set", self._prefix, reason
            )
            self._publish((DiscoveryStale(reason, self.stale_since),))

    def _now_fresh(self) -> None:
        if self.stale_since is not None:
            stale_for = trio.current_time() - self.stale_since
            self.stale_since = None
            self.stale_reason = ""
            logger.info("%s: the store is back after %.1f s", self._prefix, stale_for)
            self._publish((DiscoveryFresh(self._live.revision, stale_for),))

    def _publish(self, notices: Iterable[DiscoveryNotice]) -> None:
        published = False
        for notice in notices:
            self._sequence += 1
            self._history.append((self._sequence, notice))
            published = True
        if published:
            self._changed.set()
            self._changed = trio.Event()


@final
class _Changes:
    """One reader of :meth:`Discovery.changes`: a place in the history, and what it was told."""

    __slots__ = ("_discovery", "_known", "_pending", "_sequence")

    def __init__(self, discovery: Discovery, initial: bool) -> None:
        self._discovery = discovery
        self._sequence = discovery._sequence
        self._known = discovery.instances  # a copy of its own
        self._pending: deque[DiscoveryNotice] = deque()
        if initial:
            revision = discovery.revision
            self._pending.extend(InstanceAdded(i, revision) for i in self._known.values())
            if discovery.stale_since is not None:
                self._pending.append(DiscoveryStale(discovery.stale_reason, discovery.stale_since))

    def __aiter__(self) -> _Changes:
        return self

    async def __anext__(self) -> DiscoveryNotice:
        await trio.lowlevel.checkpoint()
        discovery = self._discovery
        while not self._pending:
            history = discovery._history
            if discovery._sequence > self._sequence:
                oldest = history[0][0]  # not empty: a notice came after this reader's last
                if oldest > self._sequence + 1:
                    self._pending.extend(self._catch_up())
                else:
                    skip = self._sequence + 1 - oldest
                    for _, notice in itertools.islice(history, skip, None):
                        self._pending.append(notice)
                        self._learn(notice)
                self._sequence = discovery._sequence
            elif discovery._closed:
                raise StopAsyncIteration
            else:
                await discovery._changed.wait()
        return self._pending.popleft()

    def _learn(self, notice: DiscoveryNotice) -> None:
        if isinstance(notice, InstanceRemoved):
            self._known.pop(notice.instance.instance_id, None)
        elif isinstance(notice, InstanceAdded | InstanceChanged):
            self._known[notice.instance.instance_id] = notice.instance

    def _catch_up(self) -> Iterator[DiscoveryNotice]:
        """Fell behind the history: the differences between what it knew and the set now."""
        discovery = self._discovery
        revision = discovery.revision
        live = discovery.instances
        for instance_id, old in list(self._known.items()):
            if instance_id not in live:
                yield InstanceRemoved(old, revision)
        for instance_id, new in live.items():
            old_or_none = self._known.get(instance_id)
            if old_or_none is None:
                yield InstanceAdded(new, revision)
            elif old_or_none != new:
                yield InstanceChanged(new, old_or_none, revision)
        self._known = live


def _dialable(instances: dict[str, Instance]) -> bool:
    """Whether any instance is SERVING or DEGRADED (a NOT_SERVING record, written by
    someone else, is listed but never dialled)."""
    return any(instance.health is not HealthStatus.NOT_SERVING for instance in instances.values())


@final
class _Rotation:
    """The endpoints of :meth:`Discovery.endpoints`: the live instances in turn."""

    __slots__ = ("_discovery", "_turn")

    def __init__(self, discovery: Discovery, start: int) -> None:
        self._discovery = discovery
        self._turn = start

    def __aiter__(self) -> _Rotation:
        return self

    async def __anext__(self) -> str:
        try:
            instances = await self._discovery.wait_for(_dialable)
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None
        serving = [i for i in instances.values() if i.health is HealthStatus.SERVING]
        choices = serving or [i for i in instances.values() if i.health is HealthStatus.DEGRADED]
        choice = choices[self._turn % len(choices)]
        self._turn += 1
        return choice.address


@asynccontextmanager
async def open_discovery(
    store: KeyValueStore,
    service: str,
    *,
    prefix: str = DEFAULT_REGISTRY_PREFIX,
    backoff: Iterable[float] | None = None,
    check_interval: float = 5.0,
    history: int = 1000,
) -> AsyncIterator[Discovery]:
    """Follow ``service`` in ``store`` while the block runs.

    The block starts after the first read of the range: with the live set, or
    stale and empty if the store could not be reached (discovery keeps trying).
    ``backoff`` paces the retries (by default full jitter from 0.1 s doubling
    to ``check_interval``); ``check_interval`` is how often a quiet watch
    checks that the store still answers; ``history`` bounds the events kept
    for :meth:`Discovery.changes` readers.
    """
    if not (math.isfinite(check_interval) and check_interval > 0):
        raise ValueError(f"check_interval must be positive and finite, not {check_interval!r}")
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise ValueError(f"history must be a positive int, not {history!r}")
    if isinstance(backoff, Iterator):
        raise TypeError("backoff must be re-iterable (a list or a backoff policy), not an iterator")
    discovery = Discovery(
        store,
        service,
        prefix=prefix,
        backoff=FullJitterBackoff(base=0.1, factor=2.0, cap=check_interval)
        if backoff is None
        else backoff,
        check_interval=check_interval,
        history=history,
    )
    try:
        async with open_background() as nursery:
            await nursery.start(discovery._follow)
            nursery.start_soon(discovery._check_forever)
            yield discovery
    finally:
        discovery._closed = True
        discovery._changed.set()  # readers and waiters: there is nothing more
