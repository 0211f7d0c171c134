"""Addresses (``_address.py``): ``host:port``, an IPv6 host in brackets, parsed and printed.

Parsed from strings and tuples, every malformed one refused with what is
wrong with it, printed with brackets around an IPv6 host, and printed ones
parse back (hypothesis, over arbitrary addresses and names).
"""

from __future__ import annotations

import doctest
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_heartbeat import _address
from trio_heartbeat._address import format_endpoint, is_single_endpoint, parse_endpoint


@pytest.mark.parametrize(
    ("endpoint", "parsed"),
    [
        ("127.0.0.1:7400", ("127.0.0.1", 7400)),
        ("example.org:80", ("example.org", 80)),
        ("[::1]:7400", ("::1", 7400)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        (("example.org", 80), ("example.org", 80)),
        (("::1", 7400), ("::1", 7400)),
    ],
)
def test_parse_endpoint(endpoint: str | tuple[str, int], parsed: tuple[str, int]) -> None:
    assert parse_endpoint(endpoint) == parsed


@pytest.mark.parametrize("endpoint", ["no-port", "host:", "host:http", "host:-1", ""])
def test_parse_endpoint_refuses_what_is_not_host_and_port(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint must be 'host:port' or \\(host, port\\)"):
        parse_endpoint(endpoint)


@pytest.mark.parametrize(
    ("endpoint", "error", "message"),
    [
        ("127.0.0.1:0", ValueError, "port must be 1 to 65535 in the endpoint '127.0.0.1:0'"),
        ("h:65536", ValueError, "port must be 1 to 65535 in the endpoint 'h:65536'"),
        (":7400", ValueError, "no host in the endpoint ':7400'"),
        ("[]:7400", ValueError, "no host in the endpoint"),
        ("[::1:7400", ValueError, "unbalanced brackets in the endpoint"),
        ("h:\u0661", ValueError, "endpoint must be 'host:port'"),  # a digit, but not ASCII
        (("h", "80"), TypeError, "an endpoint tuple must be \\(host, port\\)"),
        (("h", True), TypeError, "an endpoint tuple must be \\(host, port\\)"),
        (("h", 80, 1), TypeError, "an endpoint tuple must be \\(host, port\\)"),
        (("", 80), ValueError, "^no host in the endpoint \\('', 80\\)$"),
        (("h", 0), ValueError, "^port must be 1 to 65535 in the endpoint \\('h', 0\\)$"),
        ("::1]:7400", ValueError, "^unbalanced brackets in the endpoint '::1]:7400'$"),
    ],
    ids=[
        "port-0",
        "port-too-big",
        "no-host",
        "empty-brackets",
        "unbalanced",
        "arabic-digit",
        "str-port",
        "bool-port",
        "triple",
        "tuple-no-host",
        "tuple-port-0",
        "unbalanced-closing",
    ],
)
def test_parse_endpoint_says_what_is_wrong(
    endpoint: Any, error: type[Exception], message: str
) -> None:
    """Every endpoint is checked where it is given, so a bad one never reaches a connect (#10)."""
    with pytest.raises(error, match=message):
        parse_endpoint(endpoint)


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 7400, "127.0.0.1:7400"),
        ("example.org", 80, "example.org:80"),
        ("::1", 7400, "[::1]:7400"),
        ("fe80::1%eth0", 22, "[fe80::1%eth0]:22"),
    ],
)
def test_format_endpoint_brackets_an_ipv6_host(host: str, port: int, text: str) -> None:
    assert format_endpoint(host, port) == text


@given(
    host=st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5})?", fullmatch=True),
    ),
    port=st.integers(min_value=1, max_value=65535),
)
def test_what_is_printed_parses_back(host: str, port: int) -> None:
    assert parse_endpoint(format_endpoint(host, port)) == (host, port)


def test_one_endpoint_is_told_from_a_list_of_them() -> None:
    assert is_single_endpoint(("example.org", 80))
    assert not is_single_endpoint(("a:1", "b:2"))
    assert not is_single_endpoint(("h", True))
    assert not is_single_endpoint("h:1")


def test_doctests() -> None:
    results = doctest.testmod(_address)
    assert results.attempted > 0
    assert results.failed == 0
