"""What a service supervisor reports: its events and its counters.

:func:`~trio_heartbeat._services.open_service_supervisor` reports every start,
exit, restart, stop, abandonment and its own end as a frozen
:class:`ServiceEvent` to its listeners (and to the log), in the order they
happen; :class:`ServiceStatistics` is what its ``statistics()`` returns.
Events compare by value, so a test (or a listener) can match them whole:

>>> ChildExited("worker", ExitKind.HUNG, None) == ChildExited("worker", ExitKind.HUNG, None)
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias, final

from ._errors import SupervisorGaveUp
from ._restart import ExitKind

__all__ = [
    "ChildAbandoned",
    "ChildExited",
    "ChildRestarting",
    "ChildStarted",
    "ChildStopped",
    "ServiceEvent",
    "ServiceListener",
    "ServiceStatistics",
    "SupervisorStopped",
]


@dataclass(frozen=True, slots=True)
class ServiceEvent:
    """Base class of everything a service supervisor reports."""


@final
@dataclass(frozen=True, slots=True)
class ChildStarted(ServiceEvent):
    """The child's task was spawned."""

    name: str


@final
@dataclass(frozen=True, slots=True)
class ChildExited(ServiceEvent):
    """The child ended on its own (or hung): NORMAL, FAILED with ``error``, or HUNG.

    If this exit is one too many for the budget, the supervisor's ``error``
    is already set when listeners hear it.
    """

    name: str
    kind: ExitKind
    error: Exception | None


@final
@dataclass(frozen=True, slots=True)
class ChildRestarting(ServiceEvent):
    """``name`` exited and ``children`` (it among them) start again in ``delay`` seconds."""

    name: str
    delay: float
    children: tuple[str, ...]


@final
@dataclass(frozen=True, slots=True)
class ChildStopped(ServiceEvent):
    """The supervisor stopped the child (a sibling's restart, a give-up, the block's end)."""

    name: str


@final
@dataclass(frozen=True, slots=True)
class ChildAbandoned(ServiceEvent):
    """The child did not end within ``shutdown_timeout`` seconds of its cancellation."""

    name: str
    shutdown_timeout: float


@final
@dataclass(frozen=True, slots=True)
class SupervisorStopped(ServiceEvent):
    """The supervisor ended: ``error`` if it gave up, ``None`` if its block was left."""

    error: SupervisorGaveUp | None


#: Called as ``listener(event)``; its exceptions are logged, never raised.
ServiceListener: TypeAlias = Callable[[ServiceEvent], None]


@final
@dataclass(frozen=True, slots=True)
class ServiceStatistics:
    """What :meth:`ServiceSupervisor.statistics` reports."""

    #: Children started, restarts included.
    starts: int
    #: Ends reported to the plan, by kind (ends the supervisor caused are ``stopped``).
    normal_exits: int
    failed_exits: int
    hung_exits: int
    #: Children the supervisor stopped.
    stopped: int
    #: Children that did not end within their shutdown timeout.
    abandoned: int
    #: Decisions that restarted something (each counts once against the budget).
    restarts: int
    #: The running children, in start order.
    running: tuple[str, ...]
