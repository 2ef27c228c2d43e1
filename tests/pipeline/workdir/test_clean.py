"""Removing a work directory deletes what loraforge wrote there and nothing else."""

import os

import numpy as np
import pytest
import zarr
import zarr.storage
from zarr.codecs import Crc32cCodec

from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.workdir import WorkDir, zarr_direct
from loraforge.pipeline.workdir.clean import clean_work_dir


def filled(path) -> WorkDir:
    work = WorkDir(str(path))
    work.create()
    work.write_manifest({"command": "extract"})
    work.save("a.weight", {"diff": np.ones((4, 4), dtype=np.float32)}, {"kind": "diff"})
    return work


def test_clean_removes_the_directory_loraforge_made(tmp_path):
    work = filled(tmp_path / "w")
    cleaned = clean_work_dir(work.path)
    assert cleaned.path == work.path and cleaned.size > 64 and cleaned.temporaries == []
    assert not os.path.exists(work.path)


def test_clean_follows_a_symlink_and_removes_the_runs_temporary_output(tmp_path):
    work = filled(tmp_path / "w")
    output = tmp_path / "out" / "lora.safetensors"
    output.parent.mkdir()
    work.write_manifest({"command": "merge", "output": str(output)})
    partial = [output.parent / ".lora.safetensors.partial"]
    partial.append(output.parent / ".lora-00002-of-00002.safetensors.partial")
    for file in partial:
        file.write_bytes(b"x" * 10)
    (output.parent / ".other.safetensors.partial").write_bytes(b"y")  # another run's
    os.symlink(tmp_path / "w", tmp_path / "link")
    cleaned = clean_work_dir(str(tmp_path / "link"))
    assert cleaned.path == str(tmp_path / "w")
    assert cleaned.temporaries == sorted(str(f) for f in partial)
    assert not (tmp_path / "w").exists() and os.path.islink(tmp_path / "link")
    assert os.listdir(output.parent) == [".other.safetensors.partial"]


def test_clean_and_remove_keep_a_users_own_files(tmp_path):
    work = filled(tmp_path / "w")
    (tmp_path / "w" / "notes.txt").write_text("mine")
    clean_work_dir(work.path)
    assert sorted(os.listdir(tmp_path / "w")) == ["notes.txt"]
    work = filled(tmp_path / "w")
    assert work.remove() == ["notes.txt"]
    assert sorted(os.listdir(tmp_path / "w")) == ["notes.txt"]


def test_clean_clears_once_while_it_holds_the_lock(tmp_path, monkeypatch):
    work = filled(tmp_path / "w")
    clear, locked = WorkDir.clear, []

    def clearing(self):
        locked.append(os.path.exists(os.path.join(self.path, "lock.json")))
        return clear(self)

    monkeypatch.setattr(WorkDir, "clear", clearing)
    assert clean_work_dir(work.path).kept == []
    assert locked == [True]
    assert not os.path.exists(work.path)


def test_a_directory_without_markers_is_not_a_work_directory(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError) as caught:
        clean_work_dir(str(tmp_path / "plain"))
    assert str(caught.value) == (
        f"{tmp_path / 'plain'}: not a loraforge work directory "
        "(give the --work-dir of a run; the default is <output>.work)"
    )
    assert os.listdir(tmp_path / "plain") == ["model.safetensors"]


def test_a_users_files_inside_tensors_and_done_are_kept_and_named(tmp_path):
    """Only files loraforge writes there by name (zarr metadata and chunks, markers naming
    their key, their temporaries) are deleted; a user's anywhere inside stays, byte for byte."""
    work = filled(tmp_path / "w")
    work.save("b.weight", {"up": np.ones((3, 2), np.float32)}, {"kind": "lowrank"})
    mine = {
        "tensors/notes.txt": b"mine",
        "tensors/a.weight/extra/data.bin": b"\x00\x01",
        "tensors/zarr.json.bak": b"{}",
        "tensors/a.weight/diff/c.txt": b"not a chunk",
        "tensors/b.weight/up/c.1.x": b"nor this",
        "done/todo.json": b'{"key": "not.this.one"}',
        "done/readme": b"r",
        "done/markers-notes.jsonl": b"not a marker line\n",
    }
    for rel, data in mine.items():
        os.makedirs(os.path.dirname(tmp_path / "w" / rel), exist_ok=True)
        (tmp_path / "w" / rel).write_bytes(data)
    cleaned = clean_work_dir(work.path)
    assert cleaned.kept == sorted(mine)
    left = {
        os.path.relpath(os.path.join(d, f), tmp_path / "w")
        for d, _, files in os.walk(tmp_path / "w")
        for f in files
    }
    assert left == set(mine)
    assert all((tmp_path / "w" / rel).read_bytes() == data for rel, data in mine.items())


def test_no_resume_clears_results_but_not_a_users_file(tmp_path):
    work = filled(tmp_path / "w")
    (tmp_path / "w" / "tensors" / "keep.me").write_text("mine")
    assert work.clear() == [os.path.join("tensors", "keep.me")]
    assert work.read_marker("a.weight") is None
    assert sorted(os.listdir(tmp_path / "w" / "tensors")) == ["keep.me"]


def test_an_older_work_directorys_nested_chunks_are_removed_too(tmp_path):
    """Work directories from before the ``.`` chunk-key separator hold ``c/<i>/<j>`` chunks
    (zarr's default), which clean deletes, directories and all, as it deletes ``c.<i>.<j>``."""
    work = filled(tmp_path / "w")
    zarr.create_array(
        store=zarr.storage.LocalStore(work.tensors),
        name="old.weight/up",
        data=np.ones((4, 2), np.float32),
        chunks=(2, 2),
        compressors=[Crc32cCodec()],
    )
    zarr_direct.write_group(os.path.join(work.tensors, "old.weight"))
    assert os.path.isfile(os.path.join(work.tensors, "old.weight", "up", "c", "1", "0"))
    assert os.path.isfile(os.path.join(work.tensors, "a.weight", "diff", "c.0.0"))
    assert clean_work_dir(work.path).kept == []
    assert not os.path.exists(work.path)


def test_a_symlinked_directory_inside_is_kept_and_not_followed(tmp_path):
    work = filled(tmp_path / "w")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "zarr.json").write_text("{}")
    os.symlink(outside, os.path.join(work.tensors, "linked"))
    os.symlink(outside, os.path.join(work.tensors, "a.weight", "linked"))
    assert clean_work_dir(work.path).kept == ["tensors/a.weight/linked", "tensors/linked"]
    assert (outside / "zarr.json").read_text() == "{}"
