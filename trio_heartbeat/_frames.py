"""THB/1 framing: the byte layout of THB/1 §2 and §3 (docs/protocol.md), and nothing else.

Theory of operation
-------------------
Every frame is a 6-byte header (type, flags, length) and a payload. The
:class:`FrameDecoder` is fed bytes in whatever pieces the transport delivers
and hands back whole frames, each already typed: a HELLO as a :class:`Hello`,
a PING as a :class:`Ping` with its opaque bytes and status, a PONG as a
:class:`Pong`, a CLOSE as a :class:`Close` with its code and reason, and a DATA
frame as its payload. Bytes become frames here and nowhere else, so the state
machine above never touches bytes. The decoder decides everything it can from
the header alone, *before* it waits for or copies the payload: a length over
the current limit is rejected with 1009 the moment its six header bytes are
in, so a hostile peer can never make us buffer more than ``6 + max_frame``
bytes for one frame. Every malformed input becomes a
:class:`~trio_heartbeat.RemoteProtocolError` carrying the close code that
THB/1 prescribes; nothing else escapes the decoder.

The encoders are pure functions from values to bytes. This module does no I/O
and knows nothing about time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from math import inf
from typing import Final, TypeAlias, final

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "HANDSHAKE_MAX_FRAME",
    "HEADER_SIZE",
    "MAX_CLOSE_REASON",
    "MIN_MAX_FRAME",
    "Close",
    "CloseCode",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "HealthStatus",
    "Hello",
    "Ping",
    "Pong",
    "Role",
    "decode_close",
    "decode_hello",
    "encode_close",
    "encode_data",
    "encode_frame",
    "encode_hello",
    "encode_ping",
    "encode_pong",
]


class FrameType(IntEnum):
    """The frame types of THB/1 §2."""

    #: Handshake: the first frame each side sends.
    HELLO = 0x01
    #: Application bytes.
    DATA = 0x02
    #: Heartbeat request: 8 opaque bytes and the sender's health.
    PING = 0x03
    #: Heartbeat answer: the PING's opaque bytes and the sender's health.
    PONG = 0x04
    #: Close handshake: a code and a UTF-8 reason.
    CLOSE = 0x05


class CloseCode(IntEnum):
    """The close codes of THB/1 §5.

    A CLOSE frame may carry any 16-bit code; codes that are not members of
    this enum are still honoured and surface as plain ``int``.
    """

    #: Orderly close by the application.
    NORMAL = 1000
    #: The server is shutting down or draining: reconnect at once.
    GOING_AWAY = 1001
    #: Malformed or out-of-order frame, bad HELLO.
    PROTOCOL_ERROR = 1002
    #: Never sent on the wire: the connection ended without a CLOSE frame
    #: (transport lost). The same meaning as WebSocket's 1006.
    ABNORMAL_CLOSURE = 1006
    #: Authentication failed, too many PINGs, HELLO values refused.
    POLICY_VIOLATION = 1008
    #: A frame over the receiver's limit.
    TOO_BIG = 1009
    #: The peer was silent too long (also the handshake timeout).
    HEARTBEAT_TIMEOUT = 1011
    #: The server is at capacity: retry with backoff.
    TRY_AGAIN_LATER = 1013
    #: A newer connection with the same client id took over.
    REPLACED = 4000


class HealthStatus(IntEnum):
    """Application health carried in HELLO, PING and PONG (THB/1 §2)."""

    #: Fully able to serve.
    SERVING = 0
    #: Serving, but impaired: prefer another peer if one is available.
    DEGRADED = 1
    #: Alive but not serving: send it no work.
    NOT_SERVING = 2

    def __str__(self) -> str:
        return self.name  # "SERVING", not "0", wherever a status is printed

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


class Role(IntEnum):
    """Which end of the handshake a side plays; the values are the HELLO ``role`` byte."""

    #: The acceptor: sends HELLO first.
    SERVER = 0
    #: The initiator: answers the server's HELLO with its own.
    CLIENT = 1


HEADER_SIZE: Final = 6
#: Limit on every frame's payload until the handshake completes.
HANDSHAKE_MAX_FRAME: Final = 512
#: The smallest ``max_frame`` a HELLO may announce.
MIN_MAX_FRAME: Final = 1024
#: The longest CLOSE reason, in UTF-8 bytes.
MAX_CLOSE_REASON: Final = 123
PING_SIZE: Final = 9
OPAQUE_SIZE: Final = 8
HELLO_MAGIC: Final = b"THB1"
HELLO_FIXED_SIZE: Final = 36
MAX_ID_BYTES: Final = 64
AUTH_SIZE: Final = 32
NONCE_SIZE: Final = 16

_HEADER = struct.Struct(">BBI")
_unpack_header = _HEADER.unpack_from
_pack_header = _HEADER.pack
_HELLO_HEAD = struct.Struct(">4sBBIII16s")
_CLOSE_CODE = struct.Struct(">H")

_TYPES: Final = {member.value: member for member in FrameType}
_STATUSES: Final = {member.value: member for member in HealthStatus}
_STATUS_BYTES: Final = {member: bytes((member,)) for member in HealthStatus}


# Enum attribute lookups cost tens of nanoseconds each; the per-frame paths
# use these module constants instead.
_DATA: Final = FrameType.DATA
_HELLO: Final = FrameType.HELLO
_PING: Final = FrameType.PING
_PONG: Final = FrameType.PONG
_CLOSE: Final = FrameType.CLOSE


@final
@dataclass(frozen=True, slots=True)
class Hello:
    """The values of a HELLO frame (THB/1 §3), times in milliseconds as on the wire."""

    role: Role
    status: HealthStatus
    interval_ms: int
    timeout_ms: int
    max_frame: int
    nonce: bytes
    instance_id: str = ""
    auth: bytes = b""


@final
@dataclass(frozen=True, slots=True)
class Ping:
    """A PING frame: 8 opaque bytes for the PONG to echo, and the sender's health."""

    opaque: bytes
    status: HealthStatus


@final
@dataclass(frozen=True, slots=True)
class Pong:
    """A PONG frame: the opaque bytes of the PING it answers, and the sender's health."""

    opaque: bytes
    status: HealthStatus


@final
@dataclass(frozen=True, slots=True)
class Close:
    """A CLOSE frame: a close code (a :class:`CloseCode` where it names one) and a reason."""

    code: int
    reason: str


#: One decoded frame. A DATA frame is its payload, as :class:`bytes`: it needs
#: no parsing, and an object per DATA frame would cost the codec more than a
#: third of its speed; every other type is parsed into its own value.
Frame: TypeAlias = bytes | Hello | Ping | Pong | Close


def _protocol_error(message: str, code: int = CloseCode.PROTOCOL_ERROR) -> RemoteProtocolError:
    return RemoteProtocolError(message, code)


def decode_status(raw: int) -> HealthStatus:
    """Map a health byte to :class:`HealthStatus`; anything else is a 1002."""
    status = _STATUSES.get(raw)
    if status is None:
        raise _protocol_error(f"unknown health status {raw}")
    return status


@final
class FrameDecoder:
    """Turns a byte stream into frames, checking every header and parsing every payload.

    >>> decoder = FrameDecoder()
    >>> decoder.receive_data(bytes.fromhex("02000000000268"))
    >>> decoder.next_frame() is None  # one payload byte still missing
    True
    >>> decoder.receive_data(b"i" + bytes.fromhex("030000000009") + bytes(8) + b"\\x01")
    >>> decoder.frames()  # a DATA frame is its payload; the others are typed
    [b'hi', Ping(opaque=b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00', status=<HealthStatus.DEGRADED: 1>)]

    ``max_frame`` is the payload limit in force; it starts at the handshake
    limit of 512 bytes and the protocol raises it once the handshake is done.
    Errors are sticky: after one :class:`RemoteProtocolError` the decoder raises
    the same error again rather than try to resynchronise. Nothing at or after
    a malformed frame can ever become a frame, so from the moment the decoder
    finds one it lets go of the bytes it holds, and :meth:`receive_data` drops
    whatever arrives later: a peer that keeps sending cannot grow the buffer.
    """

    __slots__ = ("_buffer", "_error", "_position", "max_frame")

    def __init__(self, max_frame: int = HANDSHAKE_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = b""
        self._position = 0
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """How many received bytes are waiting to become a frame."""
        return len(self._buffer) - self._position

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes from the transport; no frame is decoded until :meth:`next_frame`.

        Never raises: after a malformed frame the bytes are dropped, and the
        sticky error comes from the next :meth:`next_frame` or :meth:`frames`.
        """
        if not data or self._error is not None:
            return
        if self._position >= len(self._buffer):
            # The common case: everything before was consumed, so no copy at all.
            self._buffer = bytes(data)
        else:
            self._buffer = self._buffer[self._position :] + data
        self._position = 0

    def next_frame(self) -> Frame | None:
        """Return the next whole frame, or ``None`` until more bytes arrive.

        Raises :class:`RemoteProtocolError` (sticky) for a malformed frame,
        with code 1009 for a length over ``max_frame``.
        """
        frames = self._decode(1)
        return frames[0] if frames else None

    def frames(self) -> list[Frame]:
        """Every whole frame buffered so far, in order; an empty list means more bytes are needed.

        Frames that precede a malformed one are returned first; the
        :class:`RemoteProtocolError` is raised by the next call, and by every
        call after it. This batch form is the fast path the protocol core uses.
        """
        return self._decode(0)

    def _decode(self, most: int) -> list[Frame]:
        # ``most`` is 0 for "all of them", else a count; kept out of the loop's
        # condition so that the batch path pays nothing for it.
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        position = self._position
        available = len(buffer)
        last_header = available - HEADER_SIZE
        limit = self.max_frame
        out: list[Frame] = []
        append = out.append
        error: RemoteProtocolError | None = None
        while position <= last_header:
            raw_type, flags, length = _unpack_header(buffer, position)
            start = position + HEADER_SIZE
            end = start + length
            if raw_type == 2 and not flags and length <= limit:
                # DATA, decided with the fewest operations: the common case.
                if end > available:
                    break
                append(buffer[start:end])
            else:
                frame_type = _TYPES.get(raw_type)
                if (
                    frame_type is None
                    or flags
                    or length > limit
                    or not _SIZES[frame_type][0] <= length <= _SIZES[frame_type][1]
                ):
                    error = _header_error(raw_type, flags, length, limit)
                    break
                if end > available:
                    break
                try:
                    append(_PARSERS[frame_type](buffer[start:end]))
                except RemoteProtocolError as exc:
                    error = exc
                    break
                if frame_type is _HELLO:
                    # The limit in force changes once a HELLO is handled: decode
                    # nothing past it until the caller has seen it.
                    most = len(out)
            position = end
            if most and len(out) == most:
                break
        if error is None:
            self._position = position
            return out
        # Sticky from now on, and nothing at or after the bad frame is kept;
        # the frames decoded before it are still returned first.
        self._error = error
        self._buffer = b""
        self._position = 0
        if not out:
            raise error
        return out


def _parse_ping(payload: bytes) -> Ping:
    return Ping(payload[:OPAQUE_SIZE], decode_status(payload[OPAQUE_SIZE]))


def _parse_pong(payload: bytes) -> Pong:
    return Pong(payload[:OPAQUE_SIZE], decode_status(payload[OPAQUE_SIZE]))


def _parse_close(payload: bytes) -> Close:
    close = Close(*decode_close(payload))
    if close.code == CloseCode.ABNORMAL_CLOSURE:
        # THB/1 §5.5: 1006 only ever describes an ending locally; on the wire
        # it is a protocol error, and is not echoed.
        raise _protocol_error("CLOSE with code 1006, which is never sent")
    return close


#: The payload sizes each control frame type may have, inclusive; DATA is
#: bounded by ``max_frame`` alone.
_SIZES: Final[dict[FrameType, tuple[int, float]]] = {
    _HELLO: (HELLO_FIXED_SIZE, inf),
    _PING: (PING_SIZE, PING_SIZE),
    _PONG: (PING_SIZE, PING_SIZE),
    _CLOSE: (2, 2 + MAX_CLOSE_REASON),
}


def _header_error(raw_type: int, flags: int, length: int, limit: int) -> RemoteProtocolError:
    # Only reached on the error path, so the order of the checks costs nothing
    # on the hot path.
    frame_type = _TYPES.get(raw_type)
    if frame_type is None:
        return _protocol_error(f"unknown frame type 0x{raw_type:02x}")
    if flags:
        return _protocol_error(f"reserved flags set: 0x{flags:02x}")
    if frame_type in (FrameType.PING, FrameType.PONG) and length != PING_SIZE:
        return _protocol_error(f"{frame_type.name} payload must be {PING_SIZE} bytes, not {length}")
    if length > limit:
        return _protocol_error(
            f"{frame_type.name} frame of {length} bytes exceeds the limit of {limit}",
            CloseCode.TOO_BIG,
        )
    if frame_type is FrameType.CLOSE:
        return _protocol_error(f"CLOSE payload must be 2 to 125 bytes, not {length}")
    return _protocol_error(f"HELLO payload of {length} bytes is shorter than {HELLO_FIXED_SIZE}")


# -- encoders ---------------------------------------------------------------


def encode_frame(frame_type: FrameType, payload: bytes = b"") -> bytes:
    """Encode one frame: header and payload.

    >>> encode_frame(FrameType.DATA, b"hi").hex(" ")
    '02 00 00 00 00 02 68 69'
    """
    return _pack_header(frame_type, 0, len(payload)) + payload


def encode_data(payload: bytes) -> bytes:
    """Encode a DATA frame."""
    return _pack_header(2, 0, len(payload)) + payload  # 2: DATA, without an enum lookup


def encode_ping(opaque: bytes, status: HealthStatus) -> bytes:
    """Encode a PING with 8 opaque bytes and the sender's health status."""
    return _encode_heartbeat(FrameType.PING, opaque, status)


def encode_pong(opaque: bytes, status: HealthStatus) -> bytes:
    """Encode the PONG that answers a PING with these opaque bytes."""
    return _encode_heartbeat(FrameType.PONG, opaque, status)


def _encode_heartbeat(frame_type: FrameType, opaque: bytes, status: HealthStatus) -> bytes:
    if len(opaque) != OPAQUE_SIZE:
        raise LocalProtocolError(
            f"PING/PONG opaque data must be {OPAQUE_SIZE} bytes", CloseCode.PROTOCOL_ERROR
        )
    status_byte = _STATUS_BYTES.get(status)
    if status_byte is None:  # not a HealthStatus: an int that may name one, or raises
        status_byte = bytes((HealthStatus(status),))
    return _pack_header(frame_type, 0, PING_SIZE) + opaque + status_byte


def truncate_reason(reason: str) -> bytes:
    """Encode ``reason`` as UTF-8, cut at a character boundary to fit a CLOSE frame."""
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_CLOSE_REASON:
        return raw
    return raw[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")


def encode_close(code: int, reason: str = "") -> bytes:
    """Encode a CLOSE frame; a reason over 123 bytes is truncated, not refused.

    >>> encode_close(1000).hex(" ")
    '05 00 00 00 00 02 03 e8'

    Any 16-bit code but 1006 is accepted. 1006 describes an ending without a
    CLOSE and is never sent (THB/1 §5.5), and a code outside 0 to 65535
    cannot be put on the wire at all: both raise :class:`ValueError`, a bad
    argument rather than a protocol violation.
    """
    if not 0 <= code <= 0xFFFF:
        raise ValueError(f"close code must be 0 to 65535, not {code}")
    if code == CloseCode.ABNORMAL_CLOSURE:
        raise ValueError("close code 1006 is never sent: it says a connection ended without CLOSE")
    payload = _CLOSE_CODE.pack(code) + truncate_reason(reason)
    return _pack_header(FrameType.CLOSE, 0, len(payload)) + payload


def decode_close(payload: bytes) -> tuple[int, str]:
    """Split a CLOSE payload into its code and reason; a reason that is not UTF-8 is 1002."""
    (code,) = _CLOSE_CODE.unpack_from(payload)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _protocol_error("CLOSE reason is not valid UTF-8") from exc
    try:
        return CloseCode(code), reason
    except ValueError:
        return code, reason


def encode_hello(hello: Hello) -> bytes:
    """Encode a HELLO frame, header included; see THB/1 §3 for the layout."""
    instance_id = hello.instance_id.encode("utf-8")
    if len(instance_id) > MAX_ID_BYTES:
        raise LocalProtocolError(
            f"instance id is {len(instance_id)} bytes in UTF-8; the limit is {MAX_ID_BYTES}",
            CloseCode.PROTOCOL_ERROR,
        )
    if len(hello.nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes", CloseCode.PROTOCOL_ERROR)
    if len(hello.auth) not in (0, AUTH_SIZE):
        raise LocalProtocolError(f"auth must be 0 or {AUTH_SIZE} bytes", CloseCode.PROTOCOL_ERROR)
    payload = b"".join(
        (
            _HELLO_HEAD.pack(
                HELLO_MAGIC,
                hello.role,
                hello.status,
                hello.interval_ms,
                hello.timeout_ms,
                hello.max_frame,
                hello.nonce,
            ),
            bytes((len(instance_id),)),
            instance_id,
            bytes((len(hello.auth),)),
            hello.auth,
        )
    )
    return encode_frame(FrameType.HELLO, payload)


def decode_hello(payload: bytes) -> Hello:
    """Parse and validate a HELLO payload; every defect is a 1002.

    Checks the magic, the role and status bytes, the ranges the protocol
    fixes (interval and timeout at least 1 ms, ``max_frame`` at least 1024),
    the id's length and encoding, the auth length and the exact total size.
    Whether the values are acceptable to *this* side is the state machine's
    business, not the codec's.
    """
    if len(payload) < HELLO_FIXED_SIZE:
        raise _protocol_error("HELLO is too short")
    magic, role, status, interval_ms, timeout_ms, max_frame, nonce = _HELLO_HEAD.unpack_from(
        payload
    )
    if magic != HELLO_MAGIC:
        raise _protocol_error(f"bad HELLO magic 0x{magic.hex()}, not THB1")
    if role not in (Role.SERVER, Role.CLIENT):
        raise _protocol_error(f"unknown HELLO role {role}")
    if interval_ms < 1 or timeout_ms < 1:
        raise _protocol_error("HELLO interval and timeout must be at least 1 ms")
    if max_frame < MIN_MAX_FRAME:
        raise _protocol_error(f"HELLO max_frame {max_frame} is below {MIN_MAX_FRAME}")
    id_len = payload[34]
    if id_len > MAX_ID_BYTES:
        raise _protocol_error(f"HELLO id length {id_len} is over {MAX_ID_BYTES}")
    auth_at = HELLO_FIXED_SIZE - 1 + id_len
    if len(payload) <= auth_at:
        raise _protocol_error("HELLO is shorter than its id length says")
    auth_len = payload[auth_at]
    if auth_len not in (0, AUTH_SIZE):
        raise _protocol_error(f"HELLO auth length must be 0 or {AUTH_SIZE}, not {auth_len}")
    if len(payload) != HELLO_FIXED_SIZE + id_len + auth_len:
        raise _protocol_error("HELLO length does not match its id and auth lengths")
    try:
        instance_id = payload[35:auth_at].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _protocol_error("HELLO id is not valid UTF-8") from exc
    return Hello(
        role=Role(role),
        status=decode_status(status),
        interval_ms=interval_ms,
        timeout_ms=timeout_ms,
        max_frame=max_frame,
        nonce=nonce,
        instance_id=instance_id,
        auth=payload[auth_at + 1 :],
    )


#: How each control frame's payload becomes its value (DATA needs no parsing).
_PARSERS: Final[dict[FrameType, Callable[[bytes], Frame]]] = {
    _HELLO: decode_hello,
    _PING: _parse_ping,
    _PONG: _parse_pong,
    _CLOSE: _parse_close,
}
