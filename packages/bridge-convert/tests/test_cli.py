"""The bridge-convert command line, run in-process (and once as the installed console script)."""

import shutil
import subprocess

import pytest

from bridge_convert.cli import main
from bridge_convert.testing import assert_same_checkpoint


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


def test_import_then_export(hf_checkpoints, tmp_path):
    assert main(["import", hf_checkpoints["llama31"], str(tmp_path / "mcore")]) == 0
    assert main(["export", str(tmp_path / "mcore"), str(tmp_path / "hf")]) == 0
    assert_same_checkpoint(hf_checkpoints["llama31"], tmp_path / "hf")


def test_compare_prints_logit_statistics(hf_checkpoints, capsys):
    assert main(["compare", hf_checkpoints["qwen3"], "--seq-len", "12"]) == 0
    out = capsys.readouterr().out
    max_diff = float(out.split("max |diff|")[1].split()[0])
    assert max_diff < 1e-4 and "next-token match  100.00%" in out


@pytest.mark.parametrize("argv,message", [
    (["import", "{hf}", "{out}", "--tp", "2"], "torchrun --nproc-per-node=2"),
    (["export", "{out}", "{out}/hf"], "no Megatron checkpoint"),
])
def test_errors_exit_nonzero_with_a_message(argv, message, hf_checkpoints, tmp_path, capsys):
    argv = [a.format(hf=hf_checkpoints["llama"], out=tmp_path) for a in argv]
    assert main(argv) == 1
    assert message in capsys.readouterr().err


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
