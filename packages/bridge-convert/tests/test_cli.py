"""The bridge-convert command line, run in-process (and once as the installed console script)."""

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bridge_convert.cli import _build_parser, main
from bridge_convert.testing import assert_same_checkpoint, save_tiny_hf_checkpoint
from bridge_convert.testing.__main__ import build_parser as build_testing_parser


def test_console_script_help():
    exe = shutil.which("bridge-convert")
    assert exe is not None, "the bridge-convert console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert all(cmd in out for cmd in ("import", "export", "roundtrip", "compare", "list"))


def test_list(capsys):
    assert main(["list"]) == 0
    assert "Qwen3ForCausalLM" in capsys.readouterr().out.split()


def test_roundtrip_reports_bit_exact(hf_checkpoints, tmp_path, capsys):
    assert main(["roundtrip", hf_checkpoints["mistral"], str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "identical tensors: 21/21" in out and "result: bit-exact" in out


def test_roundtrip_through_a_narrower_dtype_says_why_it_mismatches(hf_checkpoints, tmp_path, capsys):
    assert main(["roundtrip", hf_checkpoints["llama"], str(tmp_path / "bf16"), "--dtype", "bf16"]) == 1
    out = capsys.readouterr().out  # (a bare MISMATCH before)
    assert "note: --dtype bf16 cannot hold every float32 weight: they are rounded" in out and "MISMATCH" in out
    assert main(["roundtrip", hf_checkpoints["llama"], str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_float32_weights_under_a_bfloat16_config(hf_checkpoints, tmp_path, capsys, caplog):
    """A checkpoint saved in float32 whose config.json says bfloat16: roundtrip checks the mapping in the stored
    dtype (bit-exact), and import, which follows the config, says that it rounds and how to keep every bit."""
    import json

    src = tmp_path / "mislabeled"
    shutil.copytree(hf_checkpoints["qwen2"], src)
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(config))
    assert main(["roundtrip", str(src), str(tmp_path / "rt")]) == 0
    assert "result: bit-exact" in capsys.readouterr().out
    with caplog.at_level("WARNING"):
        assert main(["import", str(src), str(tmp_path / "mcore")]) == 0
    assert "config.json says bfloat16 but the weights are stored as float32" in caplog.text
    assert "--dtype float32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # the dtype asked for: nothing to say; a correctly labelled checkpoint neither
        assert main(["import", str(src), str(tmp_path / "mcore32"), "--dtype", "float32"]) == 0
        assert main(["import", hf_checkpoints["qwen2"], str(tmp_path / "mcore-ok")]) == 0
    assert "rounds them" not in caplog.text


def test_import_then_export(hf_checkpoints, tmp_path):
    assert main(["import", hf_checkpoints["llama31"], str(tmp_path / "mcore")]) == 0
    assert main(["export", str(tmp_path / "mcore"), str(tmp_path / "hf")]) == 0
    assert_same_checkpoint(hf_checkpoints["llama31"], tmp_path / "hf")


def test_offline_import_and_export_processes_never_import_megatron_core(hf_checkpoints, tmp_path):
    """Offline conversion needs no megatron-core (its import alone takes ~14 s), at exit neither, and no
    torch.distributed.checkpoint (import writes the .metadata itself on the torch versions dcp_write was checked
    against, DCP's own save on others)."""
    import sys

    from bridge_convert.offline.dcp_write import VERIFIED_TORCH

    probe = ("import sys; from bridge_convert.cli import main; code = main(sys.argv[1:]); "
             "print(sorted(m for m in ('megatron.core', 'torch.distributed.checkpoint') if m in sys.modules)); "
             "sys.exit(code)")
    loaded = {}
    for argv in (["import", hf_checkpoints["qwen2"], str(tmp_path / "mcore")],
                 ["export", str(tmp_path / "mcore"), str(tmp_path / "hf")]):
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
        loaded[argv[0]] = out.stdout.strip().splitlines()[-1]
    dcp = "[]" if torch.__version__.startswith(VERIFIED_TORCH) else "['torch.distributed.checkpoint']"
    assert loaded == {"import": dcp, "export": "[]"}
    assert_same_checkpoint(hf_checkpoints["qwen2"], tmp_path / "hf")


def test_compare_prints_logit_statistics(hf_checkpoints, capsys):
    assert main(["compare", hf_checkpoints["qwen3"], "--seq-len", "12"]) == 0
    out = capsys.readouterr().out
    max_diff = float(out.split("max |diff|")[1].split()[0])
    assert max_diff < 1e-4 and "next-token match  100.00%" in out


def test_compare_prints_a_cosine_of_one_for_identical_logits(tmp_path, capsys):
    # a 32k vocabulary: float32 rounding printed the identical logits' cosine as 0.999999
    ckpt = save_tiny_hf_checkpoint(tmp_path / "hf", "qwen3", vocab_size=32000)
    assert main(["compare", ckpt, "--seq-len", "12"]) == 0
    out = capsys.readouterr().out
    assert "max |diff|        0\n" in out and "cosine (min/mean) 1.000000 / 1.000000" in out


def test_compare_atol_fails_on_different_weights(hf_checkpoints, tmp_path, capsys):
    """A Megatron checkpoint one weight away from the HF model: report only by default, exit 1 above --atol."""
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(hf_checkpoints["qwen3"], changed)
    shard = next(p for p in sorted(changed.glob("*.safetensors")) if any(
        n.endswith("mlp.down_proj.weight") for n in load_file(str(p))))
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name].view(-1)[:50] += 0.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert main(["import", str(changed), str(tmp_path / "mc")]) == 0
    argv = ["compare", hf_checkpoints["qwen3"], "--megatron-path", str(tmp_path / "mc"), "--seq-len", "8"]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    max_diff = float(out.split("max |diff|")[1].split()[0])
    assert max_diff > 1e-3 and "result" not in out
    assert main([*argv, "--atol", f"{max_diff / 2:g}"]) == 1
    assert "result: MISMATCH: above --atol" in capsys.readouterr().out
    assert main([*argv, "--atol", f"{max_diff * 2:g}"]) == 0
    assert "result: within --atol" in capsys.readouterr().out


@pytest.mark.parametrize("option,value", [("--seq-len", "0"), ("--batch", "-1"), ("--atol", "-1"),
                                          ("--atol", "nan"), ("--seq-len", "x")])
def test_compare_refuses_bad_numbers_in_one_line(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "hf", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err


@pytest.mark.parametrize("option,value", [("--seq-len", "12"), ("--batch", "3"), ("--seed", "0")])
def test_compare_refuses_random_input_options_with_a_prompt(option, value, hf_checkpoints, capsys):
    assert main(["compare", hf_checkpoints["llama"], "--prompt", "Hello", option, value]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{option}: only for the random input" in err and "--prompt" in err


def test_compare_with_a_prompt_encodes_it_and_refuses_what_cannot_run(hf_checkpoints, tmp_path, capsys):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(200)} | {"[UNK]": 200}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt = shutil.copytree(hf_checkpoints["llama"], tmp_path / "with-tokenizer")  # vocab_size 128
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(ckpt)
    assert main(["compare", str(ckpt), "--prompt", "w1 w2 w3"]) == 0
    assert "HF vs Megatron logits ((1, 3) tokens" in capsys.readouterr().out
    for argv, message in [([str(ckpt), "--prompt", ""], "--prompt '' encodes to no tokens"),
                          ([str(ckpt), "--prompt", "w1 w150"], "encodes to id 150, and the model needs 1+ ids below "
                                                               "its vocab_size 128"),
                          ([hf_checkpoints["llama"], "--prompt", "w1"], "--prompt needs the tokenizer of")]:
        assert main(["compare", *argv]) == 1  # (a raw reshape / index error, or transformers' backend message)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_threads_is_refused_on_the_model_building_path(hf_checkpoints, tmp_path, capsys):
    assert main(["import", hf_checkpoints["llama"], str(tmp_path / "mc"), "--impl", "local", "--threads", "4"]) == 1
    err = capsys.readouterr().err
    assert "--threads sets the offline converter's readers / writers" in err and not (tmp_path / "mc").exists()


@pytest.mark.parametrize("argv,message", [
    (["import", "{hf}", "{out}", "--tp", "2"], "torchrun --nproc-per-node=2"),
    (["export", "{out}", "{out}/hf"], "no Megatron checkpoint"),
])
def test_errors_exit_nonzero_with_a_message(argv, message, hf_checkpoints, tmp_path, capsys):
    argv = [a.format(hf=hf_checkpoints["llama"], out=tmp_path) for a in argv]
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("build", [_build_parser, build_testing_parser], ids=["bridge-convert", "testing"])
def test_every_option_has_help(build):
    for name, sub in _subparsers(build()).items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("size", ["5GB", "500MB", "2GiB", "1234"])
def test_max_shard_size_accepts_sizes(size):
    args = _build_parser().parse_args(["export", "ckpt", "out", "--max-shard-size", size])
    assert args.max_shard_size == size


@pytest.mark.parametrize("size", ["lots", "0", "5 gigs"])
def test_max_shard_size_rejects_non_sizes_in_one_line(size, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "ckpt", "out", "--max-shard-size", size])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-shard-size" in err and "5GB" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_before_or_after_the_subcommand(where, tmp_path, capsys):
    argv = ["export", str(tmp_path), str(tmp_path / "hf")]
    assert main(argv) == 1
    with pytest.raises(FileNotFoundError, match="no Megatron checkpoint"):
        main(["--debug", *argv] if where == "before" else [*argv, "--debug"])


def test_import_names_the_heads_before_the_process_count(hf_checkpoints, tmp_path, capsys):
    assert main(["import", hf_checkpoints["llama"], str(tmp_path / "out"), "--tp", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "num_attention_heads (4) is not divisible by tensor_model_parallel_size (3)" in err
    assert "processes" not in err and not (tmp_path / "out").exists()


def test_a_refused_import_says_so_on_its_own_line_without_a_progress_bar(hf_checkpoints, tmp_path, capsys):
    """The config's KV heads do not match the stored k_proj: refused while planning, before any byte is read (the
    bar was made first and never closed, so the error ran on after ``Importing: 0%|``)."""
    import json

    hf = Path(shutil.copytree(hf_checkpoints["llama"], tmp_path / "hf"))
    config = json.loads((hf / "config.json").read_text())
    config["num_key_value_heads"] = config["num_attention_heads"]
    (hf / "config.json").write_text(json.dumps(config))
    assert main(["import", str(hf), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bridge-convert import: error: ") and err.count("\n") == 1, repr(err)
    assert "self_attn.k_proj.weight: expected" in err and not (tmp_path / "out").exists()


def _poison(src: str, dst: Path, tensor: str, value: float = float("nan")) -> Path:
    """A copy of the HF checkpoint ``src`` with ``value`` written into a few values of ``tensor``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            if tensor not in f.keys():
                continue
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        tensors[tensor].view(-1)[::7] = value
        save_file(tensors, shard, metadata=metadata)
        return dst
    raise AssertionError(f"{tensor} is in no shard of {src}")


def test_compare_refuses_non_finite_weights(hf_checkpoints, tmp_path, capsys):
    bad = _poison(hf_checkpoints["qwen3"], tmp_path / "nan", "model.layers.1.mlp.down_proj.weight")
    assert main(["compare", str(bad), "--seq-len", "8"]) == 1
    captured = capsys.readouterr()
    assert "next-token match" not in captured.out
    [error] = [line for line in captured.err.splitlines() if "error:" in line]  # tqdm bars aside
    assert error.startswith("bridge-convert compare: error: HF checkpoint ") and \
        "non-finite (NaN / inf) values in 1 tensors: model.layers.1.mlp.down_proj.weight" in error


def test_compare_fails_on_non_finite_logits(hf_checkpoints, tmp_path, capsys, runtime):
    # a Megatron checkpoint with NaN weights (a diverged training run saves them; a conversion never does)
    from bridge_convert import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(hf_checkpoints["qwen3"])
    model = bridge.to_megatron_model(load_weights=True)
    with torch.no_grad():
        model[0].decoder.layers[1].mlp.linear_fc2.weight.view(-1)[::7] = float("nan")
    bridge.save_megatron_checkpoint(model, tmp_path / "mc")
    assert main(["compare", hf_checkpoints["qwen3"], "--megatron-path", str(tmp_path / "mc"), "--seq-len", "8"]) == 1
    captured = capsys.readouterr()
    assert "next-token match" not in captured.out
    [error] = [line for line in captured.err.splitlines() if "error:" in line]  # tqdm bars aside
    assert error.startswith("bridge-convert compare: error: Megatron logits hold") and "NaN" in error
    assert "Megatron weights with NaN/inf: decoder.layers.1.mlp.linear_fc2.weight" in error


def test_export_into_a_non_empty_directory_is_refused_and_keeps_its_files(hf_checkpoints, tmp_path, capsys):
    assert main(["import", hf_checkpoints["llama"], str(tmp_path / "mcore")]) == 0
    target = tmp_path / "hf"
    (target / "sub").mkdir(parents=True)
    (target / "important.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "mcore"), str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty" in err and "--overwrite" in err
    assert (target / "important.txt").read_text() == "keep me" and (target / "sub").is_dir()
    assert main(["import", hf_checkpoints["llama"], str(tmp_path / "mcore")]) == 1  # a second run refuses
    assert main(["import", hf_checkpoints["llama"], str(tmp_path / "mcore"), "--overwrite"]) == 0
    assert main(["export", str(tmp_path / "mcore"), str(target), "--overwrite"]) == 0
    assert_same_checkpoint(hf_checkpoints["llama"], target)
    assert not (target / "important.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mcore"]


@pytest.mark.parametrize("damage", [b"{bad", b"[1]", b"\xff\xfe", b'{"format_version": "1"}'],
                         ids=["garbled", "a list", "not utf-8", "a string version"])
def test_a_damaged_bridge_json_is_one_line_naming_the_file(hf_checkpoints, tmp_path, capsys, damage):
    # It was json's own message alone ("Expecting property name ... (char 1)", an AttributeError / TypeError
    # traceback for a list / a string format_version), naming no file.
    assert main(["import", hf_checkpoints["llama"], str(tmp_path / "mcore")]) == 0
    meta = tmp_path / "mcore" / "iter_0000000" / "bridge.json"
    meta.write_bytes(damage)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "mcore"), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(meta) in err and "metadata is damaged" in err, err
    assert not (tmp_path / "hf").exists()
