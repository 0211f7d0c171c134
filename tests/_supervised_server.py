"""A Trio application that wires a service supervisor to systemd and the probes: test_systemd_processes' peer.

Run as ``python tests/_supervised_server.py`` with ``NOTIFY_SOCKET`` (and
``WATCHDOG_USEC``) set. Everything goes through the public API, as an
application would write it:

* a service supervisor (the default budget, 3 restarts in 5 s, and no backoff)
  runs three children: ``server`` (a THB/1 echo server on 127.0.0.1, on a
  port the OS picks), ``worker`` (raises each time the line ``crash`` comes on
  stdin) and ``journal`` (sleeps; stopped, it spends ``FLUSH`` seconds
  flushing, shielded from cancellation);
* :func:`notify_systemd` tells systemd about the server, its watchdog pings
  allowed while ``supervisor.error is None``;
* the HTTP probes answer ``/livez`` 200 under the same condition, else 503.

It prints ``listening on HOST:PORT``, then ``health on HOST:PORT``, and
``gave up`` the moment the supervisor gives up (the journal is flushing then,
the loop still runs: the pings have stopped and ``/livez`` says 503), and
exits 1 once the supervisor's error comes out. The end of stdin ends it (0).
"""

from __future__ import annotations

import os
import sys
from functools import partial

import trio

import trio_heartbeat as thb
from trio_heartbeat.probes import serve_probes

#: How long the journal takes to stop, in seconds.
FLUSH = 3.0


def say(line: str) -> None:
    print(line, flush=True)


async def echo(conn: thb.Connection) -> None:
    async for message in conn:
        await conn.send(message)


async def main() -> int:
    server = thb.Server(echo)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    crash = trio.Event()
    supervisors: list[thb.ServiceSupervisor] = []

    def alive() -> bool:
        return all(supervisor.error is None for supervisor in supervisors)

    async def worker() -> None:
        await crash.wait()
        raise RuntimeError("told to crash")

    async def journal() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(FLUSH)

    async def read_commands() -> None:
        nonlocal crash
        async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
            while chunk := await stdin.receive_some():
                for _ in range(chunk.count(b"crash")):
                    crash.set()
                    crash = trio.Event()
                    await trio.sleep(0.05)  # the worker is restarted meanwhile
        cancel.cancel()

    def on_event(event: thb.ServiceEvent) -> None:
        if isinstance(event, thb.ChildExited) and not alive():
            say("gave up")

    children = [
        thb.ChildSpec("server", server.serve_listeners, args=(listeners,)),
        thb.ChildSpec("worker", worker),
        thb.ChildSpec("journal", journal, shutdown_timeout=FLUSH * 2),
    ]
    gave_up = False
    with trio.CancelScope() as cancel:
        try:
            async with (
                trio.open_nursery() as nursery,
                thb.open_service_supervisor(
                    children, backoff=thb.ConstantBackoff(0.0), listeners=[on_event]
                ) as supervisor,
            ):
                supervisors.append(supervisor)
                say(f"listening on 127.0.0.1:{listeners[0].socket.getsockname()[1]}")
                probes = partial(serve_probes, livez=alive, readyz=alive)
                host, port = await nursery.start(probes)
                say(f"health on {host}:{port}")
                nursery.start_soon(partial(thb.notify_systemd, server, healthy=alive))
                nursery.start_soon(read_commands)
                await trio.sleep_forever()
        except* thb.SupervisorGaveUp:
            gave_up = True
    return 1 if gave_up else 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
