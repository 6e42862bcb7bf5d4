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


# The README's "Field reference" tables, in their order: (module, class).
_REFERENCE = [("container", "ConfigContainer"), ("train", "TrainConfig"), ("train", "RNGConfig"),
              ("train", "RobustnessConfig"), ("optimizer", "SchedulerConfig"), ("checkpoint", "CheckpointConfig"),
              ("logger", "LoggerConfig"), ("profiling", "ProfilingConfig"), ("mixed_precision", "MixedPrecisionConfig")]


def _field_rows(module: str, name: str) -> list[str]:
    """A class's public fields as the README writes them: name, annotation = default (as written), docstring."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name).body
    rows = []
    for node, after in zip(body, [*body[1:], None], strict=True):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)) or node.target.id[0] == "_":
            continue
        default = node.value
        if isinstance(default, ast.Call) and ast.unparse(default.func) == "field":
            keywords = {k.arg: k.value for k in default.keywords}
            default = (ast.Call(keywords["default_factory"], [], []) if "default_factory" in keywords
                       else keywords.get("default"))
        typed = ast.unparse(node.annotation) + (f" = {ast.unparse(default)}" if default is not None else "")
        doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
        rows.append(f"| `{node.target.id}` | `{typed.replace('|', chr(92) + '|')}` | {' '.join(doc.split())} |")
    return rows


def test_readme_field_reference_is_the_fields_docstrings():
    """The README's field tables say what the fields' docstrings say, field for field (they had drifted apart)."""
    readme = (PACKAGE.parents[2] / "README.md").read_text()
    reference = readme.partition("\n## Field reference\n")[2]
    for module, name in _REFERENCE:
        table = reference.partition(f"\n#### `{name}`\n")[2].split("\n\n")[0]
        written = [line for line in table.splitlines() if line.startswith("| `")]
        expected = _field_rows(module, name)
        assert written == expected, (f"README's {name} table differs from {module}.py; write these rows:\n"
                                     + "\n".join(expected))
