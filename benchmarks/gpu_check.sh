#!/usr/bin/env bash
# The one GPU check, for one H100 / H200, within 8 minutes including model builds:
#   1. the GPU-marked tests: pytest -m gpu (exit 5, no test carries the marker, counts as a pass);
#   2. benchmarks/mpo_step.py --preset internvl2_5-1b: shared, trl, precomputed, with 1 and with 4 pairs per step;
#   3. benchmarks/sft_step.py --preset internvl2_5-1b: ours, trl;
#   4. benchmarks/sft_packing.py --preset internvl2_5-1b: packed vs padded SFT on a long-tailed mix;
#   5. benchmarks/sharded_smoke.sh: a tiny SFT under configs/accelerate/fsdp2.yaml and zero3.yaml on 1 GPU;
#   6. benchmarks/rl_step.py --preset internvl2_5-1b: shared, trl (G = 16, 7 tiles, 300-token responses);
# all with bf16 and --profile, then writes benchmarks/RESULTS-gpu.md (and copies it with the logs to $OUT when set).
# A failing step or benchmark row is recorded in the report and the script goes on; each step has a time limit.
#
# It installs nothing. It assumes python has torch (CUDA), transformers, accelerate, peft, trl (with datasets) and
# pytest; the package is taken from src/ here (put on PYTHONPATH). The one exception: when trl is not importable and
# WHEELS names a folder of wheels, every wheel there is installed with `pip install --no-deps`. Make the folder here:
#     .venv/bin/pip download --no-deps trl==1.16.0 -d wheels     # add datasets' wheels if the machine lacks datasets
#
# Usage:
#     benchmarks/gpu_check.sh                  # on the GPU machine
#     WHEELS=wheels benchmarks/gpu_check.sh
#     CPU_SMOKE=1 benchmarks/gpu_check.sh      # the script's logic on a CPU with a tiny model: a few minutes on 2
#                                              # cores; writes $WORK/RESULTS-gpu.md, not benchmarks/RESULTS-gpu.md
# Environment: PYTHON (default python3, or .venv/bin/python with CPU_SMOKE), WORK (scratch folder, default
# /tmp/internvl_tune_gpu_check), OUT (a folder that gets RESULTS-gpu.md and the logs), WHEELS (see above).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CPU_SMOKE=${CPU_SMOKE:-0}
WORK=${WORK:-/tmp/internvl_tune_gpu_check}
if [[ $CPU_SMOKE == 1 ]]; then
    PYTHON=${PYTHON:-.venv/bin/python}
    REPORT=$WORK/RESULTS-gpu.md
    # Tiny shapes and steps: this mode checks the script, not the speed.
    MODEL=(--vision-hidden 64 --vision-layers 1 --vision-heads 2 --vision-ffn 128 --text-hidden 64 --text-layers 1
        --text-heads 4 --text-kv-heads 2 --text-ffn 128 --vocab-size 4096 --image-size 112 --max-dynamic-patch 2)
    RUN=(--device cpu --warmup-steps 1 --timed-steps 1 --answer-tokens 16)
    MPO_EXTRA=(--no-memory-runs)
    RL_EXTRA=(--no-memory-runs --num-generations 4)
    SFT_TOKENS=600
    PACKING=(--device cpu --num-samples 8 --batch-size 2 --max-packed-tokens 1024)
    LIMITS=(120 400 400 300 400 300 300)  # pytest, MPO 1 pair, MPO 4 pairs, SFT, packing, sharded, RL (s; slow CPU)
else
    PYTHON=${PYTHON:-python3}
    REPORT=$ROOT/benchmarks/RESULTS-gpu.md
    MODEL=(--preset internvl2_5-1b)
    RUN=(--device cuda --bf16 --warmup-steps 2 --timed-steps 3)
    MPO_EXTRA=()
    RL_EXTRA=()
    SFT_TOKENS=16384
    PACKING=(--device cuda --bf16 --num-samples 48 --batch-size 4 --max-packed-tokens 16384)
    # Caps, not estimates (each run: about 30 s of start-up, model load and final save, then seconds of steps).
    LIMITS=(45 170 140 100 100 90 200)
fi
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
rm -rf "$WORK"
mkdir -p "$WORK/logs"
STARTED=$SECONDS
STATUS=()

# run_step NAME LIMIT_S COMMAND...: run COMMAND under a time limit with its output in logs/NAME.log, and record
# the outcome; it never stops the script.
run_step() {
    local name=$1 limit=$2 rc=0 start=$SECONDS outcome
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1 || rc=$?
    case $rc in
        0) outcome="ok" ;;
        124 | 137) outcome="**timed out** after ${limit} s" ;;
        5) [[ $name == gpu-tests ]] && outcome="ok: no test carries the gpu marker" || outcome="**failed** (exit 5)" ;;
        *) outcome="**failed** (exit $rc)" ;;
    esac
    STATUS+=("| $name | $outcome | $((SECONDS - start)) | \`logs/$name.log\` |")
    echo "== $name: $outcome in $((SECONDS - start)) s"
    tail -n 3 "$WORK/logs/$name.log"
    return 0
}

# trl: the one install this script may do.
TRL_NOTE="trl importable"
if ! "$PYTHON" -c "import trl, datasets" >/dev/null 2>&1; then
    if [[ -n ${WHEELS:-} ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        run_step install-wheels 120 "$PYTHON" -m pip install --no-deps "$WHEELS"/*.whl
        TRL_NOTE="installed --no-deps from $WHEELS: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
    else
        TRL_NOTE="**trl (or datasets) not importable** and no WHEELS folder: the TRL rows fail"
    fi
fi
# The recipes must import without PyAV (it is needed only to read videos).
run_step import-without-av 60 "$PYTHON" -c \
    "import sys; sys.modules['av'] = None; import internvl_tune.recipes.mpo, internvl_tune.recipes.sft"

run_step gpu-tests "${LIMITS[0]}" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests
COMMON=("${MODEL[@]}" "${RUN[@]}" --profile --models "$WORK/models")
run_step mpo-1-pair "${LIMITS[1]}" "$PYTHON" benchmarks/mpo_step.py "${COMMON[@]}" "${MPO_EXTRA[@]}" \
    --configs shared,trl,precomputed --pairs-per-step 1 --workdir "$WORK/mpo-1" --results "$WORK/mpo-1.md"
run_step mpo-4-pairs "${LIMITS[2]}" "$PYTHON" benchmarks/mpo_step.py "${COMMON[@]}" "${MPO_EXTRA[@]}" \
    --configs shared,trl,precomputed --pairs-per-step 4 --workdir "$WORK/mpo-4" --results "$WORK/mpo-4.md"
run_step sft "${LIMITS[3]}" "$PYTHON" benchmarks/sft_step.py "${COMMON[@]}" \
    --configs ours,trl --tokens-per-step "$SFT_TOKENS" --workdir "$WORK/sft" --results "$WORK/sft.md"
run_step packing "${LIMITS[4]}" "$PYTHON" benchmarks/sft_packing.py "${MODEL[@]}" "${PACKING[@]}" \
    --configs padded,packed --workdir "$WORK/packing" --results "$WORK/packing.md"
# FSDP2 and ZeRO-3 start, train, save and report on CUDA (ZeRO-3 when deepspeed imports: put its wheel in WHEELS).
run_step sharded "${LIMITS[5]}" env PYTHON="$PYTHON" CPU_SMOKE="$CPU_SMOKE" benchmarks/sharded_smoke.sh "$WORK/sharded"
# The RL update: responses/s of our group rows vs TRL's GRPOTrainer (sequence level) on the same fixed rollouts.
run_step rl "${LIMITS[6]}" "$PYTHON" benchmarks/rl_step.py "${COMMON[@]}" "${RL_EXTRA[@]}" \
    --configs shared,trl --workdir "$WORK/rl" --results "$WORK/rl.md"

# The report: what ran and how it went, then each benchmark's own report (headings one level down).
DEVICE=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" \
    2>/dev/null || echo "torch not importable")
{
    echo "# GPU check"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- Device: $DEVICE; $(nproc) CPU cores; python: $PYTHON"
    echo "- trl: $TRL_NOTE"
    if [[ $CPU_SMOKE == 1 ]]; then
        echo "- **CPU_SMOKE=1: tiny model and steps, a test of this script; the numbers mean nothing**"
    fi
    echo "- Whole check: $((SECONDS - STARTED)) s"
    echo
    echo "| step | result | seconds | log |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${STATUS[@]}"
    for name in mpo-1 mpo-4 sft packing rl; do
        echo
        if [[ -f $WORK/$name.md ]]; then
            sed -e 's/^#/##/' "$WORK/$name.md"
        else
            echo "## $name: no report (see the step's log)"
        fi
    done
} >"$WORK/RESULTS-gpu.md.tmp"
mv "$WORK/RESULTS-gpu.md.tmp" "$WORK/RESULTS-gpu.md"
if [[ $REPORT != "$WORK/RESULTS-gpu.md" ]]; then
    cp "$WORK/RESULTS-gpu.md" "$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
fi
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    cp -r "$WORK/RESULTS-gpu.md" "$WORK/logs" "$OUT/"
fi
echo "wrote $REPORT ($((SECONDS - STARTED)) s)"
