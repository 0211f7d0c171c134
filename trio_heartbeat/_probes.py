"""HTTP probes for Kubernetes and load balancers: ``/livez``, ``/readyz`` and ``/peers``.

Theory of operation
-------------------
The platforms that run a process ask it over HTTP whether it is alive and
whether it should get traffic. This module answers them on a port of its own,
with `h11 <https://h11.readthedocs.io>`_ doing the HTTP/1.1 parsing and framing
and Trio doing the I/O: one task per connection, reading into h11 until it
yields a whole request, answering it from the application's callables, and
either starting the next cycle (keep-alive) or closing.

The probe port must never cost the heartbeat traffic anything, so every
resource a client can take is bounded before the client gets it:

* **connections**: at most ``max_connections`` are served at once. A served
  connection is either *busy* (the server is working out its answer) or
  *waiting on its client*: for the next request, or the rest of one, or for
  the client to read the answer. When every slot is taken, a newcomer takes
  the slot of a waiting connection, which is closed without a word. One that
  has been answered at least once (an answer handed over whole: keep-alive,
  pipelining, or a later answer not read) goes first if any waits, the one
  whose last answer is oldest; else one never answered (waiting for its
  first request, or for its client to take its first answer), the one
  waiting longest since it connected or since that answer was worked out.
  Only when every slot is busy is the newcomer answered ``503`` with
  ``Connection: close``, at once, never queued: a probe that waits is worse
  than one that fails fast and is retried. At most a few refusals linger at a
  time; past them a newcomer is closed without a word. Only ``/peers`` keeps
  a slot busy across steps of the loop, at most half of them (see below):
  unless ``max_connections`` is 1, slots are always free or waiting, and
  ``/livez`` is never refused because ``/peers`` is busy.

  So idle or slow connections cannot take the port: ``/livez`` is a liveness
  probe, and a few connections that send nothing, or a byte a second, or
  never read, must not make it fail and get a healthy process restarted. A
  shorter timeout for idle connections would not do it: a client that
  reconnects at once holds every slot nearly all the time. Eviction bounds
  what such clients cost (they are closed as fast as they come) and keeps
  the cap, and clients that pipeline or ask ``/peers`` in a loop give their
  slots up before any probe still waiting for its first answer. What is
  left: a probe's request is read a step or two after it connects, and until
  then it is one fresh connection among others. An attacker whose fresh
  connections arrive faster than that, as many as there are slots not busy
  (half while ``/peers`` fills the others) between a probe's connect and the
  reading of its request, evicts it unanswered (probes send their request at
  once, and a failed probe is retried).
* **time**: each request must arrive whole within ``request_timeout`` of the
  moment the server starts waiting for it. A client that sent part of a request
  by then gets ``408``; one that sent nothing (an idle keep-alive connection)
  is closed quietly. Sending each answer is bounded by the same time, so a
  client that does not read cannot hold its slot either. A connection serves at
  most ``max_requests_per_connection`` requests, the last with ``Connection:
  close``.
* **memory**: a request, head and body together, may be at most
  ``max_request_bytes``. h11 is fed at most that many bytes per request, so its
  buffer never holds more; a request still incomplete after that many bytes is
  refused with ``431`` if its head did not fit and ``413`` if its body did not.
  A ``Content-Length`` over the bound is refused at once.
* **CPU**: the callables run on the event loop and must be quick (they read
  state the process keeps anyway). The one real cost is ``/peers``: it lists
  at most ``max_peers`` entries (10,000 by default, about 1.8 MB of JSON),
  ``X-Total-Count`` saying how many there were. At most
  ``max(1, max_connections // 2)`` of its answers are worked out at once (two
  by default; with one fewer slot left to the cheap probes, a few clients
  reconnecting at once evicted a quarter of the kubelet's probes): one
  more is answered ``503`` with ``Retry-After: 1`` at once, and its
  connection goes back to waiting for its next request. ``peers()`` returns a
  sequence whose ``len()`` is that count; only the entries listed are read,
  64 at a time, each slice encoded at once with a checkpoint in between, and
  the body stays in those pieces, written 64 kB at a time. The registry's
  :meth:`~trio_heartbeat.LivenessRegistry.json_entries` builds an entry only
  when it is read (about 14 µs a peer with real connections), so a step of
  the loop costs about a millisecond of work whatever the number of peers.
  Measured with 10,000 and 50,000 peers and four clients fetching ``/peers``
  in a loop on a busy two-core machine: the longest step of a probe task
  6-10 ms, the longest gap in a 1 ms ticker 9-21 ms (65-480 ms when the list
  was built and joined in one go). While no client is connected the server
  is one task blocked in ``accept`` per listener, with no timer.

Every answer carries ``Content-Type``, ``Content-Length`` and ``Cache-Control:
no-store``. A malformed request gets ``400`` (``501`` for a transfer coding
h11 does not know), and every refusal closes the
connection with a lingering close (our EOF first, then the client's bytes are
read and dropped for a moment), so that the client reads the status instead of
a reset. A callable that raises is logged on ``trio_heartbeat.probes`` and
answered ``500``; the server goes on serving.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from itertools import islice
from typing import Final, NoReturn, final

import h11
import trio

from ._transport import linger

__all__ = ["ProbeServer", "ProbeStatistics", "serve_probes"]

logger = logging.getLogger("trio_heartbeat.probes")

#: The most bytes read from a client at once.
_RECEIVE_SIZE: Final = 4096
#: How many bytes of an answer in pieces (``/peers``) are joined for one write.
_SEND_SIZE: Final = 65536
#: How many refused connections may be told why at once; the rest are just closed.
_MAX_REFUSING: Final = 16
#: How long, and for how many of the client's bytes, a closing connection lingers.
_LINGER_SECONDS: Final = 1.0
_LINGER_BYTES: Final = 65536
#: The smallest request bound that still fits a plain probe request.
_MIN_REQUEST_BYTES: Final = 256
#: How many peers are built and encoded between two checkpoints (about a millisecond).
_PEERS_PER_SLICE: Final = 64
_METHODS: Final = (b"GET", b"HEAD")
_TEXT: Final = b"text/plain; charset=utf-8"
_JSON: Final = b"application/json"

#: What a probe callable returns: whether the process is live (or ready).
Check = Callable[[], bool]
#: What the ``/peers`` callable returns: one JSON-ready dict per peer, built when read.
PeerList = Callable[[], Sequence[dict[str, object]]]


@final
@dataclass(frozen=True, slots=True)
class ProbeStatistics:
    """Counters of a :class:`ProbeServer` since it was made.

    ``active`` is the number of connections being served now; ``refused`` the
    connections turned away at the cap; ``responses`` the answers given, by
    status code (refusals at the cap included); ``evicted`` the connections
    closed to make room for a newcomer.
    """

    active: int
    refused: int
    responses: dict[int, int]
    evicted: int = 0


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes | list[bytes]  # a long one in pieces, never joined whole
    content_type: bytes = _TEXT
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())


def _text(status: int, text: str) -> _Answer:
    return _Answer(status, f"{text}\n".encode())


_OK: Final = _text(200, "ok")
_NOT_LIVE: Final = _text(503, "not live")
_NOT_READY: Final = _text(503, "not ready")
_NOT_FOUND: Final = _text(404, "not found")
_FAILED: Final = _text(500, "probe failed")
_NOT_ALLOWED: Final = _Answer(405, b"method not allowed\n", headers=((b"Allow", b"GET, HEAD"),))
_BUSY: Final = _text(503, "too many probe connections")
_PEERS_BUSY: Final = _Answer(
    503, b"too many /peers requests at once\n", headers=((b"Retry-After", b"1"),)
)


def _refusal(status: int) -> _Answer:
    return _text(status, HTTPStatus(status).phrase)


@final
class ProbeServer:
    """Answers HTTP probes from the application's callables.

    ``livez()`` and ``readyz()`` say whether the process is live and ready:
    ``GET /livez`` and ``GET /readyz`` answer ``200`` with ``ok`` while they
    return true, ``503`` otherwise. ``peers()``, if given, returns a sequence
    of the peers as JSON-ready dicts (strings, finite numbers, booleans,
    ``None``, lists and dicts of them), served by ``GET /peers`` as a JSON
    array of its first ``max_peers`` entries: only those are read, in order,
    so a sequence may build each as it is read (the registry's
    :meth:`~trio_heartbeat.LivenessRegistry.json_entries` does), at most
    ``max(1, max_connections // 2)`` arrays at once (one more request is
    answered ``503`` with ``Retry-After: 1``). Without it ``/peers`` is ``404``. ``HEAD`` is answered like ``GET`` without the
    body, any other method ``405``. The callables run on the event loop for
    each request and must be quick; one that raises is logged and answered
    ``500``.

    The limits (``max_connections``, ``request_timeout``, ``max_request_bytes``,
    ``max_requests_per_connection``, ``max_peers``) are described in the
    module's theory of operation. Raises :exc:`ValueError` for a limit that is
    not positive, or a ``max_request_bytes`` under 256.

    >>> probes = ProbeServer(livez=lambda: True, readyz=lambda: False)
    >>> probes.statistics()
    ProbeStatistics(active=0, refused=0, responses={}, evicted=0)
    """

    def __init__(
        self,
        *,
        livez: Check,
        readyz: Check,
        peers: PeerList | None = None,
        max_connections: int = 4,
        request_timeout: float = 5.0,
        max_request_bytes: int = 8192,
        max_requests_per_connection: int = 100,
        max_peers: int = 10_000,
    ) -> None:
        for name, count in (
            ("max_connections", max_connections),
            ("max_requests_per_connection", max_requests_per_connection),
            ("max_peers", max_peers),
        ):
            if count < 1:
                raise ValueError(f"{name} must be at least 1, not {count!r}")
        if not (math.isfinite(request_timeout) and request_timeout > 0):
            raise ValueError(f"request_timeout must be a positive number, not {request_timeout!r}")
        if max_request_bytes < _MIN_REQUEST_BYTES:
            raise ValueError(f"max_request_bytes must be at least {_MIN_REQUEST_BYTES}")
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.max_request_bytes = max_request_bytes
        self.max_requests_per_connection = max_requests_per_connection
        self.max_peers = max_peers
        self._livez = livez
        self._readyz = readyz
        self._peers = peers
        self._routes: dict[bytes, Callable[[], Awaitable[_Answer]]] = {
            b"/livez": self._live,
            b"/readyz": self._ready,
        }
        if peers is not None:
            self._routes[b"/peers"] = self._peer_list
        # The connections served, and those of them waiting on their client,
        # longest waiting first: never answered yet, and answered at least once.
        # Each is its cancel scope, cancelled to evict it.
        self._slots: dict[trio.CancelScope, None] = {}
        self._fresh: dict[trio.CancelScope, None] = {}
        self._answered: dict[trio.CancelScope, None] = {}
        # How many /peers answers are being worked out, and how many may be at once.
        self._building = 0
        self._max_building = max(1, max_connections // 2)
        self._refusing = 0
        self._refused = 0
        self._evicted = 0
        self._responses: Counter[int] = Counter()

    def statistics(self) -> ProbeStatistics:
        """A snapshot of the server's counters."""
        return ProbeStatistics(
            len(self._slots), self._refused, dict(self._responses), self._evicted
        )

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on ``host``:``port`` and serve probes until cancelled.

        Reports the address bound, ``(host, port)``, through ``task_status``, so
        ``port=0`` picks a free port. Raises :exc:`OSError` if it cannot listen.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        await self.serve_listeners(listeners, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Serve probes on listeners already open, until cancelled.

        Reports the first listener's address, ``(host, port)``. A host that
        names several addresses gets one listener each, on different ports if
        ``port`` was 0: give one address where the port is to be printed.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.serve_stream, listeners)
            host, port = listeners[0].socket.getsockname()[:2]
            task_status.started((host, port))
        raise AssertionError("unreachable: trio.serve_listeners never returns")  # pragma: no cover

    async def serve_stream(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Serve one client's connection until it ends, then close ``stream``.

        The connection counts against ``max_connections``; over it, it takes
        the slot of a connection waiting on its client (one already answered
        first), or is refused with ``503`` if none is. Never raises for
        anything the client does.
        """
        try:
            slot = self._take_slot()
            if slot is not None:
                try:
                    with slot:
                        await self._converse(stream, slot)
                finally:
                    self._slots.pop(slot, None)
                    self._busy(slot)
            else:
                self._refused += 1
                if self._refusing < _MAX_REFUSING:
                    self._refusing += 1
                    try:
                        await self._refuse(stream)
                    finally:
                        self._refusing -= 1
        finally:
            await trio.aclose_forcefully(stream)

    def _take_slot(self) -> trio.CancelScope | None:
        """A slot for a newcomer (evicting if need be), or ``None`` if every one is busy."""
        if len(self._slots) >= self.max_connections:
            # A connection already answered first, then one never answered; oldest first.
            waiting = self._answered or self._fresh
            if not waiting:
                return None
            victim = next(iter(waiting))
            del waiting[victim], self._slots[victim]
            victim.cancel()
            self._evicted += 1
        slot = trio.CancelScope()
        self._slots[slot] = self._fresh[slot] = None
        return slot

    def _busy(self, slot: trio.CancelScope) -> None:
        self._fresh.pop(slot, None)
        self._answered.pop(slot, None)

    async def _wait(self, slot: trio.CancelScope, *, answered: bool) -> None:
        # Evicted while its request was on its way in? Then it stops here, not listed again.
        await trio.lowlevel.checkpoint_if_cancelled()
        (self._answered if answered else self._fresh)[slot] = None

    def _sent(self, slot: trio.CancelScope) -> None:
        # A first answer handed over (unless evicted meanwhile): among the answered now.
        if slot in self._fresh:
            del self._fresh[slot]
            self._answered[slot] = None

    # -- one connection ---------------------------------------------------------

    async def _converse(self, stream: trio.abc.HalfCloseableStream, slot: trio.CancelScope) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_request_bytes)
        pending = bytearray()  # received, not yet fed to h11 (bytes of a later request)
        answered = 0
        try:
            while True:
                received = await self._receive_request(stream, conn, pending)
                if received is None:
                    return
                self._busy(slot)
                if isinstance(received, int):
                    answer, head, close = _refusal(received), False, True
                else:
                    answer = await self._answer(received.method, received.target)
                    head = received.method == b"HEAD"
                    close = answered + 1 == self.max_requests_per_connection
                await self._wait(slot, answered=answered > 0)
                if not await self._send(stream, conn, answer, head=head, close=close):
                    return
                self._sent(slot)
                answered += 1
                if conn.our_state is h11.MUST_CLOSE:
                    await self._linger(stream)
                    return
                conn.start_next_cycle()
        except trio.BrokenResourceError:
            return  # the client is gone: nothing left to tell it

    async def _receive_request(
        self, stream: trio.abc.ReceiveStream, conn: h11.Connection, pending: bytearray
    ) -> h11.Request | int | None:
        """The next whole request, a status to refuse it with, or ``None`` to close quietly."""
        budget = self.max_request_bytes
        fed = len(conn.trailing_data[0])  # bytes of this request h11 already holds
        request: h11.Request | None = None
        with trio.move_on_after(self.request_timeout):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    return exc.error_status_hint
                if event is h11.NEED_DATA:
                    if fed >= budget:
                        # Everything fed this cycle belongs to this request, still incomplete.
                        return 431 if request is None else 413
                    if not pending:
                        pending += await stream.receive_some(_RECEIVE_SIZE)
                        if not pending:
                            conn.receive_data(b"")
                            continue
                    take = min(len(pending), budget - fed)
                    conn.receive_data(bytes(pending[:take]))
                    del pending[:take]
                    fed += take
                elif isinstance(event, h11.Request):
                    request = event
                    if _declared_length(event) > budget:
                        return 413
                elif isinstance(event, h11.EndOfMessage):
                    return request
                elif not isinstance(event, h11.Data):
                    return None  # ConnectionClosed: the client left between requests
        return 408 if fed or pending else None

    async def _send(
        self,
        stream: trio.abc.SendStream,
        conn: h11.Connection,
        answer: _Answer,
        *,
        head: bool,
        close: bool,
    ) -> bool:
        """Send ``answer``; ``False`` if the client did not take it in time."""
        pieces = self._encode(conn, answer, head=head, close=close)
        with trio.move_on_after(self.request_timeout):
            batch: list[bytes] = []
            size = 0
            for piece in pieces:  # a write per 64 kB at most, a checkpoint each
                batch.append(piece)
                size += len(piece)
                if size >= _SEND_SIZE:
                    await stream.send_all(b"".join(batch))
                    batch, size = [], 0
            await stream.send_all(b"".join(batch))
            return True
        return False

    def _encode(
        self, conn: h11.Connection, answer: _Answer, *, head: bool, close: bool
    ) -> list[bytes]:
        body = [answer.body] if isinstance(answer.body, bytes) else answer.body
        headers = [
            (b"Content-Type", answer.content_type),
            (b"Content-Length", b"%d" % sum(map(len, body))),
            (b"Cache-Control", b"no-store"),
            *answer.headers,
        ]
        if close:
            headers.append((b"Connection", b"close"))
        phrase = HTTPStatus(answer.status).phrase.encode()
        data = [conn.send(h11.Response(status_code=answer.status, headers=headers, reason=phrase))]
        if not head:
            data += (conn.send(h11.Data(data=piece)) for piece in body)
        data.append(conn.send(h11.EndOfMessage()))
        self._responses[answer.status] += 1
        return data

    async def _refuse(self, stream: trio.abc.HalfCloseableStream) -> None:
        data = self._encode(h11.Connection(h11.SERVER), _BUSY, head=False, close=True)
        with trio.move_on_after(min(_LINGER_SECONDS, self.request_timeout)):
            try:
                await stream.send_all(b"".join(data))
                await self._linger(stream)
            except trio.BrokenResourceError:
                pass

    async def _linger(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Our EOF, then the client's bytes dropped until its EOF, for a moment at most."""
        with trio.move_on_after(min(_LINGER_SECONDS, self.request_timeout)):
            await linger(stream, _LINGER_BYTES)

    # -- the routes -------------------------------------------------------------

    async def _answer(self, method: bytes, target: bytes) -> _Answer:
        route = self._routes.get(target.split(b"?", 1)[0])
        if route is None:
            return _NOT_FOUND
        if method not in _METHODS:
            return _NOT_ALLOWED
        try:
            return await route()
        except Exception:
            logger.exception("the probe %s failed", target.decode("ascii", "replace"))
            return _FAILED

    async def _live(self) -> _Answer:
        return _OK if self._livez() else _NOT_LIVE

    async def _ready(self) -> _Answer:
        return _OK if self._readyz() else _NOT_READY

    async def _peer_list(self) -> _Answer:
        # One slot at least is never busy on /peers: /livez and /readyz always find a place.
        if self._building >= self._max_building:
            return _PEERS_BUSY
        self._building += 1
        try:
            return await self._build_peer_list()
        finally:
            self._building -= 1

    async def _build_peer_list(self) -> _Answer:
        assert self._peers is not None
        peers = self._peers()
        entries = iter(peers)
        # A slice at a time, built (if the sequence builds them as they are
        # read) and encoded, the loop running other tasks in between: ten
        # thousand peers are a hundred milliseconds or more, too long to hold it.
        # The body stays in pieces, one a slice, sent as they are: joining
        # megabytes into one would be one more long step.
        body = [b"["]
        for start in range(0, min(len(peers), self.max_peers), _PEERS_PER_SLICE):
            if start:
                await trio.lowlevel.checkpoint()
            chunk = list(islice(entries, min(_PEERS_PER_SLICE, self.max_peers - start)))
            if not chunk:
                break  # a sequence shorter than its len()
            encoded = json.dumps(chunk, separators=(",", ":"), allow_nan=False)
            body.append((b"," if start else b"") + encoded[1:-1].encode())  # no brackets
        body.append(b"]\n")
        total = ((b"X-Total-Count", b"%d" % len(peers)),)
        return _Answer(200, body, content_type=_JSON, headers=total)


def _declared_length(request: h11.Request) -> int:
    # h11 has already refused a malformed or repeated Content-Length.
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return 0


async def serve_probes(
    *,
    livez: Check,
    readyz: Check,
    peers: PeerList | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    max_connections: int = 4,
    request_timeout: float = 5.0,
    max_request_bytes: int = 8192,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``/livez``, ``/readyz`` and ``/peers`` over HTTP until cancelled.

    A shortcut for :meth:`ProbeServer.serve`: see :class:`ProbeServer` for the
    routes and the module's theory of operation for the limits. Reports the
    address bound, ``(host, port)``, through ``task_status``:

    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with trio.open_nursery() as nursery:
    ...         host, port = await nursery.start(
    ...             functools.partial(serve_probes, livez=lambda: True, readyz=lambda: True)
    ...         )
    ...         print(f"health on {host}:{port}")

    Raises :exc:`OSError` if it cannot listen, :exc:`ValueError` for a bad limit.
    """
    probes = ProbeServer(
        livez=livez,
        readyz=readyz,
        peers=peers,
        max_connections=max_connections,
        request_timeout=request_timeout,
        max_request_bytes=max_request_bytes,
    )
    await probes.serve(host=host, port=port, task_status=task_status)
