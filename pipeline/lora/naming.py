"""LightX2V's output key names, which its loader, its merger and ComfyUI-style loaders read: the
default key style (``styles.py`` holds every style)."""

from __future__ import annotations

from .styles import DEFAULT_STYLE, KEY_STYLES

lowrank_names = KEY_STYLES[DEFAULT_STYLE].lowrank_names
diff_name = KEY_STYLES[DEFAULT_STYLE].diff_name
