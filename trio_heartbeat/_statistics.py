"""What a connection reports about itself: a snapshot of its state, counters and timings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

from ._frames import HealthStatus, Role
from ._protocol import HeartbeatProtocol
from ._state import State

__all__ = ["ConnectionStatistics"]


@final
@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of one connection, taken without I/O. Times are ``trio.current_time()`` values."""

    state: State
    role: Role
    peer_id: str | None
    peer_health: HealthStatus | None
    health: HealthStatus
    opened_at: float | None
    last_received: float | None
    last_sent: float
    rtt: float | None
    srtt: float | None
    send_interval: float
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    data_frames_in: int
    data_frames_out: int
    pings_sent: int
    pongs_received: int
    send_queue_used: int
    receive_queue_used: int

    @classmethod
    def of(
        cls,
        core: HeartbeatProtocol,
        *,
        opened_at: float | None,
        send_queue_used: int,
        receive_queue_used: int,
    ) -> ConnectionStatistics:
        """A snapshot of ``core`` and of the queues around it."""
        counters = core.counters
        return cls(
            state=core.state,
            role=core.role,
            peer_id=None if core.peer is None else core.peer.instance_id,
            peer_health=core.peer_health,
            health=core.health,
            opened_at=opened_at,
            last_received=core.last_received,
            last_sent=core.last_sent,
            rtt=core.rtt,
            srtt=core.srtt,
            send_interval=core.send_interval,
            frames_in=counters.frames_in,
            frames_out=counters.frames_out,
            bytes_in=counters.bytes_in,
            bytes_out=counters.bytes_out,
            data_frames_in=counters.data_frames_in,
            data_frames_out=counters.data_frames_out,
            pings_sent=counters.pings_sent,
            pongs_received=counters.pongs_received,
            send_queue_used=send_queue_used,
            receive_queue_used=receive_queue_used,
        )
