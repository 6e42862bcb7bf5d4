"""Test harness shared by every bridge package's tests (like ``torch.testing``): tiny models and multi-process runs."""

from .checkpoints import assert_same_checkpoint, read_tensors
from .distributed import find_free_port, run_multiprocess
from .models import (
    FAMILIES,
    TINY_HF_CONFIGS,
    build_tiny_gpt,
    full_state_dict,
    save_tiny_hf_checkpoint,
    shard_state_dict,
    tiny_hf_config,
    tiny_transformer_config,
)

__all__ = [
    "FAMILIES",
    "TINY_HF_CONFIGS",
    "assert_same_checkpoint",
    "build_tiny_gpt",
    "find_free_port",
    "full_state_dict",
    "read_tensors",
    "run_multiprocess",
    "save_tiny_hf_checkpoint",
    "shard_state_dict",
    "tiny_hf_config",
    "tiny_transformer_config",
]
