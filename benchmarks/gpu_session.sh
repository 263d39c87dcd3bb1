#!/usr/bin/env bash
# One GPU session on the lent H200, run from the repository root on the device machine:
#   bash benchmarks/gpu_session.sh
# 1. builds kdengine._C (csrc/) in place: KDENGINE_BUILD_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0;
# 2. python -m kdengine.info (which backends are available, and why);
# 3. the op tests (every backend, the "cuda" one included): pytest tests/ops -q;
# 4. the kernel benchmarks, writing benchmarks/results/.
# Every step is logged (tee) to $OUT/logs/<step>.log and bounded by `timeout`, so the whole
# session stays under ~9 minutes (the device allows 10 per command); a failed step is reported
# and the next one still runs. Results and logs end up in $OUT (default: benchmarks/results/session).
# Exit status: 0 when every step passed, else 1 (the failed steps are listed in $OUT/summary.txt).
set -o pipefail
set -u
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results/session}"
mkdir -p "$OUT/logs" "$OUT/results"
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

step env 30 bash -c "nvidia-smi; nvcc --version; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)'"
step build 180 "$PY" -m pip install --no-deps --no-build-isolation -e .
step info 30 "$PY" -m kdengine.info
step tests 120 "$PY" -m pytest tests/ops -q -x -p no:cacheprovider
step bench_kd_loss 70 "$PY" -m benchmarks.bench_kd_loss
step bench_fuse_experts 70 "$PY" -m benchmarks.bench_fuse_experts
step bench_expert_forward 70 "$PY" -m benchmarks.bench_expert_forward

# Everything the benchmarks wrote (CSV + JSON with env_info), next to the logs.
find benchmarks/results -maxdepth 1 -type f \( -name '*.csv' -o -name '*.json' \) -exec cp {} "$OUT/results/" \;

{
  echo "gpu_session finished in ${SECONDS}s"
  if [ "${#failed[@]}" -eq 0 ]; then
    echo "all steps passed"
  else
    printf 'failed: %s\n' "${failed[@]}"
  fi
} | tee "$OUT/summary.txt"
[ "${#failed[@]}" -eq 0 ]
