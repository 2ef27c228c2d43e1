"""Messages that name the real cause: a refusal blames the input that is wrong (not the
``.alpha`` of a pair it already refused, not the fine-tune for a NaN in the LoRA), uses the
names the command's own options have, and says what to do. Each case: exit code, the exact
line, no traceback, and nothing changed or left behind."""

from __future__ import annotations

import errno
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from loraforge.pipeline.io import stream as io_stream
from loraforge.pipeline.io import writer as io_writer
from loraforge.pipeline.merge import task as merge_task
from loraforge.pipeline.run import memory
from tests.helpers.cli import run_cli
from tests.helpers.tree import changes, snapshot, working_copy

Q = "blocks.0.attn.q"


def pair(module, out=48, rank=4, inp=32, alpha=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"{module}.lora_up.weight": torch.randn(out, rank, generator=g),
        f"{module}.lora_down.weight": torch.randn(rank, inp, generator=g),
    }
    if alpha is not None:
        tensors[f"{module}.alpha"] = torch.tensor(float(alpha))
    return tensors


def build(root: str) -> None:
    g = torch.Generator().manual_seed(0)
    base = {f"{Q}.weight": torch.randn(48, 32, generator=g), "head.weight": torch.randn(8, 48)}
    save_file(base, os.path.join(root, "base.safetensors"))
    shutil.copy(os.path.join(root, "base.safetensors"), os.path.join(root, "same.safetensors"))
    loras = {
        "lora": pair(Q, alpha=4),
        "narrow": pair(Q, out=40, alpha=4),  # 40x32 where the others are 48x32
        "rank0": pair(Q, rank=0, alpha=4),
        "other_model": {**pair(Q, inp=64, alpha=8), **pair("head", out=8, inp=64, alpha=8)},
        "kohya": {**pair("lora_unet_blocks_0_attn_q", alpha=4)},
    }
    for name, tensors in loras.items():
        save_file(tensors, os.path.join(root, f"{name}.safetensors"))
    nan = pair(Q, alpha=4)
    nan[f"{Q}.lora_up.weight"][3, 1] = math.nan
    save_file(nan, os.path.join(root, "nan_lora.safetensors"))
    tuned = {k: v.clone() for k, v in base.items()}
    tuned[f"{Q}.weight"][0, 0] = math.inf
    save_file(tuned, os.path.join(root, "inf_tuned.safetensors"))


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("messages"))
    build(root)
    return root


@pytest.fixture
def tree(master, tmp_path) -> str:
    return working_copy(master, tmp_path)


def refused(tree: str, argv, code: int, message: str, leaves=()) -> None:
    before = snapshot(tree)
    result = run_cli(*(str(a).replace("{r}", tree) for a in argv))
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert result.stderr == f"error: {message.replace('{r}', tree)}\n"
    assert changes(before, snapshot(tree), leaves) == ([], [])


def resize(*loras, extra=()):
    models = [a for lora in loras for a in ("--lora-model", f"{{r}}/{lora}.safetensors")]
    return (
        "resize",
        "--quiet",
        *models,
        "--output",
        "{r}/out/r.safetensors",
        "--rank",
        "2",
        *extra,
    )


def merge(lora, *extra):
    return (
        "merge", "--quiet", "--source-model", "{r}/base.safetensors", "--lora-model",
        f"{{r}}/{lora}.safetensors", "--output", "{r}/out/m.safetensors", *extra,
    )  # fmt: skip


def verify(target, lora="lora"):
    return (
        "verify", "--quiet", "--source-model", "{r}/base.safetensors", "--target-model",
        f"{{r}}/{target}.safetensors", "--lora-model", f"{{r}}/{lora}.safetensors",
    )  # fmt: skip


def extract(target):
    return (
        "extract", "--quiet", "--source-model", "{r}/base.safetensors", "--target-model",
        f"{{r}}/{target}.safetensors", "--output", "{r}/out/e.safetensors",
    )  # fmt: skip


# ---- what a LoRA that patches nothing is blamed for ----------------------------------------


def test_resize_of_loras_whose_shapes_differ_names_both(tree):
    refused(
        tree,
        resize("lora", "narrow"),
        1,
        f"{{r}}/narrow.safetensors: its delta of {Q}.weight is 40x32, but "
        "{r}/lora.safetensors's is 48x32: LoRAs summed must patch the same shapes (are they for "
        "different models? pass --base MODEL to check each against the model)",
    )


def test_resize_of_kohya_names_without_base_points_at_base(tree):
    refused(
        tree,
        resize("kohya"),
        2,
        "{r}/kohya.safetensors: kohya names ('lora_unet_blocks_0_attn_q.lora_down.weight') map "
        "back to module names only through the model they patch (pass --base MODEL)",
    )


@pytest.mark.parametrize(
    "argv, against",
    [(merge("rank0"), "the base"), (resize("rank0"), "anything")],
    ids=["merge", "resize"],
)
def test_a_rank_0_lora_is_called_empty(tree, argv, against):
    refused(
        tree,
        argv,
        1,
        f"{{r}}/rank0.safetensors: none of its 3 keys patches {against}, e.g. "
        f"'{Q}.lora_down.weight': a rank-0 pair (up is 48x0, down is 0x32) holds no change (drop "
        "the empty module from the LoRA)",
    )


def test_a_lora_for_another_model_is_blamed_on_its_shapes_not_its_alphas(tree):
    refused(
        tree,
        merge("other_model"),
        1,
        "{r}/other_model.safetensors: none of its 6 keys patches the base, e.g. "
        "'blocks.0.attn.q.lora_down.weight': shape mismatch: up@down is 48x64 but base is 48x32 "
        "(is this LoRA for another model?)",
    )


# ---- verify and extract: the input that is wrong ---------------------------------------------


def test_verify_blames_the_lora_for_its_nan(tree):
    refused(
        tree,
        verify("same", lora="nan_lora"),
        1,
        f"{{r}}/nan_lora.safetensors: tensor '{Q}.lora_up.weight': holds NaN or Inf (fix the LoRA)",
    )


def test_verify_blames_the_fine_tune_for_its_inf(tree):
    refused(
        tree,
        verify("inf_tuned"),
        1,
        f"{{r}}/inf_tuned.safetensors: tensor '{Q}.weight': holds NaN or Inf (the fine-tuned "
        "model) (fix or re-save the checkpoint)",
    )


@pytest.mark.parametrize("command", [verify, extract])
def test_one_model_twice_is_refused_before_any_work(tree, command):
    refused(
        tree,
        command("base"),
        1,
        "{r}/base.safetensors: is the --source-model too ({r}/base.safetensors): a model does "
        "not differ from itself (pass the fine-tuned checkpoint as --target-model)",
    )


def test_verify_against_an_equal_copy_is_refused(tree):
    refused(
        tree,
        verify("same"),
        1,
        "{r}/same.safetensors: equals the base in all 2 tensors compared, so no error can be "
        "measured against the change (pass the fine-tuned checkpoint as --target-model)",
    )


def test_extract_of_an_equal_copy_writes_no_empty_lora(tree):
    refused(
        tree,
        extract("same"),
        1,
        "{r}/same.safetensors: equals the base in all 2 tensors compared (max |diff| <= 1e-8), "
        "so the LoRA would be empty (check --source-model and --target-model)",
        leaves=("out/e.safetensors.work",),  # what was computed, for a rerun
    )


# ---- the machine's state, named as each command names its places ------------------------------


@pytest.mark.parametrize(
    "argv, fix",
    [
        (
            ("convert", "--quiet", "{r}/lora.safetensors", "{r}/out/c", "--to", "kohya"),
            "pick a writable OUT / --report",
        ),
        (
            merge("lora"),
            "pick a writable --output / --work-dir; finished tensors are kept, rerun to resume",
        ),
    ],
    ids=["convert", "merge"],
)
def test_an_unwritable_place_is_named_as_the_command_names_it(tree, monkeypatch, argv, fix):
    where = os.path.join(tree, "out")

    def read_only(*args):
        raise OSError(errno.EROFS, "Read-only file system", where)

    monkeypatch.setattr(io_writer.SafetensorsOutput, "write", read_only)  # convert
    monkeypatch.setattr(merge_task, "write_at", read_only)  # merge's tasks: copied tensors
    monkeypatch.setattr(io_stream, "write_bytes", read_only)  # and those it makes (small here)
    result = run_cli(*(a.replace("{r}", tree) for a in argv))
    assert result.exit_code == 1, result.output
    # (merge also says where it kept its temporaries, a note line before)
    assert result.stderr.endswith(f"\nerror: {where}: Read-only file system ({fix})\n") or (
        result.stderr == f"error: {where}: Read-only file system ({fix})\n"
    )


def test_convert_names_its_arguments(tree):
    refused(
        tree,
        ("convert", "{r}/lora.safetensors", "{r}/lora.safetensors", "--to", "lightx2v"),
        2,
        "{r}/lora.safetensors: OUT would overwrite the input IN {r}/lora.safetensors (choose "
        "another OUT)",
    )


# ---- --max-memory -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "12PB",
            "--max-memory 12 PB is more than this machine has (24 GB, cgroup limits included) "
            "(give at most that, or leave --max-memory out for 60% of the memory available)",
        ),
        (
            "4000GB",
            "--max-memory 4 TB is more than this machine has (24 GB, cgroup limits included) "
            "(give at most that, or leave --max-memory out for 60% of the memory available)",
        ),
    ],
)
def test_max_memory_says_what_is_wrong(tree, monkeypatch, value, message):
    monkeypatch.setattr(memory, "machine_memory", lambda: 24 * 10**9)
    refused(tree, merge("lora", "--max-memory", value), 2, message)


def test_max_memory_0_is_below_the_minimum(tree):
    result = run_cli(*(a.replace("{r}", tree) for a in merge("lora", "--max-memory", "0")))
    assert result.exit_code == 2
    assert result.stderr.startswith(
        "error: Invalid value for '--max-memory': 0 is below the smallest budget, 64MiB (see "
    )


def test_a_strict_refusal_leads_with_the_telling_cause_not_a_left_over_alpha(tree):
    lora = {
        **pair(Q, alpha=4),
        **pair(f"diffusion_model.{Q}", seed=2),  # the same module again, in another naming
        "blocks.9.alpha": torch.tensor(1.0),  # an alpha with no pair
    }
    save_file(lora, os.path.join(tree, "twice.safetensors"))
    refused(
        tree,
        merge("twice", "--strict"),
        1,
        "{r}/twice.safetensors: 3 of its 6 keys would not be merged (2 duplicate target, 1 "
        f"alpha without up/down), e.g. 'diffusion_model.{Q}.lora_down.weight': duplicate "
        f"target: {Q}.weight already patched by {Q}.lora_up.weight (every key is listed in the "
        "report; without --strict they are skipped)",
        leaves=("out/m.report.json",),
    )
