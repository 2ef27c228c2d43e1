"""The one line a command's interrupt ends with: what it keeps, and what to rerun."""

from __future__ import annotations

import pytest

from loraforge.pipeline.console import Failed, user_errors


@pytest.mark.parametrize(
    "command, line",
    [
        ("inspect", "interrupted; nothing was written"),
        ("convert", "interrupted; nothing was written"),
        (None, "interrupted; nothing was written"),
        ("clean", "interrupted before clean finished (run clean again)"),
        (
            "extract",
            "interrupted; finished tensors are kept in the work directory (rerun the same "
            "command to resume)",
        ),
    ],
)
def test_an_interrupt_says_what_the_command_keeps(capsys, command, line):
    with pytest.raises(Failed) as failed:
        with user_errors(command=command):
            raise KeyboardInterrupt
    assert failed.value.exit_code == 130
    assert capsys.readouterr().err == f"error: {line}\n"
