"""Leased keys with revisions (``_leases.py``): etcd v3's model in miniature, sans-IO.

What it pins: a lease lives exactly until ``now`` reaches its deadline, a
keepalive renews it for its whole TTL and answers ``None`` once it is gone;
revoking or expiring a lease deletes its keys in one revision; revisions start
at 1 and each change takes the next; a key moved to another lease (or to none)
no longer goes with the first; a watcher replaying :meth:`changes` from any
revision it read arrives at the same keys as a fresh read (a hypothesis
property over random operations), and one that fell behind the bounded
history is told to read again (``None``) rather than given a partial history;
every bound and every refusal, by message; time never goes back.
"""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_heartbeat import _leases
from trio_heartbeat._leases import MAX_KEY_LENGTH, Change, ChangeKind, Entry, LeaseStore


def test_doctests() -> None:
    results = doctest.testmod(_leases)
    assert (results.failed, results.attempted) == (0, 6)


def test_a_lease_lives_exactly_until_its_deadline() -> None:
    store = LeaseStore(min_ttl=1.0)
    lease = store.grant(3.0, now=10.0)
    assert store.time_to_live(lease, now=12.5) == 0.5
    assert store.next_expiry() == 13.0
    assert store.expire(now=12.999) == ()
    assert store.time_to_live(lease, now=13.0) is None  # its deadline has come
    assert store.keepalive(lease, now=13.0) is None
    assert store.expire(now=13.0) == ()  # it had no keys: no revision
    assert store.revision == 1
    assert store.next_expiry() is None


def test_a_keepalive_renews_for_the_whole_ttl_and_old_deadlines_are_stale() -> None:
    store = LeaseStore()
    lease = store.grant(3.0, now=0.0)
    store.put("k", b"v", lease=lease)
    assert store.keepalive(lease, now=1.0) == 3.0
    assert store.keepalive(lease, now=2.0) == 3.0
    assert store.next_expiry() == 5.0  # the deadlines 3.0 and 4.0 were dropped
    assert store.expire(now=4.5) == ()
    assert store.get("k") is not None
    assert store.expire(now=5.0) == (Change(ChangeKind.DELETE, "k", b"", 3),)
    assert store.get("k") is None
    assert store.keepalive(lease, now=5.0) is None
    assert store.time_to_live(lease, now=5.0) is None


def test_revoking_deletes_every_key_of_the_lease_in_one_revision() -> None:
    store = LeaseStore()
    lease = store.grant(5.0, now=0.0)
    other = store.grant(5.0, now=0.0)
    for key in ("a", "b"):
        store.put(key, b"1", lease=lease)
    store.put("c", b"2", lease=other)
    store.put("d", b"3")
    assert store.revision == 5
    assert store.revoke(lease) == (
        Change(ChangeKind.DELETE, "a", b"", 6),
        Change(ChangeKind.DELETE, "b", b"", 6),
    )
    assert [entry.key for entry in store.range()] == ["c", "d"]
    assert store.revoke(lease) == ()  # gone already
    assert store.revoke(12345) == ()
    assert store.keepalive(lease, now=1.0) is None
    assert len(store) == 2


def test_entries_keep_their_create_revision_and_take_a_new_mod_revision() -> None:
    store = LeaseStore()
    assert store.put("k", b"1") == Change(ChangeKind.PUT, "k", b"1", 2)
    store.put("k", b"2")
    assert store.get("k") == Entry("k", b"2", None, 2, 3)
    assert store.delete("k") == Change(ChangeKind.DELETE, "k", b"", 4)
    assert store.delete("k") is None
    assert store.revision == 4


def test_a_key_moved_to_another_lease_no_longer_goes_with_the_first() -> None:
    store = LeaseStore()
    first = store.grant(5.0, now=0.0)
    second = store.grant(5.0, now=0.0)
    store.put("k", b"1", lease=first)
    store.put("k", b"2", lease=second)
    assert store.revoke(first) == ()
    assert store.get("k") == Entry("k", b"2", second, 2, 3)
    store.put("k", b"3")  # and to none
    assert store.revoke(second) == ()
    assert store.get("k") == Entry("k", b"3", None, 2, 4)


def test_a_deleted_key_leaves_its_lease() -> None:
    store = LeaseStore()
    lease = store.grant(5.0, now=0.0)
    store.put("k", b"1", lease=lease)
    store.delete("k")
    store.put("k", b"2")
    assert store.revoke(lease) == ()
    assert store.get("k") is not None


def test_range_is_in_key_order_and_by_prefix() -> None:
    store = LeaseStore()
    for key in ("svc/b", "svc/a", "other/a", "svc"):
        store.put(key, key.encode())
    assert [e.key for e in store.range("svc/")] == ["svc/a", "svc/b"]
    assert [e.key for e in store.range()] == ["other/a", "svc", "svc/a", "svc/b"]


def test_changes_since_a_revision_and_after_the_history_was_compacted() -> None:
    store = LeaseStore(history=3)
    assert store.changes(1) == ()
    for n in range(4):  # revisions 2, 3, 4, 5
        store.put(f"k{n}", b"")
    assert store.changes(5) == ()
    assert store.changes(99) == ()
    assert [c.revision for c in store.changes(2) or ()] == [3, 4, 5]
    assert store.changes(1) is None  # revision 2 is no longer kept: read again


def test_a_revision_partly_dropped_from_the_history_is_never_given_in_part() -> None:
    store = LeaseStore(history=3)
    lease = store.grant(5.0, now=0.0)
    for key in ("a", "b", "c"):
        store.put(key, b"", lease=lease)  # revisions 2, 3, 4
    store.revoke(lease)  # revision 5: three deletes; the history keeps only them
    assert [c.revision for c in store.changes(4) or ()] == [5, 5, 5]
    store.put("d", b"")  # revision 6 pushes one delete of revision 5 out
    assert store.changes(4) is None
    assert [c.key for c in store.changes(5) or ()] == ["d"]


def test_the_bounds_and_refusals() -> None:
    store = LeaseStore(min_ttl=2.0, max_keys=1, max_leases=1, max_value_bytes=4)
    with pytest.raises(ValueError, match=r"^ttl must be from 2.0 s and finite, not 1.0$"):
        store.grant(1.0, now=0.0)
    with pytest.raises(ValueError, match=r"not inf$"):
        store.grant(float("inf"), now=0.0)
    lease = store.grant(2.0, now=0.0)
    with pytest.raises(ValueError, match=r"^at most 1 leases$"):
        store.grant(2.0, now=0.0)
    with pytest.raises(ValueError, match=r"^a key is a str of 1 to 1024 characters, not ''$"):
        store.put("", b"")
    with pytest.raises(ValueError, match=r"^a key is a str"):
        store.put("k" * (MAX_KEY_LENGTH + 1), b"")
    with pytest.raises(ValueError, match=r"^a key is a str"):
        store.put(b"k", b"")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^a value is at most 4 bytes$"):
        store.put("k", b"12345")
    with pytest.raises(ValueError, match=r"^a value is at most 4 bytes$"):
        store.put("k", "1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^lease 99 not found$"):
        store.put("k", b"", lease=99)
    store.put("k" * MAX_KEY_LENGTH, b"1234", lease=lease)
    with pytest.raises(ValueError, match=r"^at most 1 keys$"):
        store.put("other", b"")
    store.put("k" * MAX_KEY_LENGTH, b"")  # replacing is no new key
    assert store.revision == 3


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_keys", 0), ("max_leases", 0), ("max_value_bytes", 0), ("history", 0)],
)
def test_limits_under_one_are_refused(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be at least 1, not 0$"):
        LeaseStore(**{name: value})


@pytest.mark.parametrize("min_ttl", [0.0, -1.0, float("inf"), float("nan")])
def test_a_min_ttl_that_is_not_positive_seconds_is_refused(min_ttl: float) -> None:
    with pytest.raises(ValueError, match=r"^min_ttl must be positive seconds"):
        LeaseStore(min_ttl=min_ttl)


def test_time_never_goes_back_and_is_finite() -> None:
    store = LeaseStore()
    lease = store.grant(5.0, now=10.0)
    with pytest.raises(ValueError, match=r"^time went back: now=9.0 after 10.0$"):
        store.keepalive(lease, now=9.0)
    with pytest.raises(ValueError, match=r"^now must be a finite time, not nan$"):
        store.expire(float("nan"))


def test_the_repr_counts() -> None:
    store = LeaseStore()
    store.grant(5.0, now=0.0)
    store.put("k", b"")
    assert repr(store) == "<LeaseStore revision 2, 1 key(s), 1 lease(s)>"


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("abcd"), st.integers(0, 3)),
        st.tuples(st.just("delete"), st.sampled_from("abcd"), st.just(0)),
        st.tuples(st.just("grant"), st.just(""), st.integers(1, 4)),
        st.tuples(st.just("revoke"), st.just(""), st.integers(1, 4)),
        st.tuples(st.just("keepalive"), st.just(""), st.integers(1, 4)),
        st.tuples(st.just("advance"), st.just(""), st.integers(0, 3)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS, st.integers(2, 12))
def test_replaying_changes_from_any_read_arrives_at_the_same_keys(
    operations: list[tuple[str, str, int]], history: int
) -> None:
    """Read the range at some revision, then apply changes(revision): exactly the changes
    made since, in order, and they arrive at a fresh read; or None, exactly when the
    history no longer holds all of them."""
    store = LeaseStore(history=history)
    now = 0.0
    log: list[Change] = []  # every change, as the operations returned them
    reads: list[tuple[int, dict[str, bytes]]] = [(store.revision, {})]
    for op, key, n in operations:
        if op == "put":
            lease = n if n and store.time_to_live(n, now) is not None else None
            log.append(store.put(key, bytes([n]), lease=lease))
        elif op == "delete":
            log += filter(None, [store.delete(key)])
        elif op == "grant":
            store.grant(float(n), now)
        elif op == "revoke":
            log += store.revoke(n)
        elif op == "keepalive":
            store.keepalive(n, now)
        else:
            now += n
            log += store.expire(now)
        reads.append((store.revision, {e.key: e.value for e in store.range()}))
    fresh = {e.key: e.value for e in store.range()}
    for revision, seen in reads:
        replay = store.changes(revision)
        needed = [change for change in log if change.revision > revision]
        if len(needed) > history:
            assert replay is None  # never a part of it
            continue
        assert replay == tuple(needed)
        keys = dict(seen)
        revisions = [change.revision for change in replay]
        assert revisions == sorted(revisions)
        for change in replay:
            if change.kind is ChangeKind.PUT:
                keys[change.key] = change.value
            else:
                del keys[change.key]
        assert keys == fresh


def test_the_default_bounds() -> None:
    """1 s, 10,000 keys and leases, 64 KiB values, a history of 1,000 changes."""
    store = LeaseStore()
    assert (store.min_ttl, store.max_keys, store.max_leases, store.max_value_bytes) == (
        1.0,
        10_000,
        10_000,
        65_536,
    )
    for n in range(1_001):  # revisions 2 .. 1002
        store.put("k", str(n).encode())
    assert store.changes(1) is None
    assert len(store.changes(2) or ()) == 1_000


def test_lease_ids_count_up_from_one() -> None:
    store = LeaseStore()
    assert [store.grant(5.0, now=0.0) for _ in range(3)] == [1, 2, 3]


def test_leases_that_run_out_together_are_all_expired_in_one_call() -> None:
    store = LeaseStore()
    first, second = store.grant(2.0, now=0.0), store.grant(3.0, now=0.0)
    store.put("a", b"", lease=first)
    store.put("b", b"", lease=second)
    assert [c.key for c in store.expire(now=3.0)] == ["a", "b"]
    assert len(store) == 0


def test_changes_from_before_the_first_revision() -> None:
    """``changes(0)`` asks for everything, which a young store still has."""
    store = LeaseStore()
    store.put("k", b"v")
    assert store.changes(0) == (Change(ChangeKind.PUT, "k", b"v", 2),)


@pytest.mark.parametrize("now", [float("-inf"), float("inf")])
def test_an_infinite_now_is_refused(now: float) -> None:
    with pytest.raises(ValueError, match=r"^now must be a finite time, not -?inf$"):
        LeaseStore().grant(5.0, now=now)
