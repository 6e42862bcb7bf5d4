"""TP=2 (with and without sequence parallelism), PP=2 and DP=2 (two gloo processes) reproduce the single-process losses for the same global batch, and
the parameter norm (``logger.log_params_norm``) counts every parameter once across the layouts."""

from __future__ import annotations

import functools

import pytest
import torch

from bridge_convert.testing import run_multiprocess
from bridge_train import pretrain

ITERS = 6
LAYOUTS = {
    "tp2": {"model.tensor_model_parallel_size": 2},
    "tp2_sp": {"model.tensor_model_parallel_size": 2, "model.sequence_parallel": True},
    "pp2": {"model.pipeline_model_parallel_size": 2},
    "dp2": {"optimizer.use_distributed_optimizer": True, "ddp.use_distributed_optimizer": True},
    # the recipes' setting: the parameter all-gather overlaps the forward, each layer waits in a forward pre-hook
    "dp2_overlap": {"optimizer.use_distributed_optimizer": True, "ddp.use_distributed_optimizer": True,
                    "optimizer.overlap_param_gather": True, "ddp.overlap_param_gather": True},
    "dp2_ddp": {},
}


def _body(hf_path: str, ckpt_root: str) -> dict[str, tuple[list[float], float]]:
    from train_helpers import make_run_config

    from bridge_train.params_norm import params_l2_norm

    out = {}
    for name, layout in LAYOUTS.items():
        save = {"checkpoint.save": f"{ckpt_root}/{name}"} if name.startswith("dp2") else {}
        result = pretrain(make_run_config(hf_path, **{"train.train_iters": ITERS}, **layout, **save))
        out[name] = (list(result), params_l2_norm(result.model, torch.device("cpu")))
    return out


@pytest.mark.multiproc
def test_parallel_layouts_match_single_process(run_config, tiny_llama, tmp_path):
    from megatron.core.utils import unwrap_model

    reference = pretrain(run_config(**{"train.train_iters": ITERS}))
    # The oracle: the norm over the distinct parameters of the single-process model, in float64.
    unique = {id(p): p for m in unwrap_model(reference.model) for p in m.parameters()}.values()
    norm = sum(float(p.detach().double().pow(2).sum()) for p in unique) ** 0.5
    ranks = run_multiprocess(_body, 2, tiny_llama, str(tmp_path / "ckpt"))
    for name in LAYOUTS:
        for rank in ranks:  # every rank reports the same averaged loss and parameter norm
            losses, params_norm = rank[name]
            torch.testing.assert_close(losses, list(reference), rtol=0, atol=1e-5, msg=f"{name}")
            assert params_norm == pytest.approx(norm, rel=1e-5), name
    # With the overlapped parameter all-gather a step leaves the other rank's shards to the next forward's hooks:
    # the returned model (its norm, above) and the checkpoint saved after the last step must hold them all.
    for rank in ranks:
        assert rank["dp2_overlap"][0] == rank["dp2"][0]
    from safetensors.torch import load_file

    from bridge_convert.offline import export_megatron_checkpoint

    weights = {}
    for name in ("dp2", "dp2_overlap", "dp2_ddp"):
        export_megatron_checkpoint(tmp_path / "ckpt" / name, tmp_path / "hf" / name, progress=False)
        weights[name] = {k: v for f in sorted((tmp_path / "hf" / name).glob("*.safetensors"))
                         for k, v in load_file(f).items()}
    for name in ("dp2", "dp2_overlap"):
        assert weights[name].keys() == weights["dp2_ddp"].keys()
        for key, tensor in weights["dp2_ddp"].items():
            torch.testing.assert_close(weights[name][key], tensor, rtol=0, atol=1e-6, msg=f"{name}: {key}")


def _save_body(hf_path: str, ckpt: str, layout: dict) -> tuple[list[float], list[float]]:
    from train_helpers import make_run_config

    dp2 = {"train.train_iters": 5, "scheduler.lr_warmup_iters": 1, **layout}
    first = pretrain(make_run_config(hf_path, **dp2, **{"checkpoint.save": ckpt, "checkpoint.save_interval": 2,
                                                        "checkpoint.async_save": True}))
    resumed = pretrain(make_run_config(hf_path, **dp2, **{"checkpoint.load": f"{ckpt}/iter_0000002"}))
    return list(first), list(resumed)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [{}, {**LAYOUTS["dp2_overlap"], "mixed_precision": "bf16_mixed"}],
                         ids=["ddp", "distributed_optimizer"])
def test_async_save_of_two_ranks_resumes_bitwise(tiny_llama, tmp_path, layout):
    """Three iterations after the resume equal the uninterrupted run's. With the distributed optimizer (the
    recipes' setting) and torch's Adam a resume first failed (megatron-core could not describe a fresh
    optimizer's state, then found no 'step' to load) and then diverged (one shared 'step' tensor)."""
    for first, resumed in run_multiprocess(_save_body, 2, tiny_llama, str(tmp_path / "ckpt"), layout):
        assert resumed == first[2:]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"


def _virtual_pipeline_body(hf_path: str, ckpt: str) -> tuple[list[float], list[float]]:
    from train_helpers import make_run_config

    vp = {"train.train_iters": ITERS, "model.pipeline_model_parallel_size": 2,
          "model.virtual_pipeline_model_parallel_size": 2}
    first = pretrain(make_run_config(hf_path, **vp, **{"checkpoint.save": ckpt, "checkpoint.save_interval": 2}))
    resumed = pretrain(make_run_config(hf_path, **vp, **{"checkpoint.load": f"{ckpt}/iter_0000002"}))
    return list(first), list(resumed)


@pytest.mark.multiproc
def test_virtual_pipeline_matches_single_process_and_resumes(tmp_path):
    """PP=2 x VP=2 (megatron-core's interleaved schedule, one data iterator per model chunk) over a 4-layer model
    trains as the single process does: 4 micro-batches per step of the same global batch. (With megatron-core's
    default batched p2p it did not: the provider resolves the interleaved schedule's p2p mode, see its test.) Its
    checkpoint (two model chunks per rank) resumes bitwise at the same layout, and a single process fine-tunes
    from its weights as from the single-process checkpoint of the same iteration."""
    from train_helpers import make_run_config

    from bridge_convert.testing import save_tiny_hf_checkpoint

    hf = save_tiny_hf_checkpoint(tmp_path / "hf", "llama", seed=7, num_hidden_layers=4)
    reference = list(pretrain(make_run_config(hf, **{"train.train_iters": ITERS, "checkpoint.save": str(tmp_path / "one"),
                                                     "checkpoint.save_interval": 2})))
    for first, resumed in run_multiprocess(_virtual_pipeline_body, 2, hf, str(tmp_path / "vp")):
        torch.testing.assert_close(first, reference, rtol=0, atol=1e-5)
        assert resumed == first[2:]
    tuned = {}
    for name in ("one", "vp"):
        tuned[name] = list(pretrain(make_run_config(hf, **{
            "train.train_iters": 4, "checkpoint.finetune": True,
            "checkpoint.pretrained_checkpoint": str(tmp_path / name / "iter_0000004")})))
    torch.testing.assert_close(tuned["vp"], tuned["one"], rtol=0, atol=1e-5)


def _renamed_loss_forward_step(data_iterator, model):
    from bridge_train import gpt_forward_step

    output, loss_func = gpt_forward_step(data_iterator, model)

    def renamed(out):
        loss, *rest = loss_func(out)
        return (loss, *rest[:-1], {"loss": rest[-1]["lm loss"]})
    return output, renamed


def _user_error_body(hf_path: str) -> tuple[int, str]:
    import contextlib
    import io

    from train_helpers import make_run_config

    from bridge_train import user_errors_exit

    err = io.StringIO()
    cfg = make_run_config(hf_path, **{"train.train_iters": 4, "model.pipeline_model_parallel_size": 2})
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info, user_errors_exit():
        pretrain(cfg, _renamed_loss_forward_step)
    return info.value.code, err.getvalue().strip().splitlines()[-1]  # after the weight-loading progress bar


@pytest.mark.multiproc
def test_a_user_error_of_the_last_pipeline_stage_is_said_on_every_rank(tiny_llama):
    """The loss dict is checked on the last stage only: it raised there, and rank 0 (the first stage) waited in the
    loss broadcast, so the error was never printed (user_errors_exit printed on rank 0 only)."""
    first, last = run_multiprocess(_user_error_body, 2, tiny_llama)
    assert first[0] == last[0] == 1
    assert first[1].startswith("error: the forward step's loss function must report its loss under the key 'lm "
                               "loss'") and "(on the last pipeline stage)" in first[1]
    assert last[1].startswith("[rank 1] error: the forward step's loss function") and "got ['loss']" in last[1]


def _z_loss_body(hf_path: str) -> dict[str, list[tuple[float, float]]]:
    from test_loop_reporting import _with_z_loss
    from train_helpers import make_run_config

    from bridge_train.metrics import MetricsLogger

    out, seen = {}, []
    real = MetricsLogger.training
    MetricsLogger.training = lambda self, it, scalars: (seen.append(scalars), real(self, it, scalars))[1]
    try:
        for name, layout in (("pp2", {"model.pipeline_model_parallel_size": 2}), ("dp2", {})):
            seen.clear()
            pretrain(make_run_config(hf_path, **{"train.train_iters": 4, "logger.log_interval": 1}, **layout),
                     functools.partial(_with_z_loss, calls=[0]))
            out[name] = [(s["lm loss"], s["z loss"]) for s in seen]
    finally:
        MetricsLogger.training = real
    return out


@pytest.mark.multiproc
def test_other_loss_keys_reach_every_rank(tiny_llama):
    """The first pipeline stage has no losses: the keys of the last one's are sent to it (it logged none)."""
    for rank in run_multiprocess(_z_loss_body, 2, tiny_llama):
        for name, logged in rank.items():
            assert len(logged) == 4 and all(z == pytest.approx(2 * lm, rel=1e-12) for lm, z in logged), name
