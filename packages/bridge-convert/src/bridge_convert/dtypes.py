"""dtype names: the one table of spellings every package accepts, and the one way a dtype is written out.

HF ``config.json`` files, YAML configs, command lines and megatron-core configs spell dtypes differently
(``"bfloat16"``, ``"bf16"``, ``"torch.bfloat16"``, ``torch.bfloat16``). Parsing and printing them here, and only
here, keeps a name accepted by one entry point accepted by all of them, and printed the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Collection
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["DTYPE_ALIASES", "PARAM_DTYPES", "dtype_name", "parse_dtype"]

PARAM_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes a model's weights can be created, converted and trained in."""

DTYPE_ALIASES = MappingProxyType({
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
})
"""Lower-case spellings (without the ``torch.`` prefix) and the dtype each names; other torch dtype names
(``int64``, ``float8_e4m3fn``, ...) are accepted by :func:`parse_dtype` when ``allowed`` is None."""


def parse_dtype(value: str | torch.dtype, *, allowed: Collection[torch.dtype] | None = PARAM_DTYPES) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``.

    Case and surrounding blanks are ignored.

    Args:
        value: a dtype, or its name in any spelling of :data:`DTYPE_ALIASES` or torch's own attribute name.
        allowed: the dtypes the caller can use (default: :data:`PARAM_DTYPES`); None accepts every torch dtype.

    Raises:
        ValueError: for a name that is not a torch dtype, or a dtype outside ``allowed``; the message lists
            the accepted names.
    """
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        key = str(value).strip().lower().removeprefix("torch.")
        dtype = DTYPE_ALIASES.get(key)
        if dtype is None and key and not key.startswith("_"):
            candidate = getattr(torch, key, None)
            dtype = candidate if isinstance(candidate, torch.dtype) else None
    if dtype is None or (allowed is not None and dtype not in allowed):
        choices = ", ".join(dtype_name(d) for d in allowed) if allowed is not None else "e.g. bfloat16, float32"
        raise ValueError(f"unsupported dtype {value!r}; use one of {choices}"
                         if allowed is not None else f"{value!r} is not a torch dtype name ({choices})")
    return dtype


def dtype_name(dtype: torch.dtype | Any) -> str:
    """The canonical name of ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``), as HF configs and YAML write it.

    Anything that is not a dtype is shown as ``str(value)`` without a ``torch.`` prefix, so an error message
    about a wrong value can name it too.
    """
    return str(dtype).removeprefix("torch.")
