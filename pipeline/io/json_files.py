"""Reading the JSON files users hand loraforge (configs, a model folder's descriptions, PEFT
adapter configs): a missing file and an unreadable one are each one line naming the file."""

from __future__ import annotations

import json

from ..errors import CheckpointNotFound, LoraforgeError, UsageError


def read_json(
    path: str,
    missing: str,
    hint: str | None = None,
    unreadable: type[LoraforgeError] = UsageError,
) -> object:
    """``path``'s JSON; ``CheckpointNotFound(missing)`` when there is no such file, else
    ``unreadable`` when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointNotFound(missing, path=path, hint=hint) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise unreadable(f"not a readable JSON file ({e})", path=path) from None
