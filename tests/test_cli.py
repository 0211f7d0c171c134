"""The command line, in-process through ``main([...])``: parsing, usage errors, exit codes.

Bad values that argparse can judge alone end in ``SystemExit(2)`` with
argparse's usage message; values judged later (a timeout that is not longer
than the interval, an unreadable ``--secret-file``, a port already taken, a
malformed endpoint) make ``main`` print one ``error: ...`` line and return 2,
with no traceback. The last tests run the command line as a shell would, as
processes on loopback (a dead port, a reader that goes away, a wrong secret);
the protocol itself is held to the spec through the subprocess in
``test_conformance.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import trio
from helpers import client_hello

from trio_heartbeat._cli import _fit_file_limit, _lines, main, serve
from trio_heartbeat._cli_args import build_parser
from trio_heartbeat._client import open_connection
from trio_heartbeat._config import Config
from trio_heartbeat._frames import encode_data
from trio_heartbeat._server import Server


@pytest.fixture(autouse=True)
def restore_library_logging() -> Iterator[None]:
    """``main`` points the library's logger at the stderr of the moment; undo that."""
    library = logging.getLogger("trio_heartbeat")
    saved = library.handlers[:], library.level, library.propagate
    yield
    library.handlers[:], library.level, library.propagate = saved


@contextmanager
def sigterm_after(seconds: float) -> Iterator[None]:
    """Bound a ``main`` that would run on: ``serve`` and ``connect`` both stop on SIGTERM.

    A signal that comes too late to matter finds a do-nothing handler.
    """
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGTERM, previous)


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``main`` on arguments argparse refuses; return its complaint."""
    with pytest.raises(SystemExit) as exit_info, sigterm_after(10):
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: python -m trio_heartbeat")
    complaint = err.splitlines()[-1]
    assert "error: " in complaint
    return complaint


def test_help_lists_the_four_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "connect", "registry", "demo"):
        assert command in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["listen"], "invalid choice: 'listen'"),
        (["serve", "--interval", "0"], "argument --interval: must be positive: '0'"),
        (["serve", "--timeout", "-1"], "argument --timeout: must be positive: '-1'"),
        (["serve", "--drain-timeout", "nan"], "argument --drain-timeout: must be positive: 'nan'"),
        (["serve", "--handshake-timeout", "soon"], "not a number: 'soon'"),
        (["serve", "--port", "65536"], "argument --port: must be 0 to 65535: '65536'"),
        (["serve", "--port", "-1"], "argument --port: must be 0 to 65535: '-1'"),
        (["serve", "--port", "http"], "argument --port: not a port number: 'http'"),
        (["serve", "--max-connections", "0"], "argument --max-connections: must be at least 1"),
        (["serve", "--max-connections", "1.5"], "not a whole number: '1.5'"),
        (["serve", "--verbose", "--quiet"], "unrecognized arguments: --quiet"),
        (["connect", "--linger", "0", "127.0.0.1:7400"], "argument --linger: must be positive"),
        (["connect", "--backoff-cap", "x", "127.0.0.1:7400"], "not a number: 'x'"),
        (["demo", "--slow"], "unrecognized arguments: --slow"),
    ],
)
def test_argparse_refuses_bad_values(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert message in usage_error(capsys, argv)


def run_for_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``main`` on arguments it refuses after parsing; return its one stderr line."""
    with sigterm_after(10):
        assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err  # no traceback, no log noise
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("command", [["serve"], ["connect", "127.0.0.1:7400"]])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--interval", "2", "--timeout", "1"], "error: --timeout must be longer than --interval"),
        (["--interval", "1", "--timeout", "1"], "error: --timeout must be longer than --interval"),
        (["--interval", "0.0001"], "error: interval must be between 1 ms and about 49 days"),
        (["--id", "é" * 33], "error: instance_id must be at most 64 bytes in UTF-8"),
    ],
)
def test_settings_the_protocol_cannot_honour_are_usage_errors(
    capsys: pytest.CaptureFixture[str], command: list[str], options: list[str], message: str
) -> None:
    assert run_for_error(capsys, [*command, *options]).startswith(message)


@pytest.mark.parametrize("command", [["serve"], ["connect", "127.0.0.1:7400"]])
def test_secret_file_that_cannot_be_read(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "missing"
    line = run_for_error(capsys, [*command, "--secret-file", str(missing)])
    assert line.startswith("error: cannot read --secret-file: ")
    assert str(missing) in line
    line = run_for_error(capsys, [*command, "--secret-file", str(tmp_path)])
    assert line.startswith("error: cannot read --secret-file: ")


@pytest.mark.parametrize("content", [b"", b" \n\t\r\n"])
def test_secret_file_with_no_key_in_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(content)
    assert run_for_error(capsys, ["serve", "--secret-file", str(secret)]) == (
        "error: --secret-file is empty"
    )


def test_serve_on_a_port_already_taken(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = run_for_error(capsys, ["serve", "--host", "127.0.0.1", "--port", str(port)])
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("localhost", "error: endpoint must be 'host:port' or (host, port), not 'localhost'"),
        ("127.0.0.1:http", "error: endpoint must be 'host:port'"),
        ("127.0.0.1:0", "error: port must be 1 to 65535 in the endpoint '127.0.0.1:0'"),
        ("127.0.0.1:65536", "error: port must be 1 to 65535 in the endpoint '127.0.0.1:65536'"),
    ],
)
def test_connect_to_a_malformed_endpoint(
    capsys: pytest.CaptureFixture[str], endpoint: str, message: str
) -> None:
    assert run_for_error(capsys, ["connect", "127.0.0.1:7400", endpoint]).startswith(message)


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(trio, "run", interrupted)
    assert main(["serve"]) == 130


# -- connect gives up with status 1 -------------------------------------------------------


@contextmanager
def refusing_server(code: int, reason: bytes) -> Iterator[int]:
    """A loopback listener that answers one client with CLOSE ``code`` instead of HELLO."""
    close = struct.pack(">BBIH", 0x05, 0, 2 + len(reason), code) + reason
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def answer_one() -> None:
        with suppress(OSError):
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(5)
                peer.sendall(close)
                while peer.recv(4096):
                    pass

    thread = threading.Thread(target=answer_one, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)


def test_connect_exits_1_when_refused_with_a_code_it_does_not_retry(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stdin_path = tmp_path / "stdin"
    stdin_path.write_bytes(b"never sent\n")
    with stdin_path.open("rb") as stdin, refusing_server(1008, b"who are you") as port:
        monkeypatch.setattr("sys.stdin", stdin)
        started = time.monotonic()
        with sigterm_after(10):
            status = main(["connect", "--linger", "30", f"127.0.0.1:{port}"])
        elapsed = time.monotonic() - started
    assert status == 1
    assert elapsed < 5  # it gave up at once: neither the linger nor the SIGTERM ended it
    out, err = capsys.readouterr()
    assert out == ""
    assert "giving up: not reconnecting after close code 1008 (who are you)" in err
    assert "Traceback" not in err


# -- for real: the command line as a process on loopback, as a shell runs it (#10) ------

CLI = [sys.executable, "-m", "trio_heartbeat"]


def free_port() -> int:
    """A loopback port nobody listens on (it was free a moment ago)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port: int = probe.getsockname()[1]
    return port


@contextmanager
def serving(*options: str) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``serve`` on a free loopback port; stopped with SIGTERM afterwards if still running."""
    server = subprocess.Popen(
        [*CLI, "serve", "--port", "0", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        yield int(line.rsplit(":", 1)[1]), server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


def stop(server: subprocess.Popen[str]) -> str:
    """SIGTERM ``server`` and return its stderr."""
    server.send_signal(signal.SIGTERM)
    _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    return err


def test_lines_for_a_dead_port_are_named_and_the_exit_status_is_1() -> None:
    """Nothing is lost silently: what could not be sent is named, and the status says so."""
    port = free_port()
    done = subprocess.run(
        [*CLI, "connect", "--linger", "0.1", f"127.0.0.1:{port}"],
        input="a\nb\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert "not sent: 2 lines: 'a', 'b'" in done.stderr
    assert f"because: cannot connect to 127.0.0.1:{port}: connection refused" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_signal_closes_connect_and_names_what_it_could_not_send() -> None:
    """SIGTERM while the server is down: the lines read are not dropped in silence."""
    client = subprocess.Popen(
        [*CLI, "connect", f"127.0.0.1:{free_port()}"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None
    assert client.stderr is not None
    client.stdin.write("one\ntwo\n")
    client.stdin.flush()  # and stdin stays open: only the signal ends it
    for line in client.stderr:
        if "backing off" in line:
            break
    time.sleep(0.5)  # the lines are read and sent long before (they wait in the client)
    client.send_signal(signal.SIGTERM)
    _, err = client.communicate(timeout=30)
    assert client.returncode == 1
    assert "SIGTERM: closing" in err
    assert "not sent: 2 lines: 'one', 'two'" in err


def test_a_reader_that_goes_away_ends_connect_quietly() -> None:
    """``connect ... | head -1``: a closed stdout ends it with 141 and no traceback."""
    with serving() as (port, _):
        client = subprocess.Popen(
            [*CLI, "connect", f"127.0.0.1:{port}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert client.stdin is not None
        assert client.stdout is not None
        client.stdin.write("first\n")
        client.stdin.flush()
        assert client.stdout.readline() == "first\n"
        client.stdout.close()  # as head -1 does once it has its line
        client.stdin.write("second\nthird\n")
        client.stdin.flush()
        _, err = client.communicate(timeout=30)
    assert client.returncode == 141
    assert "Traceback" not in err, err
    assert "Error" not in err, err


def test_a_client_with_the_wrong_secret_is_never_connected_and_counted_refused(
    tmp_path: Path,
) -> None:
    (tmp_path / "ours").write_text("the server's key\n")
    (tmp_path / "theirs").write_text("another key\n")
    with serving("--secret-file", str(tmp_path / "ours")) as (port, server):
        done = subprocess.run(
            [*CLI, "connect", "--secret-file", str(tmp_path / "theirs"), f"127.0.0.1:{port}"],
            input="never sent\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        served = stop(server)
    assert done.returncode == 1
    assert "connected to" not in done.stderr
    assert "handshake done" not in done.stderr
    assert "giving up: not reconnecting after close code 1008" in done.stderr
    assert "not sent: 1 line: 'never sent'" in done.stderr
    assert "stopped: 0 served, 1 refused" in served


def test_version_names_the_installed_package() -> None:
    done = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout == f"python -m trio_heartbeat {metadata.version('trio-heartbeat')}\n"


def rss_bytes(pid: int) -> int:
    """The resident set of process ``pid`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def flood_without_reading(port: int, payload: bytes, seconds: float) -> None:
    """A client that sends DATA as fast as it can and never reads, until cut off."""
    hello = client_hello(interval_ms=300, timeout_ms=1000)
    frame = encode_data(payload)
    with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(hello)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sock.sendall(frame)  # blocks once the server stops reading; fails once it cuts us off


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_rounds_of_peers_that_flood_without_reading_leave_the_server_no_bigger() -> None:
    """Whatever floods a server is cut off and freed: the RSS levels off round after round.

    Eight peers per round send 512 KiB DATA without reading the echoes. The
    server's queues are bounded in bytes and its write timeout (1 s here)
    cuts each one off; what they held is freed by reference counting at once,
    so a fourth round leaves the server no bigger than the third did. (Before
    #10 each such peer pinned 64 messages each way until a full collection:
    three rounds took a server from 622 MB to 1.5 GB.)
    """
    with serving("--interval", "0.3", "--timeout", "1") as (port, server):
        after_round = [rss_bytes(server.pid)]
        for _ in range(4):
            flooders = [
                threading.Thread(target=flood_without_reading, args=(port, bytes(512 << 10), 20))
                for _ in range(8)
            ]
            for flooder in flooders:
                flooder.start()
            for flooder in flooders:
                flooder.join(30)
                assert not flooder.is_alive(), "the server never cut a flooding peer off"
            time.sleep(0.5)
            after_round.append(rss_bytes(server.pid))
        # And the server still serves everyone else.
        done = subprocess.run(
            [*CLI, "connect", "--linger", "0.5", f"127.0.0.1:{port}"],
            input="still here\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout == "still here\n", done.stderr
        log = stop(server)
    sizes = [f"{rss / 2**20:.0f} MiB" for rss in after_round]
    # The allocator keeps some of what was freed for reuse, and how much varies
    # from one sample to the next by up to ~20 MiB (one round of eight peers holds
    # about that much at its peak). A leak grows with every round instead: three
    # more rounds after the first must not add up to two rounds' worth.
    assert after_round[-1] - after_round[1] < 40 << 20, sizes
    assert after_round[-1] - after_round[0] < 64 << 20, sizes
    assert log.count("ended with 1011") == 32, log  # every flooder was convicted, none hung on


def test_a_client_stopped_longer_than_the_timeout_hears_the_servers_verdict() -> None:
    """SIGSTOP, then SIGCONT: the server convicted it meanwhile, and it says so (#10).

    On resuming, its own timer has long expired too, but the server's CLOSE
    1011 is waiting in the socket: the client reads it before convicting
    anyone, reports the end as the peer's, and reconnects.
    """
    with serving("--interval", "0.3", "--timeout", "1") as (port, server):
        client = subprocess.Popen(
            [*CLI, "connect", "--interval", "0.3", "--timeout", "1", f"127.0.0.1:{port}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(client.stderr or ()), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while not any("connected to" in line for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        client.send_signal(signal.SIGSTOP)
        time.sleep(2.5)  # the server's timeout is 1 s
        client.send_signal(signal.SIGCONT)
        while sum("connected to" in line for line in lines) < 2:
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        client.communicate(input="", timeout=30)
        reader.join(10)
        log = stop(server)
    ended = [line for line in lines if "disconnected from" in line]
    assert len(ended) == 1, lines
    assert (
        ended[0].rstrip().endswith("closed with 1011 by the peer: heartbeat timeout: peer silent")
    )
    assert "ended with 1011 (heartbeat timeout: peer silent), closed by us" in log
    assert "stopped: 2 served, 0 refused" in log


def test_connect_with_its_stdout_closed_still_reports_on_stderr() -> None:
    """``connect ... >&-``: no traceback, and what could not be sent is still named."""
    done = subprocess.run(
        [*CLI, "connect", "--linger", "0.1", f"127.0.0.1:{free_port()}"],
        input="1\n2\n3\n",
        stdout=None,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(1),  # in the child: it starts with stdout closed
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "not sent: 3 lines: '1', '2', '3'" in done.stderr


def test_lines_not_sent_are_named_in_one_short_line() -> None:
    long = b"x" * 200
    assert _lines([long]) == "1 line: 'xxxxxxxxxxxxxxxxx...'"
    assert _lines([b"a", b"tab\there", b"\xff", b"d", b"e"]) == (
        "5 lines: 'a', 'tab\\there', '\\ufffd' and 2 more"
    )


WORKER_SERVER = Path(__file__).with_name("_health_worker_server.py")


@pytest.mark.slow
def test_connect_shows_the_peers_health_and_the_breakers_state_as_they_change() -> None:
    """A server whose worker stops checking in and starts again: ``connect`` says so on
    stderr, the peer's health and its breaker, in order, each as it happens."""
    server = subprocess.Popen(
        [sys.executable, str(WORKER_SERVER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    client: subprocess.Popen[str] | None = None
    try:
        assert server.stdin is not None
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        client = subprocess.Popen(
            [*CLI, "connect", "--linger", "0.5", f"127.0.0.1:{port}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        server.stdin.write("pause\n")
        server.stdin.flush()
        time.sleep(2.0)
        server.stdin.write("resume\n")
        server.stdin.flush()
        time.sleep(2.0)
        _, err = client.communicate(input="", timeout=30)
    finally:
        for process in (client, server):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    assert client.returncode == 0, err
    said = [line.split(" ", 1)[1] for line in err.splitlines() if " " in line]
    wanted = [
        "breaker CLOSED -> FORCED_OPEN: not connected",
        "handshake done, peer health SERVING, pinging every 0.900 s",
        "breaker FORCED_OPEN -> HALF_OPEN: liveness restored",
        "breaker HALF_OPEN -> CLOSED: trial calls under both thresholds",
        "peer health SERVING -> NOT_SERVING",
        "breaker CLOSED -> FORCED_OPEN: peer reports NOT_SERVING",
        "peer health NOT_SERVING -> SERVING",
        "breaker FORCED_OPEN -> HALF_OPEN: liveness restored",
        "breaker HALF_OPEN -> CLOSED: trial calls under both thresholds",
        "breaker CLOSED -> FORCED_OPEN: connection ended: 1000",
    ]
    assert [line for line in said if line in wanted] == wanted, err


@pytest.mark.slow
def test_serve_health_port_answers_probes_and_refuses_garbage_without_harm() -> None:
    """``serve --health-port 0`` prints ``health on HOST:PORT``; /livez and /readyz are 200,
    /peers lists a connected client; garbage on the probe port gets a 400 and an oversized
    head a 431, and the heartbeat client stays connected throughout."""
    with serving("--health-port", "0") as (port, server):
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("health on 127.0.0.1:"), line
        probe_port = int(line.rsplit(":", 1)[1])
        client = subprocess.Popen(
            [*CLI, "connect", f"127.0.0.1:{port}", "--id", "probe-watcher"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            def get(path: str) -> tuple[int, str]:
                with socket.create_connection(("127.0.0.1", probe_port), timeout=10) as probe:
                    probe.sendall(
                        f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                    )
                    answer = b""
                    while chunk := probe.recv(65536):
                        answer += chunk
                head, _, body = answer.decode().partition("\r\n\r\n")
                return int(head.split()[1]), body

            def peers() -> list[dict[str, object]]:
                status, body = get("/peers")
                assert status == 200
                listed: list[dict[str, object]] = json.loads(body)
                return listed

            deadline = time.monotonic() + 15
            while not (listed := peers()) and time.monotonic() < deadline:
                time.sleep(0.05)  # the client is still connecting
            (peer,) = listed
            assert peer["id"] == "probe-watcher"
            assert peer["health"] == "SERVING"
            assert get("/livez") == (200, "ok\n")
            assert get("/readyz")[0] == 200
            with socket.create_connection(("127.0.0.1", probe_port), timeout=10) as probe:
                probe.sendall(b"\x00\x01garbage\r\n\r\n")
                assert probe.recv(65536).startswith(b"HTTP/1.1 400")
            with socket.create_connection(("127.0.0.1", probe_port), timeout=10) as probe:
                probe.sendall(b"GET /livez HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
                assert probe.recv(65536).startswith(b"HTTP/1.1 431")  # over 8 KiB of head
            # The same connection, still there: nothing reached the heartbeats.
            (after,) = peers()
            since, since_after = peer["connected_since"], after["connected_since"]
            assert isinstance(since, float)
            assert isinstance(since_after, float)
            assert abs(since_after - since) < 0.01  # wall and loop clocks, rounded to 1 ms
            assert client.poll() is None
        finally:
            client.kill()
            _, client_err = client.communicate(timeout=30)
    assert "disconnected" not in client_err


def test_serve_health_port_already_taken_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        status = main(["serve", "--port", "0", "--health-port", str(taken.getsockname()[1])])
    assert status == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


# -- serve under its service supervisor ------------------------------------------------


@dataclass
class ServingRuns:
    """What :func:`failing_serve_listeners` saw: the port of each run, and two moments."""

    ports: list[int] = field(default_factory=list)
    failed: trio.Event = field(default_factory=trio.Event)  # the first run has failed
    restarted: trio.Event = field(default_factory=trio.Event)  # the second run began


def failing_serve_listeners(monkeypatch: pytest.MonkeyPatch, failures: int) -> ServingRuns:
    """Make the first ``failures`` runs of Server.serve_listeners fail as an accept error
    would (listeners closed, OSError raised)."""
    runs = ServingRuns()
    ports = runs.ports
    original = Server.serve_listeners

    async def flaky(
        self: Server,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        ports.append(listeners[0].socket.getsockname()[1])
        if len(ports) == 2:
            runs.restarted.set()
        if len(ports) <= failures:
            for listener in listeners:
                await listener.aclose()
            runs.failed.set()
            raise OSError(errno.EBADF, "accept failed")
        await original(self, listeners, task_status=task_status)

    monkeypatch.setattr(Server, "serve_listeners", flaky)
    return runs


async def test_serve_restarts_a_failed_server_on_the_same_port(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Serving fails once: the supervisor restarts the server 0.125 s later, bound to the
    port it had, and a client completes its handshake there."""
    runs = failing_serve_listeners(monkeypatch, failures=1)
    ports = runs.ports
    args = build_parser().parse_args(["serve", "--host", "127.0.0.1", "--port", "0"])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, args)
            await runs.restarted.wait()
            assert ports[0] == ports[1]
            async with open_connection("127.0.0.1", ports[1], config=Config()) as conn:
                assert conn.peer is not None
            nursery.cancel_scope.cancel()
    assert "child 'server' failed; restarting 'server' (one_for_one)" in caplog.messages


async def test_serve_exits_1_once_its_supervisor_gives_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Serving fails every time: after 3 restarts within 5 s the supervisor gives up and
    serve returns 1, saying why."""
    ports = failing_serve_listeners(monkeypatch, failures=1_000).ports
    args = build_parser().parse_args(["serve", "--host", "127.0.0.1", "--port", "0"])
    with trio.fail_after(10):
        assert await serve(args) == 1
    assert len(ports) == 4
    assert len(set(ports)) == 1
    assert caplog.messages[-1].startswith("stopped: child 'server' failed; 3 restart(s)")


@pytest.mark.slow
def test_serve_outlives_a_reader_of_its_stdout_that_left() -> None:
    """``serve --health-port 0 | head -1`` when head has left before the lines come: both
    announcements meet a broken pipe, and serve goes on (still running a second later,
    ended by SIGTERM with status 0, no traceback)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        server = subprocess.Popen(
            [*CLI, "serve", "--port", "0", "--health-port", "0"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    try:
        time.sleep(1.5)
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "BrokenPipeError" not in err


@pytest.mark.parametrize(
    ("limits", "raised_to", "cap", "warned"),
    [
        ((1024, 1_000_000), 4160, 4096, False),  # raised as far as needed
        ((1024, 2048), 2048, 1984, True),  # as far as the hard limit allows, then fitted
        ((100, 100), None, 36, True),  # cannot be raised at all
        ((5000, 5000), None, 4096, False),  # enough already
    ],
)
def test_the_connection_cap_fits_the_file_limit(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    limits: tuple[int, int],
    raised_to: int | None,
    cap: int,
    warned: bool,
) -> None:
    """Past the file limit accept fails for everyone, the probes too: serve raises its soft
    limit toward --max-connections + 64 (like Go's runtime) and else serves fewer."""
    import resource

    state = {"limits": limits}
    calls: list[int] = []

    def setrlimit(which: int, new: tuple[int, int]) -> None:
        if new[0] > state["limits"][1]:
            raise ValueError("over the hard limit")
        calls.append(new[0])
        state["limits"] = new

    monkeypatch.setattr(resource, "getrlimit", lambda which: state["limits"])
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert _fit_file_limit(4096) == cap
    assert calls == ([] if raised_to is None or raised_to == limits[0] else [raised_to])
    assert any("more than the file limit allows" in m for m in caplog.messages) is warned


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_NOFILE")
def test_peers_that_would_use_up_the_file_limit_leave_livez_answering() -> None:
    """serve under a file limit of 100 with 150 raw connections held open: the cap (36)
    refuses the rest and frees their descriptors, so /livez still answers 200 (with the
    default cap of 4096 the probe listener's accept failed with EMFILE: probes timed out)."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))

    server = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--health-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=limit,
    )
    conns: list[socket.socket] = []
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().rsplit(":", 1)[1])
        health_port = int(server.stdout.readline().rsplit(":", 1)[1])
        for _ in range(150):
            with suppress(OSError):
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(1.0)
        # A kubelet's timeout: without the cap the probe waited for the handshake
        # timeout to free descriptors (about 10 s).
        with socket.create_connection(("127.0.0.1", health_port), timeout=3) as probe:
            probe.sendall(b"GET /livez HTTP/1.1\r\nHost: k\r\n\r\n")
            assert probe.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        for conn in conns:
            conn.close()
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert server.returncode == 0


async def test_a_signal_while_the_server_waits_for_its_restart_ends_serve_cleanly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serving fails, and SIGTERM comes before the restart (0.125 s later): the drain has
    begun, so the port is not bound again and serve returns 0."""
    runs = failing_serve_listeners(monkeypatch, failures=1_000)
    args = build_parser().parse_args(["serve", "--host", "127.0.0.1", "--port", "0"])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            statuses: list[int] = []

            async def run() -> None:
                statuses.append(await serve(args))

            nursery.start_soon(run)
            await runs.failed.wait()
            os.kill(os.getpid(), signal.SIGTERM)
    assert statuses == [0]
    assert len(runs.ports) == 1
