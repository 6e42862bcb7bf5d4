"""Shared helpers: the overrides that shrink any recipe to a tiny CPU run (a module of its own, not conftest:
`conftest` is not a unique module name when several packages' tests run in one pytest process)."""

from __future__ import annotations

TINY_VOCAB = 256

#: Overrides that turn any recipe into a 2-layer, hidden-64, fp32 run of 2 iterations on one CPU process.
SHRINK = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", f"model.vocab_size={TINY_VOCAB}", "model.seq_length=64", "dataset.seq_length=64",
    "model.tensor_model_parallel_size=1", "model.pipeline_model_parallel_size=1",
    "model.virtual_pipeline_model_parallel_size=null", "model.context_parallel_size=1",
    "model.sequence_parallel=false", "model.pipeline_model_parallel_layout=null", "dataset.pad_to_multiple_of=1",
    "train.train_iters=2", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=null",
    "mixed_precision=fp32", "scheduler.lr_warmup_iters=1", "logger.log_interval=1", "logger.print_config=false",
    "logger.progress_bar=false",
]


def shrink(recipe: str) -> list[str]:
    """:data:`SHRINK` minus the keys a pretraining recipe's dataset does not have."""
    if recipe.endswith("_pretrain"):
        return [o for o in SHRINK if not o.startswith("dataset.pad_to_multiple_of")]
    return list(SHRINK)
