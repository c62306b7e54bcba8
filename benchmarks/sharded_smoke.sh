#!/usr/bin/env bash
# One short SFT run under each sharded engine from its shipped accelerate file (fsdp2.yaml; zero3.yaml when deepspeed
# imports), on a tiny model built offline: does the engine start, train, gather final/ and report what each rank
# held? Run by gpu_check.sh (1 GPU, bf16); with CPU_SMOKE=1 on 2 CPU ranks through INTERNVL_TUNE_SHARD_ON_CPU=1.
# Usage: benchmarks/sharded_smoke.sh WORK_DIR   (PYTHON: the interpreter; its bin/ holds accelerate)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$1
PYTHON=${PYTHON:-python3}
mkdir -p "$WORK"
"$PYTHON" -m internvl_tune.cli tiny-model "$WORK/tiny" --data "$WORK/data" >/dev/null
if [[ ${CPU_SMOKE:-0} == 1 ]]; then
    export INTERNVL_TUNE_SHARD_ON_CPU=1 CUDA_VISIBLE_DEVICES=""
    RANKS=2 BF16=false
else
    RANKS=1 BF16=true
fi
cat > "$WORK/sft.yaml" <<YAML
model: {model_name_or_path: $WORK/tiny, grad_checkpoint: true}
data: {meta_path: $WORK/data/meta.json, max_dynamic_patch: 4}
train: {max_steps: 3, learning_rate: 1.0e-4, warmup_ratio: 0.0, gradient_accumulation_steps: 2, save_steps: 2, bf16: $BF16}
YAML
engines=(fsdp2)
if "$PYTHON" -c "import deepspeed" 2>/dev/null; then engines+=(zero3); else echo "zero3: skipped (deepspeed is not installed)"; fi
cd "$ROOT"
for engine in "${engines[@]}"; do
    "$PYTHON" -m accelerate.commands.launch --config_file "configs/accelerate/$engine.yaml" --num_processes "$RANKS" \
        -m internvl_tune.cli sft --config "$WORK/sft.yaml" "output_dir=$WORK/$engine" per_device_train_batch_size=1
    "$PYTHON" - "$WORK/$engine/summary.json" "$engine" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
print(sys.argv[2], "final loss", summary["final_loss"], "engine", json.dumps(summary["engine"]))
PY
done
