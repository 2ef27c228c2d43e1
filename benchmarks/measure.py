"""Run a command and measure its wall time and peak memory (the process tree's summed RSS).

python benchmarks/measure.py -- python benchmarks/wan_shapes.py /tmp/wan
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

import psutil

SAMPLE_INTERVAL_S = 0.02
HERE = os.path.dirname(os.path.abspath(__file__))


def loraforge_program() -> str:
    """The ``loraforge`` console script of this Python's environment, run directly as a user of
    that environment runs it: ``PATH`` may first find a wrapper (pyenv's shim costs 0.1–0.3 s
    per start), or another environment's copy."""
    script = os.path.join(os.path.dirname(sys.executable), "loraforge")
    return script if os.access(script, os.X_OK) else "loraforge"


def warm(*folders: str) -> None:
    """Read every file in ``folders`` once, so each tool starts from the same page cache."""
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                while f.read(1 << 24):
                    pass


# A virtio balloon with VIRTIO_BALLOON_F_REPORTING (feature bit 5) hands memory the guest kernel
# freed back to the host; touching such a page again costs a host fault. Here that made
# `cp -r base out && sync` of 2.84 GB take 9-10 s instead of 2 s when the memory it took had
# been free for a few seconds, and reading a cold checkpoint ~2 CPU-seconds more per GB.
BALLOONS = "/sys/bus/virtio/drivers/virtio_balloon/virtio*/features"
REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"
MAX_PAGE_ORDER = 10  # x86-64: a reporting order above it reports nothing


def free_page_reporting() -> bool:
    """Whether this machine is a VM whose kernel reports freed memory to the host."""
    try:
        with open(REPORTING_ORDER) as f:
            if int(f.read()) > MAX_PAGE_ORDER:
                return False
    except (OSError, ValueError):
        return False
    for path in glob.glob(BALLOONS):
        with open(path) as f:
            if f.read()[5:6] == "1":
                return True
    return False


def prime(folder: str, scratch: str) -> None:
    """Copy ``folder`` to ``scratch``, sync and delete the copy, just before a measured run: the
    run's page cache and buffers then come from memory freed a moment ago, as on a machine that
    never hands memory back, not from pages its host took back (``free_page_reporting``)."""
    shutil.copytree(folder, scratch)
    os.sync()
    shutil.rmtree(scratch)


def gemm_rate() -> float:
    """This machine's fp32 GEMM rate in GFLOP/s (``floors.py gemm``, in a process of its own),
    printed with a benchmark's figures: compute-bound figures scale with it between machines."""
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "floors.py"), "gemm"], capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"floors.py gemm failed:\n{done.stderr}")
    return float(done.stdout)


def tree_rss(proc: psutil.Process) -> int:
    """Summed RSS of ``proc`` and all its descendants; processes that vanish count as 0.

    Pages shared between processes (libraries, shared memory) are counted once per process,
    so for multi-process tools this over-estimates: it is an upper bound, like ``ps`` totals.
    """
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], env: Mapping[str, str] | None = None) -> dict:
    """Run ``cmd``, sampling the tree's RSS every ~20 ms until it exits.

    Returns ``{"wall_s", "peak_rss_bytes", "returncode", "stdout", "stderr"}``. Output goes to
    temporary files rather than pipes, so a chatty command can never block on a full pipe.
    ``env`` replaces the environment (``None`` inherits it).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        popen = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        peak = 0
        try:
            proc = psutil.Process(popen.pid)
            while popen.poll() is None:
                peak = max(peak, tree_rss(proc))
                time.sleep(SAMPLE_INTERVAL_S)
        except psutil.NoSuchProcess:
            pass
        finally:
            returncode = popen.wait()  # also reaps the child if sampling was interrupted
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return {
            "wall_s": wall,
            "peak_rss_bytes": peak,
            "returncode": returncode,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A plain aligned text table; numeric columns are right-aligned, missing cells blank."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(col), int | float) for row in rows if row.get(col) is not None)
        for col in columns
    ]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    result = run_measured(args, env=dict(os.environ))
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    row = {
        "command": " ".join(args),
        "wall_s": result["wall_s"],
        "peak_rss_mib": result["peak_rss_bytes"] / 2**20,
        "returncode": result["returncode"],
    }
    print(format_table([row], ["command", "wall_s", "peak_rss_mib", "returncode"]))
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
