#!/usr/bin/env bash
# Download, here (a machine that reaches PyPI), the wheels the GPU machine's image lacks, into
# .whl/ (ignored by git), for benchmarks/gpu_check.sh. The image has torch, numpy, typer, rich,
# safetensors, psutil, cloudpickle, msgpack, toolz, pyyaml, jinja2, click, packaging, fsspec,
# sortedcontainers, pandas, nvidia-ml-py and cuda-core, but not dask, distributed, zarr and
# their own needs. Versions are the ones installed here, so both machines run the same code.
#
#   bash benchmarks/fetch_gpu_wheels.sh [DEST] [--with-dask-cuda]
#
# --with-dask-cuda adds dask-cuda (the `gpu` extra), so gpu_check.sh also runs the --gpus test
# through LocalCUDACluster. The wheels are a few MB (well under the 64 MiB a device call carries).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
WITH_DASK_CUDA=0
for arg in "$@"; do
  case "$arg" in
    --with-dask-cuda) WITH_DASK_CUDA=1 ;;
    *) DEST=$arg ;;
  esac
done

PACKAGES=(dask distributed zarr numcodecs donfig google-crc32c tblib zict partd locket tornado)
# shellcheck disable=SC2207
PINNED=($(python3 - "${PACKAGES[@]}" <<'EOF'
import importlib.metadata as metadata
import sys

print(" ".join(f"{name}=={metadata.version(name)}" for name in sys.argv[1:]))
EOF
))
if [ "$WITH_DASK_CUDA" = 1 ]; then
  PINNED+=(dask-cuda)
fi

mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${PINNED[@]}"
echo "wheels in $DEST:"
ls -1 "$DEST"
du -sh "$DEST"
