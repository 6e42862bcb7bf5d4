"""Time and peak memory of HF <-> Megatron conversion on a CPU, against ``cp`` of the same bytes.

    uv run python tools/bench/convert_bench.py --shape 1b --workdir /tmp/convert-bench
    uv run python tools/bench/convert_bench.py --shape 8b --workdir /tmp/convert-bench-8b --skip-building

Every step runs in its own process, so its peak RSS (``ru_maxrss``) is its own:
  make             random bf16 HF checkpoint of the shape: 1b = the hub config of Llama-3.2-1B (one 2.3 GiB file,
                   via transformers' save_pretrained); 8b = Llama-3-8B's shape (~16 GB), written tensor by tensor
                   into 5 GB shards named as save_pretrained names them, so the generator holds one tensor
  cp-hf            ``cp -r`` of the HF directory (the bytes import reads and writes)
  import           offline HF -> Megatron (AutoBridge.import_ckpt, the default)
  cp-megatron      ``cp -r`` of the Megatron checkpoint (the bytes export reads)
  export           offline Megatron -> HF (AutoBridge.export_ckpt, the default), checked byte-identical
  import-building  the model-building path (offline=False), for comparison (``--skip-building`` skips)
  export-building  the same for export
  transformers     from_pretrained + save_pretrained of the HF checkpoint (1b only: it holds the whole model)
Prints a markdown table: per step the seconds of the whole process (start-up and imports included) and of the
conversion call alone ("work"), both divided by the ``cp`` of the same bytes, the CPU seconds of the work (system
time apart: on a VM, handing out fresh page-cache pages is most of it, for ``cp`` too) and the peak RSS, with the
load average before and after. Files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30

def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _config(shape: str) -> dict:
    """The real HF config of the model (bridge-recipes ships them), in bf16."""
    from bridge_recipes.llama import hf_config

    return dict(hf_config("Llama-3.2-1B" if shape == "1b" else "Meta-Llama-3-8B"), torch_dtype="bfloat16")


def _make_small(workdir: Path, shape: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = _config(shape)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(workdir / "hf", max_shard_size="5GB")


def _make_large(workdir: Path, shape: str) -> None:
    """Names and shapes from transformers' model on the meta device; random data one tensor at a time."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridge_convert.safetensors_io import ShardedSafetensorsWriter

    raw = _config(shape)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tensors = [(n, torch.bfloat16, tuple(p.shape)) for n, p in model.named_parameters()]
    out = workdir / "hf"
    out.mkdir(parents=True)
    writer = ShardedSafetensorsWriter.by_size(out, tensors, max_shard_size="5GB")
    generator = torch.Generator().manual_seed(0)
    for name, dtype, shape_ in tensors:
        writer.add(name, torch.empty(shape_, dtype=dtype).normal_(0, 0.02, generator=generator))
    writer.close()
    (out / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}, indent=2) + "\n")


def _cp(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)  # the copy is deleted after the step


OWN_ENTRIES = ("hf", "hf-cp", "mcore", "mcore-cp", "hf-out", "mcore-building", "hf-out-building", "hf-transformers")
"""What the steps write under ``--workdir`` (and the conversions' staging ``.<name>.tmp-*``): all a run removes."""


def _own(name: str) -> bool:
    return name in OWN_ENTRIES or any(name.startswith(f".{own}.tmp-") for own in OWN_ENTRIES)


def _remove_own(workdir: Path) -> None:
    for entry in workdir.iterdir() if workdir.is_dir() else ():
        if _own(entry.name):
            shutil.rmtree(entry, ignore_errors=True)

STEPS = {
    "make": lambda w, s: (_make_small if s == "1b" else _make_large)(w, s),
    "cp-hf": lambda w, s: _cp(w / "hf", w / "hf-cp"),
    "import": lambda w, s: __import__("bridge_convert").AutoBridge.import_ckpt(w / "hf", w / "mcore"),
    "cp-megatron": lambda w, s: _cp(w / "mcore", w / "mcore-cp"),
    "export": lambda w, s: __import__("bridge_convert").AutoBridge.export_ckpt(w / "mcore", w / "hf-out"),
    "import-building": lambda w, s: __import__("bridge_convert").AutoBridge.import_ckpt(
        w / "hf", w / "mcore-building", offline=False),
    "export-building": lambda w, s: __import__("bridge_convert").AutoBridge.export_ckpt(
        w / "mcore-building", w / "hf-out-building", offline=False),
    "transformers": lambda w, s: _transformers(w),
}


def _transformers(workdir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "hf", dtype=torch.bfloat16)
    model.save_pretrained(workdir / "hf-transformers", max_shard_size="5GB")
    shutil.rmtree(workdir / "hf-transformers")


def _same_bytes(a: Path, b: Path, block: int = 64 * 2**20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while chunk := fa.read(block):
            if chunk != fb.read(block):
                return False
    return True


def _run_child(step: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--workdir", str(args.workdir), "--shape", args.shape]
    wall = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"step {step} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - wall  # includes Python start-up and imports
    return result


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["1b", "8b"], default="1b", help="checkpoint shape (default 1b)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert-bench"), help="scratch directory, new or empty (a run removes only what it wrote there)")
    parser.add_argument("--skip-building", action="store_true", help="skip the model-building path and transformers")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run every step after 'make' N times (in order, cp next to its conversion) and report "
                             "the median of each column (default 1); a shared machine varies by 2x from run to run")
    parser.add_argument("--child", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.child:
        from bridge_convert.runtime import silence_known_warnings

        silence_known_warnings()
        before, start = os.times(), time.perf_counter()
        STEPS[args.child](args.workdir, args.shape)
        seconds, after = time.perf_counter() - start, os.times()
        cpu = sum(getattr(after, f) - getattr(before, f)  # children: cp's own CPU time
                  for f in ("user", "system", "children_user", "children_system"))
        sys_cpu = after.system - before.system + after.children_system - before.children_system
        print(json.dumps({"seconds": seconds, "cpu": cpu, "sys": sys_cpu, "peak_rss": _peak_rss_bytes()}))
        return 0

    if args.workdir.exists() and not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir} is not a directory")
    foreign = sorted(p.name for p in args.workdir.iterdir() if not _own(p.name)) if args.workdir.is_dir() else []
    if foreign:
        parser.error(f"--workdir {args.workdir} holds files this benchmark did not write ({', '.join(foreign[:5])}); "
                     "give an empty or new directory")
    _remove_own(args.workdir)  # an earlier run's outputs
    args.workdir.mkdir(parents=True, exist_ok=True)
    steps = ["make", "cp-hf", "import", "cp-megatron", "export"]
    if not args.skip_building:
        steps += ["import-building", "export-building"] + (["transformers"] if args.shape == "1b" else [])
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    runs: dict[str, list[dict]] = {}
    identical = True
    try:
        for rep in range(args.repeat):
            for step in steps if rep == 0 else steps[1:]:
                # Every step starts with no dirty pages: writing while an earlier step's gigabytes are still being
                # written back costs several times more here (cp of the 1B shard: 1.0 s after a sync, 7-9 s right
                # after another copy), which would charge one step for the one before it.
                os.sync()
                runs.setdefault(step, []).append(_run_child(step, args))
                for copy in ("hf-cp", "mcore-cp"):
                    shutil.rmtree(args.workdir / copy, ignore_errors=True)
                print(f"{step}: {runs[step][-1]['process_seconds']:.1f} s, peak RSS "
                      f"{runs[step][-1]['peak_rss'] / GiB:.2f} GiB", file=sys.stderr, flush=True)
            shards = sorted((args.workdir / "hf").glob("*.safetensors"))
            identical &= all(_same_bytes(f, args.workdir / "hf-out" / f.name) for f in shards)
            hf_bytes, mc_bytes = _size(args.workdir / "hf"), _size(args.workdir / "mcore")
            if rep + 1 < args.repeat:  # the outputs of this round go; the HF input stays
                for out in ("mcore", "hf-out", "mcore-building", "hf-out-building"):
                    shutil.rmtree(args.workdir / out, ignore_errors=True)
        results = {step: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for step, rs in runs.items()}
    finally:
        if not args.keep:
            _remove_own(args.workdir)
            if not any(args.workdir.iterdir()):
                args.workdir.rmdir()
    import torch

    load_after = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"{args.shape} shape, bf16, {len(shards)} HF shard(s), {hf_bytes / GiB:.2f} GiB HF, {mc_bytes / GiB:.2f} GiB "
          f"Megatron; torch {torch.__version__}, {os.cpu_count()} CPUs; load average before {' '.join(load_before)}, "
          f"after {' '.join(load_after)}")
    print("| step | seconds (whole process) | seconds (work) | work / cp | whole process / cp "
          "| CPU seconds of the work (of it system) | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    cp_of = {"import": "cp-hf", "import-building": "cp-hf", "transformers": "cp-hf", "export": "cp-megatron",
             "export-building": "cp-megatron"}
    for step in steps[1:]:
        r = results[step]
        cp = results[cp_of[step]]["seconds"] if step in cp_of else None
        work_ratio = f"{r['seconds'] / cp:.2f}" if cp else "1"
        whole_ratio = f"{r['process_seconds'] / cp:.2f}" if cp else "1"
        rss = "-" if step.startswith("cp") else f"{r['peak_rss'] / GiB:.2f}"
        whole = "-" if step.startswith("cp") else f"{r['process_seconds']:.1f}"
        print(f"| {step} | {whole} | {r['seconds']:.1f} | {work_ratio} | {whole_ratio} | {r['cpu']:.1f} ({r['sys']:.1f}) "
              f"| {rss} |")
    print(f"median of {args.repeat} run(s); work = the conversion call alone; whole process = the step's process from start-up (Python, imports) to "
          "exit; each ratio divides by the cp -r of the same bytes")
    print(f"exported shards byte-identical to the source: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
