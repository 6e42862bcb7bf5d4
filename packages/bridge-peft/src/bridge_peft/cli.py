"""``bridge-peft``: adapter checkpoints of bridge-train's PEFT runs -> HF PEFT adapters or merged HF models.

- ``bridge-peft export-adapter CKPT OUT``: the adapters of an adapter-only Megatron checkpoint (as ``finetune``
  with ``cfg.peft`` writes them) as an HF PEFT directory (``PeftModel.from_pretrained`` / vLLM load it);
- ``bridge-peft merge CKPT OUT [--base BASE]``: the base model (an HF directory or a Megatron checkpoint; default:
  the one the run recorded) with the adapters merged in, as an HF checkpoint.

The PEFT method is rebuilt from the checkpoint's ``bridge.json`` (class path and fields). Outputs are written
into a temporary directory next to OUT and renamed into place when complete: a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge-peft", description="Export or merge PEFT adapter checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="export-adapter or merge (COMMAND --help for its options)")

    p = sub.add_parser("export-adapter", help="adapter checkpoint -> HF PEFT adapter directory",
                       description="Write the adapters of a bridge-train PEFT checkpoint in the HF PEFT format.")
    p.add_argument("checkpoint", help="Megatron adapter checkpoint (root with a tracker file, or an iter_* dir)")
    p.add_argument("out", help="output directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--base-model-name", default=None,
                   help="base_model_name_or_path recorded in adapter_config.json (default: the HF directory the "
                        "run fine-tuned, as its checkpoint records it; else the architecture name)")

    p = sub.add_parser("merge", help="adapter checkpoint + base model -> merged HF checkpoint",
                       description="Merge the adapters of a bridge-train PEFT checkpoint into a base model and "
                                   "write the result as an HF checkpoint.")
    p.add_argument("checkpoint", help="Megatron adapter checkpoint (root with a tracker file, or an iter_* dir)")
    p.add_argument("out", help="output HF model directory")
    p.add_argument("--base", default=None,
                   help="the base model the adapters were trained on: an HF directory or a Megatron checkpoint "
                        "(default: the checkpoint.pretrained_checkpoint its run recorded)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype the base is loaded, merged and written in (default: the base checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--other-base", action="store_true",
                   help="merge even when BASE's weights are not those the adapters were trained on (the checkpoint "
                        "records a fingerprint of them), e.g. to carry adapters over to an instruct variant")
    return parser


def peft_from_metadata(meta: dict, where: Path):
    """Rebuild the PEFT method that ``bridge-train`` recorded in a checkpoint's ``bridge.json``.

    Raises:
        ValueError: for a checkpoint without a PEFT entry or with a class that cannot be imported.
    """
    entry = meta.get("peft")
    if not isinstance(entry, dict) or "class" not in entry:
        raise ValueError(f"{where} is not an adapter checkpoint: its bridge.json records no PEFT method (write it "
                         "with bridge-train's finetune and cfg.peft set; a whole model converts with bridge-convert "
                         "export)")
    module, _, name = entry["class"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where}: cannot import the PEFT class {entry['class']!r} ({exc})") from None
    return cls(**entry.get("fields", {}))


_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size", "head_dim")


def _check_same_model(adapter_cfg: dict, base_cfg: dict, ckpt: Path, base: str) -> None:
    diffs = [f"{k}: checkpoint {adapter_cfg.get(k)!r}, base {base_cfg.get(k)!r}" for k in _SHAPE_KEYS
             if adapter_cfg.get(k) != base_cfg.get(k)]
    if adapter_cfg.get("architectures") != base_cfg.get("architectures"):
        diffs.insert(0, f"architectures: {adapter_cfg.get('architectures')} vs {base_cfg.get('architectures')}")
    if diffs:
        raise ValueError(f"the adapters in {ckpt} were trained on another model than --base {base}: "
                         + "; ".join(diffs))


def _load_adapters(model, peft, ckpt: Path) -> None:
    from bridge_convert.megatron_ckpt import load_model_state, sharded_model_state

    state = peft.filter_sharded_state_dict(sharded_model_state(model))
    load_model_state(model, ckpt, model_state=state, strict=False, adapters=True)


def _check_same_weights(meta: dict, model, ckpt: Path, base: str) -> None:
    from bridge_convert.weights_fingerprint import base_weights_fingerprint, same_weights

    recorded = (meta.get("peft") or {}).get("base_fingerprint")
    if same_weights(recorded, base_weights_fingerprint(model)) is False:
        trained_on = (meta.get("peft") or {}).get("base")
        raise ValueError(f"the adapters in {ckpt} were trained on other weights than those of --base {base} (the "
                         f"checkpoint records a fingerprint of its base{f', {trained_on}' if trained_on else ''}): "
                         "the merge would be a model nobody trained; pass the base they were trained on, or "
                         "--other-base to merge onto these weights all the same")


def _model_with_adapters(ckpt: Path, base: str | None, steps, dtype: str | None = None, other_base: bool = False):
    """Build the model (base weights from ``base`` when given, in ``dtype`` or their own), apply the checkpoint's
    PEFT, load the adapters. With a ``base`` (a merge) the adapters are fp32, whatever dtype they were saved in, so
    that ``W + s B A`` is rounded once, into the weight dtype."""
    from bridge_convert import AutoBridge
    from bridge_convert.megatron_ckpt import read_checkpoint_metadata, resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(ckpt)
    meta = read_checkpoint_metadata(directory)
    peft = peft_from_metadata(meta, directory)
    adapter_bridge = AutoBridge.from_megatron_checkpoint(directory)
    chosen = {"params_dtype": dtype} if dtype else {}
    if base is None:
        bridge = adapter_bridge
        model = bridge.to_megatron_model(load_weights=False, perform_initialization=False,
                                         params_dtype=meta.get("params_dtype", "float32"))
    elif (Path(base) / "config.json").exists():
        bridge = AutoBridge.from_hf_pretrained(base)
        _check_same_model(adapter_bridge.hf_config, bridge.hf_config, directory, base)
        model = bridge.to_megatron_model(load_weights=True, **chosen)
    else:
        bridge = AutoBridge.from_megatron_checkpoint(base)
        _check_same_model(adapter_bridge.hf_config, bridge.hf_config, directory, base)
        model = bridge.to_megatron_model(load_weights=False, perform_initialization=False, **chosen)
        bridge.load_megatron_checkpoint(model, base)
    if base is not None and not other_base:
        _check_same_weights(meta, model, directory, base)
    steps.update(1)
    if base is not None and hasattr(peft, "lora_dtype"):
        peft.lora_dtype = "float32"
    peft(model, training=False)
    _load_adapters(model, peft, directory)
    steps.update(1)
    return bridge, model, directory


def _recorded_base(ckpt: Path) -> str:
    """The base model that the run which saved ``ckpt`` trained its adapters on (bridge-train records its
    ``checkpoint.pretrained_checkpoint``), for a merge without ``--base``."""
    from bridge_convert.megatron_ckpt import read_checkpoint_metadata, resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(ckpt)
    meta = read_checkpoint_metadata(directory)
    peft_from_metadata(meta, directory)  # a full-model checkpoint is named as such, not as one without a base
    base = meta["peft"].get("base")
    if not base:
        raise ValueError(f"{directory} records no base model (its run started from a provider's own weights or "
                         "random ones, or an older bridge-train saved it): pass --base, the HF directory or Megatron "
                         "checkpoint the adapters were trained on")
    if not Path(base).exists():
        raise FileNotFoundError(f"the base model {directory} records ({base}, its run's "
                                "checkpoint.pretrained_checkpoint) does not exist here: pass --base")
    print(f"base model: {base} (recorded in {directory})", file=sys.stderr)
    return base


def _recorded_hf_base(directory: Path) -> str | None:
    """The HF directory the adapters were trained on, as its run recorded it, if it is one here (what HF peft's
    ``AutoPeftModelForCausalLM`` loads as the base); None otherwise."""
    from bridge_convert.megatron_ckpt import read_checkpoint_metadata

    entry = read_checkpoint_metadata(directory).get("peft")
    base = entry.get("base") if isinstance(entry, dict) else None
    return str(base) if base and (Path(base) / "config.json").is_file() else None


def _export_adapter(args) -> None:
    from tqdm.auto import tqdm

    from bridge_convert.outputs import check_output_dir

    from .hf_adapter import save_hf_adapter

    check_output_dir(args.out, overwrite=args.overwrite, inputs=(args.checkpoint,))
    with tqdm(total=3, desc="export-adapter", unit="step") as steps:
        bridge, model, directory = _model_with_adapters(Path(args.checkpoint), None, steps)
        name = args.base_model_name or _recorded_hf_base(directory) or bridge.model_bridge.hf_architecture
        save_hf_adapter(bridge, model, args.out, overwrite=args.overwrite, base_model_name_or_path=name)
        steps.update(1)
    print(f"wrote the HF PEFT adapter of {directory} to {args.out}")


def _merge(args) -> None:
    from tqdm.auto import tqdm

    from bridge_convert.megatron_ckpt import HF_ASSET_FILES, HF_ASSETS_DIR
    from bridge_convert.outputs import check_output_dir

    from .merge import merge_adapters

    base = args.base or _recorded_base(Path(args.checkpoint))
    check_output_dir(args.out, overwrite=args.overwrite, inputs=(args.checkpoint, base))
    with tqdm(total=4, desc="merge", unit="step") as steps:
        bridge, model, directory = _model_with_adapters(Path(args.checkpoint), base, steps, args.dtype,
                                                        other_base=args.other_base)
        merge_adapters(model)
        steps.update(1)
        # the tokenizer the fine-tune trained with (its checkpoint's copy), else the base's
        assets = directory / HF_ASSETS_DIR
        tokenizer_kept = assets.is_dir() and any((assets / n).exists() for n in HF_ASSET_FILES
                                                 if n != "generation_config.json")
        bridge.save_hf_pretrained(model, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                  assets_from=assets if tokenizer_kept else None)
        steps.update(1)
    print(f"wrote {args.out}: {base} with the adapters of {directory} merged in")


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from bridge_convert.runtime.warnings_filter import silence_known_warnings

    silence_known_warnings()  # megatron-core's known-harmless warnings, as bridge-convert's and bridge-run's CLIs
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        from bridge_convert.runtime import initialize_parallel

        initialize_parallel()
        {"export-adapter": _export_adapter, "merge": _merge}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, KeyError) as exc:
        if args.debug:
            raise
        print(f"bridge-peft {args.command}: error: {str(exc).strip() or type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
