"""The adaptive failure detector: a deadline from the peer's rhythm, losses and jitter (sans-IO).

Theory of operation
-------------------
A live peer's silence after a frame has two causes: heartbeats that were lost,
and the lateness (jitter) of the one that finally arrives. The phi accrual
detector folds both into one normal distribution of intervals, so a single
lost heartbeat (an interval of two periods) is a many-sigma event to it and a
detector tuned to a low jitter convicts on it. :class:`AdaptiveDetector` models
them apart, in the spirit of Chen, Toueg and Aguilera's safety margin and
Bertier's estimator:

* **the period** ``D``: the median of the first ``warmup`` intervals, then an
  exponentially weighted moving average (EWMA) of the intervals that fall
  within half a period of it;
* **the loss rate** ``p``: every interval near ``(m + 1) * D`` (``m`` up to
  :data:`MAX_LOSSES`) is ``m`` heartbeats lost out of ``m + 1`` periods. The
  counts are kept over blocks of :data:`BLOCK` periods, older blocks weighing
  less and less (an effective memory of about 10,000 periods, two numbers per
  connection), plus a prior of one loss in a hundred periods with the weight
  of :data:`PRIOR_PERIODS` periods: a fresh detector starts as if the link lost
  1%, and a clean link is recognised as such within a few minutes;
* **the jitter**: the residual ``r = interval - (m + 1) * D`` of the same
  intervals, with an EWMA mean and variance, and a floor ``min_deviation``
  under the deviation.

Under this model a live peer stays silent for longer than ``(m + 1) * D + x``
(``x`` within half a period) with probability at most
``p ** (m + 1) + min(p ** m * (1 - p), P(r > x))``: either more than ``m``
heartbeats in a row were lost, or exactly ``m`` were and the next is later
than ``x``. The second term is not the product of the two probabilities:
congestion that drops heartbeats also delays the ones that get through, so
losses and lateness are not assumed independent, and the joint probability
is bounded by the smaller of the two. The verdict is the shortest silence
for which this is at most ``false_conviction_rate``, the budget of false
convictions per heartbeat: the detector tolerates the fewest lost heartbeats
``k`` (at least one, as THB/1 promises) for which ``p ** (k + 1)`` uses at
most half the budget, and spends the rest on the jitter: the verdict is
``(k + 1) * D + mean + z * deviation``, with ``P(r > x)`` from the normal
distribution of the residuals, so ``z`` is the normal quantile of
``1 - (budget - p ** (k + 1))``, about 5.2 for the default budget (and 0 if
even ``p ** k`` is within the rest). The suspicion level
(:meth:`AdaptiveDetector.suspicion`) is ``-log10`` of the same probability,
so it reaches ``-log10(false_conviction_rate)`` at the verdict. The verdict
is recomputed only after something was learned, and cached: the core asks
for it after every frame.

Intervals shorter than half a period are other frames (DATA, PONGs) between
heartbeats and teach nothing; intervals longer than ``MAX_LOSSES + 1.5``
periods are a change of rhythm: while they come the detector is unsure and
answers the plain timeout, and after :data:`REGROUP` of them in a row it learns
the rhythm again from scratch. The local-stall guard is the phi accrual
detector's (see ``_detectors``): intervals of zero are one arrival, intervals
longer than the timeout are not learned, and an interval longer than the
verdict is learned only if the frame that ended it came alone.

Time comes in as an argument; nothing here does I/O.
"""

from __future__ import annotations

import math
import statistics
from statistics import NormalDist
from typing import Final, final

from ._detectors import fixed_suspicion

__all__ = ["BLOCK", "MAX_LOSSES", "PRIOR_PERIODS", "REGROUP", "AdaptiveDetector"]

#: The most heartbeats in a row one interval is read as having lost.
MAX_LOSSES: Final = 8
#: Periods per block of the loss counts.
BLOCK: Final = 1000
#: The weight each older block keeps when a block is complete.
_KEEP: Final = 0.9
#: The prior on the loss rate: 1% of this many periods.
PRIOR_PERIODS: Final = 5.0
_PRIOR_LOSSES: Final = 0.01 * PRIOR_PERIODS
#: Weight of the newest interval in the EWMAs of the period and the jitter.
_ALPHA: Final = 1 / 64
#: Too-long intervals in a row after which the rhythm is learned again.
REGROUP: Final = 4
#: The share of the budget that runs of lost heartbeats may use.
_LOSS_SHARE: Final = 0.5
#: Before any timeout is known, intervals longer than a day are not learned.
_LONGEST: Final = 86_400.0
#: Beyond this many periods of silence, the probability is below any float.
_FAR: Final = 1e5
_NORMAL: Final = NormalDist()
_SQRT2: Final = math.sqrt(2.0)


@final
class AdaptiveDetector:
    """Convict once a silence is less likely than ``false_conviction_rate`` for this peer.

    See the module docstring for the model. Parameters:

    ``false_conviction_rate=1e-7``
        the budget: the probability, per heartbeat, that a live peer stays
        silent past the verdict. With 1e-7 a link that loses one heartbeat in
        a thousand is allowed two lost in a row (a run of three comes once in
        10^9 heartbeats). With 1e-6 a link that loses a little less, 0.07%,
        would be allowed only one, though it loses two in a row about once in
        2 x 10^6 heartbeats. Between 0 and 1.
    ``warmup=16``
        intervals seen before the period is known (their median). Until
        then the detector answers ``last_arrival + timeout``. At least 2.
    ``min_deviation=0.005``
        seconds, the floor under the jitter's deviation: a peer on a quiet
        LAN is so regular that its measured deviation is a fraction of a
        millisecond, and a scheduling hiccup must not look like death.

    Raises :exc:`ValueError` for a parameter out of range. One detector holds
    the state of one connection (about 330 bytes): give the runtime a
    factory, such as the class itself.

    A peer heard once a second for ten minutes, without a loss:

    >>> detector = AdaptiveDetector()
    >>> for second in range(601):
    ...     detector.record(float(second))
    >>> detector.interval, detector.jitter, detector.tolerated_losses
    (1.0, 0.005, 1)
    >>> round(detector.loss_rate, 6)  # the prior, diluted by 600 clean periods
    8.3e-05
    >>> deadline = detector.suspect_at(last_arrival=600.0, timeout=3.0)
    >>> round(deadline - 600.0, 4)  # two periods, and a margin for the jitter
    2.0261
    >>> round(detector.suspicion(now=deadline, last_arrival=600.0, timeout=3.0), 6)
    7.0
    >>> detector.suspicion(now=601.0, last_arrival=600.0, timeout=3.0) < 4.1
    True

    A fresh detector knows nothing yet and answers the plain timeout:

    >>> AdaptiveDetector().suspect_at(last_arrival=0.0, timeout=3.0)
    3.0
    """

    __slots__ = (
        "_block_losses",
        "_block_periods",
        "_held",
        "_last",
        "_longest",
        "_losses",
        "_mean",
        "_min_deviation",
        "_offset",
        "_period",
        "_periods",
        "_rate",
        "_short",
        "_tolerated",
        "_too_long",
        "_variance",
        "_warm",
        "_warmup",
    )

    def __init__(
        self,
        false_conviction_rate: float = 1e-7,
        *,
        warmup: int = 16,
        min_deviation: float = 0.005,
    ) -> None:
        if not 0.0 < false_conviction_rate < 1.0:
            raise ValueError(
                f"false_conviction_rate must be between 0 and 1, got {false_conviction_rate!r}"
            )
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 2:
            raise ValueError(f"warmup must be an integer of at least 2, got {warmup!r}")
        if not 0.0 < min_deviation < math.inf:
            raise ValueError(
                f"min_deviation must be a positive number of seconds, got {min_deviation!r}"
            )
        self._rate = false_conviction_rate
        self._warmup = warmup
        self._min_deviation = min_deviation
        self._last: float | None = None
        self._held: float | None = None
        self._longest = _LONGEST
        # The warm-up's intervals, until the period is known (then None).
        self._warm: list[float] | None = []
        self._period = 0.0
        self._short = 0.0  # half a period: shorter intervals are other frames
        self._too_long = 0
        self._mean = 0.0
        self._variance = 0.0
        self._losses = 0.0
        self._periods = 0.0
        self._block_losses = 0
        self._block_periods = 0
        # The verdict's offset from the last arrival, None until recomputed.
        self._offset: float | None = None
        self._tolerated = 0

    def __repr__(self) -> str:
        return (
            f"AdaptiveDetector(false_conviction_rate={self._rate!r}, "
            f"warmup={self._warmup!r}, min_deviation={self._min_deviation!r})"
        )

    # -- what it has learned ------------------------------------------------------

    @property
    def interval(self) -> float | None:
        """The peer's period in seconds, or ``None`` until the warm-up is over."""
        return None if self._warm is not None else self._period

    @property
    def loss_rate(self) -> float:
        """The estimated share of heartbeats lost (the prior's 1% before any evidence)."""
        return (self._losses + self._block_losses + _PRIOR_LOSSES) / (
            self._periods + self._block_periods + PRIOR_PERIODS
        )

    @property
    def jitter(self) -> float | None:
        """The deviation of the residuals in use (at least ``min_deviation``), or ``None``."""
        return None if self._warm is not None else self._deviation()

    @property
    def tolerated_losses(self) -> int | None:
        """Lost heartbeats in a row the verdict allows for, or ``None`` without a model."""
        return None if self._verdict() is None else self._tolerated

    # -- the FailureDetector protocol ---------------------------------------------

    def record(self, arrival: float) -> None:
        """A frame arrived at ``arrival``: learn from the interval since the one before.

        O(1) and cheap for the frames between heartbeats. Arrival times must
        not go backwards; one that does counts as simultaneous with the last.
        """
        last = self._last
        if last is None:
            self._last = arrival
            return
        interval = arrival - last
        if not interval > 0.0:
            # Frames taken in together (or times that make no sense): one
            # arrival. A late interval that ended in them is dropped.
            self._held = None
            return
        self._last = arrival
        # The verdict in force while this interval went by (before a held one is learned).
        offset = self._verdict()
        held = self._held
        if held is not None:
            self._held = None  # the late frame came alone: the peer really was late
            self._learn(held)
        if interval < self._short or interval > self._longest:
            return  # another frame between heartbeats, or we were not watching
        if offset is not None and interval > offset:
            self._held = interval  # late: learned only if no batch follows
        else:
            self._learn(interval)

    def suspect_at(self, last_arrival: float, timeout: float) -> float:
        """``last_arrival`` plus the verdict's offset, or plus ``timeout`` without a model.

        ``timeout`` is also remembered as the longest interval :meth:`record`
        will learn from. The answer may be later than ``last_arrival +
        timeout``; the core clamps it.
        """
        self._longest = timeout
        offset = self._verdict()
        return last_arrival + (timeout if offset is None else offset)

    def suspicion(self, now: float, last_arrival: float, timeout: float) -> float:
        """``-log10`` of the probability that a live peer stays silent this long.

        0.0 right after an arrival, rising with the silence, about
        ``-log10(false_conviction_rate)`` at the verdict and ``inf`` once the
        probability is below what a float holds. Without a model (warming
        up, or unsure of the rhythm), the fixed timeout's level
        (:func:`~trio_heartbeat._detectors.fixed_suspicion`).
        """
        silence = now - last_arrival
        if self._verdict() is None:
            return fixed_suspicion(silence, timeout)
        period = self._period
        periods = silence / period
        if not periods >= 0.5:
            return 0.0  # no live peer's heartbeat is due yet
        if periods > _FAR:
            return math.inf
        lost = math.floor(periods - 0.5)
        survival = self._survival(lost, silence - (lost + 1) * period)
        if survival == 0.0:
            return math.inf
        return 0.0 - math.log10(survival)

    # -- learning -----------------------------------------------------------------

    def _learn(self, interval: float) -> None:
        warm = self._warm
        if warm is not None:
            warm.append(interval)
            if len(warm) >= self._warmup:
                self._seed(warm)
            return
        period = self._period
        periods = interval / period
        if periods >= MAX_LOSSES + 1.5:
            # A change of rhythm, or a stall: not learned. Unsure until an
            # interval fits again; after several, learn the rhythm anew.
            self._too_long += 1
            if self._too_long >= REGROUP:
                self._warm = []
                self._short = 0.0
                self._too_long = 0
            return
        self._too_long = 0
        self._offset = None
        if periods < 1.5:
            lost = 0
            period += _ALPHA * (interval - period)
            self._period = period
            self._short = 0.5 * period
            residual = interval - period
        else:
            lost = int(periods + 0.5) - 1
            residual = interval - (lost + 1) * period
        self._count(lost)
        # The EWMA of the mean and the variance (West's incremental form).
        difference = residual - self._mean
        increment = _ALPHA * difference
        self._mean += increment
        self._variance = (1.0 - _ALPHA) * (self._variance + difference * increment)

    def _count(self, lost: int) -> None:
        self._block_losses += lost
        self._block_periods += lost + 1
        if self._block_periods >= BLOCK:
            self._losses = self._losses * _KEEP + self._block_losses
            self._periods = self._periods * _KEEP + self._block_periods
            self._block_losses = self._block_periods = 0

    def _seed(self, warm: list[float]) -> None:
        """The warm-up is over: the period is the median interval; count and measure the rest."""
        period = statistics.median(warm)
        self._warm = None
        self._period = period
        self._short = 0.5 * period
        residuals = []
        for interval in warm:
            periods = interval / period
            if 0.5 <= periods < MAX_LOSSES + 1.5:
                lost = int(periods + 0.5) - 1
                self._count(lost)
                residuals.append(interval - (lost + 1) * period)
        # At least the median's own interval is among them.
        self._mean = statistics.fmean(residuals)
        self._variance = statistics.pvariance(residuals, self._mean)
        self._offset = None

    # -- the verdict --------------------------------------------------------------

    def _verdict(self) -> float | None:
        """The verdict's offset from the last arrival; ``None`` without a model."""
        if self._warm is not None or self._too_long:
            return None
        offset = self._offset
        if offset is None:
            offset = self._offset = self._compute()
        return offset

    def _compute(self) -> float:
        loss = self.loss_rate
        budget = self._rate
        tolerated = 1
        longer = loss * loss  # P(more than `tolerated` lost in a row)
        while longer > budget * _LOSS_SHARE and tolerated < MAX_LOSSES:
            tolerated += 1
            longer *= loss
        self._tolerated = tolerated
        # P(exactly `tolerated` lost, then one later than the margin) may use
        # the rest. Bounded by P(later than the margin) alone: lateness and
        # losses are not assumed independent.
        rest = budget - longer
        if rest >= 0.5 or loss**tolerated * (1.0 - loss) <= rest:
            margin = self._mean  # no margin needed beyond the mean
        else:
            z = -_NORMAL.inv_cdf(rest if rest > 1e-300 else 1e-300)
            margin = self._mean + z * self._deviation()
        return (tolerated + 1) * self._period + margin

    def _deviation(self) -> float:
        deviation = math.sqrt(self._variance)
        return deviation if deviation > self._min_deviation else self._min_deviation

    def _survival(self, lost: int, lateness: float) -> float:
        """P(a live peer is silent this long): over ``lost`` lost, or ``lost`` and later than ``lateness``."""
        loss = self.loss_rate
        late = 0.5 * math.erfc((lateness - self._mean) / self._deviation() / _SQRT2)
        return loss ** (lost + 1) + min(loss**lost * (1.0 - loss), late)
