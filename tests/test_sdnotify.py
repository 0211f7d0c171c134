"""``SystemdNotifier`` (``_sdnotify.py``): systemd's notify protocol, against real datagram sockets.

What it pins: ``from_environment`` reads ``NOTIFY_SOCKET`` (a path, an
``@abstract`` name, nothing, something unusable), ``WATCHDOG_USEC`` (halved,
raised to ``MIN_WATCHDOG_INTERVAL`` with a warning; zero, garbage, thousands
of digits and out-of-range values mean no watchdog and a warning) and
``WATCHDOG_PID`` (ours, another's, garbage), and never raises whatever the
strings (hypothesis); a real ``AF_UNIX`` datagram socket bound where
``NOTIFY_SOCKET`` points (a file, and on Linux an abstract name) receives
each message as one datagram, with our pid in its credentials; malformed
messages raise :exc:`ValueError`, but a receiver that is gone or a full
receive buffer only drops messages, without raising or waiting, and a
receiver that comes and goes is logged at most once a minute (virtual time);
``STATUS=`` text is made one bounded printable line (hypothesis). The
watchdog's pace is checked in virtual time (``autojump_clock``) with exact
times: the sends are synchronous, so the datagrams of a tick are in the
receiver's queue when the test looks half an interval later. Receivers are
bound with the standard library's sockets, synchronously, so that virtual
time stands still meanwhile.
"""

from __future__ import annotations

import contextlib
import doctest
import errno
import logging
import os
import socket
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import MockClock

from trio_heartbeat import _sdnotify
from trio_heartbeat._sdnotify import (
    MAX_MESSAGE,
    MIN_WATCHDOG_INTERVAL,
    STATUS_LIMIT,
    SystemdNotifier,
)

LOGGER = "trio_heartbeat.sdnotify"
LINUX = sys.platform == "linux"


# -- receivers: what systemd would bind ----------------------------------------------------


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, or a shorter temporary directory if a socket path there would be too long."""
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="thb-sd-") as name:  # pragma: no cover
        yield Path(name)


def bind_receiver(address: str) -> socket.socket:
    """A non-blocking datagram socket bound at ``address`` (``@name`` or a path)."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.setblocking(False)
    if address.startswith("@"):
        receiver.bind(b"\0" + address[1:].encode())
    else:
        receiver.bind(address)
    return receiver


def drain(receiver: socket.socket) -> list[str]:
    """Every datagram waiting in ``receiver``, decoded."""
    received = []
    while True:
        try:
            received.append(receiver.recv(MAX_MESSAGE * 2).decode())
        except BlockingIOError:
            return received


@pytest.fixture(params=["path", "abstract"])
def receiver(
    request: pytest.FixtureRequest, short_dir: Path
) -> Iterator[tuple[str, socket.socket]]:
    """``(NOTIFY_SOCKET, bound socket)``: a socket file, or a name in Linux's abstract namespace."""
    if request.param == "abstract":
        if not LINUX:  # pragma: no cover
            pytest.skip("abstract sockets are Linux's")
        address = f"@trio-heartbeat-test/{uuid.uuid4().hex}"
    else:
        address = str(short_dir / "notify")
    sock = bind_receiver(address)
    try:
        yield address, sock
    finally:
        sock.close()


@pytest.fixture
def path_receiver(short_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    """``(NOTIFY_SOCKET, bound socket)`` for a socket file."""
    address = str(short_dir / "notify")
    sock = bind_receiver(address)
    try:
        yield address, sock
    finally:
        sock.close()


@contextlib.contextmanager
def warnings_of(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records of WARNING and above that logger ``name`` emits in the block.

    For where ``caplog``, a function-scoped fixture, does not fit: inside
    one example of a hypothesis test.
    """
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger(name)
    handler = Keep(logging.WARNING)
    level = log.level
    log.setLevel(logging.WARNING)
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


# -- from_environment ----------------------------------------------------------------------


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "1000000"}])
def test_no_notify_socket_means_no_notifier(
    environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Outside systemd (or with the variable emptied) there is nothing to notify, watchdog or
    not, and nothing to warn about: that is the usual case, not a misconfiguration."""
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert SystemdNotifier.from_environment(environ) is None
    assert caplog.records == []


@pytest.mark.parametrize("address", ["/run/systemd/notify", "@/org/freedesktop/systemd1/notify"])
def test_a_path_or_an_abstract_name_is_taken_as_it_is(address: str) -> None:
    """The address is kept as written; with no WATCHDOG_USEC there is no watchdog."""
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": address})
    assert notifier is not None
    assert notifier.address == address
    assert notifier.watchdog_interval is None


def test_an_abstract_name_becomes_a_leading_nul_byte_and_a_path_stays_a_path() -> None:
    """What ``sendto`` is given: the ``@`` replaced by NUL, or the path unchanged."""
    assert _sdnotify._sockaddr("@name/x") == b"\0name/x"
    assert _sdnotify._sockaddr("/run/notify") == "/run/notify"


@pytest.mark.parametrize(
    "address", ["run/notify", "./notify", "@", "vsock:2:1234", "/run/no\0tify", "@a\0b"]
)
def test_an_unusable_address_is_a_warning_and_no_notifier(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A relative path, a bare ``@``, an address family we do not speak, a NUL: logged, then ignored.

    The warning gives the constructor's reason, which names the address.
    """
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": address}) is None
    with pytest.raises(ValueError, match="notify socket") as refused:
        SystemdNotifier(address)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"not notifying systemd: NOTIFY_SOCKET: {refused.value}"


@pytest.mark.parametrize(
    ("usec", "interval"),
    [
        ("1000000", 0.5),
        ("10000000", 5.0),
        ("20000", MIN_WATCHDOG_INTERVAL),  # the shortest timeout kept as it is
        ("18446744073709551614", (2**64 - 2) / 2_000_000),  # the longest: 2**64 - 2
        ("", None),
    ],
)
def test_the_watchdog_interval_is_half_of_watchdog_usec(
    usec: str, interval: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Half the timeout, in seconds, from 20 ms up to 2**64 - 2 µs; empty means no watchdog.
    None of these is worth a warning."""
    environ = {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": usec}
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        notifier = SystemdNotifier.from_environment(environ)
    assert notifier is not None
    assert notifier.watchdog_interval == interval
    assert caplog.records == []


def shown(value: str) -> str:
    """How a log line shows an environment value: its repr, or its first 32 characters and its
    length past 40 characters."""
    if len(value) <= 40:
        return repr(value)
    return f"{value[:32]!r}... ({len(value)} characters)"


@pytest.mark.parametrize(
    "usec",
    [
        "0",
        "00",
        "0500000",  # a leading zero: systemd never writes one, and C might read it as octal
        "-1000000",
        "+1000000",
        "1.5",
        " 1000000",
        "1000000\n",
        "1e6",
        "ten",
        "\u0661\u0662",  # Arabic-Indic digits, which int() would take
        "\uff11\uff12\uff13",  # full-width digits, likewise
        "18446744073709551615",  # 2**64 - 1: systemd's USEC_INFINITY, not a timeout
        "18446744073709551616",  # past 64 bits
        "100000000000000000000",  # 21 digits
        "9" * 400,  # once an OverflowError in the division
        "9" * 5000,  # once a ValueError from int(): past sys.get_int_max_str_digits()
        "0" * 5000 + "1",
    ],
)
def test_an_unusable_watchdog_usec_is_a_warning_and_no_watchdog(
    usec: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a decimal number from 1 to 2**64 - 2 in ASCII digits counts; anything else, however
    long, is one warning (its value cut short) and no watchdog, never an exception. The notifier
    stays."""
    environ = {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": usec}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        notifier = SystemdNotifier.from_environment(environ)
    assert notifier is not None
    assert notifier.watchdog_interval is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"ignoring WATCHDOG_USEC={shown(usec)}: not a number of microseconds from 1 to 2**64 - 2"
    )
    assert len(record.getMessage()) < 150


def test_a_long_value_is_shown_cut_short() -> None:
    """Past 40 characters a log line shows the first 32 and the length; up to 40, the repr."""
    assert _sdnotify._shown("x" * 40) == repr("x" * 40)
    assert _sdnotify._shown("x" * 41) == "'" + "x" * 32 + "'... (41 characters)"
    assert _sdnotify._shown("9" * 5000) == "'" + "9" * 32 + "'... (5000 characters)"


@pytest.mark.parametrize(
    ("usec", "timeout", "half"),
    [("1", "1e-06", "5e-07"), ("3", "3e-06", "1.5e-06"), ("19999", "0.019999", "0.0099995")],
)
def test_a_watchdog_timeout_under_20_ms_is_pinged_every_10_ms_with_a_warning(
    usec: str, timeout: str, half: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Half of ``WATCHDOG_USEC=1`` would be a ping every 0.5 µs, a loop that does nothing else:
    the interval is raised to ``MIN_WATCHDOG_INTERVAL`` (10 ms), and one warning says so."""
    environ = {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": usec}
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        notifier = SystemdNotifier.from_environment(environ)
    assert notifier is not None
    assert notifier.watchdog_interval == MIN_WATCHDOG_INTERVAL == 0.01
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"WATCHDOG_USEC={usec}: a timeout of {timeout} s is too short to keep from an event "
        f"loop; pinging every 0.01 s instead of {half} s"
    )


async def test_watchdog_usec_1_pings_a_hundred_times_a_second_not_millions(
    autojump_clock: MockClock, path_receiver: tuple[str, socket.socket]
) -> None:
    """With ``WATCHDOG_USEC=1`` from the environment, 0.1 s of the watchdog asks ``healthy()``
    and pings 11 times, every 10 ms (it gives up at the 12th ask, so a spinning loop fails the
    test at once instead of making it slow)."""
    address, sock = path_receiver
    environ = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1"}
    notifier = SystemdNotifier.from_environment(environ)
    assert notifier is not None
    asked: list[float] = []

    def healthy() -> bool:
        asked.append(trio.current_time())
        assert len(asked) <= 11, f"asked {len(asked)} times by {asked[-1]}"
        return True

    async with notifier, trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog, healthy)
        await trio.sleep_until(0.105)
        nursery.cancel_scope.cancel()
    assert asked == pytest.approx([k / 100 for k in range(11)])
    assert drain(sock) == ["WATCHDOG=1"] * 11


@pytest.mark.parametrize(
    ("owner", "interval"),
    [
        (None, 0.5),  # unset: the pings are ours
        ("", 0.5),  # empty counts as unset
        ("4242", 0.5),  # ours
        ("4243", None),  # another process's (we are a child that inherited it)
        ("1", None),
        ("2147483647", None),  # the largest pid_t: a process id, not ours
    ],
)
def test_watchdog_pid_must_be_ours_or_unset(owner: str | None, interval: float | None) -> None:
    """``WATCHDOG_PID`` names the one process that owes the pings."""
    environ = {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "1000000"}
    if owner is not None:
        environ["WATCHDOG_PID"] = owner
    notifier = SystemdNotifier.from_environment(environ, pid=4242)
    assert notifier is not None
    assert notifier.watchdog_interval == interval


@pytest.mark.parametrize(
    "owner",
    [
        "abc",
        "-4242",
        "42.0",
        "0x10",
        "0",  # no process has pid 0
        "04242",  # a leading zero
        " 4242",
        "4242\n",
        "\u0664\u0662\u0664\u0662",  # 4242 in Arabic-Indic digits, which int() would take
        "2147483648",  # past pid_t
        "9" * 5000,  # once a ValueError from int()
    ],
)
def test_a_malformed_watchdog_pid_is_a_warning_and_no_watchdog(
    owner: str, caplog: pytest.LogCaptureFixture
) -> None:
    """We cannot tell whether the pings are ours: safer not to send them for someone else.

    A process id is a decimal number from 1 to 2**31 - 1 in ASCII digits; even
    one that ``int`` would read as ours (4242) is refused if systemd would not
    have written it so.
    """
    environ = {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": owner}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        notifier = SystemdNotifier.from_environment(environ, pid=4242)
    assert notifier is not None
    assert notifier.watchdog_interval is None
    [record] = caplog.records
    assert record.getMessage() == (
        f"ignoring the watchdog: WATCHDOG_PID={shown(owner)} is not a process id"
    )


#: Values for WATCHDOG_USEC and WATCHDOG_PID: any text, numbers of every size (negative ones,
#: 2**64 and past), thousands of digits, leading zeros, digits of other scripts.
environment_values = st.one_of(
    st.text(),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=0, max_value=6000).map(lambda n: "9" * n),
    st.integers(min_value=0, max_value=6000).map(lambda n: "0" * n + "1"),
    st.text(alphabet="0123456789\u0660\u0661\u0664\uff11 +-", max_size=30),
)


@given(usec=environment_values, owner=environment_values)
def test_from_environment_never_raises_whatever_the_watchdog_variables(
    usec: str, owner: str
) -> None:
    """Any strings: a notifier with either a sane interval (from 10 ms to half of 2**64 - 2 µs)
    or none; no interval means the variable is empty, the pid is another process's, or a
    warning (one, on one line of bounded length) said why."""
    environ = {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": usec, "WATCHDOG_PID": owner}
    with warnings_of(LOGGER) as records:
        notifier = SystemdNotifier.from_environment(environ, pid=4242)
    assert notifier is not None
    interval = notifier.watchdog_interval
    assert len(records) <= 1
    for record in records:
        message = record.getMessage()
        assert "\n" not in message
        assert len(message) < 500
    if interval is not None:
        assert MIN_WATCHDOG_INTERVAL <= interval <= (2**64 - 2) / 2_000_000
        assert owner in ("", "4242")
        assert usec.isascii()
        assert usec.isdigit()
    else:
        someone_elses = owner.isascii() and owner.isdigit() and owner.lstrip("0") != "4242"
        assert usec == "" or someone_elses or len(records) == 1


def test_our_pid_and_os_environ_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Called with no arguments, it reads this process's environment and pid."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier.from_environment()
    assert notifier is not None
    assert notifier.watchdog_interval == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = SystemdNotifier.from_environment()
    assert notifier is not None
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize("interval", [0.0, -1.0, 5e-7, 0.0099, float("inf"), float("nan")])
def test_the_constructor_refuses_an_interval_that_is_not_a_time_from_10_ms(
    interval: float,
) -> None:
    """Zero, negative, shorter than ``MIN_WATCHDOG_INTERVAL``, infinite and NaN intervals are
    errors (code that names its own interval gets no silent correction); 10 ms itself is fine."""
    with pytest.raises(
        ValueError, match=r"watchdog_interval must be a number of seconds from 0\.01"
    ):
        SystemdNotifier("/run/notify", interval)
    assert SystemdNotifier("/run/notify", 0.01).watchdog_interval == 0.01


def test_repr_and_doctests() -> None:
    """The repr reads as the call that made it; the module's examples run."""
    assert repr(SystemdNotifier("@x", 2.0)) == "SystemdNotifier('@x', watchdog_interval=2.0)"
    result = doctest.testmod(_sdnotify)
    assert result.attempted > 0
    assert result.failed == 0


# -- real datagrams ------------------------------------------------------------------------


async def test_each_message_is_one_datagram_at_the_receiver(
    receiver: tuple[str, socket.socket],
) -> None:
    """READY, STATUS, WATCHDOG, STOPPING, arbitrary fields: one datagram each, in order."""
    address, sock = receiver
    async with SystemdNotifier(address) as notifier:
        assert await notifier.ready()
        assert await notifier.status("3 peers, SERVING")
        assert await notifier.watchdog()
        assert await notifier.ready(status="serving on 127.0.0.1:7400")
        assert await notifier.notify(STATUS="custom", ERRNO=0)
        assert await notifier.stopping(status="draining")
        assert await notifier.stopping()
        assert notifier.sent == 7
        assert notifier.dropped == 0
    assert drain(sock) == [
        "READY=1",
        "STATUS=3 peers, SERVING",
        "WATCHDOG=1",
        "READY=1\nSTATUS=serving on 127.0.0.1:7400",
        "STATUS=custom\nERRNO=0",
        "STOPPING=1\nSTATUS=draining",
        "STOPPING=1",
    ]


async def test_reloading_carries_the_monotonic_time_of_the_request(
    path_receiver: tuple[str, socket.socket],
) -> None:
    """``RELOADING=1`` with ``MONOTONIC_USEC`` on CLOCK_MONOTONIC, as Type=notify-reload wants."""
    address, sock = path_receiver
    async with SystemdNotifier(address) as notifier:
        before = time.monotonic_ns() // 1000
        assert await notifier.reloading(status="reloading")
        after = time.monotonic_ns() // 1000
    [message] = drain(sock)
    reloading, stamp, status = message.split("\n")
    assert reloading == "RELOADING=1"
    assert status == "STATUS=reloading"
    key, _, value = stamp.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.skipif(not LINUX, reason="SCM_CREDENTIALS is Linux's")
async def test_the_datagram_carries_our_pid_for_notify_access_main(
    path_receiver: tuple[str, socket.socket],
) -> None:
    """The kernel attaches the sender's credentials, which NotifyAccess=main checks against MAINPID."""
    address, sock = path_receiver
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    async with SystemdNotifier(address) as notifier:
        assert await notifier.ready()
    credentials = struct.calcsize("3i")
    data, ancillary, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(credentials))
    assert data == b"READY=1"
    [(level, kind, payload)] = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    pid, _, _ = struct.unpack("3i", payload[:credentials])
    assert pid == os.getpid()


async def test_a_cancelled_send_sends_nothing(path_receiver: tuple[str, socket.socket]) -> None:
    """Cancelled before its checkpoint, a notification is not half-sent: it is not sent."""
    address, sock = path_receiver
    async with SystemdNotifier(address) as notifier:
        with trio.CancelScope() as scope:
            scope.cancel()
            await notifier.ready()
        assert scope.cancelled_caught
        assert notifier.sent == 0
        assert notifier.dropped == 0
    assert drain(sock) == []


def dropped_warning(address: str, since: int = 0) -> str:
    """The warning that starts a logged run of failures to ``address`` (ENOENT)."""
    more = f"; {since} more dropped since the last warning" if since else ""
    return (
        f"notification to {address} dropped ({os.strerror(errno.ENOENT)}){more}; further "
        "failures are not logged until one goes through, nor a new run of them within 60 s"
    )


async def test_a_receiver_that_is_gone_drops_messages_without_raising(
    autojump_clock: MockClock,
    path_receiver: tuple[str, socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A manager that went away costs dropped messages, one warning, and one info line with the
    count when a new one is found; a second run of failures at once is not logged.

    Each message is sent to the address afresh, so a socket re-created at
    the same path (a re-executed manager) receives the next one.
    """
    address, sock = path_receiver
    dropped = dropped_warning(address)
    through = f"notifications to {address} go through again (2 dropped)"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with SystemdNotifier(address) as notifier:
            assert await notifier.ready()
            assert caplog.records == []  # a first send that goes through is not news
            sock.close()
            os.unlink(address)
            assert not await notifier.watchdog()
            assert not await notifier.status("still here")
            assert (notifier.sent, notifier.dropped) == (1, 2)
            assert [r.getMessage() for r in caplog.records] == [dropped]
            assert caplog.records[0].levelno == logging.WARNING

            again = bind_receiver(address)
            try:
                assert await notifier.watchdog()
                assert drain(again) == ["WATCHDOG=1"]
            finally:
                again.close()
                os.unlink(address)
            assert (notifier.sent, notifier.dropped) == (2, 2)
            assert [r.getMessage() for r in caplog.records] == [dropped, through]
            assert caplog.records[1].levelno == logging.INFO
            # Gone again at once: a new run of failures, within a minute of the warning.
            assert not await notifier.watchdog()
            assert (notifier.sent, notifier.dropped) == (2, 3)
    assert [r.getMessage() for r in caplog.records] == [dropped, through]


async def test_a_receiver_that_comes_and_goes_is_logged_once_a_minute(
    autojump_clock: MockClock, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Gone at every odd second (two drops each time), back at every even one, for 125 s: a
    warning at 1, 61 and 121 and an info line after each, not a pair every two seconds.

    The runs in between are counted in the next warning (29 runs of 2 drops),
    and ``dropped`` counts every drop.
    """
    address = str(short_dir / "notify")
    logged: list[tuple[float, int, str]] = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append((trio.current_time(), record.levelno, record.getMessage()))

    handler = Record()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        logging.getLogger(LOGGER).addHandler(handler)
        try:
            async with SystemdNotifier(address) as notifier:
                for second in range(126):
                    await trio.sleep_until(second)
                    if second % 2:
                        assert not await notifier.watchdog()
                        assert not await notifier.watchdog()
                    else:
                        receiver = bind_receiver(address)  # synchronous: no time passes
                        try:
                            assert await notifier.watchdog()
                        finally:
                            receiver.close()
                            os.unlink(address)
        finally:
            logging.getLogger(LOGGER).removeHandler(handler)
    assert (notifier.sent, notifier.dropped) == (63, 126)
    through = f"notifications to {address} go through again (2 dropped)"
    assert logged == [
        (1.0, logging.WARNING, dropped_warning(address)),
        (2.0, logging.INFO, through),
        (61.0, logging.WARNING, dropped_warning(address, since=58)),
        (62.0, logging.INFO, through),
        (121.0, logging.WARNING, dropped_warning(address, since=58)),
        (122.0, logging.INFO, through),
    ]


async def test_a_clock_reading_before_the_last_warning_counts_as_a_minute_passed(
    monkeypatch: pytest.MonkeyPatch, path_receiver: tuple[str, socket.socket]
) -> None:
    """Readings from two clocks (Trio's, and the monotonic one in a thread) can go backwards:
    that may bring a warning early, never silence one for long. Scripted readings: a warning
    at 100; at 50 (before it) a warning again; at 80 (within 60 s of 50) none; at 110 one,
    which counts the drop of the run at 80."""
    address, sock = path_receiver
    readings = iter([100.0, 50.0, 80.0, 110.0])
    monkeypatch.setattr(_sdnotify, "_now", lambda: next(readings))
    warnings = []
    async with SystemdNotifier(address) as notifier:
        for _ in range(4):
            sock.close()
            os.unlink(address)
            with warnings_of(LOGGER) as records:
                assert not notifier.send_nowait("WATCHDOG=1")
                assert not notifier.send_nowait("WATCHDOG=1")  # same run: the clock is not read
            warnings.append([record.getMessage() for record in records])
            sock = bind_receiver(address)
            assert notifier.send_nowait("WATCHDOG=1")
    sock.close()
    assert warnings == [
        [dropped_warning(address)],
        [dropped_warning(address)],
        [],
        [dropped_warning(address, since=2)],
    ]
    assert next(readings, None) is None  # read once per run of failures, not per send


async def test_the_minute_is_read_on_trios_clock_else_the_monotonic_one(
    autojump_clock: MockClock,
) -> None:
    """In a Trio run, ``_now`` is :func:`trio.current_time` (virtual here); in a worker thread,
    outside any run, it is :func:`time.monotonic`."""
    await trio.sleep(5.0)
    assert _sdnotify._now() == trio.current_time() == 5.0

    def in_thread() -> tuple[float, float, float]:
        return time.monotonic(), _sdnotify._now(), time.monotonic()

    before, now, after = await trio.to_thread.run_sync(in_thread)
    assert before <= now <= after


async def test_a_first_send_that_fails_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A notifier whose very first message fails warns about it, as any run of failures."""
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with SystemdNotifier("/nonexistent/notify") as notifier:
            assert not await notifier.ready()
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        f"notification to /nonexistent/notify dropped ({os.strerror(errno.ENOENT)})"
    )


async def test_a_full_receive_buffer_drops_messages_without_blocking_the_loop(
    path_receiver: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """A manager that does not read: sends fail at once with EAGAIN, counted, logged once.

    The sends that fill the buffer run in a worker thread, given up on after
    10 s: a send that blocked would fail the test rather than hang it (and
    the receiver, closed at teardown, then frees the thread).
    """
    address, sock = path_receiver

    def fill(notifier: SystemdNotifier) -> None:
        attempts = 0
        while notifier.dropped < 100:
            notifier.send_nowait("STATUS=" + "x" * 200)
            attempts += 1
            assert attempts < 1_000_000, "the receive buffer never filled"

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with SystemdNotifier(address) as notifier:
            with trio.fail_after(10):
                await trio.to_thread.run_sync(fill, notifier, abandon_on_cancel=True)
            queued = notifier.sent
            assert queued > 0
            assert len(caplog.records) == 1
            assert len(drain(sock)) == queued
            assert await notifier.watchdog()  # room again
            assert drain(sock) == ["WATCHDOG=1"]


async def test_after_closing_messages_are_dropped_quietly(
    path_receiver: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """A watchdog that outlives the notifier cannot crash the service; closing twice is fine."""
    address, sock = path_receiver
    notifier = SystemdNotifier(address)
    assert await notifier.watchdog()
    await notifier.aclose()
    await notifier.aclose()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert not await notifier.watchdog()
        assert not await notifier.status("gone")
    assert caplog.records == []
    assert (notifier.sent, notifier.dropped) == (1, 2)
    assert drain(sock) == ["WATCHDOG=1"]


async def test_closing_a_notifier_that_never_sent_is_fine() -> None:
    """The socket is made at the first send: closing before it has nothing to close."""
    notifier = SystemdNotifier("/nonexistent/notify")
    await notifier.aclose()
    assert not notifier.send_nowait("READY=1")
    assert notifier.dropped == 1


# -- malformed messages --------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "",
        "READY",
        "ready=1",
        "=1",
        "READY=1\n",
        "READY=1\nSTATUS",
        "1READY=1",
        "STATUS=a\0b",
        "STATUS=" + "x" * MAX_MESSAGE,
        "STATUS=" + "\u00e9" * (MAX_MESSAGE // 2),  # under the limit in characters, not in bytes
    ],
)
def test_a_malformed_or_oversized_message_is_a_value_error(message: str) -> None:
    """Lines must be KEY=VALUE with an upper-case name, no NUL, the whole within MAX_MESSAGE bytes."""
    notifier = SystemdNotifier("/nonexistent/notify")
    with pytest.raises(ValueError, match=r"notification|NUL|STATUS"):
        notifier.send_nowait(message)
    assert (notifier.sent, notifier.dropped) == (0, 0)


async def test_notify_refuses_bad_fields() -> None:
    """No fields, a value that is not text or an integer, a newline in a value: errors before sending."""
    notifier = SystemdNotifier("/nonexistent/notify")
    with pytest.raises(ValueError, match=r"^an empty notification$"):
        await notifier.notify()
    with pytest.raises(ValueError, match=r"^an empty notification$"):
        notifier.send_nowait("")
    with pytest.raises(ValueError, match="string or an integer"):
        await notifier.notify(READY=True)
    with pytest.raises(ValueError, match="string or an integer"):
        await notifier.notify(EXTEND_TIMEOUT_USEC=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one line"):
        await notifier.notify(STATUS="two\nlines")
    with pytest.raises(ValueError, match="variable name"):
        await notifier.notify(status="lower case")
    assert (notifier.sent, notifier.dropped) == (0, 0)
    await notifier.aclose()


async def test_a_value_may_hold_equals_signs(path_receiver: tuple[str, socket.socket]) -> None:
    """Each line splits at its first ``=``: the name is before it, the rest is the value."""
    address, sock = path_receiver
    async with SystemdNotifier(address) as notifier:
        assert notifier.send_nowait("STATUS=load=0.5, peers=3\nREADY=1")
        assert await notifier.notify(STATUS="a=b")
    assert drain(sock) == ["STATUS=load=0.5, peers=3\nREADY=1", "STATUS=a=b"]


async def test_the_largest_message_is_accepted(path_receiver: tuple[str, socket.socket]) -> None:
    """MAX_MESSAGE bytes exactly is within the bound, and arrives whole."""
    address, sock = path_receiver
    message = "STATUS=" + "x" * (MAX_MESSAGE - len("STATUS="))
    async with SystemdNotifier(address) as notifier:
        assert notifier.send_nowait(message)
    assert drain(sock) == [message]


# -- STATUS= text --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sent"),
    [
        ("3 peers", "3 peers"),
        ("two\nlines", "two lines"),
        ("  tabs\tand\r\nbreaks  ", "tabs and breaks"),
        ("nul\0bell\x07", "nul bell"),
        ("", ""),
        ("x" * STATUS_LIMIT, "x" * STATUS_LIMIT),
        ("x" * (STATUS_LIMIT + 1), "x" * (STATUS_LIMIT - 1) + "\u2026"),
        # A cut just after a space: the space goes, and the ellipsis follows the last word.
        ("x" * (STATUS_LIMIT - 2) + " " + "y" * 9, "x" * (STATUS_LIMIT - 2) + "\u2026"),
    ],
)
def test_status_text_is_one_bounded_printable_line(text: str, sent: str) -> None:
    """Control characters and runs of white space become one space; long text is cut with an ellipsis."""
    assert _sdnotify._sanitize_status(text) == sent


@given(st.text())
def test_any_status_text_makes_a_valid_message(text: str) -> None:
    """Whatever the text, the STATUS= line is one printable line within both bounds."""
    line = _sdnotify._sanitize_status(text)
    assert len(line) <= STATUS_LIMIT
    assert line.isprintable()
    assert line == line.strip()
    _sdnotify._check_field("STATUS", line)
    assert len(f"READY=1\nSTATUS={line}".encode()) <= MAX_MESSAGE


# -- the watchdog, in virtual time ---------------------------------------------------------


class Health:
    """A ``healthy()`` for the watchdog: records when it is asked, and says no at the asks
    numbered in ``unhealthy`` (counting from 0).

    Asked twice at one moment, it raises: that is a burst of pings, and under
    the autojump clock a watchdog loop that never sleeps would hang the test
    instead of failing it.
    """

    def __init__(self, unhealthy: frozenset[int] = frozenset()) -> None:
        self.asked: list[float] = []
        self.unhealthy = unhealthy

    def __call__(self) -> bool:
        now = trio.current_time()
        assert not self.asked or self.asked[-1] < now, f"asked twice at {now}"
        self.asked.append(now)
        return len(self.asked) - 1 not in self.unhealthy


async def test_watchdog_pings_on_the_grid_only_while_healthy(
    autojump_clock: MockClock, path_receiver: tuple[str, socket.socket]
) -> None:
    """A ping at exactly k * interval while healthy; none while unhealthy; back on the grid after.

    ``healthy()`` is asked at every tick; the test reads the receiver half
    an interval after each tick.
    """
    address, sock = path_receiver
    healthy = Health(unhealthy=frozenset({3, 4}))
    received: list[int] = []
    async with SystemdNotifier(address, watchdog_interval=0.5) as notifier:
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run_watchdog, healthy)
            for tick in range(8):
                await trio.sleep_until(tick * 0.5 + 0.25)
                messages = drain(sock)
                assert set(messages) <= {"WATCHDOG=1"}
                received.append(len(messages))
            nursery.cancel_scope.cancel()
        assert notifier.sent == 6
    assert healthy.asked == [tick * 0.5 for tick in range(8)]
    assert received == [1, 1, 1, 0, 0, 1, 1, 1]


async def test_the_grid_starts_when_the_watchdog_does(
    autojump_clock: MockClock, path_receiver: tuple[str, socket.socket]
) -> None:
    """Started at 0.25 with an interval of 0.5, the ticks fall at 0.25 + k * 0.5, not on
    multiples of the interval."""
    address, sock = path_receiver
    healthy = Health()
    async with (
        SystemdNotifier(address, watchdog_interval=0.5) as notifier,
        trio.open_nursery() as nursery,
    ):
        await trio.sleep_until(0.25)
        await nursery.start(notifier.run_watchdog, healthy)
        await trio.sleep_until(1.5)
        nursery.cancel_scope.cancel()
    assert healthy.asked == [0.25, 0.75, 1.25]
    assert drain(sock) == ["WATCHDOG=1"] * 3


async def test_an_interval_with_no_exact_binary_form_keeps_its_pace(
    autojump_clock: MockClock, path_receiver: tuple[str, socket.socket]
) -> None:
    """With an interval of 0.1 s (rounded in binary), 2 s bring 21 pings, one per tick, never
    two at once: rounding never makes a tick look passed when it is the one just served."""
    address, sock = path_receiver
    healthy = Health()
    async with (
        SystemdNotifier(address, watchdog_interval=0.1) as notifier,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(notifier.run_watchdog, healthy)
        received = 0
        for half in range(1, 5):  # read every half second: the queue holds only a few datagrams
            await trio.sleep_until(half / 2 + 0.05)
            received += len(drain(sock))
        nursery.cancel_scope.cancel()
    assert healthy.asked == pytest.approx([k / 10 for k in range(21)])
    assert received == 21


@pytest.mark.parametrize(
    ("stall", "asked"),
    [
        (1.0, [0.0, 0.5, 1.75, 2.0, 2.5]),  # the tick at 1.0 fires late; 1.5 is skipped
        (2.0, [0.0, 0.5, 2.75, 3.0, 3.5]),  # the tick at 1.0 fires late; 1.5 to 2.5 are skipped
    ],
)
async def test_a_blocked_loop_sends_no_pings_and_resumes_on_the_grid(
    autojump_clock: MockClock,
    path_receiver: tuple[str, socket.socket],
    stall: float,
    asked: list[float],
) -> None:
    """A stall (the clock jumps with no task running): no ping during it, one late, no burst after."""
    address, sock = path_receiver
    healthy = Health()
    async with (
        SystemdNotifier(address, watchdog_interval=0.5) as notifier,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(notifier.run_watchdog, healthy)
        await trio.sleep_until(0.75)
        assert len(drain(sock)) == 2  # at 0.0 and 0.5
        autojump_clock.jump(stall)  # the loop was blocked from 0.75 on
        await trio.sleep_until(0.75 + stall + 1.0)
        nursery.cancel_scope.cancel()
    assert healthy.asked == asked
    assert drain(sock) == ["WATCHDOG=1"] * 3


async def test_a_check_that_takes_a_whole_interval_skips_the_tick_it_reaches(
    autojump_clock: MockClock, path_receiver: tuple[str, socket.socket]
) -> None:
    """``healthy()`` at 0.0 returns at exactly 0.5: its ping goes out then, and serves for the
    tick at 0.5, which is not asked again; the next ask is at 1.0."""
    address, sock = path_receiver
    health = Health()

    def slow_at_first() -> bool:
        answer = health()
        if len(health.asked) == 1:
            autojump_clock.jump(0.5)  # the check itself took one interval
        return answer

    async with (
        SystemdNotifier(address, watchdog_interval=0.5) as notifier,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(notifier.run_watchdog, slow_at_first)
        await trio.sleep_until(0.75)
        assert drain(sock) == ["WATCHDOG=1"]  # the one sent at 0.5
        await trio.sleep_until(1.75)
        nursery.cancel_scope.cancel()
    assert health.asked == [0.0, 1.0, 1.5]
    assert drain(sock) == ["WATCHDOG=1"] * 2


async def test_without_a_watchdog_run_watchdog_returns_at_once(autojump_clock: MockClock) -> None:
    """No WATCHDOG_USEC: started, then done at the same moment, ``healthy`` never asked."""
    notifier = SystemdNotifier("/nonexistent/notify")

    def healthy() -> bool:  # pragma: no cover - must not be called
        raise AssertionError("asked without a watchdog")

    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog, healthy)
    assert trio.current_time() == 0.0
    assert notifier.sent == notifier.dropped == 0
    await notifier.aclose()
