"""THB/1 over TLS and mutual TLS on loopback, with certificates from a throwaway CA.

The TLS handshake runs inside the THB/1 handshake deadline, so every way it
can go wrong (an untrusted certificate, a wrong name, a missing client
certificate, a peer that speaks plain TCP, a server that never answers) ends
in one typed exception within the bound, never in a hang; and a client that
fails its TLS handshake never disturbs the others.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Iterator

import pytest
import trio
import trustme
from helpers import LOOPBACK, assert_echo, serving, wait_empty

from trio_heartbeat import (
    BrokenConnection,
    CloseCode,
    Config,
    ConnectionClosed,
    ConnectionRejected,
    HeartbeatTimeout,
    open_connection,
)

FAST = Config(interval=0.05, timeout=0.3, handshake_timeout=0.5, close_timeout=0.3)
CLIENT_IDENTITY = "client@example.org"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(LOOPBACK, "localhost").configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


def client_context(trusted: trustme.CA, *, cert_from: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    trusted.configure_trust(context)
    if cert_from is not None:
        cert_from.issue_cert(CLIENT_IDENTITY).configure_cert(context)
    return context


def causes(exc: BaseException) -> Iterator[BaseException]:
    current: BaseException | None = exc
    while current is not None:
        yield current
        current = current.__cause__ or current.__context__


async def test_echo_over_tls(ca: trustme.CA) -> None:
    async with (
        serving(config=FAST, ssl_context=server_context(ca)) as server,
        open_connection(LOOPBACK, server.port, config=FAST, ssl_context=client_context(ca)) as conn,
    ):
        await assert_echo(conn, b"secret message" * 1000)
        assert isinstance(conn.stream, trio.SSLStream)
        [accepted] = server.registry.connections()
        assert isinstance(accepted.stream, trio.SSLStream)
        assert accepted.stream.getpeercert() is None  # no client certificate asked for
        [info] = server.registry.snapshot()
        assert info.address is not None
        assert info.address.startswith(f"{LOOPBACK}:")
    await wait_empty(server)
    assert server.statistics().closed_by_code == {CloseCode.NORMAL: 1}


async def test_tls_by_host_name(ca: trustme.CA) -> None:
    async with (
        serving(config=FAST, ssl_context=server_context(ca)) as server,
        open_connection(
            LOOPBACK,
            server.port,
            config=FAST,
            ssl_context=client_context(ca),
            server_hostname="localhost",
        ) as conn,
    ):
        await assert_echo(conn)


async def test_mutual_tls_admits_a_client_with_a_certificate(ca: trustme.CA) -> None:
    context = server_context(ca, require_client_cert=True)
    async with (
        serving(config=FAST, ssl_context=context) as server,
        open_connection(
            LOOPBACK, server.port, config=FAST, ssl_context=client_context(ca, cert_from=ca)
        ) as conn,
    ):
        await assert_echo(conn)
        [accepted] = server.registry.connections()
        assert isinstance(accepted.stream, trio.SSLStream)
        certificate = accepted.stream.getpeercert()
        assert certificate is not None
        assert ("email", CLIENT_IDENTITY) in certificate["subjectAltName"]


@pytest.mark.parametrize("cert_from", ["none", "other CA"])
async def test_mutual_tls_refuses_a_client_without_a_good_certificate(
    ca: trustme.CA, other_ca: trustme.CA, cert_from: str
) -> None:
    server_ssl = server_context(ca, require_client_cert=True)
    good = client_context(ca, cert_from=ca)
    bad = client_context(ca, cert_from=None if cert_from == "none" else other_ca)
    async with (
        serving(config=FAST, ssl_context=server_ssl) as server,
        open_connection(LOOPBACK, server.port, config=FAST, ssl_context=good) as bystander,
    ):
        with trio.fail_after(10), pytest.raises(ConnectionClosed) as info:
            async with open_connection(LOOPBACK, server.port, config=FAST, ssl_context=bad):
                raise AssertionError("a client without a good certificate got in")
        assert isinstance(info.value, BrokenConnection)
        assert info.value.code == CloseCode.ABNORMAL_CLOSURE
        await assert_echo(bystander, b"unharmed")
        with trio.fail_after(10):
            while server.statistics().active != 1:  # noqa: ASYNC110 - nothing signals this
                await trio.sleep(0.001)
        assert len(server.registry) == 1
        assert server.statistics().closed_by_code == {CloseCode.ABNORMAL_CLOSURE: 1}


async def test_a_server_the_client_does_not_trust_is_a_broken_connection(
    ca: trustme.CA, other_ca: trustme.CA
) -> None:
    async with serving(config=FAST, ssl_context=server_context(ca)) as server:
        with trio.fail_after(10), pytest.raises(BrokenConnection) as info:
            async with open_connection(
                LOOPBACK, server.port, config=FAST, ssl_context=client_context(other_ca)
            ):
                raise AssertionError("an untrusted server was accepted")
        assert any(isinstance(exc, ssl.SSLCertVerificationError) for exc in causes(info.value))


async def test_a_wrong_server_name_is_a_broken_connection(ca: trustme.CA) -> None:
    async with serving(config=FAST, ssl_context=server_context(ca)) as server:
        with trio.fail_after(10), pytest.raises(BrokenConnection) as info:
            async with open_connection(
                LOOPBACK,
                server.port,
                config=FAST,
                ssl_context=client_context(ca),
                server_hostname="somebody-else.example",
            ):
                raise AssertionError("a server with another name was accepted")
        assert any(isinstance(exc, ssl.SSLCertVerificationError) for exc in causes(info.value))


async def test_plain_client_to_a_tls_server_times_out_in_the_handshake(ca: trustme.CA) -> None:
    async with serving(config=FAST, ssl_context=server_context(ca)) as server:
        # Each side waits for the other to speak first: only a deadline ends
        # it. The client's comes first here.
        impatient = dataclasses.replace(FAST, handshake_timeout=0.2)
        with trio.fail_after(10), pytest.raises(HeartbeatTimeout) as info:
            async with open_connection(LOOPBACK, server.port, config=impatient):
                raise AssertionError("a plain client got through TLS")
        assert info.value.reason == "handshake timeout"
        await wait_empty(server)
        # The client hung up first, so the server saw the stream end.
        assert server.statistics().closed_by_code == {CloseCode.ABNORMAL_CLOSURE: 1}


async def test_tls_client_to_a_plain_server_fails_fast(ca: trustme.CA) -> None:
    async with serving(config=FAST) as server:
        with trio.fail_after(10), pytest.raises(BrokenConnection):
            async with open_connection(
                LOOPBACK, server.port, config=FAST, ssl_context=client_context(ca)
            ):
                raise AssertionError("TLS to a plain server got through")
        await wait_empty(server)
        # The server read a TLS ClientHello as a frame of unknown type.
        assert server.statistics().closed_by_code == {CloseCode.PROTOCOL_ERROR: 1}


async def test_a_server_that_stalls_the_tls_handshake_is_given_up(ca: trustme.CA) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def accept_and_say_nothing() -> None:
        accepted.append(await listeners[0].accept())
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_and_say_nothing)
        with trio.fail_after(10), pytest.raises(HeartbeatTimeout):
            async with open_connection(LOOPBACK, port, config=FAST, ssl_context=client_context(ca)):
                raise AssertionError("a silent server completed a handshake")
        nursery.cancel_scope.cancel()
    [stream] = accepted
    # What the silent server got: a TLS ClientHello record, then the end of
    # the stream, because the client hung up at its deadline.
    received = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            received += chunk
    assert received[:1] == b"\x16"
    await stream.aclose()
    await listeners[0].aclose()


async def test_a_tls_server_at_capacity_refuses_over_tls(ca: trustme.CA) -> None:
    async with (
        serving(config=FAST, ssl_context=server_context(ca), max_connections=1) as server,
        open_connection(LOOPBACK, server.port, config=FAST, ssl_context=client_context(ca)) as conn,
    ):
        with pytest.raises(ConnectionRejected) as raised:
            async with open_connection(
                LOOPBACK, server.port, config=FAST, ssl_context=client_context(ca)
            ):
                pass  # pragma: no cover - refused before the block
        assert raised.value.code == CloseCode.TRY_AGAIN_LATER
        await assert_echo(conn)  # the admitted client is still served
