"""Local health: how punctual our own event loop is, so that our stalls are never blamed on a peer.

Theory of operation
-------------------
A failure detector judges a peer by its silence, but silence is only
evidence while we are listening. A process that was stopped (SIGSTOP, a
frozen VM, a debugger), or whose event loop was blocked (a synchronous call,
a long garbage collection), wakes up to find every deadline expired at once,
and the frames its peers sent meanwhile waiting in the socket buffers.

Every connection's watchdog already measures what we need: each time its
timer fires, ``now - deadline`` is how late our loop was. :class:`LocalHealth`
collects those measurements for the whole Trio run (one per run, shared by
every connection: see :func:`local_health`) and keeps two things:

* **stalls**: a timer late by :attr:`~LocalHealth.stall` seconds or more
  (or by half the peer's send interval, if that is shorter) means we were away. The watchdog then never convicts on that firing:
  it reads what is waiting and gives the peer a fresh silence window,
  counted from the end of our stall (THB/1 §4.2 lets a side discount time
  in which it could not read). A peer that really died meanwhile is
  convicted one window later; one that fires late again with nothing heard
  since is convicted with the cause "we were stalled";
* **a score**, in the spirit of the local health multiplier of Lifeguard
  (HashiCorp memberlist): each episode of late timers (at least
  :attr:`~LocalHealth.late` seconds late) raises it by one, up to
  :attr:`~LocalHealth.max_score`; each :attr:`~LocalHealth.recovery` seconds
  without one lowers it by one. While it is above zero our loop is slow, and
  the early verdicts of adaptive detectors are stretched by
  :attr:`~LocalHealth.multiplier` (never beyond the configured timeout).

Time comes in as arguments, so this class does no I/O and runs under any clock;
:func:`local_health` gives the runtime the instance of the current Trio run.
"""

from __future__ import annotations

import math
from typing import Final, final

import trio

__all__ = ["LocalHealth", "local_health"]


@final
class LocalHealth:
    """The punctuality of one event loop, from the lateness of its timers.

    >>> health = LocalHealth()
    >>> health.timer_fired(scheduled=10.0, now=10.001)  # on time
    False
    >>> health.score(10.001), health.multiplier(10.001)
    (0, 1.0)
    >>> health.timer_fired(scheduled=11.0, now=16.0)  # five seconds late: a stall
    True
    >>> health.last_stall
    (11.0, 16.0)
    >>> health.score(16.0), health.multiplier(16.0)
    (1, 2.0)
    >>> health.score(17.0)  # a second later, punctual again
    0

    ``late`` (seconds) is the lateness that counts against the score, ``stall``
    the lateness that counts as a stall of our own, ``max_score`` caps the
    score and ``recovery`` is how long a punctual loop takes to earn back one
    point. Raises :exc:`ValueError` for values out of range.
    """

    __slots__ = (
        "_last_late",
        "_score",
        "_score_at",
        "last_stall",
        "late",
        "max_score",
        "recovery",
        "stall",
        "stalls",
    )

    def __init__(
        self,
        *,
        late: float = 0.05,
        stall: float = 0.5,
        max_score: int = 8,
        recovery: float = 1.0,
    ) -> None:
        if not 0.0 < late <= stall < math.inf:
            raise ValueError(f"need 0 < late <= stall, finite; got late={late!r}, stall={stall!r}")
        if isinstance(max_score, bool) or not isinstance(max_score, int) or max_score < 1:
            raise ValueError(f"max_score must be an integer of at least 1, got {max_score!r}")
        if not 0.0 < recovery < math.inf:
            raise ValueError(f"recovery must be a positive number of seconds, got {recovery!r}")
        self.late = late
        self.stall = stall
        self.max_score = max_score
        self.recovery = recovery
        #: ``(start, end)`` of the last stall seen (``None`` before the first).
        self.last_stall: tuple[float, float] | None = None
        #: How many stalls have been seen.
        self.stalls = 0
        self._score = 0
        self._score_at = -math.inf  # when the score last changed
        self._last_late = -math.inf  # when a late timer was last seen

    def __repr__(self) -> str:
        return (
            f"LocalHealth(late={self.late!r}, stall={self.stall!r}, "
            f"max_score={self.max_score!r}, recovery={self.recovery!r})"
        )

    def timer_fired(self, scheduled: float, now: float, *, stall: float = math.inf) -> bool:
        """A timer due at ``scheduled`` fired at ``now``; true if that late means we were stalled.

        ``stall`` lowers the lateness that counts as a stall for this timer (a
        connection with a short interval: half the peer's send interval).
        """
        lateness = now - scheduled
        if lateness < self.late:
            return False
        if now - self._last_late >= self.late:
            # A new episode. (The timers that expire together when a stall
            # ends all report it: they count once.)
            self._score = min(self.score(now) + 1, self.max_score)
            self._score_at = now
        self._last_late = now
        if lateness < min(self.stall, stall):
            return False
        last = self.last_stall
        if last is None or scheduled >= last[1]:
            self.stalls += 1
            self.last_stall = (scheduled, now)
        else:  # another timer that expired in the same stall
            self.last_stall = (min(last[0], scheduled), max(last[1], now))
        return True

    def score(self, now: float) -> int:
        """The score at ``now``: 0 for a punctual loop, up to ``max_score``."""
        if self._score == 0:
            return 0
        earned = int((now - max(self._score_at, self._last_late)) // self.recovery)
        return max(self._score - max(earned, 0), 0)

    def multiplier(self, now: float) -> float:
        """``1 + score``: how much the early verdicts of adaptive detectors are stretched."""
        return 1.0 + self.score(now)


_RUN_HEALTH: Final[trio.lowlevel.RunVar[LocalHealth]] = trio.lowlevel.RunVar(
    "trio_heartbeat.local_health"
)


def local_health() -> LocalHealth:
    """The :class:`LocalHealth` of the current Trio run, which every connection reports to.

    >>> async def report() -> None:  # doctest: +SKIP
    ...     health = local_health()
    ...     print(health.score(trio.current_time()), health.stalls, health.last_stall)
    """
    try:
        return _RUN_HEALTH.get()
    except LookupError:
        health = LocalHealth()
        _RUN_HEALTH.set(health)
        return health
