"""``import loraforge`` is light; the API's names load on first use; importing the command line
leaves the garbage collector as it found it."""

import subprocess
import sys


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_api_loads_on_first_use_and_import_loraforge_does_not_load_torch():
    out = run(
        "import sys, loraforge\n"
        "print('torch' in sys.modules)\n"
        "print(loraforge.apply.__module__, loraforge.LoraSet.__module__)\n"
        "from loraforge import AppliedLoras\n"
        "print(AppliedLoras.__name__, sorted(set(loraforge.__all__) - set(dir(loraforge))))\n"
        "try:\n"
        "    loraforge.nothing\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    assert out.splitlines() == [
        "False",
        "loraforge.pipeline.apply.handle loraforge.pipeline.apply.loraset",
        "AppliedLoras []",
        "module 'loraforge' has no attribute 'nothing'",
    ]


def test_importing_the_command_line_leaves_the_collector_as_it_was():
    assert run("import gc, loraforge.pipeline.cli; print(gc.isenabled())") == "True"
    assert run("import gc; gc.disable(); import loraforge.pipeline.cli; print(gc.isenabled())") == (
        "False"
    )
