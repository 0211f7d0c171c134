"""etcd v3's JSON gateway without I/O: requests spelled, answers judged (sans-IO).

Theory of operation
-------------------
etcd (3.4 or newer) serves its gRPC API as JSON on its client port, one
``POST /v3/...`` per call, in protobuf's JSON mapping. This module knows the
gateway's habits, so that :mod:`trio_heartbeat._etcd` only moves bytes:

* keys and values are base64. Our keys are ``str``, sent as UTF-8; the stray
  bytes of a key someone else wrote, not UTF-8, come back as surrogates and
  go out again the same way (:func:`b64` and :func:`entries` agree);
* 64-bit numbers (revisions, lease ids, TTLs) are JSON strings, and a field
  that is zero, false or empty is left out: a key without a lease has no
  ``lease``, an empty value no ``value``, a put event no ``type``, an empty
  range no ``kvs``, and a canceled watch's header no ``revision``;
* a prefix is a range up to the prefix with its last byte one higher
  (:func:`prefix_range`); the empty prefix is every key, ``"\\0"`` up to ``"\\0"``;
* a streaming call (keepalive, watch) answers a line per message,
  ``{"result": ...}`` or ``{"error": {"grpc_code": ...}}``; a unary call
  answers the message, or a gRPC error (``{"code": 5, "message": ...}``) in a
  4xx or 5xx;
* a keepalive answer without a TTL (or with one below 1) means the lease is
  gone (:func:`renewed` says ``None``); "lease not found" comes as gRPC code 5.

:func:`judge` turns an answer into a result or the exception it stands for:
:exc:`~trio_heartbeat.StoreUnavailable` when another try (or another member)
may do better: a gRPC status of "not now", an answer that is not etcd's JSON,
or one with fields etcd does not send (any :exc:`ValueError` the reading of
a field raises); :exc:`ValueError` or :exc:`RuntimeError` when etcd refused
the request itself, the caller's mistake.

>>> judge("a:1", "/v3/lease/keepalive", 200, b'{"result": {"ID": "7"}}', renewed) is None
True
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from functools import partial
from typing import Any, Final, NoReturn, TypeAlias, TypeVar

from ._errors import StoreUnavailable, WatchCompacted
from ._leases import Change, ChangeKind, Entry

__all__ = [
    "JSON",
    "b64",
    "entries",
    "judge",
    "lease_gone",
    "lease_id",
    "prefix_range",
    "renewed",
    "revision",
    "watch_changes",
]

_T = TypeVar("_T")
#: A decoded JSON object.
JSON: TypeAlias = dict[str, Any]

#: gRPC codes of "not now" (canceled, unknown, deadline exceeded, resource
#: exhausted, aborted, internal, unavailable, data loss): another member, or
#: the same one later, may serve the request.
_UNAVAILABLE_CODES: Final = frozenset({1, 2, 4, 8, 10, 13, 14, 15})
#: gRPC codes that say the request is wrong (invalid argument, failed
#: precondition, out of range): ValueError; the other refusals, RuntimeError.
_INVALID_CODES: Final = frozenset({3, 9, 11})
_NOT_FOUND: Final = 5


# -- requests --------------------------------------------------------------------------


def b64(data: bytes | str) -> str:
    """A key (``str``) or a value (``bytes``) as the gateway spells it."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return base64.b64encode(data).decode("ascii")


def prefix_range(prefix: str) -> JSON:
    """The request fields for every key that starts with ``prefix``.

    >>> prefix_range("svc/") == {"key": b64("svc/"), "range_end": b64("svc0")}
    True
    """
    start = prefix.encode("utf-8", "surrogateescape")  # as b64 spells keys
    end = bytearray(start)
    while end and end[-1] == 0xFF:  # no byte follows 0xff: carry to the one before
        end.pop()
    if end:
        end[-1] += 1
    return {"key": b64(start or b"\0"), "range_end": b64(bytes(end) or b"\0")}


# -- the fields of answers (a ValueError: not what etcd sends) -------------------------


def _field(message: JSON, name: str, kind: type[_T], default: _T) -> _T:
    value = message.get(name, default)
    if not isinstance(value, kind) or isinstance(value, bool) is not isinstance(default, bool):
        raise ValueError(f"{name} is {value!r}")
    return value


def _number(message: JSON, name: str) -> int:
    """An int64 field: a JSON string of digits (or a number); 0 when left out."""
    value = message.get(name, 0)
    return int(value) if isinstance(value, str) else _field(message, name, int, 0)


def _positive(message: JSON, name: str) -> int:
    value = _number(message, name)
    if value < 1:
        raise ValueError(f"{name} is {value}")
    return value


def _blob(message: JSON, name: str) -> bytes:
    return base64.b64decode(_field(message, name, str, ""), validate=True)


def _key(kv: JSON) -> str:
    return _blob(kv, "key").decode("utf-8", "surrogateescape")


def _objects(message: JSON, name: str) -> list[JSON]:
    value = _field(message, name, list, [])
    if not all(isinstance(item, dict) for item in value):
        raise ValueError(f"{name} is not a list of objects")
    return value


def revision(answer: JSON) -> int:
    """The revision in an answer's header."""
    return _positive(_field(answer, "header", dict, {}), "revision")


#: The id of a granted lease.
lease_id: Final = partial(_positive, name="ID")


def entries(answer: JSON) -> tuple[list[Entry], int]:
    """A range's entries, in etcd's (key) order, and the revision it was read at."""
    found = [
        Entry(
            _key(kv),
            _blob(kv, "value"),
            _number(kv, "lease") or None,
            _number(kv, "create_revision"),
            _number(kv, "mod_revision"),
        )
        for kv in _objects(answer, "kvs")
    ]
    return found, revision(answer)


def renewed(answer: JSON) -> float | None:
    """The TTL a keepalive renewed its lease for, or ``None``: the lease is gone."""
    ttl = _number(answer, "TTL")
    return float(ttl) if ttl > 0 else None


def lease_gone(lease: int) -> NoReturn:
    """Refuse a put under ``lease``, which is gone (as the embedded store does)."""
    raise ValueError(f"lease {lease} not found")


def watch_changes(after: int, response: JSON) -> tuple[Change, ...]:
    """The changes in one watch response: none in "created" and progress reports.

    A cancellation because the watch's start was compacted raises
    :exc:`WatchCompacted` for ``after`` (the last revision given out); any
    other cancellation is a refusal (:exc:`RuntimeError`).
    """
    if not isinstance(response.get("header"), dict):
        raise ValueError("a watch response without a header")
    if response.get("canceled"):
        reason = response.get("cancel_reason") or "no reason given"
        if _number(response, "compact_revision") > 0 or "compacted" in str(reason):
            raise WatchCompacted(after)
        raise RuntimeError(f"etcd canceled the watch: {reason}")
    return tuple(_change(event) for event in _objects(response, "events"))


def _change(event: JSON) -> Change:
    kv = event.get("kv")
    if not isinstance(kv, dict):
        raise ValueError("an event without its kv")
    kind = event.get("type", "PUT")
    if kind in ("PUT", 0):
        return Change(ChangeKind.PUT, _key(kv), _blob(kv, "value"), _positive(kv, "mod_revision"))
    if kind in ("DELETE", 1):
        return Change(ChangeKind.DELETE, _key(kv), b"", _positive(kv, "mod_revision"))
    raise ValueError(f"an event of type {kind!r}")


# -- answers ---------------------------------------------------------------------------


def _grpc_error(answer: object) -> tuple[int, str] | None:
    """``(code, message)`` of a gRPC error: a unary answer's, or a stream's ``error``."""
    if not isinstance(answer, dict):
        return None
    inner = answer.get("error")
    if isinstance(inner, dict):  # a stream's: {"error": {"grpc_code": 14, "message": ...}}
        answer, code = inner, inner.get("grpc_code")
    else:  # a unary answer's: {"error": "...", "code": 5, "message": "..."}
        code = answer.get("code")
    message = answer.get("message")
    if isinstance(code, int) and not isinstance(code, bool) and code and isinstance(message, str):
        return code, message
    return None


def judge(
    endpoint: str,
    path: str,
    status: int,
    data: bytes,
    parse: Callable[[JSON], _T],
    lease_missing: Callable[[], _T] | None = None,
) -> _T:
    """What ``endpoint``'s answer to ``path`` (or a line of its stream) means:
    ``parse``'s result, ``lease_missing()``'s for "lease not found" if given,
    or the exception it stands for (see the module docstring)."""
    try:
        answer = json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        answer = None
    if status == 200 and isinstance(answer, dict) and isinstance(answer.get("result"), dict):
        answer = answer["result"]  # a stream's line
    error = _grpc_error(answer)
    if status == 200 and error is None and isinstance(answer, dict):
        try:
            return parse(answer)
        except ValueError as exc:
            raise StoreUnavailable(
                f"{endpoint} answered {path} with what etcd does not send ({exc})", endpoint
            ) from exc
    if error is None:
        raise StoreUnavailable(
            f"{endpoint} answered {path} with HTTP {status}, not etcd's JSON: {data[:100]!r}",
            endpoint,
        )
    code, message = error
    if code == _NOT_FOUND and "lease not found" in message and lease_missing is not None:
        return lease_missing()
    if code in _UNAVAILABLE_CODES:
        raise StoreUnavailable(f"{endpoint} could not serve {path}: {message}", endpoint)
    kind = ValueError if code in _INVALID_CODES else RuntimeError
    raise kind(f"etcd at {endpoint} refused {path}: {message} (gRPC code {code}, HTTP {status})")
