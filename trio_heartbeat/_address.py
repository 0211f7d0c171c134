"""How a server's address is spelled: ``host:port``, an IPv6 host in brackets (sans-IO).

One spelling everywhere: the server prints its peers this way, the command
line and the service registry parse it, the reconnecting client and the test
kit's memory network name hosts with it. Pure functions over strings, so the
registry's records (a sans-IO module) check addresses with the same rule as
the client that will dial them.
"""

from __future__ import annotations

from typing import TypeAlias

__all__ = ["Endpoint", "format_endpoint", "is_single_endpoint", "parse_endpoint"]

#: A server address: ``(host, port)``, or ``"host:port"``.
Endpoint: TypeAlias = tuple[str, int] | str


def parse_endpoint(endpoint: Endpoint) -> tuple[str, int]:
    """``(host, port)`` from ``"host:port"``, ``"[v6]:port"`` or a tuple.

    >>> parse_endpoint("[::1]:7400"), parse_endpoint(("example.org", 80))
    (('::1', 7400), ('example.org', 80))

    The host must not be empty and the port must be 1 to 65535. Raises
    :exc:`ValueError` for anything else (:exc:`TypeError` for a tuple that is
    not ``(str, int)``).
    """
    if isinstance(endpoint, tuple):
        if not is_single_endpoint(endpoint):
            raise TypeError(f"an endpoint tuple must be (host, port), not {endpoint!r}")
        host, port = endpoint
        spelled = f"{endpoint!r}"
    else:
        host, sep, digits = endpoint.rpartition(":")
        spelled = repr(endpoint)
        if not sep or not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"endpoint must be 'host:port' or (host, port), not {spelled}")
        port = int(digits)
        if host.startswith("[") or host.endswith("]"):
            if not (host.startswith("[") and host.endswith("]")):
                raise ValueError(f"unbalanced brackets in the endpoint {spelled}")
            host = host[1:-1]
    if not host:
        raise ValueError(f"no host in the endpoint {spelled}")
    if not 1 <= port <= 0xFFFF:
        raise ValueError(f"port must be 1 to 65535 in the endpoint {spelled}")
    return host, port


def is_single_endpoint(value: object) -> bool:
    # ("host", 80) is one endpoint; ("a:1", "b:2") is a list of them.
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def format_endpoint(host: str, port: int) -> str:
    """``"host:port"``, with an IPv6 host in brackets.

    >>> format_endpoint("::1", 7400)
    '[::1]:7400'
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
