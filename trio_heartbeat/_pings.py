"""Our heartbeat: when our next PING is due, and what the PONGs measure.

THB/1 §4 gives the sending side three rules, and this module applies them for
one connection:

* the **send rule**: a side that has sent nothing for its send interval sends
  a PING (a client leads by a tenth, see ``CLIENT_LEAD`` in ``_handshake``);
* **health**: a change of our status is announced with a PING at once, or
  once five eighths of the send interval have passed since the last PING: the
  rate rule's half and a margin (:data:`ANNOUNCE_MARGIN`);
* the **rate rule**, whose sender's side is that two PINGs go at least half a
  send interval apart.

It also measures round trips: the time from a PING to the PONG that echoes
its opaque bytes. A side that would otherwise never PING (an idle server,
whose client leads) can ask for refreshes: a PING at least every
:data:`RTT_REFRESH` send intervals, so that its round trip stays current.
The opaque bytes are ours to choose, so they are a counter, unique for the
life of a connection; at most 32 PINGs are remembered, and the
oldest one whose PONG never came is forgotten first. Time comes in as an
argument; nothing here does I/O.
"""

from __future__ import annotations

import struct
from math import inf
from typing import Final, final

__all__ = ["ANNOUNCE_MARGIN", "RTT_REFRESH", "Heartbeat"]

#: A side that asks for round-trip refreshes PINGs at least once in this many
#: send intervals (two minutes with the defaults): a sliver of an idle
#: connection's heartbeats.
RTT_REFRESH: Final = 120

#: How much later than the rate rule allows a health announcement goes, as a fraction
#: of the send interval: delays on the way move PINGs closer together, and a run
#: of announcements sent at the very limit (a status that flaps) would arrive as
#: strikes and cost the connection its 1008 (as ``Connection.ping()`` keeps too).
ANNOUNCE_MARGIN: Final = 0.125

_MAX_OUTSTANDING: Final = 32
_OPAQUE = struct.Struct(">Q")
#: A time before any other, one float object shared by every connection.
_NEVER: Final = -inf


@final
class Heartbeat:
    """The PINGs of one side, in seconds on the caller's clock.

    >>> heartbeat = Heartbeat()
    >>> heartbeat.agree(send_interval=1.0, ping_after=0.9)
    >>> heartbeat.due(last_sent=5.0)  # the send rule, a client's lead included
    5.9
    >>> opaque = heartbeat.sent(now=6.0)
    >>> heartbeat.answered(opaque, now=6.25), heartbeat.answered(opaque, now=6.5)
    (0.25, None)
    >>> heartbeat.announce(now=6.1)  # health changed: the rate rule allows 6.5; 1/8 margin
    >>> heartbeat.due(last_sent=6.0)
    6.625
    """

    __slots__ = (
        "_announce_from",
        "_count",
        "_outstanding",
        "_ping_after",
        "_refresh",
        "last_ping",
        "rtt",
        "send_interval",
        "srtt",
    )

    def __init__(self) -> None:
        #: The send rule's interval, once agreed at the handshake (``inf`` before).
        self.send_interval = inf
        self._ping_after = inf
        self._refresh = inf
        # When a health change was made, until a PING has announced it.
        self._announce_from: float | None = None
        self._count = 0
        # PINGs awaiting their PONG: a table only while some are.
        self._outstanding: dict[bytes, float] | None = None
        #: When the last PING was sent (``None`` before the first).
        self.last_ping: float | None = None
        #: The last round trip measured.
        self.rtt: float | None = None
        #: The smoothed round trip: an exponential average with weight 1/8, as TCP's.
        self.srtt: float | None = None

    def agree(self, send_interval: float, ping_after: float, *, refresh: bool = False) -> None:
        """The handshake agreed the send interval; PINGs go after ``ping_after`` of silence.

        With ``refresh``, a PING also goes :data:`RTT_REFRESH` send intervals
        after the last one at the latest, however busy the connection, to keep
        the round trip current.
        """
        self.send_interval = send_interval
        self._ping_after = ping_after
        if refresh:
            self._refresh = RTT_REFRESH * send_interval

    @property
    def earliest(self) -> float:
        """The first moment a PING would not count as a strike at the peer (the rate rule)."""
        if self.last_ping is None:
            return _NEVER
        return self.last_ping + self.send_interval / 2

    def due(self, last_sent: float) -> float:
        """When the next PING is due, if the last frame of any kind went out at ``last_sent``."""
        due = last_sent + self._ping_after
        if self.last_ping is not None:
            due = min(due, self.last_ping + self._refresh)
        if self._announce_from is not None:
            allowed = self.earliest + self.send_interval * ANNOUNCE_MARGIN
            due = min(due, max(allowed, self._announce_from))
        return due

    def announce(self, now: float) -> None:
        """Our health changed at ``now``: the next PING carries it, as soon as it may go."""
        self._announce_from = now

    def sent(self, now: float) -> bytes:
        """A PING goes out at ``now``: return the opaque bytes it carries."""
        self._count += 1
        opaque = _OPAQUE.pack(self._count)
        outstanding = self._outstanding
        if outstanding is None:
            outstanding = self._outstanding = {}
        elif len(outstanding) >= _MAX_OUTSTANDING:
            del outstanding[next(iter(outstanding))]
        outstanding[opaque] = now
        self.last_ping = now
        self._announce_from = None
        return opaque

    def answered(self, opaque: bytes, now: float) -> float | None:
        """A PONG with these opaque bytes arrived at ``now``: its round trip, if it answers ours."""
        outstanding = self._outstanding
        sent_at = None if outstanding is None else outstanding.pop(opaque, None)
        if sent_at is None:
            return None
        if not outstanding:
            self._outstanding = None  # an idle server's verdict and refreshes keep no table
        rtt = self.rtt = now - sent_at
        self.srtt = rtt if self.srtt is None else self.srtt + (rtt - self.srtt) / 8
        return rtt
