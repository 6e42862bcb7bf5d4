"""Import paths for callables and classes, so configs can name them in YAML (``torch.nn.functional.silu``)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_object", "import_path_of"]

_PUBLIC_HOMES = ("torch.nn.functional", "torch", "torch.nn.init")


def import_path_of(obj: Any) -> str | None:
    """``module.qualname`` of a function or class if importing that path gives back ``obj``, else None.

    Lambdas, closures, bound methods and ``functools.partial`` objects have no such path.
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    # Builtins defined in private places (F.gelu lives in torch._C._nn, torch.tanh's qualname is
    # _VariableFunctionsClass.tanh): prefer the public name.
    name = getattr(obj, "__name__", qualname)
    private = "._" in f".{module}.{qualname}"
    homes = [f"{home}.{name}" for home in (*_PUBLIC_HOMES, module) if private] + [f"{module}.{qualname}"]
    for path in homes:
        try:
            if import_object(path) is obj:
                return path
        except ImportError:
            continue
    return None


def import_object(path: str) -> Any:
    """The object at ``path``: the longest importable module prefix, then attribute lookups.

    Raises:
        ImportError: if no prefix imports or an attribute is missing.
    """
    if not isinstance(path, str) or not path or path.startswith(".") or " " in path:
        raise ImportError(f"{path!r} is not an import path like 'package.module.name'")
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ImportError as err:
            # Only "this prefix is not a module" means try a shorter one; a module that fails while importing
            # its own dependencies is a real error.
            if err.name is not None and not module_name.startswith(err.name) and not err.name.startswith(module_name):
                raise
            continue
        for attr in parts[cut:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise ImportError(f"cannot import {path!r}: {module_name!r} has no attribute path "
                                  f"{'.'.join(parts[cut:])!r}") from None
        return obj
    raise ImportError(f"cannot import {path!r}: no module {parts[0]!r}")
