"""Failure detectors: how long a silence means the peer is dead (sans-IO).

A detector is consulted by the protocol core each time it recomputes the
watchdog deadline. It sees every frame's arrival time through :meth:`record`
and answers :meth:`suspect_at`: the moment at which, if nothing more arrives,
the peer should be declared dead.

The core clamps whatever a detector says into the window THB/1 §4.2 (docs/protocol.md)
allows: never later than ``last_arrival + timeout`` (the side's own
``timeout_ms``), and never sooner than two of the peer's send intervals after
the last arrival, so that one lost heartbeat is never enough. A detector can
therefore only make detection *faster* within the safe window; it can neither
break the protocol's upper bound nor convict on a single missed PING.

:class:`FixedTimeout` reproduces the plain silence rule.
:class:`PhiAccrualDetector` learns the peer's rhythm from the arrivals it
sees and suspects the peer once a silence becomes too unlikely for that
rhythm. The adaptive detector of ``_adaptive``, which models losses and
jitter apart, implements the same protocol.

Each also reports a **suspicion level**, :meth:`suspicion`: a phi-like number
that is 0.0 right after an arrival, never falls while the silence goes on, and
is ``inf`` once the silence is beyond what a float can express.
:func:`fixed_suspicion` is the level of a detector that has no model of the
peer (the fixed timeout, or a learning detector that has not learned enough):
``-log10(1 - silence / timeout)``, which reaches ``inf`` at the timeout.
"""

from __future__ import annotations

import math
from collections import deque
from statistics import NormalDist
from typing import Protocol, final

__all__ = ["FailureDetector", "FixedTimeout", "PhiAccrualDetector", "fixed_suspicion"]

_SQRT2 = math.sqrt(2.0)


def fixed_suspicion(silence: float, timeout: float) -> float:
    """The suspicion level of a detector without a model: ``-log10(1 - silence / timeout)``.

    0.0 for no silence (or a negative one), 1.0 at nine tenths of the timeout,
    ``inf`` at the timeout and after it. Never ``-0.0``.

    >>> fixed_suspicion(0.0, 3.0), fixed_suspicion(2.7, 3.0), fixed_suspicion(3.0, 3.0)
    (0.0, 1.0, inf)
    """
    if not silence > 0.0:
        return 0.0
    remaining = 1.0 - silence / timeout
    if not remaining > 0.0:
        return math.inf
    return 0.0 - math.log10(remaining)


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

    def suspicion(self, now: float, last_arrival: float, timeout: float) -> float:
        """:func:`fixed_suspicion` of the silence since ``last_arrival``: ``inf`` at the timeout.

        >>> round(FixedTimeout().suspicion(now=12.7, last_arrival=10.0, timeout=3.0), 9)
        1.0
        """
        return fixed_suspicion(now - last_arrival, timeout)


@final
class PhiAccrualDetector:
    """Suspect the peer once its silence is too unlikely for the rhythm it has shown.

    The phi accrual failure detector (Hayashibara et al., 2004). It keeps the
    last ``window`` intervals between arrivals and models the next one as a
    normal distribution with their mean and standard deviation. After a
    silence of ``elapsed`` seconds, the suspicion level is

    ``phi = -log10(P(an interval longer than elapsed - acceptable_pause))``

    so ``phi = 8`` means that a peer with this rhythm stays silent that long
    once in a hundred million times. :meth:`suspect_at` answers the moment
    phi reaches ``threshold``, in closed form: ``last_arrival +
    acceptable_pause + mean + std * z``, where ``z`` is the standard normal
    quantile of ``1 - 10 ** -threshold`` (about 5.61 for the default of 8).
    The protocol core clamps that moment into the window of THB/1 §4.2, so the
    detector can convict sooner than the configured timeout but never after
    less than two of the peer's send intervals of silence.

    The defaults suit the default heartbeat of one PING a second:

    ``threshold=8.0``
        a false suspicion once in a hundred million silences under the
        model, the level Akka and Cassandra ship with; 10 to 12 suits a
        noisy network.
    ``window=100``
        intervals remembered: about 100 s of an idle peer's history, so the
        detector follows a change of rhythm within two minutes. At least 2.
    ``min_std=0.1``
        seconds, the floor of the standard deviation. A peer that PINGs on a
        timer is so regular that its measured deviation is almost zero, and
        without a floor any jitter (a scheduling delay, a retransmission)
        would look like death. 0.1 s, a tenth of the interval, suspects a
        perfectly regular 1 s peer after ``1 + 0.1 * 5.61 = 1.56`` s, which
        the core then raises to its floor of two intervals.
    ``acceptable_pause=0.0``
        seconds of silence added on top of the model, for peers known to
        pause (garbage collection, a slow disk). The core's floor of two send
        intervals already forgives one lost heartbeat, hence no extra pause.
    ``first_interval=None``
        with fewer than two intervals learned the detector has no rhythm and
        answers the plain ``last_arrival + timeout``. Given the interval the
        peer is expected to keep (say the configured one), it instead starts
        as if it had seen two intervals of 0.75 and 1.25 times that value: a
        mean of ``first_interval`` and a deviation of a quarter of it, wide
        because nothing is known yet. These seeds leave the window as real
        intervals push them out.

    **The local-stall guard.** A learning detector must not learn from our own
    stalls. When our event loop is blocked, or the application stops reading
    and the core pauses liveness, the peer's frames wait in the kernel and
    are then read in one go: every one of them is recorded at the same time,
    after a gap that measured how long *we* were away, not the peer's rhythm.
    :meth:`record` therefore ignores:

    * an interval of zero (or less): frames taken in together count as one
      arrival;
    * an interval longer than the ``timeout`` last passed to
      :meth:`suspect_at`: had we been watching, the peer would have been
      convicted first, so only a stall or a pause can produce it;
    * an interval longer than the detector's current verdict (the peer would
      have been suspected) that ends in a batch of frames arriving together.
      Such an interval is held back until the next arrival shows whether the
      frame that ended it came alone: if so the peer really was late and the
      interval is learned; if others came with it, they had been waiting
      for us and it is dropped.

    Arrival times alone cannot tell our stall from the peer's (a peer that
    pauses and then flushes several frames looks the same); the guard
    assumes ours, and ``acceptable_pause`` is the knob for peers that pause.

    **Cost.** :meth:`record` and :meth:`suspect_at` are O(1): the window is a
    bounded deque with a running sum and sum of squares. So that rounding
    cannot build up over a long connection, both sums are recomputed exactly
    (:func:`math.fsum`) each time the window has turned over once, which
    keeps :meth:`record` O(1) amortised. Memory is bounded by ``window``.

    Raises :exc:`ValueError` for a parameter out of range. One detector holds
    the state of one connection: give the runtime a factory.

    >>> detector = PhiAccrualDetector(threshold=8.0, min_std=0.1)
    >>> for second in range(10):
    ...     detector.record(float(second))
    >>> detector.mean, detector.std
    (1.0, 0.1)
    >>> deadline = detector.suspect_at(last_arrival=9.0, timeout=3.0)
    >>> round(deadline, 3)
    10.561
    >>> round(detector.phi(now=deadline, last_arrival=9.0), 9)
    8.0
    >>> round(detector.phi(now=10.0, last_arrival=9.0), 3)  # one mean interval: 50%
    0.301

    :meth:`akka` is the same detector with Akka's defaults, for comparison:
    it waits the 3 s of Akka's acceptable pause on top of the model, and its
    first-interval seeds still widen the deviation after ten arrivals.

    >>> akka = PhiAccrualDetector.akka()
    >>> for second in range(10):
    ...     akka.record(float(second))
    >>> round(akka.std, 4), round(akka.suspect_at(last_arrival=9.0, timeout=60.0) - 9.0, 3)
    (0.1066, 4.598)

    Given to the runtime as a factory, one detector per connection:

    >>> from trio_heartbeat import ConnectionOptions
    >>> options = ConnectionOptions(detector=lambda: PhiAccrualDetector(threshold=8.0))
    """

    __slots__ = (
        "_acceptable_pause",
        "_first_interval",
        "_held",
        "_intervals",
        "_last_arrival",
        "_longest",
        "_min_std",
        "_sum",
        "_sum_sq",
        "_threshold",
        "_until_resum",
        "_z",
    )

    def __init__(
        self,
        threshold: float = 8.0,
        window: int = 100,
        min_std: float = 0.1,
        acceptable_pause: float = 0.0,
        first_interval: float | None = None,
    ) -> None:
        # Below log10(2) the detector would suspect before the mean interval;
        # above 300, 10**-threshold leaves the range of normal floats.
        if not 1.0 <= threshold <= 300.0:
            raise ValueError(f"threshold must be between 1 and 300, got {threshold!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(
                f"window must be an integer of at least 2 (a deviation needs two intervals), "
                f"got {window!r}"
            )
        if not 0.0 < min_std < math.inf:
            raise ValueError(f"min_std must be a positive number of seconds, got {min_std!r}")
        if not 0.0 <= acceptable_pause < math.inf:
            raise ValueError(
                f"acceptable_pause must be a finite number of seconds >= 0, "
                f"got {acceptable_pause!r}"
            )
        if first_interval is not None and not 0.0 < first_interval < math.inf:
            raise ValueError(
                f"first_interval must be None or a positive number of seconds, "
                f"got {first_interval!r}"
            )
        self._threshold = threshold
        self._min_std = min_std
        self._acceptable_pause = acceptable_pause
        self._first_interval = first_interval
        # The upper quantile from the lower tail, which is exact where
        # 1 - 10**-threshold would round (to 1.0 from threshold 17 on).
        self._z = -NormalDist().inv_cdf(10.0**-threshold)
        self._intervals: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self._sum_sq = 0.0
        self._until_resum = window
        self._last_arrival: float | None = None
        self._held: float | None = None
        self._longest = math.inf
        if first_interval is not None:
            self._learn(0.75 * first_interval)
            self._learn(1.25 * first_interval)

    def __repr__(self) -> str:
        return (
            f"PhiAccrualDetector(threshold={self._threshold!r}, "
            f"window={self._intervals.maxlen!r}, min_std={self._min_std!r}, "
            f"acceptable_pause={self._acceptable_pause!r}, "
            f"first_interval={self._first_interval!r})"
        )

    @classmethod
    def akka(cls) -> PhiAccrualDetector:
        """The detector with the defaults of Akka's cluster failure detector.

        As Akka's ``reference.conf`` sets them (``akka.cluster.failure-detector``):
        ``threshold = 8.0``, ``max-sample-size = 1000``, ``min-std-deviation =
        100 ms``, ``acceptable-heartbeat-pause = 3 s``, and the first heartbeat
        estimated from ``heartbeat-interval = 1 s``. Once the seeds have left
        its window, a regular 1 s peer is suspected after ``1 + 3 + 0.1 * 5.61
        = 4.56`` s of silence, later than
        THB/1's default 3 s timeout, which then decides. (Akka computes phi
        with a logistic approximation of the normal distribution; this class
        uses the exact one, which moves the verdict by well under a millisecond.)

        >>> PhiAccrualDetector.akka()
        PhiAccrualDetector(threshold=8.0, window=1000, min_std=0.1, acceptable_pause=3.0, first_interval=1.0)
        """
        return cls(
            threshold=8.0, window=1000, min_std=0.1, acceptable_pause=3.0, first_interval=1.0
        )

    # -- what it has learned ------------------------------------------------------

    @property
    def intervals(self) -> tuple[float, ...]:
        """The intervals the statistics are computed from, oldest first (seeds included)."""
        return tuple(self._intervals)

    @property
    def mean(self) -> float | None:
        """The mean interval in seconds, or ``None`` with fewer than two intervals."""
        count = len(self._intervals)
        return self._sum / count if count >= 2 else None

    @property
    def std(self) -> float | None:
        """The standard deviation in use (at least ``min_std``), or ``None`` with fewer than two intervals."""
        if len(self._intervals) < 2:
            return None
        return self._mean_and_std()[1]

    def _mean_and_std(self) -> tuple[float, float]:
        count = len(self._intervals)
        mean = self._sum / count
        # Clamped: rounding can make the difference of two close sums negative.
        variance = max(self._sum_sq / count - mean * mean, 0.0)
        return mean, max(math.sqrt(variance), self._min_std)

    def _delay(self) -> float:
        # Seconds of silence after which phi reaches the threshold.
        mean, std = self._mean_and_std()
        return mean + self._acceptable_pause + std * self._z

    # -- the FailureDetector protocol ---------------------------------------------

    def record(self, arrival: float) -> None:
        """A frame arrived at ``arrival``; learn the interval since the one before.

        Arrival times must not go backwards; one that does counts as
        simultaneous with the last. The local-stall guard (see the class)
        decides which intervals are learned.
        """
        last = self._last_arrival
        if last is None:
            self._last_arrival = arrival
            return
        interval = arrival - last
        if interval <= 0.0:
            # Frames taken in together: one arrival. If the interval that
            # ended at `last` was late, they had been waiting for us.
            self._held = None
            return
        self._last_arrival = arrival
        held = self._held
        if held is not None:
            # The late frame came alone: the peer really was late.
            self._held = None
            self._learn(held)
        if interval > self._longest:
            return  # longer than the timeout: we were not watching
        if len(self._intervals) >= 2 and interval > self._delay():
            self._held = interval  # late: learned only if no batch follows
            return
        self._learn(interval)

    def _learn(self, interval: float) -> None:
        intervals = self._intervals
        if len(intervals) == intervals.maxlen:
            oldest = intervals[0]  # about to fall out of the window
            self._sum -= oldest
            self._sum_sq -= oldest * oldest
        intervals.append(interval)
        self._sum += interval
        self._sum_sq += interval * interval
        self._until_resum -= 1
        if self._until_resum == 0:
            self._until_resum = len(intervals)
            self._sum = math.fsum(intervals)
            self._sum_sq = math.fsum(value * value for value in intervals)

    def suspect_at(self, last_arrival: float, timeout: float) -> float:
        """When phi reaches the threshold: ``last_arrival + acceptable_pause + mean + std * z``.

        With fewer than two intervals learned (and no ``first_interval``),
        ``last_arrival + timeout``. ``timeout`` is also remembered as the
        longest interval :meth:`record` will learn from. The answer may be
        later than ``last_arrival + timeout``; the core clamps it.
        """
        self._longest = timeout
        if len(self._intervals) < 2:
            return last_arrival + timeout
        return last_arrival + self._delay()

    def phi(self, now: float, last_arrival: float) -> float:
        """The suspicion level at ``now`` after silence since ``last_arrival``.

        ``0.0`` with fewer than two intervals learned (no rhythm, no
        suspicion), ``inf`` once the silence is beyond what a float can
        express as a probability. Reaches the threshold at :meth:`suspect_at`.
        """
        if len(self._intervals) < 2:
            return 0.0
        mean, std = self._mean_and_std()
        overdue = (now - last_arrival - self._acceptable_pause - mean) / std
        # The upper tail by erfc, which stays exact where 1 - cdf would round to 0.
        survival = 0.5 * math.erfc(overdue / _SQRT2)
        if survival == 0.0:
            return math.inf
        return 0.0 - math.log10(survival)  # 0.0 - ...: never -0.0

    def suspicion(self, now: float, last_arrival: float, timeout: float) -> float:
        """The suspicion level: :meth:`phi`, or :func:`fixed_suspicion` before there is a rhythm.

        With fewer than two intervals learned the detector answers the plain
        timeout, and its level is the fixed timeout's. ``threshold`` at
        :meth:`suspect_at`'s verdict.
        """
        if len(self._intervals) < 2:
            return fixed_suspicion(now - last_arrival, timeout)
        return self.phi(now, last_arrival)
