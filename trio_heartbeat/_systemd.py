"""A server under systemd: readiness, status, the drain and the watchdog, over the notify protocol.

Theory of operation
-------------------
:class:`~trio_heartbeat._sdnotify.SystemdNotifier` speaks the protocol;
this module says what a heartbeat server tells systemd, and when.
:func:`notify_systemd` runs beside a :class:`Server` that already listens:

* ``READY=1`` at once, with a ``STATUS=`` line (systemd starts the units that
  wait for this one only then, and ``systemctl status`` shows the line);
* ``STATUS=`` again whenever the number of peers or the server's health
  changes (the registry's :meth:`~LivenessRegistry.wait_changed`, at most
  once per ``status_every`` seconds);
* ``WATCHDOG=1`` at half of ``WATCHDOG_USEC`` while the process is healthy:
  the pings come from the event loop, so a blocked loop stops them, and so
  does a server whose health has been NOT_SERVING for longer than ``grace``
  seconds, or an application's own ``healthy()`` that says no (a supervisor
  that gave up, say); systemd's ``WatchdogSec=`` with ``Restart=on-watchdog``
  then restarts the process;
* ``STOPPING=1`` the moment the server begins to drain.

It never raises into the server for systemd's sake (the notifier drops what
it cannot send), and all its timing is ``trio.current_time()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import trio

from ._frames import HealthStatus
from ._sdnotify import SystemdNotifier
from ._server import Server

__all__ = ["DEFAULT_GRACE", "notify_systemd"]

#: How long a NOT_SERVING server may go on pinging systemd's watchdog, seconds.
DEFAULT_GRACE: Final = 10.0


class _Health:
    """Whether the watchdog may ping: not NOT_SERVING for longer than the grace, and the
    application's own word."""

    __slots__ = ("_grace", "_healthy", "_server", "_since")

    def __init__(self, server: Server, grace: float, healthy: Callable[[], bool] | None) -> None:
        self._server = server
        self._grace = grace
        self._healthy = healthy
        self._since: float | None = None  # when NOT_SERVING began

    def __call__(self) -> bool:
        now = trio.current_time()
        if self._server.config.status is HealthStatus.NOT_SERVING:
            if self._since is None:
                self._since = now
        else:
            self._since = None
        if self._since is not None and now - self._since > self._grace:
            return False
        return self._healthy() if self._healthy is not None else True


def _status_line(server: Server) -> str:
    return f"{len(server.registry)} peer(s), {server.config.status.name}"


async def notify_systemd(
    server: Server,
    notifier: SystemdNotifier | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    healthy: Callable[[], bool] | None = None,
    status_every: float = 1.0,
    task_status: trio.TaskStatus[SystemdNotifier | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Tell systemd about ``server`` until cancelled; start it once the server listens.

    ``notifier`` defaults to :meth:`SystemdNotifier.from_environment`; with no
    ``NOTIFY_SOCKET`` it returns at once (after ``task_status.started(None)``),
    so a server can always run it. See the module's documentation for what is
    sent and when.

    >>> async def main(server: Server) -> None:  # doctest: +SKIP
    ...     async with trio.open_nursery() as nursery:
    ...         await nursery.start(server.serve_tcp, 7400)
    ...         await nursery.start(notify_systemd, server)
    """
    if not (grace >= 0 and math.isfinite(grace)) or not status_every > 0:
        raise ValueError("grace must be finite and not negative, status_every positive")
    if notifier is None:
        notifier = SystemdNotifier.from_environment()
    if notifier is None:
        task_status.started(None)
        return None
    await notifier.ready(_status_line(server))
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog, _Health(server, grace, healthy))
        task_status.started(notifier)
        async with trio.open_nursery() as reports:
            reports.start_soon(_report_status, server, notifier, status_every)
            await server.wait_draining()
            reports.cancel_scope.cancel()
        await notifier.stopping(f"draining {len(server.registry)} peer(s)")
        # The watchdog goes on through the drain (it is work, and healthy) until cancelled.


async def _report_status(server: Server, notifier: SystemdNotifier, every: float) -> None:
    # The peer count moves the registry; the health does not, so it is looked at
    # every ``every`` seconds too.
    last = _status_line(server)
    while True:
        with trio.move_on_after(every):
            await server.registry.wait_changed()
        line = _status_line(server)
        if line != last:
            await notifier.status(line)
            last = line
