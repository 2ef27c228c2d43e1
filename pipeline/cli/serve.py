"""``loraforge serve``: LightX2V's server command line, parsed into ``RuntimeOptions`` and the
server's own options."""

from __future__ import annotations

from typing import Annotated

import typer

from ..run.options import RunOptions
from ..runtime.spec import RuntimeOptions
from ..serve.command import serve
from .app import app, running
from .option_sets import RUN
from .parameters import expand
from .runtime_options import RUNTIME


@app.command(
    "serve",
    epilog="Examples:\n\n  loraforge serve --model_cls wan2.1_distill --task t2v --model_path "
    "Wan2.1-T2V-14B-Diffusers --config_json wan_t2v_distill_lora_4step_cfg.json --lora_dir "
    "loras/ --port 8000\n\n  curl -X POST http://localhost:8000/v1/tasks/video/ -H "
    '\'Content-Type: application/json\' -d \'{"prompt": "a cat", "lora_name": '
    '"style.safetensors", "lora_strength": 0.8, "seed": 42}\'',
)
@expand(RUNTIME, RUN.only("device", "quiet"))
def serve_command(
    runtime: RuntimeOptions = None,
    lora_dir: Annotated[
        str | None,
        typer.Option(
            "--lora_dir",
            help="LoRAs a request may name (lora_name, lora_configs): files or PEFT adapter "
            "directories inside it.",
        ),
    ] = None,
    output_dir: Annotated[
        str,
        typer.Option(
            "--output_dir", help="Where results are written (a request's save_result_path)."
        ),
    ] = "save_results",
    host: Annotated[str, typer.Option("--host")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port")] = 8000,
    max_queue_size: Annotated[
        int, typer.Option("--max_queue_size", help="Tasks pending or processing at once.")
    ] = 10,
    run: RunOptions = None,
) -> None:
    """Serve LightX2V's video API (POST /v1/tasks/video/, task status, result, list, cancel,
    service status) for one Wan model, a request's LoRAs switched in exactly per request.

    One worker runs the tasks in order. Between requests every patched weight is recomputed
    from its original, re-read from the model's files: no second copy of the model is held,
    and a request without LoRA runs on the base's exact bytes. A bad request gets a 4xx JSON
    error naming its field; the server goes on. Full documentation: docs/inference.md.
    """
    with running("serve", run) as display:
        serve(
            runtime=runtime,
            lora_dir=lora_dir,
            output_dir=output_dir,
            host=host,
            port=port,
            max_queue_size=max_queue_size,
            run=run,
            progress=display,
        )
