"""The receiver's side of the THB/1 rate rule: PINGs that come too fast are strikes.

THB/1 §4: a PING that arrives sooner than half the peer's send interval after
the previous one is a strike, and a receiver may close with 1008 on the third.
:class:`PingRate` is that rule for one connection, and a lenient reading of it:

* only strikes *in a row* count: a PING at the agreed spacing clears them, as a
  DATA frame does, so the jitter of a busy network or event loop never adds up
  to a 1008 over a long idle connection, while a flood still gets one;
* PINGs that come bunched are excused, as many as an honest peer could have
  sent meanwhile, when the spacing was lost on the way: after a PING that came
  late (a backlog in the network, a slow link) and after our own reader
  stopped reading for a while (see :meth:`PingRate.excuse_pause`).

The sender's side of the rule is the core's ``earliest_ping``. Time comes in
as an argument; nothing here does I/O.
"""

from __future__ import annotations

from math import inf
from typing import final

from ._errors import RemoteProtocolError
from ._frames import CloseCode

__all__ = ["PingRate"]

_LONG_AGO = -inf  # one float for every connection, not one each


@final
class PingRate:
    """Counts the peer's too-early PINGs, in seconds on the caller's clock.

    >>> rate = PingRate(peer_send_interval=1.0, max_strikes=3, since=0.0)
    >>> for now in (1.0, 1.1, 1.2):
    ...     rate.ping(now)
    >>> rate.strikes
    2
    >>> rate.ping(1.3)
    Traceback (most recent call last):
      ...
    trio_heartbeat._errors.RemoteProtocolError: 3 PINGs in a row sooner than the agreed rate

    ``since`` is when the peer's HELLO arrived, the reference for its first
    PING. ``max_strikes`` of ``None`` counts strikes but never refuses.
    """

    __slots__ = (
        "_interval",
        "_last",
        "_max_strikes",
        "_since",
        "_untimed",
        "_untimed_until",
        "strikes",
    )

    def __init__(self, peer_send_interval: float, max_strikes: int | None, since: float) -> None:
        self._interval = peer_send_interval
        self._max_strikes = max_strikes
        self._last: float | None = None
        self._since = since
        #: Too-early PINGs in a row.
        self.strikes = 0
        # PINGs that may still arrive back to back without a strike, until when.
        self._untimed = 0
        self._untimed_until = _LONG_AGO

    def ping(self, now: float) -> None:
        """A PING arrived at ``now``: count it, and raise 1008 past the allowed strikes."""
        last = self._last
        self._last = now
        interval = self._interval
        since = last if last is not None else self._since
        if now - since > interval:
            # A late PING (after the previous one, or the first after HELLO):
            # the ones sent after it may have queued with it behind a backlog
            # in the network (a slow link, a full buffer) and now come bunched.
            # As many as an honest peer could have sent in the extra time are
            # not strikes; a flood still is, at twice the agreed rate.
            bunched = int((now - since - interval) / (interval / 2))
            if bunched:
                left = self._untimed if now <= self._untimed_until else 0
                self._untimed = max(left, bunched)
                self._untimed_until = max(self._untimed_until, now + interval)
        # Compared as the sender computes earliest_ping (last + half), not as a
        # difference: a PING sent at exactly that moment must never be a strike
        # by a rounding step.
        if last is None or now >= last + interval / 2:
            # At the agreed spacing: earlier strikes were jitter (a late read, a
            # PING bunched behind a late one), not a flood. Closing with 1008 is
            # a MAY, so the receiver may be this lenient.
            self.strikes = 0
        elif self._untimed and now <= self._untimed_until:
            # A backlog arrives as soon as it can; an allowance left over after
            # it would excuse a later flood.
            self._untimed -= 1
        else:
            self.strikes += 1
            if self._max_strikes is not None and self.strikes >= self._max_strikes:
                raise RemoteProtocolError(
                    f"{self.strikes} PINGs in a row sooner than the agreed rate",
                    CloseCode.POLICY_VIOLATION,
                )

    def data(self) -> None:
        """A DATA frame arrived: the peer is busy, not flooding; the strikes are cleared."""
        self.strikes = 0

    def excuse_pause(self, paused_for: float, now: float) -> None:
        """Our reader did not read for ``paused_for`` seconds, until ``now``.

        The PINGs the peer sent meanwhile come in all at once now, their
        spacing lost: as many as an honest peer could have sent are not strikes.
        """
        self._untimed = int(paused_for / (self._interval / 2)) + 1
        self._untimed_until = now + self._interval
