"""A CPU merge task makes its tensor in cache-sized row blocks, in place in the buffer the disk
is written from: the bytes equal the merge stage's on the whole tensor, cast once."""

import pytest
import torch
from safetensors.torch import save_file

from loraforge.pipeline.io import safetensors_format as stf
from loraforge.pipeline.io import stream
from loraforge.pipeline.io.layout import OutputEntry, Slot
from loraforge.pipeline.io.reader import index_checkpoint
from loraforge.pipeline.io.slots import checksum
from loraforge.pipeline.io.stream import finish_writes
from loraforge.pipeline.lora.patches import PatchRef
from loraforge.pipeline.merge import blocked
from loraforge.pipeline.merge.plan import MergeTask
from loraforge.pipeline.merge.task import run_merge_task
from loraforge.pipeline.workdir import WorkDir
from loraforge.stages.cast import cast
from loraforge.stages.merge import Delta, merge_weight

ROWS, COLS, RANK = 810, 700, 8  # > 1 MB of whole pages in every dtype: written direct
BLOCK_ROWS = 16  # 51 blocks, the last one short


@pytest.fixture
def inputs(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {"w": (torch.randn(ROWS, COLS, generator=g) * 0.02).bfloat16()}
    lora = {
        "up": torch.randn(ROWS, RANK, generator=g) * 0.01,
        "down": torch.randn(RANK, COLS, generator=g) * 0.01,
        "diff": (torch.randn(ROWS, COLS, generator=g) * 0.001).bfloat16(),
    }
    save_file(base, tmp_path / "base.safetensors")
    save_file(lora, tmp_path / "lora.safetensors")
    return (
        base,
        lora,
        index_checkpoint(str(tmp_path / "base.safetensors")).tensors,
        index_checkpoint(str(tmp_path / "lora.safetensors")).tensors,
    )


@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32"])
def test_blocks_made_in_place_equal_the_whole_tensors_merge(
    tmp_path, inputs, monkeypatch, out_dtype
):
    base, lora, base_index, lora_index = inputs
    patches = (
        PatchRef(0, "lowrank", 0.7, up=lora_index["up"], down=lora_index["down"]),
        PatchRef(1, "diff", 0.25, diff=lora_index["diff"]),
    )
    task = MergeTask("w", "merged", base_index["w"], out_dtype, patches)
    dtype = stf.DTYPE_BY_CODE[out_dtype]
    monkeypatch.setattr(blocked, "CACHE_BLOCK", 4 * COLS * BLOCK_ROWS)
    monkeypatch.setattr(stream, "filesystem_of", lambda path: "ext4")  # tmp_path: any disk
    assert blocked.cache_block_rows(task) == BLOCK_ROWS
    offset = 4102  # mid-page
    size = ROWS * COLS * dtype.itemsize
    out = tmp_path / "out.bin"
    out.write_bytes(bytes(offset + size + 9))
    work = WorkDir(str(tmp_path / "work"))
    work.create()
    slot = Slot(str(out), offset, OutputEntry("w", out_dtype, (ROWS, COLS)))
    marker = run_merge_task(task, slot, work.path, "cpu", {}, write_behind=True)
    finish_writes([str(out)])
    deltas = [Delta(0.7, up=lora["up"], down=lora["down"]), Delta(0.25, diff=lora["diff"])]
    expected = cast(merge_weight(base["w"], deltas), dtype).reshape(-1).view(torch.uint8)
    expected = expected.numpy().tobytes()
    content = out.read_bytes()
    assert content[offset : offset + size] == expected
    assert content[:offset] == bytes(offset) and content[offset + size :] == bytes(9)
    assert marker["crc"] == checksum(expected, zip_crc=False)
    assert sorted(marker["phases"]) == ["cast", "check", "product", "read", "wait", "write"]
