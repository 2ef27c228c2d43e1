"""A temporary's name and back."""

from __future__ import annotations

import os

import pytest

from loraforge.pipeline.io.atomic import temporary_name, temporary_of


@pytest.mark.parametrize("name", ["run.json", "lora.safetensors", ".hidden", "a.partial"])
def test_a_temporary_name_gives_its_file_back(name):
    temporary = os.path.basename(temporary_name(os.path.join("work", name)))
    assert temporary == f".{name}.partial"
    assert temporary_of(temporary) == name


@pytest.mark.parametrize("name", ["run.json", ".hidden", "run.json.partial"])
def test_other_names_are_no_temporaries(name):
    assert temporary_of(name) is None
