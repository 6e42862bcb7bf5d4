"""``python -m bridge_convert.testing make-tiny-hf OUT [--family llama32] [--dtype bfloat16]``.

Writes a random-initialised tiny HF checkpoint (2 layers, hidden 64) for demos and smoke runs without downloads.
"""

import argparse
import sys

import torch

from .models import TINY_HF_CONFIGS, save_tiny_hf_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge_convert.testing",
                                     description="Make tiny random HF checkpoints for demos and tests.")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-tiny-hf", help="write a random tiny HF causal LM with save_pretrained")
    make.add_argument("out", help="output directory")
    make.add_argument("--family", choices=sorted(TINY_HF_CONFIGS), default="llama32")
    make.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    make.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save_tiny_hf_checkpoint(args.out, args.family, dtype=getattr(torch, args.dtype), seed=args.seed)
    print(f"wrote a tiny {args.family} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
