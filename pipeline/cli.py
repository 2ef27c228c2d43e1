"""The ``loraforge`` command line: typer options in, one call into a command's package, the
console (``console.py``) for everything shown. No logic of its own beyond parsing options."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated

import typer
from typer.core import TyperGroup

from .cli_options import (
    SVD_HELP,
    CheckpointType,
    Device,
    Gpus,
    JsonOutput,
    MaxShardSize,
    OutputDtype,
    OutputFormat,
    OutputPath,
    ReportPath,
    Scheduler,
    SourceModel,
    SourceType,
    SvdMethod,
    WorkDirOpt,
    Workers,
)
from .console import Failed, JsonLog, print_cleaned, print_error, run_command, user_errors
from .errors import UsageError
from .io.dtypes import parse_dtype, parse_size
from .run.options import RunOptions

# typer vendors click in recent releases (typer._click) and uses click itself in older ones: find
# click's exception classes through typer's public ones instead of importing either.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NO_ARGS_HELP = getattr(
    sys.modules[_CLICK_ERROR.__module__], "NoArgsIsHelpError", type("NeverRaised", (Exception,), {})
)


class _OneLineErrors(TyperGroup):
    """Bad option values (click's usage errors: ``--rank x``, ``--svd qr``) end like every other
    error: one ``error:`` line (and a JSON ``error`` event with ``--json``), exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, False, **extra)
        except _NO_ARGS_HELP:
            return super().main(argv, prog_name, complete_var, True, **extra)  # help, as before
        except _CLICK_ERROR as e:
            command = e.ctx.command_path if getattr(e, "ctx", None) else "loraforge"
            message = f"{e.format_message()} (see {command} --help)"
            log = JsonLog(argv[0]) if argv and "--json" in argv else None
            print_error(message, e.exit_code, log)
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings wrap as paragraphs, not at their line breaks
    help="Extract, merge and convert LoRAs for checkpoints larger than RAM.",
)


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
    svd: Annotated[SvdMethod, typer.Option("--svd", help=SVD_HELP)] = "randomized",
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
    from .extract.command import extract as run_extract
    from .extract.options import ExtractOptions, KernelOptions

    run = RunOptions(
        device=device,
        workers=workers,
        scheduler=scheduler,
        gpus=gpus,
        work_dir=work_dir,
        resume=resume,
        keep_work=keep_work,
        report=report,
        json=json_output,
        quiet=quiet,
    )

    def body(progress: Callable) -> dict:
        parse_dtype(output_dtype)
        options = ExtractOptions(
            kernel=KernelOptions(
                method=SvdMethod(svd).value,
                rank=rank,
                oversample=oversample,
                n_iter=power_iterations,
            ),
            lowrank_min_params=lowrank_min_params,
            diff_only=diff_only,
            output_dtype=output_dtype.lower(),
            output_format=output_format.value,
            max_shard_size=parse_size(max_shard_size),
        )
        return run_extract(
            source_model=source_model,
            target_model=target_model,
            output=output,
            options=options,
            run=run,
            source_type=source_type.value,
            target_type=target_type.value,
            progress=progress,
        )

    _exit_on_failure(lambda: run_command("extract", run, body))


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
    from .lora.config import config_from_options, load_merge_config, parse_number
    from .merge.command import merge as run_merge
    from .merge.options import MergeOptions

    run = RunOptions(
        device=device,
        workers=workers,
        scheduler=scheduler,
        gpus=gpus,
        work_dir=work_dir,
        resume=resume,
        report=report,
        json=json_output,
        quiet=quiet,
    )

    def body(progress: Callable) -> dict:
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
        return run_merge(
            source_model=source_model,
            loras=loras,
            output=output,
            options=options,
            run=run,
            source_type=source_type.value,
            lora_type=lora_type.value if lora_type else None,
            progress=progress,
        )

    _exit_on_failure(lambda: run_command("merge", run, body))


@app.command(epilog="Example:\n\n  loraforge clean lora.safetensors.work")
def clean(work_dir: Annotated[str, typer.Argument(help="Work directory to remove.")]) -> None:
    """Remove a work directory (intermediates kept for resume): what loraforge wrote there,
    the temporary output its run left beside --output to resume from, then the directory itself
    when nothing else is left in it. A symlink to a work directory is followed."""
    from .workdir.clean import clean_work_dir

    def body() -> None:
        with user_errors():
            print_cleaned(clean_work_dir(work_dir))

    _exit_on_failure(body)


def _exit_on_failure(body: Callable[[], None]) -> None:
    try:
        body()
    except Failed as failed:
        raise typer.Exit(failed.exit_code) from None


def main() -> None:
    app(prog_name="loraforge")


if __name__ == "__main__":
    sys.exit(main())
