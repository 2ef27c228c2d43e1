"""The console script leaves through ``os._exit`` once the command is done: exit handlers and
buffered output must still reach the user, and the exit code stay what ``sys.exit`` meant."""

import subprocess
import sys

import pytest

PROGRAM = """
import atexit, sys
from loraforge.pipeline.cli.app import _exit_now
atexit.register(lambda: print("handler ran", file=sys.stderr))
print("buffered, no newline", end="")
_exit_now({code!r})
"""


@pytest.mark.parametrize(
    "code,exit_code,message",
    [(0, 0, ""), (3, 3, ""), (None, 0, ""), ("bad input", 1, "bad input\n")],
)
def test_a_finished_command_exits_with_its_code_and_its_output_flushed(code, exit_code, message):
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(code=code)], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout) == (exit_code, "buffered, no newline")
    assert done.stderr == message + "handler ran\n"
