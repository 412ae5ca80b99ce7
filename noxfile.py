"""Automation sessions. `make test` / `make demo` are the entry points CI and users need; nox runs
the same things in throwaway environments (`nox -s tests`)."""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session) -> None:
    session.install("-c", "constraints.txt", "-e", ".[test]")


@nox.session
def tests(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", "-n", "2", "-q", "tests", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    _install(session)
    session.run("python", "-m", "mmcore.demo")


@nox.session
def bench(session: nox.Session) -> None:
    """Merge benchmark (docs/performance.md): ratios against references in one process, not a test."""
    _install(session)
    session.run("python", "benchmarks/bench_merge.py", *session.posargs)
