"""The registry's store protocol (``_kv.py``): both backends speak it, to the letter.

What it pins: the embedded store has every operation of the protocol with the
same parameters (names, kinds, defaults) and is accepted where the protocol is
asked for (mypy checks the assignment below); a watch is an async generator,
so the registry can close it.
"""

from __future__ import annotations

import inspect

import pytest
import trio

from trio_heartbeat._kv import KeyValueStore
from trio_heartbeat._memory_store import MemoryStore, open_memory_store

OPERATIONS = ["grant", "keepalive", "revoke", "put", "delete", "range", "watch"]


def test_the_protocol_names_every_operation_the_registry_uses() -> None:
    declared = [name for name in vars(KeyValueStore) if not name.startswith("_")]
    assert sorted(declared) == sorted(OPERATIONS)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_the_memory_store_has_each_operation_with_the_same_parameters(operation: str) -> None:
    expected = inspect.signature(getattr(KeyValueStore, operation))
    actual = inspect.signature(getattr(MemoryStore, operation))
    assert list(actual.parameters.values()) == list(expected.parameters.values())
    assert inspect.iscoroutinefunction(getattr(MemoryStore, operation)) == (operation != "watch")


async def test_the_memory_store_is_a_key_value_store() -> None:
    async with open_memory_store() as memory:
        store: KeyValueStore = memory
        watch = store.watch("", 0)
        assert inspect.isasyncgen(watch)
        await watch.aclose()
        await trio.lowlevel.checkpoint()
