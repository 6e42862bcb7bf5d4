"""bridge-data: tokenizers, mock / indexed / SFT / packed datasets and the ``bridge-data preprocess`` CLI.

Every dataset yields dicts of tensors following the sample contract of :mod:`bridge_data.samples`.
Names load on first use (torch, megatron-core and transformers only when needed), so ``import bridge_data`` and
the CLI's ``--help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DistributedBatchSampler": "bridge_data.sampler",
    "PackedDataset": "bridge_data.packing",
    "PreprocessConfig": "bridge_data.preprocessing",
    "PretrainDataConfig": "bridge_data.pretrain",
    "SFTDataConfig": "bridge_data.sft",
    "Tokenizer": "bridge_data.tokenizers",
    "TokenizerConfig": "bridge_data.tokenizers",
    "build_dataloader": "bridge_data.sampler",
    "build_tokenizer": "bridge_data.tokenizers",
    "collate_samples": "bridge_data.samples",
    "pack_sequences": "bridge_data.packing",
    "packed_seq_params_from_batch": "bridge_data.packing",
    "preprocess": "bridge_data.preprocessing",
}

__all__ = [
    "DistributedBatchSampler",
    "PackedDataset",
    "PreprocessConfig",
    "PretrainDataConfig",
    "SFTDataConfig",
    "Tokenizer",
    "TokenizerConfig",
    "build_dataloader",
    "build_tokenizer",
    "collate_samples",
    "pack_sequences",
    "packed_seq_params_from_batch",
    "preprocess",
]

if TYPE_CHECKING:
    from bridge_data.packing import PackedDataset, pack_sequences, packed_seq_params_from_batch
    from bridge_data.preprocessing import PreprocessConfig, preprocess
    from bridge_data.pretrain import PretrainDataConfig
    from bridge_data.sampler import DistributedBatchSampler, build_dataloader
    from bridge_data.samples import collate_samples
    from bridge_data.sft import SFTDataConfig
    from bridge_data.tokenizers import Tokenizer, TokenizerConfig, build_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bridge_data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
