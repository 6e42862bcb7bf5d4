"""``bridge-run``: list, show and run the recipes.

    bridge-run list
    bridge-run show llama3_8b_lora peft.dim=4
    bridge-run llama32_1b_pretrain train.train_iters=100 --dry-run
    torchrun --nproc-per-node 2 $(which bridge-run) llama3_8b_pretrain train.global_batch_size=16
    python -m bridge_recipes.run llama32_1b_sft --hf-path /models/Llama-3.2-1B

Overrides use bridge-train's grammar (``section.field=value``, YAML values, ``--config file.yaml`` merged first);
``peft=lora`` / ``peft=dora`` picks the PEFT method (keeping the recipe's adapter settings) before the other
overrides apply (``peft: lora`` at the top of a ``--config`` file likewise). Bad input is reported in one line on
stderr (exit status 2) before anything is built or written; a failure while training is one line too (exit status
1; ``BRIDGE_RUN_TRACEBACK=1`` shows the traceback); a run an exit signal stopped (after saving) exits with 128 + the
signal number (143 for SIGTERM, 130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["UsageError", "build_config", "config_yaml", "main", "run_recipe"]

USAGE_ERROR = 2
RUN_ERROR = 1


class UsageError(Exception):
    """Bad input: a one-line message for the user."""


_training = False
"""Set once training starts: a failure before that is bad input (exit 2), after it a run failure (exit 1)."""


def _recipe_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"bridge-run {command}".strip(), description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe name, <model>_<task> (see `bridge-run list`)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.train_iters=10 optimizer.lr=1e-4 peft=dora")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML file (whole or partial config) merged before the overrides; repeatable")
    parser.add_argument("--hf-path", metavar="DIR",
                        help="local HF checkpoint of the recipe's model: its weights are trained (pretrain) or "
                             "fine-tuned (sft, lora, dora)")
    parser.add_argument("--dir", metavar="DIR",
                        help="run directory for checkpoints (resumed from) and TensorBoard logs; default: none")
    parser.add_argument("--allow-random-init", action="store_true",
                        help="sft / lora / dora: fine-tune random weights (benchmarks); otherwise a pretrained "
                             "checkpoint is required")
    parser.add_argument("--data-path", action="append", default=None, metavar="PATH",
                        help="pretrain: an indexed dataset prefix (`bridge-data preprocess` output; repeat for "
                             "several); sft / lora / dora: one JSONL / Parquet file or HF datasets directory of chat "
                             "or SQuAD rows; default: the recipe's mock data")
    parser.add_argument("--data-format", choices=("chat", "squad"), default=None,
                        help="sft / lora / dora with --data-path: chat rows rendered with the tokenizer's chat "
                             "template (default), or SQuAD-style context / question / answers rows")
    parser.add_argument("--tokenizer-path", metavar="DIR",
                        help="HF tokenizer directory for --data-path (default: --hf-path's)")
    return parser


def _check_weights(recipe, cfg, allow_random_init: bool) -> None:
    """A fine-tuning run needs weights: a pretrained checkpoint, or a checkpoint of this run to resume."""
    if not recipe.is_finetune or allow_random_init or cfg.checkpoint.pretrained_checkpoint:
        return
    from bridge_train.checkpointing import find_resume_checkpoint

    if cfg.checkpoint.load and find_resume_checkpoint(cfg.checkpoint.load) is None:
        raise UsageError(f"{recipe.name} fine-tunes pretrained weights, but checkpoint.pretrained_checkpoint is not "
                         f"set and checkpoint.load ({cfg.checkpoint.load}) holds no checkpoint to resume; pass "
                         "--hf-path DIR (or checkpoint.pretrained_checkpoint=DIR), or --allow-random-init for a "
                         "benchmark with random weights")


def _run_parser() -> argparse.ArgumentParser:
    parser = _recipe_parser("", "Run a recipe (or check it with --dry-run). Launch with torchrun for several "
                                "processes: torchrun --nproc-per-node N $(which bridge-run) RECIPE ...")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and print what would run, without building the model")
    parser.add_argument("--launcher", choices=("direct", "nemo-run"), default="direct",
                        help="direct: train in this process (under torchrun, in each); nemo-run: hand the same "
                             "command to NeMo-Run's local executor with torchrun (needs the nemo-run package)")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="with --launcher nemo-run: processes to start (default: the recipe's TP x PP x CP)")
    return parser


def _list(argv: Sequence[str]) -> int:
    from .registry import RECIPES

    parser = argparse.ArgumentParser(prog="bridge-run list", description="List every recipe with a one-line "
                                                                         "description.")
    parser.parse_args(argv)
    width = max(len(name) for name in RECIPES)
    for recipe in RECIPES.values():
        print(f"{recipe.name:<{width}}  {recipe.description}")
    return 0


def build_config(recipe_name: str, overrides: Sequence[str] = (), *, config_files: Sequence[str] = (),
                 hf_path: str | None = None, dir: str | None = None, allow_random_init: bool = False,
                 data_paths: Sequence[str] | None = None, data_format: str | None = None,
                 tokenizer_path: str | None = None):
    """The recipe's config with ``--config`` files and overrides applied (what ``bridge-run`` trains).

    Returns:
        ``(recipe, cfg)``.

    Raises:
        UsageError: for an unknown recipe or an option that does not apply to it.
        bridge_train.ConfigError: for bad overrides (every one named).
    """
    from bridge_train.config import apply_overrides

    from .peft_methods import PEFT_METHODS
    from .registry import get_recipe

    try:
        recipe = get_recipe(recipe_name)
    except KeyError as err:
        raise UsageError(err.args[0]) from None
    kwargs: dict[str, Any] = {"hf_path": hf_path, "dir": dir}
    rest = []
    # `peft: lora` in a --config file picks the method as the override does (the recipe's adapter settings)
    named = [(f"file {path!r}", name) for path in config_files if (name := _peft_name_in(path)) is not None]
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and key.strip().lstrip("+") == "peft" and value.strip().lower() in PEFT_METHODS:
            named.append((f"override {text!r}", value))
        else:
            rest.append(text)
    for source, name in named:
        if not recipe.is_finetune:
            raise UsageError(f"{source}: {recipe.name} pretrains; PEFT applies to the fine-tuning recipes "
                             f"({recipe.spec.name}_lora, {recipe.spec.name}_dora)")
        kwargs["peft"] = name.strip().lower()
    if recipe.is_finetune:
        kwargs["allow_random_init"] = allow_random_init
    elif allow_random_init:
        raise UsageError(f"--allow-random-init applies to the sft / lora / dora recipes; {recipe.name} starts "
                         "from random weights unless --hf-path is given")
    if "peft" in kwargs and recipe.task == "sft":  # canonical LoRA takes the LoRA recipe's settings
        recipe = get_recipe(f"{recipe.spec.name}_{'lora' if kwargs['peft'] == 'canonical_lora' else kwargs['peft']}")
    kwargs.update(_data_kwargs(recipe, data_paths, data_format, tokenizer_path))
    try:
        cfg = recipe.build(**kwargs)
    except ValueError as err:  # e.g. SFT data without a tokenizer
        raise UsageError(f"{recipe.name}: {err}") from None
    # copies: a file naming the same class edits these objects in place
    data = (copy.copy(cfg.dataset) if data_paths else None,
            copy.copy(cfg.tokenizer) if data_paths or tokenizer_path else None)
    # What the flags set wins over --config files (a file written by `bridge-run show` or a run's run_config.yaml
    # names these keys too, as null) and yields to key=value overrides, which apply last.
    flagged = {"checkpoint": ["save", "load"] if dir is not None else [],
               "logger": ["tensorboard_dir"] if dir is not None else []}
    if recipe.is_finetune:  # --allow-random-init sets checkpoint.finetune=false; without it a file's value stands
        flagged["checkpoint"] += (["finetune"] if allow_random_init else []) + (
            ["pretrained_checkpoint"] if hf_path is not None else [])
    interval = cfg.checkpoint.save_interval
    values = {(section, name): getattr(getattr(cfg, section), name)
              for section, names in flagged.items() for name in names}
    if config_files:
        recipe_peft = cfg.peft
        apply_overrides(cfg, [], config_files=list(config_files))
        for (section, name), value in values.items():
            setattr(getattr(cfg, section), name, value)
        if named and named[-1][0].startswith("override"):  # `peft=NAME` wins over what the files set
            cfg.peft = recipe_peft
        if dir is not None and cfg.checkpoint.save_interval is None:  # the file gave no interval: the recipe's
            cfg.checkpoint.save_interval = interval
        _restore_data(cfg, *data)
    apply_overrides(cfg, rest)
    if cfg.peft is not None and not recipe.is_finetune:  # e.g. a PEFT mapping in a --config file
        raise UsageError(f"{recipe.name} pretrains, but the config sets peft ({type(cfg.peft).__name__}); PEFT "
                         f"applies to the fine-tuning recipes ({recipe.spec.name}_lora, {recipe.spec.name}_dora)")
    return recipe, cfg


def _peft_name_in(path: str) -> str | None:
    """The PEFT method a --config file names at its top level (``peft: lora``), if any (a file that does not
    parse is reported when it is applied)."""
    import yaml

    from .peft_methods import PEFT_METHODS

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    name = data.get("peft") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name.strip().lower() in PEFT_METHODS else None


_DATA_FIELDS = ("paths", "mock", "path", "schema", "use_chat_template")


def _data_kwargs(recipe, data_paths, data_format, tokenizer_path) -> dict[str, Any]:
    """The recipe function's data arguments for the --data-path / --data-format / --tokenizer-path flags."""
    if data_format is not None and not (recipe.is_finetune and data_paths):
        raise UsageError("--data-format applies to the sft / lora / dora recipes with --data-path")
    out: dict[str, Any] = {"tokenizer_path": tokenizer_path} if tokenizer_path else {}
    if not data_paths:
        return out
    if not recipe.is_finetune:
        return {**out, "data_paths": list(data_paths)}
    if len(data_paths) != 1:
        raise UsageError(f"{recipe.name} fine-tunes on one --data-path (a file or HF datasets directory), got "
                         f"{len(data_paths)}")
    return {**out, "data_path": data_paths[0], "data_format": data_format or "chat"}


def _restore_data(cfg, dataset, tokenizer) -> None:
    """The data the flags chose (None: not chosen by a flag), over what --config files set: the flags' dataset when
    a file changed its kind (the mock data of a `bridge-run show` file), else its path fields; the tokenizer
    likewise."""
    if dataset is not None and type(cfg.dataset) is not type(dataset):
        cfg.dataset = dataset
    elif dataset is not None:
        for name in _DATA_FIELDS:
            if hasattr(dataset, name):
                setattr(cfg.dataset, name, getattr(dataset, name))
    if tokenizer is not None:
        if type(cfg.tokenizer) is not type(tokenizer):
            cfg.tokenizer = tokenizer
        else:
            cfg.tokenizer.tokenizer_type, cfg.tokenizer.path = tokenizer.tokenizer_type, tokenizer.path


def _config_from_args(args: argparse.Namespace):
    return build_config(args.recipe, args.overrides, config_files=args.config, hf_path=args.hf_path, dir=args.dir,
                        allow_random_init=args.allow_random_init, data_paths=args.data_path,
                        data_format=args.data_format, tokenizer_path=args.tokenizer_path)


def config_yaml(cfg) -> str:
    """The resolved config as YAML (a dataclass PEFT method field by field); values without a YAML form are left
    out without a warning."""
    from bridge_train.config import ConfigWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return cfg.to_yaml()


def _show(argv: Sequence[str]) -> int:
    parser = _recipe_parser("show", "Print a recipe's resolved config as YAML (overrides applied; not validated, "
                                    "nothing built).")
    args = parser.parse_intermixed_args(argv)
    _, cfg = _config_from_args(args)
    print(config_yaml(cfg), end="")
    return 0


def _world_size() -> tuple[int, bool]:
    """(processes of this launch, whether a launcher such as torchrun set it)."""
    value = os.environ.get("WORLD_SIZE")
    return (int(value), True) if value else (1, False)


def _check_layout(recipe, cfg, world_size: int, launched: bool, dry_run: bool) -> int:
    """The world size to validate with; raises UsageError when the layout does not fit this launch."""
    from .dry_run import torchrun_command

    model = cfg.model
    need = model.tensor_model_parallel_size * model.pipeline_model_parallel_size * model.context_parallel_size
    if world_size % need == 0:
        return world_size
    if dry_run and not launched:
        return need  # a dry run on one machine checks the layout at its smallest size
    raise UsageError(
        f"{recipe.name} needs a multiple of {need} processes (TP {model.tensor_model_parallel_size} x PP "
        f"{model.pipeline_model_parallel_size} x CP {model.context_parallel_size}), this launch has {world_size}; "
        f"run {torchrun_command(need, recipe.name)}, or lower "
        "model.tensor_model_parallel_size / pipeline_model_parallel_size / context_parallel_size")


def run_recipe(argv: Sequence[str]) -> list[float] | None:
    """What ``bridge-run RECIPE [options] [key=value ...]`` does, without the error handling of :func:`main`.

    Returns:
        The loss of every iteration trained (on every rank), or None for ``--dry-run`` and the NeMo-Run launcher.

    Raises:
        UsageError / bridge_train.ConfigError: for bad input, before anything is built.
    """
    args = _run_parser().parse_intermixed_args(argv)
    if args.launcher == "direct" and args.nproc_per_node is not None:
        raise UsageError("--nproc-per-node is for --launcher nemo-run; with the direct launcher start the "
                         "processes with torchrun --nproc-per-node N $(which bridge-run) ...")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    recipe, cfg = _config_from_args(args)
    world_size, launched = _world_size()
    if args.launcher == "nemo-run":
        world_size, launched = args.nproc_per_node or cfg.model.tensor_model_parallel_size * \
            cfg.model.pipeline_model_parallel_size * cfg.model.context_parallel_size, True
    world_size = _check_layout(recipe, cfg, world_size, launched, args.dry_run)
    _check_weights(recipe, cfg, args.allow_random_init)
    from bridge_train.setup import build_run_tokenizer

    try:  # its files and its size against model.vocab_size, as the run's setup reads them
        build_run_tokenizer(cfg)
    except (ValueError, OSError) as err:
        raise UsageError(f"tokenizer: {_one_line(err)}") from None
    try:
        cfg.validate(world_size=world_size)
    except ValueError as err:
        problems = getattr(err, "problems", None) or [str(err)]
        if recipe.is_finetune and any("checkpoint.finetune is true" in p for p in problems):
            problems = [p + " (--hf-path DIR sets it; --allow-random-init trains random weights, for benchmarks)"
                        if "checkpoint.finetune is true" in p else p for p in problems]
        raise UsageError("; ".join(problems)) from None
    _check_peft_targets(cfg)
    if args.dry_run:
        from .dry_run import describe

        print(describe(recipe, cfg, world_size, launched))
        return None
    if args.launcher == "nemo-run":
        from .nemo_run_launcher import launch

        launch(recipe.name, _forwarded_args(argv), nproc_per_node=world_size)
        return None
    return _train(recipe, cfg)


def _check_peft_targets(cfg) -> None:
    """A PEFT target that names no linear layer of the model, found by name (the model is not built): the run
    would fail at setup after making its run directory."""
    check = getattr(cfg.peft, "check_target_names", None)
    if check is None:
        return
    from bridge_peft.matching import linear_layer_names

    try:
        check(linear_layer_names(cfg.model))
    except ValueError as err:
        raise UsageError(f"peft: {_one_line(err)}") from None


def _forwarded_args(argv: Sequence[str]) -> list[str]:
    """``argv`` minus the launcher options (what each torchrun process gets)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--launcher", "--nproc-per-node"):
            skip = True
            continue
        if arg.startswith(("--launcher=", "--nproc-per-node=")):
            continue
        out.append(arg)
    return out


def _train(recipe, cfg) -> list[float]:
    global _training
    from bridge_train import finetune, gpt_forward_step, pretrain

    if cfg.checkpoint.save:  # a --dir that cannot be written is bad input, not a failure of the run
        from bridge_train.checkpointing import check_save_dir_writable

        check_save_dir_writable(cfg.checkpoint.save)
    _training = True
    entry = finetune if recipe.is_finetune else pretrain
    losses = entry(cfg, gpt_forward_step)
    if losses and os.environ.get("RANK", "0") == "0":
        print(f"{recipe.name}: trained {len(losses)} iterations, loss {losses[0]:.4f} -> {losses[-1]:.4f}",
              flush=True)
    return losses


def _signal_status(result) -> int | None:
    """128 + the signal number when an exit signal stopped the run (it saved first), as shells report a signal
    death: a scheduler can tell a preempted run from a finished one. None otherwise."""
    import signal

    reason = getattr(result, "exit_reason", None)
    if reason not in signal.Signals.__members__:
        return None
    if os.environ.get("RANK", "0") == "0":
        print(f"bridge-run: stopped by {reason}; resume with the same command", file=sys.stderr, flush=True)
    return 128 + signal.Signals[reason].value


def _one_line(err: BaseException) -> str:
    problems = getattr(err, "problems", None)
    if problems:
        return "; ".join(problems)
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())


def _report(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
        print(f"bridge-run: error: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bridge-run`` and ``python -m bridge_recipes.run``; returns the exit status."""
    global _training
    _training = False
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands: list | show RECIPE [key=value ...] | RECIPE [key=value ...]; "
              "each takes --help")
        return 0 if argv else USAGE_ERROR
    command, rest = argv[0], argv[1:]
    if command.startswith("-"):  # argparse would say "the following arguments are required: recipe"
        _report(f"unknown option {command!r}; usage: bridge-run list | show RECIPE [key=value ...] | RECIPE "
                "[options] [key=value ...] (bridge-run --help)")
        return USAGE_ERROR
    try:
        if command == "list":
            return _list(rest)
        if command not in ("-h", "--help") and "--help" not in rest and "-h" not in rest:
            from bridge_convert.runtime import silence_known_warnings

            silence_known_warnings()
        if command == "show":
            return _show(rest)
        return _signal_status(run_recipe(argv)) or 0
    except SystemExit as exit_:  # argparse: --help (0) or a usage error it has already printed (2)
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        _report("interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one line; the traceback on request
        if os.environ.get("BRIDGE_RUN_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off"):
            raise
        usage = not _training
        rank = os.environ.get("RANK")
        prefix = "" if usage or rank in (None, "0") else f"[rank {rank}] "
        message = _one_line(err) if usage else f"{type(err).__name__}: {_one_line(err)}"
        if usage:
            _report(message)
        else:
            print(f"bridge-run: error: {prefix}{message} (BRIDGE_RUN_TRACEBACK=1 shows the traceback)",
                  file=sys.stderr, flush=True)
        return USAGE_ERROR if usage else RUN_ERROR


if __name__ == "__main__":
    sys.exit(main())
