"""Sphinx extension: links to the sections of THB/1, the protocol specification.

The specification is a page of these docs (``thb_spec_doc`` in ``conf.py``,
``protocol`` by default). Each of its numbered sections and subsections carries
an explicit MyST target named after its number, ``(thb-spec-4)=`` above §4 and
``(thb-spec-4-6)=`` above §4.6, and the ``thb-spec`` role links to them::

    {thb-spec}`§4`                  ->  THB/1 §4   (a link to §4)
    {thb-spec}`§4.6`                ->  THB/1 §4.6
    {thb-spec}`the rate rule <§4.6>` ->  the rate rule

On the specification's own page the default text is just the number (``§4.6``).
The role makes an ordinary ``std:ref`` cross-reference, so a section that does
not exist is reported as an undefined label and fails a ``-W`` build; a text
that is not a section number at all is an error at once.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from docutils.parsers.rst.states import Inliner
from sphinx import addnodes
from sphinx.application import Sphinx

__all__ = ["label_for", "setup"]

_EXPLICIT = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$", re.DOTALL)
_SECTION = re.compile(r"^§(?P<number>[1-9][0-9]*(?:\.[1-9][0-9]*)?)$")


def label_for(section: str) -> str | None:
    """The target name of a section number such as ``§4`` or ``§4.6``, or ``None``."""
    match = _SECTION.match(section.strip())
    if match is None:
        return None
    return "thb-spec-" + match["number"].replace(".", "-")


def spec_role(
    name: str,
    rawtext: str,
    text: str,
    lineno: int,
    inliner: Inliner,
    options: dict[str, Any] | None = None,
    content: list[str] | None = None,
) -> tuple[list[nodes.Node], list[nodes.system_message]]:
    """``{thb-spec}`§4``` or ``{thb-spec}`title <§4>```."""
    env = inliner.document.settings.env
    match = _EXPLICIT.match(text)
    section = (match["target"] if match else text).strip()
    label = label_for(section)
    if label is None:
        message = inliner.reporter.error(
            f"thb-spec: {section!r} is not a THB/1 section number such as §4 or §4.6",
            line=lineno,
        )
        return [inliner.problematic(rawtext, rawtext, message)], [message]
    if match:
        title = match["title"]
    elif env.docname == env.config.thb_spec_doc:
        title = section
    else:
        title = f"THB/1 {section}"
    node = addnodes.pending_xref(
        rawtext,
        refdomain="std",
        reftype="ref",
        reftarget=label,
        refexplicit=True,
        refwarn=True,
        refdoc=env.docname,
    )
    node += nodes.inline(title, title, classes=["xref", "std", "std-ref", "thb-spec"])
    return [node], []


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("thb_spec_doc", "protocol", "env", types=frozenset({str}))
    app.add_role("thb-spec", spec_role)
    return {"version": "2", "parallel_read_safe": True, "parallel_write_safe": True}
