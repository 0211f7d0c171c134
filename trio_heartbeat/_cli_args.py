"""The command line's arguments: the parser, the value types, and the settings they make.

:func:`build_parser` describes ``python -m trio_heartbeat`` and its commands;
:func:`_config` and :func:`_options` turn the parsed arguments into the
:class:`Config` and :class:`ConnectionOptions` a command runs with, a value
that cannot be used raising :exc:`UsageError` (printed, exit status 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Final

from ._adaptive import AdaptiveDetector
from ._config import Config
from ._detectors import FailureDetector, FixedTimeout
from ._errors import UsageError
from ._options import ConnectionOptions

__all__ = ["DEFAULT_PORT", "build_parser"]

DEFAULT_PORT: Final = 7400


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _port(text: str) -> int:
    # Checked here: the socket layer would silently take the port modulo 65536.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535: {text!r}")
    return value


#: The failure detectors ``--detector`` picks from.
_DETECTORS: dict[str, Callable[[], FailureDetector]] = {
    "adaptive": AdaptiveDetector,
    "fixed": FixedTimeout,
}


def _options(args: argparse.Namespace) -> ConnectionOptions:
    return ConnectionOptions(detector=_DETECTORS[args.detector])


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("heartbeat")
    group.add_argument(
        "--interval",
        type=_positive,
        default=1.0,
        metavar="S",
        help="heartbeat interval when idle, seconds (default: 1)",
    )
    group.add_argument(
        "--timeout",
        type=_positive,
        default=3.0,
        metavar="S",
        help="longest silence before the peer is declared dead, seconds (default: 3)",
    )
    group.add_argument(
        "--detector",
        choices=sorted(_DETECTORS),
        default="adaptive",
        help="failure detector: 'adaptive' learns the peer's rhythm and may convict sooner "
        "than --timeout (never before two intervals); 'fixed' waits for --timeout "
        "(default: adaptive)",
    )
    group.add_argument(
        "--handshake-timeout",
        type=_positive,
        default=10.0,
        metavar="S",
        help="time allowed for the THB/1 handshake, seconds (default: 10)",
    )
    group.add_argument(
        "--secret-file",
        type=Path,
        metavar="F",
        help="file holding the pre-shared HMAC key (THB/1 §6, docs/protocol.md)",
    )
    group.add_argument("--id", default="", metavar="NAME", help="this instance's id, sent in HELLO")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also log every PING and PONG (debug level)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m trio_heartbeat`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_heartbeat",
        description="THB/1 heartbeats over TCP: an echo server, a reconnecting client, a demo.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {metadata.version('trio-heartbeat')}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run an echo server",
        description="Echo every DATA frame back. Ctrl-C or SIGTERM drains.",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"port to listen on; 0 picks a free one (default: {DEFAULT_PORT})",
    )
    serve.add_argument(
        "--max-connections",
        type=_at_least_one,
        default=4096,
        metavar="N",
        help="refuse clients beyond N with CLOSE 1013 (default: 4096)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=_positive,
        default=10.0,
        metavar="S",
        help="how long a drain waits for peers to close (default: 10)",
    )
    serve.add_argument(
        "--health-port",
        type=_port,
        metavar="P",
        help="serve HTTP probes on port P (0 picks one; prints 'health on HOST:PORT'): "
        "/livez, /readyz (200 while SERVING), /peers (needs the 'health' extra)",
    )
    serve.add_argument(
        "--health-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the probes (default: 127.0.0.1)",
    )
    registering = serve.add_argument_group("service registry")
    registering.add_argument(
        "--register",
        metavar="etcd://HOST:PORT",
        help="register in etcd while SERVING (several members comma-separated); withdrawn at "
        "the drain, gone within the TTL if the process dies or hangs (needs the 'etcd' extra)",
    )
    registering.add_argument("--service", metavar="NAME", help="the service to register as")
    registering.add_argument(
        "--ttl",
        type=_positive,
        default=10.0,
        metavar="S",
        help="the registration's lease, renewed every S/3 (default: 10)",
    )
    registering.add_argument(
        "--publish-peers",
        metavar="SERVICE",
        help="also publish the connected peers (those with an --id) as instances of SERVICE, "
        "under this server's lease",
    )
    registering.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="the address clients dial (default: the one listened on)",
    )
    _add_common(serve)

    connect = commands.add_parser(
        "connect",
        help="connect and reconnect; stdin lines go out, messages come in",
        description="Send each stdin line as DATA and print each DATA received. Reconnects with "
        "full-jitter backoff until interrupted.",
    )
    connect.add_argument(
        "endpoints", nargs="*", metavar="HOST:PORT", help="server(s) to connect to"
    )
    connect.add_argument(
        "--discover",
        metavar="etcd://HOST:PORT/SERVICE",
        help="dial the live instances of SERVICE registered in etcd, instead of HOST:PORT",
    )
    connect.add_argument(
        "--backoff-cap",
        type=_positive,
        default=30.0,
        metavar="S",
        help="longest wait between attempts (default: 30)",
    )
    connect.add_argument(
        "--rtt-every",
        type=_positive,
        default=5.0,
        metavar="S",
        help="report the round trip at most this often (default: 5)",
    )
    connect.add_argument(
        "--linger",
        type=_positive,
        default=1.0,
        metavar="S",
        help="at the end of input, close once no message has come for S seconds (default: 1)",
    )
    _add_common(connect)

    registry = commands.add_parser(
        "registry",
        help="list or watch the live instances of a service in etcd",
        description="list: one line per live instance (ID ADDRESS HEALTH); watch: the live "
        "ones, then every change (added, changed, removed, stale) as it happens.",
    )
    registry.add_argument("action", choices=["list", "watch"], help="list once, or watch")
    registry.add_argument("url", metavar="etcd://HOST:PORT/SERVICE", help="etcd and the service")
    registry.add_argument("-v", "--verbose", action="store_true", help="log at debug level")

    demo = commands.add_parser(
        "demo", help="watch failure detection and reconnection, in one process"
    )
    demo.add_argument("--fast", action="store_true", help="shorter pauses (for tests)")
    return parser


def _config(args: argparse.Namespace) -> Config:
    secret = None
    if args.secret_file is not None:
        try:
            secret = args.secret_file.read_bytes().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --secret-file: {exc}") from exc
        if not secret:
            raise UsageError("--secret-file is empty")
    if args.timeout <= args.interval:
        raise UsageError("--timeout must be longer than --interval")
    try:
        return Config(
            interval=args.interval,
            timeout=args.timeout,
            handshake_timeout=args.handshake_timeout,
            instance_id=args.id,
            secret=secret,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
