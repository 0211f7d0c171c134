"""The one boundary where an exception group becomes one exception (``_groups.py``).

:func:`reraise_single` has four rules, tried in order, and each is checked
here with real exception groups (as a nursery raises them) and real
:class:`trio.Cancelled` instances (taken from a cancelled scope):

1. the caller's own exception comes back unchanged (the very object, a group
   included) when every failure in the group belongs to it;
2. the one failure comes back, with its own cause kept and the group hidden;
3. nothing but cancellations comes back as one :class:`trio.Cancelled`;
4. several failures come back as a group of just them, without the
   cancellations.

:func:`single_exception` counts an object once however often it appears, and
:func:`only_cancelled` tells a cancellation (or a group of nothing else) from
an error. :func:`open_background`'s tasks end with the block, and what comes
out of it is one exception.
"""

from __future__ import annotations

import doctest
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from trio_heartbeat import _groups
from trio_heartbeat._groups import (
    only_cancelled,
    open_background,
    reraise_single,
    single_exception,
)


async def cancelled() -> trio.Cancelled:
    """A real :class:`trio.Cancelled`, as a cancelled scope delivers it."""
    caught: list[trio.Cancelled] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            caught.append(exc)
            raise
    return caught[0]


def raised_by(
    group: BaseExceptionGroup[BaseException], own: BaseException | None = None
) -> BaseException:
    """What :func:`reraise_single` raises for ``group``."""
    with pytest.raises(BaseException) as info:  # noqa: PT011 - any exception, checked by the caller
        reraise_single(group, own)
    return info.value


# -- rule 1: the caller's own exception, unchanged ----------------------------------------


async def test_the_callers_own_exception_comes_back_unchanged() -> None:
    own = ValueError("the block's own")
    group = BaseExceptionGroup("", [own, await cancelled()])
    assert raised_by(group, own) is own


async def test_the_callers_own_group_comes_back_as_the_very_group() -> None:
    """The block raised a group of its own (say, from a nursery in it): that
    group, not one of its leaves nor a group around it."""
    own = BaseExceptionGroup("mine", [ValueError(1), KeyError(2)])
    group = BaseExceptionGroup("", [own, await cancelled()])
    assert raised_by(group, own) is own


async def test_a_failure_of_ours_beside_the_callers_own_is_not_hidden() -> None:
    """Rule 1 applies only when *every* failure belongs to the caller's own
    exception; a failure of ours as well makes a group of both."""
    own, ours = ValueError("the block's own"), RuntimeError("ours")
    raised = raised_by(BaseExceptionGroup("", [own, ours, await cancelled()]), own)
    assert isinstance(raised, BaseExceptionGroup)
    assert list(raised.exceptions) == [own, ours]


# -- rule 2: the one failure, with its cause ------------------------------------------------


async def test_the_one_failure_comes_back_with_its_own_cause() -> None:
    cause = OSError("the reason")
    failure = RuntimeError("failed")
    failure.__cause__ = cause
    nested = BaseExceptionGroup("outer", [await cancelled(), BaseExceptionGroup("", [failure])])
    raised = raised_by(nested)
    assert raised is failure
    assert raised.__cause__ is cause
    assert raised.__suppress_context__  # the group is not shown as its context


async def test_one_failure_that_two_tasks_reraised_is_one_failure() -> None:
    failure = RuntimeError("reported twice")
    group = BaseExceptionGroup("", [failure, BaseExceptionGroup("", [failure]), await cancelled()])
    assert raised_by(group) is failure


# -- rule 3: nothing but cancellations --------------------------------------------------------


async def test_nothing_but_cancellations_is_one_cancelled() -> None:
    first, second = await cancelled(), await cancelled()
    raised = raised_by(BaseExceptionGroup("", [first, BaseExceptionGroup("", [second])]))
    assert raised is first
    assert isinstance(raised, trio.Cancelled)


# -- rule 4: several failures, without the cancellations ------------------------------------


async def test_several_failures_are_a_group_without_the_cancellations() -> None:
    one, two = ValueError(1), KeyError(2)
    raised = raised_by(BaseExceptionGroup("", [one, await cancelled(), two]))
    assert isinstance(raised, BaseExceptionGroup)
    leaves = list(raised.exceptions)
    assert leaves == [one, two]
    assert not any(isinstance(leaf, trio.Cancelled) for leaf in leaves)


# -- single_exception and only_cancelled ------------------------------------------------------


def test_single_exception_counts_one_object_once() -> None:
    error = ValueError("boom")
    assert (
        single_exception(BaseExceptionGroup("", [error, BaseExceptionGroup("", [error])])) is error
    )
    # Two equal-looking but distinct objects are two exceptions: the group stays.
    twins = BaseExceptionGroup("", [ValueError("boom"), ValueError("boom")])
    assert single_exception(twins) is twins


async def test_only_cancelled_tells_a_cancellation_from_an_error() -> None:
    cancel = await cancelled()
    assert only_cancelled(cancel)
    assert only_cancelled(BaseExceptionGroup("", [cancel, BaseExceptionGroup("", [cancel])]))
    assert not only_cancelled(ValueError())
    assert not only_cancelled(BaseExceptionGroup("", [cancel, ValueError()]))


async def test_a_nursery_group_is_reduced_to_the_failure_of_one_task() -> None:
    """The rule where it is used: a nursery whose task fails cancels the other,
    and the group it raises holds the failure alone."""
    failure = KeyError("from the task")

    async def fails() -> None:
        raise failure

    async def run_the_nursery() -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                nursery.start_soon(fails)
        except BaseExceptionGroup as group:
            reraise_single(group)

    with pytest.raises(KeyError) as info:
        await run_the_nursery()
    assert info.value is failure


def test_doctests() -> None:
    results = doctest.testmod(_groups)
    assert results.attempted > 0
    assert results.failed == 0


async def test_background_tasks_end_with_the_block_and_errors_come_out_single(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ended: list[float] = []

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        finally:
            ended.append(trio.current_time())

    async def fails() -> None:
        await trio.sleep(0.5)
        raise ValueError("theirs")

    async def block(task: Callable[[], Awaitable[None]], error: Exception | None) -> None:
        async with open_background() as nursery:
            nursery.start_soon(task)
            await trio.sleep(1.0)
            if error is not None:
                raise error

    await block(forever, None)
    assert ended == [1.0]
    with pytest.raises(KeyError, match=r"^'mine'$"):  # the block's own, never in a group
        await block(forever, KeyError("mine"))
    assert ended == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"^theirs$"):  # a task's failure, as itself
        await block(fails, None)
    assert trio.current_time() == 2.5
