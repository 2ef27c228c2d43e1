"""Path checks before any work: what a run writes against what it reads and against itself."""

import os

import pytest

from loraforge.pipeline.errors import ModelMismatch, OutputError, UsageError
from loraforge.pipeline.run.paths import (
    UserPath,
    check_output_argument,
    check_paths,
    check_two_models,
    check_writable_location,
    same_path,
)


def refusal(outputs, inputs, work) -> str:
    with pytest.raises(UsageError) as caught:
        check_paths(outputs, inputs, work)
    assert caught.value.exit_code == 2
    return str(caught.value)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "models").mkdir()
    for name in ("base.safetensors", "ft.safetensors"):
        (tmp_path / "models" / name).write_bytes(b"x")
    return tmp_path


def test_distinct_paths_pass(files):
    check_paths(
        [
            UserPath("--output", str(files / "out.safetensors")),
            UserPath("--report", str(files / "r.json")),
        ],
        [UserPath("--source-model", str(files / "models" / "base.safetensors"))],
        UserPath("--work-dir", str(files / "out.safetensors.work")),
    )


def test_output_naming_an_input_through_dots_and_links(files):
    os.symlink(files / "models", files / "link")
    base = str(files / "models" / "base.safetensors")
    for given in (
        str(files / "link" / "base.safetensors"),
        str(files / "models" / ".." / "models" / "base.safetensors"),
    ):
        message = refusal(
            [UserPath("--output", given)],
            [UserPath("--source-model", base)],
            UserPath("--work-dir", str(files / "w")),
        )
        assert message == (
            f"{given}: --output would overwrite the input --source-model {base} "
            "(choose another --output)"
        )


def test_a_hard_link_is_the_same_file(files):
    os.link(files / "models" / "ft.safetensors", files / "hard.safetensors")
    assert same_path(str(files / "hard.safetensors"), str(files / "models" / "ft.safetensors"))
    assert not same_path(str(files / "new.safetensors"), str(files / "models" / "ft.safetensors"))


def test_report_equal_to_the_output(files):
    out = str(files / "o.safetensors")
    message = refusal(
        [UserPath("--output", out), UserPath("--report", out)],
        [],
        UserPath("--work-dir", str(files / "w")),
    )
    assert message == f"{out}: --output and --report are the same file (choose another --report)"


def test_work_dir_equal_to_the_output_or_holding_an_input(files):
    out = str(files / "o.safetensors")
    assert refusal([UserPath("--output", out)], [], UserPath("--work-dir", out)) == (
        f"{out}: --work-dir is --output {out} (pass a new or empty directory as --work-dir)"
    )
    base = str(files / "models" / "base.safetensors")
    message = refusal(
        [UserPath("--output", out)],
        [UserPath("--source-model", base)],
        UserPath("--work-dir", str(files / "models")),
    )
    assert message == (
        f"{files / 'models'}: --work-dir holds --source-model {base} "
        "(pass a new or empty directory as --work-dir)"
    )


def test_an_output_inside_the_work_dir_is_allowed(files):
    check_paths(
        [UserPath("--output", str(files / "w" / "o.safetensors"))],
        [],
        UserPath("--work-dir", str(files / "w")),
    )


@pytest.mark.parametrize(
    "given, message",
    [
        ("", "--output is empty (give the output's file name)"),
        ("  ", "--output is empty (give the output's file name)"),
        ("out/", "--output out/ names a directory (give a file name inside it for --output)"),
    ],
)
def test_output_argument(given, message):
    with pytest.raises(UsageError) as caught:
        check_output_argument(given)
    assert str(caught.value) == message


def test_unwritable_report_location_fails_before_work(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputError) as caught:
        check_writable_location(str(tmp_path / "a_file" / "r.json"), "--report")
    assert str(caught.value) == (
        f"{tmp_path / 'a_file'}: cannot create the report directory (File exists) "
        "(choose a writable --report location)"
    )


def test_one_model_twice_is_named_absolute_as_typed_or_not(files, monkeypatch):
    monkeypatch.chdir(files)
    base = str(files / "models" / "base.safetensors")
    with pytest.raises(ModelMismatch) as caught:
        check_two_models("models/base.safetensors", base)
    assert caught.value.exit_code == 1
    assert str(caught.value) == (
        f"{base}: is the --source-model too ({base}): a model does not differ from itself "
        "(pass the fine-tuned checkpoint as --target-model)"
    )
    check_two_models("models/base.safetensors", "models/ft.safetensors")
