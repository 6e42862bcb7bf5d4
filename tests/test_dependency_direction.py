"""Each package imports only what it declares (docs/architecture.md, "Packages and dependency direction"), checked
statically.

- Another bridge package may be imported only if declared in ``[project].dependencies``.
- Any other third-party import must be installed by the declared dependencies (their transitive closure), so
  "install only this package" works. Test files may also use the workspace's dev tools (pytest).
- Optional extras (``transformer_engine``, ``liger_kernel``, ``wandb``, ...) must be imported under a
  ``try`` whose handler catches ``Exception`` (a broken Transformer Engine raises RuntimeError/OSError,
  not ImportError), and only by a package that declares that extra.
- The model-side packages (bridge-convert, bridge-data) hold no optimizer or training code: their sources never
  import (or reach through ``torch.optim``) megatron-core's optimizer, torch's optimizers or a training package,
  even though those are installed (docs/architecture.md, "Where each concern lives").
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
DEV_TOOLS = {"pytest", "_pytest", "nox", "peft"}  # the root dev group (HF peft: the oracle of bridge-peft's tests)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0])


def _project(pkg: Path) -> dict:
    return tomllib.loads((pkg / "pyproject.toml").read_text())["project"]


@cache
def _module_to_dists() -> dict[str, set[str]]:
    return {mod: {_norm(d) for d in dists} for mod, dists in metadata.packages_distributions().items()}


@cache
def _closure(dist: str) -> frozenset[str]:
    """The distribution and everything it requires (markers and extras ignored: an over-approximation)."""
    seen, todo = set(), [dist]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo.extend(_req_name(r) for r in reqs if "extra ==" not in r)
    return frozenset(seen)


def _imports(path: Path):
    """Yield (top-level module, line, guarded_by) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def guard(node: ast.AST) -> set[str]:
        caught: set[str] = set()
        while node in parents:
            parent = parents[node]
            if isinstance(parent, ast.Try) and node in parent.body:
                for handler in parent.handlers:
                    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                    caught |= {"BaseException" if n is None else getattr(n, "id", "") for n in names}
            node = parent
        return caught

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno, guard(node)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno, guard(node)


def _problems(pkg: Path) -> list[str]:
    project = _project(pkg)
    own = _norm(project["name"])
    declared = {_req_name(r) for r in project.get("dependencies", [])}
    extras = {_req_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    installed = set().union(*(_closure(d) for d in declared | {own}))
    bridge_dists = {_norm(_project(p)["name"]) for p in PACKAGES}
    problems = []
    for path in sorted(pkg.rglob("*.py")):
        if any(part in {".venv", "build", "dist"} for part in path.parts):
            continue
        is_test = "tests" in path.relative_to(pkg).parts
        for module, line, caught in _imports(path):
            if module in sys.stdlib_module_names or module == "__future__":
                continue
            where = f"{path.relative_to(pkg.parent)}:{line}"
            dists = _module_to_dists().get(module, set())
            if _norm(module) in bridge_dists or (not dists and _norm(module) in extras):
                dists = {_norm(module)}
            if not dists:
                if not (is_test and module in DEV_TOOLS) and not (path.parent / f"{module}.py").exists():
                    problems.append(f"{where}: imports {module!r}, which no installed distribution provides")
                continue
            if is_test and module in DEV_TOOLS:
                continue
            if dists & {own}:
                continue
            if dists & bridge_dists:
                if not dists & declared:
                    problems.append(f"{where}: imports {module!r} but {own} does not declare {sorted(dists)}")
                continue
            if dists & extras and not dists & installed:
                ok = "Exception" in caught or "BaseException" in caught
                if module != "transformer_engine":
                    ok = ok or "ImportError" in caught or "ModuleNotFoundError" in caught
                if not ok:
                    problems.append(f"{where}: optional {module!r} imported without try/except Exception")
                continue
            if not dists & installed:
                problems.append(f"{where}: imports {module!r} ({sorted(dists)}), not installed by {own}'s "
                                f"declared dependencies {sorted(declared)}")
    return problems


TRAINING_MODULES = ("megatron.core.optimizer", "megatron.core.optimizer_param_scheduler", "megatron.training",
                    "torch.optim", "bridge_train", "bridge_peft", "bridge_recipes")
"""Optimizer / training code: what a model-side package's sources must not import."""
MODEL_SIDE = ("bridge-convert", "bridge-data")


def _dotted_imports(path: Path):
    """Yield (dotted name, line) for every absolute import in ``path`` (``from a import b`` gives ``a.b`` too) and
    for every ``torch.optim`` attribute chain (reachable through a plain ``import torch``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno
        elif (isinstance(node, ast.Attribute) and node.attr == "optim" and isinstance(node.value, ast.Name)
              and node.value.id == "torch"):
            yield "torch.optim", node.lineno


def _training_imports(pkg: Path) -> list[str]:
    problems = {}
    for path in sorted((pkg / "src").rglob("*.py")):
        for name, line in _dotted_imports(path):
            hit = next((m for m in TRAINING_MODULES if name == m or name.startswith(m + ".")), None)
            where = f"{path.relative_to(pkg.parent)}:{line}"
            if hit and where not in problems:
                problems[where] = f"{where}: {name!r} is optimizer / training code ({hit}); it belongs in bridge-train"
    return list(problems.values())


@pytest.mark.parametrize("pkg", [p for p in PACKAGES if p.name in MODEL_SIDE], ids=lambda p: p.name)
def test_model_side_packages_hold_no_optimizer_or_training_code(pkg):
    problems = _training_imports(pkg)
    assert not problems, "\n".join(problems)


def test_training_import_check_catches_every_spelling(tmp_path):
    pkg = tmp_path / "bridge-convert"
    (pkg / "src" / "bridge_convert").mkdir(parents=True)
    (pkg / "src" / "bridge_convert" / "bad.py").write_text(
        "import torch\n"
        "from megatron.core.optimizer import clip_grads\n"
        "from megatron.core import optimizer\n"
        "def f():\n    import bridge_train.setup\n    return torch.optim.AdamW\n"
        "from torch import optim\n"
        "from megatron.core import optimizer_param_scheduler\n"
        "from megatron.core.optimizer_config import OptimizerConfig\n")  # a sibling name, not the package
    problems = "\n".join(_training_imports(pkg))
    for line in (2, 3, 5, 6, 7, 8):
        assert f"bad.py:{line}:" in problems, (line, problems)
    assert "bad.py:1:" not in problems and "bad.py:9:" not in problems


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_package_imports_only_declared_dependencies(pkg):
    problems = _problems(pkg)
    assert not problems, "\n".join(problems)


def test_checker_catches_undeclared_bridge_import_and_unguarded_te(tmp_path):
    pkg = tmp_path / "bridge-data"
    (pkg / "src" / "bridge_data").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(
        '[project]\nname = "bridge-data"\ndependencies = ["torch"]\n'
        '[project.optional-dependencies]\nte = ["transformer-engine"]\n')
    (pkg / "src" / "bridge_data" / "bad.py").write_text(
        "import bridge_convert\nimport transformer_engine\n"
        "try:\n    import transformer_engine.pytorch\nexcept ImportError:\n    pass\n"
        "try:\n    import transformer_engine\nexcept Exception:\n    pass\n")
    problems = "\n".join(_problems(pkg))
    assert "bad.py:1: imports 'bridge_convert' but bridge-data does not declare" in problems
    assert "bad.py:2: optional 'transformer_engine' imported without try/except Exception" in problems
    assert "bad.py:4:" in problems  # ImportError alone does not catch a broken TE
    assert "bad.py:8" not in problems


def test_test_module_names_are_unique_across_packages():
    # pytest's default (prepend) import mode imports test files by bare module name: two packages with a
    # tests/test_cli.py could not run in one pytest process (the gpu session runs them all together).
    seen: dict[str, Path] = {}
    clashes = []
    for pkg in PACKAGES:
        for path in (pkg / "tests").rglob("*.py"):
            if path.name in ("conftest.py", "__init__.py"):
                continue
            if path.name in seen:
                clashes.append(f"{path.relative_to(ROOT)} and {seen[path.name].relative_to(ROOT)}")
            seen[path.name] = path
    assert not clashes, "rename one of each pair:\n" + "\n".join(clashes)
