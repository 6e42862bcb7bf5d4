"""A custom model trained by a recipe: a GPT whose MLP is a block of your own (squared ReLU, as in Primer).

Any provider subclass whose ``provide()`` returns a megatron-core module works: the recipe supplies the data,
optimizer, schedule and parallel layout, ``cfg.model`` is replaced, ``pretrain()`` trains it.

    python custom_model.py                               # tiny, on a CPU, about 20 s
    torchrun --nproc-per-node 2 custom_model.py model.tensor_model_parallel_size=2
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule

from bridge_convert import GPTModelProvider
from bridge_recipes.llama import llama32_1b
from bridge_train import gpt_forward_step, pretrain
from bridge_train.config import apply_overrides


class SquaredReLUMLP(MegatronModule):
    """``relu(x W1)^2 W2``: fc1 split by output columns and fc2 by input rows over tensor-parallel ranks."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, name: str | None = None) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__(config=config)
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_hidden_size, config=config,
                                               init_method=config.init_method, bias=False, gather_output=False,
                                               skip_bias_add=True)
        self.linear_fc2 = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, config=config,
                                            init_method=config.output_layer_init_method, bias=False,
                                            input_is_parallel=True, skip_bias_add=True)

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        hidden, _ = self.linear_fc1(hidden_states)
        return self.linear_fc2(torch.relu(hidden).square())  # (output, bias=None), as TransformerLayer expects


@dataclass(kw_only=True)
class SquaredReLUGPTProvider(GPTModelProvider):
    """GPTModelProvider whose layers use :class:`SquaredReLUMLP` (no gated unit, so no SwiGLU fusion)."""

    gated_linear_unit: bool = False

    def provide(self, pre_process: bool | None = None, post_process: bool | None = None,
                vp_stage: int | None = None):
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        self.finalize()
        spec = get_gpt_layer_local_spec(normalization=self.normalization)
        spec.submodules.mlp = SquaredReLUMLP  # called as SquaredReLUMLP(config=..., pg_collection=..., ...)
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        return GPTModel(config=self, transformer_layer_spec=spec, vocab_size=self.padded_vocab_size,
                        max_sequence_length=self.seq_length, pre_process=pre_process, post_process=post_process,
                        position_embedding_type="rope", rotary_base=self.rotary_base, vp_stage=vp_stage)


def build_config(overrides: list[str]):
    """The Llama 3.2 1B pretraining recipe with the custom model (tiny by default) and ``overrides``."""
    cfg = llama32_1b.pretrain_config(train_iters=20, global_batch_size=8, micro_batch_size=4, lr=3e-3, min_lr=3e-4,
                                     lr_warmup_iters=2, seq_length=64)
    cfg.model = SquaredReLUGPTProvider(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                                       num_query_groups=2, vocab_size=256, seq_length=64)
    cfg.train.eval_interval = None
    cfg.logger.log_interval = 5
    if not torch.cuda.is_available():
        cfg.mixed_precision = "fp32"  # bf16 on a CPU is slow and gains nothing here
    return apply_overrides(cfg, overrides)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (bridge-train grammar)")
    args = parser.parse_args(argv)
    losses = pretrain(build_config(args.overrides), gpt_forward_step)
    print(f"custom model: {len(losses)} iterations, loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return losses


if __name__ == "__main__":
    main()
    sys.exit(0)
