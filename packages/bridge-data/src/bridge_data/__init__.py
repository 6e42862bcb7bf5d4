"""bridge-data: tokenizers, mock / indexed / SFT / packed datasets and the ``bridge-data preprocess`` CLI.

Every dataset yields dicts of tensors following the sample contract of :mod:`bridge_data.samples`.
megatron-core and transformers are imported only when a dataset or tokenizer is built.
"""

from bridge_data.packing import PackedDataset, pack_sequences, packed_seq_params_from_batch
from bridge_data.preprocess import PreprocessConfig, preprocess
from bridge_data.pretrain import PretrainDataConfig
from bridge_data.sampler import DistributedBatchSampler, build_dataloader
from bridge_data.samples import collate_samples
from bridge_data.sft import SFTDataConfig
from bridge_data.tokenizers import Tokenizer, TokenizerConfig, build_tokenizer

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
