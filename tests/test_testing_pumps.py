"""The pumps between a wire and a real stream (``testing/_pumps.py``).

Two pump tasks connect one real stream to a wire: EOF is passed on as EOF,
a failure of the real stream resets the whole wire, and a reset wire closes
the real stream with a TCP RST (even under TLS), so a failure at either end
reaches the other end as a reset. Driven through :func:`open_faulty_stream`,
which runs one splice, and :func:`abort_stream` on its own over real sockets.
Every timing test runs under ``MockClock(autojump_threshold=0)`` (the
``autojump_clock`` fixture), so "arrives at exactly 0.25" is an equality, not a
bound. Times are chosen to be exact binary fractions.
"""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing
import trustme
from helpers import LOOPBACK, PlainStream
from trio.testing import MockClock

from trio_heartbeat.testing import Faults, FaultyHalfCloseableStream, Side, open_faulty_stream
from trio_heartbeat.testing._pumps import abort_stream, splice
from trio_heartbeat.testing._wire import DEFAULT_BUFFER_SIZE, _Wire

# -- EOF, failures and resets across the pumps -----------------------------------------


async def test_closing_the_wrapper_flushes_then_closes_the_inner_stream(
    autojump_clock: MockClock,
) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    async with open_faulty_stream(PlainStream(near_raw)) as near:
        near.faults.set_delay(1.0)
        await near.send_all(b"bye")
        await near.aclose()
        assert await far.receive_some() == b"bye"
        assert trio.current_time() == 1.0
        assert await far.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await near.receive_some()


async def test_wrapper_reset_breaks_the_near_end_and_closes_the_inner_stream(
    autojump_clock: MockClock,
) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    async with open_faulty_stream(near_raw) as near:
        async with trio.open_nursery() as nursery:

            async def reset_at_2() -> None:
                await trio.sleep(2)
                near.faults.reset()

            nursery.start_soon(reset_at_2)
            with pytest.raises(trio.BrokenResourceError):
                await near.receive_some()
        assert trio.current_time() == 2
        # A memory stream cannot carry an RST; the far end reads EOF.
        assert await far.receive_some() == b""
        with pytest.raises(trio.BrokenResourceError):
            await near.send_all(b"x")


async def test_wrapper_turns_an_inner_failure_into_broken_resource_error(
    autojump_clock: MockClock,
) -> None:
    near_raw, far = trio.testing.memory_stream_pair()
    async with open_faulty_stream(near_raw) as near:
        await far.aclose()
        await near.send_all(b"into the void")  # buffered; the pump then fails
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BrokenResourceError):
            await near.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await near.send_all(b"more")


async def test_wrapper_reset_sends_a_tcp_rst_even_under_tls() -> None:
    # Real sockets. The server's TLS stream is https_compatible, so a plain
    # close would read as a clean b"": only an RST makes it raise.
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0] as listener:
        port = listener.socket.getsockname()[1]
        client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
        server_tls = trio.SSLStream(
            await listener.accept(), server_context, server_side=True, https_compatible=True
        )
        client_tls = trio.SSLStream(client_tcp, client_context, server_hostname="127.0.0.1")
        async with server_tls:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_tls.do_handshake)
                nursery.start_soon(client_tls.do_handshake)
            async with open_faulty_stream(client_tls) as stream:
                await stream.send_all(b"hi")
                with trio.fail_after(5):
                    assert await server_tls.receive_some() == b"hi"
                stream.faults.reset()
                with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
                    await server_tls.receive_some()


# -- splice and abort_stream on their own -----------------------------------------------


async def test_splice_passes_eof_on_both_ways_then_closes_the_transport(
    autojump_clock: MockClock,
) -> None:
    wire = _Wire(Faults(), DEFAULT_BUFFER_SIZE)
    near = FaultyHalfCloseableStream(wire, Side.NEAR)
    transport, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(splice, transport, wire.inbound, wire.outbound, wire)
        await far.send_all(b"in")
        assert await near.receive_some() == b"in"
        await near.send_all(b"out")
        assert await far.receive_some() == b"out"
        await far.send_eof()
        assert await near.receive_some() == b""
        await near.send_eof()
        assert await far.receive_some() == b""
    # Both pumps were done, so splice returned, closing the transport (plainly).
    assert not wire.was_reset
    with pytest.raises(trio.ClosedResourceError):
        await transport.send_all(b"x")


async def test_a_reset_wire_makes_splice_abort_the_transport(autojump_clock: MockClock) -> None:
    wire = _Wire(Faults(), DEFAULT_BUFFER_SIZE)
    transport, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(splice, transport, wire.inbound, wire.outbound, wire)
        await trio.testing.wait_all_tasks_blocked()
        wire.reset()
    assert await far.receive_some() == b""  # a memory stream cannot carry an RST
    with pytest.raises(trio.ClosedResourceError):
        await transport.send_all(b"x")


async def read_to_the_end(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


async def test_abort_stream_resets_a_tcp_connection() -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    async with listeners[0] as listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream(LOOPBACK, port)
        async with await listener.accept() as server:
            await client.send_all(b"unsent data is discarded")
            await abort_stream(client)
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                await read_to_the_end(server)
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")


async def test_abort_stream_closes_any_other_stream_plainly() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await abort_stream(ours)
    assert await theirs.receive_some() == b""
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"x")
