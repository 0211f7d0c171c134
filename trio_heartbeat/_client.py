"""Opening a THB/1 connection over TCP, optionally TLS."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ._config import Config
from ._connection import Connection, EventListener
from ._errors import BrokenConnection, HeartbeatTimeout, describe_os_error
from ._frames import CloseCode, Role
from ._keepalive import KeepaliveOptions, resolve_keepalive, try_apply_keepalive
from ._options import ConnectionOptions
from ._stream_connection import open_stream_connection

__all__ = ["open_connection"]

logger = logging.getLogger("trio_heartbeat.client")


@asynccontextmanager
async def open_connection(
    host: str,
    port: int,
    *,
    config: Config | None = None,
    options: ConnectionOptions | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = 10.0,
    keepalive: KeepaliveOptions | bool | None = True,
    listeners: list[EventListener] | None = None,
) -> AsyncIterator[Connection]:
    """Connect to a THB/1 server and keep the connection honest for the ``async with`` block.

    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with open_connection("127.0.0.1", 9000, config=Config(interval=1, timeout=3)) as conn:
    ...         await conn.send(b"hello")
    ...         print(await conn.receive(), "rtt", conn.rtt)

    The TCP connect must finish within ``connect_timeout``, and the TLS
    handshake (with ``ssl_context``) and the THB/1 handshake together within
    the config's ``handshake_timeout``, else :class:`HeartbeatTimeout` is raised; a
    refused or unreachable address raises :class:`BrokenConnection` with the
    ``OSError`` as its cause. After that it behaves as
    :func:`open_stream_connection`: a heartbeat timeout, protocol error or lost
    transport cancels the block and raises one :class:`ConnectionClosed`
    subclass; the server's refusal (1013 at capacity, 1008 bad credentials)
    raises :class:`ConnectionRejected`.
    """
    config = config if config is not None else Config()
    address = f"{host}:{port}"
    with trio.move_on_after(connect_timeout) as connect_scope:
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise BrokenConnection(
                CloseCode.ABNORMAL_CLOSURE,
                f"cannot connect to {address}: {describe_os_error(exc)}",
            ) from exc
    if connect_scope.cancelled_caught:
        raise HeartbeatTimeout(
            CloseCode.HEARTBEAT_TIMEOUT, f"connecting to {address} took over {connect_timeout} s"
        )
    try_apply_keepalive(tcp.socket, resolve_keepalive(keepalive, config.interval, config.timeout))
    stream: trio.abc.Stream = tcp
    if ssl_context is not None:
        stream = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or host)
    # The TLS handshake happens on first use, inside the THB/1 handshake
    # deadline, so a server that stalls it is caught like any other.
    async with open_stream_connection(
        stream,
        role=Role.CLIENT,
        config=config,
        options=options,
        listeners=listeners,
        remote_address=address,
    ) as conn:
        yield conn
