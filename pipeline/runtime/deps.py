"""The packages of the ``infer`` extra, checked before a command that needs them does anything,
so a core install says in one line what to install instead of failing on an import."""

from __future__ import annotations

import importlib.util

from ..errors import MissingDependency

# import name -> distribution name (what pip installs)
INFER = {
    "diffusers": "diffusers",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "imageio_ffmpeg": "imageio-ffmpeg",
    "ftfy": "ftfy",
}
SERVE = {**INFER, "fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic"}


def require(command: str, packages: dict[str, str]) -> None:
    """Refuse in one line, naming the missing packages and the install command."""
    missing = [dist for name, dist in packages.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependency(
            f"loraforge {command} needs the infer extra; missing: {', '.join(missing)}",
            hint="pip install 'loraforge[infer]', or in a checkout pip install -e '.[infer]'",
        )
