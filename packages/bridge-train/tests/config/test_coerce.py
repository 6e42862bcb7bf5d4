"""Conversion of parsed YAML / command-line values to the types dataclass fields declare."""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from config_stubs import MockDataConfig
from megatron.core.transformer.enums import AttnBackend

from bridge_train.config.coerce import CoercionError, build_dataclass, coerce, conforms
from bridge_train.config.import_paths import import_object, import_path_of
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
    ("callable_path", type(F.silu), "torch.nn.functional.silu", F.silu),
    ("path", pathlib.Path, "/tmp/x", pathlib.Path("/tmp/x")),
]


@pytest.mark.parametrize(("tp", "value", "expected"), [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_coerce_converts_to_annotation(tp, value, expected):
    if tp is type(F.silu):
        from collections.abc import Callable

        tp = Callable
    result = coerce(value, tp)
    assert result == expected and type(result) is type(expected)


BAD = [
    ("int_from_words", int, "ten", "expected an int, got 'ten' (str)"),
    ("int_from_bool", int, True, "expected an int, got True (bool)"),
    ("int_from_fraction", int, 1.5, "expected an int, got 1.5 (float)"),
    ("float_from_bool", float, False, "expected a float"),
    ("bool_from_maybe", bool, "maybe", "expected a bool (true/false)"),
    ("str_from_list", str, ["a"], "expected a string"),
    ("none_for_required", int, None, "expected int, got null"),
    ("literal_outside", Literal["stop", "skip"], "ignore", "expected one of 'stop', 'skip'; got 'ignore'"),
    ("tuple_wrong_length", tuple[int, int], [1], "expected 2 items"),
    ("list_from_scalar", list[int], 5, "write it as [a, b]"),
    ("list_item", list[int], [1, "x"], "item 1: expected an int"),
    ("dtype_unknown", torch.dtype, "float7", "expected a torch dtype name"),
    ("enum_unknown", AttnBackend, "fastest", "expected one of"),
    ("callable_missing", "callable", "torch.nn.functional.nope", "has no attribute path 'nope'"),
    ("callable_not_callable", "callable", "math.pi", "is not callable"),
    ("callable_no_module", "callable", "nosuchpackage.fn", "no module 'nosuchpackage'"),
]


@pytest.mark.parametrize(("tp", "value", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_coerce_rejects_value_naming_expected_type(tp, value, expected):
    if tp == "callable":
        from collections.abc import Callable

        tp = Callable
    with pytest.raises(CoercionError, match=None) as info:
        coerce(value, tp)
    assert expected in str(info.value)


def test_conforms_rejects_text_for_typed_fields():
    assert conforms(10, int) and conforms(10, float) and conforms(None, int | None)
    assert not conforms("10", int)
    assert not conforms("bfloat16", torch.dtype)
    assert not conforms([1, 2], tuple[int, ...])
    assert not conforms(1, bool)


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


def test_build_dataclass_collects_every_problem_with_suggestion():
    with pytest.raises(CoercionError) as info:
        build_dataclass(_Outer, {"nmae": "x", "inner": {"rate": "fast", "rat": 1}}, "root")
    lines = str(info.value).split("\n")
    assert "unknown key 'root.nmae'; did you mean 'root.name'?" in lines
    assert "unknown key 'root.inner.rat'; did you mean 'root.inner.rate'?" in lines
    assert any(line.startswith("root.inner.rate: cannot use 'fast'") for line in lines)
    assert "root.name is required (str) but missing" in lines


def test_build_dataclass_uses_target_and_checks_protocol():
    target = f"{MockDataConfig.__module__}.MockDataConfig"
    built = build_dataclass(DatasetConfigLike, {"_target_": target, "seq_length": "16"}, "dataset")
    assert built == MockDataConfig(seq_length=16)
    with pytest.raises(CoercionError, match="dataset: .*needs _target_"):
        build_dataclass(DatasetConfigLike, {"seq_length": 16}, "dataset")
    with pytest.raises(CoercionError, match="is not a subclass of _Inner"):
        build_dataclass(_Inner, {"_target_": target}, "inner")


def test_import_paths_round_trip_public_names():
    for fn, path in ((F.silu, "torch.nn.functional.silu"), (F.gelu, "torch.nn.functional.gelu"),
                     (torch.tanh, "torch.tanh"), (torch.nn.init.normal_, "torch.nn.init.normal_")):
        assert import_path_of(fn) == path
        assert import_object(path) is fn
    assert import_path_of(lambda x: x) is None
