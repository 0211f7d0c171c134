"""A budget for the bytes that many connections may hold in their queues together.

Each connection bounds its own queues (``ConnectionOptions.send_queue_bytes``
and ``receive_queue_bytes``), but a server with thousands of connections would
still have no bound on the sum. A :class:`BufferBudget` is that bound: every
connection that shares it reports the bytes it queues and takes out; when the
sum would pass the limit, the connections that hold the most are cut off (the
caller ends them with CLOSE 1013, which frees what they held) until it is back
under. A peer that sends without reading, or makes us queue for it without
reading, is the one that holds the most, so it is the one cut off.

No I/O, no clock: the connections call it as they queue.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import final

__all__ = ["BufferBudget"]


@final
class BufferBudget:
    """At most ``limit`` bytes held by all the connections that share this budget.

    >>> budget = BufferBudget(100)
    >>> budget.take("a", 60), budget.take("b", 30)
    ([], [])
    >>> budget.take("b", 20)  # 110 bytes: "a" holds the most, and goes
    ['a']
    >>> budget.release("a"), budget.used
    (None, 50)

    Give it to :class:`~trio_heartbeat.ConnectionOptions` (``budget=``) to share
    it; :class:`~trio_heartbeat.Server` makes one of ``max_buffered_bytes``.
    Raises :exc:`ValueError` for a limit below 1.
    """

    __slots__ = ("_held", "limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a buffer budget must be at least 1 byte, not {limit!r}")
        #: The most bytes the connections may hold together.
        self.limit = limit
        #: The bytes they hold now.
        self.used = 0
        self._held: dict[Hashable, int] = {}

    def take(self, holder: Hashable, nbytes: int) -> list[Hashable]:
        """``holder`` queued ``nbytes`` more; return whom to cut off to stay within the limit.

        The holders are named biggest first, as many as it takes; cutting one
        off must :meth:`release` what it holds.
        """
        self.used += nbytes
        held = self._held
        held[holder] = held.get(holder, 0) + nbytes
        if self.used <= self.limit:
            return []
        # The biggest first, until what they hold covers the excess (it always
        # does in the end: ``used`` is the sum of what the holders hold).
        over = self.used - self.limit
        victims: list[Hashable] = []
        biggest_first = iter(sorted(held, key=held.__getitem__, reverse=True))
        while over > 0:
            victim = next(biggest_first)
            victims.append(victim)
            over -= held[victim]
        return victims

    def give(self, holder: Hashable, nbytes: int) -> None:
        """``holder`` took ``nbytes`` out of its queues (written, or received by the application).

        Only what it holds counts: a connection released when it ended may
        still hand its last messages to the application afterwards.
        """
        held = self._held
        had = held.get(holder, 0)
        if had > nbytes:
            held[holder] = had - nbytes
            self.used -= nbytes
        else:
            held.pop(holder, None)
            self.used -= had

    def release(self, holder: Hashable) -> None:
        """``holder`` holds nothing any more (it ended, or was cut off)."""
        self.used -= self._held.pop(holder, 0)

    def holding(self, holder: Hashable) -> int:
        """The bytes ``holder`` holds now."""
        return self._held.get(holder, 0)
