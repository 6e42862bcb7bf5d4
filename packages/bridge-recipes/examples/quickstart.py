"""Quickstart: an HF checkpoint, a recipe's defaults, ten training iterations.

The flow of NVIDIA Megatron Bridge's README, line for line (the package README shows the names side by side):

    python quickstart.py /models/Llama-3.2-1B model.seq_length=4096 dataset.seq_length=4096
    torchrun --nproc-per-node 2 quickstart.py /models/Llama-3.2-1B model.tensor_model_parallel_size=2

Any ``key=value`` argument overrides the config (bridge-train's grammar), e.g. ``train.global_batch_size=8`` for a
quick run: the recipe's global batch is 512.
"""

from __future__ import annotations

import argparse
import sys

from bridge_convert import AutoBridge
from bridge_recipes.llama import llama32_1b
from bridge_train import gpt_forward_step, pretrain
from bridge_train.config import apply_overrides


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_path", help="local HF Llama checkpoint directory")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)

    # Load Llama from a Hugging Face checkpoint and convert it to Megatron
    bridge = AutoBridge.from_hf_pretrained(args.hf_path)
    model_provider = bridge.to_megatron_provider()

    # Get defaults for the other configuration from an existing Llama 3.2 recipe
    cfg = llama32_1b.pretrain_config()
    cfg.model = model_provider
    cfg.train.train_iters = 10

    cfg.dataset.seq_length = cfg.model.seq_length
    # (the vocabulary: the mock data's null tokenizer takes cfg.model.vocab_size ids)

    apply_overrides(cfg, args.overrides)
    losses = pretrain(cfg, gpt_forward_step)
    print(f"quickstart: {len(losses)} iterations, first loss {losses[0]:.6f}, last loss {losses[-1]:.6f}",
          flush=True)
    return losses


if __name__ == "__main__":
    main()
    sys.exit(0)
