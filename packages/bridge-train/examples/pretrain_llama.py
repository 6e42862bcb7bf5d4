"""Pretrain a Llama from HF weights (or a random init) on preprocessed data or on mock data, save Megatron
checkpoints (``WORKDIR/checkpoints``), export the last one to HF (``WORKDIR/hf/iter_N``, N its iteration).

    # the README's demo: a tiny random Llama, 20 iterations on random tokens on a CPU, export, reload
    python pretrain_llama.py --tiny runs/tiny-llama --mock --workdir runs/demo

    # an HF model on `bridge-data preprocess` output, 2 GPUs with TP=2, overrides from YAML and the command line
    torchrun --nproc-per-node=2 pretrain_llama.py --hf-model /models/Llama-3.2-1B --workdir runs/1b \\
        --data-path data/corpus_text_document --config my.yaml model.tensor_model_parallel_size=2

    # the Llama-3.2-1B shape with random weights (no download), bf16 mixed precision, mock data
    torchrun --nproc-per-node=1 pretrain_llama.py --mock \\
        --hf-config packages/bridge-recipes/src/bridge_recipes/llama/hf_configs/Llama-3.2-1B.json --workdir runs/1b-random \\
        mixed_precision=bf16_mixed train.micro_batch_size=4 dataset.seq_length=4096

The data is named explicitly: ``--mock`` (random tokens, to try the loop) or ``--data-path PREFIX ...`` (indexed
``.bin/.idx`` prefixes, optionally weighted: ``--data-path 0.7 a_text_document 0.3 b_text_document``). Any
``key=value`` argument overrides the config (see bridge-train's README); ``--config FILE.yaml`` merges a file.

Exit status: 0 when training finished (or stopped at ``train.exit_interval`` / ``exit_duration_in_mins``); 1 with
one ``error: ...`` line for a bad config, an unusable checkpoint directory or a non-finite loss (``--debug`` shows
the traceback); 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM) after a signal made it save and stop.
"""

from __future__ import annotations

import argparse
import signal
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

    if args.hf_config:
        import json

        hf_config = json.loads(Path(args.hf_config).read_text())
        provider = AutoBridge.from_hf_config(hf_config).to_megatron_provider(load_weights=False)
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
        dataset=_data_config(args, PretrainDataConfig),
        optimizer=OptimizerConfig(lr=lr, min_lr=lr / 10, weight_decay=0.01, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=2, lr_decay_style="cosine"),
        checkpoint=CheckpointConfig(save=str(workdir / "checkpoints"), load=str(workdir / "checkpoints"),
                                    save_interval=10, keep_last_n=2),
        logger=LoggerConfig(log_interval=5, tensorboard_dir=str(workdir / "tensorboard"), print_config=False),
    )
    return apply_cli_args(cfg, overrides)


def _data_config(args, config_class):
    """Mock tokens or the named ``.bin/.idx`` prefixes (with optional weights before each), never a silent mix."""
    if args.mock:
        return config_class(seq_length=64, mock=True)
    items = list(args.data_path)
    try:
        weights = [float(w) for w in items[0::2]]
        paths = items[1::2]
        if len(paths) != len(weights):
            raise ValueError
    except ValueError:
        weights, paths = None, items
    return config_class(seq_length=64, paths=paths, weights=weights)


def export_and_reload(checkpoints: Path, hf_root: Path) -> None:
    """Export the newest checkpoint to ``hf_root/iter_N`` (N its iteration, so a resumed run adds an export rather
    than meeting the previous one), then load it with transformers and run one forward pass."""
    import torch.distributed as dist

    from bridge_convert import AutoBridge
    from bridge_convert.megatron_ckpt import read_checkpoint_metadata

    iteration = read_checkpoint_metadata(checkpoints)["iteration"]
    out = hf_root / f"iter_{iteration:07d}"
    first_rank = not dist.is_initialized() or dist.get_rank() == 0
    if out.is_dir() and any(out.iterdir()):
        if first_rank:
            print(f"{out} already holds the export of iteration {iteration}; not exported again", flush=True)
        return
    AutoBridge.export_ckpt(checkpoints, out)
    if not first_rank:
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
    source.add_argument("--hf-config", metavar="CONFIG_JSON",
                        help="random init with the shape of this HF config.json (no weights, no download); "
                             "bridge-recipes ships the Llama ones in bridge_recipes/llama/hf_configs/")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--mock", action="store_true", help="train on random mock tokens (to try the loop)")
    data.add_argument("--data-path", nargs="+", metavar="PREFIX",
                      help="indexed dataset prefixes from `bridge-data preprocess` (a weight may precede each)")
    parser.add_argument("--workdir", default="runs/pretrain", help="checkpoints, TensorBoard logs and the export")
    parser.add_argument("--no-export", action="store_true", help="skip the HF export at the end")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a config or checkpoint error")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-") and o != "--config" and not o.startswith("--config=")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from bridge_train import user_errors_exit

    with user_errors_exit(debug=args.debug):
        return _run(args, overrides)


def _run(args, overrides: list[str]) -> int:
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
    result = pretrain(cfg)
    import torch.distributed as dist

    first_rank = not dist.is_initialized() or dist.get_rank() == 0
    if result and first_rank:
        print(f"trained {len(result)} iterations: loss {result[0]:.4f} -> {result[-1]:.4f}", flush=True)
    if result.exit_reason in signal.Signals.__members__:
        if first_rank:
            print(f"stopped by {result.exit_reason}; resume with the same command", flush=True)
        return 128 + signal.Signals[result.exit_reason].value
    if not args.no_export and cfg.checkpoint.save:
        export_and_reload(Path(cfg.checkpoint.save), Path(args.workdir) / "hf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
