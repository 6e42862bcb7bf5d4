"""bridge-run: list, show, --help, --dry-run, the NeMo-Run launcher's wiring, and one-line errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import yaml

from bridge_recipes.registry import RECIPES
from bridge_recipes.run import main


@pytest.fixture(autouse=True)
def _single_process_and_no_training(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "BRIDGE_RUN_TRACEBACK"):
        monkeypatch.delenv(name, raising=False)

    def refuse(recipe, cfg):
        raise AssertionError(f"{recipe.name} started training in a test that must stop before")

    monkeypatch.setattr("bridge_recipes.run._train", refuse)


def _bridge_run() -> str:
    return os.path.join(os.path.dirname(sys.executable), "bridge-run")


def test_list_shows_all_28_recipes_one_per_line():
    out = subprocess.run([_bridge_run(), "list"], capture_output=True, text=True, check=True, timeout=120).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 28 == len(RECIPES)
    names = [line.split()[0] for line in lines]
    models = ["llama32_1b", "llama32_3b", "llama3_8b", "llama3_70b", "llama31_8b", "llama31_70b", "llama31_405b"]
    assert names == [f"{m}_{t}" for m in models for t in ("pretrain", "sft", "lora", "dora")]
    by_name = dict(zip(names, lines))
    assert "LoRA (dim 8, alpha 16, all linear layers) of Meta-Llama-3-8B" in by_name["llama3_8b_lora"]
    assert "TP4 PP4 VP5 CP2 SP, 32 processes per replica" in by_name["llama3_70b_pretrain"]
    assert "seq 2048, global batch 32" in by_name["llama31_405b_dora"]


def test_help_everywhere(capsys):
    for argv in (["--help"], ["list", "--help"], ["show", "--help"], ["llama32_1b_pretrain", "--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "usage" in out.lower() or "commands:" in out
    assert "--dry-run" in (main(["llama32_1b_pretrain", "--help"]), capsys.readouterr().out)[1]
    out = subprocess.run([sys.executable, "-m", "bridge_recipes.run", "--help"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "bridge-run list" in out and "torchrun --nproc-per-node 2" in out


def test_show_prints_the_resolved_yaml(capsys):
    assert main(["show", "llama32_1b_pretrain", "train.train_iters=7", "optimizer.lr=1e-3"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["train"]["train_iters"] == 7 and data["optimizer"]["lr"] == 1e-3
    assert data["model"]["num_layers"] == 16 and data["model"]["share_embeddings_and_output_weights"] is True
    assert data["dataset"]["seq_length"] == 8192 and data["mixed_precision"] == "bf16_mixed"


def test_show_llama3_8b_lora_with_peft_dim_override(capsys):
    assert main(["show", "llama3_8b_lora", "peft.dim=4"]) == 0
    peft = yaml.safe_load(capsys.readouterr().out)["peft"]
    assert peft["_target_"].endswith(".LoRA") and peft["dim"] == 4 and peft["alpha"] == 16
    assert peft["target_modules"] == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert main(["show", "llama3_8b_lora", "peft=dora"]) == 0
    peft = yaml.safe_load(capsys.readouterr().out)["peft"]
    assert peft["_target_"].endswith(".DoRA") and (peft["dim"], peft["alpha"]) == (8, 16)


def test_dry_run_validates_and_prints_without_building(capsys, monkeypatch, tmp_path):
    from bridge_convert.provider import GPTModelProvider

    def refuse(self, *args, **kwargs):
        raise AssertionError("--dry-run built a model")

    monkeypatch.setattr(GPTModelProvider, "provide", refuse)
    assert main(["llama3_70b_pretrain", "--dry-run", "--dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    # 32 processes are four nodes of 8 GPUs
    assert ("needs a multiple of 32 processes: torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d "
            "--rdzv-endpoint HOST:PORT $(which bridge-run) llama3_70b_pretrain ... (on each of the 4 nodes)") in out
    assert "80 layers, hidden 8192, 64 heads (8 KV groups), FFN 28672, vocab 128256, 70.55B parameters" in out
    assert "TP 4, PP 4, VP 5, CP 2, SP on" in out and "pretrain(cfg, gpt_forward_step)" in out
    assert not (tmp_path / "run").exists()
    assert main(["llama32_1b_sft", "--dry-run", "--allow-random-init"]) == 0
    out = capsys.readouterr().out
    assert "1.24B parameters" in out and "mock SFT conversations (packed), seq 4096" in out
    assert "finetune(cfg, gpt_forward_step)" in out and "random initialisation (allow_random_init)" in out


BAD_INPUT = {
    "unknown recipe": (["llama32_1b_pretrian"],
                       "unknown recipe 'llama32_1b_pretrian'; did you mean llama32_1b_pretrain"),
    "unknown model": (["llama33_1b"], "did you mean llama32_1b_pretrain, llama32_1b_sft"),
    "misspelled key": (["llama32_1b_pretrain", "train.train_iter=5"], "did you mean 'train.train_iters'"),
    "wrong type": (["llama32_1b_pretrain", "train.train_iters=ten"], "train.train_iters"),
    "layout does not fit": (["llama3_8b_pretrain"],
                            "llama3_8b_pretrain needs a multiple of 2 processes (TP 1 x PP 1 x CP 2), this launch "
                            "has 1; run torchrun --nproc-per-node 2"),
    "no pretrained weights": (["llama32_1b_sft"], "llama32_1b_sft fine-tunes pretrained weights, but "
                              "checkpoint.pretrained_checkpoint is not set and checkpoint.load"),
    "random init on pretrain": (["llama32_1b_pretrain", "--allow-random-init"], "--allow-random-init applies"),
    "peft on pretrain": (["llama32_1b_pretrain", "peft=lora"], "PEFT applies to the fine-tuning recipes"),
    "missing config file": (["llama32_1b_pretrain", "--config", "/nonexistent/run.yaml"], "does not exist"),
    "nproc without nemo-run": (["llama32_1b_pretrain", "--nproc-per-node", "2"], "--nproc-per-node is for"),
    "invalid PEFT setting": (["llama32_1b_lora", "--allow-random-init", "peft.dropout=1.5"],
                             "peft: LoRA.dropout must be a number in [0, 1), got 1.5"),
    "PEFT target that names no layer": (["llama32_1b_lora", "--allow-random-init", "peft.target_modules=[q_proj]"],
                                        "peft: LoRA.target_modules ['q_proj'] match no linear layer of the model"),
    "unknown option first": (["--bogus"], "unknown option '--bogus'; usage: bridge-run list"),
    "layout left by the recipe": (["llama31_405b_pretrain", "model.num_layers=2", "--dry-run"],
                                  "places 126 decoder layers but num_layers is 2; set pipeline_model_parallel_layout "
                                  "to None (null)"),
    "invalid value": (["llama32_1b_pretrain", "train.global_batch_size=3", "train.micro_batch_size=2"],
                      "train.global_batch_size (3) must be divisible by train.micro_batch_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_nonzero_and_writes_nothing(case, capsys, tmp_path):
    argv, expected = BAD_INPUT[case]
    run_dir = tmp_path / "run"
    argv = [*argv, "--dir", str(run_dir)] if argv[0] not in ("show",) else argv
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bridge-run: error: "), captured.err
    assert expected in lines[0] and "Traceback" not in captured.err + captured.out
    assert not run_dir.exists()


def test_traceback_switch_reads_false_values_as_off(capsys, monkeypatch):
    argv = ["llama32_1b_pretrain", "train.train_iters=ten"]
    for off in ("0", "false", "off"):
        monkeypatch.setenv("BRIDGE_RUN_TRACEBACK", off)
        assert main(argv) == 2 and "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("BRIDGE_RUN_TRACEBACK", "1")
    with pytest.raises(Exception, match="train.train_iters"):
        main(argv)


def test_finetuning_without_weights_or_run_dir(capsys):
    assert main(["llama32_3b_sft"]) == 2
    assert "point checkpoint.pretrained_checkpoint at the weights to fine-tune (--hf-path DIR sets it; " \
        "--allow-random-init" in capsys.readouterr().err


def test_bad_input_from_the_console_script_is_one_line(tmp_path):
    proc = subprocess.run([_bridge_run(), "llama3_8b_pretrain", "model.tensor_model_parallel_size=three",
                           "--dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bridge-run: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "model.tensor_model_parallel_size" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def _fake_nemo_run(calls: list):
    fake = types.ModuleType("nemo_run")

    class Script:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LocalExecutor:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    fake.Script, fake.LocalExecutor = Script, LocalExecutor
    fake.run = lambda task, **kwargs: calls.append((task.kwargs, kwargs["executor"].kwargs, kwargs))
    return fake


def test_nemo_run_launcher_wiring(monkeypatch, capsys):
    """Only the wiring: the real nemo-run package is not in the workspace lock (see the package README)."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "nemo_run", _fake_nemo_run(calls))
    argv = ["llama3_8b_pretrain", "--launcher", "nemo-run", "train.train_iters=3", "scheduler.lr_warmup_iters=1",
            "--dir", "/tmp/x"]
    assert main(argv) == 0, capsys.readouterr().err
    (script, executor, kwargs), = calls
    assert script == {"path": _bridge_run(), "args": ["llama3_8b_pretrain", "train.train_iters=3",
                                                      "scheduler.lr_warmup_iters=1", "--dir", "/tmp/x"],
                      "entrypoint": "python"}
    assert executor == {"ntasks_per_node": 2, "launcher": "torchrun"}  # the recipe's CP 2
    assert kwargs["name"] == "llama3_8b_pretrain" and kwargs["detach"] is False
    assert main(["llama32_1b_pretrain", "--launcher=nemo-run", "--nproc-per-node", "3", "train.global_batch_size=5"]) == 2
    assert "train.global_batch_size (5) must be divisible by train.micro_batch_size x data-parallel size (1 x 3)" in \
        capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "nemo_run", None)
    assert main(["llama32_1b_pretrain", "--launcher", "nemo-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the nemo-run package" in err


def test_flags_win_over_a_shown_config_file_and_overrides_win_over_flags(capsys, tmp_path):
    """`bridge-run show` writes checkpoint.save / pretrained_checkpoint / finetune too (null / true): fed back as
    --config, it must not undo --dir, --hf-path or --allow-random-init; key=value overrides still apply last."""
    import json

    from bridge_recipes.llama import hf_config
    from bridge_recipes.run import build_config

    hf = tmp_path / "llama3-8b"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config("Meta-Llama-3-8B")))
    for name in ("llama3_8b_lora", "llama32_1b_pretrain"):
        assert main(["show", name]) == 0
        (tmp_path / f"{name}.yaml").write_text(capsys.readouterr().out)
    files = [str(tmp_path / "llama3_8b_lora.yaml")]
    _, cfg = build_config("llama3_8b_lora", config_files=files, hf_path=str(hf), dir=str(tmp_path / "run"))
    assert cfg.checkpoint.pretrained_checkpoint == str(hf) and cfg.checkpoint.finetune is True
    assert cfg.checkpoint.save == cfg.checkpoint.load == str(tmp_path / "run" / "checkpoints")
    assert cfg.checkpoint.save_interval == 100 and cfg.logger.tensorboard_dir == str(tmp_path / "run" / "tensorboard")
    _, cfg = build_config("llama3_8b_lora", config_files=files, allow_random_init=True)
    assert cfg.checkpoint.finetune is False and cfg.checkpoint.pretrained_checkpoint is None
    # without the flag, a file's checkpoint.finetune stands (recipe < files < flags); it was reset to the recipe's
    (tmp_path / "no-weights.yaml").write_text("checkpoint:\n  finetune: false\n")
    _, cfg = build_config("llama3_8b_lora", config_files=[str(tmp_path / "no-weights.yaml")])
    assert cfg.checkpoint.finetune is False
    _, cfg = build_config("llama32_1b_pretrain", ["checkpoint.save=/elsewhere", "checkpoint.save_interval=7"],
                          config_files=[str(tmp_path / "llama32_1b_pretrain.yaml")], dir=str(tmp_path / "run"))
    assert cfg.checkpoint.save == "/elsewhere" and cfg.checkpoint.save_interval == 7
    assert cfg.checkpoint.load == str(tmp_path / "run" / "checkpoints")


def test_data_flags_pick_real_data_and_win_over_a_shown_config_file(capsys, tmp_path):
    from bridge_data import SFTDataConfig
    from bridge_data.testing import make_texts, save_tiny_tokenizer, write_jsonl
    from bridge_recipes.run import build_config

    tok = save_tiny_tokenizer(tmp_path / "tok")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": t},
                                                               {"role": "assistant", "content": "ok"}]}
                                                 for t in make_texts(8)])
    assert main(["show", "llama32_1b_sft"]) == 0
    (tmp_path / "sft.yaml").write_text(capsys.readouterr().out)  # mock SFT data, no tokenizer
    flags = dict(data_paths=[chat], tokenizer_path=tok, allow_random_init=True)
    for files in ([], [str(tmp_path / "sft.yaml")]):
        _, cfg = build_config("llama32_1b_sft", config_files=files, **flags)
        assert isinstance(cfg.dataset, SFTDataConfig) and cfg.dataset.path == chat, files
        assert cfg.tokenizer.path == tok and cfg.dataset.schema == "auto"
    _, cfg = build_config("llama32_1b_lora", ["dataset.packed=false"], config_files=[str(tmp_path / "sft.yaml")],
                          data_format="squad", **flags)
    assert (cfg.dataset.schema, cfg.dataset.use_chat_template, cfg.dataset.packed) == ("squad", False, False)
    (tmp_path / "data.yaml").write_text(f"dataset:\n  paths: [{tmp_path / 'corpus'}]\n")
    _, cfg = build_config("llama32_1b_pretrain", config_files=[str(tmp_path / "data.yaml")], tokenizer_path=tok)
    assert cfg.dataset.paths == [str(tmp_path / "corpus")] and cfg.tokenizer.path == tok  # no --data-path: the file's
    (tmp_path / "other.yaml").write_text(f"dataset:\n  path: {tmp_path / 'other.jsonl'}\ntokenizer:\n  path: /elsewhere\n")
    _, cfg = build_config("llama32_1b_sft", config_files=[str(tmp_path / "other.yaml")], **flags)
    assert cfg.dataset.path == chat and cfg.tokenizer.path == tok  # same classes, edited in place by the file
    assert main(["llama32_1b_sft", "--dry-run", "--allow-random-init", "--data-path", chat, "dataset.packed=false",
                 "--tokenizer-path", tok]) == 0  # an override after --data-path stays an override
    assert f"SFT rows from {chat} (schema auto, unpacked), seq 4096" in capsys.readouterr().out
    bad = {("llama32_1b_pretrain", "--data-format", "chat"): "--data-format applies to the sft / lora / dora",
           ("llama32_1b_sft", "--allow-random-init", "--data-path", chat, "--data-path", chat):
               "fine-tunes on one --data-path",
           ("llama32_1b_sft", "--allow-random-init", "--data-path", chat): "needs a tokenizer: pass hf_path= or "
                                                                        "tokenizer_path= (bridge-run: --hf-path",
           ("llama32_1b_pretrain", "--data-path", str(tmp_path / "absent")): "missing ['" + str(tmp_path / "absent"),
           ("llama32_1b_sft", "--allow-random-init", "--data-path", str(tmp_path / "absent.jsonl"), "--tokenizer-path",
            tok): "SFT data path '" + str(tmp_path / "absent.jsonl") + "' does not exist",
           ("llama32_1b_sft", "--allow-random-init", "--data-path", chat, "--tokenizer-path", str(tmp_path / "no-tok")):
               "tokenizer: Tokenizer directory '" + str(tmp_path / "no-tok") + "' does not exist"}
    for argv, expected in bad.items():
        assert main([*argv, "--dry-run"]) == 2, argv
        assert expected in capsys.readouterr().err, argv
    _, cfg = build_config("llama32_1b_sft", tokenizer_path=tok, allow_random_init=True)  # the mock data's ids
    assert type(cfg.dataset).__name__ == "MockSFTDataConfig" and cfg.tokenizer.path == tok  # (it was dropped)
    from bridge_recipes.llama import llama32_1b

    with pytest.raises(ValueError, match="data_format='squad' applies to data_path, which is not set"):
        llama32_1b.peft_config(data_format="squad", allow_random_init=True)  # (it gave mock data)


def test_peft_named_in_a_config_file_is_the_peft_override(capsys, tmp_path):
    """`peft: lora` in a --config file gave LoRA's defaults (dim 32) and the SFT learning rate, while the override
    picks the LoRA recipe (dim 8, lr 1e-4); on a pretraining recipe it passed the dry run and failed at setup."""
    (tmp_path / "peft.yaml").write_text("peft: lora\n")
    (tmp_path / "mapping.yaml").write_text("peft: {_target_: bridge_peft.LoRA, dim: 4}\n")
    assert main(["show", "llama3_8b_sft", "peft=lora"]) == 0
    by_override = capsys.readouterr().out
    assert main(["show", "llama3_8b_sft", "--config", str(tmp_path / "peft.yaml")]) == 0
    assert capsys.readouterr().out == by_override
    assert "dim: 8" in by_override
    assert main(["show", "llama3_8b_sft", "peft=dora"]) == 0  # an override wins over the files
    dora = capsys.readouterr().out
    assert main(["show", "llama3_8b_sft", "--config", str(tmp_path / "peft.yaml"), "peft=dora"]) == 0
    assert capsys.readouterr().out == dora and "bridge_peft.lora.DoRA" in dora
    for name in ("peft.yaml", "mapping.yaml"):
        assert main(["llama32_1b_pretrain", "--config", str(tmp_path / name), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "llama32_1b_pretrain pretrains" in err and "PEFT applies to the fine-tuning recipes" in err


def test_a_tokenizer_larger_than_the_vocabulary_is_bad_input_in_the_dry_run(capsys, tmp_path):
    """The check ran only at setup, after the dry run had passed (and as a failure of the run)."""
    from recipe_helpers import TINY_VOCAB, shrink

    from bridge_data.testing import save_tiny_tokenizer

    tokenizer = save_tiny_tokenizer(tmp_path / "tok", vocab_size=TINY_VOCAB + 64)
    assert main(["llama32_1b_pretrain", *shrink("llama32_1b_pretrain"), "--tokenizer-path", tokenizer,
                 "--dry-run"]) == 2
    assert (f"tokenizer: the tokenizer has {TINY_VOCAB + 64} tokens but model.vocab_size is {TINY_VOCAB}"
            in capsys.readouterr().err)


@pytest.mark.parametrize("name", ["llama32_1b_sft", "llama32_1b_lora", "llama31_405b_lora"])
def test_canonical_lora_adapts_the_recipes_layers_projection_by_projection(name, capsys):
    """`peft=canonical_lora` handed the fused names (linear_qkv) to CanonicalLoRA, which match no layer (the run
    failed at setup); on an _sft recipe it was `unknown recipe ..._canonical_lora`."""
    from recipe_helpers import shrink

    from bridge_peft import CanonicalLoRA, LoRA
    from bridge_peft.matching import linear_layer_names
    from bridge_recipes.run import build_config

    _, lora_cfg = build_config(name.replace("_sft", "_lora"), shrink(name))
    recipe, cfg = build_config(name, ["peft=canonical_lora", *shrink(name)])
    assert recipe.task == "lora" and type(cfg.peft) is CanonicalLoRA and type(lora_cfg.peft) is LoRA
    assert (cfg.peft.dim, cfg.peft.alpha) == (lora_cfg.peft.dim, lora_cfg.peft.alpha)
    names = linear_layer_names(cfg.model)
    cfg.peft.check_target_names(names)
    for layer in names:
        fused = lora_cfg.peft.targets(layer, None)
        parts = {projection for _, projection in cfg.peft.targets(layer, None)}
        expected = set() if not fused else {"q", "k", "v"} if layer.endswith("linear_qkv") else \
            {"gate", "up"} if layer.endswith("linear_fc1") else {"all"}
        assert parts == expected, layer
    argv = [name, "peft=canonical_lora", "--allow-random-init", "--dry-run", *shrink(name)]
    assert main(argv) == 0 and "CanonicalLoRA(" in capsys.readouterr().out


def _readme_commands() -> list[list[str]]:
    """The README's bridge-run examples that need no files (models, data, a config) or launcher."""
    import pathlib
    import shlex

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("## `bridge-run`\n```bash\n", 1)[1].split("```", 1)[0]
    out = []
    for line in block.splitlines():
        args = shlex.split(line.split("#", 1)[0])
        if args[:1] == ["python"]:
            args = ["bridge-run", *args[3:]]  # python -m bridge_recipes.run ...
        if args[:1] == ["bridge-run"] and args[1] not in ("list", "show") and not any(
                a.startswith(("/models", "data/", "--launcher", "--hf-path", "--config")) for a in args):
            out.append(args[1:])
    return out


@pytest.mark.parametrize("args", _readme_commands(), ids=lambda a: " ".join(a))
def test_the_readmes_examples_pass_the_dry_run(args, capsys, tmp_path, monkeypatch):
    """Two of them failed the config check as written (a warmup longer than train.train_iters)."""
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--dry-run"]) == 0, capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_importing_bridge_recipes_registers_its_peft_methods():
    """bridge-train's error said importing bridge-recipes registers them; only building a recipe did."""
    code = ("import bridge_recipes, sys; from bridge_train.config import peft_method_names; "
            "print(sorted(peft_method_names())); print('bridge_peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["['canonical_lora', 'dora', 'lora']", "False"]  # bridge-peft is not imported for it
