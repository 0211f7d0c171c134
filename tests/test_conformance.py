"""THB/1 conformance: raw bytes against ``python -m trio_heartbeat serve``.

Every frame in this module is built and parsed by hand from the THB/1 specification (docs/protocol.md), never
with the library's codec, so that these tests hold the server to the spec
rather than the codec to itself; the first test checks the hand-built frames
against the spec's own vectors (§7). The server runs as a real subprocess,
started through its command line with short timings (interval 0.2 s, timeout
1 s, handshake timeout 1 s). Independent cases share one server and run
concurrently, so the module takes a few seconds of wall time, most of it the
1 s timeouts that the 1011 cases wait out.

Timings are real here: lower bounds come from the protocol (a server never
pings sooner than its send interval, never convicts sooner than its timeout);
upper bounds are generous.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

pytestmark = pytest.mark.slow

# -- the wire, by hand (THB/1 §2, §3, §5, §6) --------------------------------

HELLO, DATA, PING, PONG, CLOSE = 0x01, 0x02, 0x03, 0x04, 0x05
SERVER_ROLE, CLIENT_ROLE = 0, 1
CLIENT_NONCE = bytes(range(0x10, 0x20))
OPAQUE = bytes(range(8))


def frame(
    frame_type: int, payload: bytes = b"", *, flags: int = 0, length: int | None = None
) -> bytes:
    """A 6-byte header (type, flags, big-endian length) and the payload."""
    declared = len(payload) if length is None else length
    return struct.pack(">BBI", frame_type, flags, declared) + payload


def hello_payload(
    *,
    role: int = CLIENT_ROLE,
    status: int = 0,
    interval_ms: int = 1000,
    timeout_ms: int = 3000,
    max_frame: int = 65536,
    nonce: bytes = CLIENT_NONCE,
    instance_id: bytes = b"",
    auth: bytes = b"",
    magic: bytes = b"THB1",
) -> bytes:
    return (
        magic
        + struct.pack(">BBIII", role, status, interval_ms, timeout_ms, max_frame)
        + nonce
        + bytes([len(instance_id)])
        + instance_id
        + bytes([len(auth)])
        + auth
    )


def hello_frame(**fields: Any) -> bytes:
    return frame(HELLO, hello_payload(**fields))


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(CLOSE, struct.pack(">H", code) + reason)


def ping_frame(opaque: bytes = OPAQUE, status: int = 0) -> bytes:
    return frame(PING, opaque + bytes([status]))


def auth_for(key: bytes, server_nonce: bytes, client_nonce: bytes, client_id: bytes) -> bytes:
    """§6: HMAC-SHA256(key, b"THB1-auth" + server_nonce + client_nonce + client_id)."""
    message = b"THB1-auth" + server_nonce + client_nonce + client_id
    return hmac.new(key, message, hashlib.sha256).digest()


@dataclass(frozen=True)
class HelloFields:
    magic: bytes
    role: int
    status: int
    interval_ms: int
    timeout_ms: int
    max_frame: int
    nonce: bytes
    instance_id: bytes
    auth: bytes


def parse_hello(payload: bytes) -> HelloFields:
    """§3, checking that the payload length is exactly ``36 + n + m``."""
    magic, role, status, interval_ms, timeout_ms, max_frame = struct.unpack_from(
        ">4sBBIII", payload
    )
    id_len = payload[34]
    auth_len = payload[35 + id_len]
    assert len(payload) == 36 + id_len + auth_len, payload.hex(" ")
    return HelloFields(
        magic=magic,
        role=role,
        status=status,
        interval_ms=interval_ms,
        timeout_ms=timeout_ms,
        max_frame=max_frame,
        nonce=payload[18:34],
        instance_id=payload[35 : 35 + id_len],
        auth=payload[36 + id_len :],
    )


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    payload: bytes

    @property
    def close_code(self) -> int:
        assert self.type == CLOSE, self
        (code,) = struct.unpack_from(">H", self.payload)
        return int(code)


def test_hand_built_frames_match_the_spec_vectors() -> None:
    """§7, so that the cases below speak the spec and not our reading of it."""
    server_nonce = bytes(range(16))
    assert hello_frame(
        role=SERVER_ROLE,
        interval_ms=1000,
        timeout_ms=3000,
        max_frame=1048576,
        nonce=server_nonce,
    ) == bytes.fromhex(
        "01 00 00 00 00 24 54 48 42 31 00 00 00 00 03 e8 00 00 0b b8 00 10 00 00"
        "00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 00 00"
    )
    client_hello = bytes.fromhex(
        "01 00 00 00 00 4a 54 48 42 31 01 00 00 00 01 f4 00 00 05 dc 00 01 00 00"
        "10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f 06 6e 6f 64 65 2d 31 20"
        "9c 33 6e 76 c7 3b f2 d9 c7 82 17 14 0a 66 b0 c6 1d d1 5c bb c7 a1 26 08"
        "2c 60 30 c2 67 ac 70 52"
    )
    auth = auth_for(b"secret", server_nonce, CLIENT_NONCE, b"node-1")
    assert (
        hello_frame(
            interval_ms=500, timeout_ms=1500, max_frame=65536, instance_id=b"node-1", auth=auth
        )
        == client_hello
    )
    assert parse_hello(client_hello[6:]) == HelloFields(
        b"THB1", CLIENT_ROLE, 0, 500, 1500, 65536, CLIENT_NONCE, b"node-1", auth
    )
    assert ping_frame() == bytes.fromhex("03 00 00 00 00 09 00 01 02 03 04 05 06 07 00")
    assert frame(PONG, OPAQUE + b"\x02") == bytes.fromhex(
        "04 00 00 00 00 09 00 01 02 03 04 05 06 07 02"
    )
    assert frame(DATA, b"hi") == bytes.fromhex("02 00 00 00 00 02 68 69")
    assert close_frame(1011, b"heartbeat timeout") == bytes.fromhex(
        "05 00 00 00 00 13 03 f3 68 65 61 72 74 62 65 61 74 20 74 69 6d 65 6f 75 74"
    )


# -- a raw peer ----------------------------------------------------------------------

#: Bound on any one step that the server should answer at once.
STEP = 3.0


class RawClient:
    """A THB/1 client made of bytes: it does exactly what a case tells it to."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        host, port = stream.socket.getsockname()[:2]
        #: How the server names us in its log.
        self.address = f"{host}:{port}"

    async def send(self, *chunks: bytes) -> None:
        await self.stream.send_all(b"".join(chunks))

    async def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                data = b""  # a reset after the server's last frame ends the stream too
            if not data:
                return False
            self._buffer += data
        return True

    async def read_frame(self) -> Frame | None:
        """The next frame as it is, or ``None`` at a clean end of the stream."""
        if not await self._fill(6):
            assert not self._buffer, f"stream ended inside a header: {bytes(self._buffer)!r}"
            return None
        frame_type, flags, length = struct.unpack_from(">BBI", self._buffer)
        assert await self._fill(6 + length), "stream ended inside a payload"
        payload = bytes(self._buffer[6 : 6 + length])
        del self._buffer[: 6 + length]
        return Frame(frame_type, flags, payload)

    async def next_frame(self, *, answer_pings: bool = True) -> Frame:
        """The next frame that is not a heartbeat; PINGs are answered unless told not to."""
        while True:
            got = await self.read_frame()
            assert got is not None, "the server closed the stream"
            assert got.flags == 0, got
            if got.type == PING:
                assert len(got.payload) == 9, got
                if answer_pings:
                    await self.send(frame(PONG, got.payload[:8] + b"\x00"))
                continue
            if got.type != PONG:
                return got

    async def handshake(self, **fields: Any) -> HelloFields:
        """Read the server's HELLO, answer with ours; the server is OPEN once it reads it."""
        first = await self.read_frame()
        assert first is not None
        assert first.type == HELLO, first
        server = parse_hello(first.payload)
        await self.send(hello_frame(**fields))
        return server

    async def echo(self, payload: bytes) -> None:
        await self.send(frame(DATA, payload))
        assert await self.next_frame() == Frame(DATA, 0, payload)

    async def expect_close(self, code: int, *, answer_pings: bool = True) -> str:
        got = await self.next_frame(answer_pings=answer_pings)
        assert got.type == CLOSE, got
        assert 2 <= len(got.payload) <= 125
        assert got.close_code == code, (got.close_code, got.payload[2:])
        return got.payload[2:].decode("utf-8")

    async def expect_end(self) -> None:
        """The server sends nothing after its CLOSE, and closes the stream."""
        assert await self.read_frame() is None


@asynccontextmanager
async def raw_client(server: ServeProcess) -> AsyncIterator[RawClient]:
    stream = await trio.open_tcp_stream(server.host, server.port)
    try:
        yield RawClient(stream)
    finally:
        await trio.aclose_forcefully(stream)


# -- the server under test -------------------------------------------------------------

SERVE = [
    sys.executable,
    "-m",
    "trio_heartbeat",
    "serve",
    "--port",
    "0",
    "--interval",
    "0.2",
    "--timeout",
    "1",
    "--handshake-timeout",
    "1",
]
#: Bound on starting the interpreter and reading ``listening on``.
STARTUP = 10.0
_serial = itertools.count()


@dataclass
class ServeProcess:
    process: trio.Process
    stdout: trio.abc.ReceiveStream
    host: str
    port: int
    stderr_path: Path
    #: Whatever came on stdout after the ``listening on`` line.
    stdout_rest: bytes

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def terminate(self) -> int:
        """SIGTERM, then the exit status; the process must exit by itself, promptly."""
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP + 2):
            return await self.process.wait()

    async def read_stdout_to_end(self) -> bytes:
        with trio.fail_after(STEP):
            while chunk := await self.stdout.receive_some():
                self.stdout_rest += chunk
        return self.stdout_rest


@asynccontextmanager
async def running_serve(tmp_path: Path, *options: str) -> AsyncIterator[ServeProcess]:
    """Start ``serve`` on a free loopback port; always killed on the way out."""
    stderr_path = tmp_path / f"serve-{next(_serial)}.stderr"
    with stderr_path.open("wb") as stderr_file:
        process = await trio.lowlevel.open_process(
            [*SERVE, *options], stdout=subprocess.PIPE, stderr=stderr_file
        )
    try:
        assert process.stdout is not None
        received = b""
        with trio.fail_after(STARTUP):
            while b"\n" not in received:
                chunk = await process.stdout.receive_some()
                assert chunk, f"serve exited before listening:\n{stderr_path.read_text()}"
                received += chunk
        line, _, rest = received.partition(b"\n")
        match = re.fullmatch(rb"listening on (127\.0\.0\.1):(\d+)", line)
        assert match is not None, line
        yield ServeProcess(
            process,
            process.stdout,
            match[1].decode(),
            int(match[2]),
            stderr_path,
            rest,
        )
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def run_cases(*cases: Callable[[], Awaitable[None]]) -> None:
    """Run independent cases concurrently, each bounded by ``STEP`` seconds."""

    async def bounded(case: Callable[[], Awaitable[None]]) -> None:
        with trio.fail_after(STEP):
            await case()

    async with trio.open_nursery() as nursery:
        for case in cases:
            nursery.start_soon(bounded, case)


def lines_about(log: str, address: str) -> list[str]:
    """The log lines that name ``address`` (and not a longer port that starts the same)."""
    pattern = re.compile(re.escape(address) + r"(?!\d)")
    return [line for line in log.splitlines() if pattern.search(line)]


def mentions_code(line: str, code: int) -> bool:
    return re.search(rf"(close|code|ended with) {code}\b", line) is not None


# -- an OPEN connection -------------------------------------------------------------------


async def test_open_connection_behaves_as_the_spec_says(tmp_path: Path) -> None:
    async with running_serve(tmp_path, "--id", "conformance-server") as server:
        nonces: list[bytes] = []
        closers: list[tuple[str, int]] = []

        async def server_hello_comes_first_and_decodes() -> None:
            async with raw_client(server) as client:
                # We have sent nothing: the acceptor speaks first.
                first = await client.read_frame()
                assert first is not None
                assert (first.type, first.flags) == (HELLO, 0)
                hello = parse_hello(first.payload)
                assert hello.magic == b"THB1"
                assert hello.role == SERVER_ROLE
                assert hello.status == 0
                assert (hello.interval_ms, hello.timeout_ms) == (200, 1000)
                assert hello.max_frame >= 1024
                assert len(hello.nonce) == 16
                assert hello.instance_id == b"conformance-server"
                assert hello.auth == b""
                nonces.append(hello.nonce)

        async def data_echoes_back_unchanged() -> None:
            async with raw_client(server) as client:
                server_hello = await client.handshake()
                await client.send(bytes.fromhex("02 00 00 00 00 02 68 69"))  # §7: DATA "hi"
                assert await client.next_frame() == Frame(DATA, 0, b"hi")
                await client.echo(b"")
                # Bigger than the 512-byte limit of the handshake, within max_frame.
                await client.echo(os.urandom(min(server_hello.max_frame, 60000)))
                batch = [b"one", b"two", b"three"]
                await client.send(*(frame(DATA, message) for message in batch))
                for message in batch:
                    assert await client.next_frame() == Frame(DATA, 0, message)

        async def ping_is_answered_with_the_same_opaque_bytes() -> None:
            async with raw_client(server) as client:
                await client.handshake()
                await client.send(bytes.fromhex("03 00 00 00 00 09 00 01 02 03 04 05 06 07 00"))
                while True:
                    got = await client.read_frame()
                    assert got is not None
                    if got.type == PONG:
                        break
                    assert got.type == PING, got  # the server's own heartbeats may come first
                assert frame(got.type, got.payload) == bytes.fromhex(
                    "04 00 00 00 00 09 00 01 02 03 04 05 06 07 00"
                )

        async def server_pings_fill_silence(timeout_ms: int, send_interval: float) -> None:
            async with raw_client(server) as client:
                await client.handshake(interval_ms=1000, timeout_ms=timeout_ms)
                arrivals: list[float] = []
                while len(arrivals) < 6:
                    got = await client.read_frame()
                    assert got is not None
                    assert got.type == PING, got  # idle: heartbeats only, no DATA
                    assert len(got.payload) == 9
                    assert got.payload[8] == 0  # SERVING
                    arrivals.append(trio.current_time())
                    await client.send(frame(PONG, got.payload[:8] + b"\x00"))
                gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
                # Never sooner than the send interval (give or take loopback jitter),
                # and not much later either: one PING per interval, not one per timeout.
                assert 0.85 * send_interval <= statistics.median(gaps) <= 1.6 * send_interval, gaps

        async def client_close_is_answered_with_the_same_code() -> None:
            for code, reason in ((1000, b""), (1000, b"bye"), (4321, b"application code")):
                async with raw_client(server) as client:
                    await client.handshake()
                    await client.echo(b"still open")
                    await client.send(close_frame(code, reason))
                    await client.expect_close(code)
                    await client.expect_end()
                    closers.append((client.address, code))

        async def same_id_replaces_the_older_connection() -> None:
            async with raw_client(server) as older, raw_client(server) as newer:
                await older.handshake(instance_id=b"twin")
                await older.echo(b"registered")
                await newer.handshake(instance_id=b"twin")
                await older.expect_close(4000)
                await older.send(close_frame(4000))
                await older.expect_end()
                await newer.echo(b"the newer one lives on")
                await newer.send(close_frame(1000))
                await newer.expect_close(1000)

        await run_cases(
            server_hello_comes_first_and_decodes,
            server_hello_comes_first_and_decodes,
            data_echoes_back_unchanged,
            ping_is_answered_with_the_same_opaque_bytes,
            # min(server interval 200 ms, client timeout / 2)
            partial(server_pings_fill_silence, 10_000, 0.2),
            partial(server_pings_fill_silence, 300, 0.15),
            client_close_is_answered_with_the_same_code,
            same_id_replaces_the_older_connection,
        )
        assert len(nonces) == 2
        assert nonces[0] != nonces[1]  # fresh for every connection

        assert await server.terminate() == 0
        log = server.stderr()
        assert log.count("connected, id 'twin'") == 2
        assert log.count("id 'twin' taken over by") == 1
        for address, code in closers:
            assert any(mentions_code(line, code) for line in lines_about(log, address)), address


# -- every close code a protocol violation earns --------------------------------------------


async def test_violations_close_with_the_code_the_spec_names(tmp_path: Path) -> None:
    async with running_serve(tmp_path) as server:
        offenders: dict[str, int] = {}

        def before_hello(data: bytes, code: int) -> Callable[[], Awaitable[None]]:
            async def case() -> None:
                async with raw_client(server) as client:
                    first = await client.read_frame()
                    assert first is not None
                    assert first.type == HELLO
                    await client.send(data)
                    await client.expect_close(code)
                    await client.expect_end()
                    offenders[client.address] = code

            return case

        def when_open(
            data: Callable[[HelloFields], bytes], code: int
        ) -> Callable[[], Awaitable[None]]:
            async def case() -> None:
                async with raw_client(server) as client:
                    server_hello = await client.handshake()
                    await client.echo(b"open")
                    await client.send(data(server_hello))
                    await client.expect_close(code)
                    await client.expect_end()
                    offenders[client.address] = code

            return case

        async def silent_after_hello() -> None:
            async with raw_client(server) as client:
                await client.handshake(interval_ms=1000, timeout_ms=3000)
                said_hello = trio.current_time()
                pings = 0
                while True:
                    got = await client.read_frame()
                    assert got is not None
                    if got.type != PING:
                        break
                    pings += 1  # heard, never answered
                assert got.close_code == 1011, got
                silent_for = trio.current_time() - said_hello
                await client.expect_end()
                assert pings >= 2
                # The server's timeout is 1 s; it must not give up sooner.
                assert 0.95 <= silent_for <= 2.5, silent_for
                offenders[client.address] = 1011

        async def no_hello_within_the_handshake_timeout() -> None:
            async with raw_client(server) as client:
                connected = trio.current_time()
                first = await client.read_frame()
                assert first is not None
                assert first.type == HELLO
                await client.expect_close(1011)
                waited = trio.current_time() - connected
                await client.expect_end()
                assert 0.9 <= waited <= 2.5, waited
                offenders[client.address] = 1011

        await run_cases(
            # 1002: malformed or out of order, before the handshake...
            before_hello(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", 1002),
            before_hello(frame(HELLO, hello_payload(), flags=0x80), 1002),
            before_hello(frame(DATA, b"hi"), 1002),
            before_hello(ping_frame(), 1002),
            before_hello(hello_frame(magic=b"THB2"), 1002),
            before_hello(hello_frame(role=SERVER_ROLE), 1002),
            before_hello(hello_frame(status=3), 1002),
            before_hello(hello_frame(max_frame=1023), 1002),
            before_hello(hello_frame(auth=b"\x00" * 16), 1002),
            before_hello(hello_frame(instance_id=b"\xff\xfe"), 1002),
            before_hello(frame(HELLO, hello_payload() + b"\x00"), 1002),
            # ...and once OPEN.
            when_open(lambda _: frame(DATA, b"x", flags=0x01), 1002),
            when_open(lambda _: frame(0x06, b""), 1002),
            when_open(lambda _: hello_frame(), 1002),
            when_open(lambda _: frame(PING, OPAQUE), 1002),
            when_open(lambda _: frame(PONG, OPAQUE + b"\x07"), 1002),
            when_open(lambda _: frame(CLOSE, b"\x03"), 1002),
            when_open(lambda _: close_frame(1000, b"\xc3\x28"), 1002),
            # 1009: judged from the header alone; no payload ever follows.
            before_hello(frame(HELLO, length=513), 1009),
            when_open(lambda hello: frame(DATA, length=hello.max_frame + 1), 1009),
            when_open(lambda _: frame(DATA, length=0xFFFFFFFF), 1009),
            # 1008: HELLO values out of range, and too many PINGs (third strike).
            before_hello(hello_frame(timeout_ms=5), 1008),
            before_hello(hello_frame(interval_ms=1), 1008),
            when_open(lambda _: b"".join(ping_frame(bytes([n]) * 8) for n in range(5)), 1008),
            # 1011: silence after HELLO, and no HELLO at all.
            silent_after_hello,
            no_hello_within_the_handshake_timeout,
        )

        assert await server.terminate() == 0
        log = server.stderr()
        for address, code in offenders.items():
            about = lines_about(log, address)
            assert about, f"nothing logged about {address}"
            assert any(mentions_code(line, code) for line in about), about
        assert "heartbeat timeout" in log
        assert "handshake timeout" in log


# -- authentication and capacity --------------------------------------------------------------

KEY = b"conformance-key"


@asynccontextmanager
async def first_free_slot(server: ServeProcess) -> AsyncIterator[tuple[RawClient, Frame]]:
    """A connection that got HELLO, not 1013.

    With ``--max-connections 1`` the server frees the slot of a connection
    just after closing its stream, so the next client may, for a moment,
    still be refused: that refusal is correct, and we try again.
    """
    while True:
        async with raw_client(server) as client:
            first = await client.read_frame()
            assert first is not None
            if first.type == HELLO:
                yield client, first
                return
            assert first.close_code == 1013, first
        await trio.sleep(0.05)


async def test_secret_file_and_max_connections(tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_bytes(KEY + b"\n")  # surrounding whitespace is not part of the key
    async with running_serve(
        tmp_path, "--secret-file", str(secret_file), "--max-connections", "1", "--id", "gate"
    ) as server:
        # A client that cannot authenticate gives up on 1008 and says so.
        with trio.fail_after(STEP + STARTUP):
            result = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "trio_heartbeat",
                    "connect",
                    "--linger",
                    "5",
                    server.endpoint,
                ],
                stdin=b"",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 1, result.stderr
        assert b"giving up: not reconnecting after close code 1008" in result.stderr
        assert result.stdout == b""

        def wrong_auth(server_nonce: bytes) -> list[bytes]:
            return [
                b"",
                os.urandom(32),
                auth_for(KEY, server_nonce, CLIENT_NONCE, b"someone-else"),
                auth_for(KEY + b"\n", server_nonce, CLIENT_NONCE, b"me"),
                auth_for(KEY, CLIENT_NONCE, server_nonce, b"me"),  # nonces swapped
            ]

        with trio.fail_after(STEP * 3):
            for attempt in range(len(wrong_auth(b""))):
                async with first_free_slot(server) as (client, first):
                    nonce = parse_hello(first.payload).nonce
                    auth = wrong_auth(nonce)[attempt]
                    await client.send(hello_frame(instance_id=b"me", auth=auth))
                    await client.expect_close(1008)
                    await client.expect_end()

            async with first_free_slot(server) as (holder, first):
                hello = parse_hello(first.payload)
                assert hello.instance_id == b"gate"
                auth = auth_for(KEY, hello.nonce, CLIENT_NONCE, b"me")
                await holder.send(hello_frame(instance_id=b"me", auth=auth))
                await holder.echo(b"authenticated")
                # The one slot is taken: a newcomer gets CLOSE 1013 instead of HELLO.
                async with raw_client(server) as refused:
                    got = await refused.read_frame()
                    assert got is not None
                    assert got.close_code == 1013, got
                    await refused.expect_end()
                await holder.send(close_frame(1000))
                await holder.expect_close(1000)
                await holder.expect_end()

            async with first_free_slot(server) as (client, first):
                nonce = parse_hello(first.payload).nonce
                await client.send(hello_frame(auth=auth_for(KEY, nonce, CLIENT_NONCE, b"")))
                await client.echo(b"the slot is free again")

        assert await server.terminate() == 0
        log = server.stderr()
        assert "ended with 1008 (client authentication failed)" in log
        assert f"{refused.address}: refused with 1013" in log


# -- shutting down ------------------------------------------------------------------------------


async def test_sigterm_sends_1001_to_every_client_and_exits_0(tmp_path: Path) -> None:
    async with running_serve(tmp_path) as server:
        async with (
            raw_client(server) as one,
            raw_client(server) as two,
            raw_client(server) as three,
        ):
            clients = [one, two, three]
            with trio.fail_after(STEP):
                for index, client in enumerate(clients):
                    await client.handshake(instance_id=f"client-{index}".encode())
                    await client.echo(b"open")

            server.process.send_signal(signal.SIGTERM)

            async def goes_away(client: RawClient) -> None:
                await client.expect_close(1001)
                await client.send(close_frame(1001))
                await client.expect_end()

            await run_cases(*(partial(goes_away, client) for client in clients))
            with trio.fail_after(STEP):
                assert await server.process.wait() == 0
        assert await server.read_stdout_to_end() == b""
        log = server.stderr()
        assert "SIGTERM: draining 3 connection(s)" in log
        assert "stopped: 3 served, 0 refused" in log


# -- the client command -------------------------------------------------------------------------


async def test_connect_sends_stdin_lines_and_prints_the_echoes(tmp_path: Path) -> None:
    async with running_serve(tmp_path) as server:
        with trio.fail_after(STEP + STARTUP):
            result = await trio.run_process(
                [sys.executable, "-m", "trio_heartbeat", "connect", server.endpoint],
                stdin=b"first line\nsecond line\n",
                capture_stdout=True,
                capture_stderr=True,
            )
        assert result.returncode == 0
        assert result.stdout == b"first line\nsecond line\n"
        assert f"connected to {server.endpoint}".encode() in result.stderr
        assert await server.terminate() == 0
        log = server.stderr()
        assert log.count(": connected\n") == 1
        assert "ended with 1000" in log
