"""Peers for the network benchmarks: child processes, line I/O, /proc readings.

Theory of operation
-------------------
A network benchmark puts its server in another process: the client and the
server then run on different cores, as they would in production, and the
server's CPU time and memory can be read from ``/proc`` on their own. A child
is this same Python running a benchmark module with ``--role``
(``python -m benchmarks.bench_idle --role server ...``).

Parent and child talk in lines of text. The child writes a line when it is
ready (``port 40123``) and its results as one line of JSON; the parent writes
commands to the child's stdin. Closing the child's stdin asks it to stop.

Nothing may outlive the benchmark or hang it. Every child gets a
``--lifetime`` after which it exits by itself; every read from a child has a
timeout; and on the way out the parent closes the child's stdin, waits a
bounded time and then kills it, also when the benchmark failed or was
cancelled.

The websockets subjects speak asyncio: :class:`AsyncioThread` runs an asyncio
loop in a thread of the benchmark process, and a Trio task hands it one
coroutine at a time, so that only one of the two event loops runs at once.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, TypeVar, final

import trio

__all__ = [
    "REPOSITORY",
    "AsyncioThread",
    "Child",
    "ChildError",
    "LineReader",
    "announce",
    "cpu_seconds",
    "open_child",
    "raise_fd_limit",
    "rss_bytes",
    "stdin_lines",
]

#: The directory that holds the ``benchmarks`` package: the children's import root.
REPOSITORY: Final = Path(__file__).resolve().parents[1]
#: How long a child may take to stop once its stdin is closed, before it is killed.
STOP_SECONDS: Final = 10.0

_T = TypeVar("_T")


class ChildError(RuntimeError):
    """A child process died, said something unexpected, or did not answer in time."""


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; return the new soft limit.

    A no-op where the soft limit is already the hard limit, or unlimited.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time used so far by process ``pid``, from ``/proc/<pid>/stat``.

    The kernel counts in clock ticks (usually 10 ms). Raises :class:`OSError`
    if the process is gone.
    """
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    # The command name in parentheses may contain spaces; the fields after it do not.
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes, from ``VmRSS`` in ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


@final
class LineReader:
    """Whole lines of text from a Trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def readline(self) -> str | None:
        """The next line without its newline, or ``None`` at end of stream."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line.decode("utf-8")
            data = await self._stream.receive_some()
            if not data:
                return None
            self._buffer += data


def announce(*words: object) -> None:
    """Write one line to stdout for the parent, at once."""
    print(*words, flush=True)


async def stdin_lines() -> AsyncIterator[str]:
    """The lines the parent writes to this child's stdin, until it closes it.

    >>> async def child_main() -> None:  # doctest: +SKIP
    ...     async for command in stdin_lines():
    ...         if command == "stop":
    ...             break
    """
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        reader = LineReader(stream)
        while (line := await reader.readline()) is not None:
            yield line


@final
class Child:
    """A running child process; see :func:`open_child`."""

    def __init__(self, process: trio.Process, name: str) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self.process = process
        self.name = name
        self._stdin = process.stdin
        self._lines = LineReader(process.stdout)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    async def expect(self, keyword: str, within: float) -> str:
        """Wait for the child's next line, which must start with ``keyword``; return the rest.

        Raises :class:`ChildError` if the child says something else, exits,
        or stays silent for ``within`` seconds.
        """
        with trio.move_on_after(within):
            line = await self._lines.readline()
            if line is None:
                code = await self.process.wait()
                raise ChildError(f"{self.name} exited with status {code} before {keyword!r}")
            word, _, rest = line.partition(" ")
            if word != keyword:
                raise ChildError(f"{self.name} said {line!r}, expected {keyword!r}")
            return rest
        raise ChildError(f"{self.name} did not say {keyword!r} within {within} s")

    async def send_line(self, line: str) -> None:
        """Write one command line to the child's stdin."""
        await self._stdin.send_all(line.encode("utf-8") + b"\n")

    async def stop(self) -> int:
        """Close the child's stdin, wait up to :data:`STOP_SECONDS`, then kill it; return its status.

        Shielded from cancellation, so that a cancelled benchmark still
        leaves no process behind. Idempotent.
        """
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stdin)
            with trio.move_on_after(STOP_SECONDS):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
            status = await self.process.wait()
        return status


@asynccontextmanager
async def open_child(
    module: str, *args: str, lifetime: float, own_group: bool = False
) -> AsyncIterator[Child]:
    """Run ``python -m benchmarks.<module> *args --lifetime <lifetime>`` for the ``async with`` block.

    The child's stdin and stdout are pipes to the parent; its stderr is ours,
    so that its errors are seen. The child is stopped on the way out however
    the block ends (see :meth:`Child.stop`). With ``own_group`` it runs in a
    process group of its own.

    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with open_child("bench_idle", "--role", "server", lifetime=60) as server:
    ...         port = int(await server.expect("port", within=10))
    """
    command = [sys.executable, "-m", f"benchmarks.{module}", *args, "--lifetime", f"{lifetime}"]
    environment = dict(os.environ)
    path = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = str(REPOSITORY) + (os.pathsep + path if path else "")
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=str(REPOSITORY),
        env=environment,
        process_group=0 if own_group else None,
    )
    child = Child(process, f"{module} {' '.join(args)}")
    try:
        yield child
    finally:
        await child.stop()


@final
class AsyncioThread:
    """An asyncio event loop in a thread, for subjects that only speak asyncio.

    :meth:`run` hands the loop one coroutine and waits for its result in a
    Trio worker thread, so the Trio loop is idle while asyncio runs. Use it as
    a context manager: leaving it stops the loop and joins the thread.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="asyncio", daemon=True)

    def __enter__(self) -> AsyncioThread:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(self.timeout)
        if not self._thread.is_alive():
            self.loop.close()

    def run_sync(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the loop and return its result (blocking; at most ``timeout`` s)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(self.timeout)

    async def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the loop from Trio, and return its result."""
        return await trio.to_thread.run_sync(self.run_sync, coroutine)
