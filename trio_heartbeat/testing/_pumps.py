"""Pumps between a wire and a real stream (used by the wrapper and the proxy).

Theory of operation
-------------------

Putting faults in front of some other stream takes tasks, because a delayed
byte must still arrive after ``send_all`` has returned. :func:`splice` runs
two of them for one real stream: one reads the stream into a link, the other
writes the other link's bytes into the stream. EOF is passed on as EOF. A
failure of the real stream resets the whole wire, and a reset wire closes the
real stream with an RST (:func:`abort_stream`), so a failure at either end of
a connection reaches the other end as a reset. :func:`open_faulty_stream`
runs one splice; the TCP proxy runs one on each side of every connection.
"""

from __future__ import annotations

import socket
import struct
from contextlib import suppress

import trio

from ._wire import _Link, _Wire

__all__ = ["abort_stream", "splice"]

# What a pump moves per step.
_PUMP_CHUNK = 16384


async def abort_stream(stream: trio.abc.AsyncResource) -> None:
    """Close stream at once; a TCP stream (under TLS or not) sends an RST.

    The RST makes the peer's next operation raise BrokenResourceError instead
    of reading a clean EOF. Any other stream is closed forcefully.
    """
    transport: object = stream
    while isinstance(transport, trio.SSLStream):
        transport = transport.transport_stream
    if isinstance(transport, trio.SocketStream):
        with suppress(OSError):
            # Linger on, timeout 0: close() discards unsent data and sends RST.
            transport.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


async def _feed(source: trio.abc.ReceiveStream, link: _Link, wire: _Wire) -> None:
    with trio.CancelScope() as scope:
        # Stop reading the real stream as soon as nothing read could be
        # delivered; otherwise an idle source would keep this task alive.
        link.on_sender_dead(scope.cancel)
        while True:
            try:
                data = await source.receive_some(_PUMP_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                wire.transport_failed()
                return
            if not data:
                link.close_sender()
                return
            try:
                await link.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def _drain(link: _Link, sink: trio.abc.SendStream, wire: _Wire) -> None:
    while True:
        try:
            data = await link.receive_for_pump(_PUMP_CHUNK)
        except trio.BrokenResourceError:
            await abort_stream(sink)
            return
        if data is None:
            return  # half-open: nothing will ever be written to this end again
        if not data:
            if isinstance(sink, trio.abc.HalfCloseableStream):
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await sink.send_eof()
            return
        try:
            await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            wire.transport_failed()
            return


async def splice(transport: trio.abc.Stream, into: _Link, out_of: _Link, wire: _Wire) -> None:
    """Pump transport's bytes into ``into`` and ``out_of``'s bytes into transport.

    Returns when both pumps are done, and always closes transport: with an RST
    if the wire was reset, plainly otherwise.
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, transport, into, wire)
            nursery.start_soon(_drain, out_of, transport, wire)
    finally:
        if wire.was_reset:
            await abort_stream(transport)
        else:
            await trio.aclose_forcefully(transport)
