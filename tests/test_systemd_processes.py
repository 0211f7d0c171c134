"""A real ``serve`` process under a stand-in for systemd: what it says on ``NOTIFY_SOCKET``.

A datagram socket of the test plays systemd's side, at a path or at an
abstract name; ``serve`` is started with ``NOTIFY_SOCKET`` pointing at it and
``WATCHDOG_USEC`` of one second. What it pins, with generous bounds (a real
process on a shared machine): READY=1 with a status line once it listens,
WATCHDOG=1 about every half second, a STATUS= line when a peer connects,
no pings while the process is stopped (SIGSTOP: its loop cannot run), pings
again after SIGCONT, and STOPPING=1 when SIGTERM starts the drain. With an
absurd ``WATCHDOG_USEC`` (5,000 digits, or 1 µs) ``serve`` still serves and
stops cleanly: no watchdog at all, or pings no closer than 10 ms apart. An
application that wires a service supervisor to the notifier and the probes
(``tests/_supervised_server.py``) stops pinging and answers ``/livez`` 503 the
moment its supervisor gives up, while its loop still runs.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "trio_heartbeat"]


def collect(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    """Every datagram that comes within ``seconds``, with its monotonic arrival time."""
    heard: list[tuple[float, str]] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        heard.append((time.monotonic(), data.decode()))
    return heard


@contextmanager
def serve_under(address: str, usec: str = "1000000") -> Iterator[tuple[subprocess.Popen[str], int]]:
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC=usec)
    env.pop("WATCHDOG_PID", None)
    process = subprocess.Popen(
        [*CLI, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        yield process, int(line.rsplit(":", 1)[1])
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.communicate(timeout=30)


def notify_socket(tmp_path: Path, abstract: bool) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"trio-heartbeat-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        return sock, "@" + name
    path = str(tmp_path / "notify")
    sock.bind(path)
    return sock, path


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_serve_tells_systemd_ready_status_watchdog_and_stopping(
    tmp_path: Path, abstract: bool
) -> None:
    if abstract and not sys.platform.startswith("linux"):
        pytest.skip("abstract sockets are Linux's")
    sock, address = notify_socket(tmp_path, abstract)
    with sock, serve_under(address) as (process, port):
        first = collect(sock, 1.6)
        assert first[0][1] == "READY=1\nSTATUS=0 peer(s), SERVING"
        pings = [at for at, text in first if text == "WATCHDOG=1"]
        assert len(pings) >= 2
        assert all(0.3 < b - a < 1.0 for a, b in itertools.pairwise(pings))

        client = subprocess.Popen(  # a peer, for the status line
            [*CLI, "connect", f"127.0.0.1:{port}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            joined = collect(sock, 2.5)
        finally:
            client.kill()
            client.communicate(timeout=30)  # closes its stdin too
        assert any(text == "STATUS=1 peer(s), SERVING" for _, text in joined)

        process.send_signal(signal.SIGSTOP)  # the loop cannot run: no pings
        stopped = collect(sock, 1.5)
        process.send_signal(signal.SIGCONT)
        assert [text for _, text in stopped if text == "WATCHDOG=1"] == []
        resumed = collect(sock, 1.5)
        assert any(text == "WATCHDOG=1" for _, text in resumed)

        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        last = collect(sock, 0.5)
        assert any(text.startswith("STOPPING=1") for _, text in resumed + last)
    assert process.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("usec", "fewest", "most"), [("9" * 5000, 0, 0), ("1", 10, 150)], ids=["5000-digits", "1-usec"]
)
def test_serve_survives_an_absurd_watchdog_usec(
    tmp_path: Path, usec: str, fewest: int, most: int
) -> None:
    """5,000 digits (once a ValueError out of ``from_environment`` that ended ``serve``): READY,
    no ping, a clean stop. 1 µs (once 10,000 pings a second, the loop doing nothing else): at
    most 150 pings in a second, for one every 10 ms, and a clean stop."""
    sock, address = notify_socket(tmp_path, abstract=False)
    with sock, serve_under(address, usec) as (process, _):
        heard = collect(sock, 1.5)
        assert heard, f"nothing heard; serve exited with {process.poll()}"
        assert heard[0][1] == "READY=1\nSTATUS=0 peer(s), SERVING"
        ready_at = heard[0][0]
        pings = [at for at, text in heard if text == "WATCHDOG=1" and at > ready_at + 0.25]
        assert fewest <= len([at for at in pings if at <= ready_at + 1.25]) <= most
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_an_application_whose_supervisor_gives_up_stops_pinging_and_fails_livez(
    tmp_path: Path,
) -> None:
    """tests/_supervised_server.py wires its supervisor to notify_systemd and the probes.
    Its worker crashes four times: the supervisor gives up while a slow child (3 s) is
    still being stopped, and in that time the loop runs on, but no WATCHDOG=1 comes and
    /livez answers 503; then the process exits 1."""
    sock, address = notify_socket(tmp_path, abstract=False)
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    script = Path(__file__).with_name("_supervised_server.py")
    with (
        sock,
        subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        ) as process,
    ):
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            assert process.stdout.readline().startswith("listening on 127.0.0.1:")
            health = process.stdout.readline().strip().removeprefix("health on ")
            host, port = health.rsplit(":", 1)
            before = collect(sock, 1.0)
            assert sum(text == "WATCHDOG=1" for _, text in before) >= 2
            assert http_get(host, int(port), "/livez").startswith("HTTP/1.1 200")
            process.stdin.write("crash\n" * 4)
            process.stdin.flush()
            assert process.stdout.readline() == "gave up\n"
            collect(sock, 0.01)  # pings sent before the give-up, already queued
            after = collect(sock, 1.5)  # the journal flushes for 3 s
            assert process.poll() is None  # still running
            assert [text for _, text in after if text == "WATCHDOG=1"] == []
            assert http_get(host, int(port), "/livez").startswith("HTTP/1.1 503")
            assert process.wait(timeout=30) == 1
        finally:
            if process.poll() is None:
                process.kill()


def http_get(host: str, port: int, path: str) -> str:
    """The status line and headers of one GET, over a fresh connection."""
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
        return conn.recv(65536).decode()
