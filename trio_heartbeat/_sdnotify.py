"""systemd's notify protocol, with no dependency: readiness, status, stopping and the watchdog.

Theory of operation
-------------------
A service that systemd starts with ``Type=notify`` finds, in its environment,
``NOTIFY_SOCKET``: the address of a datagram socket on which the service
manager listens. Each notification is one datagram whose payload is a few
``KEY=VALUE`` lines joined by newlines (``READY=1``, ``STATUS=...``,
``STOPPING=1``, ``WATCHDOG=1``). An address that starts with ``@`` names a
socket in Linux's abstract namespace (on the wire the ``@`` becomes a NUL
byte); any other address is the absolute path of a socket file. That is the
whole protocol, so :class:`SystemdNotifier` speaks it itself, with no
libsystemd and no package beyond Trio.

With ``WatchdogSec=`` set, systemd also passes ``WATCHDOG_USEC`` (the timeout,
in microseconds) and usually ``WATCHDOG_PID`` (the process the pings must come
from; a child that inherited the variables is not that process and must keep
quiet). The service owes a ``WATCHDOG=1`` before each timeout runs out;
pinging at half the timeout leaves a whole interval of slack.
:meth:`SystemdNotifier.run_watchdog` pings at that pace from the event loop
itself, and only while the application's ``healthy()`` says so. A loop that
is blocked, or a process that judges itself unwell, therefore stops pinging,
and systemd restarts it: the watchdog measures the one thing that matters,
that the loop still runs and still thinks it is fine.

The pings are never closer together than :data:`MIN_WATCHDOG_INTERVAL`
(10 ms): a loop that pinged at half of ``WATCHDOG_USEC=1`` would spend all
its time on the watchdog, and a timeout of a few milliseconds cannot be kept
by an event loop anyway (one full garbage collection can outlast it).
systemd's own ``sd_watchdog_enabled()`` accepts any timeout from 1 µs, so
:meth:`~SystemdNotifier.from_environment` raises a half-timeout under the
floor to the floor and logs a warning, while the constructor refuses a
shorter ``watchdog_interval``.

The notifier must never hurt the service it reports on. Every datagram goes
out with a single non-blocking ``sendto`` on a plain socket (Trio's own
socket ``sendto`` would wait for room in a full buffer, and a notification is
not worth waiting for): a message that would block, or that fails because the
manager is gone, is dropped and counted in ``dropped``, never raised. The
log says so sparingly. The first failure of a run of failures is a warning
and its end (the next message that goes through) an info line with the
count, but a run that starts less than a minute after the last warning
is logged by neither; its drops are counted in the next warning. A buffer
that fills and drains all day, or a manager that keeps coming and going,
costs at most one warning and one info line a minute. The minute is read on
Trio's clock (:func:`trio.current_time`), or on :func:`time.monotonic` for a
send made outside Trio (a worker thread); a reading earlier than the last
warning counts as a minute passed, so mixing the two clocks can bring a
warning early but never silence one. Only programming errors raise
:exc:`ValueError` (a key that is not a variable name, a value with a
newline, a message over :data:`MAX_MESSAGE` bytes): they are wrong on
every run, and a test finds them.

``from_environment`` decides what an unusable variable means: it logs a
warning and carries on without it, rather than stop a service over the
channel it reports on, and it never raises, whatever the strings. An unusable
``NOTIFY_SOCKET`` (a relative path, a ``vsock:`` address, a NUL byte) is as
if it were unset: no notifier, and a unit that needs readiness fails its
start-up timeout with the warning in its journal. An unusable
``WATCHDOG_USEC`` or ``WATCHDOG_PID`` means no watchdog. Like systemd's
``sd_watchdog_enabled()``, it takes ``WATCHDOG_USEC`` as a decimal number
from 1 to ``2**64 - 2`` (``2**64 - 1`` is systemd's "infinity") and
``WATCHDOG_PID`` as a process id from 1 to ``2**31 - 1``; it also
refuses leading zeros, signs, white space and digits other than ASCII ones,
none of which systemd writes, and checks the length before converting, so
that 5,000 digits cost nothing. The constructor, used by code that names the
address itself, raises :exc:`ValueError` instead.

A unit file that restarts a server whose loop blocks or whose health fails::

    [Unit]
    Description=trio-heartbeat echo server
    After=network-online.target
    Wants=network-online.target

    [Service]
    Type=notify
    # Only the main process may notify; WATCHDOG_PID names it.
    NotifyAccess=main
    ExecStart=/usr/bin/python3 -m trio_heartbeat serve --host 0.0.0.0 --port 7400
    # Pings every 5 s (half of this); 10 s without one kills the process...
    WatchdogSec=10s
    # ...and this restarts it (on-failure would too, and on crashes besides).
    Restart=on-watchdog
    RestartSec=1s
    # Long enough for the drain that follows STOPPING=1.
    TimeoutStopSec=30s

    [Install]
    WantedBy=multi-user.target
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Final, final

import trio

__all__ = ["MAX_MESSAGE", "MIN_WATCHDOG_INTERVAL", "STATUS_LIMIT", "SystemdNotifier"]

logger = logging.getLogger("trio_heartbeat.sdnotify")

#: The largest datagram sent, in bytes of UTF-8 (systemd reads more, but a
#: notification is a few short lines).
MAX_MESSAGE: Final = 4096
#: The longest ``STATUS=`` text :meth:`SystemdNotifier.status` sends, in characters.
STATUS_LIMIT: Final = 256

#: The shortest time between two ``WATCHDOG=1``, in seconds.
MIN_WATCHDOG_INTERVAL: Final = 0.01

#: A run of failed sends that starts sooner than this after the last warning
#: (in seconds) is not logged.
_REPORT_EVERY: Final = 60.0
#: The largest ``WATCHDOG_USEC`` (2**64 - 1 is systemd's USEC_INFINITY) and ``WATCHDOG_PID``.
_MAX_USEC: Final = 2**64 - 2
_MAX_PID: Final = 2**31 - 1

_KEY: Final = re.compile(r"[A-Z_][A-Z0-9_]*")
#: A positive decimal number as systemd writes one: ASCII digits, no leading zero.
_NUMBER: Final = re.compile(r"[1-9][0-9]*")
_WHITESPACE: Final = re.compile(r"\s+")


def _check_field(key: str, value: str) -> None:
    if _KEY.fullmatch(key) is None:
        raise ValueError(f"not a notification variable name: {key!r}")
    if "\n" in value or "\0" in value:
        raise ValueError(f"{key}= must be one line without NUL bytes, got {value!r}")


def _sanitize_status(text: str) -> str:
    """``text`` on one printable line of at most :data:`STATUS_LIMIT` characters."""
    printable = "".join(char if char.isprintable() else " " for char in text)
    line = _WHITESPACE.sub(" ", printable).strip()
    if len(line) > STATUS_LIMIT:
        line = line[: STATUS_LIMIT - 1].rstrip() + "\u2026"
    return line


def _sockaddr(address: str) -> str | bytes:
    """The socket address of ``address`` (``@name`` or ``/path``); :exc:`ValueError` if neither."""
    if "\0" in address:
        raise ValueError(f"a notify socket address has no NUL byte: {address!r}")
    if address.startswith("@") and len(address) > 1:
        return b"\0" + os.fsencode(address[1:])
    if address.startswith("/"):
        return address
    raise ValueError(f"a notify socket is '@name' (abstract) or an absolute path, got {address!r}")


def _shown(value: str) -> str:
    """``value`` for a log line: its repr, cut short if it is long."""
    if len(value) <= 40:
        return repr(value)
    return f"{value[:32]!r}... ({len(value)} characters)"


def _number(value: str, largest: int) -> int | None:
    """``value`` as a decimal number from 1 to ``largest``, or ``None``.

    The length is checked before :func:`int` runs, which would raise past
    ``sys.get_int_max_str_digits()`` digits.
    """
    if _NUMBER.fullmatch(value) is None or len(value) > len(str(largest)):
        return None
    number = int(value)
    return number if number <= largest else None


def _parse_watchdog(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, if the pings are expected of process ``pid``.

    Never raises: an unusable value is logged and means no watchdog.
    """
    text = environ.get("WATCHDOG_USEC", "")
    if not text:
        return None
    usec = _number(text, _MAX_USEC)
    if usec is None:
        logger.warning(
            "ignoring WATCHDOG_USEC=%s: not a number of microseconds from 1 to 2**64 - 2",
            _shown(text),
        )
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        owner_pid = _number(owner, _MAX_PID)
        if owner_pid is None:
            logger.warning(
                "ignoring the watchdog: WATCHDOG_PID=%s is not a process id", _shown(owner)
            )
            return None
        if owner_pid != pid:
            return None  # the pings are someone else's to send (we are a child)
    interval = usec / 2_000_000
    if interval < MIN_WATCHDOG_INTERVAL:
        logger.warning(
            "WATCHDOG_USEC=%s: a timeout of %g s is too short to keep from an event loop; "
            "pinging every %g s instead of %g s",
            text,
            usec / 1_000_000,
            MIN_WATCHDOG_INTERVAL,
            interval,
        )
        return MIN_WATCHDOG_INTERVAL
    return interval


def _now() -> float:
    """Trio's clock in a Trio run, else :func:`time.monotonic` (see the module's documentation)."""
    try:
        return trio.current_time()
    except RuntimeError:  # not in a Trio run: a worker thread, or no loop at all
        return time.monotonic()


@final
class SystemdNotifier:
    """Notifications to the service manager at ``address``, one datagram each.

    ``address`` is written as in ``NOTIFY_SOCKET``: ``@name`` for an abstract
    socket, else an absolute path. ``watchdog_interval`` is the time between
    two ``WATCHDOG=1`` in seconds (``None``: no watchdog), at least
    :data:`MIN_WATCHDOG_INTERVAL`. Raises :exc:`ValueError` for an address or
    interval that cannot be used. Most code calls :meth:`from_environment`
    instead.

    >>> notifier = SystemdNotifier("@example/notify", watchdog_interval=5.0)
    >>> notifier
    SystemdNotifier('@example/notify', watchdog_interval=5.0)
    >>> SystemdNotifier.from_environment({}) is None  # not started by systemd
    True
    >>> env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "10000000"}
    >>> SystemdNotifier.from_environment(env).watchdog_interval
    5.0

    In a Trio application (``serve`` and ``is_healthy`` are yours; ``serve``
    calls ``task_status.started()`` once it listens)::

        notifier = SystemdNotifier.from_environment()
        if notifier is not None:
            async with notifier, trio.open_nursery() as nursery:
                await nursery.start(serve)
                await notifier.ready(status="serving")
                await nursery.start(notifier.run_watchdog, is_healthy)
                ...  # until asked to stop, then:
                await notifier.stopping(status="draining")

    Sending never raises and never waits: see the module's documentation.
    After :meth:`aclose`, messages are dropped quietly.
    """

    __slots__ = (
        "_closed",
        "_failing",
        "_logged",
        "_reported",
        "_sockaddr",
        "_socket",
        "_warned_at",
        "address",
        "dropped",
        "sent",
        "watchdog_interval",
    )

    def __init__(self, address: str, watchdog_interval: float | None = None) -> None:
        self._sockaddr = _sockaddr(address)
        if watchdog_interval is not None and not (
            MIN_WATCHDOG_INTERVAL <= watchdog_interval < math.inf
        ):
            raise ValueError(
                f"watchdog_interval must be a number of seconds from {MIN_WATCHDOG_INTERVAL} "
                f"(finite) or None, got {watchdog_interval!r}"
            )
        self.address = address
        self.watchdog_interval = watchdog_interval
        #: How many messages went out.
        self.sent = 0
        #: How many messages were dropped: a full buffer, a manager gone, or sent after closing.
        self.dropped = 0
        self._socket: socket.socket | None = None
        self._failing = False  # in a run of failed sends
        self._reported = False  # ...whose first failure was logged
        self._logged = 0  # how many of the `dropped` the log has told of
        self._warned_at: float | None = None  # when the last warning was logged
        self._closed = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] = os.environ, pid: int | None = None
    ) -> SystemdNotifier | None:
        """The notifier that ``NOTIFY_SOCKET`` asks for, or ``None`` without one.

        ``WATCHDOG_USEC`` sets :attr:`watchdog_interval` to half its value
        (but at least :data:`MIN_WATCHDOG_INTERVAL`, with a warning), unless
        ``WATCHDOG_PID`` names another process than ``pid`` (by default, this
        one). Never raises: a value that cannot be used is logged as a
        warning, and means no watchdog (``WATCHDOG_USEC``, ``WATCHDOG_PID``)
        or no notifier (``NOTIFY_SOCKET``).
        """
        address = environ.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        interval = _parse_watchdog(environ, os.getpid() if pid is None else pid)
        try:
            return cls(address, interval)
        except ValueError as exc:
            logger.warning("not notifying systemd: NOTIFY_SOCKET: %s", exc)
            return None

    def __repr__(self) -> str:
        return f"SystemdNotifier({self.address!r}, watchdog_interval={self.watchdog_interval!r})"

    # -- sending --------------------------------------------------------------------------

    def send_nowait(self, message: str) -> bool:
        """Send ``message`` (``KEY=VALUE`` lines) now; true if it went out.

        Raises :exc:`ValueError` for a malformed or oversized message, and
        nothing else: a failed send is counted in :attr:`dropped` and logged,
        at most once a minute (see the module's documentation).
        """
        if not message:
            raise ValueError("an empty notification")
        for line in message.split("\n"):
            key, equals, value = line.partition("=")
            if not equals:
                raise ValueError(f"a notification line is KEY=VALUE, got {line!r}")
            _check_field(key, value)
        payload = message.encode("utf-8")
        if len(payload) > MAX_MESSAGE:
            raise ValueError(f"a notification of {len(payload)} bytes (at most {MAX_MESSAGE})")
        if self._closed:
            self.dropped += 1
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(payload, self._sockaddr)
        except OSError as exc:  # BlockingIOError (a full buffer) among them
            self._failed(exc)
            return False
        if self._failing:
            self._failing = False
            if self._reported:
                logger.info(
                    "notifications to %s go through again (%d dropped)",
                    self.address,
                    self.dropped - self._logged,
                )
                self._logged = self.dropped
        self.sent += 1
        return True

    def _failed(self, exc: OSError) -> None:
        """Count a failed send; log it if it starts a run of failures and a warning is due."""
        self.dropped += 1
        if self._failing:
            return
        self._failing = True
        now = _now()
        last = self._warned_at
        self._reported = last is None or not last <= now < last + _REPORT_EVERY
        if not self._reported:
            return
        self._warned_at = now
        unlogged = self.dropped - 1 - self._logged  # in the runs that were not logged
        self._logged = self.dropped - 1
        logger.warning(
            "notification to %s dropped (%s)%s; further failures are not logged until one "
            "goes through, nor a new run of them within %g s",
            self.address,
            exc.strerror or exc,
            f"; {unlogged} more dropped since the last warning" if unlogged else "",
            _REPORT_EVERY,
        )

    async def send(self, message: str) -> bool:
        """Send ``message``, as :meth:`send_nowait`, at a checkpoint; true if it went out.

        Cancelled before sending, it sends nothing.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            return self.send_nowait(message)
        finally:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def notify(self, **fields: str | int) -> bool:
        """Send ``fields`` as one message: ``await notifier.notify(READY=1, STATUS="up")``."""
        if not fields:
            raise ValueError("an empty notification")
        lines = []
        for key, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise ValueError(f"{key}= takes a string or an integer, got {value!r}")
            _check_field(key, str(value))
            lines.append(f"{key}={value}")
        return await self.send("\n".join(lines))

    async def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (or a reload) is complete; with a ``STATUS=`` line if given."""
        return await self._with_status("READY=1", status)

    async def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with the monotonic time of the request (``Type=notify-reload``).

        Send :meth:`ready` when the reload is done.
        """
        stamp = f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}"
        return await self._with_status(stamp, status)

    async def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the service is shutting down (draining)."""
        return await self._with_status("STOPPING=1", status)

    async def status(self, text: str) -> bool:
        """``STATUS=`` with ``text`` on one printable line of at most :data:`STATUS_LIMIT` characters."""
        return await self.send(f"STATUS={_sanitize_status(text)}")

    async def watchdog(self) -> bool:
        """One ``WATCHDOG=1``: we are alive and well."""
        return await self.send("WATCHDOG=1")

    async def _with_status(self, message: str, status: str | None) -> bool:
        if status is not None:
            message = f"{message}\nSTATUS={_sanitize_status(status)}"
        return await self.send(message)

    # -- the watchdog ---------------------------------------------------------------------

    async def run_watchdog(
        self,
        healthy: Callable[[], bool],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send ``WATCHDOG=1`` every :attr:`watchdog_interval` while ``healthy()`` is true.

        The ticks fall at the start time plus whole intervals, by
        :func:`trio.current_time`; at each one ``healthy()`` is asked, and a
        ping is sent only if it answers true. A tick missed because the loop
        was blocked fires once, late, and the next falls back on the grid.
        Returns at once (after ``task_status.started()``) if there is no
        watchdog; otherwise runs until cancelled. Skipping one tick already
        brings systemd to the edge of its timeout, so any grace period belongs
        in ``healthy()``. An exception from ``healthy()`` propagates.
        """
        task_status.started()
        interval = self.watchdog_interval
        if interval is None:
            return
        tick = trio.current_time()
        while True:
            if healthy():
                await self.watchdog()
            tick += interval
            now = trio.current_time()
            if tick <= now:  # late: skip the ticks that passed, keep the grid
                tick += (math.floor((now - tick) / interval) + 1) * interval
            await trio.sleep_until(tick)

    # -- closing --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the socket; later messages are dropped. Idempotent, never blocks."""
        self._closed = True
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> SystemdNotifier:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
