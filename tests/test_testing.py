"""The test kit's user guide (docs/testing.md): every example in it runs.

A cross-cutting suite: the examples use the whole kit through its public
names (``trio_heartbeat.testing``: the in-memory pair, the wrapper, the proxy,
the memory network and the fleet helpers) and the reconnecting client, so no
single module owns them. Each example defines ``test_`` functions, which are
run here, under a MockClock when they ask for ``autojump_clock``.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

DOCS = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def doc_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_user_guide_has_examples() -> None:
    assert len(doc_examples()) >= 4


@pytest.mark.parametrize("index", range(len(doc_examples())))
def test_user_guide_example_runs(index: int) -> None:
    namespace: dict[str, Any] = {"__name__": f"testing_md_{index}"}
    exec(compile(doc_examples()[index], f"{DOCS}:example{index}", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
    assert tests, "every example in docs/testing.md defines a test_ function"
    for fn in tests:
        if "autojump_clock" in inspect.signature(fn).parameters:
            clock = MockClock(autojump_threshold=0)
            trio.run(fn, clock, clock=clock)
        else:
            trio.run(fn)
