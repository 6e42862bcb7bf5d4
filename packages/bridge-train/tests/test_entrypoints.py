"""What users of the entry points see: the README's training snippet runs, the example script prints a config
error as one line (the traceback only with --debug) and makes the data choice explicit, and forward steps of
both accepted signatures work (any other is refused up front)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from bridge_train import ConfigError, gpt_forward_step, pretrain

PACKAGE = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("pretrain_llama_example", PACKAGE / "examples" / "pretrain_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_training_snippet_runs(tiny_llama, tmp_path, monkeypatch):
    readme = (PACKAGE / "README.md").read_text()
    snippet = re.search(r"## Training\n```python\n(.*?)```", readme, re.S).group(1)
    # The snippet as written, on the tiny model and at a CPU-sized scale.
    for old, new in (('"/models/Llama-3.2-1B"', repr(tiny_llama)), ("train_iters=100", "train_iters=3"),
                     ("micro_batch_size=4", "micro_batch_size=2"), ("global_batch_size=32", "global_batch_size=4"),
                     ("seq_length=4096", "seq_length=32"), ("lr_warmup_iters=10", "lr_warmup_iters=1"),
                     ("save_interval=50", "save_interval=2")):
        assert old in snippet, f"the README snippet no longer has {old}"
        snippet = snippet.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert len(namespace["result"]) == 3
    assert (tmp_path / "runs" / "hf" / "config.json").exists()
    assert (tmp_path / "runs" / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_example_prints_a_config_error_as_one_line(tiny_llama, tmp_path, capsys):
    example = _example()
    argv = ["--hf-model", tiny_llama, "--mock", "--workdir", str(tmp_path), "train.global_batch_size=7"]
    with pytest.raises(SystemExit) as info:
        example.main(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "error: invalid config (1 problem):" and len(err) == 2 and "Traceback" not in "".join(err)
    assert "train.global_batch_size (7)" in err[1]
    with pytest.raises(ConfigError, match="global_batch_size"):  # --debug: the exception with its traceback
        example.main([*argv, "--debug"])


def test_example_prints_weights_that_do_not_fit_the_model_as_one_line(tiny_llama, tmp_path, capsys):
    """A model setting changed after choosing the checkpoint (its weights no longer fit): one line, no traceback."""
    example = _example()
    with pytest.raises(SystemExit) as info:
        example.main(["--hf-model", tiny_llama, "--mock", "--workdir", str(tmp_path), "model.num_layers=3",
                      "train.train_iters=3"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: HF checkpoint ") and "does not match" in err[0], err
    assert "missing tensors (9): model.layers.2." in "".join(err) and "Traceback" not in "".join(err)


def test_example_needs_an_explicit_data_choice(tiny_llama, tmp_path, capsys):
    example = _example()
    with pytest.raises(SystemExit) as info:
        example.main(["--hf-model", tiny_llama, "--workdir", str(tmp_path)])
    assert info.value.code == 2 and "one of the arguments --mock --data-path is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # mock data and data paths at once: refused by the config check
        example.main(["--hf-model", tiny_llama, "--mock", "--workdir", str(tmp_path), "dataset.paths=[corpus]"])
    assert info.value.code == 1
    assert "dataset.mock is true and dataset.paths is set (['corpus'])" in capsys.readouterr().err
    args = example.argparse.Namespace(mock=False, data_path=["0.3", "a", "0.7", "b"])
    data = example._data_config(args, _pretrain_data_config())
    assert (data.paths, data.weights, data.mock) == (["a", "b"], [0.3, 0.7], False)


def test_example_resumed_in_its_workdir_exports_each_end(tiny_llama, tmp_path, capsys):
    """"Resume with the same command" (what the example says after a signal) must not fail on the first run's
    export: each finished run exports its last checkpoint to hf/iter_N; a run with nothing left to train does not
    export again."""
    example = _example()
    common = ["--hf-model", tiny_llama, "--mock", "--workdir", str(tmp_path), "train.micro_batch_size=2",
              "train.global_batch_size=2", "dataset.seq_length=16", "logger.log_interval=1",
              "scheduler.lr_warmup_iters=0", "train.eval_interval=null"]
    assert example.main([*common, "train.train_iters=2"]) == 0
    assert example.main([*common, "train.train_iters=3"]) == 0
    assert example.main([*common, "train.train_iters=3"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["iter_0000002", "iter_0000003"]
    assert (tmp_path / "hf" / "iter_0000003" / "config.json").exists()
    assert "trained 1 iterations" in out and "already holds the export of iteration 3" in out


def _pretrain_data_config():
    from bridge_data import PretrainDataConfig

    return PretrainDataConfig


def test_megatron_bridge_style_forward_step_gives_the_same_losses(run_config):
    seen_states = []

    def forward_step(state, data_iterator, model, return_schedule_plan=False):
        seen_states.append(state.train_state.iteration)
        return gpt_forward_step(data_iterator, model)

    short = {"train.train_iters": 2, "scheduler.lr_warmup_iters": 1}
    reference = pretrain(run_config(**short))
    assert list(pretrain(run_config(**short), forward_step)) == list(reference)
    assert seen_states[0] == 0 and len(seen_states) == 2 * 4  # 4 micro-batches per iteration


def test_a_forward_step_of_another_signature_is_refused_up_front():
    from bridge_train.forward_step import ForwardStepSignatureError, adapt_forward_step

    def wrong(batch):
        raise AssertionError("never called")

    with pytest.raises(ForwardStepSignatureError, match=r"wrong\(batch\) has an unsupported signature; expected "
                                                        r"forward_step\(data_iterator, model\)"):
        adapt_forward_step(wrong, state=None)
    assert adapt_forward_step(gpt_forward_step, state=None) is gpt_forward_step  # its returns need no check


def test_a_forward_step_returning_another_shape_is_named(run_config):
    """The schedule unpacked the results itself: 'cannot unpack non-iterable Tensor object', 'len() of a 0-d
    tensor'."""
    from bridge_train.forward_step import ForwardStepSignatureError

    def output_only(data_iterator, model):
        return gpt_forward_step(data_iterator, model)[0]

    def bare_loss(data_iterator, model):
        output, loss_func = gpt_forward_step(data_iterator, model)
        return output, lambda out: loss_func(out)[0]

    short = {"train.train_iters": 2, "scheduler.lr_warmup_iters": 1}
    with pytest.raises(ForwardStepSignatureError, match=r"forward_step .*output_only returned a Tensor; it must "
                                                        r"return \(output_tensor, loss_func\)"):
        pretrain(run_config(**short), output_only)
    with pytest.raises(ForwardStepSignatureError, match=r"the loss function of forward_step .*bare_loss returned a "
                                                        r"Tensor; it must return \(loss, \{'lm loss': ...\}\)"):
        pretrain(run_config(**short), bare_loss)
