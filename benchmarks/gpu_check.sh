#!/usr/bin/env bash
# The GPU check: ONE device call (at most 9 minutes) on a fresh GPU machine, from the repository
# root. The image has torch with CUDA; dask, zarr, typer, ... come from wheels carried in .whl/.
#
# Here, first (a machine with a package index):  bash benchmarks/fetch_gpu_wheels.sh --with-dask-cuda
# Then, on the GPU machine, one call:             bash benchmarks/gpu_check.sh      (carry .whl)
# On a machine without a GPU, to try the steps:   DEVICE=cpu bash benchmarks/gpu_check.sh
#
# Every step runs under its own `timeout`; the limits below add up to 540 s. Each step appends
# its line to $OUT/summary.txt as soon as it ends, so a step that overruns still leaves the
# earlier ones (and its own "rc=124" line):
#
#   step            limit   rc   secs  result
#   <name>          <s>     <rc> <s>   <ok:/FAIL: line of the step's helper, or pytest's tail>
#
# Logs of each step: $OUT/<step>.log. Environment: DEVICE (cuda; cpu = a trial without GPU,
# which skips what needs one), WHEELS (.whl), BLOCKS (benchmark depth, default 8), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEVICE=${DEVICE:-cuda}
WHEELS=${WHEELS:-.whl}
BLOCKS=${BLOCKS:-8}
OUT=${OUT:-/tmp/gpu_check_out}
WORK=${WORK:-/tmp/lf-gpu-check}
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK"
SUMMARY=$OUT/summary.txt
export REPO DEVICE BLOCKS OUT WORK PYTHONUNBUFFERED=1

# step limits (seconds); their sum is checked below against the 540 s a call may use
declare -A LIMIT=(
  [wheels]=45 [inventory]=15 [gpu_tests]=150 [cpu_vs_cuda]=60
  [gpus_and_worker]=75 [bf16_merge]=40 [big_tensors]=60 [benchmark]=95
)
ORDER=(wheels inventory gpu_tests cpu_vs_cuda gpus_and_worker bf16_merge big_tensors benchmark)
total=0
for s in "${ORDER[@]}"; do total=$((total + LIMIT[$s])); done

{
  echo "# gpu_check $(date -u +%FT%TZ) DEVICE=$DEVICE, step limits sum to $total s (max 540)"
  printf '%-16s %5s  %-4s %5s  %s\n' step limit rc secs result
} >"$SUMMARY"
if [ "$total" -gt 540 ]; then echo "step limits sum to $total s > 540" | tee -a "$SUMMARY"; exit 1; fi

# the GPU inventory first, straight into the summary
{
  echo "## GPU inventory"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: not available"
  fi
} >>"$SUMMARY" 2>&1

# ---- the wheels: stop with one line when they are missing ----
if [ ! -f "$WHEELS/requirements.txt" ] || ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "STOP: no wheels in $WHEELS (run bash benchmarks/fetch_gpu_wheels.sh here and carry .whl)" \
    | tee -a "$SUMMARY"
  exit 1
fi
SITE=/tmp/lf-site
SHIM=/tmp/lf-shim
export PYTHONPATH=$SITE:$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SHIM/bin:$PATH
export WHEELS SITE SHIM

# result of a step: its helpers' ok:/FAIL: lines, else pytest's last line, else the log's tail
result_of() {
  local log=$1 lines
  lines=$(grep -E '^(ok|FAIL|STOP|SKIP)' "$log" | paste -sd ';' -)
  if [ -z "$lines" ]; then lines=$(grep -E ' (passed|failed|error|skipped)' "$log" | tail -n 1); fi
  if [ -z "$lines" ]; then lines=$(tail -n 1 "$log"); fi
  echo "${lines//$'\n'/ }" | sed 's/===*//g; s/  */ /g'
}
run_step() { # run_step NAME: the function step_NAME under its limit; one summary line at once
  local name=$1 start rc secs
  start=$(date +%s)
  timeout --kill-after=5 "${LIMIT[$name]}" bash -c "step_$name" >"$OUT/$name.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  [ "$rc" = 124 ] && echo "STOP: over its ${LIMIT[$name]} s limit" >>"$OUT/$name.log"
  printf '%-16s %5s  %-4s %5s  %s\n' "$name" "${LIMIT[$name]}" "$rc" "$secs" \
    "$(result_of "$OUT/$name.log")" >>"$SUMMARY"
  echo "[$name rc=$rc ${secs}s]"
}
cmp_py() { python3 "$REPO/benchmarks/gpu_compare.py" "$@"; }
lf() { python3 -m loraforge.pipeline.cli "$@"; }
export -f cmp_py lf

step_wheels() {
  rm -rf "$SITE" "$SHIM"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --find-links "$WHEELS" --target "$SITE" -r "$WHEELS/requirements.txt" || {
    echo "STOP: the wheels do not install for $(python3 -V) (fetch for its version: PY_VERSIONS)"
    return 1
  }
  if [ -f "$WHEELS/requirements-dask-cuda.txt" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --find-links "$WHEELS" --target "$SITE" -r "$WHEELS/requirements-dask-cuda.txt" \
      && echo "dask-cuda installed" || echo "dask-cuda failed to install"
  else
    echo "no dask-cuda wheel: --gpus runs the nanny fallback (its warning is checked)"
  fi
  # loraforge without pip: pipeline/ stages/ kernels/ are loraforge.*
  mkdir -p "$SHIM/loraforge" "$SHIM/bin"
  for part in pipeline stages kernels; do ln -sfn "$REPO/$part" "$SHIM/loraforge/$part"; done
  ln -sfn "$REPO/pipeline/api/__init__.py" "$SHIM/loraforge/__init__.py"
  printf '#!/bin/sh\nexec python3 -m loraforge.pipeline.cli "$@"\n' >"$SHIM/bin/loraforge"
  printf '#!/bin/sh\nexec python3 -m distributed.cli.dask_%s "$@"\n' scheduler >"$SHIM/bin/dask-scheduler"
  printf '#!/bin/sh\nexec python3 -m distributed.cli.dask_%s "$@"\n' worker >"$SHIM/bin/dask-worker"
  chmod +x "$SHIM/bin/"*
  python3 -c 'import dask, distributed, zarr, typer, loraforge.pipeline.cli' \
    && echo "ok: $(ls "$WHEELS"/*.whl | wc -l) wheels installed for $(python3 -V)"
}

step_inventory() {
  cmp_py inventory
}

step_gpu_tests() {
  if [ "$DEVICE" = cpu ]; then echo "SKIP: DEVICE=cpu"; return 0; fi
  python3 -m pytest -q -p no:cacheprovider -m gpu "$REPO/tests"
}

extract_small() { # extract_small OUTFILE extra-args...
  local out=$1
  shift
  lf extract --source-model "$WORK/pair/base" --target-model "$WORK/pair/finetuned" \
    --output "$out" --rank 16 --no-resume --quiet "$@"
}
export -f extract_small

step_cpu_vs_cuda() {
  cmp_py pair "$WORK/pair" --blocks 2 || return 1
  extract_small "$WORK/cpu/lora.safetensors" --device cpu || return 1
  extract_small "$WORK/cuda/lora.safetensors" --device "$DEVICE" --workers 2 || return 1
  cmp_py extract-errors "$WORK/cpu/lora.safetensors" "$WORK/cuda/lora.safetensors"
}

step_gpus_and_worker() {
  [ -f "$WORK/cuda/lora.safetensors" ] || { echo "FAIL: no in-process run (cpu_vs_cuda)"; return 1; }
  local files=("$WORK/cuda/lora.safetensors") rc=0
  if [ "$DEVICE" != cpu ]; then
    extract_small "$WORK/gpus/lora.safetensors" --gpus all 2>"$WORK/gpus.err" || rc=1
    cat "$WORK/gpus.err"
    if grep -q "^warning: --gpus:" "$WORK/gpus.err"; then
      echo "ok: --gpus all ran the nanny fallback: $(grep '^warning: --gpus:' "$WORK/gpus.err")"
    else
      echo "ok: --gpus all ran dask-cuda's LocalCUDACluster (no fallback warning)"
    fi
    files+=("$WORK/gpus/lora.safetensors")
  fi
  # a local cluster by hand: one scheduler, one worker pinned to GPU 0 declaring GPU=1
  local port=$((20000 + RANDOM % 20000)) resources=()
  [ "$DEVICE" != cpu ] && resources=(--resources GPU=1)
  python3 -m distributed.cli.dask_scheduler --host 127.0.0.1 --port "$port" \
    --dashboard-address :0 >"$WORK/scheduler.log" 2>&1 &
  local sched=$!
  CUDA_VISIBLE_DEVICES=0 python3 -m distributed.cli.dask_worker "tcp://127.0.0.1:$port" \
    --nthreads 2 "${resources[@]}" --memory-limit 0 --no-dashboard >"$WORK/worker.log" 2>&1 &
  local worker=$!
  python3 - "$port" <<'EOF' || rc=1
import sys
from distributed import Client
with Client(f"tcp://127.0.0.1:{sys.argv[1]}", timeout=30) as c:
    c.wait_for_workers(1, timeout=30)
EOF
  extract_small "$WORK/worker/lora.safetensors" --scheduler "tcp://127.0.0.1:$port" \
    --device "$DEVICE" || rc=1
  kill "$worker" "$sched" 2>/dev/null
  wait "$worker" "$sched" 2>/dev/null
  files+=("$WORK/worker/lora.safetensors")
  cmp_py same-bytes "${files[@]}" || rc=1
  return $rc
}

step_bf16_merge() {
  [ -f "$WORK/cpu/lora.safetensors" ] || { echo "FAIL: no LoRA (cpu_vs_cuda)"; return 1; }
  for dev in cpu "$DEVICE"; do
    lf merge --source-model "$WORK/pair/base" --lora-model "$WORK/cpu/lora.safetensors" \
      --output "$WORK/merge-$dev/merged.safetensors" --output-dtype bf16 --device "$dev" \
      --no-resume --quiet || return 1
  done
  local cuda_dir=$WORK/merge-$DEVICE
  cmp_py bf16-steps "$WORK/merge-cpu/merged.safetensors" "$cuda_dir/merged.safetensors"
}

step_big_tensors() {
  cmp_py big-pair "$WORK/big" --count 3 || return 1
  local rc=0
  cmp_py memory "$WORK/big" "$WORK" --device "$DEVICE" || rc=1
  rm -rf "$WORK/big"
  return $rc
}

step_benchmark() {
  local rc=0
  for dev in cpu "$DEVICE"; do
    python3 "$REPO/benchmarks/extract.py" "$WORK/wan" --blocks "$BLOCKS" --device "$dev" \
      --skip-baseline || return 1
    cp "$WORK/wan/results/loraforge.report.json" "$WORK/bench-$dev.report.json"
  done
  cmp_py bench-ratio "$WORK/bench-cpu.report.json" "$WORK/bench-$DEVICE.report.json" || rc=1
  return $rc
}
export -f step_wheels step_inventory step_gpu_tests step_cpu_vs_cuda step_gpus_and_worker \
  step_bf16_merge step_big_tensors step_benchmark

started=$(date +%s)
for s in "${ORDER[@]}"; do
  run_step "$s"
  if [ "$s" = wheels ] && grep -q '^STOP' "$OUT/wheels.log"; then
    echo "STOP: wheels did not install; nothing else can run" >>"$SUMMARY"
    break
  fi
done
echo "# done in $(($(date +%s) - started)) s" >>"$SUMMARY"
cat "$SUMMARY"
for s in "${ORDER[@]}"; do # failures, for the reader of the output tail
  [ -f "$OUT/$s.log" ] && grep -E "^(FAILED|ERROR)" "$OUT/$s.log" | head -n 5
done
exit 0
