"""The one field schema: parsed YAML / command-line values converted (lax), Python values checked (strict)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from config_stubs import MockDataConfig
from megatron.core.transformer.enums import AttnBackend

from bridge_train.config import ConfigError
from bridge_train.config.fields import build, import_object, import_path_of, type_problems
from bridge_train.config.protocols import DatasetConfigLike

GOOD = [
    ("int_from_int", int, 10, 10),
    ("int_from_text", int, "10", 10),
    ("int_from_integral_float", int, 1e3, 1000),
    ("float_from_int", float, 3, 3.0),
    ("float_from_text", float, "3e-4", 3e-4),
    ("float_inf_from_text", float, "inf", math.inf),
    ("bool_true", bool, True, True),
    ("bool_from_text", bool, "False", False),
    ("bool_from_yes", bool, "yes", True),
    ("bool_from_one", bool, 1, True),
    ("str_from_str", str, "cosine", "cosine"),
    ("str_from_number", str, 123, "123"),
    ("optional_none", int | None, None, None),
    ("optional_value", float | None, "0.5", 0.5),
    ("union_keeps_exact_member", int | str, 5, 5),
    ("literal_str", Literal["stop", "skip"], "skip", "skip"),
    ("literal_int_from_text", Literal[0, 1, 2], "1", 1),
    ("literal_case_folded", Literal["constant", "WSD"], "wsd", "WSD"),
    ("tuple_variadic", tuple[int, ...], [1, 2], (1, 2)),
    ("tuple_fixed", tuple[int, float], [1, "2"], (1, 2.0)),
    ("list_of_str", list[str], ("a", "b"), ["a", "b"]),
    ("dict_of_int", dict[str, int], {"a": "1"}, {"a": 1}),
    ("dtype_name", torch.dtype, "bfloat16", torch.bfloat16),
    ("dtype_short", torch.dtype, "bf16", torch.bfloat16),
    ("dtype_qualified", torch.dtype, "torch.float16", torch.float16),
    ("dtype_object", torch.dtype, torch.float32, torch.float32),
    ("enum_by_name", AttnBackend, "flash", AttnBackend.flash),
    ("callable_path", Callable, "torch.nn.functional.silu", F.silu),
    ("path", pathlib.Path, "/tmp/x", pathlib.Path("/tmp/x")),
]


@pytest.mark.parametrize(("tp", "value", "expected"), [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_parsed_value_converts_to_annotation(tp, value, expected):
    result = build(_one_field(tp), {"x": value}).x
    assert result == expected and type(result) is type(expected)


def _one_field(tp: Any) -> type:
    return dataclasses.make_dataclass("One", [("x", tp)], kw_only=True)


BAD = [
    ("int_from_words", int, "ten", "x: cannot use 'ten': expected int, got 'ten' (str)"),
    ("int_from_bool", int, True, "expected a number, got True (bool)"),
    ("int_from_fraction", int, 1.5, "expected int, got 1.5 (float)"),
    ("float_from_bool", float, False, "expected a number, got False (bool)"),
    ("bool_from_maybe", bool, "maybe", "expected bool, got 'maybe' (str)"),
    ("str_from_list", str, ["a"], "expected str, got ['a'] (list)"),
    ("none_for_required", int, None, "expected int, got null"),
    ("literal_outside", Literal["stop", "skip"], "ignore", "expected one of 'stop', 'skip', got 'ignore' (str)"),
    ("tuple_wrong_length", tuple[int, int], [1], "expected tuple[int, int], got [1] (list) (item 1: Field required)"),
    ("list_from_scalar", list[int], 5, "write a list as [a, b]"),
    ("list_item", list[int], [1, "x"], "(item 1: Input should be a valid integer"),
    ("dtype_unknown", torch.dtype, "float7", "unsupported dtype 'float7'; use one of float32, bfloat16, float16"),
    ("enum_unknown", AttnBackend, "fastest", "expected one of ['flash', 'fused', 'unfused', 'local', 'auto']"),
    ("callable_missing", Callable, "torch.nn.functional.nope", "has no attribute path 'nope'"),
    ("callable_not_callable", Callable, "math.pi", "is not callable"),
    ("callable_no_module", Callable, "nosuchpackage.fn", "no module 'nosuchpackage'"),
]


@pytest.mark.parametrize(("tp", "value", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_parsed_value_is_rejected_naming_expected_type(tp, value, expected):
    with pytest.raises(ConfigError) as info:
        build(_one_field(tp), {"x": value})
    assert any(expected in p for p in info.value.problems), info.value


STRICT = [
    ("text_for_int", int, "10", "p.x must be int, got '10' (str)"),
    ("text_for_dtype", torch.dtype, "bfloat16", "p.x must be a torch.dtype, got 'bfloat16' (str)"),
    ("list_for_tuple", tuple[int, ...], [1, 2], "p.x must be tuple[int, ...], got [1, 2] (list)"),
    ("int_for_bool", bool, 1, "p.x must be bool, got 1 (int)"),
    ("folded_literal", Literal["constant", "WSD"], "wsd", "p.x must be one of 'constant', 'WSD', got 'wsd' (str)"),
    ("name_for_enum", AttnBackend, "flash", "p.x must be a member of AttnBackend, got 'flash' (str)"),
    ("path_for_callable", Callable, "torch.nn.functional.silu", "p.x must be a callable, got 'torch.nn"),
]


@pytest.mark.parametrize(("tp", "value", "expected"), [c[1:] for c in STRICT], ids=[c[0] for c in STRICT])
def test_python_values_are_checked_not_converted(tp, value, expected):
    obj = _one_field(tp)(x=value)
    problems = type_problems(obj, "p")
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_python_values_of_the_right_type_pass():
    for tp, value in ((float, 3), (int | None, None), (torch.dtype, torch.bfloat16), (Callable, F.silu),
                      (tuple[int, ...], (1, 2)), (AttnBackend, AttnBackend.flash), (Literal[0, 1], 1)):
        assert type_problems(_one_field(tp)(x=value), "p") == [], (tp, value)


@dataclass(kw_only=True, slots=True)
class _Inner:
    rate: float = 0.1
    """A rate."""


@dataclass(kw_only=True, slots=True)
class _Outer:
    name: str
    """Required."""
    inner: _Inner | None = None
    """Optional nested config."""


def test_build_collects_every_problem_with_suggestion():
    with pytest.raises(ConfigError) as info:
        build(_Outer, {"nmae": "x", "inner": {"rate": "fast", "rat": 1}}, "root")
    lines = info.value.problems
    assert "unknown key 'root.nmae'; did you mean 'root.name'?" in lines
    assert "unknown key 'root.inner.rat'; did you mean 'root.inner.rate'?" in lines
    assert any(line.startswith("root.inner.rate: cannot use 'fast'") for line in lines)
    assert "root.name is required (str) but missing" in lines


def test_build_uses_target_and_checks_protocol():
    target = f"{MockDataConfig.__module__}.MockDataConfig"
    built = build(DatasetConfigLike, {"_target_": target, "seq_length": "16"}, "dataset")
    assert built == MockDataConfig(seq_length=16)
    with pytest.raises(ConfigError, match="dataset: .*needs _target_"):
        build(DatasetConfigLike, {"seq_length": 16}, "dataset")
    with pytest.raises(ConfigError, match="is not a subclass of _Inner"):
        build(_Inner, {"_target_": target}, "inner")


def test_import_paths_round_trip_public_names():
    for fn, path in ((F.silu, "torch.nn.functional.silu"), (F.gelu, "torch.nn.functional.gelu"),
                     (torch.tanh, "torch.tanh"), (torch.nn.init.normal_, "torch.nn.init.normal_")):
        assert import_path_of(fn) == path
        assert import_object(path) is fn
    assert import_path_of(lambda x: x) is None
