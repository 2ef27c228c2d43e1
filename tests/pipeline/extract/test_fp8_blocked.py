"""The row-block extraction path reads scaled-fp8 weights with their scales: the diff it stores
block by block equals ``target − W_fp8 · scale`` exactly."""

import numpy as np
import pytest
import torch

from loraforge.pipeline.extract.options import ExtractOptions
from loraforge.pipeline.extract.plan import plan_extraction
from loraforge.pipeline.extract.task import run_extract_task
from loraforge.pipeline.io.reader import index_checkpoint
from loraforge.pipeline.workdir import WorkDir
from tests.helpers import fp8

KEY = "blocks.0.attn.q.weight"


@pytest.mark.parametrize("per_row", [False, True])
def test_a_blocked_diff_of_a_scaled_base_is_the_dequantized_delta(tmp_path, per_row):
    g = torch.Generator().manual_seed(0)
    convention = "lightx2v" if per_row else "scaled_fp8"
    stored, _ = fp8.scaled({KEY: torch.randn(8, 5, generator=g)}, [KEY], convention, per_row)
    tuned = {KEY: torch.randn(8, 5, generator=g)}
    source = index_checkpoint(fp8.save(stored, tmp_path / "s.safetensors"))
    target = index_checkpoint(fp8.save(tuned, tmp_path / "t.safetensors"))
    (task,) = plan_extraction(source, target, ExtractOptions(diff_only=True)).tasks
    work = WorkDir(str(tmp_path / "work"))
    work.create()
    marker = run_extract_task(task, work.path, "cpu", ExtractOptions().kernel, {}, block_rows=3)
    assert marker["blocked"]["blocks"] == 3
    arrays, _ = work.load(KEY, work.read_marker(KEY))
    expected = tuned[KEY] - fp8.value(stored, KEY, convention)
    assert np.array_equal(arrays["diff"], expected.numpy())
