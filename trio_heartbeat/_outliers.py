"""Outlier ejection over several endpoints: a breaker each, and a cap on how many are out at once.

Theory of operation
-------------------
Envoy's outlier detection, built from our own breakers. Each endpoint has a
:class:`~._circuit.Breaker`: the calls made to it feed its window, and the
liveness bindings may force it open. An endpoint is *ejected* while its breaker
refuses calls (``OPEN`` or ``FORCED_OPEN``) and *returns* when it moves on to
``HALF_OPEN``, whose trial calls decide whether it stays. The open wait, which
grows with every trip in a row, is the ejection time, as Envoy's grows with
every ejection of a host.

So that a failing cluster cannot eject itself out of existence, at most
``floor(n * max_ejection_percent / 100)`` of the ``n`` endpoints are out at
once, never fewer than one as in Envoy, and none at ``0`` percent. The cap is
strict (Envoy checks that the share ejected is *under* the limit before each
ejection, which lets it go one past). Endpoints rank by when their breaker last
shut (``OPEN`` to ``FORCED_OPEN`` keeps the place); the first ones up to the cap
are ejected, the others are *over the cap* and, like a host Envoy may not
eject, stay in the rotation: a call to one goes straight to ``fn``, past the
breaker that would refuse it (unless liveness forced it open: a convicted peer
gets no call, cap or no cap, though the client may still dial it to find out
whether it is back), and its outcome is counted apart in
:meth:`OutlierEjection.statistics`, not in the breaker, which takes no outcomes
while shut (its timer, or ``liveness_restored``, moves it on as usual). When an
ejected endpoint returns, the earliest over-cap one still shut takes its place.
The ejected set is a function of the breakers' states and the order they shut,
never of earlier decisions, so the cap holds whatever they do, forced opens
included. As for :class:`~._circuit.Breaker`, there is no background task: an
``OPEN`` whose wait is over is noticed when somebody looks (any method here).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar, TypeVarTuple, Unpack, final

import trio

from ._breaker import BreakerConfig, BreakerState, BreakerTransition
from ._circuit import HEARTBEAT_BREAKER_CONFIG, Breaker, default_record_failure
from ._endpoints import Endpoint, format_endpoint, parse_endpoint
from ._errors import CircuitOpen, UnknownEndpoint

__all__ = [
    "EjectionEvent",
    "OutlierEjection",
    "OutlierStatistics",
    "ejection_cap",
]

logger = logging.getLogger("trio_heartbeat")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: The states in which a breaker refuses every call: its endpoint is an outlier.
_SHUT = frozenset({BreakerState.OPEN, BreakerState.FORCED_OPEN})


def ejection_cap(endpoints: int, percent: float) -> int:
    """How many of ``endpoints`` may be ejected at once under ``percent``.

    >>> ejection_cap(4, 50.0), ejection_cap(3, 10.0), ejection_cap(3, 0.0)
    (2, 1, 0)
    """
    if percent == 0:
        return 0
    return max(1, math.floor(endpoints * percent / 100))


@final
@dataclass(frozen=True, slots=True)
class EjectionEvent:
    """An endpoint was ejected, or returned, as the listeners hear of it."""

    #: ``"host:port"``.
    endpoint: str
    #: ``True`` when it was ejected, ``False`` when it returned.
    ejected: bool
    #: ``trio.current_time()`` at the change.
    at: float
    #: Why: the breaker's reason, or the endpoint whose return made room under the cap.
    reason: str


@final
@dataclass(frozen=True, slots=True)
class OutlierStatistics:
    """A snapshot of :meth:`OutlierEjection.statistics`."""

    endpoints: int
    #: The cap: how many may be ejected at once.
    max_ejected: int
    #: Ejected now, earliest first.
    ejected: tuple[str, ...]
    #: Shut breakers past the cap, still in the rotation, earliest first.
    over_cap: tuple[str, ...]
    #: Ejections since the start (a return and a new ejection count again).
    ejections: int
    #: Calls made to over-cap endpoints, and those that failed (``record_failure``).
    over_cap_calls: int
    over_cap_failures: int


Listener = Callable[[EjectionEvent], object]


@final
class OutlierEjection:
    """Several endpoints, a :class:`~._circuit.Breaker` each, and the ejection cap.

    Build it inside ``trio.run`` (the breakers read the clock):

    >>> async def demo() -> None:
    ...     pool = OutlierEjection(["a:1", "b:1", "c:1", "d:1"], max_ejection_percent=25.0)
    ...     pool.breaker("a:1").force_open("peer convicted")
    ...     pool.breaker("b:1").force_open("peer convicted")
    ...     assert pool.ejected() == ("a:1",)  # the cap: one of four
    ...     assert pool.available() == ["b:1", "c:1", "d:1"]
    >>> trio.run(demo)

    As an endpoint source for ``open_reconnecting_client``, ``async for`` over
    it yields the next endpoint to dial, round-robin over what calling it
    returns at that moment (the client asks before every attempt): every
    endpoint but those ejected on their failure rate, until their open wait is
    over. An endpoint that liveness forced open stays in the round, since only
    a new connection can show that its peer is back (a SERVING heartbeat lifts
    its breaker), and no breaker hears of a dial that fails, so a dead endpoint
    and a recovered one take their turns alike; the client's backoff paces the
    attempts. With no endpoint left at all, every one is offered, as an empty
    list would make the client give up.
    """

    __slots__ = (
        "_breakers",
        "_counts",
        "_cursor",
        "_ejected",
        "_endpoints",
        "_listeners",
        "_max_ejected",
        "_record_failure",
        "_shut",
        "_starts",
    )

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        config: BreakerConfig = HEARTBEAT_BREAKER_CONFIG,
        max_ejection_percent: float = 50.0,
        record_failure: Callable[[BaseException], bool] = default_record_failure,
    ) -> None:
        if isinstance(endpoints, str):
            raise TypeError(f"endpoints must be a list of endpoints, not one: {endpoints!r}")
        names = tuple(format_endpoint(*parse_endpoint(endpoint)) for endpoint in endpoints)
        if not names:
            raise ValueError("at least one endpoint is needed")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"endpoints listed twice: {', '.join(repeated)}")
        percent = max_ejection_percent
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise TypeError(f"max_ejection_percent must be a number, not {percent!r}")
        if not 0 <= percent <= 100:
            raise ValueError(f"max_ejection_percent must be 0 to 100, not {percent!r}")
        self._endpoints = names
        self._max_ejected = ejection_cap(len(names), percent)
        self._record_failure = record_failure
        self._listeners: list[Listener] = []
        # Endpoints whose breaker is shut, in the order they shut (a dict keeps it).
        self._shut: dict[str, None] = {}
        self._ejected: tuple[str, ...] = ()
        self._counts = [0, 0, 0]  # ejections, over-cap calls, over-cap failures
        self._cursor = 0  # where call() looks first
        self._starts = 0  # where the next dialling iterator starts
        self._breakers = {name: Breaker(config, record_failure=record_failure) for name in names}
        for name, breaker in self._breakers.items():
            breaker.add_listener(functools.partial(self._moved, name))

    # -- observing -------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every endpoint, as ``"host:port"``, in the order given."""
        return self._endpoints

    def breaker(self, endpoint: Endpoint) -> Breaker:
        """The breaker of ``endpoint`` (any spelling); :exc:`UnknownEndpoint` if not ours."""
        name = format_endpoint(*parse_endpoint(endpoint))
        try:
            return self._breakers[name]
        except KeyError:
            raise UnknownEndpoint(name) from None

    def ejected(self) -> tuple[str, ...]:
        """The endpoints ejected now, earliest first."""
        self._look()
        return self._ejected

    def available(self) -> list[str]:
        """The endpoints not ejected now, in the order given (over-cap ones included)."""
        self._look()
        return [name for name in self._endpoints if name not in self._ejected]

    def __call__(self) -> list[str]:
        """The endpoints to dial now, never none: every one but those ejected on their
        failure rate until their open wait is over (a peer that liveness forced open
        can only show it is back over a new connection); all, if that leaves none."""
        self._look()
        breakers, ejected = self._breakers, self._ejected
        dialable = [
            name
            for name in self._endpoints
            if name not in ejected or breakers[name].core.state is BreakerState.FORCED_OPEN
        ]
        return dialable or list(self._endpoints)

    def __aiter__(self) -> AsyncIterator[str]:
        """Endlessly, the endpoint to dial next, round-robin over the available ones.

        Each new iteration starts one endpoint further on, so that clients
        sharing one :class:`OutlierEjection` spread over the endpoints.
        """
        start, self._starts = self._starts, self._starts + 1
        return _Dialling(self, start % len(self._endpoints))

    def statistics(self) -> OutlierStatistics:
        """The counters as of now."""
        self._look()
        ejections, calls, failures = self._counts
        return OutlierStatistics(
            endpoints=len(self._endpoints),
            max_ejected=self._max_ejected,
            ejected=self._ejected,
            over_cap=tuple(islice(self._shut, self._max_ejected, None)),
            ejections=ejections,
            over_cap_calls=calls,
            over_cap_failures=failures,
        )

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` at every ejection and return; its errors are logged."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; :exc:`ValueError` if it was not added."""
        self._listeners.remove(listener)

    def __repr__(self) -> str:
        return (
            f"<OutlierEjection {len(self._endpoints)} endpoints, "
            f"{len(self._ejected)} ejected of at most {self._max_ejected}>"
        )

    # -- calls -----------------------------------------------------------------

    async def call(self, fn: Callable[[str, Unpack[Ts]], Awaitable[T]], *args: *Ts) -> T:
        """``await fn(endpoint, *args)`` on the next available endpoint, through its breaker.

        Endpoints take turns. An ejected one is skipped; one whose breaker
        refuses anyway (``HALF_OPEN`` with every trial slot taken) is passed
        over for the next; an over-cap one is called past its breaker, unless
        liveness forced it open (a convicted peer gets no call).
        :exc:`~._circuit.CircuitOpen` only when no endpoint could be tried:
        no call was made.
        """
        self._look()
        count = len(self._endpoints)
        refusals: list[CircuitOpen] = []
        for step in range(count):
            index = (self._cursor + step) % count
            name = self._endpoints[index]
            if name in self._ejected:
                continue
            if name in self._shut:
                if self._breakers[name].core.state is BreakerState.FORCED_OPEN:
                    continue  # convicted by liveness: no call reaches it, cap or no cap
                self._cursor = index + 1
                return await self._call_over_cap(name, fn, args)
            async with AsyncExitStack() as stack:
                try:
                    await stack.enter_async_context(self._breakers[name])
                except CircuitOpen as refused:
                    refusals.append(refused)
                    continue
                self._cursor = index + 1
                return await fn(name, *args)
        await trio.lowlevel.checkpoint()
        raise self._refusal(refusals)

    async def call_with_fallback(
        self,
        fn: Callable[[str, Unpack[Ts]], Awaitable[T]],
        *args: *Ts,
        fallback: Callable[[Exception], Awaitable[T]],
        on_failure: bool = True,
    ) -> T:
        """:meth:`call`, or ``await fallback(exc)``, as :meth:`Breaker.call_with_fallback`."""
        try:
            return await self.call(fn, *args)
        except CircuitOpen as exc:
            refused: Exception = exc
        except Exception as exc:
            if not (on_failure and self._record_failure(exc)):
                raise
            refused = exc
        return await fallback(refused)

    # -- inside ----------------------------------------------------------------

    def _look(self) -> None:
        # An OPEN whose wait is over becomes HALF_OPEN here, and _moved hears of it.
        now = trio.current_time()
        for breaker in self._breakers.values():
            breaker.core.handle_timeout(now)

    def _pick(self, position: int) -> tuple[str, int]:
        """The first endpoint to dial from ``position`` on, and the position after it."""
        choices = set(self())  # never empty
        count = len(self._endpoints)
        turns = ((position + step) % count for step in range(count))
        index = next(index for index in turns if self._endpoints[index] in choices)
        return self._endpoints[index], (index + 1) % count

    async def _call_over_cap(
        self, name: str, fn: Callable[[str, Unpack[Ts]], Awaitable[T]], args: tuple[*Ts]
    ) -> T:
        self._counts[1] += 1
        try:
            return await fn(name, *args)
        except BaseException as exc:
            if self._record_failure(exc):
                self._counts[2] += 1
            raise

    def _refusal(self, refusals: list[CircuitOpen]) -> CircuitOpen:
        now = trio.current_time()
        waits = [
            max(0.0, until - now)
            for breaker in self._breakers.values()
            if (until := breaker.core.next_transition) is not None
        ]
        if waits:
            return CircuitOpen(BreakerState.OPEN, min(waits))
        return refusals[0] if refusals else CircuitOpen(BreakerState.FORCED_OPEN)

    def _moved(self, name: str, transition: BreakerTransition) -> None:
        if transition.state in _SHUT:
            self._shut.setdefault(name, None)  # OPEN to FORCED_OPEN keeps its place
        else:
            self._shut.pop(name, None)
        before, after = self._ejected, tuple(islice(self._shut, self._max_ejected))
        self._ejected = after
        events = [
            EjectionEvent(gone, False, transition.at, transition.reason)
            for gone in before
            if gone not in after
        ]
        for new in after:
            if new not in before:
                why = transition.reason if new == name else f"room under the cap: {name} returned"
                events.append(EjectionEvent(new, True, transition.at, why))
        self._counts[0] += sum(event.ejected for event in events)
        for event in events:
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    logger.exception("outlier listener %r failed on %r", listener, event)


@final
class _Dialling:
    """One client's endless round of endpoints to dial (see :meth:`OutlierEjection.__aiter__`)."""

    __slots__ = ("_ejection", "_position")

    def __init__(self, ejection: OutlierEjection, position: int) -> None:
        self._ejection = ejection
        self._position = position

    def __aiter__(self) -> _Dialling:
        return self

    async def __anext__(self) -> str:
        await trio.lowlevel.checkpoint()
        name, self._position = self._ejection._pick(self._position)
        return name
