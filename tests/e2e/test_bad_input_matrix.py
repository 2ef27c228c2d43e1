"""The bad-input matrix: one row per bad command line, with its exit code and its one-line
message, run in-process against a fresh copy of a tree of small inputs.

For every row: the exit code; stdout empty; stderr exactly one printable line ``error: ...``
(the exact text, or for a row marked ``exact=False`` a fragment of it); no traceback; every
file, directory and symlink of the tree (inputs, links, the user's directory, the output
directory) byte-for-byte as before; and nothing new anywhere in the tree (hidden
``.partial`` files and work directories included) except the row's ``leaves``, which must be
there. The "Safety" rules in docs/safety.md are the specification.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.checkpoints import (
    Payload,
    Q,
    corrupt,
    lora_pair,
    make_base,
    pair_tensors,
    save_lora,
    save_sharded,
)
from tests.helpers.cli import run_cli
from tests.helpers.tree import snapshot

# ---- the input tree ------------------------------------------------------------------------

HEAD = {"dtype": "BF16", "shape": [8, 32]}  # 512 bytes; head.weight of pair_tensors()
NORM = {"dtype": "BF16", "shape": [32]}  # 64 bytes; blocks.0.norm.weight
PEFT_PREFIX = "base_model.model."


def write_raw(path: str, header: object, data: bytes) -> None:
    """A safetensors file with exactly this header and data buffer, however wrong."""
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


BROKEN_HEADERS = {
    "overlap": (
        {
            "head.weight": {**HEAD, "data_offsets": [0, 512]},
            "blocks.0.norm.weight": {**NORM, "data_offsets": [448, 512]},
        },
        512,
    ),
    "gap": (
        {
            "head.weight": {**HEAD, "data_offsets": [0, 512]},
            "blocks.0.norm.weight": {**NORM, "data_offsets": [520, 584]},
        },
        584,
    ),
    "past_end": ({"head.weight": {**HEAD, "data_offsets": [0, 512]}}, 500),
    "trailing": ({"head.weight": {**HEAD, "data_offsets": [0, 512]}}, 520),
    "negative_dim": (
        {"head.weight": {"dtype": "BF16", "shape": [-8, 32], "data_offsets": [0, 512]}},
        512,
    ),
    "short_span": ({"head.weight": {**HEAD, "data_offsets": [0, 256]}}, 256),
    "dtype": (
        {"head.weight": {"dtype": "F99", "shape": [8, 32], "data_offsets": [0, 512]}},
        512,
    ),
    "not_object": ([1, 2], 0),
}


def shard_dir_with(directory: str, tensors: dict, shard_of_first_key: str | None) -> None:
    """Shards of ``tensors`` whose index places the first key in ``shard_of_first_key``."""
    save_sharded(tensors, directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    data["weight_map"][sorted(data["weight_map"])[0]] = shard_of_first_key
    with open(index, "w") as f:
        json.dump(data, f)


def build_tree(root: str) -> None:
    """Everything under ``root``: ``in/`` (inputs, good and bad), ``links/``, ``user/`` (a
    directory of the user's with a file) and ``out/`` (where outputs go; one existing
    directory ``taken.safetensors`` in it)."""
    inp = os.path.join(root, "in")
    pair, merge, bad = (os.path.join(inp, d) for d in ("pair", "merge", "bad"))
    for d in (pair, merge, bad, os.path.join(root, "links"), os.path.join(root, "user")):
        os.makedirs(d)
    os.makedirs(os.path.join(root, "out", "taken.safetensors"))
    with open(os.path.join(root, "user", "keep.txt"), "w") as f:
        f.write("the user's own file\n")

    # extract: a pair, the fine-tune also as shards, corrupt copies, bad indexes
    base, target = pair_tensors()
    save_file(base, os.path.join(pair, "base.safetensors"))
    save_file(target, os.path.join(pair, "target.safetensors"))
    save_sharded(target, os.path.join(inp, "sharded"))
    for name, (header, size) in BROKEN_HEADERS.items():
        write_raw(os.path.join(bad, f"{name}.safetensors"), header, b"\0" * size)
    for how in ("json", "truncated", "header length", "tiny"):
        path = os.path.join(bad, how.replace(" ", "_") + ".safetensors")
        shutil.copyfile(os.path.join(pair, "target.safetensors"), path)
        corrupt(path, how)
    shard_dir_with(os.path.join(inp, "idx_dotdot"), target, "../x.safetensors")
    shard_dir_with(os.path.join(inp, "idx_abs"), target, "ABSOLUTE")  # set per test
    shard_dir_with(os.path.join(inp, "idx_missing"), target, "model-00009-of-00009.safetensors")
    save_sharded(target, os.path.join(inp, "idx_not_json"))
    with open(os.path.join(inp, "idx_not_json", "model.safetensors.index.json"), "w") as f:
        f.write("{nope")
    save_sharded(target, os.path.join(inp, "shard_gone"))
    os.remove(os.path.join(inp, "shard_gone", "model-00002-of-00002.safetensors"))
    os.makedirs(os.path.join(inp, "no_safetensors"))
    with open(os.path.join(inp, "no_safetensors", "README.md"), "w") as f:
        f.write("weights elsewhere\n")
    save_file({"other.weight": torch.zeros(4, 4)}, os.path.join(inp, "other.safetensors"))
    nan_target = {k: v.clone() for k, v in target.items()}
    nan_target["head.weight"][0, 0] = float("nan")
    save_file(nan_target, os.path.join(inp, "nan_target.safetensors"))
    torch.save({"w": torch.zeros(2), "x": Payload()}, os.path.join(inp, "evil.pt"))
    torch.save([torch.zeros(2)], os.path.join(inp, "list.pt"))
    torch.save({"w": torch.zeros(2)}, os.path.join(inp, "plain.pt"))
    with open(os.path.join(inp, "garbage.pt"), "wb") as f:
        f.write(b"not a zip archive")

    # merge: a base, LoRAs good and bad, PEFT adapters, configs
    make_base(merge)
    save_lora(merge, "lora.safetensors", lora_pair(Q, ".lora_up.weight", ".lora_down.weight"))
    save_lora(
        merge,
        "pair_lora.safetensors",  # fits pair_tensors(), not make_base()
        lora_pair(Q, ".lora_up.weight", ".lora_down.weight", out=96, inp=128),
    )
    mismatch = {
        **lora_pair(Q, ".lora_up.weight", ".lora_down.weight"),
        **lora_pair("blocks.0.ffn.0", ".lora_up.weight", ".lora_down.weight"),  # 48x32 vs 64x32
    }
    save_lora(merge, "mismatch.safetensors", mismatch)
    nan_lora = lora_pair(Q, ".lora_up.weight", ".lora_down.weight")
    nan_lora[f"{Q}.lora_down.weight"][1, 2] = float("nan")
    save_lora(merge, "nan.safetensors", nan_lora)
    peft_tensors = lora_pair(PEFT_PREFIX + Q, ".lora_B.weight", ".lora_A.weight")
    for name in ("peft", "peft_no_config"):
        os.makedirs(os.path.join(merge, name))
        save_lora(os.path.join(merge, name), "adapter_model.safetensors", peft_tensors)
    with open(os.path.join(merge, "peft", "adapter_config.json"), "w") as f:
        json.dump({"r": 4, "lora_alpha": 8}, f)
    configs = {
        "loras.json": {"lora_path": ["lora.safetensors"]},
        "unknown_key.json": {
            "infer_steps": 4,  # a LightX2V field: listed as not used, not refused
            "lora_configs": [{"path": "lora.safetensors", "strenght": 1.0}],
        },
        "missing_lora.json": {"lora_path": ["gone.safetensors"]},
    }
    for name, data in configs.items():
        with open(os.path.join(merge, name), "w") as f:
            json.dump(data, f)
    with open(os.path.join(merge, "not_json.json"), "w") as f:
        f.write("{nope")

    links = os.path.join(root, "links")
    os.symlink("../in/pair/target.safetensors", os.path.join(links, "target.safetensors"))
    os.symlink("../in/merge/base.safetensors", os.path.join(links, "base.safetensors"))
    os.symlink("../user", os.path.join(links, "user"))


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("matrix_master"))
    build_tree(root)
    return root


def paths_of(root: str) -> dict[str, str]:
    inp = os.path.join(root, "in")
    return {
        "root": root,
        "in": inp,
        "out": os.path.join(root, "out"),
        "user": os.path.join(root, "user"),
        "links": os.path.join(root, "links"),
        "B": os.path.join(inp, "pair", "base.safetensors"),
        "T": os.path.join(inp, "pair", "target.safetensors"),
        "S": os.path.join(inp, "sharded"),
        "MB": os.path.join(inp, "merge", "base.safetensors"),
        "L": os.path.join(inp, "merge", "lora.safetensors"),
        "O": os.path.join(root, "out", "lora.safetensors"),
        "M": os.path.join(root, "out", "m.safetensors"),
    }


@pytest.fixture
def tree(master, tmp_path) -> dict[str, str]:
    """A fresh copy of the master tree (symlinks as symlinks), plus what a copy cannot carry:
    a hard link to the fine-tune, and an index naming an existing file by absolute path."""
    root = os.path.join(os.path.realpath(tmp_path), "t")
    shutil.copytree(master, root, symlinks=True)
    p = paths_of(root)
    os.link(p["T"], os.path.join(p["links"], "hard.safetensors"))
    index = os.path.join(p["in"], "idx_abs", "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    data["weight_map"] = {
        k: p["T"] if v == "ABSOLUTE" else v for k, v in data["weight_map"].items()
    }
    with open(index, "w") as f:
        json.dump(data, f)
    return p


def fill(template: str, paths: dict[str, str]) -> str:
    for name, path in paths.items():
        template = template.replace("{" + name + "}", path)
    return template


# ---- the rows -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    argv: tuple[str, ...]
    code: int
    message: str  # after "error: "; the whole line unless exact is False
    leaves: tuple[str, ...] = ()  # paths relative to the tree that must appear (and may)
    exact: bool = True


def row(name, argv, code, message, *, leaves=(), exact=True):
    return pytest.param(Row(tuple(argv), code, message, leaves, exact), id=name)


def ex(*args, source="{B}", target="{T}"):
    return ("extract", "--quiet", "--source-model", source, "--target-model", target, *args)


def exo(*args, **models):
    """extract to out/lora.safetensors."""
    return ex("--output", "{O}", *args, **models)


def mg(*args, base="{MB}", lora="{L}"):
    loras = ("--lora-model", lora) if lora else ()
    return ("merge", "--quiet", "--source-model", base, *loras, *args)


def mgo(*args, **models):
    """merge to out/m.safetensors."""
    return mg("--output", "{M}", *args, **models)


def overwrite(path, role, option="--output", shown=None):
    return (
        f"{shown or path}: {option} would overwrite the input {role} {path} "
        f"(choose another {option})"
    )


CORRUPT = "(the file is corrupt; re-save it)"
TRUNCATED = "(the file is truncated; re-download or re-save it)"
OUTSIDE = "(shards must sit in the checkpoint directory; fix the index or move the shard)"
NEW_DIR = "(pass a new or empty directory as --work-dir)"
NOT_WORK = (
    "not a loraforge work directory (give the --work-dir of a run; the default is <output>.work)"
)
USER_DIR = f"{{user}}: exists and was not made by loraforge (it holds keep.txt) {NEW_DIR}"

PATH_ROWS = [
    # --output naming an input of extract, directly or in disguise
    row("ex-output-target", ex("--output", "{T}"), 2, overwrite("{T}", "--target-model")),
    row("ex-output-source", ex("--output", "{B}"), 2, overwrite("{B}", "--source-model")),
    row(
        "ex-output-shard",
        ex("--output", "{S}/model-00001-of-00002.safetensors", target="{S}"),
        2,
        overwrite("{S}/model-00001-of-00002.safetensors", "--target-model"),
    ),
    row(
        "ex-output-shard-no-suffix",
        ex("--output", "{S}/model-00001-of-00002", target="{S}"),
        2,
        overwrite("{S}/model-00001-of-00002.safetensors", "--target-model"),
    ),
    row(
        "ex-output-shard-index",
        ex("--output", "{S}/model.safetensors.index.json", target="{S}"),
        2,
        "{S}/model.safetensors.index.json",
        exact=False,
    ),
    row(
        "ex-output-symlink",
        ex("--output", "{links}/target.safetensors"),
        2,
        overwrite("{T}", "--target-model", shown="{links}/target.safetensors"),
    ),
    row(
        "ex-output-dotdot",
        ex("--output", "{in}/pair/../pair/target.safetensors"),
        2,
        overwrite("{T}", "--target-model"),
    ),
    row(
        "ex-output-hardlink",
        ex("--output", "{links}/hard.safetensors"),
        2,
        overwrite("{T}", "--target-model", shown="{links}/hard.safetensors"),
    ),
    row(
        "ex-output-no-suffix",
        ex("--output", "{in}/pair/target"),
        2,
        overwrite("{T}", "--target-model"),
    ),
    row(
        "ex-output-shards-hit-input-index",
        ex("--output", "{S}/model.safetensors", "--max-shard-size", "10KB", target="{S}"),
        2,
        overwrite("{S}/model.safetensors.index.json", "--target-model"),
    ),
    # --report
    row(
        "ex-report-target",
        exo("--report", "{T}"),
        2,
        overwrite("{T}", "--target-model", "--report"),
    ),
    row(
        "ex-report-source",
        exo("--report", "{B}"),
        2,
        overwrite("{B}", "--source-model", "--report"),
    ),
    row(
        "ex-report-input-index",
        exo("--report", "{S}/model.safetensors.index.json", target="{S}"),
        2,
        overwrite("{S}/model.safetensors.index.json", "--target-model", "--report"),
    ),
    row(
        "ex-report-output",
        exo("--report", "{O}"),
        2,
        "{O}: --output and --report are the same file (choose another --report)",
    ),
    row(
        "ex-report-output-index",
        exo("--report", "{O}.index.json", "--max-shard-size", "10KB"),
        2,
        "{O}.index.json: --output and --report are the same file (choose another --report)",
    ),
    # --work-dir
    row(
        "ex-work-dir-output",
        exo("--work-dir", "{O}"),
        2,
        f"{{O}}: --work-dir is --output {{O}} {NEW_DIR}",
    ),
    row(
        "ex-work-dir-input-file",
        exo("--work-dir", "{T}"),
        2,
        f"{{T}}: --work-dir is --target-model {{T}} {NEW_DIR}",
    ),
    row(
        "ex-work-dir-models-dir",
        exo("--work-dir", "{in}/pair"),
        2,
        f"{{in}}/pair: --work-dir holds --source-model {{B}} {NEW_DIR}",
    ),
    row(
        "ex-work-dir-above-inputs",
        exo("--work-dir", "{root}"),
        2,
        f"{{root}}: --work-dir holds --source-model {{B}} {NEW_DIR}",
    ),
    row(
        "ex-work-dir-report",
        exo("--work-dir", "{out}/w", "--report", "{out}/w"),
        2,
        f"{{out}}/w: --work-dir is --report {{out}}/w {NEW_DIR}",
    ),
    row("ex-work-dir-user", exo("--work-dir", "{user}"), 3, USER_DIR),
    row("ex-work-dir-user-no-keep", exo("--work-dir", "{user}", "--no-keep-work"), 3, USER_DIR),
    row(
        "ex-work-dir-user-symlink",
        exo("--work-dir", "{links}/user", "--no-keep-work"),
        3,
        f"{{links}}/user: exists and was not made by loraforge (it holds keep.txt) {NEW_DIR}",
    ),
    row(
        "ex-work-dir-user-file",
        exo("--work-dir", "{user}/keep.txt"),
        3,
        f"{{user}}/keep.txt: exists and is not a directory {NEW_DIR}",
    ),
    row(
        "ex-work-dir-empty",
        exo("--work-dir", ""),
        2,
        "--work-dir",
        exact=False,
    ),
    # --output that names no file, or cannot be written
    row(
        "ex-output-empty", ex("--output", ""), 2, "--output is empty (give the output's file name)"
    ),
    row(
        "ex-output-blank",
        ex("--output", "  "),
        2,
        "--output is empty (give the output's file name)",
    ),
    row(
        "ex-output-slash",
        ex("--output", "{out}/"),
        2,
        "--output {out}/ names a directory (give a file name inside it for --output)",
    ),
    row(
        "ex-output-existing-dir",
        ex("--output", "{out}/taken.safetensors"),
        1,
        "{out}/taken.safetensors: is a directory (give a file name for --output)",
    ),
    row(
        "ex-output-user-dir",
        ex("--output", "{user}"),
        1,
        "{user}",
        exact=False,
    ),
    row(
        "ex-output-under-file",
        ex("--output", "{user}/keep.txt/lora.safetensors"),
        1,
        "{user}/keep.txt: cannot create the output directory (File exists) "
        "(choose a writable --output location)",
    ),
    row(
        "ex-report-under-file",
        exo("--report", "{user}/keep.txt/r.json"),
        1,
        "{user}/keep.txt: cannot create the report directory (File exists) "
        "(choose a writable --report location)",
    ),
    row(
        "ex-report-existing-dir",
        exo("--report", "{out}/"),
        1,
        "{out}: is a directory (give a file name for --report)",
    ),
    row(
        "ex-report-empty",
        exo("--report", ""),
        2,
        "--report",
        exact=False,
    ),
    # merge: --output / --report / --work-dir against its inputs
    row("mg-output-base", mg("--output", "{MB}"), 2, overwrite("{MB}", "--source-model")),
    row("mg-output-lora", mg("--output", "{L}"), 2, overwrite("{L}", "--lora-model")),
    row(
        "mg-output-base-symlink",
        mg("--output", "{links}/base.safetensors"),
        2,
        overwrite("{MB}", "--source-model", shown="{links}/base.safetensors"),
    ),
    row(
        "mg-output-lora-no-suffix",
        mg("--output", "{in}/merge/lora"),
        2,
        overwrite("{L}", "--lora-model"),
    ),
    row(
        "mg-output-config-lora",
        mg("--config", "{in}/merge/loras.json", "--output", "{in}/merge/lora", lora=None),
        2,
        overwrite("{L}", "--lora-model"),
    ),
    row(
        "mg-output-config-file",
        mg("--config", "{in}/merge/loras.json", "--output", "{in}/merge/loras.json", lora=None),
        2,
        "{in}/merge/loras.json",
        exact=False,
    ),
    row(
        "mg-output-adapter-config",
        mg("--output", "{in}/merge/peft/adapter_config.json", lora="{in}/merge/peft"),
        2,
        "{in}/merge/peft/adapter_config.json",
        exact=False,
    ),
    row(
        "mg-output-adapter-model",
        mg("--output", "{in}/merge/peft/adapter_model.safetensors", lora="{in}/merge/peft"),
        2,
        overwrite("{in}/merge/peft/adapter_model.safetensors", "--lora-model"),
    ),
    row(
        "mg-output-base-shard",
        mg(
            "--output",
            "{S}/model-00002-of-00002.safetensors",
            base="{S}",
            lora="{in}/merge/pair_lora.safetensors",
        ),
        2,
        overwrite("{S}/model-00002-of-00002.safetensors", "--source-model"),
    ),
    row("mg-report-lora", mgo("--report", "{L}"), 2, overwrite("{L}", "--lora-model", "--report")),
    row(
        "mg-report-base",
        mgo("--report", "{MB}"),
        2,
        overwrite("{MB}", "--source-model", "--report"),
    ),
    row(
        "mg-report-config",
        mgo("--config", "{in}/merge/loras.json", "--report", "{in}/merge/loras.json", lora=None),
        2,
        overwrite("{in}/merge/loras.json", "--config", "--report"),
    ),
    row(
        "mg-report-adapter-config",
        mgo("--report", "{in}/merge/peft/adapter_config.json", lora="{in}/merge/peft"),
        2,
        overwrite("{in}/merge/peft/adapter_config.json", "--lora-model", "--report"),
    ),
    row(
        "mg-report-output",
        mgo("--report", "{M}"),
        2,
        "{M}: --output and --report are the same file (choose another --report)",
    ),
    row(
        "mg-report-output-index",
        mgo("--report", "{M}.index.json", "--max-shard-size", "1KB"),
        2,
        "{M}.index.json: --output and --report are the same file (choose another --report)",
    ),
    row(
        "mg-work-dir-output",
        mgo("--work-dir", "{M}"),
        2,
        f"{{M}}: --work-dir is --output {{M}} {NEW_DIR}",
    ),
    row(
        "mg-work-dir-models-dir",
        mgo("--work-dir", "{in}/merge"),
        2,
        f"{{in}}/merge: --work-dir holds --source-model {{MB}} {NEW_DIR}",
    ),
    row("mg-work-dir-user", mgo("--work-dir", "{user}"), 3, USER_DIR),
    row(
        "mg-output-empty", mg("--output", ""), 2, "--output is empty (give the output's file name)"
    ),
    row(
        "mg-output-slash",
        mg("--output", "{out}/"),
        2,
        "--output {out}/ names a directory (give a file name inside it for --output)",
    ),
    row(
        "mg-output-existing-dir",
        mg("--output", "{out}/taken.safetensors"),
        1,
        "{out}/taken.safetensors: is a directory (give a file name for --output)",
    ),
    row(
        "mg-output-user-dir",
        mg("--output", "{user}"),
        1,
        "{user}",
        exact=False,
    ),
    row(
        "mg-output-under-file",
        mg("--output", "{user}/keep.txt/m.safetensors"),
        1,
        "{user}/keep.txt: cannot create the output directory (File exists) "
        "(choose a writable --output location)",
    ),
    row(
        "mg-report-under-file",
        mgo("--report", "{user}/keep.txt/r.json"),
        1,
        "{user}/keep.txt: cannot create the report directory (File exists) "
        "(choose a writable --report location)",
    ),
]


def bad_target(name, message, **kw):
    path = "{in}/bad/" + name + ".safetensors"
    return row(f"ex-corrupt-{name}", exo(target=path), 1, f"{path}: {message}", **kw)


INPUT_ROWS = [
    bad_target(
        "overlap",
        "tensor 'blocks.0.norm.weight': data offsets [448, 512] overlap those of tensor "
        f"'head.weight' [0, 512] {CORRUPT}",
    ),
    bad_target(
        "gap",
        "tensor 'blocks.0.norm.weight': data offsets [520, 584] leave a gap of 8 bytes after "
        f"tensor 'head.weight' {CORRUPT}",
    ),
    bad_target(
        "past_end",
        f"tensor 'head.weight': data offsets [0, 512] run past the end of the data (500 bytes) "
        f"{TRUNCATED}",
    ),
    bad_target(
        "trailing",
        "tensor 'head.weight': 8 bytes after this tensor's data belong to no tensor (the header "
        f"covers 512 of 520 data bytes) {CORRUPT}",
    ),
    bad_target(
        "negative_dim", f"tensor 'head.weight': shape [-8, 32] has a negative dimension {CORRUPT}"
    ),
    bad_target(
        "short_span",
        f"tensor 'head.weight': data offsets span 256 bytes but BF16[8, 32] needs 512 {CORRUPT}",
    ),
    bad_target(
        "dtype",
        "tensor 'head.weight': unsupported dtype 'F99' (convert the tensor to one of F64, F32, "
        "F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2)",
    ),
    bad_target("not_object", f"header is not a JSON object {CORRUPT}"),
    bad_target(
        "json",
        "header is not valid JSON (Expecting property name enclosed in double quotes) "
        "(the file is corrupt; re-save it)",
    ),
    bad_target(
        "truncated",
        "tensor 'blocks.0.attn.q.bias': data offsets [0, 192] run past the end of the data "
        f"(4 bytes) {TRUNCATED}",
    ),
    bad_target(
        "header_length",
        "bad header length 196992 for a file of 98496 bytes (truncated or not safetensors) "
        "(re-download or re-save the checkpoint)",
    ),
    bad_target(
        "tiny",
        "file is too short to be safetensors (truncated?) (re-download or re-save the checkpoint)",
    ),
    row(
        "ex-index-dotdot",
        exo(target="{in}/idx_dotdot"),
        1,
        "{in}/idx_dotdot/model.safetensors.index.json: tensor 'blocks.0.attn.q.bias': the index "
        f"places this tensor in '../x.safetensors', outside the checkpoint directory {OUTSIDE}",
    ),
    row(
        "ex-index-absolute",
        exo(target="{in}/idx_abs"),
        1,
        "{in}/idx_abs/model.safetensors.index.json: tensor 'blocks.0.attn.q.bias': the index "
        "places this tensor in '{T}', an absolute path, not a file name in the checkpoint "
        f"directory {OUTSIDE}",
    ),
    row(
        "ex-index-names-missing-shard",
        exo(target="{in}/idx_missing"),
        1,
        "{in}/idx_missing/model.safetensors.index.json: shard 'model-00009-of-00009.safetensors' "
        "named by the index is missing (re-download the missing shard)",
    ),
    row(
        "ex-shard-deleted",
        exo(target="{in}/shard_gone"),
        1,
        "{in}/shard_gone/model.safetensors.index.json: shard 'model-00002-of-00002.safetensors' "
        "named by the index is missing (re-download the missing shard)",
    ),
    row(
        "ex-index-not-json",
        exo(target="{in}/idx_not_json"),
        1,
        "{in}/idx_not_json/model.safetensors.index.json: not a valid shard index "
        "(needs a 'weight_map' object)",
    ),
    row(
        "ex-dir-without-safetensors",
        exo(target="{in}/no_safetensors"),
        1,
        "{in}/no_safetensors: directory holds no .safetensors files (point at the checkpoint "
        "file or its shard directory)",
    ),
    row(
        "ex-missing-source",
        exo(source="{in}/nope.safetensors"),
        1,
        "{in}/nope.safetensors: no such file or directory (check the path)",
    ),
    row(
        "ex-nothing-in-common",
        exo(target="{in}/other.safetensors"),
        1,
        "{in}/other.safetensors: shares no tensor name with the base {B} (base has e.g. "
        "'blocks.0.attn.q.bias', this one 'other.weight') (check --source-model and "
        "--target-model)",
    ),
    row(
        "ex-pickle-runs-code",
        exo("--source-type", "pytorch", source="{in}/evil.pt"),
        1,
        "{in}/evil.pt: refusing a pickle that needs code to load (",
        exact=False,
    ),
    row(
        "ex-pickle-not-a-dict",
        exo("--source-type", "pytorch", source="{in}/list.pt"),
        1,
        "{in}/list.pt: holds a list, not a state dict",
    ),
    row(
        "ex-pickle-garbage",
        exo("--source-type", "pytorch", source="{in}/garbage.pt"),
        1,
        "{in}/garbage.pt: not a zip-format PyTorch checkpoint, so it cannot be memory-mapped "
        "(re-save it with a current torch.save, or convert it to safetensors)",
    ),
    row(
        "ex-safetensors-as-pytorch",
        exo("--source-type", "pytorch"),
        1,
        "{B}: a pytorch checkpoint must be a .pt, .pth or .bin file (pass the right --*-type "
        "(safetensors for .safetensors files))",
    ),
    row(
        "ex-pt-as-safetensors",
        exo(source="{in}/plain.pt"),
        1,
        "{in}/plain.pt: a safetensors checkpoint must end with .safetensors or be a directory "
        "of shards (pass the right --*-type (pytorch for .pt/.pth/.bin))",
    ),
    row(
        "ex-nan-in-target",
        exo(target="{in}/nan_target.safetensors"),
        1,
        "{in}/nan_target.safetensors: tensor 'head.weight': holds NaN or Inf, so the delta is "
        "not finite (fix or re-save the checkpoint)",
        # finished tensors stay for the rerun (docs/safety.md: an extraction keeps its work dir)
        leaves=("out/lora.safetensors.work",),
    ),
    # merge inputs
    row(
        "mg-missing-base",
        mgo(base="{in}/nope.safetensors"),
        1,
        "{in}/nope.safetensors: no such file or directory (check the path)",
    ),
    row(
        "mg-missing-lora",
        mgo(lora="{in}/merge/gone.safetensors"),
        1,
        "{in}/merge/gone.safetensors: LoRA not found (check --lora-model)",
    ),
    row(
        "mg-lora-is-a-full-model",
        mgo(lora="{MB}"),
        1,
        "{MB}: no LoRA keys recognised (freqs_index, blocks.0.attn.k.weight, "
        "blocks.0.attn.q.bias, blocks.0.attn.q.weight, blocks.0.ffn.0.weight) (expected names "
        "ending in .lora_up/.lora_down.weight, .lora_A/.lora_B(.weight), "
        ".lora_linear_layer.up/.down.weight, .alpha or .diff; is this a full checkpoint?)",
    ),
    row(
        "mg-lora-for-another-model",
        mgo(lora="{in}/merge/pair_lora.safetensors"),
        1,
        "{in}/merge/pair_lora.safetensors: none of its 2 keys patches the base, e.g. "
        "'blocks.0.attn.q.lora_down.weight': shape mismatch: up@down is 96x128 but base is "
        "48x32 (is this LoRA for another model?)",
    ),
    row(
        "mg-lora-truncated",
        mgo(lora="{in}/bad/truncated.safetensors"),
        1,
        "{in}/bad/truncated.safetensors: tensor 'blocks.0.attn.q.bias': data offsets [0, 192] "
        f"run past the end of the data (4 bytes) {TRUNCATED}",
    ),
    row(
        "mg-lora-index-dotdot",
        mgo(lora="{in}/idx_dotdot"),
        1,
        "{in}/idx_dotdot/model.safetensors.index.json: tensor 'blocks.0.attn.q.bias': the index "
        f"places this tensor in '../x.safetensors', outside the checkpoint directory {OUTSIDE}",
    ),
    row(
        "mg-strict-shape-mismatch",
        mgo("--strict", lora="{in}/merge/mismatch.safetensors"),
        1,
        "{in}/merge/mismatch.safetensors: 2 of its 4 keys would not be merged, e.g. "
        "'blocks.0.ffn.0.lora_down.weight': shape mismatch: up@down is 48x32 but base is 64x32 "
        "(every key is listed in the report; without --strict they are skipped)",
        leaves=("out/m.report.json",),  # a strict refusal still writes the report
    ),
    row(
        "mg-strict-peft-without-config",
        mgo("--strict", lora="{in}/merge/peft_no_config"),
        1,
        "{in}/merge/peft_no_config: PEFT adapter without adapter_config.json: its lora_alpha and "
        "r are unknown, so it is merged at scale 1 (as if alpha = rank) (--strict refuses it)",
        leaves=("out/m.report.json",),
    ),
    row(
        "mg-nan-lora",
        mgo(lora="{in}/merge/nan.safetensors"),
        1,
        "{in}/merge/nan.safetensors: tensor 'blocks.0.attn.q.lora_down.weight': holds NaN or "
        "Inf (fix the LoRA, or pass --allow-nonfinite to merge it anyway)",
    ),
    row(
        "mg-config-unknown-key",
        mgo("--config", "{in}/merge/unknown_key.json", lora=None),
        2,
        "{in}/merge/unknown_key.json: lora_configs[0]: unknown field(s) strenght; valid: name, "
        "path, strength, alpha",
    ),
    row(
        "mg-config-missing-lora",
        mgo("--config", "{in}/merge/missing_lora.json", lora=None),
        1,
        "{in}/merge/missing_lora.json: names a LoRA that does not exist: "
        "{in}/merge/gone.safetensors (fix the path; relative paths are read from the config's "
        "directory, then from the working directory)",
    ),
    row(
        "mg-config-not-json",
        mgo("--config", "{in}/merge/not_json.json", lora=None),
        2,
        "{in}/merge/not_json.json: not a readable JSON file (Expecting property name enclosed "
        "in double quotes: line 1 column 2 (char 1))",
    ),
    row(
        "mg-config-missing-file",
        mgo("--config", "{in}/merge/nope.json", lora=None),
        1,
        "{in}/merge/nope.json: merge config not found",
    ),
]

USAGE_ROWS = [
    row(
        "ex-max-shard-size-0",
        exo("--max-shard-size", "0"),
        2,
        "--max-shard-size",
        exact=False,
    ),
    row(
        "ex-max-shard-size-garbage",
        exo("--max-shard-size", "lots"),
        2,
        "cannot read size 'lots'; write e.g. 5GB, 500MB or 2GiB",
    ),
    row(
        "ex-max-shard-size-negative",
        exo("--max-shard-size", "-5GB"),
        2,
        "cannot read size '-5GB'; write e.g. 5GB, 500MB or 2GiB",
    ),
    row(
        "ex-max-shard-size-pytorch",
        exo("--output-format", "pytorch", "--max-shard-size", "1GB"),
        2,
        "--max-shard-size needs --output-format safetensors",
    ),
    row("ex-rank-0", exo("--rank", "0"), 2, "--rank must be >= 1, got 0"),
    row("ex-rank-negative", exo("--rank", "-3"), 2, "--rank must be >= 1, got -3"),
    row("ex-rank-word", exo("--rank", "x"), 2, "--rank", exact=False),
    row("ex-workers-0", exo("--workers", "0"), 2, "--workers", exact=False),
    row(
        "ex-output-dtype",
        exo("--output-dtype", "xyz"),
        2,
        "unknown dtype 'xyz'; valid: float32, fp32, float16, fp16, bfloat16, bf16",
    ),
    row("ex-svd-qr", exo("--svd", "qr"), 2, "--svd", exact=False),
    row(
        "ex-source-type",
        exo("--source-type", "onnx"),
        2,
        "--source-type",
        exact=False,
    ),
    row(
        "ex-output-format",
        exo("--output-format", "gguf"),
        2,
        "--output-format",
        exact=False,
    ),
    row(
        "ex-oversample-negative",
        exo("--oversample", "-1"),
        2,
        "--oversample and --power-iterations must be >= 0",
    ),
    row(
        "ex-lowrank-min-params-negative",
        exo("--lowrank-min-params", "-1"),
        2,
        "--lowrank-min-params must be >= 0",
    ),
    row(
        "ex-device",
        exo("--device", "tpu"),
        2,
        "unknown --device 'tpu'; valid: auto, cpu, cuda, cuda:N",
    ),
    row("mg-strength-word", mgo("--strength", "x"), 2, "--strength 'x' is not a number"),
    row("mg-strength-nan", mgo("--strength", "nan"), 2, "--strength must be finite, got 'nan'"),
    row(
        "mg-strength-count",
        mgo("--strength", "1", "--strength", "2"),
        2,
        "2 --strength value(s) for 1 --lora-model(s) (give one --strength per --lora-model, "
        "in the same order, or none for 1.0)",
    ),
    row("mg-alpha-nan", mgo("--alpha", "nan"), 2, "--alpha must be finite, got 'nan'"),
    row("mg-alpha-inf", mgo("--alpha", "inf"), 2, "--alpha must be finite, got 'inf'"),
    row("mg-alpha-word", mgo("--alpha", "x"), 2, "--alpha 'x' is not a number"),
    row(
        "mg-output-dtype",
        mgo("--output-dtype", "fp8"),
        2,
        "unknown dtype 'fp8'; valid: float32, fp32, float16, fp16, bfloat16, bf16, fp8_e4m3fn, "
        "float8_e4m3fn",
    ),
    row(
        "mg-max-shard-size-0",
        mgo("--max-shard-size", "0"),
        2,
        "--max-shard-size",
        exact=False,
    ),
    row("mg-workers-0", mgo("--workers", "0"), 2, "--workers", exact=False),
    row("mg-lora-type", mgo("--lora-type", "onnx"), 2, "--lora-type", exact=False),
    row(
        "mg-no-lora",
        mgo(lora=None),
        2,
        "no LoRA given (pass --lora-model (repeatable) or --config)",
    ),
    row(
        "mg-config-and-lora",
        mgo("--config", "{in}/merge/loras.json"),
        2,
        "give the LoRAs with --config or with --lora-model, not both",
    ),
]

CLEAN_ROWS = [
    row("clean-user-dir", ("clean", "{user}"), 2, f"{{user}}: {NOT_WORK}"),
    row("clean-user-dir-symlink", ("clean", "{links}/user"), 2, f"{{links}}/user: {NOT_WORK}"),
    row("clean-models-dir", ("clean", "{in}/pair"), 2, f"{{in}}/pair: {NOT_WORK}"),
    row("clean-inputs-root", ("clean", "{in}"), 2, f"{{in}}: {NOT_WORK}"),
    row("clean-a-file", ("clean", "{T}"), 2, f"{{T}}: {NOT_WORK}"),
    row("clean-missing", ("clean", "{root}/nope"), 2, f"{{root}}/nope: {NOT_WORK}"),
    row(
        "clean-empty-argument",
        ("clean", ""),
        2,
        "the work directory argument is empty (give the --work-dir of a run)",
    ),
]

ROWS = PATH_ROWS + INPUT_ROWS + USAGE_ROWS + CLEAN_ROWS


def test_the_matrix_is_large_and_ids_are_unique():
    ids = [param.id for param in ROWS]
    assert len(ids) >= 60
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", ROWS)
def test_bad_input(tree, case: Row):
    root = tree["root"]
    before = snapshot(root)
    result = run_cli(*(fill(arg, tree) for arg in case.argv))
    message = fill(case.message, tree)

    assert result.exit_code == case.code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.endswith("\n") and result.stderr[:-1].isprintable(), result.stderr
    if case.exact:
        assert result.stderr == f"error: {message}\n"
    else:
        assert message in result.stderr

    after = snapshot(root)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, f"changed or removed: {changed}"
    allowed = tuple(case.leaves)
    new = sorted(
        k
        for k in set(after) - set(before)
        if not any(k == a or k.startswith(a + "/") for a in allowed)
    )
    assert not new, f"left behind: {new}"
    for leave in allowed:
        assert leave in after, f"{leave} should be there"
    with open(os.path.join(tree["user"], "keep.txt")) as f:
        assert f.read() == "the user's own file\n"


# ---- companions of rows that are not failures ----------------------------------------------


def test_peft_adapter_without_config_merges_with_a_warning(tree):
    result = run_cli(*(fill(a, tree) for a in mgo(lora="{in}/merge/peft_no_config")))
    adapter = fill("{in}/merge/peft_no_config", tree)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"warning: {adapter}: PEFT adapter without adapter_config.json")
    assert result.stderr.count("\n") == 1
    assert sorted(os.listdir(tree["out"])) == [
        "m.report.json",
        "m.safetensors",
        "taken.safetensors",
    ]


def test_pickle_code_never_runs(tree):
    """The safety half of the ex-pickle-runs-code row: the code never runs."""
    before = snapshot(tree["root"])
    result = run_cli(
        *(fill(a, tree) for a in exo("--source-type", "pytorch", source="{in}/evil.pt"))
    )
    assert result.exit_code == 1
    assert "pickle code ran" not in result.output
    assert result.stdout == ""
    assert snapshot(tree["root"]) == before


def extract_with_work_dir(tree, *extra):
    result = run_cli(*(fill(a, tree) for a in exo("--device", "cpu", *extra)))
    assert result.exit_code == 0, result.output
    return result


def test_clean_follows_a_symlink_to_a_real_work_dir(tree):
    extract_with_work_dir(tree)
    work = tree["O"] + ".work"
    link = os.path.join(tree["links"], "work")
    os.symlink(work, link)
    inputs = snapshot(tree["in"])
    result = run_cli("clean", link)
    assert (result.exit_code, result.stdout) == (0, "")
    assert result.stderr.startswith(f"removed {work} (")
    assert not os.path.exists(work)
    assert os.path.islink(link)  # the user's symlink is not loraforge's to delete
    assert os.path.isfile(tree["O"])  # the finished output is not a temporary
    assert snapshot(tree["in"]) == inputs


def test_no_keep_work_and_clean_keep_user_files_in_a_work_dir(tree):
    work = os.path.join(tree["out"], "w")
    extract_with_work_dir(tree, "--work-dir", work)
    mine = os.path.join(work, "notes.txt")
    with open(mine, "w") as f:
        f.write("mine\n")
    extract_with_work_dir(tree, "--work-dir", work, "--no-keep-work")
    assert os.listdir(work) == ["notes.txt"]
    os.remove(tree["O"])
    extract_with_work_dir(tree, "--work-dir", os.path.join(tree["out"], "w2"))
    with open(os.path.join(tree["out"], "w2", "notes.txt"), "w") as f:
        f.write("mine\n")
    result = run_cli("clean", os.path.join(tree["out"], "w2"))
    assert result.exit_code == 0, result.output
    assert os.listdir(os.path.join(tree["out"], "w2")) == ["notes.txt"]
    with open(mine) as f:
        assert f.read() == "mine\n"


def test_clean_says_when_it_keeps_the_directory(tree):
    work = os.path.join(tree["out"], "w")
    extract_with_work_dir(tree, "--work-dir", work)
    with open(os.path.join(work, "notes.txt"), "w") as f:
        f.write("mine\n")
    result = run_cli("clean", work)
    assert result.exit_code == 0, result.output
    assert os.path.isdir(work)
    assert f"removed {work} (" not in result.stderr
    assert "notes.txt" in result.stderr
