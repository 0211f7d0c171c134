"""The module map in docs/architecture.md against the code: the page must say what the code does.

Each module's imports of the package, read from its source, must be exactly
the ones the page lists (with those made under ``TYPE_CHECKING`` marked
*(annotations)*); the layers may only point down; the sans-IO core imports
nothing but the standard library; and no module is over 600 lines.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trio_heartbeat"
PAGE = ROOT / "docs" / "architecture.md"
LAYERS = ["core", "runtime", "services", "edges"]
MAX_LINES = 600

Imports = dict[str, tuple[set[str], set[str]]]


def module_name(path: Path) -> str:
    """``_frames`` for trio_heartbeat/_frames.py, ``testing/_wire`` for the test kit's."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    return "/".join(relative.parts)


def _target(name: str, node: ast.ImportFrom) -> list[str]:
    # The package modules an import names, in the page's spelling.
    parts = name.split("/")
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    if node.module is not None:
        return ["/".join([*base, *node.module.split(".")])]
    return ["/".join([*base, alias.name]) for alias in node.names]


def package_imports(path: Path) -> tuple[set[str], set[str], set[str]]:
    """(run-time imports of the package, annotation-only ones, third-party top-level names)."""
    name = module_name(path)
    runtime: set[str] = set()
    annotations: set[str] = set()
    external: set[str] = set()

    def visit(nodes: list[ast.stmt], typing_only: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and ast.unparse(node.test) in {
                "TYPE_CHECKING",
                "typing.TYPE_CHECKING",
            }:
                visit(node.body, True)
                visit(node.orelse, typing_only)
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                (annotations if typing_only else runtime).update(_target(name, node))
            elif isinstance(node, ast.ImportFrom):
                assert node.module is not None
                external.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                external.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.If | ast.Try):
                for block in (node.body, node.orelse, *getattr(node, "handlers", [])):
                    visit(block if isinstance(block, list) else block.body, typing_only)
                visit(getattr(node, "finalbody", []), typing_only)

    visit(ast.parse(path.read_text(encoding="utf-8")).body, False)
    return runtime, annotations, external - set(sys.stdlib_module_names) - {"trio_heartbeat"}


def page_map() -> dict[str, tuple[str, set[str], set[str]]]:
    """module -> (layer, run-time imports, annotation-only imports), from the page's table."""
    text = PAGE.read_text(encoding="utf-8")
    table = text[text.index("| module | layer |") :]
    rows: dict[str, tuple[str, set[str], set[str]]] = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("| `"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        module, layer, _, imports = cells
        runtime: set[str] = set()
        annotations: set[str] = set()
        if imports != "none":
            for item in imports.split(","):
                found = re.fullmatch(r"`([\w/]+)`( \*\(annotations\)\*)?", item.strip())
                assert found, f"cannot read {item!r} in the row of {module}"
                (annotations if found[2] else runtime).add(found[1])
        rows[module.strip("`")] = (layer, runtime, annotations)
    return rows


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_on_the_page_and_nothing_else() -> None:
    assert set(page_map()) == {module_name(path) for path in sources()}


@pytest.mark.parametrize("path", sources(), ids=module_name)
def test_the_page_lists_exactly_the_imports_of_each_module(path: Path) -> None:
    _, runtime, annotations = page_map()[module_name(path)]
    actual_runtime, actual_annotations, _ = package_imports(path)
    assert (actual_runtime, actual_annotations) == (runtime, annotations)


def _layer(module: str, rows: dict[str, tuple[str, set[str], set[str]]]) -> int:
    if module not in rows and module == "testing":
        return LAYERS.index("edges")
    return LAYERS.index(rows[module][0])


def test_imports_point_down() -> None:
    rows = page_map()
    upward = [
        (module, target)
        for module, (layer, runtime, _) in rows.items()
        for target in runtime
        if _layer(target, rows) > LAYERS.index(layer)
    ]
    assert upward == []


def test_the_core_imports_nothing_but_the_standard_library() -> None:
    rows = page_map()
    core = [PACKAGE / f"{module}.py" for module, (layer, _, _) in rows.items() if layer == "core"]
    assert len(core) >= 10
    assert {path.stem: package_imports(path)[2] for path in core} == {
        path.stem: set() for path in core
    }


def test_the_check_would_see_a_wrong_row() -> None:
    # The import reader is itself checked: _protocol imports _state, which
    # the page lists, and the page does not list an import of _connection.
    runtime, _, _ = package_imports(PACKAGE / "_protocol.py")
    assert "_state" in runtime
    assert "_connection" not in runtime
    assert package_imports(PACKAGE / "_reader.py")[1] == {"_connection"}


@pytest.mark.parametrize("path", sources(), ids=module_name)
def test_no_module_is_over_600_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines"
