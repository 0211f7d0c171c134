"""Codec: FrameDecoder and the DATA encoders against bare struct loops.

Theory of operation
-------------------
The decoding baseline is the least any THB/1 decoder must do per frame:
unpack the 6-byte header with a precompiled ``Struct(">BBI").unpack_from``,
slice out the payload, advance. It checks nothing and never meets a partial
frame. :class:`~trio_heartbeat.FrameDecoder` is timed on the same buffer fed
whole, and fed in 64 KiB chunks as a reader calling ``receive_some(65536)``
would, where frames straddle chunk boundaries and must be joined. With every
check of THB/1 §2 (docs/protocol.md) in place it should reach :data:`DECODE_TARGET` of the
baseline's frames per second when fed as the runtime feeds it (64 KiB chunks,
through the batch ``frames()`` call the protocol core uses); that row says PASS
or FAIL. The whole-buffer row is for contrast only.

The encoding baseline is ``Struct(">BBI").pack(type, 0, len(payload)) +
payload``, precompiled like the decoder's, so that it is the strictest
baseline the issue's ``struct.pack`` loop allows.

The timed loops do nothing with the frames they produce, on either side, so
that the only difference between the rows is the codec's own work. Before
timing, every decoder configuration is checked to yield exactly the frames
encoded, and the encoders to produce the baseline's bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final

from trio_heartbeat import FrameDecoder, FrameType
from trio_heartbeat._frames import encode_data, encode_frame

from ._report import Result, Settings, measure_interleaved

__all__ = ["CHUNK_SIZE", "DECODE_TARGET", "run"]

BENCHMARK: Final = "codec"
#: The least acceptable decoding rate, as a fraction of the bare loop's.
DECODE_TARGET: Final = 0.5
#: What a socket reader asks for per read.
CHUNK_SIZE: Final = 64 * 1024
#: The decoder's payload limit: a typical post-handshake ``max_frame``.
MAX_FRAME: Final = 1 << 20
#: Frames per sample at scale 1: enough that one sample takes milliseconds,
#: and that the chunked buffer spans many chunks.
FRAMES_PER_SAMPLE: Final = {64: 100_000, 4096: 10_000}

_HEADER = struct.Struct(">BBI")
_DATA = int(FrameType.DATA)


def _size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def _make_payload(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def _chunks(buffer: bytes, size: int) -> list[bytes]:
    return [buffer[start : start + size] for start in range(0, len(buffer), size)]


# -- the timed loops ----------------------------------------------------------


def _bare_decode(buffer: bytes) -> int:
    unpack = _HEADER.unpack_from
    position = 0
    end_of_buffer = len(buffer)
    while position < end_of_buffer:
        _type, _flags, length = unpack(buffer, position)
        start = position + 6
        position = start + length
        _payload = buffer[start:position]
    return position


def _decode(chunks: Sequence[bytes]) -> int:
    # frames() is the batch call the protocol core uses on its receive path.
    decoder = FrameDecoder(MAX_FRAME)
    receive_data = decoder.receive_data
    frames = decoder.frames
    for chunk in chunks:
        receive_data(chunk)
        frames()
    return decoder.buffered


def _bare_encode(payloads: Sequence[bytes]) -> bytes:
    pack = _HEADER.pack
    frame = b""
    for payload in payloads:
        frame = pack(_DATA, 0, len(payload)) + payload
    return frame


def _encode_data(payloads: Sequence[bytes]) -> bytes:
    frame = b""
    for payload in payloads:
        frame = encode_data(payload)
    return frame


def _encode_frame(payloads: Sequence[bytes]) -> bytes:
    data = FrameType.DATA
    frame = b""
    for payload in payloads:
        frame = encode_frame(data, payload)
    return frame


# -- correctness, checked before anything is timed -----------------------------


def _check_decoder(chunks: Sequence[bytes], payload: bytes, count: int) -> None:
    decoder = FrameDecoder(MAX_FRAME)
    seen = 0
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not None:
            if frame != payload:  # a DATA frame decodes to its payload
                raise RuntimeError(f"frame {seen} decoded wrong: {frame!r:.80}")
            seen += 1
    if seen != count or decoder.buffered:
        raise RuntimeError(f"decoded {seen} of {count} frames, {decoder.buffered} bytes left")


def _check_encoders(
    encoders: Sequence[Callable[[Sequence[bytes]], bytes]], payloads: Sequence[bytes]
) -> None:
    expected = _bare_encode(payloads)
    for encoder in encoders:
        if encoder(payloads) != expected:
            raise RuntimeError(f"{encoder.__name__} disagrees with the bare encoder")


# -- cases --------------------------------------------------------------------


def _decode_case(size: int, settings: Settings) -> list[Result]:
    count = settings.scaled(FRAMES_PER_SAMPLE[size])
    payload = _make_payload(size)
    buffer = encode_data(payload) * count
    whole = [buffer]
    chunked = _chunks(buffer, CHUNK_SIZE)
    _check_decoder(whole, payload, count)
    _check_decoder(chunked, payload, count)
    if _bare_decode(buffer) != len(buffer):
        raise RuntimeError("the bare loop did not end on a frame boundary")

    timings = measure_interleaved(
        {
            "bare": lambda: _bare_decode(buffer),
            "whole": lambda: _decode(whole),
            "chunked": lambda: _decode(chunked),
        },
        settings.repeats,
    )
    case = f"decode {_size_label(size)} DATA frames"

    def result(
        subject: str, key: str, baseline: Result | None = None, target: float | None = None
    ) -> Result:
        return Result(
            benchmark=BENCHMARK,
            case=case,
            subject=subject,
            unit="frames",
            operations=count,
            nbytes=len(buffer),
            timing=timings[key],
            baseline=baseline,
            target=target,
        )

    bare = result("bare Struct.unpack_from loop", "bare")
    # The target applies to the chunked row: the runtime's reader never hands
    # the decoder more than one receive_some(65536) at a time. The whole-buffer
    # row is shown for contrast: it keeps every payload of a many-megabyte
    # buffer alive at once, so it measures the allocator as much as the codec.
    return [
        bare,
        result("FrameDecoder, whole buffer", "whole", bare),
        result(f"FrameDecoder, {_size_label(CHUNK_SIZE)} chunks", "chunked", bare, DECODE_TARGET),
    ]


def _encode_case(size: int, settings: Settings) -> list[Result]:
    count = settings.scaled(FRAMES_PER_SAMPLE[size])
    payloads = [_make_payload(size)] * count
    _check_encoders((_encode_data, _encode_frame), payloads)

    timings = measure_interleaved(
        {
            "bare": lambda: _bare_encode(payloads),
            "encode_data": lambda: _encode_data(payloads),
            "encode_frame": lambda: _encode_frame(payloads),
        },
        settings.repeats,
    )
    case = f"encode {_size_label(size)} DATA frames"
    nbytes = count * (_HEADER.size + size)

    def result(subject: str, key: str, baseline: Result | None = None) -> Result:
        return Result(
            benchmark=BENCHMARK,
            case=case,
            subject=subject,
            unit="frames",
            operations=count,
            nbytes=nbytes,
            timing=timings[key],
            baseline=baseline,
        )

    bare = result("bare Struct.pack + payload", "bare")
    return [
        bare,
        result("encode_data(payload)", "encode_data", bare),
        result("encode_frame(DATA, payload)", "encode_frame", bare),
    ]


def run(settings: Settings | None = None) -> list[Result]:
    """Time decoding and encoding of 64 B and 4 KiB DATA frames.

    Raises :class:`RuntimeError` if a codec produces the wrong frames or
    bytes: a fast wrong answer is not a result. Holds two copies of the
    largest buffer (the whole and the chunks, some 80 MB at scale 1) while it
    runs.

    >>> results = run(Settings(scale=0.0001, repeats=1))
    >>> [result.verdict for result in results][:2]  # doctest: +ELLIPSIS
    ['baseline', '>= 0.50 ...']
    """
    settings = settings or Settings()
    results: list[Result] = []
    for size in FRAMES_PER_SAMPLE:
        results += _decode_case(size, settings)
    for size in FRAMES_PER_SAMPLE:
        results += _encode_case(size, settings)
    return results
