"""Removing a work directory deletes what loraforge wrote there and nothing else."""

import os

import numpy as np
import pytest

from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.workdir import WorkDir
from loraforge.pipeline.workdir.clean import clean_work_dir


def filled(path) -> WorkDir:
    work = WorkDir(str(path))
    work.create()
    work.write_manifest({"command": "extract"})
    work.save("a.weight", {"diff": np.ones((4, 4), dtype=np.float32)}, {"kind": "diff"})
    return work


def test_clean_removes_the_directory_loraforge_made(tmp_path):
    work = filled(tmp_path / "w")
    path, size = clean_work_dir(work.path)
    assert path == work.path and size > 64 and not os.path.exists(work.path)


def test_clean_and_remove_keep_a_users_own_files(tmp_path):
    work = filled(tmp_path / "w")
    (tmp_path / "w" / "notes.txt").write_text("mine")
    clean_work_dir(work.path)
    assert sorted(os.listdir(tmp_path / "w")) == ["notes.txt"]
    work = filled(tmp_path / "w")
    work.remove()
    assert sorted(os.listdir(tmp_path / "w")) == ["notes.txt"]


def test_a_directory_without_markers_is_not_a_work_directory(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError) as caught:
        clean_work_dir(str(tmp_path / "plain"))
    assert str(caught.value) == f"{tmp_path / 'plain'}: not a loraforge work directory"
    assert os.listdir(tmp_path / "plain") == ["model.safetensors"]
