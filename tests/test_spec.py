"""The published specification (docs/protocol.md) against the code and the test vectors.

THB/1 §7 gives the test vectors byte for byte; the tests read them from
``tests/vectors.py``. This checks that the page and the module hold the same
bytes, so that neither can drift from the other.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import vectors

SPEC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

# A bold name at the start of a line, its description (any lines that do not
# open a fence), then one ```text block of hex bytes.
_VECTOR = re.compile(
    r"^\*\*(?P<name>[a-z0-9-]+)\*\*[^\n]*(?:\n(?!```)[^\n]*)*\n```text\n(?P<hex>[0-9a-f \n]+?)\n```",
    re.MULTILINE,
)


def spec_vectors(text: str) -> dict[str, bytes]:
    """Every test vector of THB/1 §7, by name, as bytes."""
    start = text.index("\n## 7. Test vectors\n")
    end = text.index("\n## ", start + 1)
    found: dict[str, bytes] = {}
    for match in _VECTOR.finditer(text[start:end]):
        assert match["name"] not in found, f"vector {match['name']} appears twice"
        found[match["name"]] = bytes.fromhex(match["hex"])  # skips spaces and newlines
    return found


def test_the_spec_vectors_are_the_test_vectors() -> None:
    auth_input = b"THB1-auth" + vectors.SERVER_NONCE + vectors.CLIENT_NONCE + b"node-1"
    client_auth = hmac.new(vectors.KEY, auth_input, hashlib.sha256).digest()
    assert vectors.CLIENT_HELLO[-32:] == client_auth
    assert spec_vectors(SPEC.read_text(encoding="utf-8")) == {
        "server-nonce": vectors.SERVER_NONCE,
        "client-nonce": vectors.CLIENT_NONCE,
        "key": vectors.KEY,
        "server-hello": vectors.SERVER_HELLO,
        "auth-input": auth_input,
        "client-auth": client_auth,
        "client-hello": vectors.CLIENT_HELLO,
        "ping": vectors.PING,
        "pong": vectors.PONG,
        "data": vectors.DATA_HI,
        "close": vectors.CLOSE_1011,
    }


def test_a_changed_byte_in_the_page_is_caught() -> None:
    text = SPEC.read_text(encoding="utf-8")
    start = text.index("\n## 7. Test vectors\n")
    at = text.index("54 48 42 31", start)  # the magic of the server's HELLO
    changed = text[:at] + "54 48 42 32" + text[at + len("54 48 42 31") :]
    assert spec_vectors(changed)["server-hello"] != vectors.SERVER_HELLO


def test_every_section_reference_in_the_code_names_a_section_of_the_spec() -> None:
    """``THB/1 §4.2`` in a docstring or comment must name a section that exists."""
    text = SPEC.read_text(encoding="utf-8")
    sections = set(re.findall(r"^\(thb-spec-([0-9-]+)\)=$", text, re.MULTILINE))
    assert {"1", "2", "4", "4-2", "7"} <= sections
    root = SPEC.parents[1]
    cited: set[tuple[str, str]] = set()
    for path in [*root.glob("trio_heartbeat/**/*.py"), *root.glob("tests/*.py")]:
        for match in re.finditer(r"THB/1 §(\d+(?:\.\d+)?)", path.read_text(encoding="utf-8")):
            cited.add((path.name, match[1].replace(".", "-")))
    assert cited
    assert {(name, section) for name, section in cited if section not in sections} == set()
