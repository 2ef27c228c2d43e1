"""Fixtures: the tiny checkpoint pair, generated once per test session, and GPU skips."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.checkpoints import pair_tensors


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """``(base, fine-tuned)`` safetensors paths of ``pair_tensors()``, shared by every test of
    the session: a test that needs to change one copies it first, and the session fails at
    teardown if either file changed (tests run as root, so file modes would not stop them)."""
    directory = tmp_path_factory.mktemp("pair")
    base, target = pair_tensors()
    paths = str(directory / "base.safetensors"), str(directory / "target.safetensors")
    save_file(base, paths[0])
    save_file(target, paths[1])
    digests = [_digest(p) for p in paths]
    yield paths
    assert [_digest(p) for p in paths] == digests, "a test modified the shared pair files"
    assert sorted(os.listdir(directory)) == ["base.safetensors", "target.safetensors"], (
        "a test wrote beside the shared pair files; write to tmp_path"
    )


@pytest.fixture(scope="session")
def wan_sample(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The tiny random Wan sample (model folders, LoRAs, configs, image), built once per
    session; the session fails at teardown if a test changed any of its files."""
    pytest.importorskip("diffusers")
    from tests.helpers.tiny_wan import builder
    from tests.helpers.tree import snapshot

    directory = str(tmp_path_factory.mktemp("wan"))
    paths = builder().build(directory)
    before = snapshot(directory)
    yield paths
    assert snapshot(directory) == before, "a test modified the shared Wan sample"


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
