#!/usr/bin/env bash
# One prepared GPU run (issue 24), in under 8 minutes on one GPU:
#   1. a DeBERTa-v3-base-sized student (DebertaV2 config built here, random weights, the test suite's locally
#      built SentencePiece tokenizer), saved in the project's model format;
#   2. `deberta-rad bench --precision bf16` on generated reports: the engine against the naive loop, and the
#      engine's share of the FLOP limit;
#   3. the largest batch token budget that fits (doubling until the GPU runs out of memory);
#   4. `deberta-rad bench-train` with DeepSpeed ZeRO-2 (bf16 on a GPU) against the plain Trainer;
#   5. a short real KD training of the demo student (`deberta-rad train`, 1 epoch) logged to MLflow (SQLite
#      store in the output folder).
# It writes OUT/gpu.json (every figure, the device, each step's time) and OUT/gpu_table.txt, and prints the
# table. --dry-run runs the same steps with tiny sizes on the CPU (CI). Each step has a time limit; a step
# that fails or overruns leaves its section of gpu.json an error, and the script exits 1.
#
#   benchmarks/gpu.sh [--dry-run] [--out DIR]   (default DIR: .cache/gpu-bench or .cache/gpu-bench-dry-run)
#   make bench-gpu
#
# Python: $PYTHON, else the repo's .venv, else python3; the package is read from src/ (a device machine needs
# no install, only the wheels it lacks on its PYTHONPATH: README "GPU benchmark").
set -euo pipefail

usage() {
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

DRY_RUN=0
OUT=""
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
if ((DRY_RUN)); then OUT="${OUT:-$REPO/.cache/gpu-bench-dry-run}"; else OUT="${OUT:-$REPO/.cache/gpu-bench}"; fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

# Sizes and time limits (seconds). Each step has its own limit, and the whole run one more: a step gets at
# most what is left of TOTAL_LIMIT less RESERVE (the summary's limit, which imports MLflow), so the full run
# ends within TOTAL_LIMIT plus a killed step's 10 s grace: 470 s, under 8 minutes.
# The dry run takes one torch thread and wide limits (it shares CI's cores) and no GPU, even on a GPU machine;
# its first DeepSpeed use on a machine compiles DeepSpeed's shared-memory op for CPU communication (once,
# cached in ~/.cache/torch_extensions).
if ((DRY_RUN)); then
    SIZE=tiny MAX_LENGTH=64 BENCH_REPORTS=64 BENCH_REPEATS=1 BENCH_BATCH=64
    BUDGET_START=512 BUDGET_CAP=4096 BUDGET_TIME=15
    TRAIN_STEPS=3 KD_REPORTS=30
    LIMIT_BUILD=150 LIMIT_BENCH=200 LIMIT_BUDGET=150 LIMIT_DEEPSPEED=300 LIMIT_PLAIN=200 LIMIT_KD_DATA=120
    LIMIT_KD_TRAIN=300 TOTAL_LIMIT=840 RESERVE=120
    export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=
else
    SIZE=base MAX_LENGTH=256 BENCH_REPORTS=4096 BENCH_REPEATS=3 BENCH_BATCH=1024
    BUDGET_START=65536 BUDGET_CAP=33554432 BUDGET_TIME=40
    TRAIN_STEPS=30 KD_REPORTS=600
    LIMIT_BUILD=45 LIMIT_BENCH=75 LIMIT_BUDGET=60 LIMIT_DEEPSPEED=75 LIMIT_PLAIN=50 LIMIT_KD_DATA=45
    LIMIT_KD_TRAIN=100 TOTAL_LIMIT=460 RESERVE=60
fi

# A previous run's folder is replaced; any other folder with something in it is refused, never emptied.
if [[ -d $OUT && -n "$(ls -A "$OUT")" && ! -f $OUT/steps.tsv ]]; then
    echo "gpu.sh: $OUT holds files but no earlier run (steps.tsv): give an empty or new folder" >&2
    exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
cd "$OUT" # relative paths in params (review store, LLM cache, MLflow artifacts) land here

export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export DEBERTA_RAD_MODEL_CACHE="$OUT/cache"
unset MLFLOW_TRACKING_URI MLFLOW_REGISTRY_URI
HELPER=("$PYTHON" "$HERE/gpu_bench.py")
# The CLI as its entry point runs it, from whichever Python holds the package (no installed script needed).
CLI=("$PYTHON" -c 'import sys; from deberta_rad.cli import app; sys.argv[0] = "deberta-rad"; app()')

FAILED=0
STARTED=$(date +%s)

# step NAME LIMIT_S COMMAND...: run it under a time limit (its own, or what is left of TOTAL_LIMIT), its
# output in logs/NAME.log; record its exit code and seconds in steps.tsv.
step() {
    local name=$1 limit=$2 rc=0 start end seconds left
    shift 2
    left=$((TOTAL_LIMIT - RESERVE - ($(date +%s) - STARTED)))
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        FAILED=1
        echo "not run: the run's ${TOTAL_LIMIT} s are spent" >"$OUT/logs/$name.log"
        printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "$limit" >>"$OUT/steps.tsv"
        printf '%-22s NOT RUN: the run has no time left\n' "$name"
        return 0
    fi
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >>"$OUT/steps.tsv"
    if ((rc == 0)); then
        printf '%-22s ok in %6s s (limit %s s)\n' "$name" "$seconds" "$limit"
    else
        FAILED=1
        printf '%-22s FAILED (exit %s) after %s s (limit %s s); the end of logs/%s.log:\n' \
            "$name" "$rc" "$seconds" "$limit" "$name"
        tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /'
    fi
    return 0
}

echo "gpu.sh: $(((DRY_RUN)) && echo 'dry run (tiny sizes)' || echo 'full sizes') into $OUT with $PYTHON"

# 1. The student, and the params of the training runs.
step build "$LIMIT_BUILD" "${HELPER[@]}" build --size "$SIZE" --max-length "$MAX_LENGTH" --out "$OUT/model" \
    --json "$OUT/build.json"
dry=()
if ((DRY_RUN)); then dry=(--dry-run); fi
step params 30 "${HELPER[@]}" params --out "$OUT" --backbone "$OUT/model/backbone" "${dry[@]}"

# 2. Inference: the engine in bf16 against the naive loop, on generated reports.
step generate 30 "${CLI[@]}" generate --output-dir "$OUT/reports" --n-reports "$BENCH_REPORTS" --seed 11
step bench "$LIMIT_BENCH" "${CLI[@]}" bench --model "$OUT/model/student" --input "$OUT/reports/reports.jsonl" \
    --json "$OUT/bench.json" --precision bf16 --repeats "$BENCH_REPEATS" --batch-size "$BENCH_BATCH"

# 3. The largest token budget that fits.
step token-budget "$LIMIT_BUDGET" "${HELPER[@]}" token-budget --model "$OUT/model/student" \
    --json "$OUT/token_budget.json" --start "$BUDGET_START" --cap "$BUDGET_CAP" --time-limit "$BUDGET_TIME"

# 4. Training throughput and memory: DeepSpeed ZeRO-2 against the plain Trainer, each in a fresh process, on
# the generated reports and their labels (a split folder as `split` writes one).
for side in deepspeed plain; do
    limit=$LIMIT_PLAIN
    if [[ $side == deepspeed ]]; then limit=$LIMIT_DEEPSPEED; fi
    step "bench-train-$side" "$limit" "${CLI[@]}" bench-train --input "$OUT/reports" --json "$OUT/train_$side.json" \
        --params "$OUT/params_$side.yaml" --max-length "$MAX_LENGTH" --steps "$TRAIN_STEPS" \
        --work-dir "$OUT/work/bench-train-$side"
done

# 5. A short real KD training of the demo student, logged to MLflow: generated reports, the rule teacher, the
# split and sentences stages, then the train stage for one epoch.
KD="$OUT/kd"
step kd-generate "$LIMIT_KD_DATA" "${CLI[@]}" generate --output-dir "$KD/corpus" --n-reports "$KD_REPORTS" --seed 13
step kd-label "$LIMIT_KD_DATA" "${CLI[@]}" label --input "$KD/corpus/reports.jsonl" \
    --output "$KD/pseudo_labels.jsonl" --teacher rules
step kd-split "$LIMIT_KD_DATA" "${CLI[@]}" split --input "$KD/corpus/reports.jsonl" \
    --labels "$KD/pseudo_labels.jsonl" --output-dir "$KD/splits" --params "$KD/params.yaml"
step kd-sentences "$LIMIT_KD_DATA" "${CLI[@]}" sentences --splits "$KD/splits" --output-dir "$KD/sentences" \
    --params "$KD/params.yaml"
step kd-train "$LIMIT_KD_TRAIN" env MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db" "${CLI[@]}" train \
    --splits "$KD/splits" --sentences "$KD/sentences" --output "$KD/student" --params "$KD/params.yaml" \
    --work-dir "$KD/checkpoints" --no-resume

# One JSON and a table.
echo
rc=0
timeout "$RESERVE" "${HELPER[@]}" combine --out "$OUT" --wall-s "$(($(date +%s) - STARTED))" "${dry[@]}" || rc=$?
echo
echo "wrote $OUT/gpu.json and $OUT/gpu_table.txt"
if ((FAILED || rc)); then exit 1; fi
