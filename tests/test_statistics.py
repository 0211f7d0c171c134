"""A connection's snapshot (``ConnectionStatistics.of`` in ``_statistics.py``), field by field.

Sans-IO: a server and a client core (``HeartbeatProtocol``) are wired by hand
and every frame is delivered at a time the test chooses: the handshake with
the server's verdict PING, DATA both ways, and PINGs from the client whose
PONGs measure its round trips (one carrying a health change). The snapshots
of both sides are then compared with every field worked out from that
script (counters, byte counts from the frame sizes, round trips, the agreed
send intervals, ids, health), with the queue sizes and ``opened_at`` passed
through; a snapshot before the handshake, that it does not move afterwards,
and that it is frozen are checked too. Times are binary fractions, so ``==``
holds.
"""

from __future__ import annotations

import dataclasses
from math import inf

import pytest
from helpers import drain, feed, new_pair

from trio_heartbeat import (
    Config,
    ConnectionStatistics,
    DataReceived,
    Event,
    HandshakeComplete,
    HeartbeatProtocol,
    PeerHealthChanged,
    PingReceived,
    PongReceived,
    State,
)
from trio_heartbeat._frames import HEADER_SIZE, HELLO_FIXED_SIZE, PING_SIZE, HealthStatus, Role

SERVER_ID = "srv-1"
CLIENT_ID = "node-7"
#: A HELLO without auth: the header, the fixed part (with the two length bytes), the id.
SERVER_HELLO = HEADER_SIZE + HELLO_FIXED_SIZE + len(SERVER_ID)
CLIENT_HELLO = HEADER_SIZE + HELLO_FIXED_SIZE + len(CLIENT_ID)
PING = PONG = HEADER_SIZE + PING_SIZE


def deliver(sender: HeartbeatProtocol, receiver: HeartbeatProtocol, now: float) -> list[Event]:
    """Everything ``sender`` queued arrives at ``receiver`` at ``now``; its events."""
    return feed(receiver, sender.data_to_send(), now)


def scripted_pair() -> tuple[HeartbeatProtocol, HeartbeatProtocol]:
    """A server and a client taken through the script below; both are left OPEN,
    the client with a PING queued."""
    server, client = new_pair(
        Config(instance_id=SERVER_ID), Config(interval=0.5, instance_id=CLIENT_ID), now=0.0
    )
    # 0.25: the server's HELLO (queued when it was made) reaches the client,
    # which answers with its own; at 0.5 the server accepts it with its verdict PING.
    [done] = deliver(server, client, 0.25)
    assert isinstance(done, HandshakeComplete)
    [done] = deliver(client, server, 0.5)
    assert isinstance(done, HandshakeComplete)
    # 0.75: the verdict reaches the client, which PONGs; the server's round trip is 0.5.
    [ping] = deliver(server, client, 0.75)
    assert isinstance(ping, PingReceived)
    [pong] = deliver(client, server, 1.0)
    assert isinstance(pong, PongReceived)
    assert pong.rtt == 0.5
    # DATA: one from the client at 1.0, four from the server at 1.5.
    client.send_data(b"hello", 1.0)
    assert deliver(client, server, 1.25) == [DataReceived(b"hello")]
    for _ in range(4):
        server.send_data(b"hi there", 1.5)
    assert deliver(server, client, 1.75) == [DataReceived(b"hi there")] * 4
    # The client PINGs at 2.0 (back at 2.25: 0.25) and, degraded, at 2.5 (back at 3.0: 0.5).
    client.send_ping(2.0)
    [ping] = deliver(client, server, 2.125)
    assert isinstance(ping, PingReceived)
    [pong] = deliver(server, client, 2.25)
    assert isinstance(pong, PongReceived)
    assert pong.rtt == 0.25
    client.set_health(HealthStatus.DEGRADED, 2.375)
    client.send_ping(2.5)
    changed, ping = deliver(client, server, 2.75)
    assert changed == PeerHealthChanged(HealthStatus.DEGRADED, HealthStatus.SERVING)
    assert isinstance(ping, PingReceived)
    [pong] = deliver(server, client, 3.0)
    assert isinstance(pong, PongReceived)
    assert pong.rtt == 0.5
    # 3.125: a third PING, queued and not yet written (nor answered).
    client.send_ping(3.125)
    assert drain(server) == drain(client) == []
    return server, client


def test_the_servers_snapshot() -> None:
    server, _ = scripted_pair()
    stats = ConnectionStatistics.of(server, opened_at=0.5, send_queue_used=3, receive_queue_used=7)
    assert stats == ConnectionStatistics(
        state=State.OPEN,
        role=Role.SERVER,
        peer_id=CLIENT_ID,
        peer_health=HealthStatus.DEGRADED,  # the client's second PING said so
        health=HealthStatus.SERVING,
        opened_at=0.5,
        last_received=2.75,  # the client's second PING
        last_sent=2.75,  # the PONG that answered it
        rtt=0.5,  # the verdict: out at 0.5, answered at 1.0
        srtt=0.5,  # one sample
        send_interval=1.0,  # its own interval; the client's timeout allows up to 1.5
        # in: the client's HELLO, the verdict's PONG, one DATA, two PINGs
        frames_in=5,
        # out: HELLO, the verdict PING, four DATA, two PONGs
        frames_out=8,
        bytes_in=CLIENT_HELLO + PONG + (HEADER_SIZE + 5) + 2 * PING,
        bytes_out=SERVER_HELLO + PING + 4 * (HEADER_SIZE + 8) + 2 * PONG,
        data_frames_in=1,
        data_frames_out=4,
        pings_sent=1,
        pongs_received=1,
        send_queue_used=3,
        receive_queue_used=7,
    )
    assert (stats.bytes_in, stats.bytes_out) == (104, 148)


def test_the_clients_snapshot() -> None:
    _, client = scripted_pair()
    stats = ConnectionStatistics.of(client, opened_at=0.75, send_queue_used=0, receive_queue_used=2)
    assert stats == ConnectionStatistics(
        state=State.OPEN,
        role=Role.CLIENT,
        peer_id=SERVER_ID,
        peer_health=HealthStatus.SERVING,
        health=HealthStatus.DEGRADED,  # set at 2.375
        opened_at=0.75,
        last_received=3.0,  # the PONG to its second PING
        last_sent=3.125,  # its third PING, queued
        rtt=0.5,  # the second PING: out at 2.5, answered at 3.0
        srtt=0.25 + (0.5 - 0.25) / 8,  # 0.28125: the first sample, moved an eighth of the way
        send_interval=0.5,  # its own interval (the server's timeout allows up to 1.5)
        # in: the server's HELLO, the verdict, four DATA, two PONGs
        frames_in=8,
        # out: HELLO, the verdict's PONG, one DATA, three PINGs
        frames_out=6,
        bytes_in=SERVER_HELLO + PING + 4 * (HEADER_SIZE + 8) + 2 * PONG,
        # the bytes taken for the transport: not the third PING, still queued
        bytes_out=CLIENT_HELLO + PONG + (HEADER_SIZE + 5) + 2 * PING,
        data_frames_in=4,
        data_frames_out=1,
        pings_sent=3,
        pongs_received=2,
        send_queue_used=0,
        receive_queue_used=2,
    )
    assert stats.srtt == 0.28125
    assert (stats.bytes_in, stats.bytes_out) == (148, 104)


def test_a_snapshot_before_the_handshake() -> None:
    server, client = new_pair(now=0.0)
    stats = ConnectionStatistics.of(client, opened_at=None, send_queue_used=0, receive_queue_used=0)
    assert stats == ConnectionStatistics(
        state=State.HANDSHAKE,
        role=Role.CLIENT,
        peer_id=None,
        peer_health=None,
        health=HealthStatus.SERVING,
        opened_at=None,
        last_received=None,
        last_sent=0.0,
        rtt=None,
        srtt=None,
        send_interval=inf,
        frames_in=0,
        frames_out=0,
        bytes_in=0,
        bytes_out=0,
        data_frames_in=0,
        data_frames_out=0,
        pings_sent=0,
        pongs_received=0,
        send_queue_used=0,
        receive_queue_used=0,
    )
    # The server has queued its HELLO (a frame out) but written nothing yet.
    queued = ConnectionStatistics.of(
        server, opened_at=None, send_queue_used=0, receive_queue_used=0
    )
    assert (queued.state, queued.frames_out, queued.bytes_out) == (State.HANDSHAKE, 1, 0)


def test_a_snapshot_does_not_move_with_the_connection() -> None:
    server, client = scripted_pair()
    before = ConnectionStatistics.of(server, opened_at=0.5, send_queue_used=0, receive_queue_used=0)
    copy = dataclasses.replace(before)
    server.send_data(b"more", 3.25)
    deliver(server, client, 3.25)
    deliver(client, server, 3.5)  # the PING queued at 3.125
    server.close(now=3.75)
    assert before == copy
    after = ConnectionStatistics.of(server, opened_at=0.5, send_queue_used=0, receive_queue_used=0)
    assert (after.state, after.frames_out, after.data_frames_out, after.frames_in) == (
        State.CLOSING,
        before.frames_out + 3,  # DATA, PONG, CLOSE
        before.data_frames_out + 1,
        before.frames_in + 1,
    )


def test_a_snapshot_is_frozen() -> None:
    server, _ = scripted_pair()
    stats = ConnectionStatistics.of(server, opened_at=0.5, send_queue_used=0, receive_queue_used=0)
    for field in dataclasses.fields(ConnectionStatistics):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(stats, field.name, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.rtt = 1.0  # type: ignore[misc]
    assert stats.rtt == 0.5
