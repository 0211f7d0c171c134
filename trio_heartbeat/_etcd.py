"""The etcd backend of the service registry: etcd v3's JSON gateway over httpx (Trio).

Theory of operation
-------------------
:class:`EtcdStore` does :class:`~trio_heartbeat._kv.KeyValueStore`'s operations
on etcd (3.4 or newer) through the JSON gateway on its client port: each is
a ``POST /v3/...`` sent with httpx (on Trio, through anyio), spelled and
judged by :mod:`~trio_heartbeat._etcd_json`, which knows the gateway's habits.
Two are about time: the gateway answers only the first keepalive of a
streamed body, so each keepalive is a POST of its own; and etcd renews a
lease for its minimum TTL (one and a half election timeouts in whole
seconds, 2 s by default) when asked for less.

**Endpoints and time.** A request starts at the endpoint that last answered
and is bounded by ``timeout`` per endpoint, from connecting to the last byte:
a frozen etcd still accepts connections (the kernel does), so only a deadline
on the whole exchange notices it. A failed connection, that deadline, or an
answer that says "not now" or is not etcd's moves on to the next endpoint;
once each has failed, the call raises :exc:`~trio_heartbeat.StoreUnavailable`
with every reason, never an httpx error or an exception group. (The member
that went quiet may have done the request: a put twice is the same value, a
grant twice leaves a lease nobody keeps alive, which expires.) A refusal by
etcd is the caller's mistake, raised at once. Answers are read up to a bound
in bytes, and a connection is closed, whatever happens, before the request
returns (see :class:`_Answer` for what httpx leaves open otherwise).

**Watches.** A watch is one long POST answered with a line of JSON per
response: "created" first, then events (several revisions in one line at
times) and empty progress reports, which are not passed on, or a
cancellation (:exc:`~trio_heartbeat.WatchCompacted` when its start was
compacted). It starts at ``after + 1``; after each batch, ``after`` is the
revision of its last event (not the header's, which for a watcher catching
up is the newest revision, past events not yet sent). A task in the store's
nursery reads the stream and hands the watch one line at a time over an
unbuffered channel: a consumer that does not ask for more stops the reading
(TCP carries the backpressure to etcd), one line at most is held, and how
the stream ended crosses as a value, so the consumer gets the one exception.
A quiet stream says nothing, whether etcd is idle or frozen: after
``watch_idle`` seconds of waiting, the watch asks its member for the count of
keys under its prefix (linearizable, so a member cut off from its quorum
fails too), and raises :exc:`StoreUnavailable` without an answer within
``timeout``, as when the stream breaks or ends. Opening the stream again
would prove as much, but asks for a history that a quiet prefix on a busy
store soon loses to compaction.

>>> async def main() -> None:  # doctest: +SKIP
...     async with open_etcd_store(["127.0.0.1:2379"]) as store:
...         lease = await store.grant(3.0)
...         await store.put("services/echo/a", b"127.0.0.1:7400", lease=lease)
...         entries, revision = await store.range("services/echo/")
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import partial
from typing import Final, NoReturn, TypeAlias, TypeVar, final

import httpx
import trio

from ._endpoints import format_endpoint, parse_endpoint
from ._errors import StoreUnavailable, describe_os_error
from ._etcd_json import (
    JSON,
    b64,
    entries,
    judge,
    lease_gone,
    lease_id,
    prefix_range,
    renewed,
    revision,
    watch_changes,
)
from ._groups import open_background
from ._leases import Change, Entry

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_REQUESTS",
    "MAX_WATCH_LINE_BYTES",
    "EtcdStore",
    "open_etcd_store",
]

_T = TypeVar("_T")
#: What a watch's reader task hands over: a response's changes (none for
#: "created" and progress reports) and the endpoint, or how the stream ended.
_WatchMessage: TypeAlias = tuple[str, tuple[Change, ...]] | Exception

#: The longest answer read (a range of the whole registry), in bytes.
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024
#: The longest line of a watch stream (one watch response), in bytes.
MAX_WATCH_LINE_BYTES: Final = 4 * 1024 * 1024
#: Requests (other than watches) in flight at once on one store; the others wait their
#: turn, at most ``timeout`` (then StoreUnavailable), and each one's ``timeout`` runs
#: from when it goes out. Unbounded, a thousand registrations renewing together queue
#: inside httpx's pool of connections, where the wait counts against their deadlines:
#: they time out, retry, and queue again.
MAX_REQUESTS: Final = 32
_HEADERS: Final = {"accept-encoding": "identity", "content-type": "application/json"}


@contextmanager
def _reaching(endpoint: str) -> Iterator[None]:
    """httpx's errors of the network, as StoreUnavailable (the next endpoint may answer)."""
    try:
        yield
    except httpx.TransportError as exc:
        raise StoreUnavailable(f"{endpoint}: {describe_os_error(exc)}", endpoint) from exc


@final
class _Answer:
    """An answer being read: whole, or line by line; either way up to ``limit`` bytes.

    :meth:`aclose` closes the connection and then reads on, which ends at
    once with an error: httpx reads through async generators nested five
    deep, and one left suspended (an answer not read to its end) would be
    finalized by the garbage collector, which Trio reports as a
    ResourceWarning.
    """

    def __init__(self, response: httpx.Response, endpoint: str, limit: int) -> None:
        self.status = response.status_code
        self._response = response
        self._chunks = response.aiter_raw()
        self._endpoint = endpoint
        self._limit = limit
        self._buffer = bytearray()
        self._searched = 0  # the buffer has no newline before this offset

    def _refuse(self) -> NoReturn:
        raise ValueError(f"{self._endpoint} sent an answer over {self._limit} bytes")

    async def read(self) -> bytes:
        """All of it."""
        while (chunk := await anext(self._chunks, None)) is not None:
            self._buffer += chunk
            if len(self._buffer) > self._limit:
                self._refuse()
        return bytes(self._buffer)

    async def next_line(self) -> bytes | None:
        """The next line that is not blank; ``None`` at the end of the answer."""
        while True:
            end = self._buffer.find(b"\n", self._searched)
            self._searched = len(self._buffer) if end < 0 else 0
            if max(end, self._searched) > self._limit:
                self._refuse()
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
            elif (chunk := await anext(self._chunks, None)) is not None:
                self._buffer += chunk
                continue
            else:
                line, self._buffer = bytes(self._buffer), bytearray()
                if not line.strip():
                    return None
            if line.strip():
                return line

    async def aclose(self, within: float) -> None:
        """Close the connection (shielded, and bounded: it waits for nobody)."""
        with trio.move_on_after(within, shield=True):
            await self._response.aclose()
            with suppress(Exception):  # reading a closed connection: an error, at once
                async for _ in self._chunks:
                    pass


@final
class _Body(httpx.AsyncByteStream):
    """A request's body that httpx reads with no async generator: httpx's own is one,
    and a send that fails before the body is sent (etcd killed) leaves it suspended,
    to be finalized by the garbage collector, which Trio reports as a ResourceWarning."""

    def __init__(self, content: bytes) -> None:
        self._content = content

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Once(self._content)


@final
class _Once:
    """An async iterator over one chunk."""

    def __init__(self, chunk: bytes) -> None:
        self._chunk: bytes | None = chunk

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if self._chunk is None:
            raise StopAsyncIteration
        chunk, self._chunk = self._chunk, None
        return chunk


async def _close(answer: _Answer | None, within: float) -> None:
    if answer is not None:
        await answer.aclose(within)


# -- the store ---------------------------------------------------------------------------


@final
class EtcdStore:
    """Leases, keys and watches in etcd; get one from :func:`open_etcd_store`.

    Each operation is one request, first to the endpoint that last answered
    (the module docstring has the endpoints, the time bounds and the errors).
    Raises :exc:`trio.ClosedResourceError` once the store's block has ended.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        endpoints: Sequence[str],
        nursery: trio.Nursery,
        *,
        timeout: float,
        watch_idle: float,
    ) -> None:
        self._client = client
        self._endpoints = [format_endpoint(*parse_endpoint(endpoint)) for endpoint in endpoints]
        self._nursery = nursery
        self._timeout = timeout
        self._watch_idle = watch_idle
        self._current = 0
        self._closed = False
        self._requests = trio.CapacityLimiter(MAX_REQUESTS)

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"<EtcdStore {', '.join(self._endpoints)}, next {self.endpoint}{state}>"

    @property
    def endpoint(self) -> str:
        """The endpoint the next request goes to first: the last one that answered."""
        return self._endpoints[self._current]

    async def grant(self, ttl: float) -> int:
        """A lease of ``ttl`` seconds, rounded up to whole seconds (etcd may grant more)."""
        if not (0 < ttl < math.inf):
            raise ValueError(f"ttl must be positive and finite, not {ttl!r}")
        return await self._call("/v3/lease/grant", {"TTL": str(math.ceil(ttl))}, lease_id)

    async def keepalive(self, lease: int) -> float | None:
        """Renew ``lease``: the TTL etcd renewed it for, or ``None`` if it is gone."""
        body = {"ID": str(lease)}
        return await self._call("/v3/lease/keepalive", body, renewed, lambda: None)

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now and delete its keys (a lease already gone is no error)."""
        await self._call("/v3/lease/revoke", {"ID": str(lease)}, lambda _: None, lambda: None)

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Set ``key``; the revision of the change (:exc:`ValueError` for a lease that is gone)."""
        body = {"key": b64(key), "value": b64(value)}
        if lease is None:
            return await self._call("/v3/kv/put", body, revision)
        if lease < 1:  # etcd would take lease 0 for "no lease"
            lease_gone(lease)
        body["lease"] = str(lease)
        return await self._call("/v3/kv/put", body, revision, partial(lease_gone, lease))

    async def delete(self, key: str) -> None:
        """Delete ``key``, if there is one."""
        await self._call("/v3/kv/deleterange", {"key": b64(key)}, revision)

    async def range(self, prefix: str = "") -> tuple[list[Entry], int]:
        """Every entry under ``prefix`` in key order, and the revision they were read at."""
        return await self._call("/v3/kv/range", prefix_range(prefix), entries)

    async def watch(self, prefix: str, after: int) -> AsyncGenerator[tuple[Change, ...], None]:
        """Every change under ``prefix`` after revision ``after``, oldest first, in batches
        (one per watch response, which may hold several revisions).

        Raises :exc:`WatchCompacted` when etcd no longer has the changes it
        owes, and :exc:`StoreUnavailable` when no endpoint starts the watch,
        when its stream breaks or ends, or when it was silent ``watch_idle``
        seconds and its member then did not answer within ``timeout``.
        """
        if after < 0:
            raise ValueError(f"after must be a revision, 0 or more, not {after!r}")
        if self._closed:
            raise trio.ClosedResourceError("the etcd store is closed")
        create = {**prefix_range(prefix), "start_revision": str(after + 1)}
        create["progress_notify"] = True  # etcd's reports are rare, but each is a sign of life
        content = json.dumps({"create_request": create}).encode()
        send, receive = trio.open_memory_channel[_WatchMessage](0)
        reader = trio.CancelScope()
        name = f"trio_heartbeat etcd watch {prefix!r}"  # the reader task
        self._nursery.start_soon(self._read_watch, content, after, send, reader, name=name)
        endpoint: str | None = None
        try:
            while True:
                message = await self._next_message(receive, endpoint, prefix)
                if isinstance(message, Exception):
                    raise message
                endpoint, changes = message
                if changes:
                    yield changes
        finally:
            reader.cancel()
            receive.close()

    # -- requests ----------------------------------------------------------------------

    async def _any_endpoint(
        self, attempt: Callable[[str], Awaitable[_T]], what: str
    ) -> tuple[str, _T]:
        """``attempt`` on each endpoint in turn, from the current one, until one does not
        raise :exc:`StoreUnavailable`: that endpoint (now the current one), and its result."""
        reasons: list[str] = []  # not the exceptions: their tracebacks hold this frame
        for step in range(len(self._endpoints)):
            index = (self._current + step) % len(self._endpoints)
            try:
                result = await attempt(self._endpoints[index])
            except StoreUnavailable as exc:
                reasons.append(str(exc))
                continue
            self._current = index
            return self._endpoints[index], result
        last = self._endpoints[(self._current - 1) % len(self._endpoints)]
        raise StoreUnavailable(f"no etcd endpoint {what}: {'; '.join(reasons)}", last)

    async def _call(
        self,
        path: str,
        body: JSON,
        parse: Callable[[JSON], _T],
        lease_missing: Callable[[], _T] | None = None,
    ) -> _T:
        """POST ``body`` to the endpoints in turn until one answers; what it answered."""
        if self._closed:
            raise trio.ClosedResourceError("the etcd store is closed")
        content = json.dumps(body).encode()
        acquired = False
        with trio.move_on_after(self._timeout):  # the wait for a turn is bounded too
            await self._requests.acquire()
            acquired = True
        if not acquired:
            raise StoreUnavailable(
                f"{MAX_REQUESTS} requests to etcd were still under way after "
                f"{self._timeout:g} s (etcd is slow, or overloaded)",
                self.endpoint,
            )
        try:
            _, result = await self._any_endpoint(
                lambda endpoint: self._call_at(endpoint, path, content, parse, lease_missing),
                "answered",
            )
        finally:
            self._requests.release()
        return result

    async def _call_at(
        self,
        endpoint: str,
        path: str,
        content: bytes,
        parse: Callable[[JSON], _T],
        lease_missing: Callable[[], _T] | None = None,
    ) -> _T:
        """One request to one endpoint, all of it within ``timeout``."""
        url = f"http://{endpoint}{path}"
        request = self._client.build_request("POST", url, content=content, headers=_HEADERS)
        request.stream = _Body(content)
        answer: _Answer | None = None
        try:
            with trio.move_on_after(self._timeout), _reaching(endpoint):
                response = await self._client.send(request, stream=True)
                answer = _Answer(response, endpoint, MAX_ANSWER_BYTES)
                data = await answer.read()
                return judge(endpoint, path, answer.status, data, parse, lease_missing)
            raise StoreUnavailable(
                f"{endpoint} did not answer {path} within {self._timeout:g} s", endpoint
            )
        finally:
            await _close(answer, self._timeout)

    # -- watches -----------------------------------------------------------------------

    async def _next_message(
        self, receive: trio.MemoryReceiveChannel[_WatchMessage], endpoint: str | None, prefix: str
    ) -> _WatchMessage:
        """The reader's next message; after each silence, make sure the member still answers."""
        while True:
            with trio.move_on_after(math.inf if endpoint is None else self._watch_idle):
                try:
                    return await receive.receive()
                except trio.EndOfChannel:  # the reader was cancelled: the store closed
                    raise trio.ClosedResourceError("the etcd store is closed") from None
            assert endpoint is not None
            count = json.dumps({**prefix_range(prefix), "count_only": True}).encode()
            try:
                await self._call_at(endpoint, "/v3/kv/range", count, revision)
            except StoreUnavailable as exc:
                raise StoreUnavailable(
                    f"a watch heard nothing for {self._watch_idle:g} s, and {exc}", endpoint
                ) from exc

    async def _read_watch(
        self,
        content: bytes,
        after: int,
        send: trio.MemorySendChannel[_WatchMessage],
        scope: trio.CancelScope,
    ) -> None:
        """The reader task: open the stream on the first endpoint that will, pass on its
        responses, then how it ended, as a value (this task never raises)."""
        with scope, send:
            answer: _Answer | None = None
            try:
                endpoint, (stream, changes) = await self._any_endpoint(
                    lambda endpoint: self._open_watch(endpoint, content, after),
                    "started the watch",
                )
                answer = stream  # closed below, however this ends
                while True:
                    await send.send((endpoint, changes))
                    after = changes[-1].revision if changes else after
                    with _reaching(endpoint):
                        line = await stream.next_line()
                    if line is None:
                        raise StoreUnavailable(f"{endpoint} ended the watch stream", endpoint)
                    changes = judge(endpoint, "/v3/watch", 200, line, partial(watch_changes, after))
            except Exception as exc:
                with suppress(trio.BrokenResourceError):  # the watch is closed: nobody to tell
                    await send.send(exc)
            finally:
                await _close(answer, self._timeout)

    async def _open_watch(
        self, endpoint: str, content: bytes, after: int
    ) -> tuple[_Answer, tuple[Change, ...]]:
        """A watch's stream on ``endpoint`` and its first response, within ``timeout``
        (one that says "not now" is StoreUnavailable: the next endpoint is tried)."""
        url, timeout = f"http://{endpoint}/v3/watch", httpx.Timeout(self._timeout, read=None)
        request = self._client.build_request(  # no read timeout: a stream may be quiet for long
            "POST", url, content=content, headers=_HEADERS, timeout=timeout
        )
        request.stream = _Body(content)
        answer: _Answer | None = None
        try:
            with trio.move_on_after(self._timeout), _reaching(endpoint):
                response = await self._client.send(request, stream=True)
                answer = _Answer(response, endpoint, MAX_WATCH_LINE_BYTES)
                if answer.status != 200:
                    judge(endpoint, "/v3/watch", answer.status, await answer.read(), revision)
                line = await answer.next_line()
                if line is None:
                    raise StoreUnavailable(f"{endpoint} ended the watch at once", endpoint)
                return answer, judge(
                    endpoint, "/v3/watch", 200, line, partial(watch_changes, after)
                )
            raise StoreUnavailable(
                f"{endpoint} did not start the watch within {self._timeout:g} s", endpoint
            )
        except BaseException:
            await _close(answer, self._timeout)
            raise


@asynccontextmanager
async def open_etcd_store(
    endpoints: Sequence[str],
    *,
    timeout: float = 2.0,  # noqa: ASYNC109 - every request's own bound, not the block's
    watch_idle: float = 10.0,
    _transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[EtcdStore]:
    """An :class:`EtcdStore` on the etcd members at ``endpoints`` (``"host:port"``, client ports).

    Nothing is sent before the first operation: the store opens whether or
    not etcd is up. ``timeout`` bounds each request to one endpoint;
    ``watch_idle`` is how long a watch waits on a silent stream before it
    makes sure its member still answers. The watches' reader tasks run
    beside the block and end with it. Each open watch holds one of the
    client's 100 connections. Proxy settings in the environment are ignored.

    >>> async def main() -> None:  # doctest: +SKIP
    ...     async with open_etcd_store(["10.0.0.1:2379", "10.0.0.2:2379"]) as store:
    ...         entries, revision = await store.range("services/")
    """
    if isinstance(endpoints, str):
        raise TypeError(f"endpoints must be a list of 'host:port', not one: {endpoints!r}")
    if not endpoints:
        raise ValueError("at least one etcd endpoint is needed")
    for endpoint in endpoints:
        parse_endpoint(endpoint)
    for name, value in (("timeout", timeout), ("watch_idle", watch_idle)):
        if not (0 < value < math.inf):
            raise ValueError(f"{name} must be positive and finite seconds, not {value!r}")
    client = httpx.AsyncClient(transport=_transport, timeout=timeout, trust_env=False)
    async with client, open_background() as nursery:
        store = EtcdStore(client, endpoints, nursery, timeout=timeout, watch_idle=watch_idle)
        try:
            yield store
        finally:
            store._closed = True
