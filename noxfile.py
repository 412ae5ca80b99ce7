"""Automation sessions. `make test` / `make demo` are the entry points CI and users need; nox runs
the same things in throwaway environments:

    nox -s tests                 core + all four plugins installed together
    nox -s "plugin(name='whisper')"   one plugin alone in its own environment (no other plugin present)
    nox -s demo
    nox -s bench                 every benchmark in benchmarks/ (docs/performance.md)
    nox -s newest                the suite on the newest transformers/peft/timm the registry serves
"""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PLUGINS = ["clip", "siglip", "eva02", "whisper", "qwen2vl"]


def _install(session: nox.Session, *plugins: str) -> None:
    session.install("-c", "constraints.txt", "-e", ".[test]", *(f"./plugins/{p}" for p in plugins))


@nox.session
def tests(session: nox.Session) -> None:
    _install(session, *PLUGINS)
    session.run("pytest", "-n", "2", "-q", "tests", *(f"plugins/{p}/tests" for p in PLUGINS), *session.posargs)


@nox.session
@nox.parametrize("name", PLUGINS)
def plugin(session: nox.Session, name: str) -> None:
    _install(session, name)
    session.run("pytest", "-q", f"plugins/{name}/tests", env={"MMCORE_STRICT_PLUGINS": "1"})


@nox.session
def newest(session: nox.Session) -> None:
    """The suite against the newest transformers, peft and timm (the torch stack stays pinned)."""
    _install(session, *PLUGINS)
    session.install("--upgrade", "transformers", "peft", "timm", "huggingface_hub", "tokenizers")
    session.run("python", "-c", "import transformers, peft, timm; print(transformers.__version__, peft.__version__, timm.__version__)")
    session.run("pytest", "-n", "2", "-q", "tests", *(f"plugins/{p}/tests" for p in PLUGINS), *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    _install(session, *PLUGINS)
    session.run("python", "-m", "mmcore.demo")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (docs/performance.md): ratios against references in one process, never tests.

    Arguments after ``--`` go to the merge and model benchmarks, which take the same ``--device`` and
    ``--dtype`` (``fp32``/``bf16`` or ``float32``/``bfloat16``): ``nox -s bench -- --device cuda --dtype bf16``.
    """
    _install(session, *PLUGINS)
    session.run("python", "benchmarks/bench_cli.py")
    for script in ("bench_merge.py", "bench_model.py"):
        session.run("python", f"benchmarks/{script}", *session.posargs)
