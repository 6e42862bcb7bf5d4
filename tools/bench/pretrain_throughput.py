"""Pretraining throughput of one Llama-3.2-1B-shaped model on one GPU: megatron-core specs vs HF transformers.

Every row is a full training step (forward, backward, optimizer step) on random tokens, bf16:

* ``native``          megatron-core GPTModel, bridge-convert's native spec (SDPA, fused norm/RoPE, fused chunked loss)
* ``native-lean``     the same with ``recompute_activation_output=True`` and ``recompute_modules=["layernorm"]``
                      (SwiGLU and norm outputs released after their consumer's forward, recomputed for its backward)
* ``native-compile``  the same with ``compile_layers=True`` (``torch.compile`` of each transformer layer)
* ``local``           megatron-core GPTModel, megatron-core's local spec
* ``te``              megatron-core GPTModel, megatron-core's Transformer Engine spec (only when TE imports)
* ``te-fp8cs``        the ``te`` row with FP8 (hybrid) per-tensor current scaling in every layer (TE's
                      ``Float8CurrentScaling``); ``te-fp8delayed`` delayed scaling (amax history 1024, max);
                      ``te-fp8block`` 128-element block scaling (``Float8BlockScaling``, Hopper)
* ``te-plain``        a plain megatron-core GPTModel with the TE spec: bf16 parameters and torch's fused AdamW, no
                      DDP / megatron optimizer (no fp32 master weights); ``te-plain-fp8cs`` the same in FP8
                      current scaling: the fastest step megatron-core + TE give, what the loop is held against
* ``hf``              HF transformers ``LlamaForCausalLM`` with SDPA attention
* ``hf-liger``        the same after ``liger_kernel.transformers.apply_liger_kernel_to_llama``
* ``hf-liger-amp``    HF + liger the way HF Trainer's ``bf16=True`` trains: fp32 parameters and AdamW state,
                      forward under ``torch.autocast(bfloat16)`` (the precision recipe of megatron's bf16_mixed)
* ``loop-native``     ``pretrain()`` itself (bridge-train's example ``pretrain_llama.py`` on mock data, the same
                      shape and micro-batch, distributed optimizer as the recipes use) with the native spec and
                      ``bf16_mixed``; ``loop-te`` the TE spec; ``loop-te-fp8cs`` / ``loop-te-fp8delayed`` /
                      ``loop-te-fp8block`` the TE spec with ``bf16_with_fp8_current_scaling_mixed`` /
                      ``..._delayed_scaling_...`` / ``..._subchannel_scaling_...``. Timed by the loop's own
                      per-interval log (the first interval, with the first iteration, is left out)

megatron-core rows train the way megatron-core trains: bf16 params inside ``Float16Module``, megatron's
``DistributedDataParallel`` with fp32 main grads, ``get_megatron_optimizer`` (fp32 main params, AdamW, grad
clipping) and the no-pipelining schedule from ``get_forward_backward_func``. HF rows train as HF users do:
bf16 params and ``torch.optim.AdamW(fused=True)``. Each row runs in its own subprocess (liger patches HF
classes globally; GPU memory is fully returned between rows) and sweeps the micro-batches, stopping at the
first out-of-memory.

MFU = tokens/s x training FLOPs per token / peak, counted by ``bridge_train.flops`` (the training loop's own
count: 6 N + 12 L H S, N the matmul parameters, see bridge-train's README); peak = the card's dense bf16
tensor-core peak from the same module (``--peak-tflops`` overrides).

Run on one GPU (repo code and megatron-core / liger wheels on PYTHONPATH)::

    PYTHONPATH=packages/bridge-convert/src:packages/bridge-train/src:<site> \
        python tools/bench/pretrain_throughput.py --seq 4096 --out r.md

``--tiny`` runs a tiny shape that finishes on a CPU in about a minute (a check of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time

ROWS = ("native", "native-lean", "native-compile", "local", "te", "te-fp8cs", "te-fp8delayed", "te-fp8block",
        "te-plain", "te-plain-fp8cs", "hf", "hf-liger", "hf-liger-amp", "loop-native", "loop-te", "loop-te-fp8cs",
        "loop-te-fp8delayed", "loop-te-fp8block")
MEGATRON_ROWS = {"native": "native", "native-lean": "native", "native-compile": "native", "local": "local",
                 "te": "transformer_engine", "te-fp8cs": "transformer_engine", "te-fp8delayed": "transformer_engine",
                 "te-fp8block": "transformer_engine"}
PLAIN_ROWS = {"te-plain": None, "te-plain-fp8cs": "fp8cs"}
# FP8 settings of the megatron rows: the format and scaling of bridge-train's FP8 recipes, in every layer.
FP8 = {"fp8cs": dict(fp8="hybrid", fp8_recipe="tensorwise"),
       "fp8delayed": dict(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1024, fp8_amax_compute_algo="max"),
       "fp8block": dict(fp8="hybrid", fp8_recipe="blockwise")}
LOOP_ROWS = {"loop-native": ("native", "bf16_mixed"), "loop-te": ("transformer_engine", "bf16_mixed"),
             "loop-te-fp8cs": ("transformer_engine", "bf16_with_fp8_current_scaling_mixed"),
             "loop-te-fp8delayed": ("transformer_engine", "bf16_with_fp8_delayed_scaling_mixed"),
             "loop-te-fp8block": ("transformer_engine", "bf16_with_fp8_subchannel_scaling_mixed")}
TE_ROWS = {*(r for r in MEGATRON_ROWS if r.startswith("te")), *PLAIN_ROWS,
           *(r for r, (impl, _) in LOOP_ROWS.items() if impl == "transformer_engine")}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT_TAG = "BENCH_RESULT "



def _shape(raw: dict) -> dict:
    """The fields this benchmark reads, from an HF config.json."""
    return dict(layers=raw["num_hidden_layers"], hidden=raw["hidden_size"], heads=raw["num_attention_heads"],
                kv_heads=raw["num_key_value_heads"], ffn=raw["intermediate_size"], vocab=raw["vocab_size"],
                rope_theta=raw["rope_theta"], rope_factor=raw["rope_scaling"]["factor"],
                rope_original_max=raw["rope_scaling"]["original_max_position_embeddings"], eps=raw["rms_norm_eps"])


def _llama32_1b() -> dict:
    from bridge_recipes.llama import hf_config  # the shipped config.json of the hub model

    return _shape(hf_config("Llama-3.2-1B"))


LLAMA_32_1B = _llama32_1b()
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512, rope_theta=500000.0, rope_factor=32.0,
            rope_original_max=64, eps=1e-5)


def model_shape(shape: dict):
    """The bench shape as bridge_train.flops counts it (the HF and megatron rows train the same model)."""
    from bridge_train.flops import ModelShape

    return ModelShape(num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                      num_query_groups=shape["kv_heads"], kv_channels=shape["hidden"] // shape["heads"],
                      ffn_hidden_size=shape["ffn"], vocab_size=shape["vocab"], gated_linear_unit=True)


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    from bridge_train.flops import peak_flops as card_peak

    return card_peak(device_name)


# ----------------------------------------------------------------------------------------------- worker side
def _batch(args, shape: dict, micro_batch: int, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(1234)
    ids = torch.randint(0, shape["vocab"], (micro_batch, args.seq), generator=g).to(device)
    labels = torch.randint(0, shape["vocab"], (micro_batch, args.seq), generator=g).to(device)
    return ids, labels


def _provider_shape(shape: dict, seq: int) -> dict:
    """The bench shape as GPTModelProvider fields (tied embeddings, Llama 3 RoPE scaling)."""
    return dict(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        num_query_groups=shape["kv_heads"], ffn_hidden_size=shape["ffn"], kv_channels=shape["hidden"] // shape["heads"],
        vocab_size=shape["vocab"], seq_length=seq, share_embeddings_and_output_weights=True,
        rotary_base=shape["rope_theta"], rope_scaling=True, rope_scaling_factor=shape["rope_factor"],
        rope_scaling_original_max_position_embeddings=shape["rope_original_max"], layernorm_epsilon=shape["eps"],
    )


def _megatron_trainer(row: str, args, shape: dict):
    """Build a megatron-core GPTModel the way bridge-train does; returns (model, step(ids, labels) -> loss)."""
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bridge_convert.provider import GPTModelProvider

    impl = MEGATRON_ROWS[row]
    # gradient_accumulation_fusion: wgrad GEMMs write into the fp32 main_grad (apex, TE, or bridge-convert's torch
    # kernel); what GPTModelProvider turns on by default under DDP on a GPU.
    fusions = dict(bias_activation_fusion=True, bias_dropout_fusion=True, gradient_accumulation_fusion=True)
    if impl == "local":
        # megatron-core's own torch-native fused cross entropy (torch.compile'd), the best the local spec gets.
        fusions.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native")
    if impl == "transformer_engine":
        fusions.update(apply_rope_fusion=True, cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")
    settings = dict(
        **_provider_shape(shape, args.seq), params_dtype=torch.bfloat16, transformer_impl=impl, compile_layers=row == "native-compile",
        recompute_activation_output=row == "native-lean", **fusions,
    )
    if row == "native-lean":
        settings.update(recompute_granularity="selective", recompute_modules=["layernorm"])
    settings.update(FP8.get(row.removeprefix("te-"), {}))
    settings.update(json.loads(args.provider_overrides or "{}"))  # the command line has the last word
    provider = GPTModelProvider(**settings)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    model = provider.provide_distributed_model(wrap_with_ddp=True, ddp_config=ddp_config)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                        clip_grad=1.0, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=False),
        model,
    )
    if args.optimizer_kernels == "fused":
        from bridge_train.optim import use_fused_optimizer_kernels

        print(f"[bench] {row}: fused optimizer kernels: {use_fused_optimizer_kernels(optimizer)}", file=sys.stderr)
    provider.finalize_model_grads_func = finalize_model_grads
    provider.grad_scale_func = optimizer.scale_loss
    schedule = get_forward_backward_func()
    timer = _PhaseTimer()

    def step(ids, labels):
        micro_batch, seq = ids.shape
        position_ids = torch.arange(seq, device=ids.device).unsqueeze(0).expand(micro_batch, seq)
        loss_mask = torch.ones(micro_batch, seq, device=ids.device)

        def forward_step(data_iterator, chunk):
            tokens, targets = next(data_iterator)
            output = chunk(tokens, position_ids, None, labels=targets, loss_mask=loss_mask)

            def loss_func(per_token):
                _forward_done()
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

    return timer, step, model


def _hf_trainer(row: str, args, shape: dict, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if row in ("hf-liger", "hf-liger-amp"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"], max_position_embeddings=max(131072, args.seq),
        rms_norm_eps=shape["eps"], tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": shape["rope_theta"], "factor": shape["rope_factor"],
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": shape["rope_original_max"]},
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    amp = row == "hf-liger-amp"  # fp32 weights and optimizer state, bf16 autocast: HF Trainer's bf16=True
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.float32 if amp else torch.bfloat16)
    model.train()

    def forward_loss(ids, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return model(input_ids=ids, labels=labels).loss

    return _torch_trainer(model, forward_loss)


def _torch_trainer(model, forward_loss):
    """A step the way plain PyTorch trains: ``forward_loss(ids, labels)``, backward, clip 1.0, fused AdamW."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    timer = _PhaseTimer()

    def step(ids, labels):
        timer.mark(0)
        loss = forward_loss(ids, labels)
        _forward_done()
        loss.backward()
        timer.mark(1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.mark(2)
        return loss.detach()

    return timer, step, [model]


def _plain_te_trainer(row: str, args, shape: dict):
    """megatron-core GPTModel + TE spec trained like a plain PyTorch model: bf16 weights, torch fused AdamW."""
    import torch

    from bridge_convert.provider import GPTModelProvider

    settings = dict(
        **_provider_shape(shape, args.seq), params_dtype=torch.bfloat16, transformer_impl="transformer_engine", gradient_accumulation_fusion=False,
        apply_rope_fusion=True, cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te",
        **FP8.get(PLAIN_ROWS[row] or "", {}),
    )
    settings.update(json.loads(args.provider_overrides or "{}"))
    model = GPTModelProvider(**settings).provide_distributed_model(wrap_with_ddp=False)[0]

    def forward_loss(ids, labels):
        micro_batch, seq = ids.shape
        position_ids = torch.arange(seq, device=ids.device).unsqueeze(0).expand(micro_batch, seq)
        return model(ids, position_ids, None, labels=labels).float().mean()

    return _torch_trainer(model, forward_loss)


def run_loop_row(row: str, args) -> list[dict]:
    """Time ``pretrain()`` itself: bridge-train's example on mock data, one process per micro-batch."""
    import tempfile

    impl, precision = LOOP_ROWS[row]
    if impl == "transformer_engine":
        import torch

        from bridge_convert.specs import te_available

        if not torch.cuda.is_available():
            return [{"row": row, "micro_batch": None, "status": "skipped: needs a CUDA GPU"}]
        if not te_available():
            return [{"row": row, "micro_batch": None, "status": "skipped: transformer_engine does not import"}]
    interval = 5
    iters = interval * (1 + -(-args.steps // interval))  # the first interval is warm-up
    results = []
    for micro_batch in args.micro_batches:
        with tempfile.TemporaryDirectory(prefix="bridge-loop-") as workdir:  # the run's files go with it
            results.append(_loop_point(row, impl, precision, micro_batch, iters, interval, args, workdir))
        print(f"[bench] {json.dumps(results[-1])}", file=sys.stderr, flush=True)
        if results[-1]["status"] != "ok":
            break
    return results


def _loop_point(row: str, impl: str, precision: str, micro_batch: int, iters: int, interval: int, args,
                workdir: str) -> dict:
    """One ``pretrain()`` run of the example at ``micro_batch``; tokens/s from its log after the first interval."""
    import re

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from scaling import parse_log  # the loop's log-line parser, shared with the scaling benchmark

    source = (["--tiny", os.path.join(workdir, "tiny-hf")] if args.tiny else
              ["--hf-config", os.path.join(ROOT, "packages/bridge-recipes/src/bridge_recipes/llama/hf_configs/"
                                                 "Llama-3.2-1B.json"), f"mixed_precision={precision}"])
    cmd = [sys.executable, os.path.join(ROOT, "packages/bridge-train/examples/pretrain_llama.py"), *source,
           "--mock", "--workdir", workdir, "--no-export", f"model.transformer_impl={impl}",
           f"dataset.seq_length={args.seq}", f"train.micro_batch_size={micro_batch}",
           f"train.global_batch_size={micro_batch}", f"train.train_iters={iters}", "train.eval_interval=null",
           f"logger.log_interval={interval}", "logger.progress_bar=false", "logger.tensorboard_dir=null",
           "checkpoint.save=null", "checkpoint.load=null", "checkpoint.save_interval=null",
           "checkpoint.keep_last_n=null",
           # the recipes' data-parallel setting: distributed optimizer, overlapped grad reduce and param gather
           "optimizer.use_distributed_optimizer=true", "ddp.use_distributed_optimizer=true",
           "ddp.overlap_grad_reduce=true", "ddp.overlap_param_gather=true", "optimizer.overlap_param_gather=true",
           "optimizer.lr=1e-4", "optimizer.min_lr=1e-5", "optimizer.weight_decay=0.1", *args.loop_overrides]
    trace_dir = os.path.join(workdir, "trace")
    if args.profile_dir:  # one iteration of the second interval under torch.profiler
        cmd += ["profiling.use_pytorch_profiler=true", f"profiling.profile_step_start={interval + 2}",
                f"profiling.profile_step_end={interval + 3}", f"profiling.profile_dir={trace_dir}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    print(f"[bench] {row} mb{micro_batch}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout, env=env)
    log = done.stdout + done.stderr
    if done.returncode:
        print(log[-4000:], file=sys.stderr)
        status = "OOM" if "OutOfMemoryError" in log else f"error (exit {done.returncode}): " + " | ".join(
            [line for line in log.splitlines() if line.strip()][-3:])
        return {"row": row, "micro_batch": micro_batch, "status": status}
    tokens, _ = parse_log(log, skip=1)
    if args.profile_dir:
        traces = [os.path.join(trace_dir, f) for f in os.listdir(trace_dir)] if os.path.isdir(trace_dir) else []
        os.makedirs(args.profile_dir, exist_ok=True)
        with open(os.path.join(args.profile_dir, f"{row}-mb{micro_batch}.txt"), "w") as f:
            f.write(summarize_trace(traces[0]) if traces else "no trace was written\n")
    memory = [float(m) for m in re.findall(r"memory max allocated \(GB\) ([\d.]+)", log)]
    losses = re.findall(r"lm loss ([\d.]+)", log)
    return {"row": row, "micro_batch": micro_batch, "status": "ok", "tokens_per_s": tokens,
            "peak_gb": memory[-1] * 2**30 / 1e9 if memory else None,
            "loss": float(losses[-1]) if losses else None}


def summarize_trace(path: str, top: int = 30) -> str:
    """GPU time of a torch.profiler Chrome trace: busy vs idle over the profiled span, and the top kernels."""
    import collections
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        return "no GPU events in the trace\n"
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, spans[0][0]
    for start, stop in spans:  # union of the kernel intervals (streams may overlap)
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    wall = spans[-1][1] - spans[0][0]
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    lines = [f"profiled span {wall / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms ({busy / wall:.1%}), idle "
             f"{(wall - busy) / 1e3:.1f} ms; {len(kernels)} kernels, sum {sum(v[0] for v in by_name.values()) / 1e3:.1f}"
             " ms", "", f"{'ms':>9} {'count':>6}  kernel"]
    for name, (dur, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{dur / 1e3:9.2f} {count:6d}  {name[:110]}")
    return "\n".join(lines) + "\n"


class _PhaseTimer:
    """CUDA-event timestamps at the phase boundaries of each step (no host sync until read); no-op on CPU."""

    def __init__(self) -> None:
        import torch

        self.enabled = torch.cuda.is_available()
        self.events: list[list] = []

    def mark(self, phase: int) -> None:
        if not self.enabled:
            return
        import torch

        if phase == 0:
            self.events.append([])
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events[-1].append(event)

    def reset(self) -> None:
        self.events = []

    def phase_ms(self) -> tuple[float | None, float | None]:
        """Mean (forward + backward, optimizer) milliseconds over the steps since the last reset."""
        steps = [e for e in self.events if len(e) == 3]
        if not steps:
            return None, None
        fwd_bwd = sum(e[0].elapsed_time(e[1]) for e in steps) / len(steps)
        optim = sum(e[1].elapsed_time(e[2]) for e in steps) / len(steps)
        return fwd_bwd, optim


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_worker(row: str, args) -> None:
    """Build one row's model once and time it at each micro-batch; prints one result line per micro-batch."""
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    shape = TINY if args.tiny else LLAMA_32_1B
    if (row.startswith("hf-liger") or row in TE_ROWS or row == "native-compile") and device.type != "cuda":
        _emit(row, None, status="skipped: needs a CUDA GPU")
        return
    if row in TE_ROWS:
        from bridge_convert.specs import te_available

        if not te_available():
            _emit(row, None, status="skipped: transformer_engine does not import")
            return
    if row in MEGATRON_ROWS:
        timer, step, modules = _megatron_trainer(row, args, shape)
    elif row in PLAIN_ROWS:
        timer, step, modules = _plain_te_trainer(row, args, shape)
    else:
        timer, step, modules = _hf_trainer(row, args, shape, device)
    def extra(micro_batch, ids, labels):
        if args.profile_dir and device.type == "cuda":
            _profile_step(row, micro_batch, step, ids, labels, args.profile_dir)
        if args.memory_dir:
            _memory_report(row, micro_batch, step, ids, labels, modules, args.memory_dir)

    sweep(row, args, shape, device, timer, step, after_timing=extra)


def sweep(row: str, args, shape: dict, device, timer, step, after_timing=None) -> None:
    """Time ``step`` at each micro-batch of ``args.micro_batches`` (warm-up, then ``args.steps`` timed steps) and
    print one result line each; stops at the first out-of-memory. ``after_timing(micro_batch, ids, labels)`` runs
    after each timed micro-batch (profiles, memory reports). Shared by every benchmark of this directory."""
    import torch

    for micro_batch in args.micro_batches:
        try:
            ids, labels = _batch(args, shape, micro_batch, device)
            for _ in range(args.warmup):
                loss = step(ids, labels)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timer.reset()
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = step(ids, labels)
            _sync(device)
            elapsed = time.perf_counter() - start
        except torch.OutOfMemoryError:
            _emit(row, micro_batch, status="OOM")
            ids = labels = loss = None
            gc.collect()
            torch.cuda.empty_cache()
            return  # a larger micro-batch would not fit either
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
        fwd_bwd_ms, optim_ms = timer.phase_ms()
        if after_timing is not None:
            after_timing(micro_batch, ids, labels)
        _emit(row, micro_batch, status="ok", seconds=elapsed, steps=args.steps,
              tokens_per_s=micro_batch * args.seq * args.steps / elapsed, peak_gb=peak,
              fwd_bwd_ms=fwd_bwd_ms, optim_ms=optim_ms, loss=float(loss) if loss is not None else None)


def _profile_step(row: str, micro_batch: int, step, ids, labels, out_dir: str) -> None:
    """One extra step under torch.profiler; writes the top CUDA kernels to ``out_dir/<row>-mb<N>.txt``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(ids, labels)
        torch.cuda.synchronize()
    os.makedirs(out_dir, exist_ok=True)
    averages = prof.key_averages()
    table = (averages.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
             + "\n\nHost side (self CPU time):\n"
             + averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90))
    trace = os.path.join(out_dir, f".{row}-mb{micro_batch}.json")
    prof.export_chrome_trace(trace)
    with open(os.path.join(out_dir, f"{row}-mb{micro_batch}.txt"), "w") as f:
        f.write(summarize_trace(trace) + "\n" + table)
    os.remove(trace)


_FORWARD_DONE: list = []


def _forward_done() -> None:
    """Called by each row's step between its forward (loss computed) and its backward."""
    for fn in _FORWARD_DONE:
        fn()


def _memory_report(row: str, micro_batch: int, step, ids, labels, modules, out_dir: str) -> None:
    """One extra step that accounts for memory; writes ``out_dir/<row>-mb<N>-memory.txt``.

    Reports the memory held between steps (parameters, gradient buffers, optimizer state), what the forward adds
    (everything alive when the loss is computed), the step's peak, and the tensors autograd saved during the
    forward (``save_for_backward`` and built-in ops, through saved-tensor hooks), each storage counted once, grouped
    by the innermost module that was running and by shape and dtype. Tensors kept on an autograd ``ctx`` outside
    ``save_for_backward`` are not seen by the hooks: they are in the forward's total, not in the groups.
    """
    import collections

    import torch

    cuda = torch.cuda.is_available()
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    stack: list[str] = []

    def enter(module, inputs) -> None:
        stack.append(type(module).__name__)

    def leave(module, inputs, output) -> None:  # returns None: a forward hook's return value replaces the output
        if stack:
            stack.pop()

    handles = []
    for m in modules:
        for sub in m.modules():
            handles += [sub.register_forward_pre_hook(enter), sub.register_forward_hook(leave)]
    seen: dict[int, tuple] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in params and ptr not in seen:
                seen[ptr] = (stack[-1] if stack else "(no module)", tuple(t.shape), str(t.dtype).replace("torch.", ""),
                             storage.nbytes())
        return t

    marks = {}
    _FORWARD_DONE.append(lambda: marks.setdefault("forward", allocated()))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = allocated()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(ids, labels)
        if cuda:
            torch.cuda.synchronize()
    finally:
        _FORWARD_DONE.clear()
        for h in handles:
            h.remove()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    groups = collections.defaultdict(lambda: [0, 0])
    for module, shape, dtype, nbytes in seen.values():
        key = (module, shape, dtype)
        groups[key][0] += 1
        groups[key][1] += nbytes
    saved_total = sum(v[1] for v in groups.values())
    forward = marks.get("forward", before) - before
    lines = [f"{row}, micro-batch {micro_batch}: between steps {before / 1e9:.2f} GB; the forward adds "
             f"{forward / 1e9:.2f} GB; peak of the step {peak / 1e9:.2f} GB (+{(peak - before) / 1e9:.2f} GB)",
             f"autograd-saved storages (hooks, parameters excluded): {saved_total / 1e9:.2f} GB in {len(seen)} "
             f"storages; forward total minus these: {(forward - saved_total) / 1e9:.2f} GB", "",
             f"{'GB':>8} {'count':>6}  module / shape / dtype"]
    for (module, shape, dtype), (count, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{nbytes / 1e9:8.3f} {count:6d}  {module} {list(shape)} {dtype}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{row}-mb{micro_batch}-memory.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _emit(row: str, micro_batch: int | None, **fields) -> None:
    print(RESULT_TAG + json.dumps({"row": row, "micro_batch": micro_batch, **fields}), flush=True)


# ------------------------------------------------------------------------------------------------ main side
def _versions() -> dict:
    code = ("import json, torch, transformers\n"
            "from importlib.metadata import version\n"
            "out = {'torch': torch.__version__, 'transformers': transformers.__version__,\n"
            "       'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}\n"
            "for name in ('megatron-core', 'liger-kernel', 'transformer-engine'):\n"
            "    try:\n"
            "        out[name] = version(name)\n"
            "    except Exception:\n"
            "        out[name] = 'absent'\n"
            "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_row(row: str, args) -> list[dict]:
    if row in LOOP_ROWS:
        return run_loop_row(row, args)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", row, "--seq", str(args.seq),
           "--micro-batches", ",".join(map(str, args.micro_batches)), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--optimizer-kernels", args.optimizer_kernels]
    cmd += ["--profile-dir", args.profile_dir] if args.profile_dir else []
    cmd += ["--memory-dir", args.memory_dir] if args.memory_dir else []
    cmd += ["--provider-overrides", args.provider_overrides] if args.provider_overrides else []
    cmd += ["--tiny"] if args.tiny else []
    return spawn_worker(row, cmd, args)


def spawn_worker(row: str, cmd: list[str], args) -> list[dict]:
    """Run one row's worker process (``cmd``) and collect its result lines; a failure becomes an error row."""
    env = dict(os.environ)
    if args.alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    print(f"[bench] {row}: running", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout, env=env)
    results = [json.loads(line[len(RESULT_TAG):]) for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        results.append({"row": row, "micro_batch": None, "status": f"error (exit {done.returncode}): {tail}"})
        print(done.stderr[-4000:], file=sys.stderr)
    for r in results:
        print(f"[bench] {json.dumps(r)}", file=sys.stderr, flush=True)
    return results


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render(results: list[dict], args, versions: dict) -> str:
    shape = TINY if args.tiny else LLAMA_32_1B
    per_token = model_shape(shape).training_flops_per_token(args.seq)
    peak = peak_flops(versions["device"], args.peak_tflops)
    n = model_shape(shape).matmul_parameters()
    lines = [
        f"## Pretraining throughput, {'tiny shape (CPU check)' if args.tiny else 'Llama-3.2-1B shape'}, "
        f"seq {args.seq}",
        "",
        f"- date {datetime.date.today().isoformat()}, device {versions['device']}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}, megatron-core {versions['megatron-core']}, "
        f"liger-kernel {versions['liger-kernel']}, transformer-engine {versions['transformer-engine']}",
        f"- shape: {shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} heads, {shape['kv_heads']} KV "
        f"groups, FFN {shape['ffn']}, vocab {shape['vocab']}, tied embeddings; N = {n / 1e9:.4f}B matmul parameters",
        f"- step: forward + backward + AdamW, bf16; {args.warmup} warm-up + {args.steps} timed steps per micro-batch; "
        f"megatron optimizer kernels: {args.optimizer_kernels}; PYTORCH_CUDA_ALLOC_CONF={args.alloc_conf or 'unset'}",
        f"- MFU = (6*N + 12*L*H*S) * tokens/s / peak (bridge_train.flops) = {per_token / 1e9:.3f} GFLOP/token * "
        f"tokens/s / "
        f"{_fmt(peak and peak / 1e12, '.0f')} TFLOP/s; peak GB = torch.cuda.max_memory_allocated / 1e9",
        "",
        "| row | micro-batch | tokens/s | MFU | peak GB | fwd+bwd ms | optim ms | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tps = r.get("tokens_per_s")
        mfu = tps * per_token / peak if tps and peak else None
        lines.append(f"| {r['row']} | {_fmt(r['micro_batch'], 'd')} | {_fmt(tps, ',.0f')} | "
                     f"{_fmt(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''} | {_fmt(r.get('peak_gb'), '.1f')} | "
                     f"{_fmt(r.get('fwd_bwd_ms'), '.1f')} | {_fmt(r.get('optim_ms'), '.1f')} | {r['status']} |")
    best = {}
    for r in results:
        if r.get("tokens_per_s") and r["tokens_per_s"] > best.get(r["row"], {}).get("tokens_per_s", 0):
            best[r["row"]] = r
    if best:
        lines += ["", "Best micro-batch per row (ratios against the HF rows of this run):", "",
                  "| row | micro-batch | tokens/s | vs hf | vs hf-liger |", "|---|---|---|---|---|"]
        for row, r in best.items():
            ratios = [_fmt(r["tokens_per_s"] / best[ref]["tokens_per_s"], ".2f") + "x" if ref in best else "n/a"
                      for ref in ("hf", "hf-liger")]
            lines.append(f"| {row} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {ratios[0]} | {ratios[1]} |")
        pairs = [(a, b) for a, b in TARGETS if a in best and b in best]
        if pairs:
            lines += ["", "The loop against its references (best micro-batch of each, this run):", "",
                      "| ratio | value | target |", "|---|---|---|"]
            for a, b in pairs:
                ratio = best[a]["tokens_per_s"] / best[b]["tokens_per_s"]
                lines.append(f"| {a} / {b} | {ratio:.3f}x | {TARGETS[(a, b)]} |")
    return "\n".join(lines) + "\n"


# (row, reference) -> target of the ratio: the training loop against the step it is built from
TARGETS = {("loop-native", "native"): ">= 0.97x", ("loop-te", "te"): ">= 0.97x",
           ("loop-te-fp8cs", "te-plain-fp8cs"): ">= 0.95x", ("loop-te-fp8cs", "te-fp8cs"): "-",
           ("loop-te-fp8cs", "hf-liger"): ">= 1.25x", ("loop-te-fp8cs", "hf-liger-amp"): "-",
           ("loop-te-fp8delayed", "te-fp8delayed"): "-", ("loop-te-fp8block", "te-fp8block"): "-"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 4096; 64 with --tiny)")
    parser.add_argument("--micro-batches", default=None,
                        help="comma-separated sweep, stopped at the first out-of-memory (default 1,2,4,8,16,32; "
                             "1,2 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per micro-batch (default 10; 2 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; 1 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny shape that runs on CPU in seconds")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's bf16 dense peak")
    parser.add_argument("--optimizer-kernels", choices=("fused", "megatron"), default="fused",
                        help="megatron rows without TE/apex: 'fused' = torch fused AdamW + foreach multi-tensor "
                             "helpers (bridge_train.optim); 'megatron' = megatron-core's own fallbacks")
    parser.add_argument("--alloc-conf", default="expandable_segments:True",
                        help="PYTORCH_CUDA_ALLOC_CONF for every row ('' leaves it unset)")
    parser.add_argument("--profile-dir", default=None,
                        help="after each timed micro-batch, profile one step and write its top kernels here")
    parser.add_argument("--memory-dir", default=None,
                        help="after each timed micro-batch, account one step's memory (state, forward, peak, saved "
                             "tensors by module) into this directory")
    parser.add_argument("--provider-overrides", default=None,
                        help="JSON object of GPTModelProvider fields applied to every megatron row (after the row's "
                             "own settings), e.g. '{\"recompute_activation_output\": false}'")
    parser.add_argument("--loop-overrides", default="",
                        help="space-separated key=value config overrides for the loop-* rows (after their own)")
    parser.add_argument("--row-timeout", type=float, default=1800, help="seconds before a row is abandoned")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq = args.seq or (64 if args.tiny else 4096)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.micro_batches = [int(x) for x in (args.micro_batches or ("1,2" if args.tiny else "1,2,4,8,16,32")).split(",")]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    args.loop_overrides = args.loop_overrides.split()
    if args.provider_overrides:
        try:
            overrides = json.loads(args.provider_overrides)
        except json.JSONDecodeError as e:
            parser.error(f"--provider-overrides is not JSON: {e}")
        if not isinstance(overrides, dict):
            parser.error("--provider-overrides must be a JSON object of GPTModelProvider fields")
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    return args


def run_benchmark(args, run_worker, run_row, render) -> int:
    """A benchmark's main: the worker when ``--worker`` is given, else every row in its own process and the table."""
    if args.worker:
        run_worker(args.worker, args)
        return 0
    versions = _versions()
    results = []
    for row in args.rows:
        try:
            results += run_row(row, args)
        except subprocess.TimeoutExpired:
            results.append({"row": row, "micro_batch": None, "status": f"timed out after {args.row_timeout:.0f}s"})
    table = render(results, args, versions)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


def main(argv=None) -> int:
    return run_benchmark(parse_args(argv), run_worker, _run_row, render)


if __name__ == "__main__":
    sys.exit(main())
