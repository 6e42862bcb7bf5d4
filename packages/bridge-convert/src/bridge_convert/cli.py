"""``bridge-convert``: HF <-> Megatron conversion from the command line.

Single process for TP = PP = 1; for larger layouts launch with torchrun, e.g.
``torchrun --nproc-per-node=2 -m bridge_convert.cli import /models/llama /ckpt/llama --tp 2``.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _layout_text(args) -> str:
    """``TP=2, PP=2`` (and ``VP=...`` when a virtual pipeline is asked for)."""
    vp = getattr(args, "vp", None)
    return f"TP={args.tp}, PP={args.pp}" + (f", VP={vp}" if vp and vp > 1 else "")


def _layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--vp", type=int, default=None, help="virtual pipeline stages per PP rank")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                        default=None, help="parameter dtype of the Megatron model (default: the checkpoint's)")
    parser.add_argument("--impl", choices=["auto", "native", "local", "transformer_engine"], default="auto",
                        help="layer implementation (default auto: Transformer Engine on a GPU with TE, else native)")


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr (what is wrong and where to look), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _shard_size(text: str) -> str:
    """``--max-shard-size``: refused at parse time unless it is a positive size."""
    from .safetensors_io import parse_size

    try:
        size = parse_size(text)
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use a byte count or a number with KB / MB / GB / "
                                         "TB (powers of 1000) or KiB / MiB / GiB / TiB (powers of 1024), e.g. 5GB")
    return text


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bridge-convert", description="Convert checkpoints between Hugging Face and megatron-core.",
        epilog="TP/PP > 1 need one process per rank: torchrun --nproc-per-node=N -m bridge_convert.cli ...")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="list the supported HF architectures")

    p = sub.add_parser("import", help="HF checkpoint -> Megatron (dist-checkpoint) checkpoint")
    p.add_argument("hf_path", help="HF model directory (config.json + safetensors)")
    p.add_argument("megatron_path", help="output Megatron checkpoint directory")
    _layout_args(p)
    _output_args(p)
    _offline_args(p)

    p = sub.add_parser("export", help="Megatron checkpoint -> HF checkpoint")
    p.add_argument("megatron_path", help="Megatron checkpoint (root with a tracker file, or an iter_* directory)")
    p.add_argument("hf_path", help="output HF model directory")
    p.add_argument("--max-shard-size", type=_shard_size, metavar="SIZE",
                   help="cut the safetensors files at SIZE (even where the source checkpoint's files would be "
                        "reproduced): bytes, or a number with KB/MB/GB (powers of 1000) or KiB/MiB/GiB (powers of "
                        "1024), e.g. 500MB, 2GiB (default: the source's files when the tensors match them, else 5GB)")
    p.add_argument("--no-overwrite", action="store_true", help="refuse a non-empty output directory: the default now (kept for older scripts); an error together with --overwrite")
    _layout_args(p)
    _output_args(p)
    _offline_args(p)

    p = sub.add_parser("roundtrip", help="HF -> Megatron -> HF in memory, then verify every tensor is identical")
    p.add_argument("hf_path", help="HF model directory")
    p.add_argument("out_path", help="where to write the exported HF checkpoint")
    _layout_args(p)
    _output_args(p)

    p = sub.add_parser("compare", help="HF transformers vs Megatron logits on the same input")
    p.add_argument("hf_path", help="HF model directory")
    p.add_argument("--megatron-path", default=None,
                   help="take the Megatron weights from this checkpoint instead of converting hf_path's")
    p.add_argument("--prompt", default=None, help="text to encode with the model's tokenizer")
    p.add_argument("--seq-len", type=_positive_int("length"), default=None,
                   help="random-input length when no --prompt (default 32)")
    p.add_argument("--batch", type=_positive_int("batch size"), default=None,
                   help="random-input batch size when no --prompt (default 2)")
    p.add_argument("--atol", type=_tolerance, default=None, metavar="X",
                   help="fail (exit status 1) when the max |diff| of the logits exceeds X; default: report only")
    p.add_argument("--seed", type=int, default=None, help="seed of the random input ids when no --prompt (default 0)")
    _layout_args(p)
    for command in sub.choices.values():
        # --debug after the subcommand too; SUPPRESS keeps a subcommand from resetting a --debug given before it.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def _output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output directory (never an input, a file or a training "
                             "checkpoint; the old one is removed only once the new one is complete)")


def _positive_int(what: str):
    """An argparse type: a whole number >= 1, else ``'x' is not a positive WHAT``."""
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {what}")
        return int(text)

    return parse


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a tolerance; give a number >= 0, e.g. 1e-4")
    return value


def _offline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int("number of threads"), default=None, metavar="N",
                        help="parallel readers / writers of the offline converter (default: 1 for import, 2 for "
                             "export; each holds one layer slice of one tensor)")


def _builds_model(args) -> bool:
    """A layout or layer implementation asks for the model-building path; the default converts offline."""
    import os

    world = int(os.environ.get("WORLD_SIZE", 1))
    builds = args.tp != 1 or args.pp != 1 or bool(args.vp) or args.impl != "auto" or world > 1
    if builds and args.threads is not None:
        raise ValueError("--threads sets the offline converter's readers / writers; the model-building path "
                         "(--tp / --pp / --vp / --impl, or torchrun) has none: drop --threads")
    return builds


def _overrides(args) -> dict:
    # The process count is checked by the runtime, after the provider has checked that the model splits at this
    # layout (heads, KV groups, layers): the model's problem is the one to report first.
    out = {"tensor_model_parallel_size": args.tp, "pipeline_model_parallel_size": args.pp,
           "transformer_impl": args.impl}
    if args.vp:
        out["virtual_pipeline_model_parallel_size"] = args.vp
    if args.dtype:
        out["params_dtype"] = args.dtype
    return out


def _print0(*args) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def _cmd_list(args) -> int:
    from .registry import supported_architectures

    for name in supported_architectures():
        print(name)
    return 0


def _cmd_import(args) -> int:
    from .auto_bridge import AutoBridge

    if _builds_model(args):
        out = AutoBridge.import_ckpt(args.hf_path, args.megatron_path, overwrite=args.overwrite, offline=False,
                                     **_overrides(args))
    else:
        out = AutoBridge.import_ckpt(args.hf_path, args.megatron_path, overwrite=args.overwrite, dtype=args.dtype,
                                     threads=args.threads)
    _print0(f"imported {args.hf_path} -> {out}")
    return 0


def _cmd_export(args) -> int:
    from .auto_bridge import AutoBridge

    if args.overwrite and args.no_overwrite:
        raise ValueError("--overwrite and --no-overwrite contradict each other; pass one")
    if _builds_model(args):
        overrides = _overrides(args)
        dtype = overrides.pop("params_dtype", None)
        AutoBridge.export_ckpt(args.megatron_path, args.hf_path, dtype=dtype, max_shard_size=args.max_shard_size,
                               overwrite=args.overwrite, offline=False, **overrides)
    else:
        AutoBridge.export_ckpt(args.megatron_path, args.hf_path, dtype=args.dtype, max_shard_size=args.max_shard_size,
                               overwrite=args.overwrite, threads=args.threads)
    _print0(f"exported {args.megatron_path} -> {args.hf_path}")
    return 0


def _cmd_roundtrip(args) -> int:
    import torch

    from .auto_bridge import AutoBridge
    from .hf_config import parse_dtype
    from .safetensors_io import LazyHFCheckpoint

    bridge = AutoBridge.from_hf_pretrained(args.hf_path)
    overrides = _overrides(args)
    stored = LazyHFCheckpoint(args.hf_path).float_dtypes(bridge.model_bridge.is_ignored)
    if "params_dtype" not in overrides:  # checks the mapping: in the weights' own dtype, whatever config.json says
        if len(stored) == 1:
            overrides["params_dtype"] = next(iter(stored))
        rounded = []
    else:  # a parameter dtype that cannot hold every stored value: the round trip is lossy by construction
        from .offline.importer import rounded_dtypes

        rounded = rounded_dtypes(stored, parse_dtype(overrides["params_dtype"]))
    model = bridge.to_megatron_model(load_weights=True, wrap_with_ddp=False, **overrides)
    bridge.save_hf_pretrained(model, args.out_path, overwrite=args.overwrite)
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return 0
    src, out = LazyHFCheckpoint(args.hf_path), LazyHFCheckpoint(args.out_path)
    ignored = {n for n in src.keys() if bridge.model_bridge.is_ignored(n)}
    missing = sorted(set(src.keys()) - set(out.keys()) - ignored)
    extra = sorted(set(out.keys()) - set(src.keys()))
    differ = []
    for name in sorted(set(src.keys()) & set(out.keys())):
        a, b = src.get(name), out.get(name)
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("nan")
            differ.append(f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}, max |diff| {diff:.3g}")
    total = len(set(src.keys()) - ignored)
    print(f"round trip {args.hf_path} -> Megatron ({_layout_text(args)}) -> {args.out_path}")
    if rounded:
        print(f"  note: --dtype {args.dtype} cannot hold every {' / '.join(rounded)} weight: they are rounded, so "
              "the round trip is not bit-exact (leave --dtype out to check the conversion itself)")
    print(f"  identical tensors: {total - len(missing) - len(differ)}/{total}")
    for label, items in (("missing", missing), ("unexpected", extra), ("different", differ)):
        for item in items:
            print(f"  {label}: {item}")
    ok = not (missing or extra or differ)
    print("  result: " + ("bit-exact" if ok else "MISMATCH"))
    return 0 if ok else 1


def _cmd_compare(args) -> int:
    import torch

    from .auto_bridge import AutoBridge
    from .forward import forward_logits
    from .hf_config import parse_dtype

    random_input = {"--seq-len": args.seq_len, "--batch": args.batch, "--seed": args.seed}
    if args.prompt is not None and any(v is not None for v in random_input.values()):
        given = " / ".join(k for k, v in random_input.items() if v is not None)
        raise ValueError(f"{given}: only for the random input; with --prompt the input is the prompt's tokens "
                         f"(drop {given} or --prompt)")
    bridge = AutoBridge.from_hf_pretrained(args.hf_path)
    vocab = bridge.hf_config["vocab_size"]
    if args.prompt is not None:  # before the model is built
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.hf_path)
        except Exception as err:  # noqa: BLE001 - transformers raises ValueError, OSError, TypeError, ... here
            detail = " ".join(str(err).split())[:200]
            raise ValueError(f"--prompt needs the tokenizer of {args.hf_path}, which does not load ({detail}); "
                             "drop --prompt to compare on random token ids") from None
        prompt_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        if prompt_ids.numel() == 0 or int(prompt_ids.max()) >= vocab:
            found = "no tokens" if prompt_ids.numel() == 0 else f"id {int(prompt_ids.max())}"
            raise ValueError(f"--prompt {args.prompt!r} encodes to {found}, and the model needs 1+ ids below its "
                             f"vocab_size {vocab}; give other text, or drop --prompt to compare on random token ids")
    overrides = _overrides(args)
    dtype = parse_dtype(overrides.get("params_dtype", bridge.to_megatron_provider(load_weights=False).params_dtype))
    overrides["params_dtype"] = dtype
    if args.megatron_path:
        model = bridge.to_megatron_model(load_weights=False, **overrides)
        bridge.load_megatron_checkpoint(model, args.megatron_path)
    else:
        model = bridge.to_megatron_model(load_weights=True, **overrides)
    if args.prompt is not None:
        ids = prompt_ids
    else:
        shape, seed = (args.batch or 2, args.seq_len or 32), args.seed or 0
        ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    megatron = forward_logits(model, ids)
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return 0
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model = AutoModelForCausalLM.from_pretrained(args.hf_path, dtype=dtype).to(device).eval()
    with torch.no_grad():
        hf = hf_model(ids.to(device)).logits.float().cpu()
    _require_finite({"Megatron": megatron, "HF": hf}, {"HF": hf_model, "Megatron": model[0]}, args)
    diff = (megatron - hf).abs()
    # in float64: float32 rounding prints identical logits as "0.999999 / 1.000001"
    cosine = torch.nn.functional.cosine_similarity(megatron.flatten(0, 1).double(), hf.flatten(0, 1).double(), dim=-1)
    match = (megatron.argmax(-1) == hf.argmax(-1)).float().mean().item()
    print(f"HF vs Megatron logits ({tuple(ids.shape)} tokens, {dtype}, {_layout_text(args)}):")
    print(f"  max |diff|        {diff.max().item():.6g}")
    print(f"  mean |diff|       {diff.mean().item():.6g}")
    print(f"  cosine (min/mean) {cosine.min().item():.6f} / {cosine.mean().item():.6f}")
    print(f"  next-token match  {match * 100:.2f}%")
    if args.atol is None:
        return 0
    ok = diff.max().item() <= args.atol
    print(f"  result: {'within' if ok else 'MISMATCH: above'} --atol {args.atol:g}")
    return 0 if ok else 1


def _require_finite(logits: dict, models: dict, args) -> None:
    """Refuse to report statistics over NaN / inf logits: max |diff| and argmax say nothing about them."""
    import torch

    bad = [f"{label} logits hold {int(t.isnan().sum())} NaN and {int(t.isinf().sum())} inf of {t.numel()} values"
           for label, t in logits.items() if not torch.isfinite(t).all()]
    if not bad:
        return
    for label, module in models.items():
        weights = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
        if weights:
            more = f" and {len(weights) - 3} more" if len(weights) > 3 else ""
            bad.append(f"{label} weights with NaN/inf: {', '.join(weights[:3])}{more}")
    source = args.megatron_path or args.hf_path
    raise ValueError(f"{'; '.join(bad)}; the checkpoint {source} is not usable as it is (re-export or re-download "
                     "it)")


_COMMANDS = {"list": _cmd_list, "import": _cmd_import, "export": _cmd_export, "roundtrip": _cmd_roundtrip,
             "compare": _cmd_compare}


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line: an OS error as ``path: reason``, a list of problems joined by ';'."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    head, *items = [line.strip().removeprefix("- ") for line in str(exc).splitlines() if line.strip()] or [""]
    return " ".join([head, "; ".join(items)]) if items else head


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bridge-convert`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    from .runtime.warnings_filter import silence_known_warnings

    silence_known_warnings()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("bridge").setLevel(logging.INFO)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError, TypeError) as exc:
        if args.debug:
            raise
        print(f"bridge-convert {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if args.command != "list":
            from .runtime import destroy_parallel

            destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
