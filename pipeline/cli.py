"""The ``loraforge`` command line. All typer code lives here; the library reports progress
through callbacks and this module draws the bars."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import Interrupted, LoraforgeError, UsageError
from .options import ExtractOptions, KernelOptions, MergeOptions, parse_dtype, parse_size

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings wrap as paragraphs, not at their line breaks
    help="Extract, merge and convert LoRAs for checkpoints larger than RAM.",
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class CheckpointType(str, Enum):
    safetensors = "safetensors"
    pytorch = "pytorch"


class SvdMethod(str, Enum):
    randomized = "randomized"
    full = "full"


# ---- option aliases shared by commands ----
SourceModel = Annotated[
    str,
    typer.Option(
        "--source-model",
        help="Base checkpoint: a .safetensors file, a shard directory, or a .pt/.pth file.",
    ),
]
SourceType = Annotated[CheckpointType, typer.Option("--source-type")]
OutputPath = Annotated[
    str, typer.Option("--output", help="Output file; shards and the index are named after it.")
]
OutputFormat = Annotated[CheckpointType, typer.Option("--output-format")]
OutputDtype = Annotated[
    str, typer.Option("--output-dtype", help="float32|fp32|float16|fp16|bfloat16|bf16")
]
MaxShardSize = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size", help="e.g. 5GB: Hugging Face shards + index instead of one file."
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N")]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers", min=1, help="Tensors processed at once (default: cores, at most 16)."
    ),
]
Scheduler = Annotated[
    str | None,
    typer.Option(
        "--scheduler", help="Address (tcp://host:port) or scheduler file of a running Dask cluster."
    ),
]
Gpus = Annotated[
    str | None,
    typer.Option(
        "--gpus",
        metavar="all|0,1,...",
        help="One Dask worker process per GPU, pinned to it (dask-cuda's LocalCUDACluster when "
        "installed); --workers is then threads per GPU worker (default 2: one tensor is read "
        "while another is in the kernel).",
    ),
]
JsonOutput = Annotated[
    bool,
    typer.Option(
        "--json",
        help="JSON lines on stdout, one per event (start, cluster, tensor, write, summary, "
        "error), for batch jobs; no bar or table.",
    ),
]
ReportPath = Annotated[
    str | None,
    typer.Option("--report", help="JSON report path (default: <output stem>.report.json)."),
]
WorkDirOpt = Annotated[
    str | None,
    typer.Option("--work-dir", help="Intermediates for resume (default: <output>.work)."),
]


# The machine's state, not a bug: a full disk or quota, a read-only or forbidden location.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextmanager
def _user_errors(log: _JsonLog | None = None):
    """One line and an exit code for user errors and interrupts; a traceback only with
    LORAFORGE_TRACEBACK=1. With ``--json`` the line is also an ``error`` event on stdout."""

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except LoraforgeError as e:
        if os.environ.get("LORAFORGE_TRACEBACK"):
            traceback.print_exc()
        _error_line(str(e), e.exit_code, log)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        if os.environ.get("LORAFORGE_TRACEBACK"):
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        _error_line(
            f"{where}{e.strerror} (free space or pick another --output / --work-dir; "
            "finished tensors are kept, rerun to resume)",
            1,
            log,
        )
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        if os.environ.get("LORAFORGE_TRACEBACK"):
            traceback.print_exc()
        e = Interrupted(
            "interrupted; finished tensors are kept in the work directory",
            hint="rerun the same command to resume",
        )
        _error_line(str(e), e.exit_code, log)
        raise typer.Exit(e.exit_code) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error_line(message: str, exit_code: int, log: _JsonLog | None) -> None:
    err.print(f"error: {message}", markup=False, soft_wrap=True)
    if log is not None:
        log.emit("error", {"message": message, "exit_code": exit_code})


class _JsonLog:
    """``--json``: progress events as JSON lines on stdout, one object per line, for batch
    jobs. Every line has ``event``, ``command`` and ``time`` (Unix seconds); per event:

    - ``start``: ``tensors``, ``bytes`` (to read), ``done`` and ``done_bytes`` (already
      finished, resumed), ``changes`` (why entries are recomputed), ``work_dir``
    - ``loras`` (merge): ``loras``, one object per LoRA (``path``, ``strength``, ``patches``,
      ``unmatched``: LoRA key → why it is not merged)
    - ``cluster``: ``dashboard`` (the Dask dashboard URL; null for the embedded cluster)
    - ``tensor``: one tensor finished: ``key``, ``bytes`` (read), ``done``, ``tensors``
    - ``write``: every tensor is computed; (extract) the output is being written
    - ``summary``: the report's summary (``kinds``, ``status``, ``seconds``, ``files``,
      ``output``, ``computed``, ``reused``, ...) and ``report`` (the JSON report's path)
    - ``error``: ``message`` (the one line also printed on stderr), ``exit_code``

    Events other than these may be added; readers should skip unknown ones."""

    def __init__(self, command: str, also=None):
        self.command = command
        self.also = also  # a quiet bar that still prints warnings on stderr (merge)
        self.done = self.total = 0

    def __call__(self, event: str, info: dict) -> None:
        if self.also is not None:
            self.also(event, info)
        if event == "start":
            self.done, self.total = info["done"], info["tensors"]
        elif event == "tensor":
            self.done += 1
            info = {**info, "done": self.done, "tensors": self.total}
        self.emit(event, info)

    def emit(self, event: str, info: dict) -> None:
        line = {"event": event, "command": self.command, "time": round(time.time(), 3), **info}
        sys.stdout.write(json.dumps(line, default=str) + "\n")
        sys.stdout.flush()

    def summary(self, report: dict, report_path: str | None) -> None:
        summary = report["summary"]
        default = os.path.splitext(summary["output"])[0] + ".report.json"
        self.emit("summary", {**summary, "report": os.path.abspath(report_path or default)})

    def close(self) -> None:
        pass


class _Bar:
    """Progress callback → a rich bar of tensors and bytes."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress: Progress | None = None

    def __call__(self, event: str, info: dict) -> None:
        if self.quiet:
            return
        if event == "start":
            for change in info.get("changes", []):
                err.print(f"note: {change}; affected tensors are recomputed", markup=False)
            if info["done"]:
                err.print(
                    f"resuming: {info['done']} of {info['tensors']} tensors already done "
                    f"in {info['work_dir']}",
                    markup=False,
                )
            self.progress = Progress(
                TextColumn("tensors"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[gb]}"),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            )
            self.progress.start()
            self.bytes_done, self.bytes_total = info["done_bytes"], info["bytes"]
            self.task = self.progress.add_task(
                "tensors", total=info["tensors"], completed=info["done"], gb=self._gb()
            )
        elif event == "cluster" and info.get("dashboard"):
            err.print(f"Dask dashboard: {info['dashboard']}", markup=False)
        elif event == "tensor" and self.progress:
            self.bytes_done += info["bytes"]
            self.progress.update(self.task, advance=1, gb=self._gb())
        elif event == "write" and self.progress:
            self.progress.update(self.task, completed=info["tensors"])
            self.progress.stop()
            self.progress = None

    def _gb(self) -> str:
        return f"{self.bytes_done / 1e9:.2f}/{self.bytes_total / 1e9:.2f} GB read"

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


def _summary(report: dict) -> None:
    summary = report["summary"]
    table = Table(title="loraforge " + report["command"], show_header=True)
    table.add_column("kind")
    table.add_column("tensors", justify="right")
    table.add_column("mean rel. error", justify="right")
    table.add_column("max rel. error", justify="right")
    for kind in sorted(summary["kinds"]):
        errors = [
            t["rel_error"]
            for t in report["tensors"].values()
            if t["kind"] == kind and t.get("rel_error") is not None
        ]
        table.add_row(
            kind,
            str(summary["kinds"][kind]),
            f"{sum(errors) / len(errors):.4g}" if errors else "",
            f"{max(errors):.4g}" if errors else "",
        )
    err.print(table)
    status = ", ".join(f"{n} {s}" for s, n in summary["status"].items())
    err.print(f"{status}; {summary['seconds']:.1f} s", markup=False)
    for side in ("source_only", "target_only"):
        if summary.get(side):
            err.print(
                f"{len(summary[side])} keys only in the {side.split('_')[0]} model "
                f"(listed in the report), e.g. {summary[side][0]}",
                markup=False,
            )
    for file in summary["files"]:
        err.print(f"wrote {file}", markup=False)


@app.command(
    epilog="Examples:\n\n  loraforge extract --source-model base/ --target-model ft/ "
    "--output lora.safetensors --rank 32\n\n  loraforge extract --source-model "
    "base.safetensors --target-model ft.safetensors --output diff.safetensors "
    "--diff-only --output-dtype fp32\n\n  loraforge extract --source-model base/ --target-model "
    "ft/ --output lora.safetensors --gpus all\n\n  loraforge extract --source-model base/ "
    "--target-model ft/ --output lora.safetensors --scheduler /shared/scheduler.json --json"
)
def extract(
    source_model: SourceModel,
    target_model: Annotated[str, typer.Option("--target-model", help="Fine-tuned checkpoint.")],
    output: OutputPath,
    source_type: SourceType = CheckpointType.safetensors,
    target_type: Annotated[
        CheckpointType, typer.Option("--target-type")
    ] = CheckpointType.safetensors,
    output_format: OutputFormat = CheckpointType.safetensors,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = 32,
    output_dtype: OutputDtype = "bf16",
    diff_only: Annotated[
        bool,
        typer.Option("--diff-only", help="Store every tensor as a full diff, no decomposition."),
    ] = False,
    lowrank_min_params: Annotated[
        int, typer.Option("--lowrank-min-params", help="Smaller tensors are stored as diffs.")
    ] = 1_000_000,
    svd: Annotated[
        SvdMethod, typer.Option("--svd", help="randomized (fast) or full (reference).")
    ] = SvdMethod.randomized,
    oversample: Annotated[int, typer.Option("--oversample")] = 16,
    power_iterations: Annotated[int, typer.Option("--power-iterations")] = 2,
    device: Device = "auto",
    workers: Workers = None,
    scheduler: Scheduler = None,
    max_shard_size: MaxShardSize = None,
    report: ReportPath = None,
    work_dir: WorkDirOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Reuse finished intermediates.")
    ] = True,
    keep_work: Annotated[
        bool,
        typer.Option("--keep-work/--no-keep-work", help="Keep the work directory after success."),
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or summary.")] = False,
    gpus: Gpus = None,
    json_output: JsonOutput = False,
) -> None:
    """Extract a LoRA from the difference between a base and a fine-tuned checkpoint."""
    from .extract import extract as run_extract

    log = _JsonLog("extract") if json_output else None
    with _user_errors(log):
        parse_dtype(output_dtype)
        options = ExtractOptions(
            kernel=KernelOptions(
                method=svd.value, rank=rank, oversample=oversample, n_iter=power_iterations
            ),
            lowrank_min_params=lowrank_min_params,
            diff_only=diff_only,
            output_dtype=output_dtype.lower(),
            output_format=output_format.value,
            max_shard_size=parse_size(max_shard_size),
        )
        bar = log or _Bar(quiet)
        try:
            result = run_extract(
                source_model=source_model,
                target_model=target_model,
                output=output,
                options=options,
                source_type=source_type.value,
                target_type=target_type.value,
                work_dir=work_dir,
                resume=resume,
                keep_work=keep_work,
                device=device,
                workers=workers,
                scheduler=scheduler,
                gpus=gpus,
                report_path=report,
                progress=bar,
            )
        finally:
            bar.close()
        if log:
            log.summary(result, report)
        elif not quiet:
            _summary(result)


class _MergeBar(_Bar):
    """The bar, plus one line per LoRA: how much it patches and what it leaves out. Lines about
    keys left out are printed even with --quiet: they are never dropped silently."""

    def __call__(self, event: str, info: dict) -> None:
        if event != "loras":
            return super().__call__(event, info)
        for lora in info["loras"]:
            unmatched = lora["unmatched"]
            n = lora["patches"]
            line = (
                f"{lora['path']}: {n} tensor{'s' if n != 1 else ''} patched at strength "
                f"{lora['strength']:g}"
            )
            if unmatched:
                key, reason = next(iter(unmatched.items()))
                line = (
                    f"warning: {line}; {len(unmatched)} of {lora['keys']} keys not merged "
                    f"(listed in the report), e.g. '{key}': {reason}"
                )
            if unmatched or not self.quiet:
                err.print(line, markup=False, soft_wrap=True)


def _merge_summary(report: dict) -> None:
    summary = report["summary"]
    table = Table(title="loraforge merge", show_header=True)
    table.add_column("kind")
    table.add_column("tensors", justify="right")
    for kind in sorted(summary["kinds"]):
        table.add_row(kind, str(summary["kinds"][kind]))
    err.print(table)
    status = ", ".join(f"{n} {s}" for s, n in summary["status"].items())
    err.print(f"{status}; {summary['seconds']:.1f} s", markup=False)
    for file in summary["files"]:
        err.print(f"wrote {file}", markup=False)


@app.command(
    epilog="Examples:\n\n  loraforge merge --source-model base/ --lora-model lora.safetensors "
    "--output merged.safetensors\n\n  loraforge merge --source-model base/ --lora-model "
    "a.safetensors --strength 0.8 --lora-model peft_adapter/ --strength 0.5 --output "
    "merged.safetensors --max-shard-size 5GB\n\n  loraforge merge --source-model "
    "base.safetensors --config loras.json --output merged.safetensors --output-dtype fp32"
    "\n\n  loraforge merge --source-model base/ --lora-model lora.safetensors --output "
    "/shared/merged.safetensors --scheduler tcp://head:8786 --device cuda"
)
def merge(
    source_model: SourceModel,
    output: OutputPath,
    lora_model: Annotated[
        list[str] | None,
        typer.Option(
            "--lora-model",
            metavar="PATH",
            help="LoRA: a .safetensors or .pt file, a shard directory, or a PEFT adapter "
            "directory (adapter_model.* + adapter_config.json). Repeatable.",
        ),
    ] = None,
    strength: Annotated[
        list[str] | None,
        typer.Option(
            "--strength",
            metavar="FLOAT",
            help="Strength of each --lora-model, in the same order (default 1.0). Repeatable.",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            metavar="FILE.json",
            help='LoRAs from a LightX2V-style config: {"lora_path": [...], "strength_model": 1.0} '
            'or {"lora_configs": [{"path": ..., "strength": 0.8}]}; relative paths are read '
            "from the config's directory.",
        ),
    ] = None,
    alpha: Annotated[
        str,
        typer.Option(
            "--alpha",
            metavar="FLOAT",
            help="Global multiplier of every LoRA's delta (LightX2V's merge strength).",
        ),
    ] = "1.0",
    source_type: SourceType = CheckpointType.safetensors,
    lora_type: Annotated[
        CheckpointType | None,
        typer.Option("--lora-type", help="Format of the LoRA files (default: from each name)."),
    ] = None,
    output_format: OutputFormat = CheckpointType.safetensors,
    output_dtype: OutputDtype = "bf16",
    max_shard_size: MaxShardSize = None,
    device: Device = "auto",
    workers: Workers = None,
    scheduler: Scheduler = None,
    report: ReportPath = None,
    work_dir: WorkDirOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume", help="Keep what an interrupted run of the same merge wrote."
        ),
    ] = True,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail when any LoRA key would not be merged.")
    ] = False,
    allow_nonfinite: Annotated[
        bool,
        typer.Option("--allow-nonfinite", help="Merge LoRA tensors holding NaN/Inf anyway."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or summary.")] = False,
    gpus: Gpus = None,
    json_output: JsonOutput = False,
) -> None:
    """Merge one or many LoRAs into a base checkpoint, tensor by tensor with bounded memory.

    Each targeted weight becomes W + strength * alpha * scale * (up @ down), or
    W + strength * alpha * diff for .diff/.diff_b/.diff_m, computed in fp32 and cast to
    --output-dtype; other float tensors are cast, non-float ones copied. scale is
    alpha_key / rank when the LoRA has a NAME.alpha key (as LightX2V's loader, kohya and
    ComfyUI apply it), lora_alpha / r from a PEFT adapter_config.json, else 1.

    Differences from LightX2V's lora_merger.py: it ignores .alpha keys, so a LoRA whose alpha
    differs from its rank merges alpha/rank times stronger or weaker there (loraforge's own
    extractions store alpha = rank: identical results); it reads only lora_up/lora_down and
    diff keys, while loraforge reads every common naming and lists each key it cannot merge;
    it holds the whole model in fp32 in RAM, loraforge one tensor per worker.

    An interrupted merge keeps the temporary output beside --output; rerunning the same
    command writes only the missing tensors and gives the same bytes.
    """
    from .merge import merge as run_merge
    from .merge_config import config_from_options, load_merge_config, parse_number

    log = _JsonLog("merge", _MergeBar(quiet=True)) if json_output else None
    with _user_errors(log):
        if config and (lora_model or strength):
            raise UsageError("give the LoRAs with --config or with --lora-model, not both")
        parse_dtype(output_dtype)
        options = MergeOptions(
            alpha=parse_number(alpha, "--alpha"),
            output_dtype=output_dtype.lower(),
            output_format=output_format.value,
            max_shard_size=parse_size(max_shard_size),
            strict=strict,
            allow_nonfinite=allow_nonfinite,
        )
        if config:
            loras = load_merge_config(config)
        else:
            loras = config_from_options(lora_model or [], strength or [])
        bar = log or _MergeBar(quiet)
        try:
            result = run_merge(
                source_model=source_model,
                loras=loras,
                output=output,
                options=options,
                source_type=source_type.value,
                lora_type=lora_type.value if lora_type else None,
                work_dir=work_dir,
                resume=resume,
                device=device,
                workers=workers,
                scheduler=scheduler,
                gpus=gpus,
                report_path=report,
                progress=bar,
            )
        finally:
            bar.close()
        if log:
            log.summary(result, report)
        elif not quiet:
            _merge_summary(result)


@app.command(epilog="Example:\n\n  loraforge clean lora.safetensors.work")
def clean(work_dir: Annotated[str, typer.Argument(help="Work directory to remove.")]) -> None:
    """Remove a work directory (intermediates kept for resume)."""
    from .workdir import RunLock, WorkDir

    with _user_errors():
        work = WorkDir(work_dir)
        if not os.path.isdir(work.path) or not os.path.isdir(work.done):
            raise UsageError("not a loraforge work directory", path=work.path)
        lock = RunLock(work.path)
        lock.acquire()  # refuses while a live run holds it
        size = work.size_bytes()
        import shutil

        shutil.rmtree(work.path)
        err.print(f"removed {work.path} ({size / 1e9:.2f} GB)", markup=False)


def main() -> None:
    app(prog_name="loraforge")


if __name__ == "__main__":
    sys.exit(main())
