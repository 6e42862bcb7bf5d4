"""LoRA fine-tuning throughput of one Llama-3-8B-shaped model on one GPU: bridge-peft vs HF transformers + peft.

Every row is a full training step (forward, backward, optimizer step on the adapters) on random tokens, bf16,
LoRA dim 8 / alpha 16 on every linear layer of the decoder (q, k, v, o, gate, up, down; fused ``linear_qkv`` /
``linear_fc1`` on the megatron side), random base weights:

* ``bridge-lora``      megatron-core GPTModel, bridge-convert's native spec, ``bridge_peft.LoRA`` applied as a
                       pre-wrap hook (so megatron's DDP and optimizer hold the adapters only), bf16 params in
                       ``Float16Module``, fp32 main grads and fp32 master weights of the adapters only
* ``bridge-lora-te``   the same on megatron-core's Transformer Engine spec (only when TE imports)
* ``hf-peft``          HF ``LlamaForCausalLM`` (SDPA) + ``peft.get_peft_model(LoraConfig(...))``, bf16,
                       ``torch.optim.AdamW(fused=True)`` on the trainable parameters
* ``hf-peft-liger``    the same after ``liger_kernel.transformers.apply_liger_kernel_to_llama``

Each row runs in its own subprocess and searches the micro-batch upward (1, 2, 3, 4, 6, 8, ...) until it runs out
of memory; the table reports every micro-batch and the best one per row.

FLOPs of frozen-base training. A linear layer with weight W (``n`` parameters) costs per token 2n FLOPs in the
forward, 2n for the input gradient (dgrad) and 2n for the weight gradient (wgrad). A frozen base weight needs no
wgrad (megatron-core's ``linear_with_frozen_weight``, TE and autograd all skip it), so the base costs 4n per token,
the adapters (``n_a`` parameters, trained) 6 n_a, and attention (no weights) keeps its 12 L H S (forward 4 L H S:
scores and values; backward twice that)::

    FLOPs / token = 4 * N + 6 * N_adapter + 12 * L * H * S

N = parameters that take part in a matmul (decoder linears + the output layer; the input embedding is a lookup),
L = layers, H = hidden size, S = sequence length. (The 4N counts a dgrad for the first layer's input too, which
autograd skips because nothing below it is trained: a 1/L overstatement of the dgrad half.) MFU = that x tokens/s
/ peak (H100 SXM / H200: 989 TFLOP/s dense bf16; ``--peak-tflops`` overrides).

Run on one GPU::

    PYTHONPATH=packages/bridge-convert/src:packages/bridge-peft/src:packages/bridge-train/src python tools/bench/peft_throughput.py --out r.md

``--tiny`` runs a tiny shape on a CPU in about a minute (a check of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_throughput as pt  # noqa: E402  (the shared pieces: timer, result lines, versions, peaks)

ROWS = ("bridge-lora", "bridge-lora-te", "hf-peft", "hf-peft-liger")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MEGATRON_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LLAMA_3_8B = dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256, rope_theta=500000.0,
                  eps=1e-5)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512, rope_theta=500000.0, eps=1e-5)


def matmul_parameters(shape: dict) -> int:
    """Decoder linears + the (untied) output layer."""
    h, d = shape["hidden"], shape["hidden"] // shape["heads"]
    per_layer = 2 * h * h + 2 * h * shape["kv_heads"] * d + 3 * h * shape["ffn"]
    return shape["layers"] * per_layer + shape["vocab"] * h


def adapter_parameters(shape: dict, dim: int) -> int:
    """LoRA parameters on the 7 projections of every layer (the HF / canonical count: A per projection)."""
    h, d, kv, f = shape["hidden"], shape["hidden"] // shape["heads"], shape["kv_heads"], shape["ffn"]
    shapes = [(h, h), (kv * d, h), (kv * d, h), (h, h), (f, h), (f, h), (h, f)]
    return shape["layers"] * sum(dim * (out + inp) for out, inp in shapes)


def flops_per_token(shape: dict, seq: int, dim: int) -> float:
    return (4.0 * matmul_parameters(shape) + 6.0 * adapter_parameters(shape, dim)
            + 12.0 * shape["layers"] * shape["hidden"] * seq)


# ----------------------------------------------------------------------------------------------- worker side
def _bridge_trainer(row: str, args, shape: dict):
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bridge_convert.provider import GPTModelProvider
    from bridge_peft import LoRA

    impl = "transformer_engine" if row == "bridge-lora-te" else "native"
    fusions = dict(bias_activation_fusion=True, bias_dropout_fusion=True, gradient_accumulation_fusion=True)
    if impl == "transformer_engine":
        fusions.update(apply_rope_fusion=True, cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")
    settings = dict(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        num_query_groups=shape["kv_heads"], ffn_hidden_size=shape["ffn"], kv_channels=shape["hidden"] // shape["heads"],
        vocab_size=shape["vocab"], seq_length=args.seq, share_embeddings_and_output_weights=False,
        rotary_base=shape["rope_theta"], layernorm_epsilon=shape["eps"], params_dtype=torch.bfloat16,
        transformer_impl=impl, **fusions,
    )
    settings.update(json.loads(args.provider_overrides or "{}"))
    provider = GPTModelProvider(**settings)
    lora = LoRA(target_modules=MEGATRON_TARGETS, dim=args.dim, alpha=args.alpha)
    model = provider.provide_distributed_model(
        wrap_with_ddp=True, pre_wrap_hooks=[lambda chunks: lora(chunks, training=True)],
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=False))
    counts = lora.parameter_counts(model)
    print(f"[bench] {row}: trainable {counts['trainable']:,} of {counts['total']:,} parameters", file=sys.stderr)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.0, clip_grad=1.0, bf16=True,
                        params_dtype=torch.bfloat16, use_distributed_optimizer=False), model)
    if args.optimizer_kernels == "fused":
        from bridge_train.optim import use_fused_optimizer_kernels

        use_fused_optimizer_kernels(optimizer)
    provider.finalize_model_grads_func = finalize_model_grads
    provider.grad_scale_func = optimizer.scale_loss
    schedule = get_forward_backward_func()
    timer = pt._PhaseTimer()

    def step(ids, labels):
        micro_batch, seq = ids.shape
        position_ids = torch.arange(seq, device=ids.device).unsqueeze(0).expand(micro_batch, seq)
        loss_mask = torch.ones(micro_batch, seq, device=ids.device)

        def forward_step(data_iterator, chunk):
            tokens, targets = next(data_iterator)
            output = chunk(tokens, position_ids, None, labels=targets, loss_mask=loss_mask)

            def loss_func(per_token):
                loss = (per_token.float() * loss_mask).sum() / loss_mask.sum()
                return loss, {"lm loss": loss.detach()}

            return output, loss_func

        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        timer.mark(0)
        losses = schedule(forward_step_func=forward_step, data_iterator=iter([(ids, labels)]), model=model,
                          num_microbatches=1, seq_length=seq, micro_batch_size=micro_batch, forward_only=False)
        timer.mark(1)
        optimizer.step()
        timer.mark(2)
        return losses[0]["lm loss"] if losses else None

    return timer, step


def _hf_trainer(row: str, args, shape: dict, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if row == "hf-peft-liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"], max_position_embeddings=max(8192, args.seq),
        rms_norm_eps=shape["eps"], tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]}, use_cache=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=args.dim, lora_alpha=args.alpha, target_modules=HF_TARGETS,
                                            lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    timer = pt._PhaseTimer()

    def step(ids, labels):
        timer.mark(0)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        timer.mark(1)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.mark(2)
        return loss.detach()

    return timer, step


def run_worker(row: str, args) -> None:
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    shape = TINY if args.tiny else LLAMA_3_8B
    if row == "hf-peft-liger" and device.type != "cuda":
        pt._emit(row, None, status="skipped: needs a CUDA GPU")
        return
    if row == "bridge-lora-te":
        from bridge_convert.specs import te_available

        if not te_available():
            pt._emit(row, None, status="skipped: transformer_engine does not import")
            return
    if row.startswith("bridge"):
        from bridge_convert.runtime import initialize_parallel

        initialize_parallel()
        timer, step = _bridge_trainer(row, args, shape)
    else:
        timer, step = _hf_trainer(row, args, shape, device)
    pt.sweep(row, args, shape, device, timer, step)


# ------------------------------------------------------------------------------------------------ main side
def _run_row(row: str, args) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", row, "--seq", str(args.seq),
           "--micro-batches", ",".join(map(str, args.micro_batches)), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--dim", str(args.dim), "--alpha", str(args.alpha),
           "--optimizer-kernels", args.optimizer_kernels]
    cmd += ["--provider-overrides", args.provider_overrides] if args.provider_overrides else []
    cmd += ["--tiny"] if args.tiny else []
    return pt.spawn_worker(row, cmd, args)


def render(results: list[dict], args, versions: dict) -> str:
    shape = TINY if args.tiny else LLAMA_3_8B
    per_token = flops_per_token(shape, args.seq, args.dim)
    peak = pt.peak_flops(versions["device"], args.peak_tflops)
    fmt = pt._fmt
    lines = [
        f"## LoRA fine-tuning throughput, {'tiny shape (CPU check)' if args.tiny else 'Llama-3-8B shape'}, "
        f"seq {args.seq}",
        "",
        f"- date {datetime.date.today().isoformat()}, device {versions['device']}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}, megatron-core {versions['megatron-core']}, "
        f"liger-kernel {versions['liger-kernel']}, transformer-engine {versions['transformer-engine']}",
        f"- shape: {shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} heads, {shape['kv_heads']} KV "
        f"groups, FFN {shape['ffn']}, vocab {shape['vocab']}, untied; N = {matmul_parameters(shape) / 1e9:.4g}B "
        f"matmul parameters; LoRA dim {args.dim} alpha {args.alpha} on all 7 projections "
        f"(N_adapter = {adapter_parameters(shape, args.dim) / 1e6:.4g}M, HF's count: one A per projection; the "
        "bridge rows' fused linear_qkv / linear_fc1 share one A, slightly fewer)",
        f"- step: forward + backward + AdamW on the adapters, bf16; {args.warmup} warm-up + {args.steps} timed "
        f"steps per micro-batch; PYTORCH_CUDA_ALLOC_CONF={args.alloc_conf or 'unset'}",
        f"- MFU = (4*N + 6*N_adapter + 12*L*H*S) * tokens/s / peak (frozen base: no weight-gradient GEMMs) = "
        f"{per_token / 1e9:.3f} GFLOP/token * tokens/s / {fmt(peak and peak / 1e12, '.0f')} TFLOP/s; "
        "peak GB = torch.cuda.max_memory_allocated / 1e9",
        "",
        "| row | micro-batch | tokens/s | MFU | peak GB | fwd+bwd ms | optim ms | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best: dict[str, dict] = {}
    for r in results:
        tps = r.get("tokens_per_s")
        mfu = tps * per_token / peak if tps and peak else None
        lines.append(f"| {r['row']} | {fmt(r['micro_batch'], 'd')} | {fmt(tps, ',.0f')} | "
                     f"{fmt(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''} | {fmt(r.get('peak_gb'), '.1f')} | "
                     f"{fmt(r.get('fwd_bwd_ms'), '.1f')} | {fmt(r.get('optim_ms'), '.1f')} | {r['status']} |")
        if tps and tps > best.get(r["row"], {}).get("tokens_per_s", 0):
            best[r["row"]] = r
    if best:
        lines += ["", "Best micro-batch per row:", "", "| row | micro-batch | tokens/s | peak GB | vs hf-peft | "
                  "vs hf-peft-liger |", "|---|---|---|---|---|---|"]
        for row, r in best.items():
            ratios = [fmt(r["tokens_per_s"] / best[ref]["tokens_per_s"], ".2f") + "x" if ref in best else "n/a"
                      for ref in ("hf-peft", "hf-peft-liger")]
            lines.append(f"| {row} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {fmt(r.get('peak_gb'), '.1f')} "
                         f"| {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 4096; 64 with --tiny)")
    parser.add_argument("--micro-batches", default=None,
                        help="comma-separated upward search, stopped at the first out-of-memory (default "
                             "1,2,3,4,6,8,12,16; 1,2 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per micro-batch (default 10; 2 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; 1 with --tiny)")
    parser.add_argument("--dim", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=int, default=16, help="LoRA alpha (default 16)")
    parser.add_argument("--tiny", action="store_true", help="tiny shape that runs on CPU (a check of the script)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's bf16 dense peak")
    parser.add_argument("--optimizer-kernels", choices=("fused", "megatron"), default="fused",
                        help="bridge rows: bridge-convert's fused optimizer kernels or megatron-core's fallbacks")
    parser.add_argument("--alloc-conf", default="expandable_segments:True",
                        help="PYTORCH_CUDA_ALLOC_CONF for every row ('' leaves it unset)")
    parser.add_argument("--provider-overrides", default=None,
                        help="JSON object of GPTModelProvider fields for the bridge rows, e.g. "
                             "'{\"recompute_activation_output\": true}'")
    parser.add_argument("--row-timeout", type=float, default=1800, help="seconds before a row is abandoned")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq = args.seq or (64 if args.tiny else 4096)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    default_mbs = "1,2" if args.tiny else "1,2,3,4,6,8,12,16"
    args.micro_batches = [int(x) for x in (args.micro_batches or default_mbs).split(",")]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.provider_overrides:
        try:
            if not isinstance(json.loads(args.provider_overrides), dict):
                raise ValueError("not an object")
        except ValueError as e:
            parser.error(f"--provider-overrides must be a JSON object of GPTModelProvider fields: {e}")
    return args


def main(argv=None) -> int:
    return pt.run_benchmark(parse_args(argv), run_worker, _run_row, render)


if __name__ == "__main__":
    sys.exit(main())
