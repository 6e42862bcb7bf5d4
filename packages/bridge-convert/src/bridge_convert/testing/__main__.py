"""``python -m bridge_convert.testing make-tiny-hf OUT [--family llama32] [--dtype bfloat16]``.

Writes a random-initialised tiny HF checkpoint (2 layers, hidden 64) for demos and smoke runs without downloads.
"""

import argparse
import sys

import torch

from .models import TINY_HF_CONFIGS, save_tiny_hf_checkpoint


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m bridge_convert.testing``."""
    parser = argparse.ArgumentParser(prog="python -m bridge_convert.testing",
                                     description="Make tiny random HF checkpoints for demos and tests.")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-tiny-hf", help="write a random tiny HF causal LM with save_pretrained")
    make.add_argument("out", help="output directory (created; save_pretrained writes into it)")
    make.add_argument("--family", choices=sorted(TINY_HF_CONFIGS), default="llama32",
                      help="model family whose config the tiny model copies, tiny sizes aside (default llama32)")
    make.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="dtype of the saved tensors and of config.json's dtype (default float32)")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m bridge_convert.testing``; returns the exit status."""
    args = build_parser().parse_args(argv)
    path = save_tiny_hf_checkpoint(args.out, args.family, dtype=getattr(torch, args.dtype), seed=args.seed)
    print(f"wrote a tiny {args.family} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
