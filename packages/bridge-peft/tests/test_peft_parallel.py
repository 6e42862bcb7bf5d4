"""TP=2 and PP=2 (gloo, 2 processes): adapter training losses equal TP=1 and HF exports are byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bridge_convert.testing.distributed import run_multiprocess

STEPS = 3


def _methods():
    from bridge_peft import CanonicalLoRA, DoRA, LoRA

    # non-zero B at init (xavier), drawn from full tensors: the same adapters at every layout
    common = dict(dim=4, alpha=8, lora_B_init_method="xavier")
    return {"lora": lambda: LoRA(**common), "dora": lambda: DoRA(**common),
            "canonical": lambda: CanonicalLoRA(**common),
            "lora_split_a": lambda: LoRA(split_a_on_rank=True, **common)}


def _build(hf: str, **layout):
    from bridge_convert import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(hf)
    model = bridge.to_megatron_model(load_weights=True, make_vocab_size_divisible_by=64, **layout)
    return bridge, model


def _train(model, steps: int = STEPS) -> list[float]:
    """``steps`` Adam steps on the adapters through megatron-core's own schedule; the loss on every rank."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bridge_convert.runtime import get_parallel_state

    state = get_parallel_state()
    params = [p for chunk in model for p in chunk.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    tokens, labels = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(16).expand(2, 16)
    for chunk in model:
        chunk.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()

        def step(iterator, chunk):
            next(iterator)
            out = chunk(tokens, positions, None, labels=labels)
            return out, lambda t: (t.float().mean(), {"loss": t.float().mean().detach()})

        out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([0]), model=model,
                                          num_microbatches=1, seq_length=16, micro_batch_size=2,
                                          forward_only=False)
        loss = out[0]["loss"].reshape(1) if state.is_last_pp_stage else torch.zeros(1)
        if state.pp_size > 1:
            dist.broadcast(loss, src=dist.get_process_group_ranks(state.pp_group)[-1], group=state.pp_group)
        opt.step()
        losses.append(float(loss))
    return losses


def _merge_check(model) -> tuple[float, float]:
    """(max |logits merged - logits with adapters|, max |base after unmerge - base before merge|)."""
    from bridge_convert.forward import forward_logits
    from bridge_peft import merge_adapters, unmerge_adapters

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    before = forward_logits(model, ids)
    base = {n: p.detach().clone() for n, p in model[0].named_parameters() if ".adapter." not in n}
    merge_adapters(model)
    merged = forward_logits(model, ids)
    unmerge_adapters(model)
    restored = max((p.detach() - base[n]).abs().max().item() for n, p in model[0].named_parameters() if n in base)
    return (merged - before).abs().max().item(), restored


def _export(bridge, model, out: Path) -> dict[str, bytes]:
    from bridge_peft import save_hf_adapter

    save_hf_adapter(bridge, model, out, overwrite=True)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _parallel_body(hf: str, hf_tied: str, out: str) -> dict:
    import os

    from bridge_convert.runtime import ParallelLayout, initialize_parallel

    rank = int(os.environ["RANK"])
    results: dict = {"tp2_error": "no error"}
    methods = _methods()
    # --- TP=2: every method, sequence parallelism with a rank-split A, the divisibility error
    initialize_parallel(ParallelLayout(tensor_model_parallel_size=2), seed=1)
    for name in ("lora", "dora", "canonical"):
        bridge, model = _build(hf, tensor_model_parallel_size=2)
        methods[name]()(model)
        if name == "lora":
            results["tp2_export"] = _export(bridge, model, Path(out) / "tp2")
        results[f"tp2_{name}"] = _train(model)
        if name == "dora":  # the DoRA norm of the row-parallel layers is summed over TP
            results["tp2_merge_dora"] = _merge_check(model)
    _, model = _build(hf, tensor_model_parallel_size=2, sequence_parallel=True)
    methods["lora_split_a"]()(model)
    results["tp2_sp_split_a"] = _train(model)
    results["tp2_merge_split_a"] = _merge_check(model)  # a rank-split A is gathered for s B A
    from bridge_peft import LoRA

    _, model = _build(hf, tensor_model_parallel_size=2)
    try:
        LoRA(dim=3, split_a_on_rank=True)(model)
    except ValueError as exc:
        results["tp2_error"] = str(exc)
    # --- PP=2 (same processes, new model-parallel groups)
    initialize_parallel(ParallelLayout(pipeline_model_parallel_size=2), seed=1)
    bridge, model = _build(hf, pipeline_model_parallel_size=2)
    methods["lora"]()(model)
    results["pp2_export"] = _export(bridge, model, Path(out) / "pp2")
    results["pp2_lora"] = _train(model)
    # a tied output layer: at PP=2 the last stage holds a synced copy of the embedding; refused on both ranks
    _, model = _build(hf_tied, pipeline_model_parallel_size=2)
    try:
        LoRA(target_modules=["linear_proj", "output_layer"])(model)
    except ValueError as exc:
        results["pp2_tied_error"] = str(exc)
    return results if rank == 0 else {"pp2_tied_error": results.get("pp2_tied_error")}


@pytest.mark.multiproc
def test_tp2_pp2_match_tp1(hf_checkpoints, runtime, tmp_path):
    hf = hf_checkpoints["llama31"]
    ranks = run_multiprocess(_parallel_body, 2, hf, hf_checkpoints["llama32"], str(tmp_path / "parallel"),
                             timeout=900)
    parallel = ranks[0]
    assert all("output_layer shares its weight" in (r["pp2_tied_error"] or "") for r in ranks)
    methods = _methods()
    reference = {}
    for name in ("lora", "dora", "canonical"):
        bridge, model = _build(hf)
        methods[name]()(model)
        if name == "lora":
            reference["export"] = _export(bridge, model, tmp_path / "tp1")
        reference[name] = _train(model)
    for name in ("lora", "dora", "canonical"):
        assert reference[name][-1] < reference[name][0]  # the adapters train
        torch.testing.assert_close(parallel[f"tp2_{name}"], reference[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(parallel["tp2_sp_split_a"], reference["lora"], atol=1e-5, rtol=0)
    torch.testing.assert_close(parallel["pp2_lora"], reference["lora"], atol=1e-5, rtol=0)
    assert parallel["tp2_export"] == reference["export"]  # byte for byte
    assert parallel["pp2_export"] == reference["export"]
    assert "divisible by the tensor-parallel size (2)" in parallel["tp2_error"]
    for key in ("tp2_merge_dora", "tp2_merge_split_a"):
        logits_diff, restored = parallel[key]
        assert logits_diff <= 1e-4 and restored <= 1e-6, (key, parallel[key])


def _virtual_pipeline_body(hf: str, out: str) -> dict:
    from bridge_convert.runtime import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(pipeline_model_parallel_size=2), seed=1)
    bridge, model = _build(hf, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    assert len(model) == 2
    _methods()["lora"]()(model)
    return {"export": _export(bridge, model, Path(out)), "merge": _merge_check(model)}


@pytest.mark.multiproc
def test_virtual_pipeline_export_matches_tp1(runtime, tmp_path):
    """PP=2 x VP=2 over a 4-layer model (layers 0 and 2 on rank 0, 1 and 3 on rank 1): the exported adapter names
    each layer by its global index, byte-identical to the single-process export; merging keeps the logits."""
    from bridge_convert.testing import save_tiny_hf_checkpoint

    hf = save_tiny_hf_checkpoint(tmp_path / "hf", "llama31", seed=3, num_hidden_layers=4)
    ranks = run_multiprocess(_virtual_pipeline_body, 2, hf, str(tmp_path / "vp"), timeout=600)
    bridge, model = _build(hf)
    _methods()["lora"]()(model)
    assert ranks[0]["export"] == _export(bridge, model, tmp_path / "tp1")  # byte for byte
    for rank in ranks:
        logits_diff, restored = rank["merge"]
        assert logits_diff <= 1e-4 and restored <= 1e-6, rank["merge"]
