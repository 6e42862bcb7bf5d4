"""Scaling of `pretrain()` itself over 1, 2, 4, 8 processes: same model, same per-GPU micro-batch.

Each point is one `torchrun --nproc-per-node N` launch of the bridge-train example (`pretrain_llama.py`), so what is
timed is the real training loop (data, schedule, optimizer, logging), not a stripped-down step. The global batch
grows with the data-parallel size so every rank does the same work per iteration at every N. Tokens/s and MFU are
read from the loop's own per-interval log lines (the FLOP formula is bridge-train's, see its README); the first
`--skip` logged intervals are warm-up (compilation, allocator growth) and left out, the rest are averaged.

    # one H200: the 1-GPU baseline (DP and TP rows need more GPUs)
    python tools/bench/scaling.py --gpus 1 --out $OUT/scaling.md
    # 8 GPUs: DP up to 8 with the distributed optimizer and overlapped grad reduce, and TP=2
    python tools/bench/scaling.py --gpus 1,2,4,8 --layouts dp,tp2 --out $OUT/scaling.md
    # CPU (gloo), the tiny model: checks the script end to end
    python tools/bench/scaling.py --tiny --gpus 1,2 --layouts dp,tp2

Scaling efficiency = (tokens/s per GPU at N) / (tokens/s per GPU at 1): 1.0 is ideal. For TP the model is split
rather than the batch, so `tp2` at 2 GPUs keeps the global batch of 1 GPU and its ideal is 2x the 1-GPU tokens/s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "packages" / "bridge-train" / "examples" / "pretrain_llama.py"
LLAMA_32_1B = ROOT / "packages" / "bridge-recipes" / "src" / "bridge_recipes" / "llama" / "hf_configs" / "Llama-3.2-1B.json"
_LINE = re.compile(r"^iteration\s+(\d+)/\d+ .*?tokens/s ([\d,]+)(?:.*?MFU ([\d.]+)%)?")


@dataclass
class Point:
    layout: str
    gpus: int
    tokens_per_s: float
    mfu: float | None
    log: str


def layout_overrides(layout: str, gpus: int, micro_batch: int) -> list[str] | None:
    """Overrides for ``layout`` at ``gpus`` processes, or None when the layout does not fit."""
    if layout == "dp":
        return [f"train.global_batch_size={micro_batch * gpus}", "ddp.use_distributed_optimizer=true",
                "optimizer.use_distributed_optimizer=true", "ddp.overlap_grad_reduce=true"]
    match = re.fullmatch(r"tp(\d+)", layout)
    if not match:
        raise SystemExit(f"unknown layout {layout!r}: use dp or tpN (e.g. tp2)")
    tp = int(match.group(1))
    if gpus % tp:
        return None
    dp = gpus // tp
    return [f"model.tensor_model_parallel_size={tp}", f"model.sequence_parallel={'true' if tp > 1 else 'false'}",
            f"train.global_batch_size={micro_batch * dp}"]


def parse_log(text: str, skip: int) -> tuple[float, float | None]:
    """Mean tokens/s and MFU of the logged intervals after the first ``skip``."""
    rows = [m for m in (_LINE.match(line.strip()) for line in text.splitlines()) if m]
    rows = rows[skip:] or rows[-1:]
    if not rows:
        raise ValueError("no 'iteration ... tokens/s' lines in the log")
    tokens = sum(float(m.group(2).replace(",", "")) for m in rows) / len(rows)
    mfus = [float(m.group(3)) / 100 for m in rows if m.group(3)]
    return tokens, (sum(mfus) / len(mfus) if mfus else None)


def run_point(args, layout: str, gpus: int, workdir: Path) -> Point | None:
    overrides = layout_overrides(layout, gpus, args.micro_batch)
    if overrides is None:
        return None
    source = ["--tiny", str(workdir / "tiny-hf")] if args.tiny else ["--hf-config", args.hf_config]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", str(EXAMPLE),
           *source, "--mock", "--workdir", str(workdir / f"{layout}-{gpus}"), "--no-export",
           f"train.train_iters={args.iters}", f"train.micro_batch_size={args.micro_batch}",
           f"dataset.seq_length={args.seq}", "train.eval_interval=null", f"logger.log_interval={args.log_interval}",
           "logger.progress_bar=false", "checkpoint.save=null", "checkpoint.load=null",
           "checkpoint.save_interval=null", "checkpoint.keep_last_n=null", *overrides, *args.overrides]
    if not args.tiny:
        cmd.append(f"mixed_precision={args.precision}")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        lines = [line for line in log.splitlines() if "ConfigError" in line or "Error:" in line or "- " in line]
        tail = "\n".join((lines or log.splitlines())[-15:])
        print(f"{layout} x{gpus} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return Point(layout, gpus, float("nan"), None, log)
    tokens, mfu = parse_log(log, args.skip)
    return Point(layout, gpus, tokens, mfu, log)


def table(points: list[Point]) -> str:
    base = {p.layout: p for p in points if p.gpus == 1}
    one = next((p for p in points if p.gpus == 1), None)
    lines = ["| layout | GPUs | tokens/s | tokens/s per GPU | MFU | speed-up vs 1 GPU | scaling efficiency |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        ref = base.get(p.layout) or one
        speedup = p.tokens_per_s / ref.tokens_per_s if ref else float("nan")
        lines.append(f"| {p.layout} | {p.gpus} | {p.tokens_per_s:,.0f} | {p.tokens_per_s / p.gpus:,.0f} | "
                     f"{'-' if p.mfu is None else f'{p.mfu * 100:.1f}%'} | {speedup:.2f}x | {speedup / p.gpus:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4,8", help="comma-separated process counts (default 1,2,4,8)")
    parser.add_argument("--layouts", default="dp", help="comma-separated: dp, tp2, tp4, ... (default dp)")
    parser.add_argument("--hf-config", default=str(LLAMA_32_1B),
                        help="HF config.json of the model, random init (default: bridge-recipes' Llama-3.2-1B)")
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU model instead (gloo; checks the script)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 4096; 64 with --tiny)")
    parser.add_argument("--micro-batch", type=int, default=None, help="per-GPU micro-batch (default 8; 2 --tiny)")
    parser.add_argument("--iters", type=int, default=30, help="iterations per point (default 30)")
    parser.add_argument("--log-interval", type=int, default=5, help="iterations per logged interval (default 5)")
    parser.add_argument("--skip", type=int, default=2, help="logged intervals left out as warm-up (default 2)")
    parser.add_argument("--precision", default="bf16_mixed", help="mixed_precision recipe (default bf16_mixed)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per point before it is killed")
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides for every point")
    args = parser.parse_args(argv)
    args.seq = args.seq or (64 if args.tiny else 4096)
    args.micro_batch = args.micro_batch or (2 if args.tiny else 8)
    try:
        counts = [int(n) for n in args.gpus.split(",")]
    except ValueError:
        parser.error(f"--gpus takes comma-separated integers, got {args.gpus!r}")
    if not args.tiny:
        import torch

        if torch.cuda.device_count() < max(counts):
            parser.error(f"--gpus {args.gpus} needs {max(counts)} GPUs, this machine has {torch.cuda.device_count()}")
    workdir = Path(tempfile.mkdtemp(prefix="bridge-scaling-"))
    points: list[Point] = []
    try:
        for layout in args.layouts.split(","):
            for gpus in counts:
                point = run_point(args, layout, gpus, workdir)
                if point is not None:
                    points.append(point)
                    print(f"{layout} x{gpus}: {point.tokens_per_s:,.0f} tokens/s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(points)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(p.tokens_per_s == p.tokens_per_s for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
