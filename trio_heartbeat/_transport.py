"""The byte stream under a connection: direct socket I/O where it works, errors translated at the edge.

On a plain TCP stream (:class:`trio.SocketStream`, outside Windows) the
runtime reads and writes through the socket's descriptor: it waits with
:func:`trio.lowlevel.wait_readable` and reads with :func:`read_nowait`, and it
answers with a :func:`write_nowait` that takes what the socket accepts without
waiting. That spares every idle connection the coroutines of ``receive_some``,
and the reader never blocks on a write. Other streams (TLS, memory streams,
your own) go through ``receive_some`` and ``send_all`` as usual.

OS errors become Trio's stream errors here, as :class:`trio.SocketStream` does
it: a closed descriptor is :class:`trio.ClosedResourceError`, any other
failure :class:`trio.BrokenResourceError` raised from the :class:`OSError`,
so the rest of the runtime sees every transport alike.
"""

from __future__ import annotations

import errno
import math
import os
import sys
from typing import Final

import trio

__all__ = [
    "RECEIVE_SIZE",
    "linger",
    "read_nowait",
    "socket_fd",
    "stream_error",
    "write_nowait",
]

#: Bytes asked of the transport per read.
RECEIVE_SIZE: Final = 65536
#: Plain TCP streams are read and written through their descriptor where
#: os.read and os.write work on sockets.
_DIRECT_IO: Final = sys.platform != "win32"


def socket_fd(stream: trio.abc.Stream) -> int:
    """The descriptor of a plain TCP stream, for I/O without a task switch; else -1.

    -1 too once the socket is closed: a closed socket's descriptor may already
    belong to someone else, so it is asked for afresh every time.
    """
    if _DIRECT_IO and type(stream) is trio.SocketStream:
        return stream.socket.fileno()
    return -1


def read_nowait(fd: int) -> bytes | None:
    """What has arrived on the socket (``b""`` at end-of-file), or ``None`` if nothing has.

    Raises :class:`trio.ClosedResourceError` or :class:`trio.BrokenResourceError`.
    """
    try:
        return os.read(fd, RECEIVE_SIZE)
    except BlockingIOError:
        return None  # woken for nothing
    except OSError as exc:
        raise stream_error(exc) from exc


def write_nowait(fd: int, data: bytes) -> int:
    """Write what the socket takes without waiting; return how many bytes that was.

    Raises :class:`trio.ClosedResourceError` or :class:`trio.BrokenResourceError`.
    """
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise stream_error(exc) from exc


def stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """``exc`` as Trio's streams say it, with ``exc`` as its cause."""
    translated: trio.ClosedResourceError | trio.BrokenResourceError
    if exc.errno == errno.EBADF:
        translated = trio.ClosedResourceError("the socket was already closed")
    else:
        translated = trio.BrokenResourceError(f"socket connection broken: {exc}")
    translated.__cause__ = exc
    return translated


async def linger(stream: trio.abc.Stream, max_bytes: float = math.inf) -> None:
    """End our side of the stream and discard what still comes, until the peer's EOF.

    After our CLOSE for a peer's protocol error, bytes of the peer's may still
    be unread. Closing a TCP socket with unread input sends a reset, and a reset
    can destroy our CLOSE in the peer's receive buffer before the peer reads
    it: the one frame that says what went wrong. So send EOF and read until the
    peer's EOF, as HTTP servers do with a lingering close. The caller bounds the
    time; ``max_bytes`` bounds what is read and dropped (a peer that floods).
    """
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    dropped = 0
    while dropped <= max_bytes:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return
        dropped += len(data)
