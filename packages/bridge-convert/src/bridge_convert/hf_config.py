"""Reading and writing HF ``config.json`` dicts: RoPE settings in both hub layouts, dtypes.

The model bridges translate plain dicts (what ``config.json`` holds), not ``PretrainedConfig`` objects, so the
translation is a pure function that works the same across transformers versions, and an export can keep the
source file's own layout (e.g. the legacy ``rope_scaling`` + ``rope_theta`` keys of Llama 3.1/3.2 on the hub).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .dtypes import dtype_name, parse_dtype

__all__ = ["RopeSettings", "dtype_from_hf", "dtype_to_hf", "fill_token_ids_from_tokenizer", "load_hf_config",
           "parse_dtype", "read_rope", "write_rope"]


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an HF model directory as a dict.

    Raises:
        FileNotFoundError: if the directory or its config.json is missing.
        ValueError: if config.json is not valid JSON or not a JSON object.
    """
    file = Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {path}: is this an HF model directory?")
    try:
        raw = json.loads(file.read_text())
    except ValueError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{file} holds a JSON {type(raw).__name__}, not an object of config keys")
    return raw


def dtype_from_hf(raw: dict[str, Any], default: torch.dtype = torch.float32) -> torch.dtype:
    """The weights' dtype a config.json names (``dtype``, or ``torch_dtype`` before transformers 5)."""
    name = raw.get("dtype", raw.get("torch_dtype"))
    if name is None:
        return default
    return parse_dtype(name)


def dtype_to_hf(dtype: torch.dtype) -> str:
    """How config.json spells ``dtype`` (``"bfloat16"``)."""
    return dtype_name(dtype)


@dataclass(frozen=True, slots=True)
class RopeSettings:
    theta: float
    rope_type: str = "default"
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    legacy_layout: bool = False
    """True when the source config used ``rope_scaling`` + top-level ``rope_theta`` (hub layout before v5)."""


SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def _positive(params: dict[str, Any], key: str, where: str, default: Any = None, kind: type = float):
    """``params[key]`` as a positive ``kind`` (``default`` when absent; required when ``default`` is None)."""
    value = params.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf")
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok:
        needed = "a positive integer" if kind is int else "a positive number"
        found = "is missing" if key not in params else f"is {value!r}"
        raise ValueError(f"config.json: {where + '.' if where else ''}{key} {found}; it must be {needed}")
    return kind(value)


def read_rope(raw: dict[str, Any], default_theta: float = 10000.0) -> RopeSettings:
    """RoPE settings from either layout: ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta``.

    Raises:
        ValueError: for a RoPE type megatron-core cannot compute exactly (yarn, dynamic, longrope, ...), and for
            missing or non-positive factors (they are named).
    """
    params = raw.get("rope_parameters")
    legacy = params is None
    where = "rope_scaling" if legacy else "rope_parameters"
    if legacy:
        params = raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json: {where} is {params!r}; it must be an object (or null)")
    theta = _positive(params, "rope_theta", where) if "rope_theta" in params else \
        _positive(raw, "rope_theta", "", default_theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {list(SUPPORTED_ROPE_TYPES)}); "
                         "converting it would build a model that computes different positions")
    if rope_type == "llama3":
        return RopeSettings(theta=theta, rope_type="llama3", factor=_positive(params, "factor", where, 8.0),
                            low_freq_factor=_positive(params, "low_freq_factor", where, 1.0),
                            high_freq_factor=_positive(params, "high_freq_factor", where, 4.0),
                            original_max_position_embeddings=_positive(
                                params, "original_max_position_embeddings", where, 8192, int),
                            legacy_layout=legacy)
    if rope_type == "linear":
        return RopeSettings(theta=theta, rope_type="linear", factor=_positive(params, "factor", where),
                            legacy_layout=legacy)
    return RopeSettings(theta=theta, legacy_layout=legacy)


def write_rope(raw: dict[str, Any], rope: RopeSettings) -> None:
    """Write ``rope`` into an HF config dict in the layout ``rope.legacy_layout`` says (in place)."""
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        raw.pop(key, None)
    params: dict[str, Any] = {"rope_type": rope.rope_type}
    if rope.rope_type == "llama3":
        params.update(factor=rope.factor, low_freq_factor=rope.low_freq_factor,
                      high_freq_factor=rope.high_freq_factor,
                      original_max_position_embeddings=rope.original_max_position_embeddings)
    elif rope.rope_type == "linear":
        params.update(factor=rope.factor)
    if rope.legacy_layout:
        raw["rope_theta"] = rope.theta
        raw["rope_scaling"] = None if rope.rope_type == "default" else params
    else:
        params["rope_theta"] = rope.theta
        raw["rope_parameters"] = params


def fill_token_ids_from_tokenizer(directory: str | os.PathLike) -> list[str]:
    """Give a null ``bos_token_id`` / ``eos_token_id`` in ``directory/config.json`` the id the tokenizer saved there
    has for its bos / eos token (``tokenizer_config.json`` names the token, ``tokenizer.json`` its id).

    An export writes such ids as null when a shrunk vocabulary leaves the source config's outside it; the model's
    own tokenizer, exported with it, knows them (generation stops at the config's eos). Nothing changes without
    both tokenizer files, or for a token the tokenizer lacks or whose id lies outside the vocabulary.

    Returns:
        The keys filled.
    """
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
        missing = [k for k in ("bos_token_id", "eos_token_id") if k in config and config[k] is None]
        if not missing or not (directory / "tokenizer.json").is_file():
            return []
        named = json.loads((directory / "tokenizer_config.json").read_text())
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception:  # noqa: BLE001  (unreadable files; tokenizers raises its own error type for a bad one)
        return []
    filled = []
    for key in missing:
        token = named.get(key.removesuffix("_id"))
        token = token.get("content") if isinstance(token, dict) else token
        token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
        if isinstance(token_id, int) and 0 <= token_id < int(config.get("vocab_size") or 0):
            config[key] = token_id
            filled.append(key)
    if filled:
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return filled
