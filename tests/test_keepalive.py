"""TCP keepalive (``_keepalive.py``): the kernel's backstop under the heartbeats.

``KeepaliveOptions.from_heartbeat`` is checked to exact numbers (whole OS
units, Linux's ranges, a kernel that never gives up before the heartbeat
would), and by properties over arbitrary heartbeat settings; the options
refuse bad values. ``apply_keepalive`` and ``read_keepalive`` are checked
against a :class:`FakeSocket` that keeps options as a kernel would (the order
of the calls, rounding up, a platform without an option, macOS's spelling),
then on real loopback sockets, where the kernel's refusals become errors that
name the option. How a client and a server use them is in ``test_client.py``
and ``test_server.py``.
"""

from __future__ import annotations

import errno
import math
import socket
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from types import SimpleNamespace

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_heartbeat import _keepalive
from trio_heartbeat._keepalive import (
    KeepaliveOptions,
    apply_keepalive,
    read_keepalive,
)

MAX_INT = 2**31 - 1
# The longest heartbeat timeout whose doubled value still fits TCP_USER_TIMEOUT.
LONGEST_TIMEOUT = MAX_INT / 2000

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="exact values need Linux's keepalive options"
)


class FakeSocket:
    """Keeps socket options in a dict, as a kernel would, and logs every set."""

    def __init__(self, initial: dict[tuple[int, int], int] | None = None) -> None:
        self.values: dict[tuple[int, int], int] = dict(initial or {})
        self.calls: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, optname: int, value: int, /) -> None:
        self.calls.append((level, optname, value))
        self.values[level, optname] = value

    def getsockopt(self, level: int, optname: int, /) -> int:
        return self.values.get((level, optname), 0)


def in_ms(seconds: float) -> Decimal:
    return Decimal(repr(seconds)) * 1000


def timings(options: KeepaliveOptions) -> tuple[float, float, int, float]:
    """(idle, interval, count, user_timeout) of options that set all four."""
    assert options.idle is not None
    assert options.interval is not None
    assert options.count is not None
    assert options.user_timeout is not None
    return options.idle, options.interval, options.count, options.user_timeout


# -- from_heartbeat: exact numbers ----------------------------------------------


@pytest.mark.parametrize(
    ("interval", "timeout", "expected"),
    [
        # The Config defaults: probes from 3 s of silence, 1 s apart, dead at 6 s.
        (1.0, 3.0, KeepaliveOptions(idle=3.0, interval=1.0, count=3, user_timeout=6.0)),
        (0.5, 1.5, KeepaliveOptions(idle=2.0, interval=1.0, count=3, user_timeout=3.0)),
        (10.0, 30.0, KeepaliveOptions(idle=30.0, interval=10.0, count=3, user_timeout=60.0)),
        # A long timeout over a short interval needs more than three probes.
        (1.0, 60.0, KeepaliveOptions(idle=60.0, interval=1.0, count=60, user_timeout=120.0)),
        # 2.2 s is 2200 ms, not the 2201 that float arithmetic would give.
        (1.1, 1.1, KeepaliveOptions(idle=2.0, interval=2.0, count=3, user_timeout=2.2)),
        # Sub-second heartbeats: the kernel cannot go below one second of idle.
        (0.005, 0.01, KeepaliveOptions(idle=1.0, interval=1.0, count=3, user_timeout=0.02)),
        (0.0001, 0.0004, KeepaliveOptions(idle=1.0, interval=1.0, count=3, user_timeout=0.001)),
        # An interval beyond the timeout would only stretch the probing.
        (3600.0, 1.0, KeepaliveOptions(idle=1.0, interval=1.0, count=3, user_timeout=2.0)),
        # A day: idle hits Linux's 32767 s cap, and 127 probes must cover the rest,
        # 172800 - 32767 = 140033 s, so they are spread 1103 s apart.
        (
            1.0,
            86400.0,
            KeepaliveOptions(idle=32767.0, interval=1103.0, count=127, user_timeout=172800.0),
        ),
    ],
)
def test_from_heartbeat_exact_values(
    interval: float, timeout: float, expected: KeepaliveOptions
) -> None:
    assert KeepaliveOptions.from_heartbeat(interval, timeout) == expected


@pytest.mark.parametrize(
    ("interval", "timeout"),
    [(0.0, 3.0), (-1.0, 3.0), (math.nan, 3.0), (1.0, 0.0), (1.0, math.inf), (1.0, -3.0)],
)
def test_from_heartbeat_rejects_non_positive_times(interval: float, timeout: float) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        KeepaliveOptions.from_heartbeat(interval, timeout)


def test_from_heartbeat_refuses_timeouts_the_kernel_cannot_double() -> None:
    assert KeepaliveOptions.from_heartbeat(1.0, 12 * 86400.0).user_timeout == 24 * 86400.0
    with pytest.raises(ValueError, match="too long for TCP keepalive"):
        KeepaliveOptions.from_heartbeat(1.0, 13 * 86400.0)


# -- from_heartbeat: invariants -------------------------------------------------

heartbeat_times = st.floats(min_value=1e-4, max_value=1e7, allow_nan=False, allow_infinity=False)
timeouts = st.floats(min_value=1e-4, max_value=LONGEST_TIMEOUT)


@given(interval=heartbeat_times, timeout=timeouts)
def test_from_heartbeat_values_are_whole_os_units_in_linux_range(
    interval: float, timeout: float
) -> None:
    options = KeepaliveOptions.from_heartbeat(interval, timeout)
    assert options.enabled
    idle, probe_interval, count, user_timeout = timings(options)
    assert idle.is_integer()
    assert 1 <= idle <= 32767
    assert probe_interval.is_integer()
    assert 1 <= probe_interval <= 32767
    assert 3 <= count <= 127
    user_timeout_ms = in_ms(user_timeout)
    assert user_timeout_ms == int(user_timeout_ms)
    assert 1 <= user_timeout_ms <= MAX_INT


@given(interval=heartbeat_times, timeout=timeouts)
def test_from_heartbeat_kernel_never_gives_up_before_the_heartbeat(
    interval: float, timeout: float
) -> None:
    idle, probe_interval, count, user_timeout = timings(
        KeepaliveOptions.from_heartbeat(interval, timeout)
    )
    # Where TCP_USER_TIMEOUT is missing, the count rule decides.
    by_count = idle + probe_interval * count
    assert by_count >= user_timeout >= 2 * timeout
    # ...and the kernel still answers on the heartbeat's scale.
    assert by_count <= 4 * max(1, math.ceil(timeout))
    # On Linux the user timeout decides, at the first unanswered probe past it.
    assert max(idle + probe_interval, user_timeout) >= timeout


@linux_only
@given(interval=heartbeat_times, timeout=timeouts)
def test_from_heartbeat_reads_back_unchanged(interval: float, timeout: float) -> None:
    options = KeepaliveOptions.from_heartbeat(interval, timeout)
    sock = FakeSocket()
    apply_keepalive(sock, options)
    assert read_keepalive(sock) == options


# -- KeepaliveOptions -----------------------------------------------------------


@pytest.mark.parametrize("field", ["idle", "interval", "user_timeout"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_options_reject_bad_times(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a positive number of seconds"):
        KeepaliveOptions(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("count", [0, -3, True, 2.5])
def test_options_reject_bad_counts(count: int) -> None:
    with pytest.raises(ValueError, match="count must be a positive integer"):
        KeepaliveOptions(count=count)


def test_options_default_to_enabled_with_os_timings() -> None:
    assert KeepaliveOptions() == KeepaliveOptions(
        enabled=True, idle=None, interval=None, count=None, user_timeout=None
    )


# -- apply_keepalive and read_keepalive, off a real kernel ----------------------


@linux_only
def test_apply_rounds_up_to_os_units_and_sets_so_keepalive_last() -> None:
    sock = FakeSocket()
    apply_keepalive(sock, KeepaliveOptions(idle=0.2, interval=1.5, count=4, user_timeout=0.0011))
    assert sock.calls == [
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 2),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]


def test_none_fields_are_not_touched() -> None:
    sock = FakeSocket()
    apply_keepalive(sock, KeepaliveOptions(enabled=False))
    assert sock.calls == [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)]


MACOS = SimpleNamespace(TCP_KEEPALIVE=0x10, TCP_KEEPINTVL=0x101, TCP_KEEPCNT=0x102)


def test_macos_idle_option_is_tcp_keepalive_and_user_timeout_is_absent() -> None:
    platform = _keepalive._platform_options(MACOS)
    assert platform.idle == ("TCP_KEEPALIVE", 0x10)
    assert platform.interval == ("TCP_KEEPINTVL", 0x101)
    assert platform.count == ("TCP_KEEPCNT", 0x102)
    assert platform.user_timeout is None


def test_platform_without_an_option_skips_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_keepalive, "_PLATFORM", _keepalive._platform_options(MACOS))
    sock = FakeSocket()
    apply_keepalive(sock, KeepaliveOptions(idle=30, interval=10, count=3, user_timeout=5))
    assert sock.calls == [
        (socket.IPPROTO_TCP, 0x10, 30),
        (socket.IPPROTO_TCP, 0x101, 10),
        (socket.IPPROTO_TCP, 0x102, 3),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    # macOS reads SO_KEEPALIVE back as its flag bit, 8.
    sock.values[socket.SOL_SOCKET, socket.SO_KEEPALIVE] = 8
    assert read_keepalive(sock) == KeepaliveOptions(idle=30.0, interval=10.0, count=3)


def test_read_treats_zero_user_timeout_as_unset() -> None:
    options = read_keepalive(FakeSocket())
    assert options == KeepaliveOptions(enabled=False)


# -- real sockets on loopback ---------------------------------------------------


@pytest.fixture
async def tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """A connected (client, server) pair of TCP streams on 127.0.0.1."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    await listener.aclose()
    yield client, server
    await client.aclose()
    await server.aclose()


def kernel_values(sock: trio.socket.SocketType) -> tuple[int, int, int, int, int]:
    tcp = socket.IPPROTO_TCP
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
        sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
        sock.getsockopt(tcp, socket.TCP_KEEPCNT),
        sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
    )


@linux_only
async def test_client_socket_gets_derived_options(
    tcp_pair: tuple[trio.SocketStream, trio.SocketStream],
) -> None:
    client, _ = tcp_pair
    options = KeepaliveOptions.from_heartbeat(interval=1.0, timeout=3.0)
    apply_keepalive(client.socket, options)
    assert kernel_values(client.socket) == (1, 3, 1, 3, 6000)
    assert read_keepalive(client.socket) == options


@linux_only
async def test_accepted_stream_gets_options_rounded_up(
    tcp_pair: tuple[trio.SocketStream, trio.SocketStream],
) -> None:
    _, server = tcp_pair
    apply_keepalive(
        server.socket, KeepaliveOptions(idle=1.2, interval=0.1, count=5, user_timeout=0.0015)
    )
    assert kernel_values(server.socket) == (1, 2, 1, 5, 2)
    assert read_keepalive(server) == KeepaliveOptions(
        idle=2.0, interval=1.0, count=5, user_timeout=0.002
    )


@linux_only
async def test_disabled_options_turn_so_keepalive_off(
    tcp_pair: tuple[trio.SocketStream, trio.SocketStream],
) -> None:
    client, _ = tcp_pair
    apply_keepalive(client.socket, KeepaliveOptions(idle=20, interval=5, count=4))
    assert kernel_values(client.socket)[0] == 1
    apply_keepalive(client.socket, KeepaliveOptions(enabled=False))
    # Off, with the timings left as they were.
    assert kernel_values(client.socket) == (0, 20, 5, 4, 0)
    assert read_keepalive(client.socket) == KeepaliveOptions(
        enabled=False, idle=20.0, interval=5.0, count=4
    )


@linux_only
async def test_unset_fields_keep_the_kernel_values(
    tcp_pair: tuple[trio.SocketStream, trio.SocketStream],
) -> None:
    client, _ = tcp_pair
    before = kernel_values(client.socket)
    apply_keepalive(client.socket, KeepaliveOptions(idle=45))
    assert kernel_values(client.socket) == (1, 45, *before[2:])


@linux_only
@pytest.mark.parametrize(
    ("options", "name"),
    [
        (KeepaliveOptions(count=1000), "TCP_KEEPCNT"),
        (KeepaliveOptions(idle=40000), "TCP_KEEPIDLE"),
        (KeepaliveOptions(interval=40000), "TCP_KEEPINTVL"),
    ],
)
async def test_kernel_refusal_is_a_value_error_naming_the_option(
    tcp_pair: tuple[trio.SocketStream, trio.SocketStream], options: KeepaliveOptions, name: str
) -> None:
    client, _ = tcp_pair
    with pytest.raises(ValueError, match=f"refused {name}=") as caught:
        apply_keepalive(client.socket, options)
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.EINVAL


def test_value_beyond_a_c_int_is_a_value_error() -> None:
    sock = FakeSocket()
    with pytest.raises(ValueError, match="TCP_USER_TIMEOUT=3000000000 is out of range"):
        apply_keepalive(sock, KeepaliveOptions(user_timeout=3e6))
    assert sock.calls == []


@linux_only
async def test_closed_socket_is_an_os_error_naming_the_option() -> None:
    sock = trio.socket.socket()
    sock.close()
    with pytest.raises(OSError, match="could not set TCP_KEEPIDLE to 3") as caught:
        apply_keepalive(sock, KeepaliveOptions.from_heartbeat(1.0, 3.0))
    assert caught.value.errno == errno.EBADF
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(OSError, match="could not read TCP_KEEPIDLE") as caught:
        read_keepalive(sock)
    assert caught.value.errno == errno.EBADF


@linux_only
async def test_non_tcp_socket_is_an_os_error_naming_the_option() -> None:
    with trio.socket.socket(socket.AF_UNIX) as sock:
        with pytest.raises(OSError, match="could not set TCP_KEEPIDLE") as caught:
            apply_keepalive(sock, KeepaliveOptions(idle=5))
        assert caught.value.errno == errno.EOPNOTSUPP
