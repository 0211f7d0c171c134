"""The peers of the detection benchmark: what its servers saw of each, and the client it freezes.

Theory of operation
-------------------
:class:`Watch` keeps one :class:`Peer` per server connection, labelled with
the group that was connecting when it came (the frozen group connects first,
alone), and records for each the deadline in force after its last frame and
how and when it ended. A trio-heartbeat server reports to
:meth:`Watch.on_event`, a listener that reads ``conn.last_received`` and
``conn.watchdog_deadline`` after every event of a frozen peer; the baseline
server, :func:`watched_connection`, records the same by itself.

The clients are the lean clients of :mod:`benchmarks._idle_peers`.
:func:`frozen_child` starts the one to be frozen in a process group of its
own, so that the kernel ends it should the benchmark die while it is stopped
(an orphaned process group with a stopped member gets ``SIGHUP`` and
``SIGCONT``), and sends it ``SIGCONT`` before stopping it, however the block
ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from trio_heartbeat import (
    CloseCode,
    Connection,
    ConnectionEnded,
    Event,
    FrameType,
    HandshakeComplete,
)
from trio_heartbeat._frames import HEADER_SIZE, PING_SIZE

from ._peers import Child, open_child

__all__ = [
    "FROZEN_GROUP",
    "HEALTHY_GROUP",
    "PATIENCE",
    "Peer",
    "Watch",
    "frozen_child",
    "process_state",
    "watched_connection",
]

#: The labels of the two groups of peers.
FROZEN_GROUP: Final = "frozen"
HEALTHY_GROUP: Final = "healthy"
#: How long any phase may wait for the server or a child before the run is abandoned.
PATIENCE: Final = 60.0

_PONG_TYPE = bytes((FrameType.PONG,))
_PING_FRAME = HEADER_SIZE + PING_SIZE


@dataclass(slots=True)
class Peer:
    """One server connection: its group, the deadline after its last frame, and its end."""

    group: str
    last_received: float | None = None
    deadline: float | None = None
    ended_at: float | None = None
    convicted: bool = False
    ending: str = ""

    def heard(self, last_received: float | None, deadline: float) -> None:
        """A frame arrived at ``last_received``; the server now convicts at ``deadline``."""
        if self.ended_at is None:
            self.last_received, self.deadline = last_received, deadline

    def ended(self, now: float, code: int, reason: str, last_received: float | None) -> None:
        """The connection ended at ``now`` with ``code`` and ``reason``; only the first end counts.

        A conviction is code 1011 with a reason that starts with "heartbeat
        timeout". ``last_received`` is the server's own figure, which tells
        whether a frame came after the last deadline recorded.
        """
        if self.ended_at is not None:
            return
        self.ended_at = now
        self.convicted = code == CloseCode.HEARTBEAT_TIMEOUT and reason.startswith(
            "heartbeat timeout"
        )
        self.ending = f"{code} {reason}"
        if last_received != self.last_received:
            # A frame came that no event announced: the deadline is unknown.
            self.last_received, self.deadline = last_received, None


@dataclass
class Watch:
    """Every connection of one subject's server, labelled with the group that was connecting."""

    labelling: str = FROZEN_GROUP
    recording: bool = True
    peers: dict[object, Peer] = field(default_factory=dict)
    awaited: int = 0
    reached: trio.Event = field(default_factory=trio.Event)

    def join(self, key: object) -> Peer:
        """A new connection, ``key``, in the group now connecting (kept only while recording)."""
        peer = Peer(self.labelling)
        if self.recording:
            self.peers[key] = peer
            if len(self.peers) >= self.awaited:
                self.reached.set()
        return peer

    def count(self) -> int:
        """How many connections have joined."""
        return len(self.peers)

    def on_event(self, conn: Connection, event: Event) -> None:
        """The trio-heartbeat server's listener: handshakes, deadlines of frozen peers, endings."""
        if not self.recording:
            return
        kind = type(event)
        peer = self.join(conn) if kind is HandshakeComplete else self.peers.get(conn)
        if peer is None:
            return
        if kind is ConnectionEnded:
            assert isinstance(event, ConnectionEnded)
            peer.ended(trio.current_time(), event.code, event.reason, conn.last_received)
        elif peer.group == FROZEN_GROUP:
            peer.heard(conn.last_received, conn.watchdog_deadline)

    async def wait_for(self, count: int, what: str) -> None:
        """Wait until ``count`` connections have joined; :class:`RuntimeError` after PATIENCE s."""
        self.awaited, self.reached = count, trio.Event()
        with trio.move_on_after(PATIENCE):
            if self.count() < count:
                await self.reached.wait()
            return
        raise RuntimeError(f"the server has {self.count()} of {count} connections ({what})")


async def watched_connection(watch: Watch, silence: float, stream: trio.SocketStream) -> None:
    """The baseline server's handler: answer every PING; give up after ``silence`` s of silence.

    The deadline moves with every read, as trio-heartbeat's watchdog does.
    """
    peer = watch.join(stream)
    buffer = b""
    async with stream:
        with trio.CancelScope() as watchdog:
            try:
                last = trio.current_time()
                while True:
                    watchdog.deadline = last + silence
                    peer.heard(last, watchdog.deadline)
                    data = await stream.receive_some()
                    last = trio.current_time()
                    if not data:
                        peer.ended(last, 1006, "end of stream", last)
                        return
                    buffer += data
                    while len(buffer) >= _PING_FRAME:
                        await stream.send_all(_PONG_TYPE + buffer[1:_PING_FRAME])
                        buffer = buffer[_PING_FRAME:]
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                peer.ended(trio.current_time(), 1006, repr(exc), peer.last_received)
        if watchdog.cancelled_caught:
            now = trio.current_time()
            peer.ended(now, CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", peer.last_received)


@asynccontextmanager
async def frozen_child(*args: str, lifetime: float) -> AsyncIterator[Child]:
    """:func:`~benchmarks._peers.open_child` for the client process to be frozen.

    It runs in a process group of its own (see the module docstring), and it
    is sent ``SIGCONT`` on the way out, before it is stopped.
    """
    async with open_child("_idle_peers", *args, lifetime=lifetime, own_group=True) as child:
        try:
            yield child
        finally:
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGCONT)


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``T``: stopped), from ``/proc/<pid>/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    return stat.rsplit(")", 1)[1].split()[0]
