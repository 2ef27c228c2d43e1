"""Every package folder under pipeline/, stages/ and kernels/ is listed in pyproject.toml, so a
built wheel holds it (setuptools installs only the packages it is told about); the top of the
package, ``import loraforge``, is pipeline/api/."""

import os

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_lists_every_package_folder():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    found = {"loraforge"}  # pipeline/api/, mapped to the top of the package
    for top in ("pipeline", "stages", "kernels"):
        for directory, _dirs, files in os.walk(os.path.join(ROOT, top)):
            relative = os.path.relpath(directory, ROOT).replace(os.sep, "/")
            if "__init__.py" in files and relative != "pipeline/api":
                found.add("loraforge." + relative.replace("/", "."))
    assert sorted(setuptools["packages"]) == sorted(found)
    assert setuptools["package-dir"] == {
        "loraforge": "pipeline/api",
        "loraforge.pipeline": "pipeline",
        "loraforge.stages": "stages",
        "loraforge.kernels": "kernels",
    }
