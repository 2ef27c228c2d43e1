#!/usr/bin/env bash
# The GPU check: one call on a machine with CUDA (the device tool's GPU machine), from the
# repository root. It installs the wheels the image lacks from .whl/, makes loraforge importable
# without pip, runs the tests marked gpu (plus the GPU and cluster modules, and the --gpus test
# again through dask-cuda when its wheel is there), then the extraction benchmark on cuda
# against the full-SVD baseline on cuda, and prints one summary, also written to $OUT.
#
# Here, first (a machine with PyPI):   bash benchmarks/fetch_gpu_wheels.sh --with-dask-cuda
# Then, on the GPU machine, one call:  bash benchmarks/gpu_check.sh        (carry .whl)
#
# Environment: BLOCKS (benchmark model depth, default 30 = Wan2.1-1.3B), DEVICE (default cuda),
# WHEELS (default .whl), OUT (default /tmp/gpu_check_out). Every step has its own time limit, so
# the summary is printed even when one step fails or runs long.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BLOCKS=${BLOCKS:-30}
DEVICE=${DEVICE:-cuda}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
SUMMARY=$OUT/gpu_check.txt
: >"$SUMMARY"
started=$(date +%s)

# ---- 1. wheels the image lacks (dask, distributed, zarr, ...); dask-cuda kept apart ----
SITE=/tmp/lf-site
CUDA_SITE=/tmp/lf-site-dask-cuda
rm -rf "$SITE" "$CUDA_SITE"
mapfile -t wheels < <(ls "$WHEELS"/*.whl 2>/dev/null | grep -v '/dask_cuda-')
if [ "${#wheels[@]}" -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" || { echo "wheel install failed"; exit 1; }
fi
if ls "$WHEELS"/dask_cuda-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$CUDA_SITE" "$WHEELS"/dask_cuda-*.whl || echo "dask-cuda wheel install failed"
fi

# ---- 2. loraforge without pip: pipeline/ stages/ kernels/ are loraforge.* ----
SHIM=/tmp/lf-shim
mkdir -p "$SHIM/loraforge" "$SHIM/bin"
for part in pipeline stages kernels; do ln -sfn "$REPO/$part" "$SHIM/loraforge/$part"; done
printf '#!/bin/sh\nexec python3 -m loraforge.pipeline.cli "$@"\n' >"$SHIM/bin/loraforge"
chmod +x "$SHIM/bin/loraforge"
export PYTHONPATH=$SITE:$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SHIM/bin:$PATH
export PYTHONUNBUFFERED=1

# ---- 3. what we run on ----
{
  echo "== environment"
  nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
  python3 - <<'EOF'
import importlib.metadata as m
import torch

print("torch", torch.__version__, "| cuda", torch.version.cuda, "| GPUs", torch.cuda.device_count())
for name in ("dask", "distributed", "zarr", "numcodecs", "typer", "rich", "safetensors"):
    try:
        print(f"{name} {m.version(name)}", end=" | ")
    except m.PackageNotFoundError:
        print(f"{name} MISSING", end=" | ")
print()
import loraforge.pipeline.cli  # noqa: F401  (fails here if a dependency is missing)

print("loraforge imports from", loraforge.pipeline.cli.__file__)
EOF
} 2>&1 | tee -a "$SUMMARY"

pytest_line() { # the last line of a pytest log: "N passed, M skipped in Xs"
  tail -n 1 "$1" | sed 's/=//g; s/^ *//'
}
results=()

# ---- 4. tests ----
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests >"$OUT/pytest_gpu.log" 2>&1
results+=("tests -m gpu|rc=$? $(pytest_line "$OUT/pytest_gpu.log")")
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/e2e/test_gpu.py tests/pipeline/run \
  tests/e2e/test_cluster.py tests/e2e/test_json_events.py >"$OUT/pytest_cluster.log" 2>&1
results+=("tests gpu/cluster/json modules|rc=$? $(pytest_line "$OUT/pytest_cluster.log")")
if [ -d "$CUDA_SITE" ]; then
  PYTHONPATH=$CUDA_SITE:$PYTHONPATH timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/e2e/test_gpu.py -k "gpus_all or gpu_cluster" >"$OUT/pytest_dask_cuda.log" 2>&1
  results+=("--gpus through dask-cuda|rc=$? $(pytest_line "$OUT/pytest_dask_cuda.log")")
fi

# ---- 5. extraction benchmark on cuda, baseline (full SVD, fp32 in RAM) on cuda too ----
timeout 420 python3 benchmarks/extract.py /tmp/lf-wan --blocks "$BLOCKS" --device "$DEVICE" \
  >"$OUT/benchmark.log" 2>&1
bench_rc=$?
results+=("benchmark ($BLOCKS blocks, --device $DEVICE)|rc=$bench_rc (table below)")

# ---- 6. one summary ----
{
  echo
  echo "== gpu_check summary ($(($(date +%s) - started)) s)"
  printf '%-40s  %s\n' "check" "result"
  printf '%-40s  %s\n' "----------------------------------------" "------------------------------"
  for row in "${results[@]}"; do printf '%-40s  %s\n' "${row%%|*}" "${row#*|}"; done
  echo
  echo "== extraction benchmark (benchmarks/extract.py --device $DEVICE)"
  if [ "$bench_rc" = 0 ]; then cat "$OUT/benchmark.log"; else tail -n 20 "$OUT/benchmark.log"; fi
  for log in pytest_gpu pytest_cluster pytest_dask_cuda; do
    [ -f "$OUT/$log.log" ] && grep -E "^(FAILED|ERROR)" "$OUT/$log.log" | head -n 10
  done
} 2>&1 | tee -a "$SUMMARY"
exit 0
