"""One side's THB/1 settings, checked once when they are made.

A :class:`Config` is immutable and shared: a server gives the same one to all
of its connections, so what can be computed from it (the millisecond values its
HELLOs announce) is computed here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, final

from ._frames import MAX_ID_BYTES, MIN_MAX_FRAME, HealthStatus

__all__ = ["MIN_ACCEPTED_INTERVAL", "MIN_ACCEPTED_TIMEOUT", "Config"]

#: The shortest interval, in seconds, a side accepts from a peer unless told
#: otherwise (or unless it uses a shorter one itself). A peer may PING at twice
#: its interval before a strike: at most 20 PINGs a second to answer.
MIN_ACCEPTED_INTERVAL: Final = 0.1
#: The shortest timeout, in seconds, a side accepts from a peer unless told
#: otherwise (or unless it uses a shorter one itself). We PING every half of
#: the peer's timeout at most: at most 7 PINGs a second to send.
MIN_ACCEPTED_TIMEOUT: Final = 0.3
#: The longest interval and timeout accepted by default: an hour.
MAX_ACCEPTED: Final = 3600.0


def _ms(seconds: float, name: str) -> int:
    value = round(seconds * 1000)
    if not 1 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must be between 1 ms and about 49 days, not {seconds!r} s")
    return value


@final
@dataclass(frozen=True, slots=True)
class Config:
    """One side's THB/1 settings. Times are in seconds.

    >>> Config(interval=0.5, timeout=1.5, instance_id="node-1").interval_ms
    500

    ``interval`` and ``timeout`` are announced in HELLO (rounded to whole
    milliseconds). ``accept_interval`` and ``accept_timeout`` are the ranges of
    the *peer's* HELLO values this side will honour; outside them the peer is
    refused with 1008. By default (``None``) a side accepts an interval of 0.1
    s to an hour and a timeout of 0.3 s to an hour, and never refuses values
    as short as its own. A peer then cannot make it send more than about 7
    PINGs a second, nor answer more than 20 (beyond that the rate rule's
    strikes close the connection), while detection within a third of a second
    stays possible on a LAN. gRPC servers refuse client keepalives more
    frequent than every 5 minutes, which suits a keepalive, not a failure
    detector. :attr:`accepted_intervals` and :attr:`accepted_timeouts` give the
    ranges in force. ``secret`` is the pre-shared HMAC key of THB/1 §6:
    a server with a secret refuses clients that do not prove they hold it, a
    client with a secret signs its HELLO. ``max_ping_strikes`` is how many
    too-early PINGs in a row close the connection with 1008 (``None`` never
    does); a PING at the agreed spacing, or a DATA frame, clears the count.
    THB/1 §4.6 forbids closing before the third, so it is at least 3.

    Raises :exc:`ValueError` for a value THB/1 cannot carry or that makes no
    sense (a timeout of zero, an id over 64 bytes, ``max_frame`` below 1024).
    """

    interval: float = 1.0
    timeout: float = 3.0
    max_frame: int = 1 << 20
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    instance_id: str = ""
    status: HealthStatus = HealthStatus.SERVING
    secret: bytes | None = None
    accept_interval: tuple[float, float] | None = None
    accept_timeout: tuple[float, float] | None = None
    max_ping_strikes: int | None = 3
    #: ``interval`` as announced on the wire, in whole milliseconds.
    interval_ms: int = field(init=False, repr=False, compare=False)
    #: ``timeout`` as announced on the wire, in whole milliseconds.
    timeout_ms: int = field(init=False, repr=False, compare=False)

    @property
    def accepted_intervals(self) -> tuple[float, float]:
        """The range of the peer's interval this side honours, in seconds."""
        if self.accept_interval is not None:
            return self.accept_interval
        return (min(MIN_ACCEPTED_INTERVAL, self.interval), MAX_ACCEPTED)

    @property
    def accepted_timeouts(self) -> tuple[float, float]:
        """The range of the peer's timeout this side honours, in seconds."""
        if self.accept_timeout is not None:
            return self.accept_timeout
        return (min(MIN_ACCEPTED_TIMEOUT, self.timeout), MAX_ACCEPTED)

    def __post_init__(self) -> None:
        # Computed once, and shared by every connection (and HELLO) made with this config.
        object.__setattr__(self, "interval_ms", _ms(self.interval, "interval"))
        object.__setattr__(self, "timeout_ms", _ms(self.timeout, "timeout"))
        if not MIN_MAX_FRAME <= self.max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame must be at least {MIN_MAX_FRAME}, not {self.max_frame}")
        if self.handshake_timeout <= 0 or self.close_timeout < 0:
            raise ValueError("handshake_timeout must be positive and close_timeout not negative")
        if len(self.instance_id.encode("utf-8")) > MAX_ID_BYTES:
            raise ValueError(f"instance_id must be at most {MAX_ID_BYTES} bytes in UTF-8")
        if self.max_ping_strikes is not None and self.max_ping_strikes < 3:
            raise ValueError("max_ping_strikes must be at least 3 (THB/1 §4.6), or None")
        HealthStatus(self.status)
