#!/usr/bin/env bash
# GPU acceptance checks for the lent GPU machines (device tool): run from the repo root with wheels in .whl/.
#   bash tools/gpu/run_checks.sh [convert] [native] [optim] [train] [train1b] [peft] [recipes] [te] [te-train]
# Writes logs to $OUT (or ./gpu-logs). The GPU image has torch 2.11 and transformers but not megatron-core, pydantic,
# peft and the rest: fetch their wheels into .whl as tools/gpu/README.md ("The wheels") says
# and carry .whl (git-ignored). "convert" and "train" need 2 GPUs (about 2 and 3 minutes), "native" (the native
# spec's kernels against torch / the local spec, ~1.5 minutes), "optim" (bridge-train's fused optimizer step inside
# megatron-core's bf16 optimizer, and a distributed-optimizer resume, ~1.5 minutes), "train1b", "peft" (bridge-peft's GPU tests, the TE spec's when TE
# imports) and "recipes" (llama32_1b_pretrain at seq 8192, llama32_3b_sft and llama3_8b_lora with random weights,
# 20 iterations each through bridge-run, ~4 minutes) one. "te" and "te-train" run every GPU test with Transformer
# Engine importable (build it first: tools/gpu/README.md), in two calls (together they take longer than one call
# may run): "te" conversion per spec (TE with and without TF32), the native tests and bridge-peft's (~5 minutes);
# "te-train" the optimizer step, bf16 / FP8 training with the TE spec, the resume and PEFT on FP8 weights (~4.5).
set -uo pipefail
# shellcheck source=tools/gpu/env.sh
source "$(dirname "$0")/env.sh" || exit 1
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpus.txt"
steps=${*:-convert native optim train train1b}
# Drops warning / debug noise but keeps pytest's summary line ("33 passed, 4 skipped, 120 warnings in ...").
quiet() { awk 'tolower($0) !~ /warn|debug|__trace/ || /[0-9]+ (passed|failed|skipped|errors?)/'; }
for step in $steps; do
  case $step in
    convert) timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rA packages/bridge-convert/tests/models/test_families_gpu.py 2>&1 | tail -40 > "$OUT/convert_gpu.log" ;;
    native) timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rA packages/bridge-convert/tests/native/test_gpu.py packages/bridge-convert/tests/native/test_spec.py 2>&1 | quiet | tail -60 > "$OUT/native_gpu.log" ;;
    optim) timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rA packages/bridge-train/tests/optim/test_fused_step_gpu.py packages/bridge-train/tests/test_resume_gpu.py 2>&1 | quiet | tail -30 > "$OUT/optim_gpu.log" ;;
    train) timeout 300 python3 -m pytest -m gpu -q -s -p no:cacheprovider -rA packages/bridge-train/tests/test_gpu_training.py 2>&1 | grep -v Warning | tail -40 > "$OUT/train_gpu.log" ;;
    train1b)
      args=(--hf-config packages/bridge-recipes/src/bridge_recipes/llama/hf_configs/Llama-3.2-1B.json --mock --workdir /tmp/run1b --no-export mixed_precision=bf16_mixed dataset.seq_length=4096
            train.micro_batch_size=4 train.global_batch_size=4 train.eval_interval=null logger.log_interval=5
            checkpoint.save_interval=20 checkpoint.keep_last_n=1 logger.progress_bar=false)
      CUDA_VISIBLE_DEVICES=0 timeout 300 python3 packages/bridge-train/examples/pretrain_llama.py "${args[@]}" train.train_iters=20 2>&1 | grep -v -i warn | tail -15 > "$OUT/train1b.log"
      CUDA_VISIBLE_DEVICES=0 timeout 200 python3 packages/bridge-train/examples/pretrain_llama.py "${args[@]}" train.train_iters=25 2>&1 | grep -v -i warn | tail -10 >> "$OUT/train1b.log" ;;
    peft) timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rA packages/bridge-peft/tests 2>&1 | quiet | tail -30 > "$OUT/peft_gpu.log" ;;
    recipes)
      quick=(train.train_iters=20 scheduler.lr_warmup_iters=2 train.eval_interval=null logger.log_interval=5
             logger.progress_bar=false)
      : > "$OUT/recipes_gpu.log"
      for recipe in "llama32_1b_pretrain train.global_batch_size=8" "llama32_3b_sft --allow-random-init" \
                    "llama3_8b_lora --allow-random-init"; do
        echo "== bridge-run $recipe" >> "$OUT/recipes_gpu.log"
        # shellcheck disable=SC2086
        timeout 240 python3 -m bridge_recipes.run $recipe "${quick[@]}" 2>&1 | grep -v -i warn | tail -8 >> "$OUT/recipes_gpu.log"
      done ;;
    te|te-train) python3 -c "import transformer_engine.pytorch" || { echo "$step: Transformer Engine does not import; build it first (tools/gpu/README.md)" > "$OUT/${step}_gpu.log"; continue; }
      if [ "$step" = te ]; then tests=(packages/bridge-convert/tests packages/bridge-peft/tests)
      else tests=(packages/bridge-train/tests/optim packages/bridge-train/tests/test_te_training_gpu.py
                  packages/bridge-train/tests/test_resume_gpu.py tests/test_peft_fp8_gpu.py); fi
      timeout 540 python3 -m pytest -m gpu -q -p no:cacheprovider -rA "${tests[@]}" 2>&1 | quiet > "$OUT/${step}_gpu_full.log"
      grep -E "max \||max relative|PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/${step}_gpu_full.log" | tail -90 > "$OUT/${step}_gpu.log" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
tail -n 5 "$OUT"/*.log
