"""``serve``: check the model, config, ``--lora_dir`` and ``--output_dir`` → load the pipeline
(the config's LoRAs applied under every request's) → serve LightX2V's API with uvicorn in this
process until SIGINT or SIGTERM, which stop it cleanly (exit 0): queued and running tasks are
cancelled, the worker ends at its next denoising step."""

from __future__ import annotations

import os

from ..errors import CheckpointNotFound, OutputError, UsageError
from ..run.device import resolve_device
from ..run.options import RunOptions
from ..run.paths import check_writable_location
from ..run.session import Progress
from ..runtime.deps import SERVE, require
from ..runtime.loras import check_headers
from ..runtime.spec import RuntimeOptions, lora_specs, open_spec


def serve(
    *,
    runtime: RuntimeOptions,
    lora_dir: str | None = None,
    output_dir: str = "save_results",
    host: str = "0.0.0.0",
    port: int = 8000,
    max_queue_size: int = 10,
    run: RunOptions | None = None,
    progress: Progress | None = None,
) -> None:
    require("serve", SERVE)
    run = run or RunOptions()
    emit = progress or (lambda event, info: None)
    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    if max_queue_size < 1:
        raise UsageError(f"--max_queue_size must be >= 1, got {max_queue_size}")
    _check_port(host, port)
    spec = open_spec(runtime, resolve_device(run.device))
    base_loras, _note = lora_specs(spec, [], [])
    check_headers(spec.checkpoints, base_loras)
    if lora_dir is not None:
        lora_dir = os.path.abspath(os.path.expanduser(lora_dir))
        if not os.path.isdir(lora_dir):
            raise CheckpointNotFound("--lora_dir is not a directory", path=lora_dir)
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputError("--output_dir is not a directory", path=output_dir)
    check_writable_location(os.path.join(output_dir, "x.mp4"), "--output_dir")
    for message in spec.notes:
        emit("note", {"message": message})
    import uvicorn

    from ..runtime.generate import Runtime
    from .app import create_app
    from .requests import Context
    from .tasks import TaskManager

    loaded = Runtime.load(spec)
    loaded.switch(base_loras)
    for summary in loaded.loras.summaries():
        emit("loras", {"loras": [summary]})
    os.makedirs(output_dir, exist_ok=True)
    context = Context(loaded, base_loras, lora_dir, output_dir)
    app = create_app(context, TaskManager(max_queue_size))
    emit("note", {"message": f"serving {spec.model.name} {spec.task} on http://{host}:{port}"})
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal it stopped for, once stopped
        pass
    except SystemExit:  # uvicorn's own exit when it cannot start (it logged why)
        if server.started:
            raise
    if not server.started:
        raise OutputError(f"could not serve on {host}:{port}", hint="is the port in use?")
    emit("note", {"message": "server stopped"})


def _check_port(host: str, port: int) -> None:
    """Refuse a port already in use before the model is loaded (minutes for a large one)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise OutputError(
                f"cannot listen on {host}:{port}: {e.strerror}", hint="pick another --port"
            ) from None
