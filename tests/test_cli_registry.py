"""The command line's registry (``_cli_registry.py``): ``serve --register``, ``connect --discover``
and ``registry list|watch``, with real processes and a real etcd on loopback.

What it pins: etcd URLs are parsed strictly and ``memory`` is refused with the
reason; options that cannot work are usage errors before anything listens;
the three-server scenario of issue #14 (three ``serve`` register, one is
frozen with SIGSTOP and one killed with SIGKILL, ``registry list`` drops both
within the TTL and a renewal, ``connect --discover`` clients all end up on
the survivor, and the frozen one registers again once thawed); a drained
server is withdrawn at once; ``registry watch`` prints the live instances and
then each change, and ends quietly (141) when its reader goes away; ``registry
list`` says so and exits 1 when etcd does not answer.
"""

from __future__ import annotations

import base64
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import IO

import pytest
from etcd_server import EtcdServer, b64, free_port

from trio_heartbeat._cli import main
from trio_heartbeat._cli_registry import parse_etcd_url
from trio_heartbeat._errors import UsageError
from trio_heartbeat._instances import Instance

CLI = [sys.executable, "-m", "trio_heartbeat"]
#: The registrations' lease in these tests (etcd's minimum is 1 s in the fixture's fast mode).
TTL = 2.0

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("text", "service", "expected"),
    [
        ("etcd://127.0.0.1:2379", False, (["127.0.0.1:2379"], "")),
        ("etcd://a:1,[::1]:2/", False, (["a:1", "[::1]:2"], "")),
        ("etcd://a:1/echo", True, (["a:1"], "echo")),
        ("etcd://a:1,b:2/echo/", True, (["a:1", "b:2"], "echo")),
    ],
)
def test_etcd_urls(text: str, service: bool, expected: tuple[list[str], str]) -> None:
    assert parse_etcd_url(text, option="--x", service=service) == expected


@pytest.mark.parametrize(
    ("text", "service", "message"),
    [
        ("memory", False, r"^--x memory is not meaningful across processes: .* library feature"),
        ("http://a:1", False, r"^--x must be etcd://HOST:PORT, not 'http://a:1'$"),
        ("etcd://a:1/echo?x", True, r"^--x must be etcd://HOST:PORT/SERVICE, not"),
        ("etcd://user@a:1", False, r"^--x must be etcd://HOST:PORT, not"),
        ("etcd://a:1", True, r"^--x needs the service: etcd://HOST:PORT/SERVICE"),
        ("etcd://a:1/echo", False, r"^--x takes no service in the URL \(use --service\)"),
        ("etcd://a", False, r"^--x: endpoint must be 'host:port'"),
        ("etcd://a:1,,b:2", False, r"^--x: endpoint must be 'host:port'"),
        ("etcd://a:99999", False, r"^--x: port must be 1 to 65535"),
        ("etcd://a:1/e/x", True, r"^--x: service must be printable, without '/'"),
    ],
)
def test_malformed_etcd_urls_are_usage_errors(text: str, service: bool, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_etcd_url(text, option="--x", service=service)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--register", "memory", "--service", "e"], "not meaningful across processes"),
        (["serve", "--register", "etcd://a:1"], "--register needs --service NAME"),
        (["serve", "--service", "e"], "--service, --advertise and --publish-peers need --register"),
        (["serve", "--advertise", "a:1"], "--service, --advertise and --publish-peers need"),
        (["serve", "--publish-peers", "w"], "--service, --advertise and --publish-peers need"),
        (
            ["serve", "--register", "etcd://a:1", "--service", "e", "--publish-peers", "e"],
            "--publish-peers needs a service of its own",
        ),
        (
            ["serve", "--register", "etcd://a:1", "--service", "e", "--publish-peers", "w/x"],
            "--register: service must be printable, without '/'",
        ),
        (["serve", "--register", "etcd://a:1", "--service", "e", "--ttl", "0.5"], "--ttl must be"),
        (
            ["serve", "--register", "etcd://a:1", "--service", "e", "--ttl", "1e10"],
            "--ttl must be 1 to 9000000000 s, not 10000000000.0",
        ),
        (
            ["serve", "--register", "etcd://a:1", "--service", "e", "--host", "0.0.0.0"],
            "--register with --host 0.0.0.0 needs --advertise HOST:PORT",
        ),
        (
            ["serve", "--register", "etcd://a:1", "--service", "e", "--advertise", "nowhere"],
            "--register: endpoint must be 'host:port'",
        ),
        (["serve", "--register", "etcd://a:1", "--service", "a b"], "without '/' or spaces"),
        (["connect"], "connect needs HOST:PORT or --discover etcd://HOST:PORT/SERVICE"),
        (
            ["connect", "a:1", "--discover", "etcd://a:1/e"],
            "give HOST:PORT or --discover, not both",
        ),
        (["connect", "--discover", "etcd://a:1"], "--discover needs the service"),
        (["registry", "list", "etcd://a:1"], "registry list needs the service"),
        (["registry", "watch", "memory"], "registry watch memory is not meaningful"),
    ],
)
def test_registry_options_that_cannot_work_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err


def test_registry_list_says_when_etcd_does_not_answer() -> None:
    done = subprocess.run(
        [*CLI, "registry", "list", f"etcd://127.0.0.1:{free_port()}/echo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert "cannot reach etcd" in done.stderr


# -- with a real etcd ----------------------------------------------------------------


def registry_list(etcd: EtcdServer, service: str = "echo") -> list[list[str]]:
    done = subprocess.run(
        [*CLI, "registry", "list", f"etcd://{etcd.endpoint}/{service}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return [line.split() for line in done.stdout.splitlines()]


def wait_until(condition: Callable[[], bool], within: float) -> float:
    """Poll ``condition`` until it holds; the time it took, or fail after ``within`` s."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within} s")
        time.sleep(0.05)
    return time.monotonic() - start


@contextmanager
def registered_serve(
    etcd: EtcdServer, name: str, ttl: float = TTL, *options: str
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``serve --register`` as instance ``name``; its address. Ended (thawed first) afterwards."""
    registering = ["--register", f"etcd://{etcd.endpoint}", "--service", "echo", "--ttl", str(ttl)]
    server = subprocess.Popen(
        [*CLI, "serve", "--port", "0", *registering, "--id", name, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on "), line
        yield server, line.split()[-1]
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGCONT)
            server.kill()
        server.communicate(timeout=30)


@contextmanager
def discovering_client(etcd: EtcdServer) -> Iterator[subprocess.Popen[str]]:
    client = subprocess.Popen(
        [*CLI, "connect", "--discover", f"etcd://{etcd.endpoint}/echo", "--timeout", "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield client
    finally:
        if client.returncode is None:  # not read to its end by the test
            client.kill()
            client.communicate(timeout=30)


def echoed(client: subprocess.Popen[str], line: str) -> str:
    assert client.stdin is not None
    assert client.stdout is not None
    client.stdin.write(line + "\n")
    client.stdin.flush()
    return client.stdout.readline().strip()


def echoed_eventually(client: subprocess.Popen[str], line: str, within: float = 60) -> None:
    """Send ``line`` until it comes back. A line written to a peer that froze is lost with
    the connection (THB/1 delivers at most once), so it is sent again every 4 s."""
    assert client.stdin is not None
    assert client.stdout is not None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        client.stdin.write(line + "\n")
        client.stdin.flush()
        ready, _, _ = select.select([client.stdout], [], [], 4.0)
        if ready:
            assert client.stdout.readline().strip() == line
            return
    pytest.fail(f"{line!r} never came back")


def connected_to(stderr: str) -> list[str]:
    return [line.split()[-3] for line in stderr.splitlines() if " connected to " in line]


def test_three_servers_one_frozen_one_killed(etcd: EtcdServer) -> None:
    with ExitStack() as stack:
        servers = [stack.enter_context(registered_serve(etcd, f"s{n}")) for n in (1, 2, 3)]
        (frozen, _), (killed, _), (_, survivor) = servers
        wait_until(lambda: len(registry_list(etcd)) == 3, within=10)
        rows = registry_list(etcd)
        assert [row[0] for row in rows] == ["s1", "s2", "s3"]
        assert [row[1] for row in rows] == [address for _, address in servers]
        assert {row[2] for row in rows} == {"SERVING"}
        clients = [stack.enter_context(discovering_client(etcd)) for _ in range(4)]
        for n, client in enumerate(clients):
            assert echoed(client, f"before {n}") == f"before {n}"

        frozen.send_signal(signal.SIGSTOP)
        killed.send_signal(signal.SIGKILL)
        took = wait_until(lambda: [row[0] for row in registry_list(etcd)] == ["s3"], within=10)
        assert took <= TTL + TTL / 3 + 1.5  # TTL + one renewal, and etcd's lease check

        for n, client in enumerate(clients):  # each one fails over, if it must
            echoed_eventually(client, f"after {n}")
        for client in clients:
            _, err = client.communicate(timeout=30)  # the end of input: it closes
            assert client.returncode == 0, err
            assert connected_to(err)[-1] == survivor

        frozen.send_signal(signal.SIGCONT)  # thawed: its lease is gone, it registers again
        wait_until(lambda: [row[0] for row in registry_list(etcd)] == ["s1", "s3"], within=10)


def test_a_draining_server_is_withdrawn_at_once(etcd: EtcdServer) -> None:
    with registered_serve(etcd, "s1", ttl=30.0) as (server, _):
        wait_until(lambda: len(registry_list(etcd)) == 1, within=10)
        server.send_signal(signal.SIGTERM)
        took = wait_until(lambda: registry_list(etcd) == [], within=20)
        assert took < 10.0  # the drain withdrew it; the lease (30 s) did not run out
        _, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
        assert "withdrawn" in err


def read_line(stream: IO[str]) -> str:
    return stream.readline().strip()


def test_registry_watch_prints_the_set_then_each_change(etcd: EtcdServer) -> None:
    with registered_serve(etcd, "s1") as (_, first):
        wait_until(lambda: len(registry_list(etcd)) == 1, within=10)
        watch = subprocess.Popen(
            [*CLI, "registry", "watch", f"etcd://{etcd.endpoint}/echo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watch.stdout is not None
            assert read_line(watch.stdout) == f"added s1 {first} SERVING"
            with registered_serve(etcd, "s2") as (second_server, second):
                assert read_line(watch.stdout) == f"added s2 {second} SERVING"
                second_server.send_signal(signal.SIGTERM)
                assert read_line(watch.stdout) == f"removed s2 {second} SERVING"
            watch.send_signal(signal.SIGTERM)
            _, err = watch.communicate(timeout=30)
            assert watch.returncode == 0, err
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.communicate()


def test_registry_watch_ends_quietly_when_its_reader_goes_away(etcd: EtcdServer) -> None:
    read, write = os.pipe()
    with registered_serve(etcd, "s1"):
        wait_until(lambda: len(registry_list(etcd)) == 1, within=10)
        watch = subprocess.Popen(
            [*CLI, "registry", "watch", f"etcd://{etcd.endpoint}/echo"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(write)
        with os.fdopen(read) as reader:
            assert reader.readline().startswith("added s1 ")
        with registered_serve(etcd, "s2"):  # the next line finds no reader
            _, err = watch.communicate(timeout=30)
    assert watch.returncode == 141
    assert "Traceback" not in err
    assert "BrokenPipe" not in err


def test_a_draining_server_is_out_of_the_registry_before_it_sends_its_clients_away(
    etcd: EtcdServer,
) -> None:
    """SIGTERM: the server withdraws, waits for the withdrawal (and a moment for the watches),
    and only then says GOING_AWAY: its clients reconnect to the other instance at once and
    never dial the draining one again. (Told GOING_AWAY while it is still listed, each
    client would dial it again half the time: four clients all missing it by luck, 1 in 16.)"""
    with ExitStack() as stack:
        first, first_address = stack.enter_context(registered_serve(etcd, "s1"))
        wait_until(lambda: len(registry_list(etcd)) == 1, within=10)
        clients = [stack.enter_context(discovering_client(etcd)) for _ in range(4)]
        for client in clients:
            assert echoed(client, "on s1") == "on s1"
        _, second_address = stack.enter_context(registered_serve(etcd, "s2"))
        wait_until(lambda: len(registry_list(etcd)) == 2, within=10)
        first.send_signal(signal.SIGTERM)
        for client in clients:
            echoed_eventually(client, "on s2")
        for client in clients:
            _, err = client.communicate(timeout=30)
            after = err[err.index(f"disconnected from {first_address}") :]
            dialled = [line.split()[-1] for line in after.splitlines() if "connecting to" in line]
            assert dialled == [second_address]
            assert connected_to(err) == [first_address, second_address]


def test_serve_publishes_its_peers_under_its_own_lease(etcd: EtcdServer) -> None:
    with registered_serve(etcd, "hub", TTL, "--publish-peers", "workers") as (hub, address):
        client = subprocess.Popen(
            [*CLI, "connect", address, "--id", "w1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(lambda: len(registry_list(etcd, "workers")) == 1, within=10)
            [row] = registry_list(etcd, "workers")
            assert row[0] == "w1"
            assert row[1].startswith("127.0.0.1:")
            assert row[2] == "SERVING"
            client.communicate(timeout=30)  # the end of input: it closes
            wait_until(lambda: registry_list(etcd, "workers") == [], within=5)
        finally:
            if client.returncode is None:
                client.kill()
                client.communicate()
        hub.send_signal(signal.SIGKILL)  # the hub's lease carries its peers' records too


def test_registry_watch_whose_reader_stopped_reading_still_stops_on_sigterm(
    etcd: EtcdServer,
) -> None:
    """A full pipe blocks the write (in a thread), never the loop: SIGTERM still ends it."""
    read, write = os.pipe()
    try:
        watch = subprocess.Popen(
            [*CLI, "registry", "watch", f"etcd://{etcd.endpoint}/echo"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(250):  # about 95 kB of lines (long ids and hosts): more than a pipe holds
            record = Instance("echo", f"{n:03d}" + "i" * 120, "h" * 250 + f":{n + 1}")
            value = base64.b64encode(record.encode()).decode()
            etcd.post("/v3/kv/put", {"key": b64(record.key), "value": value})
        time.sleep(2.0)  # the watch is stuck writing
        assert watch.poll() is None
        watch.send_signal(signal.SIGTERM)
        _, err = watch.communicate(timeout=10)
        assert watch.returncode == 0, err
        assert "Traceback" not in err
    finally:
        os.close(read)
        os.close(write)
