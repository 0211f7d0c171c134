"""THB/1's silence rule for one connection: when a silent peer is declared dead.

The rule (THB/1 §4): a side that has heard nothing for its own ``timeout``
declares the peer dead; a failure detector may decide sooner, but never after
less than two of the peer's send intervals of silence, so that one lost
heartbeat is never enough. :class:`SilenceRule` applies it: it hears every
frame's arrival, passes it on to the :class:`FailureDetector`, and clamps the
detector's verdict into that window. While our own reader is held up (the
application is not receiving), nothing the peer sends can be heard, so the
rule is paused: silence then proves nothing.

Time comes in as an argument; nothing here does I/O.
"""

from __future__ import annotations

from math import inf
from typing import Final, final

from ._detectors import FailureDetector, FixedTimeout

__all__ = ["SilenceRule"]

#: Stateless, so every connection can share it.
FIXED_TIMEOUT: Final = FixedTimeout()


@final
class SilenceRule:
    """When the peer is convicted if it stays silent, for one connection.

    >>> rule = SilenceRule(FIXED_TIMEOUT, timeout=3.0)
    >>> rule.heard(10.0)
    >>> rule.deadline
    13.0
    >>> rule.pause(11.0)
    >>> rule.deadline  # our reader is held up: the peer cannot be heard
    inf
    >>> rule.resume(15.0)
    4.0
    >>> rule.deadline  # the silence counts from the resumption
    18.0
    """

    __slots__ = ("_floor", "_paused_since", "_timeout", "detector", "last_heard")

    def __init__(self, detector: FailureDetector, timeout: float) -> None:
        self.detector = detector
        self._timeout = timeout
        # Two of the peer's send intervals, once they are known (at the handshake).
        self._floor = 0.0
        self._paused_since: float | None = None
        #: When the last frame arrived (``None`` before the first).
        self.last_heard: float | None = None

    def agree(self, peer_send_interval: float) -> None:
        """The handshake is done: never convict after less than two of the peer's intervals."""
        self._floor = 2 * peer_send_interval

    def heard(self, now: float) -> None:
        """A frame arrived at ``now``."""
        self.last_heard = now
        self.detector.record(now)

    @property
    def deadline(self) -> float:
        """When the peer is to be declared dead if nothing arrives first (``inf`` while paused)."""
        last = self.last_heard
        if last is None or self._paused_since is not None:
            return inf
        detector = self.detector
        if type(detector) is FixedTimeout:
            # The clamp below leaves a fixed timeout as it is; this runs for
            # every frame received, so skip the call.
            return last + self._timeout
        suggested = detector.suspect_at(last, self._timeout)
        return min(last + self._timeout, max(last + self._floor, suggested))

    def pause(self, now: float) -> None:
        """Our reader stopped reading at ``now``: suspend conviction until :meth:`resume`."""
        if self._paused_since is None:
            self._paused_since = now

    def resume(self, now: float) -> float | None:
        """Our reader reads again: the silence counts from ``now`` at the earliest.

        Returns how long the pause lasted, or ``None`` if there was none.
        """
        since = self._paused_since
        if since is None:
            return None
        self._paused_since = None
        if self.last_heard is not None:
            self.last_heard = max(self.last_heard, now)
        return now - since
