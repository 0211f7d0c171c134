"""The registry's records (``_instances.py``): instances, their keys and values, and the live set.

What it pins: an instance's names, address, health and metadata are checked
when it is made, and its record stays within MAX_VALUE_BYTES; the stored value
is compact JSON that decodes to the same instance, and anything else is a
ValueError; the live set answers a range read with the differences from what
it had, and a watch batch with one event per real change in revision order,
skipping changes it already took, keys of other services or deeper paths,
and values it cannot read (counted, never fatal); a hypothesis property: any
sequence of puts and deletes, applied as changes or read back as a range,
gives the same set.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_heartbeat._frames import HealthStatus
from trio_heartbeat._instances import (
    DEFAULT_REGISTRY_PREFIX,
    MAX_NAME_LENGTH,
    MAX_VALUE_BYTES,
    Instance,
    InstanceAdded,
    InstanceChanged,
    InstanceRemoved,
    LiveSet,
    instance_key,
    service_prefix,
)
from trio_heartbeat._leases import Change, ChangeKind, Entry


def put(instance_id: str, value: bytes, revision: int, service: str = "echo") -> Change:
    return Change(ChangeKind.PUT, instance_key(service, instance_id), value, revision)


def delete(instance_id: str, revision: int) -> Change:
    return Change(ChangeKind.DELETE, instance_key("echo", instance_id), b"", revision)


def entry(instance: Instance, revision: int = 1) -> Entry:
    return Entry(instance.key, instance.encode(), 7, revision, revision)


A = Instance("echo", "a", "127.0.0.1:7400")
B = Instance("echo", "b", "127.0.0.1:7401", HealthStatus.DEGRADED, {"zone": "z1"})


def test_an_instance_round_trips_through_its_stored_value() -> None:
    assert B.encode() == (
        b'{"address":"127.0.0.1:7401","health":"DEGRADED","metadata":{"zone":"z1"}}'
    )
    assert Instance.decode("echo", "b", B.encode()) == B
    assert B.key == "trio-heartbeat/services/echo/b"
    assert service_prefix("echo") == DEFAULT_REGISTRY_PREFIX + "echo/"
    assert instance_key("echo", "a", "x/") == "x/echo/a"
    assert hash(B) == hash(Instance("echo", "b", "127.0.0.1:7401", HealthStatus.DEGRADED))


def test_metadata_is_copied_so_the_caller_cannot_change_it() -> None:
    metadata = {"zone": "z1"}
    instance = Instance("echo", "a", "h:1", metadata=metadata)
    metadata["zone"] = "z2"
    assert instance.metadata == {"zone": "z1"}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"service": ""}, ValueError, r"^service must be 1 to 128 characters, not 0$"),
        ({"service": "x" * (MAX_NAME_LENGTH + 1)}, ValueError, r"not 129$"),
        ({"instance_id": "a/b"}, ValueError, r"^instance_id must be printable, without '/'"),
        ({"instance_id": " a"}, ValueError, r"or spaces: ' a'$"),
        ({"instance_id": "a b"}, ValueError, r"or spaces: 'a b'$"),
        ({"instance_id": "a\n"}, ValueError, r"or spaces"),
        ({"instance_id": 3}, TypeError, r"^instance_id must be a str, not int$"),
        ({"address": ""}, ValueError, r"^endpoint must be 'host:port'"),
        ({"address": "nohost"}, ValueError, r"^endpoint must be 'host:port'"),
        ({"address": "h:0"}, ValueError, r"^port must be 1 to 65535"),
        ({"address": "[::1:7"}, ValueError, r"^unbalanced brackets"),
        ({"address": "h:1\x00"}, ValueError, r"^address must be at most 300 printable characters$"),
        ({"address": "h" * 299 + ":1"}, ValueError, r"printable"),
        ({"address": b"h:1"}, TypeError, r"^address must be a str, not bytes$"),
        ({"health": 0}, TypeError, r"^health must be a HealthStatus, not 0$"),
        ({"metadata": {"a": 1}}, TypeError, r"^metadata must map str to str$"),
        ({"metadata": [("a", "b")]}, TypeError, r"^metadata must map str to str$"),
        ({"metadata": {"k": "v" * MAX_VALUE_BYTES}}, ValueError, r"bytes, over 4096$"),
    ],
)
def test_a_malformed_instance_is_refused(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    fields: dict[str, object] = {"service": "echo", "instance_id": "a", "address": "h:1"}
    fields.update(kwargs)
    with pytest.raises(error, match=message):
        Instance(**fields)  # type: ignore[arg-type]


def test_the_longest_names_and_record_are_accepted() -> None:
    name = "x" * MAX_NAME_LENGTH
    instance = Instance(name, name, "h:1")
    padding = MAX_VALUE_BYTES - len(Instance("e", "a", "h:1", metadata={"k": ""}).encode())
    assert len(Instance("e", "a", "h:1", metadata={"k": "v" * padding}).encode()) == 4096
    assert instance.service == name


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\xff", r"^not a JSON record"),
        (b"{", r"^not a JSON record"),
        (b"[]", r"^the record is not a JSON object$"),
        (b'{"address":"h:1","health":"ALIVE"}', r"^unknown health 'ALIVE'$"),
        (b'{"address":"h:1","health":0}', r"^unknown health 0$"),
        (b'{"address":"h:1"}', r"^unknown health None$"),
        (b'{"health":"SERVING"}', r"^address must be a str, not NoneType$"),
        (b'{"address":"h:1","health":"SERVING","metadata":{"a":[]}}', r"map str to str"),
        (b'{"address":"nohost","health":"SERVING"}', r"^endpoint must be 'host:port'"),
        (b"[" * 2000 + b"]" * 2000, r"^not a JSON record: maximum recursion depth"),
        (b'{"address":""' + b" " * MAX_VALUE_BYTES + b"}", r"^a record of 4110 bytes, over 4096$"),
    ],
)
def test_a_value_that_is_not_a_record_is_a_value_error(value: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Instance.decode("echo", "a", value)


def test_a_record_without_metadata_decodes_with_none() -> None:
    value = json.dumps({"address": "h:1", "health": "NOT_SERVING"}).encode()
    assert Instance.decode("echo", "a", value) == Instance(
        "echo", "a", "h:1", HealthStatus.NOT_SERVING
    )


def test_a_reset_answers_with_the_differences_in_id_order() -> None:
    live = LiveSet("echo")
    assert repr(live) == "<LiveSet 'echo': 0 at revision 0>"
    assert live.reset([entry(B), entry(A)], 4) == (InstanceAdded(A, 4), InstanceAdded(B, 4))
    assert list(live.instances) == ["a", "b"]
    assert len(live) == 2
    c = Instance("echo", "c", "h:3")
    b2 = Instance("echo", "b", "h:9")
    assert live.reset([entry(b2), entry(c), entry(A)], 9) == (
        InstanceChanged(b2, B, 9),
        InstanceAdded(c, 9),
    )
    assert live.reset([entry(c)], 12) == (
        InstanceRemoved(A, 12),
        InstanceRemoved(b2, 12),
    )
    assert live.revision == 12
    assert live.reset([entry(c)], 3) == ()  # the store's history started again
    assert live.revision == 3
    assert repr(live) == "<LiveSet 'echo': 1 at revision 3>"


def test_apply_gives_one_event_per_real_change_in_order() -> None:
    live = LiveSet("echo")
    live.reset([], 2)
    b_serving = Instance("echo", "b", "127.0.0.1:7401", metadata={"zone": "z1"})
    events = live.apply(
        [
            put("a", A.encode(), 3),
            put("b", B.encode(), 4),
            put("a", A.encode(), 5),  # the same record again: no event
            put("b", b_serving.encode(), 6),
            delete("a", 7),
            delete("a", 8),  # already gone: no event
        ]
    )
    assert events == (
        InstanceAdded(A, 3),
        InstanceAdded(B, 4),
        InstanceChanged(b_serving, B, 6),
        InstanceRemoved(A, 7),
    )
    assert live.revision == 8
    assert list(live.instances) == ["b"]


def test_apply_skips_what_it_took_already_and_what_is_not_an_instance() -> None:
    live = LiveSet("echo")
    live.reset([entry(A)], 10)
    events = live.apply(
        [
            delete("a", 9),  # taken by the range read already
            put("b", B.encode(), 11, service="other"),
            Change(ChangeKind.PUT, service_prefix("echo") + "b/deeper", B.encode(), 12),
            Change(ChangeKind.PUT, service_prefix("echo"), B.encode(), 13),
            put("c", b"garbage", 14),
        ]
    )
    assert events == ()
    assert live.revision == 14
    assert list(live.instances) == ["a"]
    assert live.malformed == 1


def test_one_revision_may_remove_several_instances() -> None:
    live = LiveSet("echo")
    live.reset([entry(A), entry(B)], 3)
    assert live.apply([delete("a", 4), delete("b", 4)]) == (
        InstanceRemoved(A, 4),
        InstanceRemoved(B, 4),
    )
    assert live.revision == 4


def test_a_value_that_turns_malformed_removes_the_instance() -> None:
    live = LiveSet("echo")
    deeper = Entry(instance_key("echo", "b") + "/deeper", B.encode(), None, 1, 1)
    live.reset([entry(A), Entry(instance_key("echo", "x"), b"{}", None, 1, 1), deeper], 5)
    assert live.malformed == 1
    assert list(live.instances) == ["a"]
    assert live.apply([put("a", b"not json", 6)]) == (InstanceRemoved(A, 6),)
    assert live.malformed == 2


def test_another_prefix_is_followed_as_given() -> None:
    live = LiveSet("echo", prefix="fleet/")
    key = instance_key("echo", "a", prefix="fleet/")
    assert live.apply([Change(ChangeKind.PUT, key, A.encode(), 1)]) == (InstanceAdded(A, 1),)
    assert live.apply([put("b", B.encode(), 2)]) == ()  # under the default prefix


ids = st.sampled_from(["a", "b", "c", "d"])
addresses = st.sampled_from(["h:1", "h:2", "h:3"])
operations = st.lists(st.tuples(ids, st.none() | addresses), max_size=40)


@given(operations)
def test_watched_changes_and_a_range_read_agree(ops: list[tuple[str, str | None]]) -> None:
    """Applying the changes one batch at a time, or reading the final state as a range, gives the
    same live set; replaying the events on a dict gives it too."""
    watched = LiveSet("echo")
    watched.reset([], 1)
    state: dict[str, Instance] = {}
    replayed: dict[str, Instance] = {}
    for revision, (instance_id, address) in enumerate(ops, start=2):
        if address is None:
            state.pop(instance_id, None)
            change = delete(instance_id, revision)
        else:
            state[instance_id] = Instance("echo", instance_id, address)
            change = put(instance_id, state[instance_id].encode(), revision)
        for event in watched.apply([change]):
            if isinstance(event, InstanceRemoved):
                del replayed[event.instance.instance_id]
            else:
                replayed[event.instance.instance_id] = event.instance
    read = LiveSet("echo")
    read.reset([entry(instance) for instance in state.values()], len(ops) + 1)
    assert watched.instances == read.instances == dict(sorted(state.items()))
    assert replayed == state


def test_the_bounds_are_inclusive_and_the_record_canonical() -> None:
    assert Instance("e", "a", "h:1").address == "h:1"
    assert len(Instance("e", "a", "h" * 296 + ":100").address) == 300
    shuffled = Instance("e", "a", "h:1", metadata={"z": "1", "a": "2"})
    assert shuffled.encode().endswith(b'"metadata":{"a":"2","z":"1"}}')  # the same bytes always
    padding = MAX_VALUE_BYTES - len(Instance("e", "a", "h:1", metadata={"k": ""}).encode())
    largest = Instance("e", "a", "h:1", metadata={"k": "v" * padding})
    assert Instance.decode("e", "a", largest.encode()) == largest  # 4096 bytes exactly


def test_keys_name_what_is_wrong_with_them() -> None:
    with pytest.raises(ValueError, match=r"^service must be printable"):
        service_prefix("a/b")
    with pytest.raises(ValueError, match=r"^instance_id must be printable"):
        instance_key("echo", "a/b")
