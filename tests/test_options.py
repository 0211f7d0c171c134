"""A connection's runtime settings (``ConnectionOptions`` in ``_options.py``).

The options are checked once, when they are made: queues of at least one
message and a positive write timeout; the edge values are accepted and the
defaults are spelled out. The one default that depends on something else, the
write timeout (the config's ``timeout`` unless set), is shown in a connection
in virtual time. How the queues and the detector act is in the reader's, the
writer's and the silence rule's tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import suppress

import pytest
import trio
from helpers import lockstep_stream_and_peer, run_body
from trio.testing import MockClock

from trio_heartbeat._adaptive import AdaptiveDetector
from trio_heartbeat._config import Config
from trio_heartbeat._connection import Connection
from trio_heartbeat._detectors import FixedTimeout
from trio_heartbeat._errors import HeartbeatTimeout
from trio_heartbeat._options import ConnectionOptions

# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConnectionOptions(send_queue=0),
        lambda: ConnectionOptions(receive_queue=0),
        lambda: ConnectionOptions(write_timeout=0),
    ],
)
def test_options_are_validated(make: Callable[[], ConnectionOptions]) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"send_queue": -1}, "send_queue and receive_queue must be at least 1"),
        ({"receive_queue": -5}, "send_queue and receive_queue must be at least 1"),
        ({"write_timeout": -0.5}, "write_timeout must be positive"),
    ],
)
def test_each_refusal_says_what_is_wrong(changes: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectionOptions(**changes)  # type: ignore[arg-type]


def test_the_edge_values_are_accepted() -> None:
    options = ConnectionOptions(send_queue=1, receive_queue=1, write_timeout=1e-9)
    assert (options.send_queue, options.receive_queue, options.write_timeout) == (1, 1, 1e-9)


def test_the_defaults() -> None:
    options = ConnectionOptions()
    assert (options.send_queue, options.receive_queue) == (64, 64)
    assert options.write_timeout is None  # the config's timeout
    assert options.detector is AdaptiveDetector


def test_options_are_frozen_and_shared_safely() -> None:
    options = ConnectionOptions(detector=FixedTimeout)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.send_queue = 2  # type: ignore[misc]
    assert options == ConnectionOptions(detector=FixedTimeout)
    assert not hasattr(options, "__dict__")


# -- the write timeout reaches the connection ------------------------------------------


@pytest.mark.parametrize(
    ("write_timeout", "cut_at"),
    [(None, 0.5 + 2.0), (1.25, 0.5 + 1.25)],
    ids=["the-config-timeout", "its-own"],
)
async def test_the_write_timeout_is_the_config_timeout_unless_set(
    write_timeout: float | None, cut_at: float, autojump_clock: MockClock
) -> None:
    """The peer keeps PINGing (so it never looks silent) but stops reading: our
    DATA write at 0.5 hangs, and is given up after the write timeout."""
    stream, peer = lockstep_stream_and_peer()

    async def script() -> None:
        await peer.handshake()
        with suppress(trio.BrokenResourceError):
            while True:
                await trio.sleep(0.75)
                await peer.send_ping()

    async def body(conn: Connection) -> None:
        await trio.sleep(0.5)
        await conn.send(b"nobody reads this")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(HeartbeatTimeout) as raised:
            await run_body(
                stream,
                body,
                config=Config(interval=1.0, timeout=2.0),
                options=ConnectionOptions(write_timeout=write_timeout),
            )
        assert trio.current_time() == cut_at
        nursery.cancel_scope.cancel()
    assert raised.value.reason == "write timeout: the peer stopped reading"
