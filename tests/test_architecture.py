"""The module map in docs/architecture.md against the code, and the test layout against the modules.

Each module's imports of the package, read from its source, must be exactly
the ones the page lists (with those made under ``TYPE_CHECKING`` marked
*(annotations)*, and those made inside a function, when it runs, counted as
run-time ones); the layers may only point down; the sans-IO core imports
nothing but the standard library; and no module is over 600 lines.

The tests follow the same map (tests/README.md): every source module has one
test module named for it (``test_frames.py`` for ``_frames``,
``test_testing_wire.py`` for ``testing/_wire``), every other test module is a
cross-cutting suite listed here, each test module says in its docstring what
it tests, and no test module imports another.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trio_heartbeat"
PAGE = ROOT / "docs" / "architecture.md"
TESTS = ROOT / "tests"
LAYERS = ["core", "runtime", "services", "edges"]
MAX_LINES = 600

Imports = dict[str, tuple[set[str], set[str]]]


def module_name(path: Path) -> str:
    """``_frames`` for trio_heartbeat/_frames.py, ``testing/_wire`` for the test kit's."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    return "/".join(relative.parts)


def _target(name: str, node: ast.ImportFrom) -> list[str]:
    # The package modules an import names, in the page's spelling.
    # An __init__ resolves against its own package, any other module against
    # the package that holds it: either way, the path without its last part.
    package = name.split("/")[:-1]
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
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                # An import made when a function runs (an optional extra's module,
                # say) is a run-time dependency all the same.
                visit(node.body, typing_only)

    visit(ast.parse(path.read_text(encoding="utf-8")).body, False)
    annotations -= runtime  # named for annotations and imported lazily: a run-time import
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


# -- the test layout -------------------------------------------------------------------

#: Modules with no test module of their own: the public names (test_public_api)
#: and the entry point (test_cli runs ``main``).
NO_TEST_MODULE = {"__init__", "__main__", "testing/__init__"}
#: Suites that no single module owns, and what each one covers.
CROSS_CUTTING = {
    "test_architecture": "the module map and this layout, against the code",
    "test_public_api": "the public names, and every type in a public signature",
    "test_spec": "docs/protocol.md and its test vectors, against the code",
    "test_conformance": "raw bytes, built by hand from the spec, against the CLI server",
    "test_cancellation": "one connection cancelled at every point it can be",
    "test_cancellation_services": "the server, registry and reconnecting client cancelled anywhere",
    "test_leaks": "nothing left behind, however a connection ends",
    "test_resilience": "real server processes and a fault proxy under a reconnecting client",
    "test_tcp": "servers and clients over real loopback sockets",
    "test_tls": "servers and clients over TLS and mutual TLS",
    "test_benchmarks_smoke": "the benchmark harness still runs",
    "test_testing": "the test kit's user guide (docs/testing.md) runs",
    "test_service_registry": "registration and discovery, one suite over both stores",
}
#: A second test module of one source module, for one kind of test: named for
#: the module too, with what sets it apart.
COMPANIONS = {
    "test_protocol_stateful": "_protocol",
    "test_local_health_processes": "_local_health",
    "test_health_monitor_processes": "_health_monitor",
    "test_systemd_processes": "_systemd",
    "test_services_stateful": "_services",
}


def name_of_test_module(module: str) -> str:
    """``test_frames`` for ``_frames``, ``test_testing_wire`` for ``testing/_wire``."""
    *packages, name = module.split("/")
    return "_".join(["test", *packages, name.lstrip("_")])


def modules_with_tests() -> list[str]:
    return [module_name(path) for path in sources() if module_name(path) not in NO_TEST_MODULE]


def suite_paths() -> list[Path]:
    return sorted(TESTS.glob("test_*.py"))


def test_the_layout_names_each_modules_test_module() -> None:
    assert name_of_test_module("_frames") == "test_frames"
    assert name_of_test_module("_stream_connection") == "test_stream_connection"
    assert name_of_test_module("testing/_wire") == "test_testing_wire"
    # What the layout check would refuse: test modules told apart by history.
    allowed = {name_of_test_module(module) for module in modules_with_tests()}
    assert "test_connection_paths" not in allowed | set(CROSS_CUTTING) | set(COMPANIONS)


def test_every_source_module_has_its_test_module() -> None:
    missing = [
        f"{name_of_test_module(module)}.py for {module}"
        for module in modules_with_tests()
        if not (TESTS / f"{name_of_test_module(module)}.py").is_file()
    ]
    assert missing == []


def test_every_test_module_is_named_for_a_module_or_is_a_listed_suite() -> None:
    named = {name_of_test_module(module) for module in modules_with_tests()}
    stray = {path.stem for path in suite_paths()} - named - set(CROSS_CUTTING) - set(COMPANIONS)
    assert stray == set(), "name it for the module it tests, or list it as cross-cutting"


def test_the_listed_suites_exist_and_are_not_named_for_a_module() -> None:
    named = {name_of_test_module(module) for module in modules_with_tests()}
    for suite in [*CROSS_CUTTING, *COMPANIONS]:
        assert (TESTS / f"{suite}.py").is_file(), suite
        assert suite not in named, suite
    for companion, module in COMPANIONS.items():
        assert companion.startswith(name_of_test_module(module) + "_")


def test_the_readme_lists_every_cross_cutting_suite() -> None:
    readme = (TESTS / "README.md").read_text(encoding="utf-8")
    assert [suite for suite in [*CROSS_CUTTING, *COMPANIONS] if f"`{suite}.py`" not in readme] == []


@pytest.mark.parametrize("path", suite_paths(), ids=lambda path: path.stem)
def test_every_test_module_says_what_it_tests(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring, f"{path.name} has no module docstring"


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda path: path.stem)
def test_no_test_module_imports_another(path: Path) -> None:
    """Shared helpers live in helpers.py (or conftest.py), never in a test module."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert {name for name in imported if name.startswith(("test_", "conftest"))} == set()


# -- no test hangs ---------------------------------------------------------------------


def run_pytest(directory: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run pytest (in Trio mode) over the tests in ``directory``; its result and how long it took."""
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options]
    done = subprocess.run(
        [*command, "-o", "trio_mode=true", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=directory,
    )
    return done, time.monotonic() - started


def test_a_test_that_hangs_fails_within_the_suites_time_limit(tmp_path: Path) -> None:
    """pytest-timeout is on for the whole suite: a regression that hangs fails instead."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["timeout"] == 60
    (tmp_path / "test_hang.py").write_text(
        "import trio\n\nasync def test_waits_forever():\n    await trio.sleep_forever()\n"
    )
    done, took = run_pytest(tmp_path, "--timeout", "2")
    assert done.returncode == 1, done.stdout
    assert "Timeout" in done.stdout
    assert took < 60


def test_a_virtual_time_test_that_hangs_fails_at_once_with_a_message(tmp_path: Path) -> None:
    """Under ``autojump_clock`` a test that waits forever while timers keep firing
    fails after an hour of virtual time, in a moment of real time, not at the
    per-test limit."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_hang.py").write_text(
        "import trio\n\n"
        "async def test_heartbeats_forever(autojump_clock):\n"
        "    while True:\n"
        "        await trio.sleep(1)\n\n"
        "async def test_ends_in_time(autojump_clock):\n"
        "    await trio.sleep(3599)\n"
    )
    done, took = run_pytest(tmp_path)
    assert done.returncode == 1, done.stdout
    assert "still running after 3600 s of virtual time: it hangs" in done.stdout
    assert "1 failed, 1 passed" in done.stdout
    assert took < 30


def _noxfile_list(name: str) -> list[str]:
    """A module-level list of strings assigned in noxfile.py."""
    for node in ast.parse((ROOT / "noxfile.py").read_text()).body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                assert node.value is not None
                value = ast.literal_eval(node.value)
                assert isinstance(value, list)
                return value
    raise AssertionError(f"no {name} in noxfile.py")


def test_mutation_testing_covers_the_core_and_the_runtime_and_nothing_else() -> None:
    """``[tool.mutmut] only_mutate`` is exactly the modules ``nox -s mutate -- core``
    and ``runtime`` name (the sans-IO list is the one held at 100% coverage)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    only_mutate = config["tool"]["mutmut"]["only_mutate"]
    core, runtime = _noxfile_list("SANS_IO"), _noxfile_list("RUNTIME")
    assert sorted(only_mutate) == sorted(core + runtime)
    assert len(set(only_mutate)) == len(only_mutate)
