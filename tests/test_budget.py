"""The shared byte budget (``BufferBudget`` in ``_budget.py``): who is cut off, and the accounting.

Pure bookkeeping, no I/O and no clock: exact example tests of ``take``,
``give``, ``release`` and ``holding`` (the victims are the biggest holders,
as many as it takes to get back within the limit; exactly at the limit is
not over), the docstring's example, and a hypothesis property test over
random sequences of calls, checked against a model of what each holder holds.
"""

from __future__ import annotations

import doctest
from collections.abc import Hashable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_heartbeat import _budget
from trio_heartbeat._budget import BufferBudget

# -- taking and giving -----------------------------------------------------------------


def test_take_and_give_count_the_bytes_of_each_holder() -> None:
    budget = BufferBudget(1000)
    assert (budget.limit, budget.used) == (1000, 0)
    assert budget.take("a", 60) == []
    assert budget.take("b", 30) == []
    assert budget.take("a", 15) == []
    assert (budget.holding("a"), budget.holding("b"), budget.used) == (75, 30, 105)
    budget.give("a", 25)
    assert (budget.holding("a"), budget.holding("b"), budget.used) == (50, 30, 80)
    assert budget.holding("nobody") == 0


def test_exactly_at_the_limit_is_not_over() -> None:
    budget = BufferBudget(100)
    assert budget.take("a", 60) == []
    assert budget.take("b", 40) == []
    assert budget.used == 100 == budget.limit
    assert budget.take("b", 1) == ["a"]  # one byte more is over


def test_a_limit_of_one_byte_holds_one_byte() -> None:
    budget = BufferBudget(1)
    assert budget.take("a", 1) == []
    assert budget.take("a", 1) == ["a"]


def test_the_biggest_holder_goes_not_the_one_that_took() -> None:
    budget = BufferBudget(100)
    for holder, nbytes in (("a", 10), ("b", 50), ("c", 30)):
        assert budget.take(holder, nbytes) == []
    # 110 bytes: 10 over. "b" holds the most, and alone frees enough.
    assert budget.take("d", 20) == ["b"]
    # The budget only names them: cutting one off is the caller's job.
    assert (budget.used, budget.holding("b")) == (110, 50)
    budget.release("b")
    assert budget.used == 60 <= budget.limit


def test_the_holder_that_took_can_be_the_victim() -> None:
    budget = BufferBudget(100)
    assert budget.take("a", 30) == []
    assert budget.take("b", 80) == ["b"]  # 110 bytes, "b" holds 80 of them


def test_as_many_victims_as_it_takes_biggest_first() -> None:
    # Victims not yet released still count: until they are, a new take finds
    # the budget further over, and more of the biggest are named.
    budget = BufferBudget(100)
    assert budget.take("a", 90) == []
    assert budget.take("b", 80) == ["a"]  # 70 over: a's 90 are enough
    assert budget.take("c", 70) == ["a", "b"]  # 140 over: a's 90, then b's 80
    assert budget.take("d", 5) == ["a", "b"]  # 145 over: the smallest two are spared
    budget.release("a")
    budget.release("b")
    assert (budget.used, budget.holding("c"), budget.holding("d")) == (75, 70, 5)


def test_victims_that_free_exactly_the_excess_are_enough() -> None:
    budget = BufferBudget(100)
    assert budget.take("a", 60) == []
    assert budget.take("b", 40) == []
    # 160 bytes, 60 over: "a" frees exactly 60, and "c" (as big, but later) is spared.
    assert budget.take("c", 60) == ["a"]
    budget.release("a")
    assert budget.used == 100 == budget.limit


def test_a_give_that_empties_a_holder_forgets_it() -> None:
    budget = BufferBudget(100)
    budget.take("a", 40)
    budget.take("b", 10)
    budget.give("a", 40)
    assert (budget.holding("a"), budget.used) == (0, 10)
    # An idle connection keeps no entry: a server with many of them holds no memory for them.
    assert budget._held == {"b": 10}


def test_release_frees_everything_a_holder_holds() -> None:
    budget = BufferBudget(100)
    budget.take("a", 40)
    budget.take("b", 25)
    budget.release("a")
    assert (budget.holding("a"), budget.holding("b"), budget.used) == (0, 25, 25)
    assert budget._held == {"b": 25}


def test_releasing_a_holder_it_does_not_know_is_harmless() -> None:
    budget = BufferBudget(100)
    budget.take("a", 40)
    budget.release("nobody")
    budget.release("a")
    budget.release("a")  # twice: a connection cut off, then ending, releases twice
    assert (budget.used, budget._held) == (0, {})


def test_a_give_from_a_released_holder_changes_nothing() -> None:
    # A connection is released from the budget when it ends, and may hand the
    # DATA left in its receive queue to the application afterwards (the
    # reconnecting client collects it): that must not count against the others.
    budget = BufferBudget(100)
    budget.take("ended", 50)
    budget.take("other", 40)
    budget.release("ended")  # it ended, with 50 bytes still queued for its application
    budget.give("ended", 50)  # which takes them afterwards
    assert (budget.used, budget.holding("other")) == (40, 40)


# -- the limit -------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, -1, -4096])
def test_a_limit_below_one_byte_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match=f"at least 1 byte, not {limit}"):
        BufferBudget(limit)


def test_doctests() -> None:
    results = doctest.testmod(_budget)
    assert results.attempted >= 4
    assert results.failed == 0


# -- properties ------------------------------------------------------------------------

HOLDERS = st.sampled_from(["a", "b", "c", "d", "e"])
# Small limits and sizes, so that the edges come up often: exactly at the
# limit, and a victim that frees exactly the excess.


@given(
    limit=st.integers(min_value=1, max_value=40),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["take", "give", "release"]),
            HOLDERS,
            st.integers(min_value=0, max_value=30),
            st.booleans(),
        ),
        max_size=60,
    ),
)
def test_the_accounting_always_adds_up(limit: int, steps: list[tuple[str, str, int, bool]]) -> None:
    """Over any calls, ``used`` is the sum of the holdings and never negative; a
    take names victims only when over, biggest first, and exactly as many as it
    takes: releasing them brings ``used`` within the limit, releasing one fewer
    would not."""
    budget = BufferBudget(limit)
    model: dict[Hashable, int] = {}
    for action, holder, nbytes, cut_off in steps:
        if action == "take":
            victims = budget.take(holder, nbytes)
            model[holder] = model.get(holder, 0) + nbytes
            assert budget.used == sum(model.values())
            if budget.used <= limit:
                assert victims == []
            else:
                assert victims, "over the limit and nobody named"
                assert len(set(victims)) == len(victims)
                sizes = [model[victim] for victim in victims]
                assert sizes == sorted(sizes, reverse=True)
                spared = [size for who, size in model.items() if who not in victims]
                assert max(spared, default=0) <= sizes[-1]  # nobody bigger was spared
                assert budget.used - sum(sizes) <= limit
                assert budget.used - sum(sizes[:-1]) > limit  # not one more than it takes
                if cut_off:
                    for victim in victims:
                        budget.release(victim)
                        model.pop(victim)
                    assert budget.used <= limit
        elif action == "give":
            nbytes = min(nbytes, model.get(holder, 0))  # at most what it holds
            budget.give(holder, nbytes)
            left = model.get(holder, 0) - nbytes
            if left:
                model[holder] = left
            else:
                model.pop(holder, None)
        else:
            budget.release(holder)
            model.pop(holder, None)
        assert budget.used == sum(model.values()) >= 0
        for who in "abcde":
            assert budget.holding(who) == model.get(who, 0)
