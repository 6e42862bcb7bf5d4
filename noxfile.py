"""Test sessions. `uv run nox` runs the default set: each package alone, the integration tests, lint.

- `nox -s convert` (likewise data, peft, train, recipes): a fresh venv holding ONLY that package and its declared
  dependencies, at the versions in uv.lock, then that package's tests. This is what proves that installing
  one package alone works. A package's session joins the default set once it has tests.
- `nox -s integration`: the whole workspace, the cross-package tests in tests/.
- `nox -s gpu`: tests marked `gpu` (run on a CUDA machine; never in CI).
- `nox -s lint`: ruff.
Arguments after `--` go to pytest, e.g. `uv run nox -s convert -- -k qkv -x`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PYTHON = "3.12"
PACKAGES = {p.name.removeprefix("bridge-"): p for p in sorted((ROOT / "packages").iterdir())
            if (p / "pyproject.toml").exists()}
PYTEST = ["pytest", "-p", "no:cacheprovider", "--durations=8"]

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True


def _has_tests(pkg: Path) -> bool:
    return any((pkg / "tests").rglob("test_*.py"))


def _export(session: nox.Session, *args: str) -> Path:
    """Write the locked requirements selected by ``args`` (a `uv export` selection) to a file."""
    out = Path(session.create_tmp()) / f"requirements-{abs(hash(args))}.txt"
    session.run_install("uv", "export", "--frozen", "--no-hashes", "--no-header", "--quiet", *args,
                        "--output-file", str(out), external=True, silent=True)
    return out


def _install_locked(session: nox.Session, *selection: str) -> None:
    session.install("-r", str(_export(session, *selection)), "-r", str(_export(session, "--only-group", "dev")))


def _package_session(short: str, pkg: Path):
    dist = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]["name"]

    @nox.session(name=short, python=PYTHON, default=_has_tests(pkg))
    def run(session: nox.Session) -> None:
        _install_locked(session, "--package", dist, "--no-dev")
        # The venv must hold this package and its declared dependencies only, and never Transformer Engine.
        allowed = {d.replace("-", "_") for d in _workspace_deps(pkg)} | {dist.replace("-", "_")}
        absent = sorted({f"bridge_{n}" for n in PACKAGES} - allowed) + ["transformer_engine"]
        session.run("python", "-c", "import importlib.util, sys; present = [m for m in sys.argv[1:] if "
                    "importlib.util.find_spec(m)]; sys.exit(f'not isolated, found {present}' if present else 0)",
                    *absent, silent=True)
        session.run(*PYTEST, str(pkg / "tests"), "-m", "not gpu", *session.posargs)

    run.__doc__ = f"{dist} alone in a fresh venv: its tests"
    return run


def _workspace_deps(pkg: Path) -> set[str]:
    """Bridge packages ``pkg`` depends on, directly or through other bridge packages."""
    deps: set[str] = set()
    todo = [pkg]
    while todo:
        project = tomllib.loads((todo.pop() / "pyproject.toml").read_text())["project"]
        for req in project.get("dependencies", []):
            name = req.split(";")[0].split("[")[0].strip()
            if name.startswith("bridge-") and name not in deps:
                deps.add(name)
                todo.append(ROOT / "packages" / name)
    return deps


for _short, _pkg in PACKAGES.items():
    globals()[f"session_{_short}"] = _package_session(_short, _pkg)


@nox.session(python=PYTHON)
def integration(session: nox.Session) -> None:
    """The whole workspace: cross-package and end-to-end tests (tests/), not the GPU ones."""
    _install_locked(session, "--all-packages", "--no-dev")
    session.run(*PYTEST, "tests", "-m", "not gpu", *session.posargs)


@nox.session(python=PYTHON, default=False)
def gpu(session: nox.Session) -> None:
    """Tests marked `gpu` across the workspace (CUDA machine; add `--extra te` environments yourself)."""
    _install_locked(session, "--all-packages", "--no-dev")
    session.run(*PYTEST, "-m", "gpu", "tests", *[str(p / "tests") for p in PACKAGES.values() if _has_tests(p)],
                *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    _install_locked(session, "--only-group", "dev")
    session.run("ruff", "check", ".")
