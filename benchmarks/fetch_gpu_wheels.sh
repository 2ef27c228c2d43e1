#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks into .whl/ (ignored by git) for
# benchmarks/gpu_check.sh, which installs them with --no-index. Versions are the ones installed
# in the Python that runs loraforge here (PYTHON, default python3; it must import dask), read
# with importlib.metadata: dask, distributed, zarr, typer, rich, safetensors, google-crc32c,
# numcodecs, donfig, crc32c, psutil and everything they require, except torch and numpy (the
# GPU image has them). .whl/requirements.txt lists the pins; gpu_check.sh installs exactly those.
#
#   bash benchmarks/fetch_gpu_wheels.sh [DEST] [--with-dask-cuda]
#
# PY_VERSIONS (default: this Python's version, then 3.12) picks the interpreters to fetch binary
# wheels for; a version a wheel is missing for is reported, not fatal. --with-dask-cuda adds
# dask-cuda at a release whose pins accept this dask and distributed, or prints why none is.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
WITH_DASK_CUDA=0
for arg in "$@"; do
  case "$arg" in
    --with-dask-cuda) WITH_DASK_CUDA=1 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) DEST=$arg ;;
  esac
done
PY=${PYTHON:-python3}
if ! "$PY" -c 'import dask, distributed, zarr' 2>/dev/null; then
  echo "error: $PY cannot import dask, distributed and zarr; set PYTHON to loraforge's Python" >&2
  exit 1
fi
HERE_VERSION=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PY_VERSIONS=${PY_VERSIONS:-"$HERE_VERSION 3.12"}

mkdir -p "$DEST"
# name==version for the roots and what they require (markers evaluated here), minus torch/numpy
"$PY" - "$DEST/requirements.txt" <<'EOF'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

ROOTS = ["dask", "distributed", "zarr", "typer", "rich", "safetensors", "google-crc32c",
         "numcodecs", "donfig", "crc32c", "psutil"]
SKIP = re.compile(r"^(torch|numpy|triton|nvidia-.*|setuptools|pip|wheel)$")

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

pins, todo = {}, [(r, ()) for r in ROOTS]
while todo:
    name, extras = todo.pop()
    key = norm(name)
    if SKIP.match(key):
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        print(f"  not installed here, left out: {name}", file=sys.stderr)
        continue
    if key in pins:
        continue
    pins[key] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        env_ok = req.marker is None or any(
            req.marker.evaluate({"extra": e}) for e in (extras or ("",))
        )
        if env_ok:
            todo.append((req.name, tuple(req.extras)))
with open(sys.argv[1], "w") as f:
    for key in sorted(pins):
        f.write(f"{key}=={pins[key]}\n")
print(f"{len(pins)} pinned packages in {sys.argv[1]}")
EOF

# pure-Python wheels once; binary ones per interpreter version
missing=()
for version in $PY_VERSIONS; do
  if [ "$version" = "$HERE_VERSION" ]; then
    flags=()
  else
    flags=(--only-binary=:all: --python-version "$version" --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  fi
  while read -r pin; do
    [ -n "$pin" ] || continue
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: "${flags[@]}" -d "$DEST" "$pin" \
      >/dev/null 2>&1; then
      missing+=("$pin (python $version)")
    fi
  done <"$DEST/requirements.txt"
done
for m in "${missing[@]}"; do echo "  no wheel found: $m"; done

if [ "$WITH_DASK_CUDA" = 1 ]; then
  # the newest dask-cuda whose pins (directly, or through rapids-dask-dependency) accept the
  # dask and distributed pinned above; dask-cuda also needs numba, fetched if it is found
  if "$PY" - "$DEST" <<'EOF'; then
import importlib.metadata as md
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

dest = Path(sys.argv[1])
have = {n: Version(md.version(n)) for n in ("dask", "distributed")}

def download(spec, where):
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", str(where), spec],
                       capture_output=True, text=True)
    return sorted(Path(where).glob("*.whl")) if r.returncode == 0 else []

def requires(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]

def accepts(reqs):
    for req in reqs:
        if req.name in have and req.marker is None and have[req.name] not in req.specifier:
            return f"{req} rejects {req.name} {have[req.name]}"
    return None

r = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "dask-cuda"],
                   capture_output=True, text=True)
line = next((l for l in r.stdout.splitlines() if "Available versions:" in l), "")
versions = [v.strip() for v in line.split(":", 1)[-1].split(",") if v.strip()][:4]
if not versions:
    print("dask-cuda: skipped, no release is reachable from this machine's package index")
    sys.exit(1)
for v in versions:
    with tempfile.TemporaryDirectory() as tmp:
        found = download(f"dask-cuda=={v}", tmp)
        if not found:
            print(f"dask-cuda {v}: no wheel")
            continue
        reqs = requires(found[0])
        why = accepts(reqs)
        for req in reqs:
            if req.name == "rapids-dask-dependency" and why is None:
                meta = download(str(req), tmp + "/r")
                why = accepts(requires(meta[0])) if meta else f"{req}: not found"
        if why:
            print(f"dask-cuda {v}: {why}")
            continue
        for w in found:
            (dest / w.name).write_bytes(w.read_bytes())
        print(f"dask-cuda {v}: accepts dask {have['dask']}, distributed {have['distributed']}")
        with open(dest / "requirements-dask-cuda.txt", "w") as f:
            f.write(f"dask-cuda=={v}\n")
        sys.exit(0)
print("dask-cuda: skipped, none of", ", ".join(versions), "accepts the pinned dask/distributed")
sys.exit(1)
EOF
    echo "dask-cuda fetched"
  else
    rm -f "$DEST/requirements-dask-cuda.txt"
    echo "dask-cuda: not fetched (reason above); gpu_check.sh then checks the nanny fallback"
  fi
fi

echo "wheels in $DEST: $(ls "$DEST"/*.whl | wc -l) files, $(du -sh "$DEST" | cut -f1)"
