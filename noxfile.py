"""Development tasks: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``, ``bench``, ``demo``."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck"]

PYTHON = os.environ.get("NOX_PYTHON") or None
#: Modules with no I/O: their coverage must stay at 100% of statements and branches.
SANS_IO = [
    "trio_heartbeat/_backoff.py",
    "trio_heartbeat/_budget.py",
    "trio_heartbeat/_config.py",
    "trio_heartbeat/_detectors.py",
    "trio_heartbeat/_errors.py",
    "trio_heartbeat/_events.py",
    "trio_heartbeat/_frames.py",
    "trio_heartbeat/_handshake.py",
    "trio_heartbeat/_pings.py",
    "trio_heartbeat/_protocol.py",
    "trio_heartbeat/_rate.py",
    "trio_heartbeat/_silence.py",
    "trio_heartbeat/_state.py",
]
#: The runtime under mutation testing with the core: one connection, the server, the reconnecting client.
RUNTIME = [
    "trio_heartbeat/_connection.py",
    "trio_heartbeat/_mailbox.py",
    "trio_heartbeat/_outcome.py",
    "trio_heartbeat/_reader.py",
    "trio_heartbeat/_registry.py",
    "trio_heartbeat/_server.py",
    "trio_heartbeat/_stream_connection.py",
    "trio_heartbeat/_supervisor.py",
    "trio_heartbeat/_transport.py",
    "trio_heartbeat/_writer.py",
]


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
    groups = {"core": SANS_IO, "runtime": RUNTIME}
    args: list[str] = []
    for arg in session.posargs:
        if arg in groups:
            args += [path.removesuffix(".py").replace("/", ".") + "*" for path in groups[arg]]
        else:
            args.append(arg)
    session.run("mutmut", "run", *args)
    session.run("mutmut", "results")
