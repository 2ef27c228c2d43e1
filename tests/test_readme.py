"""The README's Python example runs as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_python_api_example_runs(capsys):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Python API") :]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out == "['0.weight'] 4096\n"
