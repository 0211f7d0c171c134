"""HTTP probes (``_probes.py``): ``/livez``, ``/readyz`` and ``/peers`` on h11.

One connection is driven over :func:`trio.testing.memory_stream_pair` in
virtual time (``autojump_clock``), so the timeouts are exact: a request that
does not arrive whole within ``request_timeout`` gets 408 at that moment, an
idle connection is closed quietly at it, a client that does not read is cut off
at it, a lingering close lasts at most a second. The client side is h11 itself
for well-formed requests and raw bytes for the rest (garbage, oversized heads,
pipelining, a byte at a time); a peer sequence that records the step it is
read in shows a long list built a slice at a time, and only as far as
max_peers. At the connection cap, idle, trickling and non-reading clients
(reconnecting at once) give their slots to newcomers, so /livez is answered
200 throughout; connections already answered go before those never answered
(a probe whose request is on its way in outlasts a pipelining client); at
most half of max_connections peer lists are worked out at once, so a kubelet
finds a slot while they are; 503 comes only while every slot is busy (a held
/readyz stands for a long /peers). The listener is checked over real loopback
sockets in real time, with generous bounds: the address reported for port 0,
health flipping, the oldest idle connection closed for a fifth client, and an
idle server that takes no steps at all.
"""

from __future__ import annotations

import contextlib
import doctest
import functools
import itertools
import json
import logging
import math
import socket
from collections.abc import Callable, Sequence
from typing import overload
from unittest import mock

import h11
import pytest
import trio
import trio.testing

from trio_heartbeat import _probes
from trio_heartbeat._probes import ProbeServer, ProbeStatistics, serve_probes

Client = trio.abc.HalfCloseableStream


class Health:
    """Switchable answers for the probe callables."""

    def __init__(self) -> None:
        self.live = True
        self.ready = True
        self.peers: list[dict[str, object]] = [{"id": "a", "rtt": 0.5}]

    def probes(self, **limits: int | float) -> ProbeServer:
        return ProbeServer(
            livez=lambda: self.live,
            readyz=lambda: self.ready,
            peers=lambda: self.peers,
            **limits,  # type: ignore[arg-type]
        )


def request_bytes(method: str = "GET", target: str = "/livez", *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: probe", *headers, "", ""]
    return "\r\n".join(lines).encode()


def padded_request(size: int) -> bytes:
    """A GET /livez whose head is exactly ``size`` bytes."""
    plain = request_bytes("GET", "/livez", "X-Pad: ")
    return request_bytes("GET", "/livez", "X-Pad: " + "p" * (size - len(plain)))


def parse_responses(raw: bytes, method: bytes = b"GET") -> list[tuple[h11.Response, bytes]]:
    """Every response in ``raw``, as an h11 client that sent ``method`` requests reads them."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    responses: list[tuple[h11.Response, bytes]] = []
    while True:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "probe")]))
        conn.send(h11.EndOfMessage())
        response, body = None, b""
        while (event := conn.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        if response is None:
            return responses
        responses.append((response, body))
        if conn.our_state is h11.MUST_CLOSE or not conn.trailing_data[0]:
            return responses
        conn.start_next_cycle()


def header(response: h11.Response, name: bytes) -> bytes | None:
    values = [value for key, value in response.headers if key == name]
    assert len(values) <= 1
    return values[0] if values else None


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = b""
    while data := await stream.receive_some():
        received += data
    return received


async def read_response(
    stream: trio.abc.ReceiveStream, conn: h11.Connection
) -> tuple[h11.Response, bytes]:
    """One response, read with ``conn`` (an h11 client that has sent its request)."""
    response, body = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some()))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, body
        else:
            raise AssertionError(f"unexpected {event!r}")


class HttpClient:
    """An h11 client on one connection: keep-alive requests, one after another."""

    def __init__(self, stream: Client) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def get(
        self, target: str, method: str = "GET", headers: tuple[tuple[str, str], ...] = ()
    ) -> tuple[h11.Response, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        data = self.conn.send(
            h11.Request(method=method, target=target, headers=[("Host", "probe"), *headers])
        )
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await read_response(self.stream, self.conn)


def open_client(
    nursery: trio.Nursery,
    probes: ProbeServer,
    pair: Callable[[], tuple[Client, Client]] = trio.testing.memory_stream_pair,
) -> Client:
    """A client end whose other end ``probes`` serves in ``nursery``."""
    client, server = pair()
    nursery.start_soon(probes.serve_stream, server)
    return client


async def served_until(
    nursery: trio.Nursery, probes: ProbeServer, server: trio.abc.HalfCloseableStream
) -> list[float]:
    """Serve ``server``; the returned list gets the time it ended."""
    ended: list[float] = []

    async def serve() -> None:
        await probes.serve_stream(server)
        ended.append(trio.current_time())

    nursery.start_soon(serve)
    return ended


class StepCounter(trio.abc.Instrument):
    """Counts the steps every task but one takes."""

    def __init__(self, ignore: trio.lowlevel.Task | None) -> None:
        self.ignore = ignore
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self.ignore:
            self.steps += 1


# -- the routes -----------------------------------------------------------------


async def test_livez_and_readyz_follow_the_callables(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """200 ok while a callable is true, 503 while false, 200 again: read on every request."""
    health = Health()
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, health.probes()))
        for target, flag in (("/livez", "live"), ("/readyz", "ready")):
            assert (await client.get(target))[0].status_code == 200
            setattr(health, flag, False)
            response, body = await client.get(target)
            assert response.status_code == 503
            assert body == b"not live\n" if flag == "live" else b"not ready\n"
            setattr(health, flag, True)
            response, body = await client.get(target)
            assert (response.status_code, body) == (200, b"ok\n")
        await client.stream.aclose()


async def test_every_answer_has_its_type_length_and_no_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Content-Type, an exact Content-Length, Cache-Control: no-store, the reason phrase."""
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, Health().probes()))
        for target in ("/livez", "/peers", "/nowhere"):
            response, body = await client.get(target)
            assert header(response, b"content-length") == str(len(body)).encode()
            assert header(response, b"cache-control") == b"no-store"
            assert header(response, b"content-type") in (
                b"text/plain; charset=utf-8",
                b"application/json",
            )
            assert response.reason in (b"OK", b"Not Found")
        await client.stream.aclose()


async def test_peers_is_a_json_array_bounded_by_max_peers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """/peers lists at most max_peers entries; X-Total-Count says how many there were."""
    health = Health()
    health.peers = [{"id": str(n), "rtt": n / 4, "health": None} for n in range(5)]
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, health.probes(max_peers=3)))
        response, body = await client.get("/peers")
        assert header(response, b"content-type") == b"application/json"
        assert json.loads(body) == health.peers[:3]
        assert header(response, b"x-total-count") == b"5"
        health.peers = []
        response, body = await client.get("/peers")
        assert (json.loads(body), header(response, b"x-total-count")) == ([], b"0")
        await client.stream.aclose()


class BuiltOnDemand(Sequence[dict[str, object]]):
    """``size`` peers, each built when it is read; records the run's step count at each build.

    Entries built in one step of the serving task were built with no
    checkpoint in between: the builds grouped by step are the slices.
    """

    def __init__(self, size: int, steps: StepCounter) -> None:
        self.size = size
        self.steps = steps
        self.built: list[int] = []  # the step count at each build

    def __len__(self) -> int:
        return self.size

    def build(self, n: int) -> dict[str, object]:
        self.built.append(self.steps.steps)
        return {"id": str(n), "rtt": n / 8}

    @overload
    def __getitem__(self, index: int) -> dict[str, object]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, object]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, object] | list[dict[str, object]]:
        if isinstance(index, slice):
            return [self.build(n) for n in range(self.size)[index]]
        return self.build(range(self.size)[index])


async def test_a_long_peer_list_is_built_and_encoded_a_slice_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """1000 peers, max_peers 300: built 64 at a time, other tasks running in between.

    Only the 300 listed are ever built (X-Total-Count is len() of the
    sequence); the body is one JSON array of them in order.
    """
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    counter = StepCounter(None)
    peers = BuiltOnDemand(1000, counter)
    tick_at_build: list[int] = []
    real_build = peers.build

    def build(n: int) -> dict[str, object]:
        tick_at_build.append(ticks)
        return real_build(n)

    peers.build = build  # type: ignore[method-assign]
    probes = ProbeServer(
        livez=lambda: True, readyz=lambda: True, peers=lambda: peers, max_peers=300
    )
    trio.lowlevel.add_instrument(counter)
    try:
        async with trio.open_nursery() as nursery:
            client = HttpClient(open_client(nursery, probes))
            nursery.start_soon(ticker)
            response, body = await client.get("/peers")
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert json.loads(body) == [{"id": str(n), "rtt": n / 8} for n in range(300)]
    assert header(response, b"x-total-count") == b"1000"
    assert [len(list(group)) for _, group in itertools.groupby(peers.built)] == [64] * 4 + [44]
    # Trio runs each runnable task once per batch, in random order: across the
    # four checkpoints the ticker ran in the three batches in between at least.
    assert tick_at_build[-1] - tick_at_build[0] >= 3


async def test_a_long_answer_is_written_in_pieces_of_about_64_kb(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """2000 peers, about 230 kB: written 64 kB (and at most one slice more) at a time,
    never joined into one buffer, and the bytes are the whole answer."""
    health = Health()
    health.peers = [{"id": f"{n:0100d}"} for n in range(2000)]
    client, server = trio.testing.memory_stream_pair()
    writes: list[int] = []
    real_send_all = server.send_stream.send_all

    async def recording(data: bytes | bytearray | memoryview) -> None:
        writes.append(len(data))
        await real_send_all(data)

    server.send_stream.send_all = recording  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(health.probes().serve_stream, server)
        await client.send_all(request_bytes("GET", "/peers", "Connection: close"))
        raw = await read_to_eof(client)
    ((_, body),) = parse_responses(raw)
    assert json.loads(body) == health.peers
    slice_bytes = 64 * len('{"id":"%s"},' % ("0" * 100))
    assert len(writes) == 4
    assert all(65536 <= size < 65536 + slice_bytes for size in writes[:-1])
    assert sum(writes) == len(raw)


async def test_peers_stops_at_what_the_sequence_gives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A sequence that yields fewer entries than its len() still makes a valid array."""

    class Shrunk(list[dict[str, object]]):
        def __len__(self) -> int:
            return 200

    health = Health()
    health.peers = Shrunk([{"id": str(n)} for n in range(70)])
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, health.probes()))
        response, body = await client.get("/peers")
        await client.stream.aclose()
    assert json.loads(body) == health.peers
    assert header(response, b"x-total-count") == b"200"


async def test_peers_is_not_found_without_a_peers_callable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No peers callable, no /peers route: 404 for GET and for any other method."""
    probes = ProbeServer(livez=lambda: True, readyz=lambda: True)
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, probes))
        assert (await client.get("/peers"))[0].status_code == 404
        assert (await client.get("/peers", method="POST"))[0].status_code == 404
        await client.stream.aclose()


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "/", 404),
        ("GET", "/livez/", 404),
        ("GET", "/LIVEZ", 404),
        ("GET", "*", 404),
        ("GET", "/livez?verbose=1", 200),
        ("POST", "/nowhere", 404),
        ("POST", "/livez", 405),
        ("PUT", "/readyz", 405),
        ("DELETE", "/peers", 405),
        ("OPTIONS", "/livez", 405),
    ],
)
async def test_unknown_paths_are_404_and_other_methods_405(
    autojump_clock: trio.testing.MockClock, method: str, target: str, status: int
) -> None:
    """The path decides first (404), then the method (405 with Allow); a query is ignored."""
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, Health().probes()))
        response, _ = await client.get(target, method=method)
        assert response.status_code == status
        assert header(response, b"allow") == (b"GET, HEAD" if status == 405 else None)
        await client.stream.aclose()


async def test_head_is_get_without_the_body(autojump_clock: trio.testing.MockClock) -> None:
    """HEAD has GET's status and headers (Content-Length included) and no body bytes at all."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes())
        await client.send_all(request_bytes("HEAD", "/peers") + request_bytes("GET", "/peers"))
        await client.send_eof()
        raw = await read_to_eof(client)
    head_end = raw.index(b"\r\n\r\n") + 4
    ((head, _),) = parse_responses(raw[:head_end], method=b"HEAD")
    ((get, body),) = parse_responses(raw[head_end:])
    assert raw[head_end:].startswith(b"HTTP/1.1 200 OK\r\n")  # nothing between the two
    assert head.status_code == get.status_code == 200
    assert head.headers == get.headers
    assert header(head, b"content-length") == str(len(body)).encode() != b"0"


async def test_a_callable_that_raises_is_500_logged_and_the_server_serves_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Each callable's failure is a 500 with the traceback logged; the next request is answered."""
    failing = {"live": False, "ready": False, "peers": False}

    def check(name: str) -> bool:
        if failing[name]:
            raise RuntimeError(f"{name} broke")
        return True

    def peers() -> list[dict[str, object]]:
        check("peers")
        return [{"rtt": math.nan}] if failing["ready"] else []

    probes = ProbeServer(livez=lambda: check("live"), readyz=lambda: check("ready"), peers=peers)
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, probes))
        for name, target in (("live", "/livez"), ("ready", "/readyz"), ("peers", "/peers")):
            failing[name] = True
            with caplog.at_level(logging.ERROR, logger="trio_heartbeat.probes"):
                response, body = await client.get(target)
            assert (response.status_code, body) == (500, b"probe failed\n")
            record = caplog.records[-1]
            assert record.name == "trio_heartbeat.probes"
            assert record.exc_info is not None
            assert target in record.getMessage()
            failing[name] = False
            assert (await client.get(target))[0].status_code == 200
        # A peer list that is not valid JSON (NaN) is a failure too, not a bad document.
        failing["ready"] = True
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="trio_heartbeat.probes"):
            assert (await client.get("/peers"))[0].status_code == 500
        assert isinstance(caplog.records[-1].exc_info[1], ValueError)  # type: ignore[index]
        await client.stream.aclose()
    assert probes.statistics().responses == {500: 4, 200: 3}


# -- malformed and oversized requests ---------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"\x00\x01garbage\xff\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /livez HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /livez HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
)
async def test_a_malformed_request_is_refused_and_closed(
    autojump_clock: trio.testing.MockClock, raw: bytes, status: int
) -> None:
    """400 (501 for an unknown transfer coding) with Connection: close, then EOF at once."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes())
        await client.send_all(raw)
        received = await read_to_eof(client)
        assert trio.current_time() == 0
    ((response, _),) = parse_responses(received)
    assert response.status_code == status
    assert header(response, b"connection") == b"close"


async def test_a_request_cut_short_by_eof_is_400(autojump_clock: trio.testing.MockClock) -> None:
    """A client that half-closes in the middle of its head still reads why."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes())
        await client.send_all(b"GET /livez HTTP/1.1\r\nHo")
        await client.send_eof()
        ((response, _),) = parse_responses(await read_to_eof(client))
    assert response.status_code == 400


async def test_a_head_of_exactly_max_request_bytes_is_served_and_one_more_is_431(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The bound is exact: a 512-byte head is answered, a 513-byte one refused 431 and closed."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(max_request_bytes=512))
        await client.send_all(padded_request(512))
        (response, _) = await read_response(client, sent_get())
        assert response.status_code == 200
        await client.send_all(padded_request(513))
        ((response, _),) = parse_responses(await read_to_eof(client))
        assert response.status_code == 431
        assert header(response, b"connection") == b"close"


def sent_get() -> h11.Connection:
    """An h11 client that has sent a GET, ready to read its response."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "probe")]))
    conn.send(h11.EndOfMessage())
    return conn


async def test_a_huge_head_is_431_and_the_linger_drops_a_bounded_amount(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """200 kB of header: 431, and the lingering close stops reading after 64 kB and closes."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        ended = await served_until(nursery, Health().probes(), server)
        await client.send_all(b"GET /livez HTTP/1.1\r\nX-Big: " + b"b" * 200_000)
        ((response, _),) = parse_responses(await read_to_eof(client))
    assert response.status_code == 431
    assert ended == [0.0]


@pytest.mark.parametrize(
    "body_headers",
    [
        ("Content-Length: 100000",),  # declared: refused before the body is sent
        ("Transfer-Encoding: chunked",),
    ],
)
async def test_a_body_over_the_bound_is_413(
    autojump_clock: trio.testing.MockClock, body_headers: tuple[str, ...]
) -> None:
    """A declared length over the bound is refused at once; a chunked body once it passes it."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(max_request_bytes=1024))
        await client.send_all(request_bytes("POST", "/livez", *body_headers))
        if "chunked" in body_headers[0]:
            for _ in range(5):
                await client.send_all(b"100\r\n" + b"c" * 0x100 + b"\r\n")
        ((response, _),) = parse_responses(await read_to_eof(client))
        assert trio.current_time() == 0
    assert response.status_code == 413


async def test_a_small_body_is_read_and_dropped_and_the_connection_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A GET with a body inside the bound is answered, and the next request on it too."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes())
        await client.send_all(request_bytes("GET", "/livez", "Content-Length: 5") + b"hello")
        await client.send_all(request_bytes("GET", "/readyz"))
        await client.send_eof()
        responses = parse_responses(await read_to_eof(client))
    assert [(r.status_code, body) for r, body in responses] == [(200, b"ok\n"), (200, b"ok\n")]


# -- time -----------------------------------------------------------------------


async def test_half_a_request_gets_408_at_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The 408 comes exactly request_timeout after the server started waiting, then EOF."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(request_timeout=5.0))
        await client.send_all(b"GET /livez HTTP/1.1\r\nHo")
        raw = await read_to_eof(client)
        assert trio.current_time() == 5.0
    ((response, _),) = parse_responses(raw)
    assert response.status_code == 408
    assert header(response, b"connection") == b"close"


async def test_a_request_a_byte_at_a_time_is_served_within_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Bytes trickling in are fine while the whole request arrives in time."""
    raw = request_bytes()
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(request_timeout=5.0))
        for byte in raw:
            await client.send_all(bytes([byte]))
            await trio.sleep(4.0 / len(raw))
        (response, _) = await read_response(client, sent_get())
        assert response.status_code == 200
        await client.aclose()


async def test_a_trickle_does_not_extend_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A byte every 0.25 s never leaves the connection idle for long, and still gets 408 at 5 s."""
    raw = request_bytes()
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(request_timeout=5.0))

        async def trickle() -> None:
            for byte in raw:
                await client.send_all(bytes([byte]))
                await trio.sleep(0.25)

        nursery.start_soon(trickle)
        received = await read_to_eof(client)
        assert trio.current_time() == 5.0
        nursery.cancel_scope.cancel()
    assert parse_responses(received)[0][0].status_code == 408


async def test_a_client_that_sends_nothing_is_closed_quietly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No bytes of a request by request_timeout: EOF, no 408."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(request_timeout=2.5))
        assert await read_to_eof(client) == b""
        assert trio.current_time() == 2.5


async def test_each_request_has_its_own_deadline(autojump_clock: trio.testing.MockClock) -> None:
    """An idle keep-alive connection is closed request_timeout after the last answer."""
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, Health().probes(request_timeout=5.0)))
        await trio.sleep(3.0)
        assert (await client.get("/livez"))[0].status_code == 200
        assert await read_to_eof(client.stream) == b""
        assert trio.current_time() == 8.0


async def test_a_client_that_does_not_read_is_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Over a lockstep stream, an answer no one reads frees the slot at request_timeout."""
    probes = Health().probes(request_timeout=5.0, max_connections=1)
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        ended = await served_until(nursery, probes, server)
        await client.send_all(request_bytes())
        await trio.sleep(60)
        assert ended == [5.0]
        assert probes.statistics().active == 0


async def test_a_lingering_close_waits_a_second_at_most(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After a refusal the server reads until the client's EOF, but no more than a second."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        ended = await served_until(nursery, Health().probes(), server)
        await client.send_all(b"garbage\r\n\r\n")
        (response, _) = await read_response(client, sent_get())
        assert response.status_code == 400
        assert await client.receive_some() == b""  # our EOF comes at once
        await trio.sleep(10)
    assert ended == [1.0]


# -- keep-alive -----------------------------------------------------------------


async def test_keep_alive_serves_two_requests_on_one_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two requests, one connection, both answered; the client's EOF ends it."""
    probes = Health().probes()
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, probes))
        assert (await client.get("/livez"))[0].status_code == 200
        assert (await client.get("/readyz"))[0].status_code == 200
        assert probes.statistics().active == 1
        await client.stream.send_eof()
        assert await read_to_eof(client.stream) == b""
    assert probes.statistics() == ProbeStatistics(active=0, refused=0, responses={200: 2})


async def test_pipelined_requests_are_answered_in_order_each_within_its_own_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three requests in one write, together over max_request_bytes: each is its own request."""
    requests = padded_request(300) + request_bytes("GET", "/nowhere") + padded_request(300)
    assert len(requests) > 512
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(max_request_bytes=300))
        await client.send_all(requests)
        await client.send_eof()
        responses = parse_responses(await read_to_eof(client))
    assert [r.status_code for r, _ in responses] == [200, 404, 200]


async def test_a_pipelined_request_counts_the_bytes_already_read_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Bytes of the next request read along with this one count against the next one's bound."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(max_request_bytes=300))
        await client.send_all(request_bytes() + padded_request(301))
        responses = parse_responses(await read_to_eof(client))
    assert [r.status_code for r, _ in responses] == [200, 431]


async def test_a_connection_serves_at_most_max_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The last allowed answer says Connection: close, and the server closes."""
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, Health().probes(max_requests_per_connection=3)))
        answers = [await client.get("/livez") for _ in range(3)]
        assert await read_to_eof(client.stream) == b""
        assert trio.current_time() == 0
    assert [header(r, b"connection") for r, _ in answers] == [None, None, b"close"]


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /livez HTTP/1.0\r\n\r\n",
        request_bytes("GET", "/livez", "Connection: close"),
    ],
)
async def test_a_client_that_asks_to_close_is_closed(
    autojump_clock: trio.testing.MockClock, raw: bytes
) -> None:
    """HTTP/1.0, or Connection: close: the answer says close and EOF follows at once."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes())
        await client.send_all(raw)
        ((response, body),) = parse_responses(await read_to_eof(client))
        assert trio.current_time() == 0
    assert (response.status_code, body) == (200, b"ok\n")
    assert header(response, b"connection") == b"close"


async def test_a_client_gone_mid_exchange_frees_its_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A broken stream (a reset) ends the connection quietly and the count goes back down."""

    probes = Health().probes(max_connections=1)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        ended = await served_until(nursery, probes, server)
        await client.send_all(request_bytes())
        # Gone before the answer: the server's send finds the stream broken.
        await trio.aclose_forcefully(client)
        await trio.testing.wait_all_tasks_blocked()
    assert ended == [0.0]
    assert probes.statistics().active == 0


# -- the connection cap -----------------------------------------------------------


def hold_readyz(probes: ProbeServer, monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """/readyz answers 200 only once the event returned is set.

    A connection waiting for it is busy working out its answer (as one on a
    long /peers is), for as long as a test needs: it cannot be evicted.
    """
    release = trio.Event()

    async def held() -> object:
        await release.wait()
        return _probes._OK

    monkeypatch.setitem(probes._routes, b"/readyz", held)
    return release


def busy_client(nursery: trio.Nursery, probes: ProbeServer) -> Client:
    """A client whose GET /readyz (held by :func:`hold_readyz`) keeps its slot busy."""
    client = open_client(nursery, probes)
    nursery.start_soon(client.send_all, request_bytes("GET", "/readyz"))
    return client


async def test_newcomers_evict_answered_connections_first_then_those_never_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Four clients connect at 0, 1, 2, 3; the third is answered at 4, the first at 5 (both
    kept alive). Newcomers that send nothing take the slots of the third and the first
    (answered: in the order of their last answer), then of the second and the fourth (never
    answered: in the order they connected), then of the first newcomer. Each evicted client
    is closed quietly at once, the cap holds, and the last newcomer is served."""
    probes = Health().probes(max_connections=4, request_timeout=30.0)
    async with trio.open_nursery() as nursery:
        clients = []
        for _ in range(4):
            clients.append(open_client(nursery, probes))
            await trio.sleep(1.0)
        for index in (2, 0):
            assert (await HttpClient(clients[index]).get("/livez"))[0].status_code == 200
            await trio.sleep(1.0)
        newcomers: list[Client] = []
        for evicted in (clients[2], clients[0], clients[1], clients[3], None):
            newcomers.append(open_client(nursery, probes))
            assert await read_to_eof(evicted or newcomers[0]) == b""
            assert trio.current_time() == 6.0
            statistics = probes.statistics()
            assert (statistics.active, statistics.refused) == (4, 0)
        assert (await HttpClient(newcomers[-1]).get("/livez"))[0].status_code == 200
        assert probes.statistics().evicted == 5
        nursery.cancel_scope.cancel()


async def test_a_probe_on_its_way_in_outlasts_a_pipelining_client_answered_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """max_connections=2: a client answered once, then a probe whose request is held on its
    way in, then the first client's second answer (so it has waited less than the probe).
    A newcomer takes the answered client's slot, never the probe's: the probe gets 200."""
    probes = Health().probes(max_connections=2)
    probe_client, probe_server = trio.testing.memory_stream_pair()
    held = HeldReceive(probe_server)
    async with trio.open_nursery() as nursery:
        try:
            pipelining = HttpClient(open_client(nursery, probes))
            assert (await pipelining.get("/livez"))[0].status_code == 200
            nursery.start_soon(probes.serve_stream, held)
            await probe_client.send_all(request_bytes("GET", "/livez", "Connection: close"))
            await held.arrived.wait()
            assert (await pipelining.get("/livez"))[0].status_code == 200
            newcomer = HttpClient(open_client(nursery, probes))
            assert (await newcomer.get("/livez"))[0].status_code == 200
            assert await read_to_eof(pipelining.stream) == b""
            held.release.set()
            ((response, body),) = parse_responses(await read_to_eof(probe_client))
            assert (response.status_code, body) == (200, b"ok\n")
            assert trio.current_time() == 0
            assert probes.statistics().evicted == 1
            nursery.cancel_scope.cancel()
        finally:
            held.let_go()  # never left held, even when the server failed


async def test_a_connection_answered_before_goes_first_while_a_later_answer_goes_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """max_connections=2: a client answered once, then a client that connects and sends
    nothing, then the first client's second request, whose answer it does not read. A
    newcomer takes the first client's slot (answered before, it goes first even while a
    later answer is being written, though it waited less), and the idle client is served."""
    probes = Health().probes(max_connections=2)
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probes.serve_stream, server)
        assert (await HttpClient(client).get("/livez"))[0].status_code == 200
        idle = HttpClient(open_client(nursery, probes))
        await trio.testing.wait_all_tasks_blocked()
        await client.send_all(request_bytes())
        await trio.testing.wait_all_tasks_blocked()  # its answer is being written, unread
        newcomer = HttpClient(open_client(nursery, probes))
        assert (await newcomer.get("/livez"))[0].status_code == 200
        assert (await idle.get("/livez"))[0].status_code == 200
        assert probes.statistics().evicted == 1
        await read_to_eof(client)  # closed: the stream ends
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 0


async def test_peer_lists_leave_a_slot_for_livez(autojump_clock: trio.testing.MockClock) -> None:
    """max_connections=4, one client idle and three asking a long /peers at once: two lists are worked out
    together; the third request is answered 503 with Retry-After: 1 before any list is done,
    and its connection stays open (its /livez is answered). A kubelet coming while the two
    are still worked out evicts that answered connection, not the idle one never answered,
    and gets 200, where busy slots refused it. The
    two get the whole list; nothing was refused at the cap."""
    peers = BuiltOnDemand(10_000, StepCounter(None))
    probes = ProbeServer(livez=lambda: True, readyz=lambda: True, peers=lambda: peers)
    answers: list[tuple[int, h11.Response, bytes]] = []
    refused = trio.Event()

    async def ask(client: Client) -> None:
        await client.send_all(request_bytes("GET", "/peers"))
        response, body = await read_response(client, sent_get())
        answers.append((len(peers.built), response, body))
        if response.status_code == 503:
            refused.set()
            assert (await HttpClient(client).get("/livez"))[0].status_code == 200
            assert len(peers.built) < 10_000
            kubelet = open_client(nursery, probes)
            await kubelet.send_all(request_bytes("GET", "/livez", "Connection: close"))
            ((response, _),) = parse_responses(await read_to_eof(kubelet))
            assert response.status_code == 200
            assert len(peers.built) < 10_000  # no list done yet: two slots busy throughout
            assert await read_to_eof(client) == b""  # its slot went to the kubelet

    async with trio.open_nursery() as nursery:
        open_client(nursery, probes)  # idle: the fourth slot is taken, never answered
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):
            nursery.start_soon(ask, open_client(nursery, probes))
        await refused.wait()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    ((built, busy, body), *listed) = answers
    assert built < 10_000  # before any list was done
    assert (busy.status_code, body) == (503, b"too many /peers requests at once\n")
    assert (header(busy, b"retry-after"), header(busy, b"connection")) == (b"1", None)
    assert [(r.status_code, len(json.loads(body))) for _, r, body in listed] == [(200, 10_000)] * 2
    assert len(peers.built) == 20_000
    assert (probes.statistics().refused, probes.statistics().evicted) == (0, 1)
    assert trio.current_time() == 0


async def test_with_one_connection_peers_is_still_worked_out_and_a_newcomer_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """max_connections=1: one /peers is worked out all the same (200, the whole list), and
    a client that comes meanwhile finds the one slot busy: 503, Connection: close."""
    peers = BuiltOnDemand(10_000, StepCounter(None))
    probes = ProbeServer(
        livez=lambda: True, readyz=lambda: True, peers=lambda: peers, max_connections=1
    )
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, probes)
        await client.send_all(request_bytes("GET", "/peers", "Connection: close"))
        for _ in range(20):  # the list is being worked out within a few steps
            if peers.built:
                break
            await trio.lowlevel.checkpoint()
        assert peers.built
        late = open_client(nursery, probes)
        ((response, body),) = parse_responses(await read_to_eof(late))
        assert (response.status_code, body) == (503, b"too many probe connections\n")
        assert header(response, b"connection") == b"close"
        assert len(peers.built) < 10_000
        ((response, body),) = parse_responses(await read_to_eof(client))
    assert (response.status_code, len(json.loads(body))) == (200, 10_000)
    assert probes.statistics().refused == 1


async def test_three_connections_work_out_one_peer_list_at_a_time_and_count_it_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """max_connections=3: max(1, 3 // 2) is one list at a time (not 1.5, not 2). A list
    asked alone is 200; then two asked at once: one gets the whole list, the other 503
    with Retry-After: 1; then one alone is 200 again. So the count of lists worked out
    goes back to exactly 0 after each (neither stuck at 1 nor run below 0)."""
    peers = BuiltOnDemand(1000, StepCounter(None))  # 16 slices: a list spans many steps
    probes = ProbeServer(
        livez=lambda: True, readyz=lambda: True, peers=lambda: peers, max_connections=3
    )

    async def ask(clients: int) -> list[tuple[int, bytes, bytes | None, int]]:
        streams = [open_client(nursery, probes) for _ in range(clients)]
        for stream in streams:  # all sent before the server reads any
            await stream.send_all(request_bytes("GET", "/peers", "Connection: close"))
        answers = []
        for stream in streams:
            ((response, body),) = parse_responses(await read_to_eof(stream))
            entries = len(json.loads(body)) if response.status_code == 200 else -1
            answers.append((response.status_code, body, header(response, b"retry-after"), entries))
            await stream.aclose()  # our EOF ends the server's lingering close
        await trio.testing.wait_all_tasks_blocked()
        assert probes.statistics().active == 0
        return sorted(answers)

    async with trio.open_nursery() as nursery:
        assert await ask(1) == [(200, mock.ANY, None, 1000)]
        assert await ask(2) == [
            (200, mock.ANY, None, 1000),
            (503, b"too many /peers requests at once\n", b"1", -1),
        ]
        assert await ask(1) == [(200, mock.ANY, None, 1000)]
        assert trio.current_time() == 0
        nursery.cancel_scope.cancel()
    assert len(peers.built) == 3000
    assert probes.statistics() == ProbeStatistics(
        active=0, refused=0, responses={200: 3, 503: 1}, evicted=0
    )


@pytest.mark.parametrize("hog", ["idle", "a byte a second", "never reads"])
async def test_idle_and_slow_clients_never_make_livez_fail(
    autojump_clock: trio.testing.MockClock, hog: str
) -> None:
    """max_connections clients that send nothing, or a byte a second, or ask /peers and
    never read, each reconnecting as soon as it is closed: a kubelet's GET /livez every
    half second for 20 s is answered 200 every time, and the cap holds."""
    health = Health()
    health.peers = [{"id": "p" * 1000}] * 200  # more than the lockstep stream takes at once
    probes = health.probes(max_connections=4)
    connections = 0

    async def dribble(client: Client) -> None:
        for byte in request_bytes():
            await client.send_all(bytes([byte]))
            await trio.sleep(1.0)

    async def hogging() -> None:
        nonlocal connections
        while True:
            pair = trio.testing.lockstep_stream_pair if hog == "never reads" else None
            client = open_client(nursery, probes, *(pair,) if pair else ())
            connections += 1
            if hog == "never reads":
                await client.send_all(request_bytes("GET", "/peers"))
                await client.wait_send_all_might_not_block()  # closed: no longer blocks
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await client.send_all(b"x")
                continue
            async with trio.open_nursery() as talking:
                if hog == "a byte a second":
                    talking.start_soon(dribble, client)
                await read_to_eof(client)
                talking.cancel_scope.cancel()

    statuses = []
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(hogging)
        await trio.sleep(0.25)
        while trio.current_time() < 20:
            client = HttpClient(open_client(nursery, probes))
            statuses.append((await client.get("/livez"))[0].status_code)
            assert probes.statistics().active <= 4
            await client.stream.aclose()
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert statuses == [200] * 40
    assert probes.statistics().refused == 0
    assert connections >= 4 + 40  # each probe evicted one and it came back


async def test_over_max_connections_all_busy_a_client_gets_503_at_once(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With both slots busy answering, the third client is answered 503 with Connection:
    close at time 0, never queued; once an answer is sent its slot serves the next client."""
    probes = Health().probes(max_connections=2)
    release = hold_readyz(probes, monkeypatch)
    async with trio.open_nursery() as nursery:
        holders = [busy_client(nursery, probes) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        late = open_client(nursery, probes)
        await late.send_eof()
        ((response, body),) = parse_responses(await read_to_eof(late))
        assert trio.current_time() == 0
        assert (response.status_code, body) == (503, b"too many probe connections\n")
        assert header(response, b"connection") == b"close"
        assert (probes.statistics().refused, probes.statistics().evicted) == (1, 0)
        release.set()
        for holder in holders:
            (response, _) = await read_response(holder, sent_get())
            assert response.status_code == 200
        # Answered, the holders wait for their next request: a newcomer takes a slot.
        client = HttpClient(open_client(nursery, probes))
        assert (await client.get("/livez"))[0].status_code == 200
        assert probes.statistics().evicted == 1
        nursery.cancel_scope.cancel()


async def test_refusals_past_sixteen_are_closed_without_a_word(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixteen refused clients that linger; the seventeenth is closed at once with no bytes."""
    probes = Health().probes(max_connections=1)
    hold_readyz(probes, monkeypatch)
    async with trio.open_nursery() as nursery:
        busy_client(nursery, probes)
        await trio.testing.wait_all_tasks_blocked()
        lingering = [open_client(nursery, probes) for _ in range(16)]
        await trio.testing.wait_all_tasks_blocked()
        silent = open_client(nursery, probes)
        assert await read_to_eof(silent) == b""
        assert trio.current_time() == 0
        for client in lingering:  # each was told why
            ((response, _),) = parse_responses(await read_to_eof(client))
            assert response.status_code == 503
        # Their lingering ends a second later, and a refusal is explained again.
        await trio.sleep(1.0)
        ((response, _),) = parse_responses(await read_to_eof(open_client(nursery, probes)))
        assert response.status_code == 503
        assert probes.statistics().refused == 18
        nursery.cancel_scope.cancel()


async def test_a_refusal_that_cannot_be_sent_is_dropped(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused client that does not read, or is gone, costs a second at most."""
    probes = Health().probes(max_connections=1)
    hold_readyz(probes, monkeypatch)
    async with trio.open_nursery() as nursery:
        busy_client(nursery, probes)
        await trio.testing.wait_all_tasks_blocked()
        client, server = trio.testing.lockstep_stream_pair()
        ended = await served_until(nursery, probes, server)
        gone, gone_server = trio.testing.memory_stream_pair()
        await trio.aclose_forcefully(gone)
        gone_ended = await served_until(nursery, probes, gone_server)
        await trio.sleep(5)
        assert (ended, gone_ended) == ([1.0], [0.0])
        nursery.cancel_scope.cancel()


# -- settings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_connections": 0}, "max_connections"),
        ({"max_requests_per_connection": 0}, "max_requests_per_connection"),
        ({"max_peers": 0}, "max_peers"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"request_timeout": math.inf}, "request_timeout"),
        ({"request_timeout": math.nan}, "request_timeout"),
        ({"max_request_bytes": 255}, "max_request_bytes"),
    ],
)
def test_bad_limits_are_refused(limits: dict[str, float], message: str) -> None:
    """Each limit is checked when the server is made, and the error names it."""
    with pytest.raises(ValueError, match=message):
        Health().probes(**limits)


def test_doctests() -> None:
    """The examples in the module's docstrings run."""
    assert doctest.testmod(_probes).failed == 0


# -- real sockets -----------------------------------------------------------------


async def http_get(host: str, port: int, target: str) -> tuple[h11.Response, bytes]:
    """One GET on a connection of its own."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        return await HttpClient(stream).get(target)


async def test_serve_probes_reports_the_port_it_bound_and_follows_health() -> None:
    """Port 0: started() gives the real address; the endpoints answer over TCP as health flips."""
    health = Health()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                functools.partial(
                    serve_probes,
                    livez=lambda: health.live,
                    readyz=lambda: health.ready,
                    peers=lambda: health.peers,
                )
            )
            assert host == "127.0.0.1"
            assert port > 0
            assert (await http_get(host, port, "/livez"))[0].status_code == 200
            health.live = False
            assert (await http_get(host, port, "/livez"))[0].status_code == 503
            health.live = True
            assert (await http_get(host, port, "/livez"))[0].status_code == 200
            health.ready = False
            assert (await http_get(host, port, "/readyz"))[0].status_code == 503
            assert json.loads((await http_get(host, port, "/peers"))[1]) == health.peers
            nursery.cancel_scope.cancel()


async def test_serve_probes_passes_its_limits_on() -> None:
    """max_request_bytes and request_timeout reach the server it runs."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                functools.partial(
                    serve_probes,
                    livez=lambda: True,
                    readyz=lambda: True,
                    max_request_bytes=512,
                    request_timeout=0.5,
                )
            )
            async with await trio.open_tcp_stream(host, port) as client:
                await client.send_all(padded_request(513))
                ((response, _),) = parse_responses(await read_to_eof(client))
                assert response.status_code == 431
            async with await trio.open_tcp_stream(host, port) as silent:
                start = trio.current_time()
                assert await read_to_eof(silent) == b""
                assert 0.4 < trio.current_time() - start < 5.0
            nursery.cancel_scope.cancel()


async def test_serve_probes_gives_an_idle_slot_to_a_newcomer() -> None:
    """serve_probes(max_connections=1): a second client is served, the idle first one closed."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                functools.partial(
                    serve_probes, livez=lambda: True, readyz=lambda: True, max_connections=1
                )
            )
            async with await trio.open_tcp_stream(host, port) as first:
                assert (await HttpClient(first).get("/livez"))[0].status_code == 200
                async with await trio.open_tcp_stream(host, port) as second:
                    assert (await HttpClient(second).get("/livez"))[0].status_code == 200
                    assert await read_to_eof(first) == b""
            nursery.cancel_scope.cancel()


async def test_garbage_and_an_oversized_head_over_tcp() -> None:
    """Over a real socket too: garbage is 400, a 20 kB head 431, each then closed."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(Health().probes().serve)
            for raw, status in (
                (b"\x16\x03\x01 not http\r\n\r\n", 400),
                (b"GET /livez HTTP/1.1\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", 431),
            ):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(raw)
                    ((response, _),) = parse_responses(await read_to_eof(stream))
                assert response.status_code == status
            nursery.cancel_scope.cancel()


async def test_the_connection_cap_over_tcp() -> None:
    """Four clients held open: a fifth is served at once, the oldest closed, the cap kept."""
    probes = Health().probes(max_connections=4, request_timeout=30.0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(probes.serve)
            held = [HttpClient(await trio.open_tcp_stream(host, port)) for _ in range(4)]
            for client in held:  # answered: each is being served
                assert (await client.get("/livez"))[0].status_code == 200
            start = trio.current_time()
            assert (await http_get(host, port, "/readyz"))[0].status_code == 200
            assert trio.current_time() - start < 5.0  # at once, not after request_timeout
            assert await read_to_eof(held[0].stream) == b""
            assert (await held[1].get("/livez"))[0].status_code == 200
            assert probes.statistics().active <= 4
            for client in held:
                await client.stream.aclose()
            nursery.cancel_scope.cancel()
    assert (probes.statistics().refused, probes.statistics().evicted) == (0, 1)


async def test_serve_listeners_reports_the_first_listeners_address() -> None:
    """Listeners opened by the caller are served as they are, their address reported."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    expected = listeners[0].socket.getsockname()[:2]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(
                functools.partial(Health().probes().serve_listeners, listeners)
            )
            assert address == expected
            assert (await http_get(address[0], address[1], "/livez"))[0].status_code == 200
            nursery.cancel_scope.cancel()


async def test_an_idle_server_costs_the_event_loop_nothing() -> None:
    """While no request comes, with or without an open connection, no task takes a step.

    No busy loop and no polling timer: the listener waits in accept, an idle
    connection in receive under its one deadline.
    """
    probes = Health().probes(request_timeout=30.0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(probes.serve)
            counter = StepCounter(trio.lowlevel.current_task())
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(counter)
            try:
                await trio.sleep(0.3)
                idle_server = counter.steps
                client = HttpClient(await trio.open_tcp_stream(host, port))
                assert (await client.get("/livez"))[0].status_code == 200
                await trio.testing.wait_all_tasks_blocked()
                counter.steps = 0
                await trio.sleep(0.3)
                idle_connection = counter.steps
            finally:
                trio.lowlevel.remove_instrument(counter)
            statistics = trio.lowlevel.current_statistics()
            assert statistics.tasks_runnable == 0
            await client.stream.aclose()
            nursery.cancel_scope.cancel()
    assert (idle_server, idle_connection) == (0, 0)


# -- exact details: the bytes on the wire, the limits, the edges -------------------


async def test_the_bytes_of_an_answer_are_exact(autojump_clock: trio.testing.MockClock) -> None:
    """The status line and headers, names cased as written, in this order, and compact JSON:
    a keep-alive /livez, then /peers asked to close (X-Total-Count, Connection: close)."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes())
        await client.send_all(request_bytes() + request_bytes("GET", "/peers", "Connection: close"))
        raw = await read_to_eof(client)
    assert raw == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 3\r\n"
        b"Cache-Control: no-store\r\n"
        b"\r\n"
        b"ok\n"
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 23\r\n"
        b"Cache-Control: no-store\r\n"
        b"X-Total-Count: 1\r\n"
        b"Connection: close\r\n"
        b"\r\n"
        b'[{"id":"a","rtt":0.5}]\n'
    )


async def test_a_refusal_says_its_reason_phrase_in_the_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Half a request: at the timeout, exactly this 408, its phrase as the body."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(request_timeout=5.0))
        await client.send_all(b"GET /livez HTTP/1.1\r\nHo")
        raw = await read_to_eof(client)
        assert trio.current_time() == 5.0
    assert raw == (
        b"HTTP/1.1 408 Request Timeout\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 16\r\n"
        b"Cache-Control: no-store\r\n"
        b"Connection: close\r\n"
        b"\r\n"
        b"Request Timeout\n"
    )


def test_the_default_limits() -> None:
    """4 connections, 5 s, 8192 bytes, 100 requests a connection, 10,000 peers."""
    probes = ProbeServer(livez=lambda: True, readyz=lambda: True)
    assert (
        probes.max_connections,
        probes.request_timeout,
        probes.max_request_bytes,
        probes.max_requests_per_connection,
        probes.max_peers,
    ) == (4, 5.0, 8192, 100, 10_000)


@pytest.mark.parametrize("name", ["max_connections", "max_requests_per_connection", "max_peers"])
def test_a_count_under_one_is_refused_by_name(name: str) -> None:
    """The exact message names the limit and the value."""
    with pytest.raises(ValueError, match=rf"^{name} must be at least 1, not 0$"):
        Health().probes(**{name: 0})


@pytest.mark.parametrize(
    ("bound", "head"),
    [
        (256, 256),  # the smallest bound, and a head of just that size
        (32768, 30_000),  # over h11's own default of 16 kB
    ],
)
async def test_a_head_up_to_the_request_bound_is_served(
    autojump_clock: trio.testing.MockClock, bound: int, head: int
) -> None:
    """A bound is accepted, and a request head of ``head`` bytes is answered 200 under it."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(max_request_bytes=bound))
        await client.send_all(padded_request(head))
        assert (await read_response(client, sent_get()))[0].status_code == 200
        await client.aclose()


async def test_a_declared_length_at_the_bound_is_not_refused_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only a Content-Length over max_request_bytes is refused before the body comes; one of
    exactly the bound is read, and refused with 413 once the bytes pass it: nothing comes
    back for the second before the body is sent, and the 413 at that moment."""
    async with trio.open_nursery() as nursery:
        client = open_client(nursery, Health().probes(max_request_bytes=1024))
        await client.send_all(request_bytes("POST", "/livez", "Content-Length: 1024"))
        with trio.move_on_after(1.0) as waiting:
            await client.receive_some()
        assert waiting.cancelled_caught
        await client.send_all(b"b" * 1024)
        ((response, _),) = parse_responses(await read_to_eof(client))
        assert trio.current_time() == 1.0
    assert response.status_code == 413


async def test_the_route_is_the_target_up_to_its_first_question_mark(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """/livez?x=1?y=2 is /livez: 200; when livez raises, 500 and exactly this log line."""
    health = Health()
    live = [True]

    def livez() -> bool:
        if not live[0]:
            raise RuntimeError("livez broke")
        return True

    probes = ProbeServer(livez=livez, readyz=lambda: health.ready)
    async with trio.open_nursery() as nursery:
        client = HttpClient(open_client(nursery, probes))
        assert (await client.get("/livez?x=1?y=2"))[0].status_code == 200
        live[0] = False
        with caplog.at_level(logging.ERROR, logger="trio_heartbeat.probes"):
            assert (await client.get("/livez?x=1?y=2"))[0].status_code == 500
        await client.stream.aclose()
    assert [record.getMessage() for record in caplog.records] == ["the probe /livez?x=1?y=2 failed"]


async def test_a_refusal_that_ends_frees_its_place_among_the_sixteen(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixteen refusals linger; one client closes, ending its refusal: of two newcomers
    the first is told why (503), the second is closed without a word, all at time 0."""
    probes = Health().probes(max_connections=1)
    hold_readyz(probes, monkeypatch)
    async with trio.open_nursery() as nursery:
        busy_client(nursery, probes)
        await trio.testing.wait_all_tasks_blocked()
        lingering = [open_client(nursery, probes) for _ in range(16)]
        await trio.testing.wait_all_tasks_blocked()
        ((response, _),) = parse_responses(await read_to_eof(lingering[0]))
        assert response.status_code == 503
        await lingering[0].aclose()
        await trio.testing.wait_all_tasks_blocked()
        told = open_client(nursery, probes)
        await trio.testing.wait_all_tasks_blocked()
        silent = open_client(nursery, probes)
        assert await read_to_eof(silent) == b""
        ((response, _),) = parse_responses(await read_to_eof(told))
        assert response.status_code == 503
        assert trio.current_time() == 0
        assert probes.statistics().refused == 18
        nursery.cancel_scope.cancel()


class HeldReceive(trio.abc.HalfCloseableStream):
    """A stream whose ``receive_some``, once data came, holds it (shielded) until released:
    the connection is evicted while its request is on its way in."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.arrived = trio.Event()
        self.release = trio.Event()

    def let_go(self) -> None:
        """Release whatever is held; a test calls it on its way out, failed or not, so a
        server that failed (its nursery cancelled) never leaves a task held for ever."""
        self.release.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if data:
            self.arrived.set()
            with trio.CancelScope(shield=True):
                await self.release.wait()
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_connection_evicted_while_its_request_comes_in_stops_unanswered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """max_connections=1: the request is read, but a newcomer takes the slot before the
    server turns to it; the evicted connection stops before answering (no bytes, no count)
    and the newcomer is served."""
    probes = Health().probes(max_connections=1)
    victim_client, victim_server = trio.testing.memory_stream_pair()
    held = HeldReceive(victim_server)
    async with trio.open_nursery() as nursery:
        try:
            nursery.start_soon(probes.serve_stream, held)
            await victim_client.send_all(request_bytes())
            await held.arrived.wait()
            newcomer = HttpClient(open_client(nursery, probes))
            await trio.testing.wait_all_tasks_blocked()
            held.release.set()
            assert await read_to_eof(victim_client) == b""
            assert (await newcomer.get("/livez"))[0].status_code == 200
            assert probes.statistics() == ProbeStatistics(
                active=1, refused=0, responses={200: 1}, evicted=1
            )
            await newcomer.stream.aclose()
        finally:
            held.let_go()  # never left held, even when the server failed
    assert trio.current_time() == 0


class HeldSend(HeldReceive):
    """A stream whose ``send_all``, once the data is handed over, holds (shielded) until
    released, as a socket's send yields after the bytes are out: the connection is evicted
    while its answer is on its way out. Its next ``receive_some`` then holds until
    ``resume`` is set, so the connection stays parked where it went on after the send."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        super().__init__(inner)
        self.resume = trio.Event()

    def let_go(self) -> None:
        super().let_go()
        self.resume.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.release.is_set():
            with trio.CancelScope(shield=True):
                await self.resume.wait()
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        self.arrived.set()
        with trio.CancelScope(shield=True):
            await self.release.wait()


async def test_a_connection_evicted_while_its_first_answer_goes_out_is_not_listed_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """max_connections=1: a newcomer evicts the connection whose first answer is being
    handed over; that answer still reaches its client. The evicted connection, parked
    before it ends, is not listed as waiting again: a third client evicts the newcomer,
    and the count stays 1."""
    probes = Health().probes(max_connections=1)
    first_client, first_server = trio.testing.memory_stream_pair()
    held = HeldSend(first_server)
    async with trio.open_nursery() as nursery:
        try:
            nursery.start_soon(probes.serve_stream, held)
            await first_client.send_all(request_bytes())
            await held.arrived.wait()
            newcomer = open_client(nursery, probes)
            await trio.testing.wait_all_tasks_blocked()
            held.release.set()
            await trio.testing.wait_all_tasks_blocked()  # parked in its next receive
            third = HttpClient(open_client(nursery, probes))
            assert (await third.get("/livez"))[0].status_code == 200
            assert await read_to_eof(newcomer) == b""
            held.resume.set()
            ((response, _),) = parse_responses(await read_to_eof(first_client))
            assert response.status_code == 200
            assert probes.statistics() == ProbeStatistics(
                active=1, refused=0, responses={200: 2}, evicted=2
            )
            nursery.cancel_scope.cancel()
        finally:
            held.let_go()  # never left held, even when the server failed
    assert trio.current_time() == 0


def peers_of_sizes(*sizes: int) -> list[dict[str, object]]:
    """Peers in slices of 64 whose encoded pieces are ``sizes`` bytes long (the first
    without the comma that leads each later piece)."""
    peers: list[dict[str, object]] = []
    for index, size in enumerate(sizes):
        # 64 entries {"p":""} are 8 bytes each, with 63 commas between (and one before).
        padding = size - 64 * 8 - 63 - (1 if index else 0)
        assert padding >= 0
        peers.append({"p": "x" * padding})
        peers.extend({"p": ""} for _ in range(63))
    return peers


@pytest.mark.parametrize(
    ("first", "later", "writes"),
    [
        # The head, "[" and the first slice make exactly 64 kB: written as they are;
        # the next two slices make 64 kB less one byte: joined with the last one.
        (65536, (40000, 25535, 600), [65536, 66135, 2]),
        # 64 kB less one byte: not yet written; the next slice brings it over.
        (65535, (600, 600, 600), [66135, 1202]),
    ],
)
async def test_the_answer_is_written_each_time_the_batch_reaches_64_kb(
    autojump_clock: trio.testing.MockClock,
    first: int,
    later: tuple[int, ...],
    writes: list[int],
) -> None:
    """Exact write sizes around the 64 kB mark: a batch is written when it holds 65,536
    bytes or more, counted from 0 again after each write. The head's length is read first
    from a HEAD (Content-Length, and so the head, does not change)."""
    health = Health()
    client, server = trio.testing.memory_stream_pair()
    sizes: list[int] = []
    real_send_all = server.send_stream.send_all

    async def recording(data: bytes | bytearray | memoryview) -> None:
        sizes.append(len(data))
        await real_send_all(data)

    server.send_stream.send_all = recording  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(health.probes().serve_stream, server)
        http = HttpClient(client)
        health.peers = peers_of_sizes(first - 1, *later)
        await http.get("/peers", method="HEAD")
        head_length = sum(sizes)
        # The pieces that fit around the head; its Content-Length keeps its digits.
        health.peers = peers_of_sizes(first - 1 - head_length, *later)
        sizes.clear()
        await http.get("/peers", method="HEAD")
        assert sum(sizes) == head_length
        sizes.clear()
        _, body = await http.get("/peers")
        assert json.loads(body) == health.peers
        await client.aclose()
    assert sizes == writes


async def test_serve_probes_hands_its_defaults_and_limits_to_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server serve_probes makes gets 4 connections, 5 s and 8192 bytes by default,
    and whatever limits it was given; it listens on 127.0.0.1 at a port of the system's
    choosing (port 0: an ephemeral port, never a privileged one)."""
    made: list[ProbeServer] = []
    real = ProbeServer

    def recording(**kwargs: object) -> ProbeServer:
        made.append(real(**kwargs))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(_probes, "ProbeServer", recording)
    with trio.fail_after(10):
        serve = functools.partial(serve_probes, livez=bool, readyz=bool)
        limited = functools.partial(
            serve, max_connections=2, request_timeout=1.5, max_request_bytes=512
        )
        for run, expected in ((serve, (4, 5.0, 8192)), (limited, (2, 1.5, 512))):
            async with trio.open_nursery() as nursery:
                host, port = await nursery.start(run)
                assert (host, port >= 1024) == ("127.0.0.1", True)
                probes = made[-1]
                assert (
                    probes.max_connections,
                    probes.request_timeout,
                    probes.max_request_bytes,
                ) == expected
                nursery.cancel_scope.cancel()


async def test_serve_probes_listens_on_the_host_and_port_it_is_given() -> None:
    """host 127.0.0.2 and a free port named outright are where it listens and answers."""
    with socket.socket() as probe_port:
        probe_port.bind(("127.0.0.2", 0))
        port = probe_port.getsockname()[1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(
                functools.partial(
                    serve_probes,
                    livez=lambda: True,
                    readyz=lambda: True,
                    host="127.0.0.2",
                    port=port,
                )
            )
            assert address == ("127.0.0.2", port)
            assert (await http_get("127.0.0.2", port, "/livez"))[0].status_code == 200
            nursery.cancel_scope.cancel()


async def test_serve_picks_an_ephemeral_port_by_default() -> None:
    """ProbeServer.serve() with no port: port 0, so the system's choice (never 1-1023)."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(Health().probes().serve)
            assert (host, port >= 1024) == ("127.0.0.1", True)
            assert (await http_get(host, port, "/livez"))[0].status_code == 200
            nursery.cancel_scope.cancel()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_serve_on_ipv6_reports_host_and_port() -> None:
    """An IPv6 listener's address (four fields from getsockname) is reported as (host, port)."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(functools.partial(Health().probes().serve, host="::1"))
            assert address[0] == "::1"
            assert len(address) == 2
            assert (await http_get("::1", address[1], "/livez"))[0].status_code == 200
            nursery.cancel_scope.cancel()
