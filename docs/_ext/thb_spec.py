"""Sphinx extension: references to PROTOCOL.md, the THB/1 contract.

The contract is shipped beside the package, not built into these pages, so a
page points at it with the ``thb-spec`` role rather than copying it::

    {thb-spec}`§4`            ->  PROTOCOL.md §4
    {thb-spec}`the send rule <§4>`

With ``thb_protocol_url`` set in ``conf.py`` the reference links there;
otherwise it is plain text, and the build needs no network.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from docutils.parsers.rst.states import Inliner
from sphinx.application import Sphinx

__all__ = ["setup"]

_EXPLICIT = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$", re.DOTALL)


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
    match = _EXPLICIT.match(text)
    title = match["title"] if match else f"PROTOCOL.md {text.strip()}".rstrip()
    url: str = inliner.document.settings.env.config.thb_protocol_url
    if url:
        node: nodes.Element = nodes.reference(rawtext, title, refuri=url)
    else:
        node = nodes.inline(rawtext, title, classes=["thb-spec"])
    return [node], []


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("thb_protocol_url", "", "env", types=frozenset({str}))
    app.add_role("thb-spec", spec_role)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
