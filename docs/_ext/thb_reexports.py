"""Sphinx extension: re-exported module data keeps its ``#:`` documentation.

The public API is re-exported from private modules (``from ._backoff import
DEFAULT_BACKOFF as DEFAULT_BACKOFF``), and the API pages document it under the
public name, ``trio_heartbeat.DEFAULT_BACKOFF``. autodoc looks for a data
item's ``#:`` comment in the module named in the directive, which for a
re-export is the package's ``__init__``, where there is none; it then falls
back to the value's own ``__doc__``, which for an instance is its class's
docstring and for a type alias is a line about ``typing``.

This extension finds the private submodule that defines the same object under
the same name and uses the ``#:`` comment written there instead.

It also checks, once every page is read, that each public name of the
modules listed in ``thb_public_modules`` (their ``__all__``, or else every
name without a leading underscore) is documented somewhere, and warns about
each one that is not: a name added to the API cannot be forgotten here.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

logger = logging.getLogger(__name__)

__all__ = ["setup"]

_MISSING = object()


def _private_submodules(package: ModuleType) -> list[ModuleType]:
    path = getattr(package, "__path__", None)
    if path is None:
        return []
    return [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(path)
        if info.name.startswith("_") and not info.name.startswith("__")
    ]


def defining_comment(name: str, obj: object) -> list[str] | None:
    """The ``#:`` comment lines on ``obj`` where a private submodule defines it, if any."""
    package_name, _, attribute = name.rpartition(".")
    try:
        package = importlib.import_module(package_name)
    except ImportError:
        return None
    for module in _private_submodules(package):
        if getattr(module, attribute, _MISSING) is not obj:
            continue
        docs = ModuleAnalyzer.for_module(module.__name__).find_attr_docs()
        lines = docs.get(("", attribute))
        if lines:
            return list(lines)
    return None


def _use_defining_comment(
    app: Sphinx, what: str, name: str, obj: object, options: Any, lines: list[str]
) -> None:
    if what != "data":
        return
    comment = defining_comment(name, obj)
    if comment is not None:
        lines[:] = comment


def public_names(module_name: str) -> list[str]:
    """The names a user may import from ``module_name``.

    Its ``__all__`` if it has one; otherwise every name without a leading
    underscore except submodules and ``from __future__`` imports.
    """
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and not isinstance(value, ModuleType)
            and type(value).__module__ != "__future__"
        ]
    return sorted(names)


def _check_everything_documented(app: Sphinx, env: BuildEnvironment) -> None:
    documented = {name for name, *_ in env.get_domain("py").get_objects()}
    for module_name in app.config.thb_public_modules:
        for name in public_names(module_name):
            if f"{module_name}.{name}" not in documented:
                logger.warning(
                    "%s.%s is public but not documented (add it to api.md)",
                    module_name,
                    name,
                    type="thb",
                    subtype="undocumented",
                )


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.autodoc")
    app.add_config_value("thb_public_modules", [], "env", types=frozenset({list}))
    app.connect("autodoc-process-docstring", _use_defining_comment)
    app.connect("env-check-consistency", _check_everything_documented)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
