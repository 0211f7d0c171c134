"""A real etcd for the tests: one member on loopback, free ports, a data directory of its own.

Not a test module: the ``etcd`` fixture (conftest.py) and test_etcd.py use
:class:`EtcdServer`. It runs ``etcd`` (Debian's etcd-server, 3.4) with its
stderr in ``etcd.log`` beside the data, waits until a range is answered, and
can freeze (SIGSTOP), thaw (SIGCONT), kill (SIGKILL) and restart the member
on the same ports and data. However the test ends, :meth:`EtcdServer.stop`
thaws and ends the process.

Elections are fast here (25 ms heartbeats, a 250 ms election timeout): a
single member restarts in a fraction of a second, and etcd's minimum lease
TTL, one and a half election timeouts in whole seconds, is 1 s rather than
the default 2 s (``fast=False`` keeps etcd's own timing).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

#: Where Debian's etcd-server puts the binary.
DEBIAN_ETCD = "/usr/bin/etcd"


def find_etcd() -> str | None:
    """The etcd binary: ``etcd`` on PATH, else Debian's, else ``None``."""
    found = shutil.which("etcd")
    if found is not None:
        return found
    return DEBIAN_ETCD if os.access(DEBIAN_ETCD, os.X_OK) else None


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def b64(text: str) -> str:
    """A key or value as etcd's JSON gateway spells it."""
    return base64.b64encode(text.encode()).decode()


class EtcdServer:
    """One etcd member on 127.0.0.1, in ``directory``; a context manager that stops it."""

    def __init__(
        self,
        directory: Path,
        *,
        binary: str = DEBIAN_ETCD,
        fast: bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.binary = binary
        self.data_dir = directory / "data"
        self.log_path = directory / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.options = (
            ["--heartbeat-interval", "25", "--election-timeout", "250"] if fast else []
        ) + list(extra)
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def endpoint(self) -> str:
        """``"127.0.0.1:port"``, the client port."""
        return f"127.0.0.1:{self.client_port}"

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, ready_within: float = 15.0) -> None:
        """Start the member and wait until it answers a range."""
        assert self.process is None or self.process.poll() is not None, "already running"
        client = f"http://{self.endpoint}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [
            self.binary,
            "--name=test",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            *self.options,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=log)
        self.wait_ready(ready_within)

    def wait_ready(self, within: float = 15.0) -> None:
        """Wait until a range is answered; fail with the log's tail if etcd exits first."""
        deadline = time.monotonic() + within
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                self.post("/v3/kv/range", {"key": b64("ready?")}, timeout=0.5)
                return
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"etcd not ready in {within} s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.02)

    def post(self, path: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """One request to the JSON gateway, by hand (urllib, blocking): the answer."""
        request = urllib.request.Request(
            f"http://{self.endpoint}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            result: dict[str, Any] = json.loads(answer.read())
            return result

    def compact(self, revision: int) -> None:
        """Forget the history before ``revision`` (physically, before it returns)."""
        self.post("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _signal(self, number: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError("etcd is not running")
        self.process.send_signal(number)

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers them."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT."""
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, and wait for the process: connections are reset, the port closed."""
        self._signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same ports and data (after :meth:`kill`, or killing it now)."""
        if self.process is not None and self.process.poll() is None:
            self.kill()
        self.start()

    def stop(self) -> None:
        """Thaw and end the process, politely then not; idempotent."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
