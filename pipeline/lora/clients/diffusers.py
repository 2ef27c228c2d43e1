"""diffusers' Wan LoRA loading, ``WanPipeline.load_lora_weights`` then ``fuse_lora`` (diffusers
0.42.1: ``loaders/lora_pipeline.py::WanLoraLoaderMixin``, ``loaders/peft.py::load_lora_adapter``,
``loaders/lora_conversion_utils.py``). Which path a file takes is decided by its keys:

- any key under ``diffusion_model.``: ``_convert_non_diffusers_wan_lora_to_diffusers``, which
  knows Wan's original module names. It consumes, per block, the pairs, ``.alpha`` and
  ``.diff_b`` of ``self_attn``/``cross_attn`` ``q k v o`` (``k_img``/``v_img`` when the file has
  both), ``ffn.0``/``ffn.2``; outside the blocks the pairs and ``.diff_b`` of
  ``time_projection.1``, ``head.head`` (and its ``.diff`` as ``lora_A`` against an identity
  ``lora_B`` sized by its ``.diff_b``), ``text_embedding``/``time_embedding`` ``.0``/``.2`` (a
  pair required once any of their keys exists) and ``img_emb.proj.1``/``.3``, but no alpha.
  Norm diffs are dropped first; keys left over are dropped when all are diffs, else it raises
  "state_dict should be empty";
- else any key under ``lora_unet_``: ``_convert_musubi_wan_lora_to_diffusers``, which takes
  complete blocks only (every block's attention and FFN pairs, each with its ``.alpha``);
- else the keys under ``transformer.`` in diffusers' own names; every key must contain
  "lora", and none under ``transformer.`` means nothing is loaded (a warning only)."""

from __future__ import annotations

import re

from ..layouts import DIFFUSERS, renamed
from . import Loading, LoraFile, judged, label

CLIENT = "diffusers"
ORIGINAL_PREFIX = "diffusion_model."
BLOCK = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])$")
IMAGE_KV = re.compile(r"^blocks\.\d+\.cross_attn\.[kv]_img$")
EMBEDDINGS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2")
OUTSIDE = ("time_projection.1", "head.head", *EMBEDDINGS, "img_emb.proj.1", "img_emb.proj.3")
DROPPED = "diffusers drops it (its Wan converter reads no such diff)"


def loading(file: LoraFile) -> Loading:
    if any(key.startswith(ORIGINAL_PREFIX) for key in file.keys):
        return _original(file)
    if any(key.startswith("lora_unet_") for key in file.keys):
        return _musubi(file)
    return _native(file)


def _refused(why: str) -> Loading:
    return Loading(CLIENT, why)


def _original(file: LoraFile) -> Loading:
    names = [key[len(ORIGINAL_PREFIX) :] for key in file.keys if key.startswith(ORIGINAL_PREFIX)]
    if len(names) != len(file.keys):
        return _refused("keys without diffusion_model. beside keys with it")
    if not any(name.startswith("blocks.") for name in names):
        return _refused("no blocks.N key (its Wan converter takes min() over the blocks)")
    if any("lora_A" in n or "lora_B" in n for n in names) and any(
        "lora_down" in n or "lora_up" in n for n in names
    ):
        return _refused("mixes lora_A/lora_B with lora_up/lora_down keys")
    covered = {k for e in file.entries for k in (e.up_key, e.down_key, e.diff_key, e.alpha_key)}
    stray = sorted(set(file.keys) - covered)
    if stray:
        return _refused(f"{stray[0]}: not a LoRA key it converts ('state_dict should be empty')")
    modules: dict[str, list] = {}
    for entry in file.entries:
        modules.setdefault(_name(entry), []).append(entry)
    image_kv = {m.rsplit(".", 1)[1] for m in modules if IMAGE_KV.match(m)}
    for entry in file.entries:
        why = _refusal(entry, _name(entry), modules, image_kv)
        if why:
            return _refused(f"{label(entry)}: {why}")
    pairs = any(e.kind == "lowrank" for e in file.entries) or _has("head.head", "diff", modules)
    if not pairs:
        return _refused("no LoRA pair at all (it infers ranks from lora_B weights: IndexError)")
    return judged(CLIENT, file.entries, lambda entry: _dropped(entry, _name(entry), modules))


def _name(entry) -> str:
    return entry.module[len(ORIGINAL_PREFIX) :]


def _refusal(entry, name: str, modules: dict, image_kv: set[str]) -> str | None:
    """Why this entry makes diffusers raise, or None."""
    pair = entry.kind == "lowrank"
    if pair and entry.naming not in ("lora_up", "peft"):
        return "a pair spelled other than lora_up/lora_down or lora_A/lora_B"
    if IMAGE_KV.match(name) and len(image_kv) == 1:
        return "k_img without v_img (or the reverse): its converter needs both"
    block = BLOCK.match(name) or IMAGE_KV.match(name)
    if pair and not block and name not in OUTSIDE:
        return "a pair on a module its Wan converter does not know ('state_dict should be empty')"
    if pair and not block and entry.alpha_key:
        return "an .alpha outside Wan's blocks, which its converter never reads"
    if name in EMBEDDINGS and not pair and _pair_of(name, modules) is None:
        return "a diff on a text/time embedding without its pair (it pops the pair: KeyError)"
    if name == "head.head" and entry.naming == "diff" and not _has(name, "diff_b", modules):
        return "head.head.diff without head.head.diff_b (KeyError 'proj_out.lora_B.bias')"
    return None


def _pair_of(name: str, modules: dict):
    return next((e for e in modules.get(name, ()) if e.kind == "lowrank"), None)


def _has(name: str, naming: str, modules: dict) -> bool:
    return any(e.naming == naming for e in modules.get(name, ()))


def _dropped(entry, name: str, modules: dict) -> str | None:
    """Why a loading file's entry is not applied, or None when it is."""
    if entry.kind == "lowrank":
        if name == "head.head" and _has(name, "diff", modules):
            return "head.head.diff replaces the pair (diffusers keeps one of the two)"
        return None
    if entry.naming in ("diff", "diff_b") and "norm" in name:
        return "diffusers drops norm diffs"
    if entry.naming == "diff_b":
        if BLOCK.match(name) or IMAGE_KV.match(name) or name in ("head.head", *EMBEDDINGS):
            return None
        if name == "time_projection.1":
            has_weight = _pair_of(name, modules) is not None
            return None if has_weight else "diffusers drops time_projection biases without a pair"
        if name in ("img_emb.proj.1", "img_emb.proj.3") and _pair_of(name, modules):
            return None
    if entry.naming == "diff" and name == "head.head":
        return None  # as lora_A against an identity lora_B sized by head.head.diff_b
    return DROPPED


def _musubi(file: LoraFile) -> Loading:
    """Complete blocks only: every block 0..N-1 with the pairs and alphas of its attention
    projections and FFN; any other key makes it raise."""
    pattern = re.compile(
        r"^lora_unet_blocks_(\d+)_(self_attn_[qkvo]|cross_attn_[qkvo]|cross_attn_[kv]_img|"
        r"ffn_[02])\.(lora_down\.weight|lora_up\.weight|alpha)$"
    )
    found: dict[int, set[str]] = {}
    for key in file.keys:
        match = pattern.match(key)
        if not match:
            return _refused(
                f"{key}: its kohya (musubi) converter takes complete blocks of attention and "
                "FFN pairs with their alphas only"
            )
        found.setdefault(int(match[1]), set()).add(f"{match[2]}.{match[3]}")
    image = any("_img." in part for parts in found.values() for part in parts)
    modules = [f"{a}_{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"]
    modules += ["ffn_0", "ffn_2"] + (["cross_attn_k_img", "cross_attn_v_img"] if image else [])
    need = {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight")}
    need |= {f"{m}.alpha" for m in modules}
    for block in range(len(found)):
        missing = sorted(need - found.get(block, set()))
        if missing:
            return _refused(f"block {block} lacks {missing[0]} (its kohya converter: KeyError)")
    return judged(CLIENT, file.entries, lambda entry: None)


def _native(file: LoraFile) -> Loading:
    without = [key for key in file.keys if "lora" not in key]
    if without:
        return _refused(f"{without[0]}: every key must contain 'lora' ('Invalid LoRA checkpoint')")
    if not any(key.startswith("transformer.") for key in file.keys):
        return judged(
            CLIENT,
            file.entries,
            lambda e: "no transformer.-prefixed key: diffusers loads nothing (a warning only)",
        )
    for entry in file.entries:
        name = entry.module.removeprefix("transformer.")
        if renamed(f"{name}.{entry.leaf}", DIFFUSERS) is not None:
            return _refused(f"{label(entry)}: Wan's original names under transformer. match no "
                            "module of diffusers' model (NoMatchingPeftModuleError)")  # fmt: skip

    def verdict(entry) -> str | None:
        if not entry.module.startswith("transformer."):
            return "diffusers reads only the transformer.-prefixed keys of such a file"
        return None if entry.kind == "lowrank" else DROPPED

    return judged(CLIENT, file.entries, verdict)
