"""TCP keepalive: the kernel's backstop under the THB/1 heartbeats.

Theory of operation. Once a TCP connection has received nothing for ``idle``
seconds, the kernel sends up to ``count`` empty probes ``interval`` seconds apart
and drops the connection if none is answered. ``TCP_USER_TIMEOUT`` (Linux only)
bounds how long sent data may stay unacknowledged before the kernel gives up;
on Linux it also replaces ``count`` as the keepalive give-up rule (the
connection is dropped at the first unanswered probe at least ``user_timeout``
after the last data received).

While the heartbeats flow, the connection is never silent for ``idle`` and no
probe is ever sent. The probes start only when the peer has gone quiet, and by
then the application-level detector has normally declared it dead already.
Keepalive is the net under that detector: the kernel tears down a connection
to a vanished host or a broken path even where no heartbeat is watching (an
event loop that is blocked, a socket that is not yet or no longer speaking
THB/1), and ``TCP_USER_TIMEOUT`` cuts the kernel's default of about 15 minutes
of retransmissions to such a host, closed sockets' unsent data included. What keepalive cannot see is a peer process that is stopped or hung while
its kernel is up: the peer's kernel answers the probes itself. Catching that is
the heartbeat's job.

Everything here is synchronous socket-option plumbing; nothing blocks.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple, Protocol, final

__all__ = [
    "KeepaliveOptions",
    "SupportsSockopt",
    "apply_keepalive",
    "read_keepalive",
]

# Linux's limits (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT): derived
# values stay inside them so that the one platform with every option accepts them.
_MAX_IDLE = 32767
_MAX_INTERVAL = 32767
_MAX_COUNT = 127
# setsockopt takes a C int.
_MAX_INT = 2**31 - 1

# How many times the heartbeat timeout the kernel waits before giving up.
_TIMEOUT_FACTOR = 2
_MIN_PROBES = 3


class SupportsSockopt(Protocol):
    """What :func:`apply_keepalive` needs: a socket's integer option calls.

    :class:`trio.socket.SocketType`, :class:`trio.SocketStream` and the standard
    library's :class:`socket.socket` all fit.
    """

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...

    def getsockopt(self, level: int, optname: int, /) -> int: ...


@final
@dataclass(frozen=True, slots=True)
class KeepaliveOptions:
    """The TCP keepalive settings of one socket. Times are in seconds.

    ``enabled`` sets ``SO_KEEPALIVE``. Each other field left as ``None`` leaves
    the operating system's value alone. The kernel counts whole seconds for
    ``idle`` and ``interval`` and whole milliseconds for ``user_timeout``:
    values are rounded up to those units, and to at least one of them.

    >>> KeepaliveOptions(idle=30, interval=10, count=3)
    KeepaliveOptions(enabled=True, idle=30, interval=10, count=3, user_timeout=None)
    >>> KeepaliveOptions(enabled=False).idle is None
    True

    Raises :exc:`ValueError` for a time that is not a positive finite number or
    a ``count`` that is not a positive integer.
    """

    enabled: bool = True
    #: Seconds of silence before the first probe (``TCP_KEEPIDLE``; ``TCP_KEEPALIVE`` on macOS).
    idle: float | None = None
    #: Seconds between probes (``TCP_KEEPINTVL``).
    interval: float | None = None
    #: Unanswered probes before the connection is dropped (``TCP_KEEPCNT``).
    count: int | None = None
    #: Seconds sent data may stay unacknowledged (``TCP_USER_TIMEOUT``, Linux only).
    user_timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("idle", "interval", "user_timeout"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.count is not None and (
            isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1
        ):
            raise ValueError(f"count must be a positive integer, not {self.count!r}")

    @classmethod
    def from_heartbeat(cls, interval: float, timeout: float) -> KeepaliveOptions:
        """Keepalive settings that back up heartbeats sent every ``interval``
        seconds and declared missing after ``timeout`` seconds of silence.

        Pass this side's own ``Config.interval`` and ``Config.timeout``. The
        kernel should give up on the same scale as the heartbeat detector, but
        never sooner, so that the detector wins whenever it can and closes with
        a proper code. The kernel's deadline is set to twice ``timeout``:

        * ``idle = ceil(timeout)``: no probe goes out before the detector's own
          deadline has passed.
        * ``interval = ceil(min(interval, timeout))``: probes follow the
          heartbeat's rhythm (an interval beyond the timeout adds nothing).
        * ``count``: at least 3, so that one lost probe is never enough, and as
          many as it takes for ``idle + interval * count`` to reach twice
          ``timeout``. Where that would need more than 127 probes (Linux's
          limit), the probes are spread further apart.
        * ``user_timeout = 2 * timeout``, in whole milliseconds: unacknowledged
          data is given twice as long as the detector gives silence. On Linux
          this is also the keepalive deadline, matching the ``count`` rule.

        Whichever rule the platform uses, the kernel therefore gives up no
        sooner than twice ``timeout`` after the last data received, and no
        later than four times ``timeout`` rounded up to whole seconds. Every
        value is already a whole number of the kernel's units, so
        :func:`read_keepalive` gives back exactly these options once applied.

        >>> KeepaliveOptions.from_heartbeat(interval=1.0, timeout=3.0)
        KeepaliveOptions(enabled=True, idle=3.0, interval=1.0, count=3, user_timeout=6.0)
        >>> KeepaliveOptions.from_heartbeat(interval=0.5, timeout=1.5)
        KeepaliveOptions(enabled=True, idle=2.0, interval=1.0, count=3, user_timeout=3.0)

        Raises :exc:`ValueError` if either time is not positive and finite, or
        if ``timeout`` is longer than about 12 days (``TCP_USER_TIMEOUT`` could
        not be set to twice it); pass explicit options in that case.
        """
        for name, value in (("interval", interval), ("timeout", timeout)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        user_timeout_ms = _os_units(_TIMEOUT_FACTOR * _exact(timeout), 1000)
        if user_timeout_ms > _MAX_INT:
            raise ValueError(
                f"a heartbeat timeout of {timeout!r} s is too long for TCP keepalive "
                "to back up; pass explicit KeepaliveOptions instead"
            )
        deadline = Decimal(user_timeout_ms) / 1000
        idle = min(_os_units(_exact(timeout), 1), _MAX_IDLE)
        probe_interval = min(_os_units(min(_exact(interval), _exact(timeout)), 1), _MAX_INTERVAL)
        remaining = deadline - idle
        count = max(_MIN_PROBES, math.ceil(remaining / probe_interval))
        if count > _MAX_COUNT:
            probe_interval = math.ceil(remaining / _MAX_COUNT)
            count = max(_MIN_PROBES, math.ceil(remaining / probe_interval))
        return cls(
            idle=float(idle),
            interval=float(probe_interval),
            count=count,
            user_timeout=user_timeout_ms / 1000,
        )


def apply_keepalive(sock: SupportsSockopt, options: KeepaliveOptions) -> None:
    """Set the keepalive socket options of a TCP socket.

    ``sock`` is a :class:`trio.socket.SocketType` (or a :class:`trio.SocketStream`,
    or a standard library socket). Options this platform does not have are
    skipped silently, as ``TCP_USER_TIMEOUT`` is everywhere but Linux. The
    timing options are set before ``SO_KEEPALIVE``, so that the kernel arms its
    timer with the final values. Nothing is closed or awaited.

    >>> import socket
    >>> with socket.socket() as sock:
    ...     apply_keepalive(sock, KeepaliveOptions(idle=30, interval=10, count=3))
    ...     read_keepalive(sock).idle
    30.0

    Raises :exc:`ValueError` if the kernel refuses a value (out of its range),
    and :exc:`OSError` with the original ``errno`` for any other failure (a
    closed socket, a socket that is not TCP). Either names the option, and the
    original error is chained as ``__cause__``. The options set before the
    failing one stay set; callers normally close the socket anyway.
    """
    platform = _PLATFORM
    tcp_settings = (
        (platform.idle, None if options.idle is None else _os_units(_exact(options.idle), 1)),
        (
            platform.interval,
            None if options.interval is None else _os_units(_exact(options.interval), 1),
        ),
        (platform.count, options.count),
        (
            platform.user_timeout,
            None if options.user_timeout is None else _os_units(_exact(options.user_timeout), 1000),
        ),
    )
    for option, value in tcp_settings:
        if option is not None and value is not None:
            _set(sock, socket.IPPROTO_TCP, option, value)
    _set(sock, socket.SOL_SOCKET, _SO_KEEPALIVE, int(options.enabled))


def read_keepalive(sock: SupportsSockopt) -> KeepaliveOptions:
    """Read back the keepalive options a TCP socket has now.

    Fields the platform does not have come back as ``None``, and so does a
    ``user_timeout`` of zero (the kernel's "not set"). After
    :func:`apply_keepalive`, each field set is read back rounded up to the
    kernel's units.

    >>> import socket
    >>> with socket.socket() as sock:
    ...     apply_keepalive(sock, KeepaliveOptions(enabled=False))
    ...     read_keepalive(sock).enabled
    False

    Raises :exc:`OSError` naming the option, with the original error chained,
    if the socket refuses (for example because it is closed).
    """
    platform = _PLATFORM
    idle = _get(sock, socket.IPPROTO_TCP, platform.idle)
    interval = _get(sock, socket.IPPROTO_TCP, platform.interval)
    count = _get(sock, socket.IPPROTO_TCP, platform.count)
    user_timeout_ms = _get(sock, socket.IPPROTO_TCP, platform.user_timeout)
    return KeepaliveOptions(
        # macOS reports the flag's bit value rather than 1.
        enabled=bool(_get(sock, socket.SOL_SOCKET, _SO_KEEPALIVE)),
        idle=float(idle) if idle else None,
        interval=float(interval) if interval else None,
        count=count or None,
        user_timeout=user_timeout_ms / 1000 if user_timeout_ms else None,
    )


# -- the platform's option numbers ----------------------------------------------


class _Option(NamedTuple):
    name: str
    number: int


@dataclass(frozen=True, slots=True)
class _PlatformOptions:
    idle: _Option | None
    interval: _Option | None
    count: _Option | None
    user_timeout: _Option | None


def _find(namespace: object, *names: str) -> _Option | None:
    for name in names:
        number = getattr(namespace, name, None)
        if isinstance(number, int):
            return _Option(name, number)
    return None


def _platform_options(namespace: object) -> _PlatformOptions:
    """The TCP-level keepalive options that ``namespace`` (the socket module) defines."""
    return _PlatformOptions(
        # macOS spells the idle option TCP_KEEPALIVE.
        idle=_find(namespace, "TCP_KEEPIDLE", "TCP_KEEPALIVE"),
        interval=_find(namespace, "TCP_KEEPINTVL"),
        count=_find(namespace, "TCP_KEEPCNT"),
        user_timeout=_find(namespace, "TCP_USER_TIMEOUT"),
    )


_PLATFORM = _platform_options(socket)
_SO_KEEPALIVE = _Option("SO_KEEPALIVE", socket.SO_KEEPALIVE)


# -- units and errors -----------------------------------------------------------


def _exact(seconds: float) -> Decimal:
    # The float's shortest decimal spelling, so that 1.1 s is 1100 ms and not 1101.
    return Decimal(repr(seconds))


def _os_units(seconds: Decimal, per_second: int) -> int:
    # Rounding up keeps a positive time at least one unit: the kernel reads 0 as "unset".
    return math.ceil(seconds * per_second)


def _set(sock: SupportsSockopt, level: int, option: _Option, value: int) -> None:
    if value > _MAX_INT:
        raise ValueError(f"{option.name}={value} is out of range for a socket option")
    try:
        sock.setsockopt(level, option.number, value)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ValueError(
                f"the operating system refused {option.name}={value}: {exc.strerror}"
            ) from exc
        raise OSError(exc.errno, f"could not set {option.name} to {value}: {exc.strerror}") from exc


def _get(sock: SupportsSockopt, level: int, option: _Option | None) -> int | None:
    if option is None:
        return None
    try:
        return sock.getsockopt(level, option.number)
    except OSError as exc:
        raise OSError(exc.errno, f"could not read {option.name}: {exc.strerror}") from exc


_logger = logging.getLogger("trio_heartbeat")


def resolve_keepalive(
    setting: KeepaliveOptions | bool | None, interval: float, timeout: float
) -> KeepaliveOptions | None:
    """What a ``keepalive=`` argument means: ``True`` derives the options from
    the heartbeat settings, ``False`` or ``None`` leaves the OS defaults.

    Heartbeat settings too long for the kernel's keepalive fields (a timeout
    of more than about 12 days) leave the OS defaults too, with a warning:
    keepalive is a backstop, not a reason to refuse a configuration.
    """
    if setting is True:
        try:
            return KeepaliveOptions.from_heartbeat(interval, timeout)
        except ValueError as exc:
            _logger.warning("TCP keepalive left at the OS defaults: %s", exc)
            return None
    return setting or None


def try_apply_keepalive(sock: SupportsSockopt, options: KeepaliveOptions | None) -> None:
    """:func:`apply_keepalive`, logging instead of raising if the OS refuses:
    a connection is worth more than its keepalive backstop."""
    if options is None:
        return
    try:
        apply_keepalive(sock, options)
    except (OSError, ValueError) as exc:
        _logger.warning("could not set TCP keepalive: %s", exc)
