"""The ``loraforge`` command line: typer options in, one call into a command's package, the
console (``console.py``) for everything shown. No logic of its own beyond parsing options."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated

import typer
from typer.core import TyperGroup

from loraforge.kernels.svd import DEFAULT_MAX_ITER, DEFAULT_TOL

from .cli_options import (
    SVD_HELP,
    CheckpointType,
    ConfigName,
    Device,
    Energy,
    Gpus,
    JsonOutput,
    KeyStyleName,
    KeyStyleOpt,
    LoraConfig,
    LoraModels,
    MaxMemory,
    MaxShardSize,
    MergeOutputDtype,
    MinRank,
    OutputDtype,
    OutputFormat,
    OutputPath,
    RankBudget,
    RankMode,
    RankModeName,
    ReportPath,
    Scheduler,
    SourceModel,
    SourceType,
    Strengths,
    SvdMethod,
    SvRatio,
    SvThreshold,
    WorkDirOpt,
    Workers,
)
from .console import Failed, JsonLog, print_cleaned, print_error, run_command, user_errors
from .errors import UsageError
from .io.dtypes import parse_dtype, parse_size
from .lora.styles import DEFAULT_STYLE, KEY_STYLE_HELP
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
    rank: Annotated[
        str,
        typer.Option(
            "--rank",
            metavar="R|R1,R2,...",
            help="LoRA rank: the factorisation rank and every rank mode's cap. Several "
            "(16,32,64): one factorisation at the largest, one file per rank, "
            "OUTPUT-STEM-r16.safetensors, ...",
        ),
    ] = "32",
    rank_mode: RankMode = RankModeName.fixed,
    min_rank: MinRank = 1,
    energy: Energy = None,
    sv_ratio: SvRatio = None,
    sv_threshold: SvThreshold = None,
    rank_budget: RankBudget = None,
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
    power_iterations: Annotated[
        str,
        typer.Option(
            "--power-iterations",
            metavar="auto|N",
            help="auto: iterate until the captured energy settles (--svd-tol, at most "
            "--max-power-iterations); N: exactly N.",
        ),
    ] = "auto",
    svd_tol: Annotated[
        float,
        typer.Option("--svd-tol", help="auto iterations stop when one gains < this of the rest."),
    ] = DEFAULT_TOL,
    max_power_iterations: Annotated[
        int, typer.Option("--max-power-iterations", help="Cap of auto power iterations.")
    ] = DEFAULT_MAX_ITER,
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
    max_memory: MaxMemory = None,
    json_output: JsonOutput = False,
    key_style: KeyStyleOpt = DEFAULT_STYLE,
) -> None:
    """Extract a LoRA from the difference between a base and a fine-tuned checkpoint."""
    from .extract.command import extract as run_extract
    from .extract.options import ExtractOptions, KernelOptions
    from .lora.rank_options import parse_iterations, parse_ranks, rank_rule

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
        max_memory=max_memory,
    )

    def body(progress: Callable) -> dict:
        parse_dtype(output_dtype)
        ranks = parse_ranks(rank)
        options = ExtractOptions(
            kernel=KernelOptions(
                method=SvdMethod(svd).value,
                rank=ranks[-1],
                oversample=oversample,
                n_iter=parse_iterations(power_iterations),
                tol=svd_tol,
                max_iter=max_power_iterations,
            ),
            rank_rule=rank_rule(
                mode=RankModeName(rank_mode).value,
                rank=ranks[-1],
                min_rank=min_rank,
                energy=energy,
                sv_ratio=sv_ratio,
                sv_threshold=sv_threshold,
                rank_budget=rank_budget,
            ),
            ranks=ranks,
            lowrank_min_params=lowrank_min_params,
            diff_only=diff_only,
            output_dtype=output_dtype.lower(),
            output_format=output_format.value,
            max_shard_size=parse_size(max_shard_size),
            key_style=KeyStyleName(key_style).value,
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
    "\n\n  loraforge merge --source-model low_noise_model/ --config "
    "wan_moe_i2v_distill_with_lora.json --config-name low_noise_model --output merged.safetensors"
    "\n\n  loraforge merge --source-model base/ --lora-model lora.safetensors --output "
    "/shared/merged.safetensors --scheduler tcp://head:8786 --device cuda"
    "\n\n  loraforge merge --source-model wan_fp8_scaled.safetensors --lora-model "
    "lora.safetensors --output merged_fp8.safetensors --output-dtype fp8_e4m3fn"
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
    config: LoraConfig = None,
    config_name: ConfigName = None,
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
    output_dtype: MergeOutputDtype = "bf16",
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
    max_memory: MaxMemory = None,
    json_output: JsonOutput = False,
) -> None:
    """Merge one or many LoRAs into a base checkpoint, tensor by tensor with bounded memory.

    Each targeted weight becomes W + strength * alpha * scale * (up @ down), or
    W + strength * alpha * diff for .diff/.diff_b/.diff_m, computed in fp32 and cast to
    --output-dtype; other float tensors are cast, non-float ones copied. scale is
    alpha_key / rank when the LoRA has a NAME.alpha key (as LightX2V's loader, kohya and
    ComfyUI apply it), lora_alpha / r from a PEFT adapter_config.json, else 1.

    A scaled-fp8 base (ComfyUI's scaled_fp8 or _quantization_metadata files, LightX2V's
    fp8) is read as W_fp8 * scale. --output-dtype fp8_e4m3fn writes scaled fp8 in the base's
    convention (ComfyUI's scaled_fp8 for a base without scales): each quantized weight gets
    an fp32 scale amax/448 and is rounded to nearest, saturating; other tensors keep their
    dtype. Any other --output-dtype drops the base's scales and markers.

    Differences from LightX2V's lora_merger.py: it ignores .alpha keys, so a LoRA whose alpha
    differs from its rank merges alpha/rank times stronger or weaker there (loraforge's own
    extractions store alpha = rank: identical results); it reads only lora_up/lora_down and
    diff keys, while loraforge reads every common naming and lists each key it cannot merge;
    it holds the whole model in fp32 in RAM, loraforge one tensor per worker.

    An interrupted merge keeps the temporary output beside --output; rerunning the same
    command writes only the missing tensors and gives the same bytes.
    """
    from .lora.config import loras_from_arguments, parse_number
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
        max_memory=max_memory,
    )

    def body(progress: Callable) -> dict:
        loras = loras_from_arguments(config, config_name, lora_model, strength)
        parse_dtype(output_dtype, fp8=True)
        options = MergeOptions(
            alpha=parse_number(alpha, "--alpha"),
            output_dtype=output_dtype.lower(),
            output_format=output_format.value,
            max_shard_size=parse_size(max_shard_size),
            strict=strict,
            allow_nonfinite=allow_nonfinite,
        )
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


@app.command(
    epilog="Examples:\n\n  loraforge inspect lora.safetensors\n\n  loraforge inspect "
    "peft_adapter/ --base base/ --json"
)
def inspect(
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH",
            help="LoRA: a .safetensors or .pt file, a shard directory, or a PEFT adapter "
            "directory.",
        ),
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            metavar="MODEL",
            help="Base checkpoint: also list the base tensors it patches, its keys that patch "
            "nothing and its shape mismatches (headers only).",
        ),
    ] = None,
    lora_type: Annotated[
        CheckpointType | None,
        typer.Option("--lora-type", help="Format of the LoRA (default: from its name)."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="The report as one JSON object on stdout.")
    ] = False,
) -> None:
    """Show what a LoRA holds, writing nothing: the naming detected, tensors, dtypes and bytes,
    the ranks, alphas and effective scales (alpha / rank, PEFT's lora_alpha / r, else 1), and
    each delta's Frobenius norm with its scale (low-rank ones from their factors, to about
    1e-6 relative, without forming the product). Modules are named as in the LoRA's own keys;
    with --base, also the base tensors they patch."""
    from .console import json_line, print_inspect
    from .inspect.command import inspect_lora

    def body() -> None:
        with user_errors(JsonLog("inspect") if json_output else None):
            report = inspect_lora(path, base, lora_type.value if lora_type else None)
            if json_output:
                sys.stdout.write(json_line(report) + "\n")
            else:
                print_inspect(report)

    _exit_on_failure(body)


@app.command(
    epilog="Examples:\n\n  loraforge resize --lora-model big.safetensors --output "
    "small.safetensors --rank 16\n\n  loraforge resize --lora-model a.safetensors "
    "--strength 0.8 --lora-model peft_adapter/ --strength 0.5 --output ab.safetensors "
    "--rank 64 --rank-mode energy --energy 0.99\n\n  loraforge resize --lora-model "
    "kohya.safetensors --base base/ --output lora.safetensors --rank 32 --rank-mode budget "
    "--rank-budget 20000000"
)
def resize(
    output: OutputPath,
    rank: Annotated[
        str,
        typer.Option(
            "--rank",
            metavar="R|R1,R2,...",
            help="Largest rank kept per tensor (every --rank-mode's cap). Several (16,32): "
            "one file per rank, OUTPUT-STEM-r16.safetensors, ...",
        ),
    ],
    lora_model: LoraModels = None,
    strength: Strengths = None,
    config: LoraConfig = None,
    config_name: ConfigName = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base checkpoint whose tensor names the LoRAs are mapped onto (needed for "
            "kohya names); only its headers are read.",
        ),
    ] = None,
    base_type: Annotated[CheckpointType, typer.Option("--base-type")] = CheckpointType.safetensors,
    lora_type: Annotated[
        CheckpointType | None,
        typer.Option("--lora-type", help="Format of the LoRA files (default: from each name)."),
    ] = None,
    rank_mode: RankMode = RankModeName.fixed,
    min_rank: MinRank = 1,
    energy: Energy = None,
    sv_ratio: SvRatio = None,
    sv_threshold: SvThreshold = None,
    rank_budget: RankBudget = None,
    output_format: OutputFormat = CheckpointType.safetensors,
    output_dtype: OutputDtype = "bf16",
    max_shard_size: MaxShardSize = None,
    key_style: KeyStyleOpt = DEFAULT_STYLE,
    workers: Workers = None,
    report: ReportPath = None,
    work_dir: WorkDirOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Reuse finished intermediates.")
    ] = True,
    keep_work: Annotated[
        bool,
        typer.Option("--keep-work/--no-keep-work", help="Keep the work directory after success."),
    ] = True,
    allow_nonfinite: Annotated[
        bool,
        typer.Option("--allow-nonfinite", help="Read LoRA tensors holding NaN/Inf anyway."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or summary.")] = False,
    max_memory: MaxMemory = None,
    json_output: JsonOutput = False,
) -> None:
    """Resize one LoRA, or sum several into one, at chosen ranks.

    Per target weight the exact sum of strength * scale * up @ down over the LoRAs is
    refactored without forming the dense product (QR of the stacked factors, SVD of the small
    core), then each tensor keeps the rank --rank-mode chooses (at most --rank) with
    alpha = rank. Full diffs (diff, diff_b, diff_m) are summed. The report gives each tensor's
    error against the exact sum. Another --rank, --rank-mode or output option with the same
    --work-dir re-exports without recomputing.
    """
    from .lora.config import loras_from_arguments
    from .lora.rank_options import parse_ranks, rank_rule
    from .resize.command import resize as run_resize
    from .resize.options import ResizeOptions

    run = RunOptions(
        device="cpu",
        workers=workers,
        work_dir=work_dir,
        resume=resume,
        keep_work=keep_work,
        report=report,
        json=json_output,
        quiet=quiet,
        max_memory=max_memory,
    )

    def body(progress: Callable) -> dict:
        if config and (lora_model or strength):
            raise UsageError("give the LoRAs with --config or with --lora-model, not both")
        parse_dtype(output_dtype)
        ranks = parse_ranks(rank)
        options = ResizeOptions(
            rank_rule=rank_rule(
                mode=RankModeName(rank_mode).value,
                rank=ranks[-1],
                min_rank=min_rank,
                energy=energy,
                sv_ratio=sv_ratio,
                sv_threshold=sv_threshold,
                rank_budget=rank_budget,
            ),
            output_dtype=output_dtype.lower(),
            ranks=ranks,
            output_format=output_format.value,
            max_shard_size=parse_size(max_shard_size),
            key_style=KeyStyleName(key_style).value,
            allow_nonfinite=allow_nonfinite,
        )
        loras = loras_from_arguments(config, config_name, lora_model, strength)
        return run_resize(
            loras=loras,
            output=output,
            options=options,
            base=base,
            base_type=base_type.value,
            lora_type=lora_type.value if lora_type else None,
            run=run,
            progress=progress,
        )

    _exit_on_failure(lambda: run_command("resize", run, body))


@app.command(
    epilog="Examples:\n\n  loraforge convert lora.safetensors lora_peft --to peft\n\n  "
    "loraforge convert kohya_lora.safetensors lora.safetensors --to lightx2v --base base/\n\n  "
    "loraforge convert peft_adapter/ lora_diffusers.safetensors --to diffusers"
)
def convert(
    lora: Annotated[
        str,
        typer.Argument(
            metavar="IN", help="LoRA: a file, a shard directory or a PEFT adapter directory."
        ),
    ],
    output: Annotated[
        str,
        typer.Argument(
            metavar="OUT", help="Output file (a directory for --to peft); .safetensors is added."
        ),
    ],
    to: Annotated[KeyStyleName, typer.Option("--to", help=KEY_STYLE_HELP)],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            metavar="MODEL",
            help="The model the LoRA patches: names are taken from its keys (needed for kohya "
            "lora_unet_ names).",
        ),
    ] = None,
    base_type: Annotated[CheckpointType, typer.Option("--base-type")] = CheckpointType.safetensors,
    lora_type: Annotated[
        CheckpointType | None,
        typer.Option("--lora-type", help="Format of IN (default: from its name)."),
    ] = None,
    max_shard_size: MaxShardSize = None,
    report: ReportPath = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or summary.")] = False,
    json_output: JsonOutput = False,
) -> None:
    """Rewrite a LoRA in another key style, tensor by tensor: factors and diffs keep their
    dtype and bytes, alpha / rank keeps its value, so merging the result gives the same bytes
    as merging IN. What the target style cannot hold (full diffs in peft and diffusers) is
    listed in the summary and the report."""
    from .convert.command import convert as run_convert

    run = RunOptions(report=report, json=json_output, quiet=quiet)

    def body(progress: Callable) -> dict:
        return run_convert(
            lora=lora,
            output=output,
            to=KeyStyleName(to).value,
            base=base,
            lora_type=lora_type.value if lora_type else None,
            base_type=base_type.value,
            max_shard_size=parse_size(max_shard_size),
            run=run,
            progress=progress,
        )

    _exit_on_failure(lambda: run_command("convert", run, body))


@app.command(
    epilog="Examples:\n\n  loraforge verify --source-model base/ --target-model ft/ "
    "--lora-model lora.safetensors\n\n  loraforge verify --source-model base/ --target-model "
    "ft/ --lora-model a.safetensors --strength 0.8 --lora-model b.safetensors --strength 1.0 "
    "--max-error 0.05 --report check.json --json"
)
def verify(
    source_model: SourceModel,
    target_model: Annotated[str, typer.Option("--target-model", help="Fine-tuned checkpoint.")],
    lora_model: LoraModels = None,
    strength: Strengths = None,
    config: LoraConfig = None,
    config_name: ConfigName = None,
    alpha: Annotated[
        str,
        typer.Option("--alpha", metavar="FLOAT", help="Global multiplier, as merge's --alpha."),
    ] = "1.0",
    max_error: Annotated[
        float | None,
        typer.Option(
            "--max-error",
            metavar="E",
            help="Exit with code 1 when the total relative error is above E.",
        ),
    ] = None,
    worst: Annotated[int, typer.Option("--worst", min=0, help="Tensors listed as the worst.")] = 10,
    source_type: SourceType = CheckpointType.safetensors,
    target_type: Annotated[
        CheckpointType, typer.Option("--target-type")
    ] = CheckpointType.safetensors,
    lora_type: Annotated[
        CheckpointType | None,
        typer.Option("--lora-type", help="Format of the LoRA files (default: from each name)."),
    ] = None,
    workers: Workers = None,
    report: Annotated[
        str | None, typer.Option("--report", help="Write the JSON report here (default: none).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or summary.")] = False,
    max_memory: MaxMemory = None,
    json_output: JsonOutput = False,
) -> None:
    """Check how closely base + LoRAs reproduce a fine-tuned checkpoint, tensor by tensor.

    Per tensor rel_error = ||B + D - F|| / ||F - B|| with D the LoRAs' delta as merge applies
    it (strength * alpha * scale * up @ down, or the diff), in fp64, a block of rows at a
    time; the total is sqrt(sum ||B + D - F||^2) / sqrt(sum ||F - B||^2). Nothing is written
    but the report (with --report).
    """
    from .lora.config import loras_from_arguments, parse_number
    from .verify.command import verify as run_verify
    from .verify.options import VerifyOptions

    run = RunOptions(
        device="cpu",
        workers=workers,
        report=report,
        json=json_output,
        quiet=quiet,
        max_memory=max_memory,
    )
    done: dict = {}

    def body(progress: Callable) -> dict:
        options = VerifyOptions(
            alpha=parse_number(alpha, "--alpha"), max_error=max_error, worst=worst
        )
        loras = loras_from_arguments(config, config_name, lora_model, strength)
        done["report"] = run_verify(
            source_model=source_model,
            target_model=target_model,
            loras=loras,
            options=options,
            run=run,
            source_type=source_type.value,
            target_type=target_type.value,
            lora_type=lora_type.value if lora_type else None,
            progress=progress,
        )
        return done["report"]

    _exit_on_failure(lambda: run_command("verify", run, body))
    summary = done["report"]["summary"]
    if summary["passed"] is False:
        total = summary["rel_error"]
        worst_line = f"; worst {summary['worst'][0]['key']}" if summary["worst"] else ""
        print_error(
            f"total relative error {'nan' if total is None else f'{total:.6g}'} is above "
            f"--max-error {max_error:g}{worst_line}",
            1,
            JsonLog("verify") if json_output else None,
        )
        raise typer.Exit(1)


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
