"""Sphinx extension: the THB/1 state machine, drawn from the code at build time.

The protocol core lists every legal state change in one table,
``trio_heartbeat._state.TRANSITIONS``. These directives render that table,
so the documentation cannot drift from the code:

``thb-state-table``
    A matrix, one row per :class:`~trio_heartbeat.State` and one column per
    trigger; a cell holds the new state, or a dot where the trigger is ignored.
``thb-state-diagram``
    The same transitions as a text diagram, one arrow per (state, new state)
    pair, labelled with every trigger that takes it.
``thb-state-legend``
    What each state and trigger means, from the ``#:`` comments on the enum
    members in ``_state.py``.

States and triggers appear in the order their enums define them. A page that
uses a directive is rebuilt whenever ``_state.py`` changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

from trio_heartbeat import _state

__all__ = ["setup"]

#: What a cell shows where a trigger does nothing in a state.
IGNORED = "\u00b7"


def _states() -> list[_state.State]:
    return list(_state.State)


def _triggers() -> list[_state.Trigger]:
    return list(_state.Trigger)


def _terminal_states() -> list[_state.State]:
    """States that no transition leaves, derived from the table itself."""
    sources = {state for state, _ in _state.TRANSITIONS}
    return [state for state in _states() if state not in sources]


def _arrows() -> list[tuple[_state.State, list[_state.Trigger], _state.State]]:
    """One entry per (state, new state) pair, with every trigger that takes it."""
    grouped: dict[tuple[_state.State, _state.State], list[_state.Trigger]] = {}
    for state in _states():
        for trigger in _triggers():
            target = _state.TRANSITIONS.get((state, trigger))
            if target is not None:
                grouped.setdefault((state, target), []).append(trigger)
    return [(state, triggers, target) for (state, target), triggers in grouped.items()]


def render_diagram() -> str:
    """The transitions as aligned text arrows; terminal states are listed last."""
    arrows = _arrows()
    labels = [" | ".join(trigger.value for trigger in triggers) for _, triggers, _ in arrows]
    name_width = max(len(state.name) for state in _states())
    label_width = max(len(label) for label in labels)
    lines: list[str] = []
    previous: _state.State | None = None
    for (state, _, target), label in zip(arrows, labels, strict=True):
        name = state.name if state is not previous else ""
        shaft = "-" * (label_width - len(label))
        lines.append(f"{name:<{name_width}}  --[ {label} ]{shaft}-->  {target.name}")
        previous = state
    for state in _terminal_states():
        lines.append(f"{state.name:<{name_width}}  (terminal: nothing leaves it)")
    return "\n".join(lines)


def _attribute_docs(enum: type[Enum]) -> dict[str, str]:
    """The ``#:`` comment of each member of ``enum``, joined into one line."""
    analyzer = ModuleAnalyzer.for_module(enum.__module__)
    found = analyzer.find_attr_docs()
    docs = {}
    for member in enum:
        lines = found.get((enum.__qualname__, member.name), [])
        docs[member.name] = " ".join(line.strip() for line in lines if line.strip())
    return docs


def _table(
    header: Sequence[str], rows: Iterable[Sequence[nodes.Node | str]], widths: Sequence[int]
) -> nodes.table:
    table = nodes.table(classes=["thb-states"])
    group = nodes.tgroup(cols=len(header))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    head += _row(header)
    body = nodes.tbody()
    group += body
    for cells in rows:
        body += _row(cells)
    return table


def _row(cells: Sequence[nodes.Node | str]) -> nodes.row:
    row = nodes.row()
    for cell in cells:
        entry = nodes.entry()
        paragraph = nodes.paragraph()
        paragraph += nodes.Text(cell) if isinstance(cell, str) else cell
        entry += paragraph
        row += entry
    return row


class _StateDirective(SphinxDirective):
    has_content = False
    required_arguments = 0
    optional_arguments = 0

    def _note_source(self) -> None:
        source = inspect.getsourcefile(_state)
        if source is not None:
            self.env.note_dependency(source)


class StateTable(_StateDirective):
    """``thb-state-table``: the state x trigger matrix."""

    def run(self) -> list[nodes.Node]:
        self._note_source()
        triggers = _triggers()
        terminal = set(_terminal_states())
        rows = []
        for state in _states():
            label = nodes.inline()
            label += nodes.literal(text=state.name)
            if state in terminal:
                label += nodes.Text(" (terminal)")
            cells: list[nodes.Node | str] = [label]
            for trigger in triggers:
                target = _state.TRANSITIONS.get((state, trigger))
                cells.append(nodes.literal(text=target.name) if target is not None else IGNORED)
            rows.append(cells)
        header = ["state \\ trigger", *(trigger.value for trigger in triggers)]
        widths = [14, *([10] * len(triggers))]
        return [_table(header, rows, widths)]


class StateDiagram(_StateDirective):
    """``thb-state-diagram``: the transitions as a text diagram."""

    def run(self) -> list[nodes.Node]:
        self._note_source()
        text = render_diagram()
        block = nodes.literal_block(text, text, classes=["thb-state-diagram"])
        block["language"] = "text"
        return [block]


class StateLegend(_StateDirective):
    """``thb-state-legend``: what each state and trigger means, from the code's comments."""

    def run(self) -> list[nodes.Node]:
        self._note_source()
        result: list[nodes.Node] = []
        sections: list[tuple[str, type[Enum], dict[str, str]]] = [
            ("States", _state.State, {state.name: state.name for state in _states()}),
            ("Triggers", _state.Trigger, {t.name: t.value for t in _triggers()}),
        ]
        for title, enum, shown in sections:
            docs = _attribute_docs(enum)
            definitions = nodes.definition_list()
            for member in enum:
                text = docs[member.name]
                if not text:
                    result.append(
                        self.state.document.reporter.warning(
                            f"{enum.__name__}.{member.name} has no #: comment in _state.py",
                            line=self.lineno,
                        )
                    )
                item = nodes.definition_list_item()
                term = nodes.term()
                term += nodes.literal(text=shown[member.name])
                definition = nodes.definition()
                definition += nodes.paragraph(text=text)
                item += term
                item += definition
                definitions += item
            result += [nodes.rubric(text=title), definitions]
        return result


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("thb-state-table", StateTable)
    app.add_directive("thb-state-diagram", StateDiagram)
    app.add_directive("thb-state-legend", StateLegend)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
