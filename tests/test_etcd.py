"""The etcd backend (``_etcd.py``): a real etcd 3.4 on loopback, and a scripted gateway.

Against a real member (the ``etcd`` fixture, tests/etcd_server.py): every
operation round trip, unicode keys and prefix ranges, a lease's keys deleted
when it expires (etcd's minimum TTL, 1 s here; 2 s with etcd's own timing,
granted when 1 s is asked), keepalive and put on a lease that is gone, a
watch from a revision hearing everything in order (deletes by expiry too),
a watch after a compaction, progress reports not passed on, no member
listening, a frozen member (SIGSTOP: StoreUnavailable within about the
timeout, and served again after SIGCONT), a killed one (the watch breaks)
and a restarted one (its data kept), and the second endpoint when the first
is dead. Real-time bounds are generous.

Against httpx's MockTransport, in virtual time: the gateway's habits
(int64 as strings, zero fields left out, a keepalive without a TTL), its
refusals and failures (gRPC errors in 4xx, 5xx, garbage, malformed fields,
oversized answers and watch lines), the timeout on a whole exchange, the
silent watch that checks its member, backpressure, and closing.
"""

from __future__ import annotations

import base64
import gc
import json
import math
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from etcd_server import EtcdServer, b64, find_etcd, free_port
from helpers import task_names
from trio.testing import MockClock

from trio_heartbeat._errors import StoreUnavailable, WatchCompacted
from trio_heartbeat._etcd import MAX_ANSWER_BYTES, MAX_REQUESTS, MAX_WATCH_LINE_BYTES, EtcdStore
from trio_heartbeat._kv import KeyValueStore
from trio_heartbeat._leases import Change, ChangeKind, Entry
from trio_heartbeat.etcd import open_etcd_store

PUT, DELETE = ChangeKind.PUT, ChangeKind.DELETE


def _conforms(store: EtcdStore) -> KeyValueStore:
    return store  # mypy checks that EtcdStore satisfies the protocol


async def collect(
    store: EtcdStore, prefix: str, after: int, count: int, within: float = 10.0
) -> list[Change]:
    """The first ``count`` changes a watch hears (in batches, flattened)."""
    heard: list[Change] = []
    with trio.fail_after(within):
        async with aclosing(store.watch(prefix, after)) as changes:
            async for batch in changes:
                heard += batch
                if len(heard) >= count:
                    break
    return heard


# -- a real etcd -----------------------------------------------------------------------


async def test_every_operation_round_trips_with_unicode_keys_and_prefixes(
    etcd: EtcdServer,
) -> None:
    async with open_etcd_store([etcd.endpoint]) as store:
        lease = await store.grant(5)
        assert lease > 0
        assert await store.keepalive(lease) == 5.0
        first = await store.put("svc/échø/a", "127.0.0.1:7400 ✓".encode(), lease=lease)
        second = await store.put("svc/b", b"")
        await store.put("svc0", b"sibling after the prefix")
        await store.put("svb", b"sibling before it")
        assert second == first + 1
        entries, revision = await store.range("svc/")
        assert revision == second + 2
        assert entries == [
            Entry("svc/b", b"", None, second, second),
            Entry("svc/échø/a", "127.0.0.1:7400 ✓".encode(), lease, first, first),
        ]
        assert [e.key for e in (await store.range())[0]] == ["svb", "svc/b", "svc/échø/a", "svc0"]
        assert (await store.range("svc/é"))[0][0].key == "svc/échø/a"
        assert await store.put("svc/b", b"again") == revision + 1
        assert (await store.range("svc/b"))[0] == [
            Entry("svc/b", b"again", None, second, revision + 1)
        ]
        await store.delete("svc/b")
        await store.delete("svc/nothing")  # no such key: no error
        await store.revoke(lease)  # its key goes with it
        await store.revoke(lease)  # gone already: no error
        assert [e.key for e in (await store.range())[0]] == ["svb", "svc0"]
        assert await store.keepalive(lease) is None
        with pytest.raises(ValueError, match=rf"^lease {lease} not found$"):
            await store.put("svc/c", b"", lease=lease)
        with pytest.raises(
            ValueError, match=r"refused /v3/kv/put: etcdserver: key is not provided"
        ):
            await store.put("", b"no key")
        assert repr(store) == f"<EtcdStore {etcd.endpoint}, next {etcd.endpoint}>"


@pytest.mark.slow
async def test_a_lease_that_expires_deletes_its_keys_and_a_watch_hears_it_in_order(
    etcd: EtcdServer,
) -> None:
    """etcd's minimum TTL (1 s with the fixture's elections); its expiry is checked
    twice a second, so the delete comes 1 to 2 s after the grant. The watch, silent
    meanwhile, makes sure of its member every 0.2 s, and goes on."""
    async with open_etcd_store([etcd.endpoint], watch_idle=0.2) as store:
        start = (await store.range())[1]
        lease = await store.grant(1)
        granted = trio.current_time()
        at = await store.put("svc/a", b"1", lease=lease)
        await store.put("svc/b", b"2")
        await store.put("other", b"not under the prefix")
        await store.delete("svc/b")
        heard = await collect(store, "svc/", start, count=4, within=10)
        expired = trio.current_time() - granted
        assert heard == [
            Change(PUT, "svc/a", b"1", at),
            Change(PUT, "svc/b", b"2", at + 1),
            Change(DELETE, "svc/b", b"", at + 3),
            Change(DELETE, "svc/a", b"", at + 4),
        ]
        assert 0.9 < expired < 5.0
        assert await store.keepalive(lease) is None
        with pytest.raises(ValueError, match=rf"^lease {lease} not found$"):
            await store.put("svc/a", b"again", lease=lease)
        assert (await store.range("svc/"))[0] == []


async def test_etcd_grants_its_minimum_ttl_when_asked_for_less(tmp_path: Path) -> None:
    """With etcd's own timing (a 1 s election timeout) the minimum TTL is 2 s."""
    binary = find_etcd()
    if binary is None:
        pytest.skip("etcd is not installed")
    with EtcdServer(tmp_path, binary=binary, fast=False) as server:
        async with open_etcd_store([server.endpoint]) as store:
            lease = await store.grant(0.5)  # 1 s asked, after rounding up
            assert await store.keepalive(lease) == 2.0


async def test_a_watch_after_a_compaction_is_told_to_read_again(etcd: EtcdServer) -> None:
    async with open_etcd_store([etcd.endpoint]) as store:
        for n in range(4):
            revision = await store.put("svc/k", bytes([n]))
        etcd.compact(revision - 1)
        with pytest.raises(WatchCompacted) as caught:
            await collect(store, "svc/", after=1, count=1)
        assert caught.value.revision == 1
        # From the compaction's revision on, the history is there.
        assert await collect(store, "svc/", after=revision - 2, count=2) == [
            Change(PUT, "svc/k", bytes([2]), revision - 1),
            Change(PUT, "svc/k", bytes([3]), revision),
        ]


@pytest.mark.slow
async def test_progress_reports_are_not_passed_on(tmp_path: Path) -> None:
    """A member that reports progress every 100 ms: 1.5 s of reports, then the put is
    the first batch."""
    binary = find_etcd()
    if binary is None:
        pytest.skip("etcd is not installed")
    interval = ["--experimental-watch-progress-notify-interval=100ms"]
    with EtcdServer(tmp_path, binary=binary, extra=interval) as server:
        async with open_etcd_store([server.endpoint]) as store:
            start = (await store.range())[1]
            async with trio.open_nursery() as nursery:
                heard: list[tuple[Change, ...]] = []

                async def watch() -> None:
                    async for batch in store.watch("svc/", start):
                        heard.append(batch)

                nursery.start_soon(watch)
                await trio.sleep(1.5)
                revision = await store.put("svc/a", b"x")
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()
    assert heard == [(Change(PUT, "svc/a", b"x", revision),)]


async def test_no_member_listening_is_store_unavailable_at_once() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    async with open_etcd_store([endpoint], timeout=5.0) as store:
        started = trio.current_time()
        with pytest.raises(StoreUnavailable, match=rf"^no etcd endpoint answered: {endpoint}: "):
            await store.range()
        with pytest.raises(StoreUnavailable) as caught:
            await collect(store, "", 0, count=1)
        assert caught.value.endpoint == endpoint
        assert trio.current_time() - started < 2.0


@pytest.mark.slow
async def test_a_frozen_member_is_unavailable_within_the_timeout_then_serves_again(
    etcd: EtcdServer,
) -> None:
    async with open_etcd_store([etcd.endpoint], timeout=0.5, watch_idle=0.5) as store:
        await store.put("svc/a", b"1")
        async with trio.open_nursery() as nursery:
            ended: list[tuple[BaseException, float]] = []
            done = trio.Event()

            async def watch() -> None:
                try:
                    await collect(store, "svc/", (await store.range())[1], count=1, within=30)
                except StoreUnavailable as exc:
                    ended.append((exc, trio.current_time()))
                done.set()

            nursery.start_soon(watch)
            await trio.sleep(0.3)  # the watch is open
            etcd.freeze()
            frozen = trio.current_time()
            try:
                with pytest.raises(
                    StoreUnavailable, match=r"did not answer /v3/kv/put within 0.5 s"
                ):
                    await store.put("svc/late", b"2")
                took = trio.current_time() - frozen
                assert 0.45 < took < 2.0
                with trio.fail_after(5):
                    await done.wait()
            finally:
                etcd.thaw()
        # Silent for watch_idle (0.5 s, from before the freeze), then no answer to the
        # check within the timeout (0.5 s).
        (error, when) = ended[0]
        assert "a watch heard nothing for 0.5 s" in str(error)
        assert 0.45 < when - frozen < 4.0
        # Served again. The put that timed out waited in the frozen member's socket:
        # after the thaw it may or may not be carried out (both were seen).
        keys = [e.key for e in (await store.range())[0]]
        assert keys in (["svc/a"], ["svc/a", "svc/late"])


async def test_a_killed_member_breaks_the_watch_and_a_restarted_one_has_its_data(
    etcd: EtcdServer,
) -> None:
    async with open_etcd_store([etcd.endpoint], timeout=1.0) as store:
        kept = await store.put("svc/kept", b"no lease")
        async with aclosing(store.watch("svc/", kept - 1)) as changes:
            assert await changes.__anext__() == (Change(PUT, "svc/kept", b"no lease", kept),)
            etcd.kill()
            killed = trio.current_time()
            with pytest.raises(StoreUnavailable, match=r"^127\.0\.0\.1:\d+: "):
                await changes.__anext__()
            assert trio.current_time() - killed < 2.0
        with pytest.raises(StoreUnavailable):
            await store.range()
        await trio.to_thread.run_sync(etcd.restart)
        entries, revision = await store.range("svc/")
        assert (entries, revision) == ([Entry("svc/kept", b"no lease", None, kept, kept)], kept)
        assert await store.put("svc/new", b"") == kept + 1


async def test_the_next_endpoint_answers_when_the_first_is_dead(etcd: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with open_etcd_store([dead, etcd.endpoint]) as store:
        assert store.endpoint == dead
        revision = await store.put("svc/a", b"1")
        assert store.endpoint == etcd.endpoint  # later requests start there
        assert await collect(store, "svc/", revision - 1, count=1) == [
            Change(PUT, "svc/a", b"1", revision)
        ]
    async with open_etcd_store([dead, etcd.endpoint]) as store:
        assert await collect(store, "svc/", revision - 1, count=1) == [
            Change(PUT, "svc/a", b"1", revision)
        ]
        assert store.endpoint == etcd.endpoint


# -- a scripted gateway (httpx.MockTransport), in virtual time -------------------------

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def streamed(data: bytes, status: int = 200) -> httpx.Response:
    """An answer read from the network as a real transport gives it (not read yet)."""

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    return httpx.Response(status, content=chunks())


def reply(body: object, status: int = 200) -> httpx.Response:
    return streamed(json.dumps(body).encode(), status)


def lines(*messages: object) -> bytes:
    return b"".join(json.dumps(message).encode() + b"\n" for message in messages)


def header(revision: int = 9) -> dict[str, Any]:
    return {"header": {"cluster_id": "1", "revision": str(revision), "raft_term": "2"}}


def body(request: httpx.Request) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(request.content)
    return result


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


@asynccontextmanager
async def scripted(
    handler: Handler,
    endpoints: tuple[str, ...] = ("a:1",),
    *,
    timeout: float = 2.0,  # noqa: ASYNC109 - the store's, passed on
    watch_idle: float = 10.0,
) -> AsyncIterator[tuple[EtcdStore, list[httpx.Request]]]:
    """A store over ``handler``, and the requests it was sent."""
    sent: list[httpx.Request] = []

    async def recording(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return await handler(request)

    transport = httpx.MockTransport(recording)
    async with open_etcd_store(
        list(endpoints), timeout=timeout, watch_idle=watch_idle, _transport=transport
    ) as store:
        yield store, sent


def where(request: httpx.Request) -> str:
    return f"{request.url.host}:{request.url.port}"


async def test_int64_fields_are_strings_and_zero_fields_are_left_out(
    autojump_clock: MockClock,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if body(request)["key"] == b64("empty/"):
            return reply(header(9))  # no kvs, no count
        kvs = [
            {"key": b64("a"), "create_revision": "3", "mod_revision": "5", "version": "2"},
            {
                "key": b64("b"),
                "value": b64("x"),
                "lease": "12",
                "create_revision": 4,
                "mod_revision": "4",
            },
        ]
        return reply({**header(7), "kvs": kvs, "count": "2"})

    async with scripted(handler) as (store, sent):
        assert await store.range("svc/") == (
            [Entry("a", b"", None, 3, 5), Entry("b", b"x", 12, 4, 4)],
            7,
        )
        assert await store.range("empty/") == ([], 9)
    assert str(sent[0].url) == "http://a:1/v3/kv/range"
    assert body(sent[0]) == {"key": b64("svc/"), "range_end": b64("svc0")}


async def test_a_keepalive_without_a_ttl_means_the_lease_is_gone(autojump_clock: MockClock) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        lease = body(request)["ID"]
        ttl = {"1": {"TTL": "4"}, "2": {}, "3": {"TTL": "-1"}}
        if lease in ttl:
            return reply({"result": {**header(), "ID": lease, **ttl[lease]}})
        return reply(
            {
                "error": "etcdserver: requested lease not found",
                "code": 5,
                "message": "etcdserver: requested lease not found",
            },
            404,
        )

    async with scripted(handler) as (store, sent):
        assert [await store.keepalive(lease) for lease in (1, 2, 3, 4)] == [4.0, None, None, None]
        assert [body(request) for request in sent] == [{"ID": str(n)} for n in (1, 2, 3, 4)]
        assert {request.url.path for request in sent} == {"/v3/lease/keepalive"}


async def test_a_lease_not_found_is_no_error_for_a_revoke_and_a_value_error_for_a_put(
    autojump_clock: MockClock,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        message = "etcdserver: requested lease not found"
        return reply({"error": message, "code": 5, "message": message}, 404)

    async with scripted(handler) as (store, sent):
        await store.revoke(5)
        with pytest.raises(ValueError, match=r"^lease 5 not found$"):
            await store.put("k", b"v", lease=5)
        assert body(sent[1]) == {"key": b64("k"), "value": b64("v"), "lease": "5"}
        with pytest.raises(ValueError, match=r"^lease 0 not found$"):
            await store.put("k", b"v", lease=0)  # etcd would read 0 as no lease at all
        assert len(sent) == 2
        with pytest.raises(ValueError, match=r"^lease 1 not found$"):
            await store.put("k", b"v", lease=1)  # the first lease etcd grants: asked about
        assert body(sent[2])["lease"] == "1"
        with pytest.raises(RuntimeError, match=r"lease not found"):
            await store.delete("k")  # a NotFound where no lease is named: a refusal
    # Read raw, so asked for without compression.
    assert sent[1].headers["accept-encoding"] == "identity"
    assert sent[1].headers["content-type"] == "application/json"


async def test_a_refusal_is_the_callers_mistake_and_tried_nowhere_else(
    autojump_clock: MockClock,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path in ("/v3/kv/put", "/v3/watch"):
            message = "etcdserver: key is not provided"
            return reply({"error": message, "code": 3, "message": message}, 400)
        return reply(
            {
                "error": "etcdserver: permission denied",
                "code": 7,
                "message": "etcdserver: permission denied",
            },
            403,
        )

    async with scripted(handler, ("a:1", "b:2")) as (store, sent):
        refused = "etcd at a:1 refused /v3/kv/put: etcdserver: key is not provided"
        with pytest.raises(ValueError, match=rf"^{refused} \(gRPC code 3, HTTP 400\)$"):
            await store.put("", b"")
        with pytest.raises(RuntimeError, match=r"permission denied \(gRPC code 7, HTTP 403\)$"):
            await store.range()
        refused = "etcd at a:1 refused /v3/watch: etcdserver: key is not provided"
        with pytest.raises(ValueError, match=rf"^{refused} \(gRPC code 3, HTTP 400\)$"):
            await collect(store, "", 0, count=1)
        assert [where(request) for request in sent] == ["a:1", "a:1", "a:1"]


async def test_failures_move_on_to_the_next_endpoint_and_all_of_them_are_reported(
    autojump_clock: MockClock,
) -> None:
    healthy = {"c:3"}

    async def handler(request: httpx.Request) -> httpx.Response:
        endpoint = where(request)
        if endpoint == "a:1":
            return reply(
                {"error": "etcdserver: no leader", "code": 14, "message": "etcdserver: no leader"},
                503,
            )
        if endpoint == "b:2":
            return streamed(b"<html>a proxy's page</html>")
        if endpoint in healthy:
            return reply(header(4))
        return reply({"header": {"revision": "four"}})  # not a number

    async with scripted(handler, ("a:1", "b:2", "c:3")) as (store, sent):
        assert await store.range() == ([], 4)
        assert store.endpoint == "c:3"
        assert repr(store) == "<EtcdStore a:1, b:2, c:3, next c:3>"
        assert await store.range() == ([], 4)
        assert [where(request) for request in sent] == ["a:1", "b:2", "c:3", "c:3"]
        healthy.clear()
        with pytest.raises(StoreUnavailable) as caught:
            await store.range()
    assert caught.value.endpoint == "b:2"  # tried last: c, a, b
    assert str(caught.value) == (
        "no etcd endpoint answered: "
        "c:3 answered /v3/kv/range with what etcd does not send "
        "(invalid literal for int() with base 10: 'four'); "
        "a:1 could not serve /v3/kv/range: etcdserver: no leader; "
        "b:2 answered /v3/kv/range with HTTP 200, not etcd's JSON: b\"<html>a proxy's page</html>\""
    )


async def test_strangers_and_malformed_answers_are_unavailable(autojump_clock: MockClock) -> None:
    answers = iter(
        [
            streamed(b"Not Found\n", 404),
            reply({**header(), "kvs": {"key": "a"}}),
            reply({**header(), "kvs": [{"key": "not base64!"}]}),
            reply({**header(), "kvs": [{"key": b64("a"), "lease": True}]}),
            reply(["a", "list"]),
            streamed(b"\xff\xfe not UTF-8"),
            reply({"header": {}}),  # revision 0: not a header etcd sends
        ]
    )

    async def handler(request: httpx.Request) -> httpx.Response:
        return next(answers)

    async with scripted(handler) as (store, _):
        for _ in range(7):
            with pytest.raises(StoreUnavailable, match=r"^no etcd endpoint answered: a:1 answered"):
                await store.range()


async def test_every_exchange_is_bounded_by_the_timeout(autojump_clock: MockClock) -> None:
    """A member that never answers, and one that trickles its answer a byte a second:
    each costs exactly the timeout, whole, not per read."""

    async def trickle() -> AsyncIterator[bytes]:
        for byte in json.dumps(header()).encode():
            await trio.sleep(1.0)
            yield bytes([byte])

    async def handler(request: httpx.Request) -> httpx.Response:
        if where(request) == "a:1":
            await trio.sleep_forever()
        if where(request) == "b:2":
            return httpx.Response(200, content=trickle())
        return reply(header(3))

    async with scripted(handler, ("a:1", "b:2", "c:3"), timeout=2.0) as (store, _):
        assert await store.range() == ([], 3)
        assert trio.current_time() == 4.0
    async with scripted(handler, ("a:1", "b:2"), timeout=2.0) as (store, _):
        with pytest.raises(
            StoreUnavailable,
            match=r"a:1 did not answer /v3/lease/grant within 2 s; b:2 did not answer",
        ):
            await store.grant(3)
        assert trio.current_time() == 8.0


async def test_answers_and_watch_lines_are_bounded_in_bytes(autojump_clock: MockClock) -> None:
    """An answer, and a line of a watch, one chunk past their bounds: refused there."""

    async def flood(piece: bytes, limit: int) -> AsyncIterator[bytes]:
        for _ in range(limit // len(piece) + 2):  # finite, as a closed socket would end it
            yield piece

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/watch":
            return httpx.Response(200, content=flood(b"x" * 65536, MAX_WATCH_LINE_BYTES))
        return httpx.Response(200, content=flood(b" " * 65536, MAX_ANSWER_BYTES))

    async with scripted(handler, timeout=1000.0) as (store, _):
        with pytest.raises(
            ValueError, match=rf"^a:1 sent an answer over {MAX_ANSWER_BYTES} bytes$"
        ):
            await store.range()
        with pytest.raises(ValueError, match=rf"^a:1 sent an answer over {MAX_WATCH_LINE_BYTES} "):
            await collect(store, "", 0, count=1)


def padded(message: object, size: int) -> bytes:
    """``message`` as JSON, padded with spaces to exactly ``size`` bytes."""
    text = json.dumps(message).encode()
    return text + b" " * (size - len(text))


async def test_an_answer_and_a_watch_line_exactly_at_their_bounds_are_read(
    autojump_clock: MockClock,
) -> None:
    """The bounds are inclusive; a blank line before the longest line counts for nothing."""
    event = {"result": {**header(), "events": [{"kv": {"key": b64("k"), "mod_revision": "4"}}]}}

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/watch":
            created = lines({"result": {**header(), "created": True}})
            longest = padded(event, MAX_WATCH_LINE_BYTES)
            return httpx.Response(200, content=watch_script(created + b"\n" + longest + b"\n")())
        return streamed(padded(header(5), MAX_ANSWER_BYTES))

    async with scripted(handler) as (store, _):
        assert await store.range() == ([], 5)
        assert await collect(store, "", 3, count=1) == [Change(PUT, "k", b"", 4)]


def watch_script(*chunks: bytes, then: str = "end") -> Callable[[], AsyncIterator[bytes]]:
    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
            await trio.sleep(1.0)
        if then == "hang":
            await trio.sleep_forever()

    return stream


async def test_a_watch_passes_on_events_only_and_resumes_after_the_last_one(
    autojump_clock: MockClock,
) -> None:
    created = {"result": {**header(9), "created": True}}
    progress = {"result": header(9)}
    two = {
        "result": {
            **header(9),
            "events": [
                {
                    "kv": {
                        "key": b64("svc/a"),
                        "create_revision": "5",
                        "mod_revision": "5",
                        "value": b64("1"),
                    }
                },
                {"type": "DELETE", "kv": {"key": b64("svc/b"), "mod_revision": "6"}},
            ],
        }
    }
    third = lines(
        {"result": {**header(9), "events": [{"kv": {"key": b64("svc/c"), "mod_revision": "7"}}]}}
    )
    compacted = {
        "result": {"header": {"cluster_id": "1"}, "canceled": True, "compact_revision": "8"}
    }
    stream = watch_script(
        lines(created),
        b"\n\n",
        lines(progress, two),
        third[:10],
        third[10:] + lines(compacted),
        then="hang",
    )

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream())

    heard: list[tuple[float, tuple[Change, ...]]] = []

    async def hear(store: EtcdStore) -> None:
        async for batch in store.watch("svc/", after=3):
            heard.append((trio.current_time(), batch))

    async with scripted(handler) as (store, sent):
        with pytest.raises(WatchCompacted) as caught:
            await hear(store)
    assert heard == [
        (2.0, (Change(PUT, "svc/a", b"1", 5), Change(DELETE, "svc/b", b"", 6))),
        (4.0, (Change(PUT, "svc/c", b"", 7),)),
    ]
    assert caught.value.revision == 7
    assert body(sent[0]) == {
        "create_request": {
            "key": b64("svc/"),
            "range_end": b64("svc0"),
            "start_revision": "4",
            "progress_notify": True,
        }
    }
    assert sent[0].headers["accept-encoding"] == "identity"
    assert sent[0].headers["content-type"] == "application/json"
    # Bounded while it starts, but a stream may then be quiet for long: no read timeout.
    assert sent[0].extensions["timeout"] == {
        "connect": 2.0,
        "read": None,
        "write": 2.0,
        "pool": 2.0,
    }


@pytest.mark.parametrize(
    ("script", "error", "match"),
    [
        (
            [
                lines(
                    {
                        "error": {
                            "grpc_code": 14,
                            "http_code": 503,
                            "message": "etcdserver: no leader",
                        }
                    }
                )
            ],
            StoreUnavailable,
            r"no etcd endpoint started the watch: a:1 could not serve /v3/watch: etcdserver: no leader$",
        ),
        (
            [b"garbage\n"],
            StoreUnavailable,
            r"^no etcd endpoint started the watch: a:1 answered /v3/watch with HTTP 200, not etcd's JSON",
        ),
        (
            [lines({"result": {"events": []}})],
            StoreUnavailable,
            r"a watch response without a header",
        ),
        (
            [
                lines({"result": {**header(), "created": True}}),
                lines({"result": {**header(), "events": [{"type": "EXPIRE", "kv": {}}]}}),
            ],
            StoreUnavailable,
            r"^a:1 answered /v3/watch with what etcd does not send \(.*an event of type 'EXPIRE'",
        ),
        (
            [lines({"result": {**header(), "created": True}})],
            StoreUnavailable,
            r"^a:1 ended the watch stream$",
        ),
        ([], StoreUnavailable, r"a:1 ended the watch at once$"),
        (
            [
                lines(
                    {
                        "result": {
                            **header(),
                            "canceled": True,
                            "cancel_reason": "etcdserver: permission denied",
                        }
                    }
                )
            ],
            RuntimeError,
            r"^etcd canceled the watch: etcdserver: permission denied$",
        ),
        (
            [
                lines(
                    {
                        "result": {
                            **header(),
                            "canceled": True,
                            "cancel_reason": "mvcc: required revision has been compacted",
                        }
                    }
                )
            ],
            WatchCompacted,
            r"^changes after revision 3 are no longer kept$",
        ),
    ],
)
async def test_how_a_watch_stream_fails(
    autojump_clock: MockClock, script: list[bytes], error: type[Exception], match: str
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=watch_script(*script)())

    async with scripted(handler) as (store, _):
        with pytest.raises(error, match=match):
            await collect(store, "svc/", 3, count=1)


async def test_a_last_line_without_a_newline_is_read(autojump_clock: MockClock) -> None:
    event = {"result": {**header(), "events": [{"kv": {"key": b64("k"), "mod_revision": "4"}}]}}

    async def handler(request: httpx.Request) -> httpx.Response:
        created = lines({"result": {**header(), "created": True}})
        return httpx.Response(200, content=watch_script(created + json.dumps(event).encode())())

    async with scripted(handler) as (store, _):
        changes = store.watch("", 3)
        assert await changes.__anext__() == (Change(PUT, "k", b"", 4),)
        with pytest.raises(StoreUnavailable, match=r"^a:1 ended the watch stream$") as caught:
            await changes.__anext__()
        assert caught.value.endpoint == "a:1"


async def test_a_watch_starts_on_the_next_endpoint_when_one_refuses_to(
    autojump_clock: MockClock,
) -> None:
    event = {"result": {**header(), "events": [{"kv": {"key": b64("k"), "mod_revision": "4"}}]}}

    async def handler(request: httpx.Request) -> httpx.Response:
        if where(request) == "a:1":
            return reply(
                {
                    "error": "etcdserver: request timed out",
                    "code": 14,
                    "message": "etcdserver: request timed out",
                },
                503,
            )
        if where(request) == "b:2":
            await trio.sleep_forever()
        return httpx.Response(200, content=watch_script(lines(event), then="hang")())

    async with scripted(handler, ("a:1", "b:2", "c:3"), timeout=2.0) as (store, _):
        assert await collect(store, "", 3, count=1) == [Change(PUT, "k", b"", 4)]
        assert trio.current_time() == 2.0
        assert store.endpoint == "c:3"


async def test_a_watch_no_endpoint_starts_says_why_for_each(autojump_clock: MockClock) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if where(request) == "a:1":
            raise httpx.ConnectError("[Errno 111] Connection refused")
        await trio.sleep_forever()
        raise AssertionError("never answers")  # pragma: no cover

    async with scripted(handler, ("a:1", "b:2"), timeout=2.0) as (store, _):
        with pytest.raises(StoreUnavailable) as caught:
            await collect(store, "", 3, count=1)
    assert str(caught.value) == (
        "no etcd endpoint started the watch: a:1: [Errno 111] Connection refused; "
        "b:2 did not start the watch within 2 s"
    )
    assert caught.value.endpoint == "b:2"


async def test_a_silent_watch_makes_sure_of_its_member(autojump_clock: MockClock) -> None:
    """Silent for watch_idle (10 s): a count of the prefix's keys from the same member.
    Two answers, then none within the timeout (2 s): unavailable at 10+10+10+2 = 32 s."""
    probes: list[tuple[float, str, dict[str, Any]]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/watch":
            if where(request) == "a:1":
                return streamed(b"", 503)
            created = lines({"result": {**header(), "created": True}})
            return httpx.Response(200, content=watch_script(created, then="hang")())
        probes.append((trio.current_time(), where(request), body(request)))
        if len(probes) > 2:
            await trio.sleep_forever()
        return reply(header())

    async with scripted(handler, ("a:1", "b:2"), watch_idle=10.0, timeout=2.0) as (store, _):
        with pytest.raises(StoreUnavailable) as caught:
            await collect(store, "svc/", 3, count=1, within=100)
        assert trio.current_time() == 32.0
    assert str(caught.value) == (
        "a watch heard nothing for 10 s, and b:2 did not answer /v3/kv/range within 2 s"
    )
    assert caught.value.endpoint == "b:2"
    cause = caught.value.__cause__
    assert isinstance(cause, StoreUnavailable)  # the check that failed, as itself
    assert cause.endpoint == "b:2"
    count = {"key": b64("svc/"), "range_end": b64("svc0"), "count_only": True}
    assert probes == [(10.0, "b:2", count), (20.0, "b:2", count), (30.0, "b:2", count)]


async def test_a_watch_slow_to_start_is_not_taken_for_a_silent_one(
    autojump_clock: MockClock,
) -> None:
    """Starting is bounded by the timeout (5 s), not by watch_idle (1 s): no check meanwhile."""
    event = {"result": {**header(), "events": [{"kv": {"key": b64("k"), "mod_revision": "4"}}]}}

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v3/watch", "no check before the watch has started"
        await trio.sleep(3.0)
        return httpx.Response(200, content=watch_script(lines(event), then="hang")())

    async with scripted(handler, watch_idle=1.0, timeout=5.0) as (store, sent):
        assert await collect(store, "", 3, count=1) == [Change(PUT, "k", b"", 4)]
        assert trio.current_time() == 3.0
        assert len(sent) == 1


async def test_a_consumer_that_does_not_ask_stops_the_reading(autojump_clock: MockClock) -> None:
    """One batch taken, then 100 s without asking: the stream was read one line ahead, at most."""
    served = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal served
        for revision in range(4, 1000):
            served += 1
            kv = {"key": b64("k"), "mod_revision": str(revision)}
            yield lines({"result": {**header(), "events": [{"kv": kv}]}})

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream())

    async with scripted(handler) as (store, _):
        changes = store.watch("", 3)
        assert [c.revision for c in await changes.__anext__()] == [4]
        await trio.sleep(100)
        assert served == 2  # the batch taken, and the one waiting to be taken
        assert [c.revision for c in await changes.__anext__()] == [5]
        await changes.aclose()
        await trio.sleep(1)
        assert not [name for name in task_names() if "etcd watch" in name]


async def test_a_watch_closed_while_its_stream_has_ended_closes_quietly(
    autojump_clock: MockClock,
) -> None:
    """The reader holds how the stream ended, for a consumer that closes the watch instead."""
    event = {"result": {**header(), "events": [{"kv": {"key": b64("k"), "mod_revision": "4"}}]}}

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=watch_script(lines(event))())

    async with scripted(handler) as (store, _):
        changes = store.watch("", 3)
        assert await changes.__anext__() == (Change(PUT, "k", b"", 4),)
        await trio.sleep(10)  # the stream ended at 1 s: its reader waits to tell
        assert [name for name in task_names() if "etcd watch" in name]
        await changes.aclose()
        await trio.sleep(1)
        assert not [name for name in task_names() if "etcd watch" in name]


async def test_a_closed_store_refuses_and_its_watches_end(autojump_clock: MockClock) -> None:
    """A watch that gave a batch, and is asked for the next once the store has closed."""
    event = {"result": {**header(), "events": [{"kv": {"key": b64("k"), "mod_revision": "4"}}]}}

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=watch_script(lines(event), then="hang")())

    async with scripted(handler) as (store, _):
        changes = store.watch("", 3)
        assert await changes.__anext__() == (Change(PUT, "k", b"", 4),)
    assert not [name for name in task_names() if "etcd watch" in name]
    assert repr(store) == "<EtcdStore a:1, next a:1, closed>"
    with pytest.raises(trio.ClosedResourceError, match=r"^the etcd store is closed$"):
        await changes.__anext__()
    with pytest.raises(trio.ClosedResourceError, match=r"^the etcd store is closed$"):
        await store.range()
    with pytest.raises(trio.ClosedResourceError, match=r"^the etcd store is closed$"):
        await collect(store, "", 0, count=1)


async def test_the_blocks_own_error_comes_out_as_itself(autojump_clock: MockClock) -> None:
    """Raised while a watch's reader task runs in the store's nursery: Boom, not a group."""

    class Boom(Exception):
        pass

    event = {"result": {**header(), "events": [{"kv": {"key": b64("k"), "mod_revision": "4"}}]}}

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=watch_script(lines(event), then="hang")())

    async def run() -> None:
        async with scripted(handler) as (store, _), aclosing(store.watch("", 3)) as changes:
            await changes.__anext__()
            assert [name for name in task_names() if "etcd watch" in name]
            raise Boom

    with pytest.raises(Boom):
        await run()
    assert not [name for name in task_names() if "etcd watch" in name]


@pytest.mark.parametrize(
    ("endpoints", "options", "error"),
    [
        ("127.0.0.1:2379", {}, TypeError),
        ([], {}, ValueError),
        (["no-port"], {}, ValueError),
        (["a:1"], {"timeout": 0.0}, ValueError),
        (["a:1"], {"watch_idle": math.inf}, ValueError),
    ],
)
async def test_what_open_etcd_store_refuses(
    endpoints: Any, options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        async with open_etcd_store(endpoints, **options):
            pass  # pragma: no cover - never reached


async def test_what_the_operations_refuse_before_sending_anything(
    autojump_clock: MockClock,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing is sent")  # pragma: no cover

    async with scripted(handler) as (store, _):
        for ttl in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match=r"^ttl must be positive and finite"):
                await store.grant(ttl)
        with pytest.raises(ValueError, match=r"^after must be a revision"):
            await collect(store, "", -1, count=1)


async def test_a_send_that_fails_while_sending_the_body_leaves_nothing_to_finalize(
    autojump_clock: MockClock,
) -> None:
    """etcd killed as a request goes out: the transport stops reading the body after its
    first chunk. Nothing of the request is left for the garbage collector (under Trio, an
    async generator finalized there is a ResourceWarning, an error in this suite)."""

    async def handler(request: httpx.Request) -> httpx.Response:
        async for _ in request.stream:  # type: ignore[union-attr]
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        raise AssertionError("the body had no chunk")  # pragma: no cover

    async with scripted(handler) as (store, sent):
        with pytest.raises(StoreUnavailable, match=r"Server disconnected"):
            await store.put("k", b"v")
        del sent[:]
    gc.collect()


async def test_a_request_cancelled_mid_answer_still_closes_its_connection(
    autojump_clock: MockClock,
) -> None:
    """Closing a connection takes a checkpoint (as a socket's does): the caller's cancel
    must not stop it, or the connection stays open and httpx's generators suspended."""
    closed = trio.Event()

    class Connection(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"header": '
            await closed.wait()  # then the socket reports it was closed

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()
            closed.set()

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Connection())

    async with scripted(handler, timeout=2.0) as (store, _):
        with trio.move_on_after(1.0):
            await store.range()
        assert closed.is_set()
        assert trio.current_time() == 1.0


async def test_failed_calls_leave_no_cycle_to_keep_the_store_alive(
    autojump_clock: MockClock,
) -> None:
    async def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    gc.collect()
    gc.disable()
    try:
        async with scripted(refused, ("a:1", "b:2")) as (store, _):
            for _ in range(3):
                with pytest.raises(StoreUnavailable, match=r"^no etcd endpoint answered"):
                    await store.range("x/")
            ref = weakref.ref(store)
        del store
        assert ref() is None  # freed at once, without a collection
    finally:
        gc.enable()


async def test_a_thousand_requests_at_once_wait_their_turn_and_none_times_out(
    autojump_clock: MockClock,
) -> None:
    """Requests beyond MAX_REQUESTS wait for a turn before their deadline starts: a burst
    of them (a thousand registrations renewing together) all succeed, none times out."""
    in_flight: list[int] = [0, 0]  # now, most

    async def prompt(request: httpx.Request) -> httpx.Response:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        await trio.sleep(0.05)
        in_flight[0] -= 1
        return reply({**header(), "kvs": []})

    async with scripted(prompt, timeout=2.0) as (store, _), trio.open_nursery() as nursery:
        for _ in range(1000):
            nursery.start_soon(store.range, "x/")
    assert in_flight[1] == MAX_REQUESTS
    assert trio.current_time() == pytest.approx(math.ceil(1000 / MAX_REQUESTS) * 0.05)


async def test_the_wait_for_a_turn_is_bounded_by_the_timeout_too(
    autojump_clock: MockClock,
) -> None:
    """etcd frozen, and more callers than turns: those in flight fail at the timeout, and
    those still waiting for a turn fail then too, not a timeout later (a registration must
    learn of an outage on time)."""

    async def frozen(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    failed: list[tuple[float, str]] = []
    endpoints: set[str] = set()

    async def call(store: EtcdStore) -> None:
        try:
            await store.range("x/")
        except StoreUnavailable as exc:
            failed.append((trio.current_time(), str(exc)))
            endpoints.add(exc.endpoint)

    async with scripted(frozen, timeout=2.0) as (store, _), trio.open_nursery() as nursery:
        for _ in range(MAX_REQUESTS + 8):
            nursery.start_soon(call, store)
    assert [t for t, _ in failed] == [2.0] * (MAX_REQUESTS + 8)
    waited = [m for _, m in failed if "still under way" in m]
    assert (
        waited
        == [
            f"{MAX_REQUESTS} requests to etcd were still under way after 2 s (etcd is slow, "
            "or overloaded)"
        ]
        * 8
    )
    assert endpoints == {"a:1"}  # the store it waited on, in flight or for a turn
