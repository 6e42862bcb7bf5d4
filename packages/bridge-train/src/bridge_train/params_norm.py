"""The L2 norm of all model parameters (``logger.log_params_norm``), counted once across TP, PP, DP and EP.

Each rank sums the squares of the parameters it holds, skipping copies: a parameter that is not split by tensor
parallelism is counted on TP rank 0 only, the pipeline's duplicate of a tied embedding (``shared``) is skipped,
and data-parallel replicas are not summed (the sums are reduced over the model-parallel group only). Expert
parameters are reduced over the expert tensor/model/pipeline group, as megatron-LM's ``calc_params_l2_norm`` does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["params_l2_norm"]


def params_l2_norm(model: list, device: torch.device) -> float:
    """sqrt(sum of squares of every distinct parameter of the model), the same value on every rank.

    The squares are summed in float32 (float64 on CPU, where it costs nothing); all ranks must call it together.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared
    from megatron.core.utils import unwrap_model

    dtype = torch.float64 if device.type == "cpu" else torch.float32
    dense = torch.zeros((), dtype=dtype, device=device)
    expert = torch.zeros((), dtype=dtype, device=device)
    seen: set[int] = set()
    for module in unwrap_model(model):
        for param in module.parameters():
            if id(param) in seen or not param_is_not_shared(param) or not param_is_not_tensor_parallel_duplicate(param):
                continue
            seen.add(id(param))
            square = param.detach().to(dtype).pow(2).sum()
            if getattr(param, "allreduce", True):
                dense += square
            else:
                expert += square
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(dense, group=parallel_state.get_model_parallel_group())
        dist.all_reduce(expert, group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return float((dense + expert).sqrt())
