"""The config package's shape: imports go one way (no cycles) and importing it loads nothing heavy."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import bridge_train.config as config_package

PACKAGE = pathlib.Path(config_package.__file__).parent


def _local_imports(path: pathlib.Path) -> set[str]:
    """Sibling modules ``path`` imports (``from .x import y``, ``from . import x``), at any depth in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return found


def test_config_modules_import_each_other_without_cycles():
    graph = {path.stem: _local_imports(path) for path in PACKAGE.glob("*.py")}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module not in done:
            for dep in graph.get(module, ()):
                visit(dep, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_importing_the_package_loads_neither_torch_nor_megatron():
    # bridge_train's own __init__ is stood in for, so that this checks the config package alone
    code = ("import sys, types; top = types.ModuleType('bridge_train'); "
            f"top.__path__ = [{str(PACKAGE.parent)!r}]; sys.modules['bridge_train'] = top; "
            "import bridge_train.config as c; c.ConfigError, c.PeftLike, c.register_peft_method; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'pydantic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
