"""The checkout's ``pipeline/``, ``stages/`` and ``kernels/`` are reached only as loraforge's
subpackages: a bare ``import kernels`` with the checkout root on ``sys.path`` (as ``python -m
pytest`` from the root runs this suite) gets the installed package of that name, as
``transformers`` expects of Hugging Face's ``kernels``, or no module at all."""

import importlib
import os
import subprocess
import sys

import pytest

import loraforge.kernels
import loraforge.pipeline
import loraforge.stages

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
FOLDERS = ("pipeline", "stages", "kernels")


def _on_path(root: str) -> bool:
    return any(os.path.realpath(entry or os.curdir) == root for entry in sys.path)


def test_the_installed_loraforge_is_this_checkout_and_the_root_is_on_sys_path():
    # The situation under test: the suite runs from the root, which sits on sys.path.
    assert _on_path(ROOT)
    for package in (loraforge.kernels, loraforge.stages, loraforge.pipeline):
        folder = package.__name__.removeprefix("loraforge.")
        assert os.path.realpath(package.__file__) == os.path.join(ROOT, folder, "__init__.py")


@pytest.mark.parametrize("name", FOLDERS)
def test_a_bare_import_in_this_process_never_resolves_to_the_checkout_folder(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        assert str(error) == (
            f"No module named {name!r}: {os.path.join(ROOT, name)} is loraforge's own folder, "
            f"imported as loraforge.{name}, not a top-level package (Python put the checkout "
            f"root {ROOT} on sys.path because it was started there)"
        )
    else:
        assert not os.path.realpath(module.__file__).startswith(ROOT + os.sep)


def _python_in_root(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path  # after the script's directory, the root, on sys.path
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_an_installed_package_of_the_same_name_wins_over_each_folder(tmp_path):
    # Stand-ins for whatever the registry serves under these names (Hugging Face's `kernels`).
    for name in FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
        (tmp_path / name / "sub.py").write_text("WHAT = 'installed submodule'\n")
    code = (
        "import kernels, stages, pipeline, kernels.sub, loraforge.kernels\n"
        "print(kernels.WHO, stages.WHO, pipeline.WHO, kernels.sub.WHAT, sep='|')\n"
        "print(loraforge.kernels.SVD_METHODS['randomized'].name)\n"
    )
    done = _python_in_root(code, extra_path=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "installed kernels|installed stages|installed pipeline|installed submodule",
        "randomized",
    ]


def test_without_an_installed_package_the_bare_import_fails_in_one_line():
    done = _python_in_root(
        "try:\n    import stages\nexcept ModuleNotFoundError as e:\n    print(e.name, '|', e)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"stages | No module named 'stages': {os.path.join(ROOT, 'stages')} is loraforge's own "
        f"folder, imported as loraforge.stages, not a top-level package (Python put the "
        f"checkout root {ROOT} on sys.path because it was started there)\n"
    )


def test_transformers_imports_from_the_checkout_root():
    # transformers (pulled by peft, a test dependency) imports Hugging Face's `kernels` when it
    # is installed; from the root that used to find ours and fail.
    done = _python_in_root("import peft, transformers.integrations.hub_kernels; print('ok')")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"
