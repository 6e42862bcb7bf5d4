"""The one dtype table: every spelling an entry point accepts, the canonical name it writes, clear refusals."""

import pytest
import torch

from bridge_convert import hf_config
from bridge_convert.dtypes import DTYPE_ALIASES, dtype_name, parse_dtype


@pytest.mark.parametrize(("spelling", "expected"), [
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    (" BF16 ", torch.bfloat16), ("fp16", torch.float16), ("half", torch.float16), ("float16", torch.float16),
    ("fp32", torch.float32), ("float", torch.float32), ("Float32", torch.float32), (torch.float16, torch.float16),
])
def test_parse_dtype_accepts_every_spelling(spelling, expected):
    assert parse_dtype(spelling) is expected
    assert hf_config.parse_dtype(spelling) is expected  # the name HF-side callers import keeps working


@pytest.mark.parametrize("value", ["float64", "int64", torch.float64])
def test_parse_dtype_refuses_non_parameter_dtypes_by_default(value):
    with pytest.raises(ValueError, match=r"unsupported dtype .*use one of float32, bfloat16, float16"):
        parse_dtype(value)


def test_parse_dtype_without_restriction_takes_any_torch_dtype():
    assert parse_dtype("fp64", allowed=None) is torch.float64
    assert parse_dtype("int64", allowed=None) is torch.int64
    assert parse_dtype("torch.float8_e4m3fn", allowed=None) is torch.float8_e4m3fn
    assert parse_dtype("bf16", allowed=(torch.bfloat16,)) is torch.bfloat16


@pytest.mark.parametrize("name", ["bfloat17", "", "manual_seed", "__class__", "Tensor"])
def test_parse_dtype_refuses_names_that_are_not_dtypes(name):
    with pytest.raises(ValueError, match="not a torch dtype"):
        parse_dtype(name, allowed=None)


def test_names_round_trip():
    for dtype in set(DTYPE_ALIASES.values()):
        name = dtype_name(dtype)
        assert "torch" not in name and getattr(torch, name) is dtype
        assert parse_dtype(name, allowed=None) is dtype
    assert hf_config.dtype_to_hf(torch.bfloat16) == "bfloat16"
    assert hf_config.dtype_from_hf({"torch_dtype": "float16"}) is torch.float16
    assert hf_config.dtype_from_hf({}, default=torch.bfloat16) is torch.bfloat16
