"""Sphinx configuration of the trio-heartbeat documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` and check the
examples with ``sphinx-build -W -b doctest docs docs/_build/doctest`` (both
run by ``nox -s docs``). Pages are Markdown (MyST); API pages use autodoc,
whose docstrings are reStructuredText. No network access is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# Our own extensions, and the package itself when it is not installed.
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))

import trio_heartbeat  # noqa: E402

project = "trio-heartbeat"
author = "The trio-heartbeat developers"
copyright = "The trio-heartbeat developers"
version = release = trio_heartbeat.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "thb_cli",
    "thb_reexports",
    "thb_spec",
    "thb_states",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
# Unresolved cross-references (to Trio, the standard library) stay plain text.
nitpicky = False

# -- MyST -----------------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "deflist"]
# Headings get anchors, so that pages can link to sections: [text](concepts.md#the-watchdog).
myst_heading_anchors = 3

# -- autodoc --------------------------------------------------------------------

autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_member_order = "bysource"
add_module_names = False
python_use_unqualified_type_names = True

# -- doctest --------------------------------------------------------------------

# The names every example may use without importing them: the public API, as
# the docstrings' own examples assume.
doctest_global_setup = """
import trio
import trio.testing
from trio_heartbeat import *
"""

# -- our extensions (docs/_ext) ---------------------------------------------------

# thb_states draws the state machine from trio_heartbeat._state.TRANSITIONS,
# thb_cli the command line's options from its argument parser, and thb_reexports
# checks that every public name of these modules is documented.
thb_public_modules = ["trio_heartbeat", "trio_heartbeat.testing", "trio_heartbeat.probes"]

# thb_spec: the page that holds THB/1, the protocol specification. The
# {thb-spec} role links to its numbered sections ({thb-spec}`§4` renders
# "THB/1 §4"), through the (thb-spec-4)= targets above them.
thb_spec_doc = "protocol"

# -- HTML -----------------------------------------------------------------------

html_theme = "alabaster"
html_title = f"trio-heartbeat {release}"
html_theme_options = {
    "description": "Heartbeats, failure detection and reconnection for Trio",
    "fixed_sidebar": True,
    "show_relbars": True,
}
