"""The whole pipeline on a tiny Llama, on a CPU in about a minute:

1. an HF checkpoint (a random tiny Llama 3.2 written with ``save_pretrained``) is imported through AutoBridge;
2. ``llama32_1b.pretrain_config()`` pretrains it for a few iterations (Megatron checkpoints);
3. ``llama32_1b.peft_config(peft="lora")`` LoRA-finetunes the result on mock SFT data (adapter checkpoint);
4. ``bridge-peft export-adapter`` writes the adapter in the HF PEFT format and HF ``peft`` loads it;
5. ``bridge-peft merge`` writes the merged model, which transformers loads and which gives the same logits.

    python pipeline_demo.py --workdir runs/pipeline
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

TINY_RUN = ["mixed_precision=fp32", "train.eval_interval=null", "logger.log_interval=5", "logger.print_config=false",
            "scheduler.lr_warmup_iters=2"]


def _tiny(cfg, provider, seq_length: int = 64):
    """``cfg`` with the tiny model and a short, CPU-sized run (fp32: bf16 on a CPU gains nothing)."""
    from bridge_train.config import apply_overrides

    cfg.model = provider
    cfg.model.seq_length = seq_length
    cfg.dataset.seq_length = seq_length
    return apply_overrides(cfg, TINY_RUN)


_OWN = ("hf", "pretrain", "lora", "pretrained-hf", "adapter", "merged")
_MARKER = ".bridge-pipeline-demo"


def _claim(workdir: Path) -> None:
    """Make ``workdir`` this demo's: a new or empty directory, or one an earlier run of the demo marked, whose
    entries of that run are removed. Anything else is refused: the demo never deletes what it did not write."""
    if workdir.exists() and not workdir.is_dir():
        raise SystemExit(f"pipeline_demo: error: --workdir {workdir} is a file; choose a directory")
    entries = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else []
    # a run of the demo from before it wrote the marker: only its own entries, its first two steps' among them
    earlier = set(entries) <= set(_OWN) and (workdir / "hf" / "config.json").is_file() and (workdir / "pretrain").is_dir()
    if entries and _MARKER not in entries and not earlier:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise SystemExit(f"pipeline_demo: error: --workdir {workdir} is not empty ({shown}) and holds no {_MARKER} "
                         "file (what this demo writes into its workdir); choose a new or empty directory")
    for name in _OWN:
        if (workdir / name).exists():
            shutil.rmtree(workdir / name)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / _MARKER).write_text("written by bridge-recipes' pipeline_demo.py; its next run replaces "
                                   f"{', '.join(_OWN)} here\n")


def run(workdir: Path) -> dict[str, float]:
    from bridge_convert import AutoBridge
    from bridge_convert.testing import save_tiny_hf_checkpoint
    from bridge_peft.cli import main as bridge_peft
    from bridge_recipes.llama import llama32_1b
    from bridge_train import finetune, pretrain

    _claim(workdir)
    hf = save_tiny_hf_checkpoint(workdir / "hf", "llama32", seed=0)                      # 1. an HF checkpoint
    bridge = AutoBridge.from_hf_pretrained(hf)

    cfg = llama32_1b.pretrain_config(dir=str(workdir / "pretrain"), train_iters=20, global_batch_size=8,
                                     micro_batch_size=4, lr=3e-3, min_lr=3e-4)
    pre = pretrain(_tiny(cfg, bridge.to_megatron_provider(load_weights=True)))           # 2. pretrain
    pretrained = workdir / "pretrain" / "checkpoints"

    cfg = llama32_1b.peft_config(peft="lora", dim=8, alpha=16, hf_path=None, allow_random_init=False,
                                 dir=str(workdir / "lora"), train_iters=20, global_batch_size=8, micro_batch_size=4,
                                 lr=3e-3)
    cfg.checkpoint.pretrained_checkpoint = str(pretrained)
    lora = finetune(_tiny(cfg, bridge.to_megatron_provider(load_weights=False)))        # 3. LoRA fine-tune
    adapter_ckpt = workdir / "lora" / "checkpoints"

    AutoBridge.export_ckpt(pretrained, workdir / "pretrained-hf")                        # the adapter's base model
    for argv in (["export-adapter", str(adapter_ckpt), str(workdir / "adapter")],        # 4. HF PEFT adapter
                 ["merge", str(adapter_ckpt), str(workdir / "merged"), "--base", str(pretrained)]):  # 5. merged
        if bridge_peft(argv) != 0:
            raise RuntimeError(f"bridge-peft {' '.join(argv)} failed")

    try:
        from peft import PeftModel
    except Exception as err:  # noqa: BLE001 - the optional `demo` extra
        raise SystemExit(f"the last step loads the adapter with HF peft, which is not importable ({err}); install "
                         "bridge-recipes[demo]") from None
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workdir / "pretrained-hf", dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, workdir / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(workdir / "merged", dtype=torch.float32).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (with_adapter(ids).logits - merged(ids).logits).abs().max().item()
    return {"pretrain_first": pre[0], "pretrain_last": pre[-1], "lora_first": lora[0], "lora_last": lora[-1],
            "peft_vs_merged_max_logit_diff": diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/pipeline", help="where every step writes: a new or empty directory, or an earlier run's (whose outputs are replaced)")
    args = parser.parse_args(argv)
    from bridge_convert.runtime import silence_known_warnings

    silence_known_warnings()
    out = run(Path(args.workdir))
    print(f"pretrain loss {out['pretrain_first']:.3f} -> {out['pretrain_last']:.3f}; LoRA loss {out['lora_first']:.3f} "
          f"-> {out['lora_last']:.3f}; HF peft adapter vs merged model: max logit difference "
          f"{out['peft_vs_merged_max_logit_diff']:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
