"""An echo server whose health hangs on a worker that must check in: test_health_monitor_processes' peer.

Run as ``python tests/_health_worker_server.py [PERIOD]``. It serves THB/1 on
127.0.0.1 (a port the OS picks) with an echo handler and a heartbeat interval
of 0.2 s, and prints ``listening on HOST:PORT``. A health monitor is published
to the server, with one component, ``worker``, that must check in every
PERIOD seconds (0.5 by default) and stands for NOT_SERVING when it misses. The
worker loop checks in every fifth of the period until it is told to stop.

Commands, one a line on stdin (idempotent; blank lines are skipped, anything
else is an error):

* ``pause``: the worker stops checking in; the monitor's timer then turns the
  server NOT_SERVING at the worker's deadline, by itself.
* ``resume``: the worker checks in at once, and goes on as before.

Every line on stdout is flushed as it happens, with the number of echoes the
server has sent so far: ``worker paused after N echoes`` when the worker
stops (after its last check-in), ``worker resumed after N echoes`` at its
first check-in again, and ``health NOT_SERVING after N echoes`` (or any other
status) at each change of the derived status. The end of stdin (the test
process has gone) ends the server; the server's log goes to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import partial

import trio

from trio_heartbeat import (
    Config,
    Connection,
    HealthComponent,
    HealthStatus,
    Server,
    open_health_monitor,
    serve_tcp,
)

#: The heartbeat settings of the server's side (the test's client uses the same).
CONFIG = Config(interval=0.2, timeout=2.0)
#: How often the worker checks in, as a share of its period.
CHECK_INS_PER_PERIOD = 5


def say(line: str) -> None:
    """One line on stdout, flushed at once: the test reads it as it happens."""
    print(line, flush=True)


class Echoes:
    """The echo handler, counting what it has sent back over every connection."""

    def __init__(self) -> None:
        self.sent = 0

    async def __call__(self, conn: Connection) -> None:
        async for message in conn:
            await conn.send(message)
            self.sent += 1


class Worker:
    """A loop that checks ``component`` in until paused, and again once resumed."""

    def __init__(self, component: HealthComponent, echoes: Echoes) -> None:
        self.component = component
        self.echoes = echoes
        self.paused = False
        self._resumed = trio.Event()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()
        self._resumed = trio.Event()

    async def _until_resumed(self) -> None:
        while self.paused:
            await self._resumed.wait()

    async def run(self) -> None:
        step = self.component.period / CHECK_INS_PER_PERIOD
        while True:
            if self.paused:
                say(f"worker paused after {self.echoes.sent} echoes")
                await self._until_resumed()
                self.component.check_in()
                say(f"worker resumed after {self.echoes.sent} echoes")
            else:
                self.component.check_in()
            await trio.sleep(step)


async def obey(worker: Worker) -> None:
    """Read commands from stdin until it ends."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    pending = b""
    async with stdin:
        while chunk := await stdin.receive_some():
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                command = line.strip()
                if not command:
                    continue
                if command == b"pause":
                    worker.pause()
                elif command == b"resume":
                    worker.resume()
                else:
                    raise ValueError(f"unknown command {command!r}")


async def main(period: float) -> None:
    echoes = Echoes()
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(partial(serve_tcp, echoes, 0, config=CONFIG))
        async with open_health_monitor(server) as health:

            def report(status: HealthStatus, _previous: HealthStatus) -> None:
                say(f"health {status.name} after {echoes.sent} echoes")

            health.add_listener(report)
            worker = Worker(health.register("worker", period), echoes)
            async with trio.open_nursery() as working:
                working.start_soon(worker.run)
                say(f"listening on 127.0.0.1:{server.port}")
                await obey(worker)
                working.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    trio.run(main, float(sys.argv[1]) if len(sys.argv) > 1 else 0.5)
