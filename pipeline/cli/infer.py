"""``loraforge infer``: LightX2V's ``infer.py`` command line, parsed into ``RuntimeOptions``,
``InferOptions`` and ``RunOptions``."""

from __future__ import annotations

from typing import Annotated

import typer

from ..infer.command import infer
from ..infer.options import InferOptions
from ..lora.config import parse_number
from ..run.options import RunOptions
from ..runtime.spec import RuntimeOptions
from .app import app, running
from .option_sets import RUN
from .parameters import expand
from .runtime_options import RUNTIME


def _split(values: list[str] | None) -> list[str]:
    """Repeated flags and comma lists alike: ``--lora_path a,b --lora_path c``."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


@app.command(
    "infer",
    epilog="Examples:\n\n  loraforge infer --model_cls wan2.1_distill --task t2v --model_path "
    "Wan2.1-T2V-14B-Diffusers --config_json configs/wan/wan_t2v_distill_lora_4step_cfg.json "
    '--prompt "Two cats box on a stage." --save_result_path out.mp4\n\n  loraforge infer '
    "--model_cls wan2.1 --task i2v --model_path Wan2.1-I2V-14B-480P-Diffusers --config_json "
    "wan_i2v.json --lora_path style.safetensors --lora_strength 0.8 --image_path cat.jpg "
    '--prompt "A cat surfs." --seed 7 --save_result_path cat.mp4 --save_frames',
)
@expand(RUNTIME, RUN.only("device", "report", "quiet", "json_output"))
def infer_command(
    save_result_path: Annotated[
        str,
        typer.Option("--save_result_path", help="The mp4 to write (.mp4 added when missing)."),
    ],
    runtime: RuntimeOptions = None,
    prompt: Annotated[str, typer.Option("--prompt")] = "",
    negative_prompt: Annotated[str, typer.Option("--negative_prompt")] = "",
    image_path: Annotated[
        str | None, typer.Option("--image_path", help="The input image (--task i2v).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1)] = 42,
    lora_path: Annotated[
        list[str] | None,
        typer.Option(
            "--lora_path",
            metavar="PATH",
            help="A LoRA in any naming loraforge reads (repeatable, or a comma list); replaces "
            "the config's LoRAs. Wan 2.2 MoE: applied to both transformers.",
        ),
    ] = None,
    lora_strength: Annotated[
        list[str] | None,
        typer.Option(
            "--lora_strength",
            metavar="FLOAT",
            help="One strength for every --lora_path, or one per --lora_path in order "
            "(repeatable, or a comma list; default 1.0).",
        ),
    ] = None,
    save_frames: Annotated[
        bool,
        typer.Option(
            "--save_frames",
            help="Also write each frame as a PNG into <save_result_path stem>_frames/.",
        ),
    ] = False,
    run: RunOptions = None,
) -> None:
    """Generate one video with a Wan model and LoRAs, as LightX2V's infer.py does.

    The model is a diffusers folder; LoRAs (any naming and layout loraforge reads, Wan's
    original names included) come from the config's lora_configs or lora_path +
    strength_model, or from --lora_path, and are fused into the weights exactly as
    loraforge merge would (nothing added per step). Writes the mp4, the PNGs on request, and a
    JSON report (<save_result_path stem>.report.json: time per phase, peak memory, LoRAs with
    their strengths and unmatched keys). Full documentation: docs/inference.md.
    """
    with running("infer", run) as display:
        options = InferOptions(
            prompt=prompt,
            negative_prompt=negative_prompt,
            image_path=image_path,
            seed=seed,
            lora_path=tuple(_split(lora_path)),
            lora_strength=tuple(parse_number(s, "--lora_strength") for s in _split(lora_strength)),
            save_frames=save_frames,
        )
        report = infer(
            runtime=runtime,
            options=options,
            save_result_path=save_result_path,
            run=run,
            progress=display,
        )
        display.finish(report)
