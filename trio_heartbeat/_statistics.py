"""What a connection reports about itself: a snapshot of its state, counters and timings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

from ._frames import HealthStatus, Role
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
