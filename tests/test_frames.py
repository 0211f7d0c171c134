"""Tests for the THB/1 frame codec (trio_heartbeat._frames).

The test vectors of THB/1 §7 are checked byte for byte in both
directions, every input is fed whole, one byte at a time and in random
splits, and the decoder is fuzzed: whatever arrives, the only outcomes are
frames or a RemoteProtocolError carrying 1002 or 1009.
"""

from __future__ import annotations

import doctest
from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vectors import (
    CLIENT_HELLO,
    CLIENT_NONCE,
    CLOSE_1011,
    DATA_HI,
    KEY,
    OPAQUE,
    PING,
    PONG,
    SERVER_HELLO,
    SERVER_NONCE,
)

from trio_heartbeat import LocalProtocolError, RemoteProtocolError, _frames
from trio_heartbeat._frames import (
    HANDSHAKE_MAX_FRAME,
    HEADER_SIZE,
    MAX_CLOSE_REASON,
    MIN_MAX_FRAME,
    Close,
    CloseCode,
    Frame,
    FrameDecoder,
    FrameType,
    HealthStatus,
    Hello,
    Ping,
    Pong,
    Role,
    _parse_ping,
    decode_close,
    decode_hello,
    decode_status,
    encode_close,
    encode_data,
    encode_frame,
    encode_hello,
    encode_ping,
    encode_pong,
    truncate_reason,
)
from trio_heartbeat._handshake import compute_auth

# -- THB/1 §7 ------------------------------------------------------------

CLIENT_AUTH = CLIENT_HELLO[-32:]

SERVER_HELLO_VALUES = Hello(
    role=Role.SERVER,
    status=HealthStatus.SERVING,
    interval_ms=1000,
    timeout_ms=3000,
    max_frame=1048576,
    nonce=SERVER_NONCE,
)
CLIENT_HELLO_VALUES = Hello(
    role=Role.CLIENT,
    status=HealthStatus.SERVING,
    interval_ms=500,
    timeout_ms=1500,
    max_frame=65536,
    nonce=CLIENT_NONCE,
    instance_id="node-1",
    auth=CLIENT_AUTH,
)

#: Every vector: its bytes, how to build them, and the frame they decode to.
VECTORS: dict[str, tuple[bytes, bytes, Frame]] = {
    "server-hello": (SERVER_HELLO, encode_hello(SERVER_HELLO_VALUES), SERVER_HELLO_VALUES),
    "client-hello": (
        CLIENT_HELLO,
        encode_hello(
            Hello(
                role=Role.CLIENT,
                status=HealthStatus.SERVING,
                interval_ms=500,
                timeout_ms=1500,
                max_frame=65536,
                nonce=CLIENT_NONCE,
                instance_id="node-1",
                auth=compute_auth(KEY, SERVER_NONCE, CLIENT_NONCE, "node-1"),
            )
        ),
        CLIENT_HELLO_VALUES,
    ),
    "ping": (PING, encode_ping(OPAQUE, HealthStatus.SERVING), Ping(OPAQUE, HealthStatus.SERVING)),
    "pong": (
        PONG,
        encode_pong(OPAQUE, HealthStatus.NOT_SERVING),
        Pong(OPAQUE, HealthStatus.NOT_SERVING),
    ),
    "data": (DATA_HI, encode_data(b"hi"), b"hi"),
    "close": (
        CLOSE_1011,
        encode_close(1011, "heartbeat timeout"),
        Close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout"),
    ),
}


def kind_of(frame: Frame) -> FrameType:
    """The wire type of a decoded frame (a DATA frame is its payload)."""
    kinds = {bytes: FrameType.DATA, Hello: FrameType.HELLO, Close: FrameType.CLOSE}
    return kinds.get(type(frame)) or (FrameType.PING if type(frame) is Ping else FrameType.PONG)


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (any order, duplicates allowed)."""
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in pairwise(points)]


def chunkings(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """The fixed ways every input is fed: whole and one byte at a time."""
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]


def drain(decoder: FrameDecoder, batch: bool) -> list[Frame]:
    """Every whole frame buffered, one at a time or with the batch ``frames()``."""
    if batch:
        out: list[Frame] = []
        while found := decoder.frames():
            out += found
        return out
    return list(iter(decoder.next_frame, None))


def decode_all(
    chunks: Sequence[bytes], max_frame: int = 0xFFFFFFFF, *, batch: bool = False
) -> list[Frame]:
    """Feed ``chunks`` one by one, draining frames after each; no bytes may be left over."""
    decoder = FrameDecoder(max_frame)
    frames: list[Frame] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        frames += drain(decoder, batch)
    assert decoder.buffered == 0
    return frames


# -- the vectors, both ways ----------------------------------------------------


@pytest.mark.parametrize("name", VECTORS)
def test_vector_encodes_to_its_bytes(name: str) -> None:
    expected, encoded, _ = VECTORS[name]
    assert encoded == expected


def test_client_auth_vector_is_the_hmac_of_the_nonces_and_id() -> None:
    assert compute_auth(KEY, SERVER_NONCE, CLIENT_NONCE, "node-1") == CLIENT_AUTH
    assert compute_auth(KEY, CLIENT_NONCE, SERVER_NONCE, "node-1") != CLIENT_AUTH


@pytest.mark.parametrize("name", VECTORS)
@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_vector_decodes_to_one_frame(name: str, how: str) -> None:
    data, _, frame = VECTORS[name]
    chunks = dict(chunkings(data))[how]
    assert decode_all(chunks) == [frame]


def test_vectors_decode_to_their_values() -> None:
    assert decode_hello(SERVER_HELLO[HEADER_SIZE:]) == SERVER_HELLO_VALUES
    assert decode_hello(CLIENT_HELLO[HEADER_SIZE:]) == CLIENT_HELLO_VALUES
    assert decode_all([PING]) == [Ping(OPAQUE, HealthStatus.SERVING)]
    assert decode_all([PONG]) == [Pong(OPAQUE, HealthStatus.NOT_SERVING)]
    assert decode_all([DATA_HI]) == [b"hi"]
    (close,) = decode_all([CLOSE_1011])
    assert close == Close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
    assert isinstance(close, Close)
    assert type(close.code) is CloseCode


@settings(max_examples=100)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_all_vectors_back_to_back_in_random_splits(cuts: list[int]) -> None:
    stream = b"".join(data for data, _, _ in VECTORS.values())
    expected = [frame for _, _, frame in VECTORS.values()]
    assert decode_all(split_at(stream, cuts)) == expected
    assert decode_all(split_at(stream, cuts), batch=True) == expected


# -- round trips of random frame sequences --------------------------------------

statuses = st.sampled_from(HealthStatus)
opaques = st.binary(min_size=8, max_size=8)
#: At most 16 characters of at most 4 UTF-8 bytes each: always within the 64-byte limit.
short_ids = st.text(max_size=16)

hellos = st.builds(
    Hello,
    role=st.sampled_from(Role),
    status=statuses,
    interval_ms=st.integers(1, 0xFFFFFFFF),
    timeout_ms=st.integers(1, 0xFFFFFFFF),
    max_frame=st.integers(MIN_MAX_FRAME, 0xFFFFFFFF),
    nonce=st.binary(min_size=16, max_size=16),
    instance_id=short_ids,
    auth=st.one_of(st.just(b""), st.binary(min_size=32, max_size=32)),
)

#: (encoded frame, expected type, the frame it must decode to)
EncodedFrame = tuple[bytes, FrameType, Frame]


@st.composite
def encoded_frames(draw: st.DrawFn) -> EncodedFrame:
    kind = draw(st.sampled_from(FrameType))
    if kind is FrameType.HELLO:
        hello = draw(hellos)
        return encode_hello(hello), kind, hello
    if kind is FrameType.DATA:
        payload = draw(st.binary(max_size=300))
        return encode_data(payload), kind, payload
    if kind is FrameType.CLOSE:
        code = draw(st.integers(0, 0xFFFF).filter(lambda code: code != CloseCode.ABNORMAL_CLOSURE))
        reason = draw(st.text(max_size=80))
        expected_reason = truncate_reason(reason).decode("utf-8")
        return encode_close(code, reason), kind, Close(code, expected_reason)
    opaque, status = draw(opaques), draw(statuses)
    if kind is FrameType.PING:
        return encode_ping(opaque, status), kind, Ping(opaque, status)
    return encode_pong(opaque, status), kind, Pong(opaque, status)


@settings(max_examples=200)
@given(
    sequence=st.lists(encoded_frames(), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=16),
)
def test_random_frames_round_trip_in_random_splits(
    sequence: list[EncodedFrame], cuts: list[int]
) -> None:
    stream = b"".join(encoded for encoded, _, _ in sequence)
    frames = decode_all(split_at(stream, cuts))
    assert [kind_of(frame) for frame in frames] == [kind for _, kind, _ in sequence]
    assert frames == [value for _, _, value in sequence]
    # The batch path and the fixed chunkings agree with the random one.
    assert decode_all(split_at(stream, cuts), batch=True) == frames
    for _, chunks in chunkings(stream):
        assert decode_all(chunks) == frames
        assert decode_all(chunks, batch=True) == frames


# -- fuzzing --------------------------------------------------------------------


def fuzz_decoder(
    data: bytes, cuts: Sequence[int], max_frame: int, *, batch: bool = False
) -> list[Frame]:
    """Feed ``data``; only frames or a 1002/1009 RemoteProtocolError may come out."""
    decoder = FrameDecoder(max_frame)
    frames: list[Frame] = []
    for chunk in split_at(data, cuts):
        decoder.receive_data(chunk)
        try:
            if batch:
                while found := decoder.frames():
                    frames += found
            else:
                while (frame := decoder.next_frame()) is not None:
                    frames.append(frame)
        except RemoteProtocolError as exc:
            assert exc.code in (CloseCode.PROTOCOL_ERROR, CloseCode.TOO_BIG)
            for again in (decoder.next_frame, decoder.frames):
                with pytest.raises(RemoteProtocolError) as info:
                    again()
                assert info.value is exc
            return frames
        # Drained: at most one incomplete frame is held, and never a big one.
        assert decoder.buffered < HEADER_SIZE + max_frame
    return frames


def fuzz_both_ways(data: bytes, cuts: Sequence[int], max_frame: int) -> list[Frame]:
    """The one-at-a-time and the batch paths see the same frames and the same end."""
    one_by_one = fuzz_decoder(data, cuts, max_frame)
    assert fuzz_decoder(data, cuts, max_frame, batch=True) == one_by_one
    return one_by_one


limits = st.sampled_from([HANDSHAKE_MAX_FRAME, MIN_MAX_FRAME, 3000])
byte_cuts = st.lists(st.integers(min_value=0, max_value=5000), max_size=10)


@settings(max_examples=300)
@given(data=st.binary(max_size=2000), cuts=byte_cuts, max_frame=limits)
def test_fuzz_decoder_with_arbitrary_bytes(data: bytes, cuts: list[int], max_frame: int) -> None:
    fuzz_both_ways(data, cuts, max_frame)


@settings(max_examples=300)
@given(
    prefix=st.lists(encoded_frames(), max_size=4),
    garbage=st.binary(max_size=600),
    cuts=byte_cuts,
    max_frame=limits,
)
def test_fuzz_decoder_with_arbitrary_bytes_after_valid_frames(
    prefix: list[EncodedFrame], garbage: bytes, cuts: list[int], max_frame: int
) -> None:
    valid = b"".join(encoded for encoded, _, _ in prefix)
    frames = fuzz_both_ways(valid + garbage, cuts, 0xFFFFFFFF)
    assert [kind_of(frame) for frame in frames[: len(prefix)]] == [kind for _, kind, _ in prefix]
    fuzz_both_ways(valid + garbage, cuts, max_frame)


@settings(max_examples=300)
@given(payload=st.binary(max_size=200))
def test_fuzz_payload_decoders(payload: bytes) -> None:
    """The payload parsers raise nothing but RemoteProtocolError(1002) on bytes of legal size."""
    for parse in (decode_hello, decode_close, _parse_ping):
        if parse is decode_close and not 2 <= len(payload) <= 125:
            continue  # the decoder refuses these sizes from the header
        if parse is _parse_ping and len(payload) != 9:
            continue
        try:
            parse(payload)
        except RemoteProtocolError as exc:
            assert exc.code == CloseCode.PROTOCOL_ERROR


# -- header errors --------------------------------------------------------------


def header(frame_type: int, length: int, flags: int = 0) -> bytes:
    return bytes((frame_type, flags)) + length.to_bytes(4, "big")


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        (header(0x00, 0), 1002, "unknown frame type 0x00"),
        (header(0x06, 0), 1002, "unknown frame type 0x06"),
        (header(0xFF, 0), 1002, "unknown frame type 0xff"),
        (header(0x02, 0, flags=0x01), 1002, "reserved flags"),
        (header(0x03, 0, flags=0x80), 1002, "reserved flags"),
        (header(0x03, 8), 1002, "PING payload must be 9 bytes"),
        (header(0x03, 10), 1002, "PING payload must be 9 bytes"),
        (header(0x03, 0xFFFFFFFF), 1002, "PING payload must be 9 bytes"),
        (header(0x04, 0), 1002, "PONG payload must be 9 bytes"),
        (header(0x05, 0), 1002, "CLOSE payload must be 2 to 125 bytes"),
        (header(0x05, 1), 1002, "CLOSE payload must be 2 to 125 bytes"),
        (header(0x05, 126), 1002, "CLOSE payload must be 2 to 125 bytes"),
        (header(0x01, 35), 1002, "shorter than 36"),
        (header(0x01, 0), 1002, "shorter than 36"),
        (header(0x01, 513), 1009, "exceeds the limit of 512"),
        (header(0x02, 513), 1009, "exceeds the limit of 512"),
        (header(0x05, 600), 1009, "exceeds the limit of 512"),
        (header(0x02, 0xFFFFFFFF), 1009, "exceeds the limit of 512"),
    ],
)
def test_header_errors_from_the_six_header_bytes_alone(raw: bytes, code: int, message: str) -> None:
    for _, chunks in chunkings(raw):
        decoder = FrameDecoder()
        for chunk in chunks[:-1]:
            decoder.receive_data(chunk)
            assert decoder.next_frame() is None
        decoder.receive_data(chunks[-1])
        with pytest.raises(RemoteProtocolError, match=message) as info:
            decoder.next_frame()
        assert info.value.code == code
        # Sticky: the same error again, whatever arrives next.
        decoder.receive_data(DATA_HI)
        with pytest.raises(RemoteProtocolError) as again:
            decoder.next_frame()
        assert again.value is info.value


@pytest.mark.parametrize("batch", [False, True], ids=["next_frame", "frames"])
def test_bytes_after_a_sticky_error_are_dropped(batch: bool) -> None:
    decoder = FrameDecoder()
    decode = decoder.frames if batch else decoder.next_frame
    decoder.receive_data(DATA_HI + header(0x09, 0) + DATA_HI)
    first = decode()
    assert first == ([b"hi"] if batch else b"hi")
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0x09") as info:
        decode()
    # Nothing at or after the bad header can become a frame: the decoder lets go
    # of those bytes, and of everything that arrives later.
    assert decoder.buffered == 0
    for _ in range(3):
        decoder.receive_data(DATA_HI * 1000)
        decoder.receive_data(bytearray(100))
        assert decoder.buffered == 0
        with pytest.raises(RemoteProtocolError) as again:
            decode()
        assert again.value is info.value


def test_limit_is_inclusive_and_follows_max_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.max_frame == HANDSHAKE_MAX_FRAME
    decoder.receive_data(header(0x02, 512))
    assert decoder.next_frame() is None  # legal header, payload still to come
    decoder.receive_data(bytes(512))
    assert decoder.next_frame() == bytes(512)

    decoder.max_frame = 2048
    decoder.receive_data(encode_data(bytes(2048)))
    assert decoder.next_frame() == bytes(2048)
    decoder.receive_data(header(0x02, 2049))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == CloseCode.TOO_BIG


@pytest.mark.parametrize(
    "frame", [PING, PONG, CLOSE_1011, SERVER_HELLO], ids=["ping", "pong", "close", "hello"]
)
def test_limit_is_inclusive_for_control_frames_too(frame: bytes) -> None:
    """A control frame whose payload is exactly ``max_frame`` bytes is decoded, not refused."""
    length = len(frame) - HEADER_SIZE
    assert decode_all([frame], max_frame=length) == decode_all([frame])
    decoder = FrameDecoder(length - 1)
    decoder.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit") as info:
        decoder.next_frame()
    assert info.value.code == CloseCode.TOO_BIG


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (header(0x05, 126), "CLOSE payload must be 2 to 125 bytes, not 126"),
        (header(0x05, 1), "CLOSE payload must be 2 to 125 bytes, not 1"),
        (header(0x01, 35), "HELLO payload of 35 bytes is shorter than 36"),
        (header(0x03, 10), "PING payload must be 9 bytes, not 10"),
    ],
    ids=["close-126", "close-1", "hello-35", "ping-10"],
)
def test_a_bad_size_at_exactly_the_limit_is_1002_not_1009(raw: bytes, message: str) -> None:
    """Only a length over the limit is 1009; a length at the limit but wrong for its type is 1002."""
    decoder = FrameDecoder(int.from_bytes(raw[2:], "big"))
    decoder.receive_data(raw)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert (str(info.value), info.value.code) == (message, CloseCode.PROTOCOL_ERROR)


def test_decoder_buffers_partial_frames_and_keeps_leftovers() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    assert decoder.buffered == 0
    assert decoder.next_frame() is None
    decoder.receive_data(DATA_HI + PING[:3])
    assert decoder.buffered == len(DATA_HI) + 3
    assert decoder.next_frame() == b"hi"
    assert decoder.buffered == 3
    assert decoder.next_frame() is None
    decoder.receive_data(PING[3:10])
    assert decoder.next_frame() is None
    assert decoder.buffered == 10
    decoder.receive_data(PING[10:] + DATA_HI)
    assert decoder.next_frame() == Ping(OPAQUE, HealthStatus.SERVING)
    assert decoder.next_frame() == b"hi"
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


def test_batch_returns_the_frames_before_an_error_then_the_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(DATA_HI + PING + header(0x09, 0) + DATA_HI)
    assert decoder.frames() == [b"hi", Ping(OPAQUE, HealthStatus.SERVING)]
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0x09") as info:
        decoder.frames()
    with pytest.raises(RemoteProtocolError) as again:
        decoder.next_frame()
    assert again.value is info.value
    # The same through next_frame: one frame per call, then the error.
    decoder = FrameDecoder()
    decoder.receive_data(DATA_HI + header(0x02, 513))
    assert decoder.next_frame() == b"hi"
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == CloseCode.TOO_BIG


@pytest.mark.parametrize(
    ("tail", "cut", "frame"),
    [(DATA_HI, 7, b"hi"), (PING, 8, Ping(OPAQUE, HealthStatus.SERVING))],
    ids=["data", "ping"],
)
def test_batch_returns_the_whole_frames_before_an_incomplete_one(
    tail: bytes, cut: int, frame: Frame
) -> None:
    """frames() hands back every whole frame at once and keeps the incomplete tail.

    The tail is a DATA or a PING frame whose six header bytes are in but whose
    payload is not yet; the frames before it are returned now, not held back
    until the tail is complete.
    """
    decoder = FrameDecoder()
    decoder.receive_data(DATA_HI + PING + tail[:cut])
    assert decoder.frames() == [b"hi", Ping(OPAQUE, HealthStatus.SERVING)]
    assert decoder.buffered == cut
    assert decoder.frames() == []
    decoder.receive_data(tail[cut:])
    assert decoder.frames() == [frame]
    assert decoder.buffered == 0


def test_batch_stops_after_a_hello_so_the_limit_can_change() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(DATA_HI + SERVER_HELLO + encode_data(bytes(1000)) + DATA_HI)
    assert decoder.frames() == [b"hi", SERVER_HELLO_VALUES]
    decoder.max_frame = 1024  # what the protocol does once it has seen the HELLO
    assert decoder.frames() == [bytes(1000), b"hi"]
    assert decoder.frames() == []
    assert decoder.buffered == 0


def test_decoder_accepts_bytearray() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(bytearray(DATA_HI))
    frame = decoder.next_frame()
    assert frame == b"hi"
    assert type(frame) is bytes


def test_empty_data_frame() -> None:
    assert encode_data(b"") == header(0x02, 0)
    assert decode_all([encode_data(b"")]) == [b""]


# -- payload codecs -------------------------------------------------------------


def hello_payload(**changes: object) -> bytes:
    """The server vector's payload with named fields overwritten (raw bytes)."""
    payload = bytearray(SERVER_HELLO[HEADER_SIZE:])
    offsets = {"magic": (0, 4), "role": (4, 5), "status": (5, 6), "interval": (6, 10)}
    offsets |= {"timeout": (10, 14), "max_frame": (14, 18), "id_len": (34, 35)}
    offsets |= {"auth_len": (35, 36)}
    for name, value in changes.items():
        start, end = offsets[name]
        assert isinstance(value, bytes)
        assert len(value) == end - start
        payload[start:end] = value
    return bytes(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (SERVER_HELLO[HEADER_SIZE:-1], "too short"),
        (hello_payload(magic=b"THB2"), "bad HELLO magic"),
        (hello_payload(magic=b"\0\0\0\0"), "bad HELLO magic"),
        (hello_payload(role=b"\x02"), "unknown HELLO role 2"),
        (hello_payload(status=b"\x03"), "unknown health status 3"),
        (hello_payload(interval=bytes(4)), "at least 1 ms"),
        (hello_payload(timeout=bytes(4)), "at least 1 ms"),
        (hello_payload(max_frame=(1023).to_bytes(4, "big")), "below 1024"),
        (hello_payload(max_frame=bytes(4)), "below 1024"),
        (hello_payload(id_len=b"\x41"), "id length 65 is over 64"),
        (hello_payload(id_len=b"\x01"), "shorter than its id length"),
        (hello_payload(id_len=b"\x02") + b"x", "shorter than its id length"),
        (hello_payload(auth_len=b"\x01") + b"x", "auth length must be 0 or 32"),
        (hello_payload(auth_len=b"\x20"), "does not match"),
        (hello_payload(auth_len=b"\x20") + bytes(31), "does not match"),
        (hello_payload(auth_len=b"\x20") + bytes(33), "does not match"),
        (hello_payload() + b"\0", "does not match"),
        (hello_payload(id_len=b"\x01")[:-1] + b"\xff\x00", "id is not valid UTF-8"),
    ],
)
def test_bad_hello_is_a_protocol_error(payload: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message) as info:
        decode_hello(payload)
    assert info.value.code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (SERVER_HELLO[HEADER_SIZE:-1], "HELLO is too short"),
        (hello_payload(magic=b"THB2"), "bad HELLO magic 0x54484232, not THB1"),
        (hello_payload(role=b"\x07"), "unknown HELLO role 7"),
        (hello_payload(interval=bytes(4)), "HELLO interval and timeout must be at least 1 ms"),
        (hello_payload(max_frame=bytes(4)), "HELLO max_frame 0 is below 1024"),
        (hello_payload(id_len=b"\x41"), "HELLO id length 65 is over 64"),
        (hello_payload(id_len=b"\x01"), "HELLO is shorter than its id length says"),
        (hello_payload(auth_len=b"\x01") + b"x", "HELLO auth length must be 0 or 32, not 1"),
        (hello_payload() + b"\0", "HELLO length does not match its id and auth lengths"),
        (hello_payload(id_len=b"\x01")[:-1] + b"\xff\x00", "HELLO id is not valid UTF-8"),
    ],
    ids=["short", "magic", "role", "interval", "max_frame", "id_len", "id", "auth", "size", "utf8"],
)
def test_bad_hello_reason_word_for_word(payload: bytes, reason: str) -> None:
    """The error's text becomes the reason of the CLOSE the peer reads, so it is pinned exactly."""
    with pytest.raises(RemoteProtocolError) as info:
        decode_hello(payload)
    assert str(info.value) == reason
    assert len(reason.encode("utf-8")) <= MAX_CLOSE_REASON  # it fits in a CLOSE as it is


def test_hello_extremes_round_trip() -> None:
    hello = Hello(
        role=Role.CLIENT,
        status=HealthStatus.DEGRADED,
        interval_ms=1,
        timeout_ms=0xFFFFFFFF,
        max_frame=MIN_MAX_FRAME,
        nonce=bytes(16),
        instance_id="é" * 32,
        auth=bytes(range(32)),
    )
    encoded = encode_hello(hello)
    assert len(encoded) == HEADER_SIZE + 36 + 64 + 32
    assert decode_hello(encoded[HEADER_SIZE:]) == hello


@pytest.mark.parametrize(
    ("hello", "message"),
    [
        (Hello(Role.SERVER, HealthStatus.SERVING, 1, 1, 1024, bytes(16), "x" * 65), "limit is 64"),
        (Hello(Role.SERVER, HealthStatus.SERVING, 1, 1, 1024, bytes(15)), "nonce must be 16"),
        (Hello(Role.SERVER, HealthStatus.SERVING, 1, 1, 1024, bytes(16), "", b"a"), "auth must"),
    ],
)
def test_encode_hello_refuses_what_it_cannot_encode(hello: Hello, message: str) -> None:
    """A usage error, carrying the close code of the violation (1002) like every ProtocolError."""
    with pytest.raises(LocalProtocolError, match=message) as info:
        encode_hello(hello)
    assert info.value.code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("status", list(HealthStatus))
def test_health_status_bytes(status: HealthStatus) -> None:
    assert decode_status(status.value) is status
    assert encode_ping(OPAQUE, status)[-1] == status.value
    assert decode_all([encode_pong(OPAQUE, status)]) == [Pong(OPAQUE, status)]


@pytest.mark.parametrize("raw", [3, 4, 0x80, 0xFF])
def test_unknown_health_status_is_a_protocol_error(raw: int) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown health status") as info:
        decode_status(raw)
    assert info.value.code == CloseCode.PROTOCOL_ERROR
    decoder = FrameDecoder()
    decoder.receive_data(DATA_HI + header(0x03, 9) + OPAQUE + bytes((raw,)))
    assert decoder.frames() == [b"hi"]  # the frames before the bad one come first
    with pytest.raises(RemoteProtocolError, match="unknown health status"):
        decoder.frames()


@pytest.mark.parametrize("opaque", [b"", bytes(7), bytes(9)])
def test_ping_and_pong_need_eight_opaque_bytes(opaque: bytes) -> None:
    """Refused as a usage error that names the close code of the violation, 1002."""
    for encode in (encode_ping, encode_pong):
        with pytest.raises(LocalProtocolError, match="8 bytes") as info:
            encode(opaque, HealthStatus.SERVING)
        assert info.value.code == CloseCode.PROTOCOL_ERROR


def test_close_codes_known_and_unknown() -> None:
    assert encode_close(1000) == bytes.fromhex("05 00 00 00 00 02 03 e8")
    code, reason = decode_close(encode_close(4001, "app")[HEADER_SIZE:])
    assert (code, reason) == (4001, "app")
    assert type(code) is int
    code, _ = decode_close(encode_close(0)[HEADER_SIZE:])
    assert code == 0
    code, _ = decode_close(encode_close(0xFFFF)[HEADER_SIZE:])
    assert code == 0xFFFF
    code, _ = decode_close(encode_close(CloseCode.REPLACED)[HEADER_SIZE:])
    assert code is CloseCode.REPLACED


@pytest.mark.parametrize("code", [-1, 0x10000, -0x10000, 0x10000 + 1000])
def test_close_code_out_of_range_is_a_value_error(code: int) -> None:
    # A bad argument, not a protocol error: no close code can describe it
    # (the old code reported ``code & 0xFFFF``, which is 1000 for 0x103E8).
    with pytest.raises(ValueError, match=f"close code must be 0 to 65535, not {code}") as info:
        encode_close(code)
    assert type(info.value) is ValueError  # not a ProtocolError of any kind


def test_close_reason_is_truncated_at_a_character_boundary() -> None:
    assert truncate_reason("a" * MAX_CLOSE_REASON) == b"a" * MAX_CLOSE_REASON
    assert truncate_reason("a" * 200) == b"a" * MAX_CLOSE_REASON
    # 'é' is two bytes: 61 of them fit in 123 bytes, the 62nd would be cut in half.
    assert truncate_reason("é" * 70) == ("é" * 61).encode("utf-8")
    # A four-byte character straddling the limit is dropped whole.
    assert truncate_reason("a" * 121 + "😀") == b"a" * 121
    frame = encode_close(1000, "é" * 70)
    assert len(frame) == HEADER_SIZE + 2 + 122
    assert decode_all([frame], HANDSHAKE_MAX_FRAME) == [Close(1000, "é" * 61)]


def test_close_reason_that_is_not_utf8_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="not valid UTF-8") as info:
        decode_close(b"\x03\xe8\xc3\x28")
    assert info.value.code == CloseCode.PROTOCOL_ERROR
    assert str(info.value) == "CLOSE reason is not valid UTF-8"  # the reason of our CLOSE


def test_encode_frame_is_the_generic_encoder() -> None:
    assert encode_frame(FrameType.DATA, b"hi") == DATA_HI
    assert encode_frame(FrameType.HELLO, SERVER_HELLO[HEADER_SIZE:]) == SERVER_HELLO
    assert encode_frame(FrameType.PING, PING[HEADER_SIZE:]) == PING
    assert encode_frame(FrameType.DATA) == header(0x02, 0)


def test_doctests() -> None:
    results = doctest.testmod(_frames)
    assert results.attempted > 0
    assert results.failed == 0


def test_heartbeat_status_may_be_a_plain_int_but_must_name_a_status() -> None:
    # Typed as HealthStatus, but callers without a type checker pass ints.
    one: Any = 1
    assert encode_ping(b"12345678", one) == encode_ping(b"12345678", HealthStatus(1))
    nine: Any = 9
    with pytest.raises(ValueError, match=r"^9 is not a valid HealthStatus"):
        encode_pong(b"12345678", nine)  # the message names the value that was passed


def test_1006_never_travels() -> None:
    # THB/1 §5.5: 1006 says an ending had no CLOSE; it is never encoded, and a
    # CLOSE that carries it is a protocol error.
    with pytest.raises(ValueError, match="1006 is never sent") as refused:
        encode_close(CloseCode.ABNORMAL_CLOSURE)
    assert str(refused.value) == (
        "close code 1006 is never sent: it says a connection ended without CLOSE"
    )
    decoder = FrameDecoder()
    decoder.receive_data(DATA_HI + header(0x05, 2) + (1006).to_bytes(2, "big"))
    assert decoder.frames() == [b"hi"]
    with pytest.raises(RemoteProtocolError, match="1006") as info:
        decoder.frames()
    assert info.value.code == CloseCode.PROTOCOL_ERROR
    # Word for word: this is the reason of the CLOSE 1002 the peer gets back.
    assert str(info.value) == "CLOSE with code 1006, which is never sent"


def test_a_health_status_prints_as_its_name() -> None:
    """Wherever a status is printed (a log line, an f-string), it reads SERVING, never 0 (#10)."""
    assert str(HealthStatus.SERVING) == "SERVING"
    assert f"{HealthStatus.NOT_SERVING}" == "NOT_SERVING"
    assert f"[{HealthStatus.DEGRADED:>10}]" == "[  DEGRADED]"
    assert "%s" % HealthStatus.SERVING == "SERVING"  # noqa: UP031 (logging formats this way)
    assert int(HealthStatus.DEGRADED) == 1  # still the byte on the wire
