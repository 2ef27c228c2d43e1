"""Every merge task charges its time to phases (read, product, cast, check, write as they
apply), so the report's ``summary.task_seconds`` counts blocked and scaled-fp8 tasks too."""

import pytest
import torch
from safetensors.torch import save_file

from loraforge.pipeline.io.layout import OutputEntry, Slot
from loraforge.pipeline.io.reader import index_checkpoint
from loraforge.pipeline.merge.plan import MergeTask
from loraforge.pipeline.merge.task import run_merge_task
from loraforge.pipeline.workdir import WorkDir

Q = "blocks.0.attn.q.weight"
VALUES = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]


def base_weight(tmp_path, scaled: bool):
    """``Q`` holding ``VALUES``: as fp32, or as scaled fp8 (scale 1: the values are exact)."""
    weight = torch.tensor(VALUES)
    tensors = {Q: weight}
    if scaled:
        tensors = {
            Q: weight.to(torch.float8_e4m3fn),
            Q.removesuffix(".weight") + ".scale_weight": torch.tensor(1.0),
            "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        }
    path = str(tmp_path / "base.safetensors")
    save_file(tensors, path)
    return index_checkpoint(path).tensors[Q]


@pytest.mark.parametrize(
    ("scaled", "block_rows", "phases"),
    [
        (False, None, ["cast", "check", "read", "wait", "write"]),  # streamed
        (False, 2, ["cast", "check", "read", "write"]),
        (True, 2, ["cast", "check", "product", "read", "write"]),
        (True, None, ["cast", "check", "product", "read", "write"]),
    ],
)
def test_every_path_records_its_phases(tmp_path, scaled, block_rows, phases):
    info = base_weight(tmp_path, scaled)
    task = MergeTask(Q, "cast", info, "BF16")
    out = tmp_path / "out.bin"
    out.write_bytes(bytes(12))
    work = WorkDir(str(tmp_path / "work"))
    work.create()
    slot = Slot(str(out), 0, OutputEntry(Q, "BF16", (3, 2)))
    marker = run_merge_task(task, slot, work.path, "cpu", {}, block_rows=block_rows)
    assert sorted(marker["phases"]) == phases
    written = torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.bfloat16)
    assert written.reshape(3, 2).tolist() == VALUES
