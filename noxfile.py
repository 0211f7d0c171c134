"""Development tasks: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``, ``bench``, ``demo``."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck"]

PYTHON = os.environ.get("NOX_PYTHON") or None
#: Modules with no I/O: their coverage must stay at 100% of statements and branches.
SANS_IO = [
    "trio_heartbeat/_adaptive.py",
    "trio_heartbeat/_address.py",
    "trio_heartbeat/_backoff.py",
    "trio_heartbeat/_breaker.py",
    "trio_heartbeat/_budget.py",
    "trio_heartbeat/_config.py",
    "trio_heartbeat/_detectors.py",
    "trio_heartbeat/_errors.py",
    "trio_heartbeat/_etcd_json.py",
    "trio_heartbeat/_events.py",
    "trio_heartbeat/_frames.py",
    "trio_heartbeat/_handshake.py",
    "trio_heartbeat/_health.py",
    "trio_heartbeat/_instances.py",
    "trio_heartbeat/_kv.py",
    "trio_heartbeat/_leases.py",
    "trio_heartbeat/_pings.py",
    "trio_heartbeat/_protocol.py",
    "trio_heartbeat/_rate.py",
    "trio_heartbeat/_restart.py",
    "trio_heartbeat/_silence.py",
    "trio_heartbeat/_state.py",
]
#: The runtime under mutation testing with the core: one connection, the server, the reconnecting client.
RUNTIME = [
    "trio_heartbeat/_circuit.py",
    "trio_heartbeat/_connection.py",
    "trio_heartbeat/_discovery.py",
    "trio_heartbeat/_etcd.py",
    "trio_heartbeat/_health_monitor.py",
    "trio_heartbeat/_liveness_breaker.py",
    "trio_heartbeat/_local_health.py",
    "trio_heartbeat/_mailbox.py",
    "trio_heartbeat/_memory_store.py",
    "trio_heartbeat/_outcome.py",
    "trio_heartbeat/_outliers.py",
    "trio_heartbeat/_probes.py",
    "trio_heartbeat/_publisher.py",
    "trio_heartbeat/_reader.py",
    "trio_heartbeat/_registration.py",
    "trio_heartbeat/_registry.py",
    "trio_heartbeat/_sdnotify.py",
    "trio_heartbeat/_server.py",
    "trio_heartbeat/_services.py",
    "trio_heartbeat/_stream_connection.py",
    "trio_heartbeat/_supervisor.py",
    "trio_heartbeat/_systemd.py",
    "trio_heartbeat/_transport.py",
    "trio_heartbeat/_writer.py",
]
#: Modules with nothing for mutmut to change (a protocol whose methods never run):
#: ``mutate_own`` skips them, as mutmut stops with an error on a module without mutants.
WITHOUT_MUTANTS = {"_kv"}
#: What ``core`` and ``runtime`` stand for in the mutation sessions.
MUTATION_GROUPS = {"core": SANS_IO, "runtime": RUNTIME}


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite, with branch coverage; the sans-IO core must be fully covered."""
    session.install("-e", ".[test]")
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "report", "--fail-under=0")
    session.run("coverage", "report", "--fail-under=100", "--include", ",".join(SANS_IO))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff, with the ASYNC rules, over the code, tests and benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and the benchmarks."""
    session.install("-e", ".[test,bench]", "mypy>=1.10", "nox")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the docs with warnings as errors; run the examples in the pages and docstrings."""
    session.install("-e", ".[docs]")
    session.run("sphinx-build", "-W", "-b", "html", "docs", "docs/_build/html")
    session.run("sphinx-build", "-W", "-b", "doctest", "docs", "docs/_build/doctest")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Every benchmark, each printed as a ratio to a baseline measured in the same run."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """A server and a client in one process, through a fault-injecting proxy."""
    session.install("-e", ".")
    session.run("python", "-m", "trio_heartbeat", "demo", *session.posargs)


@nox.session(python=PYTHON)
def mutate(session: nox.Session) -> None:
    """Mutation testing with mutmut 3; prints the survivors. Not part of CI.

    Arguments go to ``mutmut run``: mutant name globs (``"trio_heartbeat._rate*"``),
    ``--max-children``; ``core`` and ``runtime`` stand for their modules, one
    after the other: ``nox -s mutate -- runtime``. Results are kept between
    runs, so a second run only tries what changed. mutmut 3 because it runs
    each mutant against only the tests that reach the mutated function
    (cosmic-ray runs the whole suite per mutant, hours here).
    """
    session.install("-e", ".[test]", "mutmut>=3.3")
    args: list[str] = []
    for arg in session.posargs:
        if arg in MUTATION_GROUPS:
            paths = MUTATION_GROUPS[arg]
            args += [path.removesuffix(".py").replace("/", ".") + "*" for path in paths]
        else:
            args.append(arg)
    session.run("mutmut", "run", *args)
    session.run("mutmut", "results")


@nox.session(python=PYTHON)
def mutate_own(session: nox.Session) -> None:
    """Mutation testing of a module against its own test module alone; not part of CI.

    ``nox -s mutate_own -- _reader _writer`` (or ``runtime``, or ``core``): each
    module's tests should stand on their own, so a mutant that only another
    module's tests catch shows up here as a survivor. Each module runs in a
    scratch copy of the tree, ``.mutate-own/<module>/``, whose ``[tool.mutmut]``
    names that module and its tests, ``tests/test_<name>.py`` and
    ``tests/test_<name>_*.py`` (``test_protocol_stateful.py``, say); its
    results are kept there, and a later run tries the survivors again.
    """
    session.install("-e", ".[test]", "mutmut>=3.3")
    modules: list[str] = []
    for arg in session.posargs:
        paths = MUTATION_GROUPS.get(arg, [f"trio_heartbeat/{arg.removesuffix('.py')}.py"])
        modules += [Path(path).stem for path in paths]
    if not modules:
        session.error("name the modules: nox -s mutate_own -- _reader (or runtime, or core)")
    root = Path(__file__).parent
    skip = shutil.ignore_patterns(".*", "mutants", "__pycache__", "_build", "*.egg-info")
    for module in modules:
        if module in WITHOUT_MUTANTS:
            session.log(f"{module}: nothing to mutate")
            continue
        scratch = root / ".mutate-own" / module
        if scratch.exists():  # refresh the code and tests; keep mutants/ (the results)
            for child in scratch.iterdir():
                if child.is_dir() and child.name != "mutants":
                    shutil.rmtree(child)
                elif child.is_file():
                    child.unlink()
        for child in root.iterdir():
            if child.name.startswith(".") or child.name == "mutants":
                continue
            target = scratch / child.name
            if child.is_dir():
                shutil.copytree(child, target, ignore=skip)
            else:
                shutil.copy2(child, target)
        config = (scratch / "pyproject.toml").read_text()
        only = f'only_mutate = ["trio_heartbeat/{module}.py"]'
        config = re.sub(r"only_mutate = \[.*?\]", only, config, count=1, flags=re.S)
        name = module.lstrip("_")
        own = sorted({*root.glob(f"tests/test_{name}.py"), *root.glob(f"tests/test_{name}_*.py")})
        selection = ", ".join(f'"{path.relative_to(root)}"' for path in own)
        tests = f"pytest_add_cli_args_test_selection = [{selection}]"
        config = re.sub(r"pytest_add_cli_args_test_selection = \[.*?\]", tests, config, count=1)
        (scratch / "pyproject.toml").write_text(config)
        session.chdir(scratch)
        if (scratch / "mutants").exists():
            # mutmut keeps its verdicts: try the last run's survivors again,
            # by name, against the tests as they are now. Its record of which
            # tests reach which function is made again: a test that now reaches
            # a function it did not would otherwise not be run on its mutants.
            (scratch / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
            listed = str(session.run("mutmut", "results", silent=True) or "")
            again = [
                line.rsplit(":", 1)[0].strip()
                for line in listed.splitlines()
                if line.rstrip().endswith(": survived")
            ]
            if again:
                session.run("mutmut", "run", *again)
        session.run("mutmut", "run")
        session.run("mutmut", "results")
    session.chdir(root)
