"""bridge-train's finetune() with cfg.peft: frozen base, adapter-only optimizer / DDP / checkpoints, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bridge_convert.testing import save_tiny_hf_checkpoint

ITERS = 16
SCRIPT = '''
import sys, time
sys.path.insert(0, {tests!r})
from test_peft_finetune import make_config
from bridge_train import finetune
import bridge_train.loop as loop

def main():
    ckpt, marker = sys.argv[1], sys.argv[2]
    cfg = make_config({hf!r}, ckpt, train_iters={iters})
    real_step = loop.train_step
    def step(run, fs, iteration):
        if iteration >= 3:  # slow down from here on: the signal arrives long before the last iteration
            open(marker, "w").write("running")
            time.sleep(1.0)
        return real_step(run, fs, iteration)
    loop.train_step = step
    finetune(cfg)
    print("clean exit", flush=True)

if __name__ == "__main__":
    main()
'''


def make_data(root: Path) -> tuple[str, str]:
    """A tiny tokenizer and a chat JSONL whose answers a LoRA learns quickly: (tokenizer dir, data file)."""
    import random

    from bridge_data.testing import make_texts, save_tiny_tokenizer, write_jsonl

    rng = random.Random(0)
    rows = [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": rng.choice(["paris.", "twelve.", "the fox."])}]}
            for q in make_texts(64, seed=5, max_words=8)]
    return str(save_tiny_tokenizer(root / "tokenizer")), str(write_jsonl(root / "sft.jsonl", rows))


def make_config(hf_path: str, ckpt: str | None, *, train_iters: int, peft=None, **checkpoint):
    from bridge_convert import AutoBridge
    from bridge_data import SFTDataConfig, TokenizerConfig
    from bridge_peft import LoRA
    from bridge_train import (
        CheckpointConfig,
        ConfigContainer,
        LoggerConfig,
        OptimizerConfig,
        SchedulerConfig,
        TrainConfig,
    )

    provider = AutoBridge.from_hf_pretrained(hf_path).to_megatron_provider(load_weights=False)
    return ConfigContainer(
        model=provider,
        train=TrainConfig(train_iters=train_iters, micro_batch_size=2, global_batch_size=4),
        tokenizer=TokenizerConfig(tokenizer_type="hf", path=str(Path(hf_path) / "tokenizer")),
        dataset=SFTDataConfig(path=str(Path(hf_path) / "sft.jsonl"), seq_length=64, packed=True, split="90,10,0"),
        optimizer=OptimizerConfig(lr=1e-2, min_lr=1e-3, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=1),
        checkpoint=CheckpointConfig(save=ckpt, load=ckpt, pretrained_checkpoint=hf_path, **checkpoint),
        logger=LoggerConfig(log_interval=1, print_config=False, progress_bar=False),
        peft=peft if peft is not None else LoRA(dim=8, alpha=16),
    )


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> str:
    """A tiny HF Llama whose directory also holds the tokenizer and the chat data of these runs."""
    root = tmp_path_factory.mktemp("tiny")
    make_data(root)
    return save_tiny_hf_checkpoint(root, "llama", vocab_size=320, seed=4)


def _base_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model[0].module.named_parameters()
            if not getattr(p, "bridge_adapter", False)}


def test_lora_finetune_trains_adapters_only(tiny_hf, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from bridge_convert import AutoBridge
    from bridge_train import gpt_forward_step
    from bridge_train.loop import train
    from bridge_train.setup import setup_run

    run = setup_run(make_config(tiny_hf, str(tmp_path / "ckpt"), train_iters=15), finetune=True)
    adapter_ids = {id(p) for p in run.model[0].module.parameters() if getattr(p, "bridge_adapter", False)}
    optimized = [p for opt in run.optimizer.chained_optimizers for g in opt.optimizer.param_groups
                 for p in g["params"]]
    assert optimized and {id(p) for p in optimized} == adapter_ids  # no base parameter (nor a master copy)
    ddp_params = [p for buf in run.model[0].buffers for p in buf.params]
    assert {id(p) for p in ddp_params} == adapter_ids  # DDP's grad buffers hold adapters only
    before = _base_params(run.model)
    reference = AutoBridge.from_hf_pretrained(tiny_hf).to_megatron_model(load_weights=True)
    hf_base = {n: p for n, p in reference[0].named_parameters()}
    assert all(torch.equal(before[n], hf_base[n]) for n in before)  # the base is the pretrained checkpoint

    losses = train(run, gpt_forward_step)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    after = _base_params(run.model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)

    iteration = tmp_path / "ckpt" / "iter_0000015"
    keys = FileSystemReader(str(iteration)).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith(("decoder.", "embedding.", "output_layer."))]
    assert model_keys and not [k for k in model_keys if ".adapter." not in k], model_keys
    def nbytes(meta) -> int:
        return meta.size.numel() * torch.empty((), dtype=meta.properties.dtype).element_size()

    tensors = {k: nbytes(m) for k, m in keys.items() if hasattr(m, "properties")}
    adapter_bytes = sum(p.numel() * p.element_size() for p in optimized)
    assert sum(tensors[k] for k in model_keys) == adapter_bytes  # exactly the adapters, no base weight
    optimizer_bytes = sum(v for k, v in tensors.items() if k.startswith("optimizer"))
    assert 0 < optimizer_bytes <= 3 * adapter_bytes  # Adam moments (and fp32 copies) of the adapters only
    base_bytes = sum(t.numel() * t.element_size() for t in before.values())
    size = sum(f.stat().st_size for f in iteration.glob("*.distcp"))
    assert size < adapter_bytes + optimizer_bytes + 150_000 < base_bytes, (size, adapter_bytes, base_bytes)


def test_save_hf_of_a_lora_run_is_the_adapter_peft_loads(tiny_hf, tmp_path):
    """checkpoint.save_hf on a PEFT run writes the HF PEFT adapter (the model's own export would be the base
    weights alone): HF peft on the base model gives the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bridge_convert.forward import forward_logits
    from bridge_train import finetune

    result = finetune(make_config(tiny_hf, str(tmp_path / "ckpt"), train_iters=4, save_hf=True))
    adapter = tmp_path / "ckpt" / "iter_0000004" / "hf_adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (tmp_path / "ckpt" / "iter_0000004" / "hf").exists()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    ours = forward_logits([m.module for m in result.model], ids)[..., :320]
    base = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(ids).logits
        theirs = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
    assert (theirs - before).abs().max() > 1e-3  # the adapters trained
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def _data_parallel_losses(hf_path: str, overrides: list[str]) -> list[float]:
    from bridge_peft import LoRA
    from bridge_train import apply_overrides, finetune

    cfg = make_config(hf_path, None, train_iters=5, peft=LoRA(dim=8, alpha=16, target_modules=[
        "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"]))
    return list(finetune(apply_overrides(cfg, overrides)))


@pytest.mark.multiproc
def test_two_ranks_with_the_overlapped_param_gather_train_like_plain_ddp(tiny_hf):
    """The recipes' setting at DP=2: distributed optimizer with the parameter all-gather overlapped with the
    forward. Each step must see every adapter's and the lm_head's update: the adapters read their parameters
    through module calls, where megatron-core's DDP waits for the all-gather (they read stale shards before)."""
    from bridge_convert.testing import run_multiprocess

    overlap = ["optimizer.use_distributed_optimizer=true", "ddp.use_distributed_optimizer=true",
               "optimizer.overlap_param_gather=true", "ddp.overlap_param_gather=true"]
    plain = run_multiprocess(_data_parallel_losses, 2, tiny_hf, [])
    overlapped = run_multiprocess(_data_parallel_losses, 2, tiny_hf, overlap)
    assert plain[0][-1] < plain[0][0] - 0.2, plain[0]  # the adapters train
    for a, b in zip(plain, overlapped):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_sigterm_then_resume_continues_bitwise(tiny_hf, tmp_path):
    """A run stopped by SIGTERM saves; resuming (base from the pretrained checkpoint, adapters and optimizer
    from the adapter-only checkpoint) gives the uninterrupted run's losses bit for bit."""
    from bridge_train import finetune

    ckpt, marker = tmp_path / "ckpt", tmp_path / "marker"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), hf=tiny_hf, iters=ITERS))
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(marker)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"training did not start:\n{proc.communicate()[0]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "clean exit" in out, out
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the stopped run
    try:
        resumed = finetune(make_config(tiny_hf, str(ckpt), train_iters=ITERS))
        straight = finetune(make_config(tiny_hf, None, train_iters=ITERS))
    finally:
        torch.set_num_threads(threads)
    assert 3 <= stopped < ITERS and len(resumed) == ITERS - stopped
    assert resumed == straight[stopped:], (stopped, resumed, straight)


# ----------------------------------------------------------------------------------------- bridge-peft CLI
@pytest.fixture(scope="module")
def dora_checkpoint(tiny_hf, tmp_path_factory) -> str:
    from bridge_peft import DoRA
    from bridge_train import finetune

    ckpt = str(tmp_path_factory.mktemp("dora") / "ckpt")
    finetune(make_config(tiny_hf, ckpt, train_iters=4, peft=DoRA(dim=4, alpha=8, lora_B_init_method="xavier")))
    return ckpt


def test_cli_export_adapter_and_merge_agree_with_peft_and_transformers(tiny_hf, dora_checkpoint, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from bridge_peft.cli import main

    assert main(["export-adapter", dora_checkpoint, str(tmp_path / "adapter")]) == 0
    assert main(["merge", dora_checkpoint, str(tmp_path / "merged")]) == 0  # onto the base its run recorded
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(ids).logits
        # the adapter names the base the run fine-tuned (it named the architecture, which peft cannot load)
        auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32).eval()
        auto_logits = auto(ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the trained adapters change the model
    torch.testing.assert_close(auto_logits, adapted, atol=0, rtol=0)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)


def test_cli_merge_onto_a_bf16_base_rounds_once_into_the_dtype_asked_for(tiny_hf, dora_checkpoint, tmp_path):
    """The oracle: HF peft's merge of the exported adapter in float32 on the bf16 base (upcast). ``--dtype float32``
    gives it to fp32 rounding (the base was merged in bf16 before: every weight bf16-representable); the default
    (the base's bf16) gives it rounded once (fp32 adapters were cast to bf16 first: half the elements 1 ulp off)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bridge_peft.cli import main

    AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(tiny_hf) / name).exists():
            (tmp_path / "bf16" / name).write_bytes((Path(tiny_hf) / name).read_bytes())
    assert main(["export-adapter", dora_checkpoint, str(tmp_path / "adapter")]) == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    oracle = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload().state_dict()

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    assert main(["merge", dora_checkpoint, str(tmp_path / "m32"), "--base", str(tmp_path / "bf16"),
                 "--dtype", "float32"]) == 0
    assert main(["merge", dora_checkpoint, str(tmp_path / "m16"), "--base", str(tmp_path / "bf16")]) == 0
    m32, m16 = weights(tmp_path / "m32"), weights(tmp_path / "m16")
    changed = [k for k in m32 if k.endswith("proj.weight")]
    assert changed and all(m32[k].dtype == torch.float32 and m16[k].dtype == torch.bfloat16 for k in changed)
    differing = total = 0
    for k in changed:
        torch.testing.assert_close(m32[k], oracle[k], atol=1e-6, rtol=1e-6)
        assert not torch.equal(m32[k], m32[k].bfloat16().float())  # merged in fp32, not in the base's bf16
        off = m16[k] != oracle[k].bfloat16()
        differing, total = differing + int(off.sum()), total + off.numel()
    assert differing / total < 1e-3, (differing, total)


def test_cli_help_and_bad_input(tiny_hf, dora_checkpoint, tmp_path, capsys):
    from bridge_convert.testing import save_tiny_hf_checkpoint
    from bridge_peft.cli import _build_parser, main

    parser = _build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "merge" in a.choices).choices
    for name, sub in [("bridge-peft", parser), *subparsers.items()]:
        undocumented = [a.dest for a in sub._actions if not a.help and a.dest != "help"]
        assert not undocumented, (name, undocumented)
        with pytest.raises(SystemExit) as exc:
            sub.parse_args(["--help"])
        assert exc.value.code == 0

    def fails(argv, message, out):
        capsys.readouterr()
        assert main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may come before the error
        assert last.startswith("bridge-peft ") and message in last, last
        assert not out.exists() or out.name == "keep"

    fails(["export-adapter", str(tmp_path / "missing"), str(tmp_path / "o1")], "no Megatron checkpoint", tmp_path / "o1")
    other = save_tiny_hf_checkpoint(tmp_path / "qwen", "qwen3")
    fails(["merge", dora_checkpoint, str(tmp_path / "o2"), "--base", other], "trained on another model",
          tmp_path / "o2")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "x.txt").write_text("mine")
    fails(["export-adapter", dora_checkpoint, str(keep)], "not empty", keep)
    assert [p.name for p in keep.iterdir()] == ["x.txt"]
    from bridge_convert import AutoBridge

    AutoBridge.import_ckpt(tiny_hf, tmp_path / "full")
    fails(["export-adapter", str(tmp_path / "full"), str(tmp_path / "o3")], "not an adapter checkpoint",
          tmp_path / "o3")
    fails(["merge", str(tmp_path / "full"), str(tmp_path / "o3")], "not an adapter checkpoint",  # not "no base"
          tmp_path / "o3")
    # a Megatron checkpoint as the base gives the same merged model as the HF directory
    assert main(["merge", dora_checkpoint, str(tmp_path / "m1"), "--base", tiny_hf]) == 0
    assert main(["merge", dora_checkpoint, str(tmp_path / "m2"), "--base", str(tmp_path / "full")]) == 0
    from safetensors.torch import load_file

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = weights(tmp_path / "m1"), weights(tmp_path / "m2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # without --base: the base the checkpoint records, which must be there
    import json
    import shutil

    copy = shutil.copytree(dora_checkpoint, tmp_path / "copy")
    meta_path = next(copy.glob("iter_*")) / "bridge.json"
    meta = json.loads(meta_path.read_text())
    assert meta["peft"]["base"] == str(Path(tiny_hf).resolve())
    meta["peft"]["base"] = str(tmp_path / "moved")
    meta_path.write_text(json.dumps(meta))
    fails(["merge", str(copy), str(tmp_path / "o4")], "moved, its run's checkpoint.pretrained_checkpoint) does not "
          "exist here: pass --base", tmp_path / "o4")
    del meta["peft"]["base"]
    meta_path.write_text(json.dumps(meta))
    fails(["merge", str(copy), str(tmp_path / "o5")], "records no base model", tmp_path / "o5")
    # adapters that do not fit the PEFT the checkpoint records: the tensor and both shapes (it said "is an adapter
    # checkpoint: it holds the adapters, not the model's weights", which is what was asked for)
    meta["peft"]["fields"]["dim"] += 2
    meta_path.write_text(json.dumps(meta))
    fails(["export-adapter", str(copy), str(tmp_path / "o6")], "in the checkpoint, (", tmp_path / "o6")


def test_pretrained_megatron_checkpoint_is_the_base(tiny_hf, tmp_path):
    from bridge_convert import AutoBridge
    from bridge_train.setup import setup_run

    AutoBridge.import_ckpt(tiny_hf, tmp_path / "megatron")
    cfg = make_config(tiny_hf, None, train_iters=2)
    cfg.checkpoint.pretrained_checkpoint = str(tmp_path / "megatron")
    run = setup_run(cfg, finetune=True)
    reference = AutoBridge.from_hf_pretrained(tiny_hf).to_megatron_model(load_weights=True)
    expected = dict(reference[0].named_parameters())
    base = _base_params(run.model)
    assert base and all(torch.equal(base[n], expected[n]) for n in base)


def test_resume_names_a_peft_setting_other_than_the_checkpoints(tiny_hf, dora_checkpoint, tmp_path, caplog,
                                                                 monkeypatch):
    """A PEFT run resuming its adapter checkpoint with other adapter shapes gets what differs (not 'an adapter
    checkpoint holds no model weights'); a setting that changes no shape resumes with a warning naming it; a
    converted checkpoint (no training state) in checkpoint.load is refused before a model is built."""
    import logging
    import re
    import shutil

    from bridge_convert import AutoBridge
    from bridge_convert.errors import CheckpointMismatchError
    from bridge_peft import DoRA, LoRA
    from bridge_train import CheckpointError
    from bridge_train.setup import setup_run

    ckpt = tmp_path / "ckpt"
    shutil.copytree(dora_checkpoint, ckpt)
    for peft, message in ((DoRA(dim=8, alpha=8), r"dim: 4 \(checkpoint\) vs 8 \(config\)"),
                          (LoRA(dim=4, alpha=8), r"method bridge_peft.lora.DoRA \(checkpoint\) vs bridge_peft.lora."
                                                 r"LoRA \(config\)")):
        with pytest.raises(CheckpointMismatchError, match=r"cannot resume from .*iter_0000004 with this cfg.peft: "
                                                          + message):
            setup_run(make_config(tiny_hf, str(ckpt), train_iters=6, peft=peft), finetune=True)
    with caplog.at_level(logging.WARNING, logger="bridge_train"):
        run = setup_run(make_config(tiny_hf, str(ckpt), train_iters=6,
                                    peft=DoRA(dim=4, alpha=16, lora_B_init_method="xavier")), finetune=True)
    assert run.train_state.iteration == 4
    assert re.search(r"alpha: 8(\.0)? \(checkpoint\) vs 16(\.0)? \(config\)", caplog.text), caplog.text

    AutoBridge.import_ckpt(tiny_hf, tmp_path / "converted")
    cfg = make_config(tiny_hf, str(tmp_path / "converted"), train_iters=2)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the checkpoint was refused")

    monkeypatch.setattr(type(cfg.model), "provide_distributed_model", no_model)
    with pytest.raises(CheckpointError, match=r"converted.* holds model weights but no training state .*"
                                              r"checkpoint.pretrained_checkpoint=.*converted and point"):
        setup_run(cfg, finetune=True)


TRAINING_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_the_tokenizer_a_run_trains_with_is_the_one_its_exports_carry(tiny_hf, tmp_path):
    """SFT rendered with tokenizer.chat_template: the checkpoint's HF assets, its save_hf export, bridge-convert
    export of it and bridge-peft merge of a LoRA run carry that template (serving the export with the base's
    template would prompt the model in a format it was not trained on)."""
    from transformers import AutoTokenizer

    from bridge_convert import AutoBridge
    from bridge_peft.cli import main as peft_main
    from bridge_train import finetune, pretrain

    def template(path) -> str | None:
        return AutoTokenizer.from_pretrained(str(path)).chat_template

    assert template(Path(tiny_hf) / "tokenizer") != TRAINING_TEMPLATE
    full = make_config(tiny_hf, str(tmp_path / "full"), train_iters=2, save_hf=True)
    full.peft = None
    full.tokenizer.chat_template = TRAINING_TEMPLATE
    finetune(full)
    iteration = tmp_path / "full" / "iter_0000002"
    assert template(iteration / "hf_assets") == TRAINING_TEMPLATE
    assert template(iteration / "hf") == TRAINING_TEMPLATE
    AutoBridge.export_ckpt(str(tmp_path / "full"), str(tmp_path / "exported"))
    assert template(tmp_path / "exported") == TRAINING_TEMPLATE

    lora = make_config(tiny_hf, str(tmp_path / "lora"), train_iters=2)
    lora.tokenizer.chat_template = TRAINING_TEMPLATE
    finetune(lora)
    assert peft_main(["merge", str(tmp_path / "lora"), str(tmp_path / "merged"), "--base", tiny_hf]) == 0
    assert template(tmp_path / "merged") == TRAINING_TEMPLATE

    # a model with no HF directory (built from a config, as a recipe from random weights): the checkpoint's HF
    # assets and exports carry the run's tokenizer too (they had none, so the exports had no tokenizer at all)
    bare = make_config(tiny_hf, str(tmp_path / "bare"), train_iters=2, save_hf=True)
    bare.checkpoint.pretrained_checkpoint = None
    bare.model = AutoBridge.from_hf_config(json.loads((Path(tiny_hf) / "config.json").read_text())
                                           ).to_megatron_provider(load_weights=False)
    bare.peft, bare.tokenizer.chat_template = None, TRAINING_TEMPLATE
    pretrain(bare)
    iteration = tmp_path / "bare" / "iter_0000002"
    assert template(iteration / "hf_assets") == template(iteration / "hf") == TRAINING_TEMPLATE
    AutoBridge.export_ckpt(str(tmp_path / "bare"), str(tmp_path / "bare_exported"))
    ours = AutoTokenizer.from_pretrained(str(tmp_path / "bare_exported"))
    assert ours("paris is the capital")["input_ids"] == AutoTokenizer.from_pretrained(
        str(Path(tiny_hf) / "tokenizer"))("paris is the capital")["input_ids"]


def test_a_shrunk_vocabulary_exports_the_bos_and_eos_of_its_tokenizer(tiny_hf, tmp_path):
    """A Llama 3 config (bos 128000, eos 128001) shrunk to the run's 320-token tokenizer: the exports wrote the
    source's ids, outside the vocabulary (transformers warns, and generation never stops at eos), or null; the
    tokenizer exported with the model knows them (transformers' AutoTokenizer is the oracle)."""
    from transformers import AutoTokenizer

    from bridge_convert import AutoBridge
    from bridge_train import pretrain

    source = {**json.loads((Path(tiny_hf) / "config.json").read_text()), "vocab_size": 128256,
              "bos_token_id": 128000, "eos_token_id": 128001}
    cfg = make_config(tiny_hf, str(tmp_path / "run"), train_iters=2, save_hf=True)
    cfg.checkpoint.pretrained_checkpoint, cfg.peft = None, None
    cfg.model = AutoBridge.from_hf_config(source).to_megatron_provider(load_weights=False)
    cfg.model.vocab_size = 320
    with pytest.warns(UserWarning, match="bos_token_id 128000, eos_token_id 128001 .* outside its vocabulary of 320"):
        pretrain(cfg)
    AutoBridge.export_ckpt(str(tmp_path / "run"), str(tmp_path / "exported"))
    for out in (tmp_path / "run" / "iter_0000002" / "hf", tmp_path / "exported"):
        config, tokenizer = json.loads((out / "config.json").read_text()), AutoTokenizer.from_pretrained(str(out))
        assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
        assert config["vocab_size"] == 320 and max(tokenizer.bos_token_id, tokenizer.eos_token_id) < 320


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_full_activation_recompute_trains_the_adapters_like_no_recompute(tiny_hf, method):
    """Under full recompute the adapters inside the checkpointed layers got no gradient at all (the frozen
    embedding's output needs none, so megatron-core's reentrant checkpoint never ran their backward)."""
    from bridge_peft import DoRA, LoRA
    from bridge_train import finetune

    def losses(**recompute):
        peft = (LoRA if method == "lora" else DoRA)(dim=4, alpha=8, lora_B_init_method="xavier")
        cfg = make_config(tiny_hf, None, train_iters=5, peft=peft)
        for name, value in recompute.items():
            setattr(cfg.model, name, value)
        return list(finetune(cfg))

    plain = losses()
    assert losses(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) == plain
    assert losses(recompute_granularity="full", recompute_method="block", recompute_num_layers=1) == plain


# ----------------------------------------------------------------------------------- adapters on some layers
LAYER0_QKV, LAYER1_FC2 = "decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.mlp.linear_fc2"


def _some_layers_config(hf_path: str, ckpt: str | None, iters: int, targets: list[str], overrides=()):
    from bridge_peft import LoRA
    from bridge_train import apply_overrides

    cfg = make_config(hf_path, ckpt, train_iters=iters,
                      peft=LoRA(dim=4, alpha=8, target_modules=targets, lora_B_init_method="xavier"))
    return apply_overrides(cfg, ["scheduler.lr_decay_iters=6", *overrides])  # one schedule for 3 + 3 and 6


def test_adapters_on_some_layers_checkpoint_resume_and_export(tiny_hf, tmp_path):
    """Adapters on some layers only (megatron-core stacks a layer's tensors over all layers in a checkpoint; such
    adapters could not be saved at all): save, resume bit for bit, and export from the checkpoint what HF peft
    loads into the resumed run's model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bridge_convert.forward import forward_logits
    from bridge_peft.cli import main
    from bridge_train import finetune

    ckpt, targets = str(tmp_path / "ckpt"), [LAYER0_QKV, LAYER1_FC2]
    straight = list(finetune(_some_layers_config(tiny_hf, None, 6, targets)))
    first = list(finetune(_some_layers_config(tiny_hf, ckpt, 3, targets)))
    resumed = finetune(_some_layers_config(tiny_hf, ckpt, 6, targets))
    assert first + list(resumed) == straight
    assert main(["export-adapter", ckpt, str(tmp_path / "adapter")]) == 0
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(5))
    ours = forward_logits([m.module for m in resumed.model], ids)[..., :320]
    base = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        theirs = peft_model(ids).logits
    adapted = sorted(n.split("model.layers.")[-1] for n, m in peft_model.named_modules() if len(getattr(m, "lora_A", ())))
    assert adapted == ["0.self_attn.k_proj", "0.self_attn.q_proj", "0.self_attn.v_proj", "1.mlp.down_proj"]
    assert (theirs - before).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def _pipeline_some_layers(hf_path: str, root: str) -> dict[str, object]:
    from bridge_train import finetune
    from bridge_train.checkpoint_discovery import CheckpointError

    pp = ["model.pipeline_model_parallel_size=2"]
    out: dict[str, object] = {}
    # the second stage has no adapter: its checkpoint entry is empty
    straight = list(finetune(_some_layers_config(hf_path, None, 6, [LAYER0_QKV], pp)))
    first = list(finetune(_some_layers_config(hf_path, f"{root}/ckpt", 3, [LAYER0_QKV], pp)))
    out["resumed"] = first + list(finetune(_some_layers_config(hf_path, f"{root}/ckpt", 6, [LAYER0_QKV], pp)))
    out["straight"] = straight
    # megatron-core keeps rank 0's optimizer param groups (torch Adam's step): refused before training
    for name, targets, extra in [("first stage empty", [LAYER1_FC2], []),
                                 ("distributed optimizer", [LAYER0_QKV], ["optimizer.use_distributed_optimizer=true",
                                                                          "ddp.use_distributed_optimizer=true"])]:
        try:
            finetune(_some_layers_config(hf_path, f"{root}/{name}", 6, targets, pp + extra))
        except CheckpointError as exc:
            out[name] = str(exc)
    return out


@pytest.mark.multiproc
def test_pipeline_stage_without_adapters_resumes_or_is_refused_before_training(tiny_hf, tmp_path):
    from bridge_convert.testing import run_multiprocess

    ranks = run_multiprocess(_pipeline_some_layers, 2, tiny_hf, str(tmp_path), timeout=600)
    for rank in ranks:
        assert rank["resumed"] == rank["straight"]
        assert "rank(s) [0] hold no trainable parameter" in rank["first stage empty"]
        assert "rank(s) [1] hold no trainable parameter" in rank["distributed optimizer"]
        assert "optimizer.use_distributed_optimizer=false" in rank["distributed optimizer"]
    assert not list((tmp_path / "first stage empty").glob("iter_*"))  # refused before training, nothing saved


def _tuned_copy(hf: str, out: Path) -> str:
    """``hf`` with every weight moved by 5% of itself (a fine-tune of it, as far as the weights go)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 + 0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    return str(out)


def test_resuming_adapters_onto_another_base(tiny_hf, dora_checkpoint, tmp_path, caplog):
    """An adapter-only checkpoint keeps no base, but a fingerprint of it: resuming onto other weights (a fine-tune
    of the base) is refused before training, a copy of the base at another path says nothing; a checkpoint without
    the fingerprint (an older bridge-train's) warns, naming the base the adapters were trained on."""
    import json
    import logging
    import shutil

    from bridge_peft import DoRA
    from bridge_train.checkpoint_discovery import CheckpointError
    from bridge_train.setup import setup_run

    copy = shutil.copytree(tiny_hf, tmp_path / "copy-of-base")
    peft = DoRA(dim=4, alpha=8, lora_B_init_method="xavier")

    def resume(base: str, name: str, *, fingerprint: bool = True):
        ckpt = shutil.copytree(dora_checkpoint, tmp_path / name)
        if not fingerprint:
            meta_path = next(ckpt.glob("iter_*")) / "bridge.json"
            meta = json.loads(meta_path.read_text())
            del meta["peft"]["base_fingerprint"]
            meta_path.write_text(json.dumps(meta))
        cfg = make_config(tiny_hf, str(ckpt), train_iters=6, peft=peft)
        cfg.checkpoint.pretrained_checkpoint = base
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bridge_train"):
            return setup_run(cfg, finetune=True)

    warning = f"but they were trained on {tiny_hf}: nothing checks that the two hold the same weights"
    assert resume(str(copy), "copy").train_state.iteration == 4 and warning not in caplog.text
    assert resume(str(copy), "old", fingerprint=False).train_state.iteration == 4 and warning in caplog.text
    with pytest.raises(CheckpointError, match=r"cannot resume the adapters of .*: the base model's weights here "
                                              r"\(checkpoint.pretrained_checkpoint=.*tuned\) are not the ones they "
                                              r"were trained on"):
        resume(_tuned_copy(tiny_hf, tmp_path / "tuned"), "resumed-on-tuned")


def test_an_adapter_checkpoint_as_the_pretrained_weights_is_refused_by_the_config_check(tiny_hf, dora_checkpoint):
    """It was refused only once the model had been built and the weights were being read."""
    from bridge_train.config import ConfigError

    cfg = make_config(tiny_hf, None, train_iters=2)
    cfg.checkpoint.pretrained_checkpoint = dora_checkpoint
    with pytest.raises(ConfigError, match=r"checkpoint.pretrained_checkpoint: .*ckpt is an adapter checkpoint "
                                          r"\(bridge_peft.lora.DoRA\): it holds the adapters, not the model's weights"):
        cfg.validate(world_size=1)


def test_merge_onto_other_weights_is_refused_unless_asked_for(tiny_hf, dora_checkpoint, tmp_path, capsys):
    """bridge-peft merge checked the base's shapes only: a fine-tune of the base (same shapes) merged silently into
    a model nobody trained. --other-base merges onto it all the same (adapters carried over on purpose)."""
    from bridge_peft.cli import main

    tuned = _tuned_copy(tiny_hf, tmp_path / "tuned")
    capsys.readouterr()
    assert main(["merge", dora_checkpoint, str(tmp_path / "refused"), "--base", tuned]) == 2
    assert ("were trained on other weights than those of --base" in capsys.readouterr().err
            and not (tmp_path / "refused").exists())
    assert main(["merge", dora_checkpoint, str(tmp_path / "merged"), "--base", tuned, "--other-base"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize(("override", "error"), [
    ("peft.target_modules=[linear_qkvv]", r"LoRA.target_modules \['linear_qkvv'\] match no linear layer"),
    ("dataset.seq_length=16", r"No usable (train|valid) rows of .*sft.jsonl: of \d+ rows, \d+ lose their whole answer"),
])
def test_bad_targets_or_data_fail_before_the_pretrained_weights_load(tiny_hf, monkeypatch, override, error):
    """Mistakes only the model or the data reveal fail before a (possibly 70B) pretrained checkpoint is read."""
    from bridge_convert import AutoBridge
    from bridge_peft import LoRA
    from bridge_train import apply_overrides, finetune

    def no_load(*args, **kwargs):
        raise AssertionError("the pretrained weights were read first")

    monkeypatch.setattr(AutoBridge, "load_hf_weights", no_load)
    cfg = make_config(tiny_hf, None, train_iters=2, peft=LoRA(dim=4, alpha=8))
    with pytest.raises(ValueError, match=error):
        finetune(apply_overrides(cfg, [override]))


def test_a_split_without_training_or_validation_data_is_named(tiny_hf, caplog):
    import logging

    from bridge_train import apply_overrides, finetune

    cfg = make_config(tiny_hf, None, train_iters=2)
    with pytest.raises(ValueError, match=r"no training data \(dataset.split=0,100,0\); give the training split"):
        finetune(apply_overrides(cfg, ["dataset.split=0,100,0"]))
    with caplog.at_level(logging.WARNING, logger="bridge"):
        finetune(apply_overrides(make_config(tiny_hf, None, train_iters=2),
                                 ["dataset.split=100,0,0", "train.eval_interval=1"]))
    assert ("train.eval_interval=1, but the dataset has no validation data (dataset.split=100,0,0): no evaluation "
            "will run") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bridge"):  # no split at all: say which fields give one
        finetune(apply_overrides(make_config(tiny_hf, None, train_iters=2),
                                 ["dataset.split=null", "train.eval_interval=1"]))
    assert ("no validation data: no evaluation will run; set dataset.split or dataset.valid_path (e.g. "
            "dataset.split=90,5,5), or set train.eval_interval=null") in caplog.text


def test_a_resume_with_adapter_dropout_continues_bitwise(tiny_hf, tmp_path):
    """Dropout draws from the global RNG, which a resume restores; the data loader's iterator, built after that,
    drew one more number from it (its workers' base seed), so every later dropout mask differed from the straight
    run's. (The other resume tests train without dropout.)"""
    from bridge_peft import LoRA
    from bridge_train import finetune

    def config(ckpt, iters):
        cfg = make_config(tiny_hf, str(tmp_path / ckpt), train_iters=iters, peft=LoRA(dim=4, alpha=8, dropout=0.1))
        cfg.scheduler.lr_decay_iters = 4  # the same schedule for both runs
        return cfg

    straight = list(finetune(config("a", 4)))
    resumed = list(finetune(config("b", 2))) + list(finetune(config("b", 4)))
    assert straight == resumed
