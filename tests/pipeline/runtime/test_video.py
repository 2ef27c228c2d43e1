"""The PNG frames of a run: a previous run's replaced, and the folder a run that crashed while
publishing left beside them removed first, never a folder that holds anything else."""

import os

import numpy as np
import pytest

from loraforge.pipeline.errors import OutputError
from loraforge.pipeline.runtime.video import FramesOutput

FRAMES = np.zeros((2, 16, 16, 3), np.float32)


def frames_folder(path, count: int) -> None:
    os.makedirs(path)
    for i in range(count):
        with open(os.path.join(path, f"frame_{i:05d}.png"), "wb") as f:
            f.write(b"old")


def test_a_previous_runs_frames_and_a_crashed_publish_leftover_are_replaced(tmp_path):
    path = str(tmp_path / "out_frames")
    frames_folder(path, 3)
    frames_folder(path + ".old.partial", 3)  # a run stopped between its two renames
    output = FramesOutput(path)
    output.check()
    output.write(FRAMES)
    output.seal()
    assert output.publish() == [path]
    assert os.listdir(tmp_path) == ["out_frames"]
    assert sorted(os.listdir(path)) == ["frame_00000.png", "frame_00001.png"]


def test_a_leftover_holding_other_files_is_refused(tmp_path):
    path = str(tmp_path / "out_frames")
    old = path + ".old.partial"
    frames_folder(old, 1)
    (tmp_path / "out_frames.old.partial" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as caught:
        FramesOutput(path).check()
    assert str(caught.value) == (
        f"{old}: exists and holds other files than frame_NNNNN.png (remove it, or choose "
        "another --save_result_path)"
    )
    assert sorted(os.listdir(old)) == ["frame_00000.png", "notes.txt"]
