"""Time and peak memory of converting a Llama-3.2-1B-shaped checkpoint both ways (CPU or GPU).

    uv run python tools/bench/convert_bench.py --workdir /tmp/convert-bench [--shard-size 1GB] [--dtype bfloat16]

Steps, each in its own process so that its peak RSS is its own:
  make     random HF checkpoint of the Llama-3.2-1B shape (config of the hub model), written with save_pretrained
  import   HF -> Megatron checkpoint (AutoBridge.import_ckpt)
  export   Megatron checkpoint -> HF (AutoBridge.export_ckpt), then checked byte-identical to the source
Prints a markdown table with time, peak RSS and the budget "Megatron model bytes + largest shard + 1 GiB".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _step_make(workdir: Path, dtype: str, shard_size: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridge_recipes.llama import hf_config

    raw = dict(hf_config("Llama-3.2-1B"), torch_dtype=dtype)
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(workdir / "hf", max_shard_size=shard_size)
    return {}


def _step_import(workdir: Path, dtype: str, shard_size: str) -> dict:
    from bridge_convert import AutoBridge

    AutoBridge.import_ckpt(workdir / "hf", workdir / "mcore")
    return {}


def _step_export(workdir: Path, dtype: str, shard_size: str) -> dict:
    from bridge_convert import AutoBridge

    AutoBridge.export_ckpt(workdir / "mcore", workdir / "hf-out")
    return {}


def _same_bytes(a: Path, b: Path, block: int = 64 * 2**20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while chunk := fa.read(block):
            if chunk != fb.read(block):
                return False
    return True


STEPS = {"make": _step_make, "import": _step_import, "export": _step_export}


def _run_child(step: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--workdir", str(args.workdir), "--dtype", args.dtype,
           "--shard-size", args.shard_size]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert-bench"))
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--shard-size", default="5GB", help="save_pretrained max_shard_size of the source")
    parser.add_argument("--child", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from bridge_convert.runtime import silence_known_warnings

        silence_known_warnings()
        start = time.perf_counter()
        extra = STEPS[args.child](args.workdir, args.dtype, args.shard_size)
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": _peak_rss_bytes(), **extra}))
        return 0

    import shutil

    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    results = {step: _run_child(step, args) for step in STEPS}
    shards = sorted((args.workdir / "hf").glob("*.safetensors"))
    identical = all(_same_bytes(f, args.workdir / "hf-out" / f.name) for f in shards)
    largest = max(f.stat().st_size for f in shards)
    model_bytes = sum(f.stat().st_size for f in shards)  # the Megatron model holds the same parameters in dtype
    budget = model_bytes + largest + GiB
    import torch

    print(f"Llama-3.2-1B shape, {args.dtype}, {len(shards)} shard(s), largest {largest / GiB:.2f} GiB; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, CUDA: {torch.cuda.is_available()}")
    print("| step | seconds | peak RSS GiB | budget GiB (model + largest shard + 1) | within |")
    print("|---|---|---|---|---|")
    for step in ("import", "export"):
        r = results[step]
        print(f"| {step} | {r['seconds']:.1f} | {r['peak_rss'] / GiB:.2f} | {budget / GiB:.2f} | "
              f"{'yes' if r['peak_rss'] <= budget else 'NO'} |")
    print(f"exported shards byte-identical to the source: {identical}")
    return 0 if all(results[s]["peak_rss"] <= budget for s in ("import", "export")) else 1


if __name__ == "__main__":
    sys.exit(main())
