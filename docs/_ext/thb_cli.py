"""Sphinx extension: the command line's options, read from its argument parser.

``thb-cli`` renders one subcommand of ``python -m trio_heartbeat`` (its
argument is the subcommand's name; none means the top-level command): the
usage line, then a table of its arguments with their help text. Everything
comes from ``trio_heartbeat._cli.build_parser()``, so an option added, renamed
or re-documented there shows up here at the next build.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from trio_heartbeat import _cli

__all__ = ["setup"]

#: The usage line is wrapped as argparse would wrap it in a terminal this wide.
USAGE_WIDTH = 88


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _invocation(action: argparse.Action) -> str:
    """How an argument is written: ``--port PORT``, ``-v, --verbose``, ``HOST:PORT ...``."""
    metavar = action.metavar if isinstance(action.metavar, str) else None
    if not action.option_strings:
        name = metavar or action.dest
        return f"{name} ..." if action.nargs in ("+", "*") else name
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    value = metavar or action.dest.upper()
    return ", ".join(f"{option} {value}" for option in action.option_strings)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": ""}
    return text


class CommandLine(SphinxDirective):
    """``thb-cli [subcommand]``: usage and arguments of one (sub)command."""

    has_content = False
    required_arguments = 0
    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        source = inspect.getsourcefile(_cli)
        if source is not None:
            self.env.note_dependency(source)
        parser = _cli.build_parser()
        if self.arguments:
            name = self.arguments[0]
            commands = _subcommands(parser)
            if name not in commands:
                return [
                    self.state.document.reporter.warning(
                        f"no subcommand {name!r}; the command line has {sorted(commands)}",
                        line=self.lineno,
                    )
                ]
            parser = commands[name]
        usage = _usage(parser)
        result: list[nodes.Node] = [nodes.literal_block(usage, usage, language="text")]
        rows: list[tuple[str, str]] = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                # One row per subcommand: its name and its one-line help.
                rows += [(choice.dest, _help(choice)) for choice in action._choices_actions]
            elif action.help is not argparse.SUPPRESS and not isinstance(
                action, argparse._HelpAction
            ):
                rows.append((_invocation(action), _help(action)))
        if rows:
            result.append(_table(rows))
        return result


def _table(rows: list[tuple[str, str]]) -> nodes.table:
    table = nodes.table(classes=["thb-cli"])
    group = nodes.tgroup(cols=2)
    table += group
    group += nodes.colspec(colwidth=30)
    group += nodes.colspec(colwidth=70)
    head = nodes.thead()
    group += head
    body = nodes.tbody()
    group += body
    head += _row(nodes.Text("argument"), nodes.Text("meaning"))
    for invocation, text in rows:
        body += _row(nodes.literal(text=invocation), nodes.Text(text))
    return table


def _row(*cells: nodes.Node) -> nodes.row:
    row = nodes.row()
    for cell in cells:
        entry = nodes.entry()
        paragraph = nodes.paragraph()
        paragraph += cell
        entry += paragraph
        row += entry
    return row


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("thb-cli", CommandLine)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
