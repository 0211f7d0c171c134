"""The states and the one table of transitions (``_state.py``).

The table is checked for its shape: terminal states have no way out, OPEN is
reached only from the handshake, every state is reachable from the handshake
and every trigger is used; a protocol error always ends in ERROR, and an
orderly way out always in CLOSED. :func:`transition` follows the table for
every listed pair and raises :exc:`KeyError` for a pair it does not list.
"""

from __future__ import annotations

import doctest

import pytest

from trio_heartbeat import State, _state
from trio_heartbeat._state import TERMINAL, TRANSITIONS, Trigger, transition

# -- the table -------------------------------------------------------------------------


def test_transition_table_shape() -> None:
    # Terminal states have no way out; OPEN is reached only from HANDSHAKE.
    assert all(state not in (State.CLOSED, State.ERROR) for state, _ in TRANSITIONS)
    assert [key for key, target in TRANSITIONS.items() if target is State.OPEN] == [
        (State.HANDSHAKE, Trigger.HANDSHAKE_DONE)
    ]
    assert (State.CLOSING, Trigger.TIMEOUT) not in TRANSITIONS


@pytest.mark.parametrize("terminal", [State.CLOSED, State.ERROR])
@pytest.mark.parametrize("trigger", list(Trigger))
def test_terminal_states_have_no_outgoing_transition(terminal: State, trigger: Trigger) -> None:
    assert terminal in TERMINAL
    with pytest.raises(KeyError):
        transition(terminal, trigger)


def test_terminal_is_exactly_the_states_nothing_leaves() -> None:
    leave = {state for state, _ in TRANSITIONS}
    assert set(TERMINAL) == set(State) - leave == {State.CLOSED, State.ERROR}


def test_every_state_is_reachable_from_the_handshake() -> None:
    reached = {State.HANDSHAKE}
    frontier = [State.HANDSHAKE]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(State)


def test_every_trigger_moves_some_state() -> None:
    assert {trigger for _, trigger in TRANSITIONS} == set(Trigger)


def test_a_protocol_error_always_ends_in_error_and_a_close_in_closed() -> None:
    errors = {
        state: target
        for (state, trigger), target in TRANSITIONS.items()
        if trigger is Trigger.PROTOCOL_ERROR
    }
    assert errors == dict.fromkeys((State.HANDSHAKE, State.OPEN, State.CLOSING), State.ERROR)
    for trigger in (Trigger.REMOTE_CLOSE, Trigger.CLOSE_TIMEOUT):
        assert {target for (_, t), target in TRANSITIONS.items() if t is trigger} == {State.CLOSED}
    # End-of-file is a failure, unless our own close was under way.
    assert transition(State.OPEN, Trigger.EOF) is State.ERROR
    assert transition(State.CLOSING, Trigger.EOF) is State.CLOSED


# -- transition() ----------------------------------------------------------------------


@pytest.mark.parametrize(("pair", "target"), list(TRANSITIONS.items()), ids=lambda v: str(v))
def test_transition_follows_the_table(pair: tuple[State, Trigger], target: State) -> None:
    assert transition(*pair) is target


@pytest.mark.parametrize(
    "pair",
    [
        (State.CLOSING, Trigger.TIMEOUT),
        (State.CLOSING, Trigger.LOCAL_CLOSE),
        (State.OPEN, Trigger.HANDSHAKE_DONE),
        (State.OPEN, Trigger.CLOSE_TIMEOUT),
        (State.HANDSHAKE, Trigger.CLOSE_TIMEOUT),
    ],
    ids=lambda pair: f"{pair[0].name}-{pair[1].name}",
)
def test_an_unlisted_pair_raises_key_error(pair: tuple[State, Trigger]) -> None:
    assert pair not in TRANSITIONS
    with pytest.raises(KeyError):
        transition(*pair)


def test_doctests() -> None:
    results = doctest.testmod(_state)
    assert results.attempted > 0
    assert results.failed == 0
