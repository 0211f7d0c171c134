"""Failure detectors: how long a silence means the peer is dead (sans-IO).

A detector is consulted by the protocol core each time it recomputes the
watchdog deadline. It sees every frame's arrival time through :meth:`record`
and answers :meth:`suspect_at`: the moment at which, if nothing more arrives,
the peer should be declared dead.

The core clamps whatever a detector says into the window PROTOCOL.md §4
allows: never later than ``last_arrival + timeout`` (the side's own
``timeout_ms``), and never sooner than two of the peer's send intervals after
the last arrival, so that one lost heartbeat is never enough. A detector can
therefore only make detection *faster* within the safe window; it can neither
break the protocol's upper bound nor convict on a single missed PING.

:class:`FixedTimeout` is the default and reproduces the plain silence rule.
Adaptive detectors (phi accrual and friends) implement the same protocol.
"""

from __future__ import annotations

from typing import Protocol, final

__all__ = ["FailureDetector", "FixedTimeout"]


class FailureDetector(Protocol):
    """What the protocol core needs from a failure detector."""

    def record(self, arrival: float) -> None:
        """A frame arrived at ``arrival`` (seconds, on the caller's clock)."""

    def suspect_at(self, last_arrival: float, timeout: float) -> float:
        """The time at which the peer should be declared dead if silent from ``last_arrival``.

        ``timeout`` is the side's configured upper bound, in seconds.
        """


@final
class FixedTimeout:
    """Declare the peer dead exactly ``timeout`` after the last frame.

    >>> FixedTimeout().suspect_at(last_arrival=10.0, timeout=3.0)
    13.0
    """

    __slots__ = ()

    def record(self, arrival: float) -> None:
        """Nothing to learn: the deadline depends on the last arrival only."""

    def suspect_at(self, last_arrival: float, timeout: float) -> float:
        """``last_arrival + timeout``."""
        return last_arrival + timeout
