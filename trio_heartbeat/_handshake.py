"""The THB/1 handshake as pure functions: build our HELLO, judge the peer's, agree on timing.

Nothing here keeps state or does I/O. The state machine calls
:func:`build_hello` for the HELLO it sends, :func:`check_peer_hello` for the
one it receives (which raises the :class:`RemoteProtocolError` that refuses
the peer), and :func:`agree` for the intervals both sides then keep (THB/1 §3,
§4 and §6).
"""

from __future__ import annotations

import hmac
from hashlib import sha256
from typing import Final, NamedTuple

from ._config import Config
from ._errors import RemoteProtocolError
from ._frames import AUTH_SIZE, CloseCode, HealthStatus, Hello, Role

__all__ = ["CLIENT_LEAD", "Timing", "agree", "build_hello", "check_peer_hello", "compute_auth"]

#: A client PINGs after this fraction of its send interval of silence, not the
#: whole of it. Both sides run the same send rule, and their timers would race:
#: the server's PONG restarts the server's timer only a one-way delay after the
#: client's PING restarted the client's, so any lateness of the client makes the
#: server PING too, and every idle connection carries two heartbeats instead of
#: one. Leading by a tenth keeps the client ahead through that much jitter, so an
#: idle server only answers. On a link whose round trip is over a tenth of the
#: interval, or after a stall, the server's timer can still fire first, and the
#: server PINGs too; the client's PONG then restarts the client's timer.
#: The rate rule is untouched (a PING sooner than half the interval is a
#: strike), and sending sooner than the send rule asks is always allowed.
CLIENT_LEAD: Final = 0.9


def compute_auth(key: bytes, server_nonce: bytes, client_nonce: bytes, client_id: str) -> bytes:
    """The HELLO ``auth`` field of THB/1 §6: an HMAC-SHA256 over both nonces and the id.

    The test vector of THB/1 §7:

    >>> compute_auth(b"secret", bytes(range(16)), bytes(range(16, 32)), "node-1").hex(" ")[:23]
    '9c 33 6e 76 c7 3b f2 d9'
    """
    message = b"THB1-auth" + server_nonce + client_nonce + client_id.encode("utf-8")
    return hmac.new(key, message, sha256).digest()


def build_hello(
    role: Role,
    config: Config,
    nonce: bytes,
    status: HealthStatus,
    server_nonce: bytes | None = None,
) -> Hello:
    """The HELLO this side sends; a client signs it when it has a secret.

    ``server_nonce`` is the nonce of the server's HELLO, which a client's
    authenticator covers (THB/1 §6); a server passes nothing.
    """
    auth = b""
    if role is Role.CLIENT and config.secret is not None:
        assert server_nonce is not None
        auth = compute_auth(config.secret, server_nonce, nonce, config.instance_id)
    return Hello(
        role=role,
        status=status,
        interval_ms=config.interval_ms,
        timeout_ms=config.timeout_ms,
        max_frame=config.max_frame,
        nonce=nonce,
        instance_id=config.instance_id,
        auth=auth,
    )


def check_peer_hello(role: Role, config: Config, nonce: bytes, hello: Hello) -> None:
    """Refuse a peer HELLO this side will not honour, by raising :class:`RemoteProtocolError`.

    ``role`` and ``nonce`` are our own. The peer must play the other role
    (else 1002); its interval and timeout must lie in ``config``'s
    ``accepted_intervals`` and ``accepted_timeouts`` (else 1008); and a server
    with a secret requires the client's authenticator (else 1008). The codec
    has already checked everything THB/1 fixes for every side.
    """
    expected = Role.SERVER if role is Role.CLIENT else Role.CLIENT
    if hello.role is not expected:
        raise RemoteProtocolError(
            f"peer HELLO has role {hello.role.name}, expected {expected.name}",
            CloseCode.PROTOCOL_ERROR,
        )
    low, high = config.accepted_intervals
    if not low <= hello.interval_ms / 1000 <= high:
        raise RemoteProtocolError(
            f"peer interval {hello.interval_ms} ms is outside {low * 1000:.10g}..{high * 1000:.10g} ms",
            CloseCode.POLICY_VIOLATION,
        )
    low, high = config.accepted_timeouts
    if not low <= hello.timeout_ms / 1000 <= high:
        raise RemoteProtocolError(
            f"peer timeout {hello.timeout_ms} ms is outside {low * 1000:.10g}..{high * 1000:.10g} ms",
            CloseCode.POLICY_VIOLATION,
        )
    if role is Role.SERVER and config.secret is not None:
        expected_auth = compute_auth(config.secret, nonce, hello.nonce, hello.instance_id)
        if len(hello.auth) != AUTH_SIZE or not hmac.compare_digest(hello.auth, expected_auth):
            raise RemoteProtocolError("client authentication failed", CloseCode.POLICY_VIOLATION)


class Timing(NamedTuple):
    """The intervals both sides keep once their HELLOs have crossed (THB/1 §4), in seconds."""

    #: The send rule: silence after which this side must PING.
    send_interval: float
    #: When this side does PING: a client leads (:data:`CLIENT_LEAD`), a server does not.
    ping_after: float
    #: The peer's send interval as this side sees it, which the rate rule and
    #: the silence floor are measured in.
    peer_send_interval: float


def agree(role: Role, config: Config, peer: Hello) -> Timing:
    """The send rule and the rate rule's spacing for our ``config`` and the ``peer``'s HELLO.

    >>> agree(Role.CLIENT, Config(interval=1.0, timeout=3.0), Hello(
    ...     Role.SERVER, HealthStatus.SERVING, 1000, 1500, 1024, bytes(16)))
    Timing(send_interval=0.75, ping_after=0.675, peer_send_interval=1.0)
    """
    send_interval = min(config.interval_ms, peer.timeout_ms / 2) / 1000
    lead = CLIENT_LEAD if role is Role.CLIENT else 1.0
    peer_send_interval = min(peer.interval_ms, config.timeout_ms / 2) / 1000
    return Timing(send_interval, send_interval * lead, peer_send_interval)
