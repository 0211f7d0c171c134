"""``open_connection`` (``_client.py``): a THB/1 connection over TCP, on loopback.

What the client adds to :func:`open_stream_connection`: the TCP connect and
its bound (a refused address is a :class:`BrokenConnection` with the OS error
as its cause, a connect that hangs a :class:`HeartbeatTimeout` at exactly
``connect_timeout``), TCP keepalive derived from the heartbeat settings (or
left alone, and only a warning when the OS refuses it), and the server's
address as ``remote_address``. TLS is in ``test_tls.py``; many clients
against one server in ``test_tcp.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import sys

import pytest
import trio
import trio.testing
from helpers import LOOPBACK, assert_echo, serving

from trio_heartbeat import (
    BrokenConnection,
    CloseCode,
    Config,
    HeartbeatTimeout,
    KeepaliveOptions,
    Role,
    _keepalive,
    open_connection,
    read_keepalive,
)

#: Small timeouts keep the file fast; the bounds in the tests stay generous.
FAST = Config(interval=0.05, timeout=0.3, handshake_timeout=0.5, close_timeout=0.3)
#: As fast as a server can be for a client that keeps the default floors on the
#: peer's interval and timeout (0.1 s and 0.3 s): FAST's heartbeat is too fast for it.
AT_THE_FLOORS = dataclasses.replace(FAST, interval=0.1)


# -- connecting ------------------------------------------------------------------------


async def test_connection_refused_is_a_broken_connection() -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with pytest.raises(BrokenConnection) as info:
        async with open_connection(LOOPBACK, port, config=FAST):
            pass
    assert info.value.code == CloseCode.ABNORMAL_CLOSURE
    assert isinstance(info.value.__cause__, OSError)
    assert f"cannot connect to {LOOPBACK}:{port}" in info.value.reason


async def test_connect_timeout_is_a_heartbeat_timeout(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never_connects(host: str, port: int) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(trio, "open_tcp_stream", never_connects)
    with pytest.raises(HeartbeatTimeout) as info:
        async with open_connection(LOOPBACK, 9, connect_timeout=2.5):
            pass
    assert trio.current_time() == 2.5
    assert info.value.code == CloseCode.HEARTBEAT_TIMEOUT
    assert "took over 2.5 s" in info.value.reason


# -- keepalive -------------------------------------------------------------------------


async def test_keepalive_off_or_refused_by_the_os(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[object] = []

    def refuse(sock: object, options: KeepaliveOptions) -> None:
        calls.append(options)
        raise OSError(errno.ENOPROTOOPT, "not here")

    monkeypatch.setattr(_keepalive, "apply_keepalive", refuse)
    async with serving(config=FAST, keepalive=None) as server:  # only the client applies it
        async with open_connection(LOOPBACK, server.port, config=FAST, keepalive=None) as conn:
            await assert_echo(conn)
        assert calls == []
        with caplog.at_level(logging.WARNING, logger="trio_heartbeat"):
            async with open_connection(LOOPBACK, server.port, config=FAST) as conn:
                await assert_echo(conn)
        assert calls == [KeepaliveOptions.from_heartbeat(FAST.interval, FAST.timeout)]
        assert "could not set TCP keepalive: [Errno" in caplog.text


# -- what the client sets up -----------------------------------------------------------


async def test_a_client_names_its_server_and_uses_the_default_config() -> None:
    async with serving(config=AT_THE_FLOORS) as server:
        with trio.fail_after(10):
            async with open_connection(LOOPBACK, server.port) as conn:
                assert conn.role is Role.CLIENT
                assert conn.config == Config()
                assert conn.remote_address == f"{LOOPBACK}:{server.port}"
                assert conn.peer is not None
                assert conn.peer.interval_ms == 100  # the server's HELLO
                await assert_echo(conn)
            closed = conn.closed
            assert closed is not None
            assert (closed.code, closed.by_peer) == (CloseCode.NORMAL, False)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="exact values need Linux's keepalive options"
)
async def test_keepalive_is_derived_from_the_heartbeat_by_default() -> None:
    config = Config(interval=1.0, timeout=3.0)
    async with (
        serving(config=AT_THE_FLOORS) as server,
        open_connection(LOOPBACK, server.port, config=config) as conn,
    ):
        applied = read_keepalive(conn.stream.socket)  # type: ignore[attr-defined]
        assert applied == KeepaliveOptions.from_heartbeat(config.interval, config.timeout)


async def test_keepalive_false_leaves_the_os_default() -> None:
    async with serving(config=FAST) as server:
        async with open_connection(LOOPBACK, server.port, config=FAST, keepalive=False) as conn:
            assert not read_keepalive(conn.stream.socket).enabled  # type: ignore[attr-defined]
        async with open_connection(LOOPBACK, server.port, config=FAST) as conn:
            assert read_keepalive(conn.stream.socket).enabled  # type: ignore[attr-defined]


async def test_a_timeout_too_long_for_keepalive_only_leaves_the_os_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    long = Config(interval=10.0, timeout=30 * 86400.0)  # 30 days: more than the kernel takes
    patient = dataclasses.replace(AT_THE_FLOORS, accept_timeout=(0.01, 40 * 86400.0))
    async with serving(config=patient) as server:
        with caplog.at_level(logging.WARNING, logger="trio_heartbeat"):
            async with open_connection(LOOPBACK, server.port, config=long) as conn:
                await assert_echo(conn)
                assert not read_keepalive(conn.stream.socket).enabled  # type: ignore[attr-defined]
    assert "TCP keepalive left at the OS defaults" in caplog.text
