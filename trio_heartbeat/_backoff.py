"""Backoff policies: how long to wait before each reconnect attempt (sans-IO).

Theory of operation
-------------------
A backoff policy is a plain, immutable iterable of delays in seconds. It does
no I/O, never sleeps and never reads a clock: the reconnect supervisor calls
``iter(policy)`` at the start of every reconnect cycle, takes ``next()`` before
each attempt, sleeps for that long itself, and drops the iterator once it is
connected again (or once it has been healthy long enough) so that the next
cycle starts from the smallest delay. An exhausted iterator means "give up".

Because the supervisor owns the waiting, everything that has to do with time
passing stays in one place, above this module: reporting "backing off for 3.2
s", skipping the rest of a wait when nudged, and deadlines that must also cut
a hung connection attempt short (a Trio cancel scope does that; an iterator
consulted only between attempts cannot). What is left here is arithmetic, so a
policy with a fixed ``seed`` gives the same delays on every run, in any test,
with or without a clock.

Each exponential policy has an *envelope* ``min(cap, base * factor**n)`` for
the n-th delay (from 0) and draws the delay from a range set by it:

=================================  ==========================================
:class:`FullJitterBackoff`         ``uniform(0, envelope)``  (the default)
:class:`EqualJitterBackoff`        ``uniform(envelope / 2, envelope)``
:class:`ExponentialBackoff`        ``envelope * uniform(1 - jitter, 1 + jitter)``
:class:`DecorrelatedJitterBackoff` ``min(cap, uniform(base, factor * previous))``
:class:`ConstantBackoff`           ``delay``
=================================  ==========================================

Every policy also takes two limits, after which its iterator simply ends:
``max_attempts`` (at most that many delays) and ``max_elapsed`` (stop before
the delay that would take the running sum of delays past it), and a ``seed``
for its randomness. ``max_elapsed`` counts backoff delays only, on purpose: a
budget that includes connect time belongs to the supervisor's cancel scope.
Parameters are checked when a policy is built (:exc:`ValueError`, or
:exc:`TypeError` for a wrong type); iterating never raises.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice, repeat
from typing import Final, final

__all__ = [
    "DEFAULT_BACKOFF",
    "GRPC_BACKOFF",
    "GRPC_MIN_CONNECT_TIMEOUT",
    "ConstantBackoff",
    "DecorrelatedJitterBackoff",
    "EqualJitterBackoff",
    "ExponentialBackoff",
    "FullJitterBackoff",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class _BackoffPolicy(ABC):
    """The limits and the randomness that every policy shares."""

    #: At most this many delays per iterator; ``None`` for no limit.
    max_attempts: int | None = None
    #: Stop before the delay that would take the sum of delays past this many
    #: seconds; ``None`` for no limit. Only the delays count, not connect time.
    max_elapsed: float | None = None
    #: ``None``: fresh OS entropy for each iterator. An ``int``: every iterator
    #: yields the same delays. A ``random.Random``: iterators draw from it in
    #: turn, so a seeded instance makes a whole run reproducible.
    seed: int | random.Random | None = None

    def __post_init__(self) -> None:
        # Subclasses check their own fields in _validate() rather than by
        # overriding this and calling super(): slots=True rebuilds the class,
        # and zero-argument super() does not survive that on older Pythons.
        if self.max_attempts is not None:
            if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
                raise TypeError(f"max_attempts must be an int or None, not {self.max_attempts!r}")
            if self.max_attempts < 0:
                raise ValueError(f"max_attempts must be 0 or more, not {self.max_attempts}")
        if self.max_elapsed is not None and not self.max_elapsed >= 0:
            raise ValueError(
                f"max_elapsed must be 0 or more seconds, or None, not {self.max_elapsed!r}"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, (int, random.Random))
        ):
            raise TypeError(f"seed must be an int, a random.Random or None, not {self.seed!r}")
        self._validate()

    def __iter__(self) -> Iterator[float]:
        """A fresh iterator of delays, starting again from the smallest one."""
        rng = self.seed if isinstance(self.seed, random.Random) else random.Random(self.seed)
        delays = self._delays(rng)
        if self.max_attempts is not None:
            delays = islice(delays, self.max_attempts)
        return _stop_past(delays, self.max_elapsed)

    @abstractmethod
    def _validate(self) -> None:
        """Raise ValueError if the policy's own parameters make no sense."""

    @abstractmethod
    def _delays(self, rng: random.Random) -> Iterator[float]:
        """The unlimited sequence of delays."""


def _stop_past(delays: Iterator[float], max_elapsed: float | None) -> Iterator[float]:
    # The running total is summed left to right from zero, like sum(), so a
    # caller adding up what it received sees exactly the total checked here.
    elapsed = 0.0
    for delay in delays:
        elapsed += delay
        if max_elapsed is not None and elapsed > max_elapsed:
            return
        yield delay


def _envelope(base: float, factor: float, cap: float) -> Iterator[float]:
    # base * factor**n exactly as documented, until it reaches the cap; after
    # that the cap forever, so factor**n is never computed past the point
    # where it could overflow for any sane parameters.
    n = 0
    while True:
        try:
            value = base * factor**n
        except OverflowError:  # tiny base, huge cap: factor**n left the floats first
            break
        if value >= cap:
            break
        yield value
        n += 1
    yield from repeat(float(cap))


def _uniform(rng: random.Random, low: float, high: float) -> float:
    # random.uniform computes low + (high - low) * random(), which rounding can
    # push a hair outside [low, high]; the documented bounds must hold exactly.
    return min(high, max(low, rng.uniform(low, high)))


def _check_envelope(base: float, factor: float, cap: float) -> None:
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a positive, finite number of seconds, not {base!r}")
    if not (math.isfinite(factor) and factor >= 1):
        raise ValueError(f"factor must be at least 1 (and finite), not {factor!r}")
    if not (math.isfinite(cap) and cap >= base):
        raise ValueError(f"cap must be finite and at least base ({base!r} s), not {cap!r}")


@final
@dataclass(frozen=True, slots=True)
class FullJitterBackoff(_BackoffPolicy):
    """Exponential backoff with full jitter: each delay is ``uniform(0, envelope)``.

    The n-th delay (from 0) is drawn uniformly between 0 and
    ``min(cap, base * factor**n)``. Spreading every retry over the whole
    envelope is what keeps a fleet that lost its server at the same instant
    from coming back at the same instant. This is the default policy
    (:data:`DEFAULT_BACKOFF`).

    Invalid parameters raise :exc:`ValueError` (or :exc:`TypeError` for a
    wrong type) when the policy is built; iterating never raises.

    >>> policy = FullJitterBackoff(base=1.0, factor=2.0, cap=30.0, max_attempts=6, seed=1)
    >>> [round(delay, 2) for delay in policy]
    [0.13, 1.69, 3.06, 2.04, 7.93, 13.48]
    >>> list(policy) == list(policy)  # each iter() starts over; an int seed repeats
    True
    """

    #: The first envelope, in seconds.
    base: float = 1.0
    #: How much the envelope grows from one delay to the next.
    factor: float = 2.0
    #: The largest envelope, and so the largest delay, in seconds.
    cap: float = 30.0

    def _validate(self) -> None:
        _check_envelope(self.base, self.factor, self.cap)

    def _delays(self, rng: random.Random) -> Iterator[float]:
        return (_uniform(rng, 0.0, top) for top in _envelope(self.base, self.factor, self.cap))


@final
@dataclass(frozen=True, slots=True)
class EqualJitterBackoff(_BackoffPolicy):
    """Exponential backoff with equal jitter: each delay is ``uniform(envelope / 2, envelope)``.

    Half of every delay is fixed and half is random, so a retry never comes
    sooner than half the envelope, at the price of half the spread of
    :class:`FullJitterBackoff`.

    >>> policy = EqualJitterBackoff(base=1.0, factor=2.0, cap=8.0, max_attempts=6, seed=1)
    >>> [round(delay, 2) for delay in policy]
    [0.57, 1.85, 3.53, 5.02, 5.98, 5.8]
    """

    #: The first envelope, in seconds.
    base: float = 1.0
    #: How much the envelope grows from one delay to the next.
    factor: float = 2.0
    #: The largest envelope, and so the largest delay, in seconds.
    cap: float = 30.0

    def _validate(self) -> None:
        _check_envelope(self.base, self.factor, self.cap)

    def _delays(self, rng: random.Random) -> Iterator[float]:
        return (_uniform(rng, top / 2, top) for top in _envelope(self.base, self.factor, self.cap))


@final
@dataclass(frozen=True, slots=True)
class ExponentialBackoff(_BackoffPolicy):
    """Exponential backoff, with optional proportional jitter.

    The n-th delay (from 0) is ``envelope * uniform(1 - jitter, 1 + jitter)``
    with ``envelope = min(cap, base * factor**n)``. With the default
    ``jitter=0`` this is plain exponential backoff, the same delays every
    time; do not use that for a fleet, whose clients would all retry together.
    The jitter is applied *after* the cap, as gRPC does, so a delay can reach
    ``cap * (1 + jitter)``; :data:`GRPC_BACKOFF` is this class with gRPC's
    numbers.

    >>> list(ExponentialBackoff(base=0.5, factor=2.0, cap=4.0, max_attempts=6))
    [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    """

    #: The first envelope, in seconds.
    base: float = 1.0
    #: How much the envelope grows from one delay to the next.
    factor: float = 2.0
    #: The largest envelope, in seconds.
    cap: float = 30.0
    #: Each delay is the envelope times ``uniform(1 - jitter, 1 + jitter)``; 0 to 1.
    jitter: float = 0.0

    def _validate(self) -> None:
        _check_envelope(self.base, self.factor, self.cap)
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, not {self.jitter!r}")
        if not math.isfinite(self.cap * (1 + self.jitter)):
            raise ValueError(f"cap * (1 + jitter) overflows a float: cap={self.cap!r}")

    def _delays(self, rng: random.Random) -> Iterator[float]:
        low, high = 1 - self.jitter, 1 + self.jitter
        return (
            _uniform(rng, middle * low, middle * high)
            for middle in _envelope(self.base, self.factor, self.cap)
        )


@final
@dataclass(frozen=True, slots=True)
class DecorrelatedJitterBackoff(_BackoffPolicy):
    """Decorrelated jitter: each delay is ``min(cap, uniform(base, factor * previous))``.

    The "previous" delay before the first is ``base``, so the first delay lies
    in ``[base, factor * base]``. Each delay depends on the one before rather
    than on the attempt number; every delay is at least ``base`` and at most
    ``cap``. ``factor`` defaults to 3, the multiplier of the usual formulation.

    >>> policy = DecorrelatedJitterBackoff(base=1.0, cap=20.0, max_attempts=6, seed=1)
    >>> [round(delay, 2) for delay in policy]
    [1.27, 3.38, 7.98, 6.85, 10.68, 14.96]
    """

    #: The smallest delay, in seconds.
    base: float = 1.0
    #: The largest delay, in seconds.
    cap: float = 30.0
    #: The next delay is drawn from up to this many times the previous one.
    factor: float = 3.0

    def _validate(self) -> None:
        _check_envelope(self.base, self.factor, self.cap)
        if not math.isfinite(self.cap * self.factor):
            raise ValueError(f"cap * factor overflows a float: cap={self.cap!r}")

    def _delays(self, rng: random.Random) -> Iterator[float]:
        previous = float(self.base)
        while True:
            previous = min(float(self.cap), _uniform(rng, self.base, previous * self.factor))
            yield previous


@final
@dataclass(frozen=True, slots=True)
class ConstantBackoff(_BackoffPolicy):
    """The same delay every time.

    ``delay=0`` retries at once: only sensible together with ``max_attempts``.

    >>> list(ConstantBackoff(2.0, max_elapsed=7.0))
    [2.0, 2.0, 2.0]
    """

    #: Seconds to wait before every attempt.
    delay: float = 1.0

    def _validate(self) -> None:
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError(f"delay must be 0 or more finite seconds, not {self.delay!r}")

    def _delays(self, rng: random.Random) -> Iterator[float]:
        return repeat(float(self.delay))


#: The default for reconnecting clients: full jitter, 2 s base, doubling, 30 s
#: cap. No limit on attempts or time: a supervisor keeps trying until cancelled.
#: docs/backoff.md explains the numbers.
DEFAULT_BACKOFF: Final = FullJitterBackoff(base=2.0, factor=2.0, cap=30.0)

#: gRPC's connection backoff (grpc/grpc doc/connection-backoff.md): 1 s
#: initial backoff, multiplier 1.6, jitter of 20% either way, 120 s maximum
#: backoff. Unlike gRPC's pseudo-code, the first delay is jittered too.
GRPC_BACKOFF: Final = ExponentialBackoff(base=1.0, factor=1.6, cap=120.0, jitter=0.2)

#: gRPC's MIN_CONNECT_TIMEOUT, in seconds: the least time a connection attempt
#: is given to complete. The supervisor applies it; no policy reads it.
GRPC_MIN_CONNECT_TIMEOUT: Final = 20.0
