"""The public API: every name it shows is importable, and every type it mentions is exported.

A user who reads a public signature (a parameter, a return value, an
attribute, a dataclass field) must be able to import every type named in it
from ``trio_heartbeat`` or ``trio_heartbeat.testing``. ``__all__`` lists the
public names exactly, and the concrete public classes are ``@final`` where
nothing is meant to subclass them.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import subprocess
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

import trio_heartbeat
import trio_heartbeat.etcd
import trio_heartbeat.probes
import trio_heartbeat.testing

PUBLIC_MODULES = [
    trio_heartbeat,
    trio_heartbeat.testing,
    trio_heartbeat.probes,
    trio_heartbeat.etcd,
]
#: Base classes, protocols and enums: meant to be subclassed, implemented or
#: are final by nature.
#: Classes that are handed out, never constructed by users (their docstrings
#: say so): their constructors take the test kit's private plumbing.
NOT_CONSTRUCTED = {
    "FaultyStream",
    "FaultyHalfCloseableStream",
    "ProxyConnection",
    "LinkFaults",
    "CheckIn",
    "ServiceSupervisor",
}
OPEN_FOR_SUBCLASSING = {
    "Event",
    "FailureDetector",
    "HeartbeatError",
    "ProtocolError",
    "ConnectionClosed",
    "SupervisorEvent",
    "ServiceEvent",
    "FaultyStream",
    "SupportsSockopt",
}


def exported() -> dict[int, str]:
    """id(object) -> its public name, for everything the public modules export."""
    found: dict[int, str] = {}
    for module in PUBLIC_MODULES:
        for name in module.__all__:
            found[id(getattr(module, name))] = f"{module.__name__}.{name}"
    return found


def public_objects() -> Iterator[tuple[str, Any]]:
    for module in PUBLIC_MODULES:
        for name in module.__all__:
            yield f"{module.__name__}.{name}", getattr(module, name)


def _hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target, include_extras=False)
    except (TypeError, NameError):
        return {}


def signature_types(obj: Any) -> Iterator[tuple[str, Any]]:
    """Every annotation a user sees on ``obj``: its signature, or a class's
    constructor, public methods, properties and fields."""
    if inspect.isclass(obj):
        if issubclass(obj, BaseException) or issubclass(obj, type(typing.Protocol)):
            return
        if obj.__name__ not in NOT_CONSTRUCTED:
            yield from (("__init__." + k, v) for k, v in _hints(obj.__init__).items())
        if dataclasses.is_dataclass(obj):
            yield from _hints(obj).items()
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(member, property) and member.fget is not None:
                yield from ((f"{name}", v) for k, v in _hints(member.fget).items() if k == "return")
            elif inspect.isfunction(member):
                yield from ((f"{name}.{k}", v) for k, v in _hints(member).items())
    elif callable(obj) and not isinstance(obj, typing.TypeVar):
        yield from _hints(obj).items()


def named_types(annotation: Any) -> Iterator[Any]:
    """The classes and aliases an annotation is built from."""
    if annotation is None or annotation is type(None):
        return
    if isinstance(annotation, (typing.TypeVar, typing.TypeVarTuple)):
        return  # a generic's parameter, not a type to import
    origin = typing.get_origin(annotation)
    if origin is not None:
        if origin is not typing.Union and origin is not types.UnionType:
            yield origin
        for arg in typing.get_args(annotation):
            if isinstance(arg, list):  # Callable[[...], ...]
                for inner in arg:
                    yield from named_types(inner)
            elif arg is not Ellipsis:
                yield from named_types(arg)
        return
    yield annotation


def ours(kind: Any) -> bool:
    return getattr(kind, "__module__", "").startswith("trio_heartbeat")


def test_all_lists_every_public_name_and_nothing_else() -> None:
    for module in PUBLIC_MODULES:
        public = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
        }
        assert set(module.__all__) == public, module.__name__


def test_every_type_in_a_public_signature_is_exported() -> None:
    names = exported()
    missing: dict[str, set[str]] = {}
    for where, obj in public_objects():
        for attribute, annotation in signature_types(obj):
            for kind in named_types(annotation):
                if ours(kind) and id(kind) not in names:
                    missing.setdefault(getattr(kind, "__qualname__", repr(kind)), set()).add(
                        f"{where}.{attribute}"
                    )
    assert missing == {}


def test_the_check_finds_a_type_that_is_not_exported() -> None:
    class Hidden:
        __module__ = "trio_heartbeat._hidden"

    found = named_types(dict[str, list[Hidden | None]] | Callable[[Hidden], None])
    assert [kind for kind in found if ours(kind)] == [Hidden, Hidden]
    assert id(Hidden) not in exported()
    # And a real signature is read: open_connection's config is a Config.
    hints = dict(signature_types(trio_heartbeat.open_connection))
    assert trio_heartbeat.Config in list(named_types(hints["config"]))


def concrete_classes() -> list[tuple[str, type]]:
    """Public classes that nothing is meant to subclass (not bases, protocols, enums, errors)."""
    return [
        (name, obj)
        for name, obj in public_objects()
        if inspect.isclass(obj)
        and obj.__name__ not in OPEN_FOR_SUBCLASSING
        and not issubclass(obj, BaseException | enum.Enum)
        and not getattr(obj, "_is_protocol", False)
    ]


@pytest.mark.parametrize(("name", "cls"), concrete_classes())
def test_concrete_public_classes_are_final(name: str, cls: type) -> None:
    assert getattr(cls, "__final__", False), f"{name} is not @final"


def test_leaf_exceptions_are_final() -> None:
    leaves = [
        obj
        for _, obj in public_objects()
        if inspect.isclass(obj)
        and issubclass(obj, Exception)
        and obj.__name__ not in OPEN_FOR_SUBCLASSING
    ]
    assert leaves
    assert [cls.__name__ for cls in leaves if not getattr(cls, "__final__", False)] == []


def test_the_python_the_readme_names_is_the_one_the_package_requires() -> None:
    """#10: the README said 3.11 while the package accepted 3.10."""
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["mypy"]["python_version"] == "3.11"
    assert "Python 3.11 or newer" in (root / "README.md").read_text()
    assert metadata.metadata("trio-heartbeat")["Requires-Python"] == ">=3.11"


def test_importing_the_package_needs_trio_alone() -> None:
    """Extras stay extras: h11 (the probes), httpx, rich are imported only by the modules
    that use them, never by ``import trio_heartbeat``."""
    code = (
        "import sys, trio_heartbeat, trio_heartbeat.testing\n"
        "extras = {'h11', 'httpx', 'rich', 'matplotlib'} & set(sys.modules)\n"
        "print(sorted(extras))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
