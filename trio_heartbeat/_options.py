"""The runtime settings of a connection, beyond THB/1's own (:class:`~trio_heartbeat.Config`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from ._adaptive import AdaptiveDetector
from ._budget import BufferBudget
from ._detectors import FailureDetector

__all__ = ["ConnectionOptions"]


@final
@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Runtime settings of a connection, beyond the THB/1 :class:`Config`.

    ``send_queue`` and ``receive_queue`` bound the DATA messages waiting to be
    written and waiting to be received (backpressure at both ends), and
    ``send_queue_bytes`` and ``receive_queue_bytes`` bound their bytes: a
    queue is full at either bound (a message bigger than the byte bound still
    goes into an empty queue, so that any message the peer accepts can be
    sent). While the receive queue is full the reader goes on reading, and
    holds what arrives in a reserve of ``receive_queue_bytes`` more (each
    message counted with 64 bytes of overhead), so that the peer's heartbeats
    are still heard; past the reserve it stops reading (TCP pushes back) and the
    peer is held to the configured timeout alone, a verdict that then says we
    were stalled. ``budget`` is a :class:`BufferBudget` shared with other
    connections, which bounds their queues' bytes together (a server makes
    one for its connections).
    ``write_timeout`` bounds each ``send_all`` as a whole (the writer's can
    carry a batch of up to 256 KiB): a write not done after that long convicts
    the peer as one that stopped reading (``None``: the config's ``timeout``).
    Allow for the slowest reader you mean to keep.
    ``detector`` makes the failure detector of each connection (default:
    :class:`AdaptiveDetector`, which learns the peer's rhythm, loss and
    jitter; ``None`` means the same; :class:`FixedTimeout` for the plain
    timeout).
    """

    send_queue: int = 64
    receive_queue: int = 64
    send_queue_bytes: int = 1 << 20
    receive_queue_bytes: int = 1 << 20
    write_timeout: float | None = None
    detector: Callable[[], FailureDetector] | None = AdaptiveDetector
    budget: BufferBudget | None = None

    def __post_init__(self) -> None:
        if self.send_queue < 1 or self.receive_queue < 1:
            raise ValueError("send_queue and receive_queue must be at least 1")
        if self.send_queue_bytes < 1 or self.receive_queue_bytes < 1:
            raise ValueError("send_queue_bytes and receive_queue_bytes must be at least 1")
        if self.write_timeout is not None and self.write_timeout <= 0:
            raise ValueError("write_timeout must be positive")
