"""Model layouts: one model family's tensors named two ways, its authors' original names (as the
family's own, LightX2V's and ComfyUI's checkpoints hold them) and diffusers' names. A family is a
table of module renames, not code; a name the table does not cover is the same in both.

Wan 2.1 / 2.2 (every variant: T2V, I2V, FLF2V, TI2V, the A14B pair) from diffusers' own
converters, ``scripts/convert_wan_to_diffusers.py`` (``TRANSFORMER_KEYS_RENAME_DICT``) and
``loaders/single_file_utils.py::convert_wan_transformer_to_diffusers`` (diffusers 0.42.1): pure
renaming, no tensor changes shape or layout (``modulation`` (1, 6, dim) is
``scale_shift_table`` (1, 6, dim)); the converter swaps ``norm3`` (original, the affine one)
and ``norm2``. ``{n}`` stands for a block index."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

ORIGINAL, DIFFUSERS = "original", "diffusers"
LAYOUT_NAMES = (ORIGINAL, DIFFUSERS)

WAN_RENAMES = (
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("blocks.{n}.self_attn.q", "blocks.{n}.attn1.to_q"),
    ("blocks.{n}.self_attn.k", "blocks.{n}.attn1.to_k"),
    ("blocks.{n}.self_attn.v", "blocks.{n}.attn1.to_v"),
    ("blocks.{n}.self_attn.o", "blocks.{n}.attn1.to_out.0"),
    ("blocks.{n}.self_attn.norm_q", "blocks.{n}.attn1.norm_q"),
    ("blocks.{n}.self_attn.norm_k", "blocks.{n}.attn1.norm_k"),
    ("blocks.{n}.cross_attn.q", "blocks.{n}.attn2.to_q"),
    ("blocks.{n}.cross_attn.k", "blocks.{n}.attn2.to_k"),
    ("blocks.{n}.cross_attn.v", "blocks.{n}.attn2.to_v"),
    ("blocks.{n}.cross_attn.o", "blocks.{n}.attn2.to_out.0"),
    ("blocks.{n}.cross_attn.norm_q", "blocks.{n}.attn2.norm_q"),
    ("blocks.{n}.cross_attn.norm_k", "blocks.{n}.attn2.norm_k"),
    ("blocks.{n}.cross_attn.k_img", "blocks.{n}.attn2.add_k_proj"),
    ("blocks.{n}.cross_attn.v_img", "blocks.{n}.attn2.add_v_proj"),
    ("blocks.{n}.cross_attn.norm_k_img", "blocks.{n}.attn2.norm_added_k"),
    ("blocks.{n}.norm3", "blocks.{n}.norm2"),
    ("blocks.{n}.ffn.0", "blocks.{n}.ffn.net.0.proj"),
    ("blocks.{n}.ffn.2", "blocks.{n}.ffn.net.2"),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
)

# A name with one of these prefixes is the same tensor without it (what checkpoints and LoRAs
# put in front of a model's own names).
_WRAPPERS = ("diffusion_model.", "model.", "transformer.", "base_model.model.")


def _pattern(path: str) -> re.Pattern:
    """``blocks.{n}.ffn.0`` → a regex for that module at the start of a name, ending at a dot
    or at the end (so ``ffn.0`` never matches ``ffn.01``)."""
    body = re.escape(path).replace(re.escape("{n}"), r"(?P<n>\d+)")
    return re.compile(rf"^{body}(?=\.|$)")


@dataclass(frozen=True)
class ModelLayout:
    family: str
    renames: tuple[tuple[str, str], ...] = field(repr=False)  # (original, diffusers) paths
    # Original paths whose presence (in either layout) says the names are this family's: a
    # model that only shares a generic name (``blocks.0.ffn.0``) is not renamed.
    signatures: tuple[str, ...] = field(repr=False, default=())

    @cached_property
    def _rules(self) -> dict[str, list[tuple[re.Pattern, str]]]:
        """Per target layout: (pattern of the other layout's path, this layout's path). Longer
        paths first, so ``norm_k_img`` is tried before ``norm_k``."""
        ordered = sorted(self.renames, key=lambda pair: -max(map(len, pair)))
        return {
            DIFFUSERS: [(_pattern(orig), diff) for orig, diff in ordered],
            ORIGINAL: [(_pattern(diff), orig) for orig, diff in ordered],
        }

    def rename(self, name: str, to: str) -> str | None:
        """``name`` (a module path or tensor key, wrapper prefixes allowed and dropped) in
        layout ``to``; None when no rule covers it (then it is the same in both layouts, or not
        this family's)."""
        name = strip_wrappers(name)
        for pattern, target in self._rules[to]:
            match = pattern.match(name)
            if match:
                index = match.groupdict().get("n")
                head = target.replace("{n}", index) if index is not None else target
                return head + name[match.end() :]
        return None

    @cached_property
    def _signatures(self) -> dict[str, list[re.Pattern]]:
        """Per layout, the patterns of the signature modules as that layout names them."""
        pairs = [pair for pair in self.renames if pair[0] in self.signatures]
        return {
            ORIGINAL: [_pattern(orig) for orig, _ in pairs],
            DIFFUSERS: [_pattern(diff) for _, diff in pairs],
        }

    def layout_of(self, names: Iterable[str]) -> str | None:
        """``original`` or ``diffusers`` when the names (tensor keys or module paths, wrapper
        prefixes allowed) hold a signature module of this family in that layout and no module
        in the other; None otherwise."""
        seen, signed = set(), set()
        for name in names:
            bare = strip_wrappers(name)
            for layout in LAYOUT_NAMES:
                other = DIFFUSERS if layout == ORIGINAL else ORIGINAL
                if self.rename(bare, other) is not None:
                    seen.add(layout)
                    if any(p.match(bare) for p in self._signatures[layout]):
                        signed.add(layout)
        return signed.pop() if len(seen) == 1 and len(signed) == 1 else None


def strip_wrappers(name: str) -> str:
    """``name`` without the prefixes checkpoints and LoRAs put in front of a model's names."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, changed = name[len(prefix) :], True
    return name


WAN = ModelLayout(
    "wan",
    WAN_RENAMES,
    signatures=tuple(
        f"blocks.{{n}}.{attention}.{projection}"
        for attention in ("self_attn", "cross_attn")
        for projection in "qkvo"
    ),
)
LAYOUTS = (WAN,)


def detect_layout(names: Iterable[str]) -> tuple[ModelLayout, str] | None:
    """The family and layout the names are in, when a table recognises them."""
    names = list(names)
    for layout in LAYOUTS:
        found = layout.layout_of(names)
        if found is not None:
            return layout, found
    return None


def renamed(name: str, to: str) -> str | None:
    """``name`` in layout ``to`` by the first family whose table covers it; None when none
    does."""
    for layout in LAYOUTS:
        result = layout.rename(name, to)
        if result is not None:
            return result
    return None
