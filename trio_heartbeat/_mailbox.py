"""The reconnecting client's mailbox: what it sends and receives, across connections.

The caller of a reconnecting client talks to its :class:`Mailbox`, never to a
connection, so that ``send`` and ``receive`` carry on across reconnects:

* ``send`` appends to one bounded buffer, and only the *pump* takes from it,
  in order, into the connection of the moment. A message the pump could not
  hand to a connection stays at the head of the buffer; the messages a
  connection was given and never wrote come back to the head when it ends
  (:meth:`Mailbox.recover`). So nothing ``send`` accepted is lost or
  reordered while the client reconnects; only what a connection had already
  handed to its transport may be lost with it (THB/1 has no acknowledgements).
* ``receive`` reads one bounded inbox that every connection's *forwarder*
  feeds in turn. The forwarder waits for room before it takes a message from
  the connection, so that a cancelled forwarder drops nothing, and what a
  connection still holds when it ends moves in regardless (at most its own
  receive queue), so that a caller who is not reading never holds up a
  reconnect.

No task runs here: the client's loop runs :meth:`Mailbox.pump` and
:meth:`Mailbox.forward` beside each connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Literal, final

import trio

from ._connection import Connection
from ._errors import ConnectionClosed, HeartbeatError

__all__ = ["Mailbox"]


@final
class Mailbox:
    """The send buffer and the inbox of a reconnecting client; see the module docstring."""

    __slots__ = (
        "_buffer",
        "_buffer_changed",
        "_buffer_size",
        "_inbox",
        "_inbox_changed",
        "_receive_buffer",
        "_when_full",
    )

    def __init__(
        self, buffer_size: int, when_full: Literal["wait", "fail"], receive_buffer: int
    ) -> None:
        self._buffer: deque[bytes] = deque()
        self._buffer_size = buffer_size
        self._when_full = when_full
        self._buffer_changed = trio.Event()
        self._inbox: deque[bytes] = deque()
        self._inbox_changed = trio.Event()
        self._receive_buffer = receive_buffer

    @property
    def buffered(self) -> int:
        """Messages accepted by :meth:`send` and not yet handed to a connection."""
        return len(self._buffer)

    def changed(self) -> None:
        """Wake everyone who waits here, to look at the client's state again."""
        self._notify_buffer()
        self._notify_inbox()

    # -- sending -------------------------------------------------------------------------

    async def send(self, data: bytes, refused: Callable[[], HeartbeatError | None]) -> None:
        """Accept ``data``, waiting for room; ``refused()`` says why sending is over, if it is.

        A cancelled send has accepted nothing: the checkpoint comes first.
        """
        await trio.lowlevel.checkpoint()
        while True:
            error = refused()
            if error is not None:
                raise error
            if len(self._buffer) < self._buffer_size:
                break
            if self._when_full == "fail":
                raise trio.WouldBlock
            await self._buffer_changed.wait()
        self._buffer.append(data)
        self._notify_buffer()

    async def pump(self, conn: Connection) -> None:
        """Hand the buffered messages to ``conn``, in order, for as long as it lives."""
        buffer = self._buffer
        while True:
            while buffer:
                try:
                    await conn.send(buffer[0])
                except ConnectionClosed:
                    return  # the message stays at the head of the buffer for the next connection
                buffer.popleft()
                self._notify_buffer()
            await self._buffer_changed.wait()

    def recover(self, conn: Connection) -> None:
        """``conn`` has ended: the messages it was given and never wrote go back to the head."""
        unsent = conn.take_unsent()
        if unsent:
            self._buffer.extendleft(reversed(unsent))
            self._notify_buffer()

    async def wait_sent(self) -> None:
        """Wait until every accepted message has been handed to a connection."""
        while self._buffer:
            await self._buffer_changed.wait()

    def take_all(self) -> list[bytes]:
        """Every message still buffered, oldest first; the buffer is left empty."""
        taken = list(self._buffer)
        self._buffer.clear()
        self._notify_buffer()
        return taken

    def _notify_buffer(self) -> None:
        self._buffer_changed.set()
        self._buffer_changed = trio.Event()

    # -- receiving -----------------------------------------------------------------------

    async def receive(self, stopped: Callable[[], HeartbeatError | None]) -> bytes:
        """The next message; ``stopped()`` says why no more will come, if that is so.

        A cancelled receive loses nothing: the checkpoint comes before the
        message is taken, and a message another receiver took meanwhile is
        waited for again.
        """
        while True:
            if not self._inbox:
                error = stopped()
                if error is not None:
                    await trio.lowlevel.checkpoint()
                    raise error
                await self._inbox_changed.wait()
                continue
            await trio.lowlevel.checkpoint()  # before taking it: a cancelled receive loses nothing
            if self._inbox:  # unless another receiver took it meanwhile
                break
        message = self._inbox.popleft()
        self._notify_inbox()
        return message

    async def forward(self, conn: Connection) -> None:
        """Move what ``conn`` receives into the inbox, waiting for room first, until it ends."""
        inbox = self._inbox
        try:
            while True:
                # Backpressure reaches the peer only while the connection is open.
                while len(inbox) >= self._receive_buffer and conn.closed is None:
                    await self._inbox_changed.wait()
                inbox.append(await conn.receive())
                self._notify_inbox()
        except ConnectionClosed:
            return

    def collect(self, conn: Connection) -> None:
        """``conn`` has ended: what it still holds moves into the inbox, room or not."""
        moved = False
        while True:
            try:
                self._inbox.append(conn.receive_nowait())
            except (ConnectionClosed, trio.WouldBlock):
                break
            moved = True
        if moved:
            self._notify_inbox()

    def _notify_inbox(self) -> None:
        self._inbox_changed.set()
        self._inbox_changed = trio.Event()
