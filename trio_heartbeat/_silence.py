"""THB/1's silence rule for one connection: when a silent peer is declared dead.

The rule (THB/1 §4): a side that has heard nothing for its own ``timeout``
declares the peer dead; a failure detector may decide sooner, but never after
less than two of the peer's send intervals of silence, so that one lost
heartbeat is never enough. :class:`SilenceRule` applies it: it hears every
frame's arrival, passes it on to the :class:`FailureDetector`, and clamps the
detector's verdict into that window. While our own reader is held up (the
application is not receiving, and the reader's reserve is full), nothing the
peer sends can be heard, so the rule is paused: no early verdict, and no
suspicion, but the timeout still bounds detection (THB/1 §4.2); the runtime
then says the fault was ours.

Before the verdict comes suspicion: a peer silent for one and a half of its
send intervals (one heartbeat overdue) is SUSPECT, which the next frame
undoes; :meth:`SilenceRule.suspicion` gives a phi-like level at any moment.
While our own event loop is slow the runtime sets :attr:`SilenceRule.stretch`
above 1, which moves a detector's early verdict later (never past the
timeout): see ``_local_health``.

Time comes in as an argument; nothing here does I/O.
"""

from __future__ import annotations

from math import inf
from typing import Final, final

from ._detectors import FailureDetector, FixedTimeout, fixed_suspicion

__all__ = ["SilenceRule"]

#: Stateless, so every connection can share it.
FIXED_TIMEOUT: Final = FixedTimeout()


@final
class SilenceRule:
    """When the peer is convicted if it stays silent, for one connection.

    >>> from trio_heartbeat import FixedTimeout, SilenceRule
    >>> rule = SilenceRule(FixedTimeout(), timeout=3.0)
    >>> rule.heard(10.0)
    >>> rule.deadline
    13.0
    >>> rule.pause(11.0)
    >>> rule.deadline  # our reader is held up: the timeout alone
    13.0
    >>> rule.resume(12.0)
    1.0
    >>> rule.deadline, rule.last_heard  # the silence counts from the resumption
    (15.0, 10.0)
    """

    __slots__ = (
        "_floor",
        "_origin",
        "_paused_since",
        "_timeout",
        "detector",
        "last_heard",
        "stretch",
    )

    def __init__(self, detector: FailureDetector, timeout: float) -> None:
        self.detector = detector
        self._timeout = timeout
        # Two of the peer's send intervals, once they are known (at the handshake).
        self._floor = 0.0
        self._paused_since: float | None = None
        #: When the last frame arrived (``None`` before the first); never moves back.
        self.last_heard: float | None = None
        # Where the silence counts from: the last frame, or a later resumption.
        self._origin: float | None = None
        #: How much a detector's early verdict is stretched (our loop is slow).
        self.stretch = 1.0

    def agree(self, peer_send_interval: float) -> None:
        """The handshake is done: never convict after less than two of the peer's intervals."""
        self._floor = 2 * peer_send_interval

    def heard(self, now: float) -> None:
        """A frame arrived at ``now``."""
        origin = self._origin
        if origin is None or now >= origin:
            self.last_heard = self._origin = now
        elif self.last_heard is None or now > self.last_heard:
            # Read before a resumption, decoded after it: the frame counts,
            # but the silence still counts from the resumption.
            self.last_heard = now
        self.detector.record(now)

    @property
    def deadline(self) -> float:
        """When the peer is to be declared dead if nothing arrives first (while paused, at
        the timeout: no early verdict)."""
        last = self._origin
        if last is None:
            return inf
        detector = self.detector
        if type(detector) is FixedTimeout or self._paused_since is not None:
            # The clamp below leaves a fixed timeout as it is; this runs for
            # every frame received, so skip the call.
            return last + self._timeout
        suggested = detector.suspect_at(last, self._timeout)
        if self.stretch != 1.0:
            suggested = last + (suggested - last) * self.stretch
        return min(last + self._timeout, max(last + self._floor, suggested))

    @property
    def suspect_deadline(self) -> float:
        """When the silent peer becomes SUSPECT: one and a half of its send intervals.

        ``inf`` before the handshake is done and while paused. Always before
        :attr:`deadline`, which is never sooner than two intervals.
        """
        last = self._origin
        if last is None or self._paused_since is not None or not self._floor:
            return inf
        return last + 0.75 * self._floor

    def suspicion(self, now: float) -> float:
        """How suspicious the silence is at ``now``: a phi-like level, rising with silence.

        The detector's own level if it has a ``suspicion(now, last_arrival,
        timeout)`` method, else ``-log10(1 - silence / timeout)`` (no model:
        0 just after a frame, infinite at the timeout). ``0.0`` before the
        first frame and while paused.
        """
        last = self._origin
        if last is None or self._paused_since is not None:
            return 0.0
        level = getattr(self.detector, "suspicion", None)
        if level is not None:
            return float(level(now, last, self._timeout))
        return fixed_suspicion(now - last, self._timeout)

    def pause(self, now: float) -> None:
        """Our reader stopped reading at ``now``: until :meth:`resume`, the timeout alone."""
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
        if self._origin is not None:
            self._origin = max(self._origin, now)
        return now - since
