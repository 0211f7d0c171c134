"""The one boundary where an exception group from our own nursery becomes one exception.

Our context managers run their own tasks in a nursery, and those tasks never
raise on purpose: they record how things ended and cancel a scope. So a group
that reaches one of our context managers' edges holds what the caller's own
block raised, the cancellations our scope delivered, and at most one failure
of ours; the caller should see exactly one of those, not a group that wraps
it. :func:`reraise_single` is that rule, written once and used by every
context manager and server loop of the library and its test kit. A group with
several real failures is passed on, without the cancellations.
"""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

import trio

__all__ = [
    "forget_frames",
    "only_cancelled",
    "open_background",
    "reraise_single",
    "single_exception",
]


def _leaves(exc: BaseException) -> list[BaseException]:
    # Every leaf of a group, each object once: a failure that two tasks
    # re-raised (a supervisor's, and a caller's receive that reports it) is one.
    leaves: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(reversed(current.exceptions))
        elif not any(current is leaf for leaf in leaves):
            leaves.append(current)
    return leaves


def single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The group's only leaf exception, or the group itself if it has several.

    >>> error = ValueError("boom")
    >>> single_exception(BaseExceptionGroup("", [error, BaseExceptionGroup("", [error])])) is error
    True
    """
    leaves = _leaves(group)
    return leaves[0] if len(leaves) == 1 else group


def reraise_single(
    group: BaseExceptionGroup[BaseException], own: BaseException | None = None
) -> NoReturn:
    """Raise the one exception ``group``, escaping from one of our nurseries, stands for.

    ``own`` is what the caller's block raised, if the caller knows. In order:

    * ``own`` as it was raised (even if it is a group itself), when every
      failure in ``group`` belongs to it;
    * the one failure, when there is one, with its own cause kept;
    * one :class:`trio.Cancelled`, when there is nothing but cancellations
      (a scope outside reached the block and the tasks at once);
    * otherwise the failures as a group, without the cancellations.

    A cancellation dropped here is delivered again at the next checkpoint,
    so no cancel scope misses one.
    """
    cancelled, failures = group.split(trio.Cancelled)
    if cancelled is not None:
        _drop_tracebacks(group, cancelled, own)
    if failures is None:
        exc: BaseException = _leaves(group)[0]
    elif own is not None and {id(leaf) for leaf in _leaves(failures)} <= {
        id(leaf) for leaf in _leaves(own)
    }:
        exc = own
    else:
        exc = single_exception(failures)
    try:
        raise exc from exc.__cause__  # keep the exception's own cause, hide the group
    finally:
        # Raised while the group is handled, the exception got the group as
        # its context, and the group holds the exception: a reference cycle
        # that would keep both, their tracebacks and every frame and object
        # those hold (a whole connection) alive until a full collection.
        if exc.__context__ is group:
            exc.__context__ = None
        del exc, cancelled, failures, group, own  # nor a cycle through this frame


def _drop_tracebacks(
    group: BaseExceptionGroup[BaseException], cancelled: BaseException, own: BaseException | None
) -> None:
    # Trio raises a Cancelled from deep in its own machinery, and the frames
    # of its traceback lead back to the nursery frame that holds the group,
    # which holds the Cancelled: a cycle that keeps every frame involved (and
    # the tasks' variables: our connection) alive until a full collection.
    # The cancellations and the nurseries' groups are ours to drop, so their
    # tracebacks go; the block's own exception, group or not, is left whole.
    for leaf in _leaves(cancelled):
        leaf.__traceback__ = None
    pending: list[BaseException] = [group]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup) and current is not own:
            current.__traceback__ = None
            pending.extend(current.exceptions)


def forget_frames(exc: BaseException) -> None:
    """Clear the variables of the finished frames ``exc`` passed through, keeping its traceback.

    For an exception leaving one of our tasks, a Cancelled above all: Trio
    may keep it in a reference cycle of its own (its traceback leads back
    through Trio's frames to the nursery that holds it) until a full garbage
    collection, and every frame on that traceback would keep its variables,
    a connection and its buffers among them. The task's own frame, still
    running, is left alone: the task drops its variables itself, in a
    ``finally`` (``del self, conn``).
    """
    if exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)


def only_cancelled(exc: BaseException) -> bool:
    """True for :class:`trio.Cancelled`, or a group holding nothing else.

    A block cancelled from outside raises one of these; it is a cancellation
    to let through, not an error of the block's own.
    """
    if isinstance(exc, BaseExceptionGroup):
        return all(only_cancelled(inner) for inner in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


@asynccontextmanager
async def open_background() -> AsyncIterator[trio.Nursery]:
    """A nursery for tasks that run beside the block and end with it.

    However the block ends, the tasks are cancelled; what comes out is
    :func:`reraise_single`'s one exception, the block's own as it was raised.
    """
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                raised = exc
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        reraise_single(group, raised)  # the block's own error, as it was raised
    finally:
        raised = None  # no cycle through this frame
