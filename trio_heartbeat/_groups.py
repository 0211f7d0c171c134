"""Turning a nursery's exception group back into the one exception it stands for.

Our context managers run their own tasks in a nursery, and those tasks never
raise: they record how things ended and cancel a scope. So a group that
reaches a context manager's edge holds what the caller's own block raised, plus
nothing, and the caller should see exactly that exception, not a group that
wraps it. A group with several real failures is passed on untouched.
"""

from __future__ import annotations

import sys

import trio

if sys.version_info >= (3, 11):
    from builtins import BaseExceptionGroup
else:  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

__all__ = ["BaseExceptionGroup", "only_cancelled", "single_exception"]


def single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The group's only leaf exception, or the group itself if it has several.

    One exception object raised by two tasks counts once: a supervisor task
    that fails and a caller's ``receive`` that re-raises that same failure
    report one thing.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        elif not any(exc is leaf for leaf in leaves):
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group


def only_cancelled(exc: BaseException) -> bool:
    """True for :class:`trio.Cancelled`, or a group holding nothing else.

    A block cancelled from outside raises one of these; it is a cancellation
    to let through, not an error of the block's own.
    """
    if isinstance(exc, BaseExceptionGroup):
        return all(only_cancelled(inner) for inner in exc.exceptions)
    return isinstance(exc, trio.Cancelled)
