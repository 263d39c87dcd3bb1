#!/usr/bin/env bash
# One GPU session on the lent H200 (15 minutes of device time per session; at most 10 per command),
# run from the repository root on the device machine:
#   bash benchmarks/gpu_session.sh            # the real session: the steps' limits add up to 11 minutes;
#                                               # the last two (PEE-KD runtime, PromptKD step) run last so a
#                                               # 10-minute call cut short loses only their rows
#   bash benchmarks/gpu_session.sh --dry-run  # every step on CPU at tiny sizes (CI: it cannot rot)
# Steps (each bounded by `timeout`, logged to $OUT/logs/<step>.log; a failed step is reported and
# the next one still runs):
#   env, build (kdengine._C for sm_90), info, tests (pytest tests/ops, every backend),
#   traffic (benchmarks/traffic.py on CPU, in the background while the GPU steps run),
#   bench_kd_loss, bench_linear_kd_loss (Liger fused-linear JSD and TRL's chunked loss as peers),
#   bench_fuse_experts, bench_expert_forward, bench_train_step, bench_runtime (PEE-KD routings on the
#   embedded default it trains first), bench_prompt_kd_step (PromptKD step, fused vs unfused vs TRL).
# Inputs are generated on the device. Every result row is appended to $OUT/rows.jsonl the moment it
# is measured (KDENGINE_BENCH_ROWS, benchmarks/_harness.py), so a step cut by its timeout still
# leaves its numbers; each benchmark also writes <name>-<device>.{csv,json} (with env_info: device,
# versions, commit) under $OUT/results when it finishes. Columns: median ms (ms), GB/s, pct_floor
# (% of the measured HBM bandwidth), peak_MB (peak extra memory), grad_err (max gradient error vs
# float64, relative to the largest gradient).
# Exit status: 0 when every step passed, else 1 (the failed steps are listed in $OUT/summary.txt).
set -o pipefail
set -u
cd "$(dirname "$0")/.."

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
if [ "$#" -ne 0 ]; then
  echo "usage: bash benchmarks/gpu_session.sh [--dry-run]" >&2
  exit 2
fi

if [ "$DRY_RUN" -eq 1 ]; then
  OUT="${OUT:-${TMPDIR:-/tmp}/kdengine-gpu-session-dry-run}"
  DEVICE=(--device cpu)
  QUICK=(--quick)
else
  OUT="${OUT:-benchmarks/results/session}"
  DEVICE=(--device cuda)
  QUICK=()
fi
RESULTS="$OUT/results"
mkdir -p "$OUT/logs" "$RESULTS"
: > "$OUT/rows.jsonl"
export KDENGINE_BENCH_ROWS="$OUT/rows.jsonl"
export PYTHONUNBUFFERED=1
export KDENGINE_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST="9.0"
export MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python}"
failed=()

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, log to $OUT/logs/NAME.log.
step() {
  local name="$1" limit="$2"
  shift 2
  echo "=== ${name} (limit ${limit}s): $*" | tee "$OUT/logs/${name}.log"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/logs/${name}.log"
  local rc=$?
  echo "=== ${name}: exit ${rc} after $((SECONDS - start))s" | tee -a "$OUT/logs/${name}.log"
  if [ "$rc" -ne 0 ]; then
    failed+=("${name} (exit ${rc})")
  fi
  return 0
}

# The traffic table counts bytes in the Triton interpreter: CPU only, so it runs beside the GPU steps.
(TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" timeout 300 "$PY" -m benchmarks.traffic \
  > "$OUT/logs/traffic.log" 2>&1; echo "$?" > "$OUT/logs/traffic.rc") &
traffic_pid=$!

if [ "$DRY_RUN" -eq 1 ]; then
  step env 30 "$PY" -c 'import torch; print("dry run on CPU; torch", torch.__version__)'
  echo "=== build: skipped (--dry-run: no GPU, the CUDA extension is compiled by tests/test_csrc_compile.py)" \
    | tee "$OUT/logs/build.log"
  step info 60 "$PY" -m kdengine.info
  step tests 120 "$PY" -m pytest tests/ops/test_dispatch.py -q -x -p no:cacheprovider
else
  step env 20 bash -c "nvidia-smi; nvcc --version; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)'"
  step build 150 "$PY" -m pip install --no-deps --no-build-isolation -e .
  step info 20 "$PY" -m kdengine.info
  step tests 100 "$PY" -m pytest tests/ops -q -x -p no:cacheprovider
fi
step bench_kd_loss 70 "$PY" -m benchmarks.bench_kd_loss "${DEVICE[@]}" "${QUICK[@]}" --out-dir "$RESULTS"
step bench_linear_kd_loss 60 "$PY" -m benchmarks.bench_linear_kd_loss "${DEVICE[@]}" "${QUICK[@]}" --out-dir "$RESULTS"
step bench_fuse_experts 50 "$PY" -m benchmarks.bench_fuse_experts "${DEVICE[@]}" "${QUICK[@]}" --out-dir "$RESULTS"
step bench_expert_forward 50 "$PY" -m benchmarks.bench_expert_forward "${DEVICE[@]}" "${QUICK[@]}" --out-dir "$RESULTS"
if [ "$DRY_RUN" -eq 1 ]; then
  step bench_train_step 60 "$PY" -m benchmarks.bench_train_step --device cpu --steps 2 --batch 4 --seq 16 \
    --out-dir "$RESULTS"
else
  step bench_train_step 40 "$PY" -m benchmarks.bench_train_step --device cuda --out-dir "$RESULTS"
fi

step bench_runtime 40 "$PY" -m benchmarks.bench_runtime "${DEVICE[@]}" "${QUICK[@]}" --out-dir "$RESULTS"
# --quick on a shared 2-core CPU samples slower than the H200 runs the full size
step bench_prompt_kd_step "$([ "$DRY_RUN" -eq 1 ] && echo 150 || echo 50)" "$PY" -m benchmarks.bench_prompt_kd_step "${DEVICE[@]}" "${QUICK[@]}" --out-dir "$RESULTS"

wait "$traffic_pid"
traffic_rc="$(cat "$OUT/logs/traffic.rc" 2>/dev/null || echo 1)"
cat "$OUT/logs/traffic.log"
if [ "$traffic_rc" -ne 0 ]; then
  failed+=("traffic (exit ${traffic_rc})")
fi

{
  echo "gpu_session$([ "$DRY_RUN" -eq 1 ] && echo ' --dry-run') finished in ${SECONDS}s"
  echo "result rows: $(wc -l < "$OUT/rows.jsonl") in $OUT/rows.jsonl"
  if [ "${#failed[@]}" -eq 0 ]; then
    echo "all steps passed"
  else
    printf 'failed: %s\n' "${failed[@]}"
  fi
} | tee "$OUT/summary.txt"
[ "${#failed[@]}" -eq 0 ]
