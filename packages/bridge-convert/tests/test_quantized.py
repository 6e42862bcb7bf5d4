"""bridge_convert.quantized without Transformer Engine: which objects count as TE quantized tensors / delayed
scaling quantizers (the GPU tests of bridge-train load real FP8 parameters: test_te_training_gpu.py)."""

from __future__ import annotations

import torch

from bridge_convert.quantized import _is_te_class, _torch_fp8_dtype, is_quantized_param


def _te_class(name: str, module: str, base: type = object) -> type:
    return type(name, (base,), {"__module__": module})


def test_te_classes_are_told_by_name_and_module_through_subclasses():
    quantized = _te_class("QuantizedTensor", "transformer_engine.pytorch.quantized_tensor")
    float8 = _te_class("Float8Tensor", "transformer_engine.pytorch.tensor.float8_tensor", quantized)
    assert is_quantized_param(float8())
    assert not is_quantized_param(torch.zeros(2))
    assert not is_quantized_param(_te_class("QuantizedTensor", "somewhere_else")())  # a namesake elsewhere
    delayed = _te_class("Float8Quantizer", "transformer_engine.pytorch.tensor.float8_tensor")
    current = _te_class("Float8CurrentScalingQuantizer", "transformer_engine.pytorch.tensor.float8_tensor")
    assert _is_te_class(delayed(), "Float8Quantizer") and not _is_te_class(current(), "Float8Quantizer")


def test_fp8_formats_map_to_torch_dtypes_by_enum_name():
    import enum

    class DType(enum.IntEnum):  # the shape of TE's DType: members named like the C++ enum
        kFloat8E4M3 = 7
        kFloat8E5M2 = 8

    class Quantizer:
        dtype = DType.kFloat8E4M3

    assert _torch_fp8_dtype(Quantizer()) is torch.float8_e4m3fn
    Quantizer.dtype = DType.kFloat8E5M2
    assert torch.finfo(_torch_fp8_dtype(Quantizer())).max == 57344.0
