"""Pretrain a Llama on mock data from HF weights (or a random init), save Megatron checkpoints, export to HF.

    # the README's demo: a tiny random Llama, 20 iterations on a CPU, export, reload with transformers
    python pretrain_llama.py --tiny runs/tiny-llama --workdir runs/demo

    # an HF model, 2 GPUs with TP=2, overrides from YAML and the command line
    torchrun --nproc-per-node=2 pretrain_llama.py --hf-model /models/Llama-3.2-1B --workdir runs/1b \\
        --config my.yaml model.tensor_model_parallel_size=2 train.train_iters=100

    # the Llama-3.2-1B shape with random weights (no download), bf16 mixed precision
    torchrun --nproc-per-node=1 pretrain_llama.py --shape llama32-1b --workdir runs/1b-random \\
        mixed_precision=bf16_mixed train.micro_batch_size=4 dataset.seq_length=4096

Any ``key=value`` argument overrides the config (see bridge-train's README); ``--config FILE.yaml`` merges a file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_config(args, overrides: list[str]):
    from bridge_convert import AutoBridge
    from bridge_data import PretrainDataConfig
    from bridge_train import (
        CheckpointConfig,
        ConfigContainer,
        LoggerConfig,
        OptimizerConfig,
        SchedulerConfig,
        TrainConfig,
    )
    from bridge_train.config import apply_cli_args

    if args.shape == "llama32-1b":
        from bridge_convert.testing import LLAMA_32_1B_HF_CONFIG

        provider = AutoBridge.from_hf_config(LLAMA_32_1B_HF_CONFIG).to_megatron_provider(load_weights=False)
        provider.params_dtype = __import__("torch").float32  # bf16 comes from the mixed-precision recipe
    else:
        hf_model = args.hf_model or args.tiny
        provider = AutoBridge.from_hf_pretrained(hf_model).to_megatron_provider(load_weights=True)
    # The tiny demo model learns fast at 3e-3; billion-parameter shapes diverge there in the first iterations.
    lr = 3e-3 if args.tiny else 3e-4
    workdir = Path(args.workdir)
    cfg = ConfigContainer(
        model=provider,
        train=TrainConfig(train_iters=20, micro_batch_size=2, global_batch_size=8, eval_interval=10,
                          eval_iters=2),
        dataset=PretrainDataConfig(seq_length=64, mock=True),
        optimizer=OptimizerConfig(lr=lr, min_lr=lr / 10, weight_decay=0.01, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=2, lr_decay_style="cosine"),
        checkpoint=CheckpointConfig(save=str(workdir / "checkpoints"), load=str(workdir / "checkpoints"),
                                    save_interval=10, keep_last_n=2),
        logger=LoggerConfig(log_interval=5, tensorboard_dir=str(workdir / "tensorboard"), print_config=False),
    )
    return apply_cli_args(cfg, overrides)


def export_and_reload(checkpoints: Path, out: Path) -> None:
    """Export the newest checkpoint to HF, then load it with transformers and run one forward pass."""
    import torch.distributed as dist

    from bridge_convert import AutoBridge

    AutoBridge.export_ckpt(checkpoints, out)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(16).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    print(f"exported {checkpoints} -> {out}; transformers reloaded it ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters, loss on a probe sequence {loss:.4f})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-model", help="HF model directory (or hub id) to start from")
    source.add_argument("--tiny", metavar="DIR", help="make a tiny random HF Llama 3.2 in DIR and start from it")
    source.add_argument("--shape", choices=["llama32-1b"], help="random init with this model shape")
    parser.add_argument("--workdir", default="runs/pretrain", help="checkpoints, TensorBoard logs and the export")
    parser.add_argument("--no-export", action="store_true", help="skip the HF export at the end")
    args, overrides = parser.parse_known_args(argv)

    from bridge_convert.runtime import silence_known_warnings

    silence_known_warnings()
    if args.tiny and not (Path(args.tiny) / "config.json").exists():
        import torch.distributed as dist

        from bridge_convert.testing import save_tiny_hf_checkpoint

        if not dist.is_initialized() and int(__import__("os").environ.get("RANK", "0")) == 0:
            save_tiny_hf_checkpoint(args.tiny, "llama32")
        from bridge_convert.runtime import initialize_parallel

        initialize_parallel().barrier()  # other ranks wait for the checkpoint to exist
    from bridge_train import pretrain

    cfg = build_config(args, overrides)
    losses = pretrain(cfg)
    if losses:
        print(f"trained {len(losses)} iterations: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    if not args.no_export and cfg.checkpoint.save:
        export_and_reload(Path(cfg.checkpoint.save), Path(args.workdir) / "hf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
