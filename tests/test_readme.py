"""The README's Python example runs as written, and the README and docs/ do not drift: every
relative link lands on a file and heading that exist, the README stays short, and every
`loraforge` command in a bash block uses subcommands and flags the CLI has."""

import glob
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^```.*?^```[^\n]*$", flags=re.S | re.M)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _name(path):
    return os.path.relpath(path, ROOT)


def test_the_python_api_example_runs(capsys):
    readme = _read(README)
    section = readme[readme.index("## Python API") :]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out == "['0.weight'] 4096\n"


def test_the_readme_is_short():
    assert os.path.getsize(README) < 15_000


def test_the_docs_pages_exist():
    assert len(PAGES) > 1, "docs/*.md"


def anchor(heading):
    """GitHub's anchor for a heading: lowercase, punctuation except '-' and '_' dropped, each
    space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text):
    """The anchors of a Markdown text's headings (not of '#' lines inside code blocks);
    a repeated heading gets '-1', '-2', ... as on GitHub."""
    found, seen = set(), {}
    for line in FENCE.sub("", text).split("\n"):
        m = re.match(r"^#{1,6} +(.+?) *#*$", line)
        if m:
            base = anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_anchor_rule():
    assert anchor("Python API: LoRAs on a live model") == "python-api-loras-on-a-live-model"
    assert anchor("`loraforge convert IN OUT`") == "loraforge-convert-in-out"
    assert anchor("fp8 and scaled-fp8 checkpoints") == "fp8-and-scaled-fp8-checkpoints"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def links(text):
    """The targets of a Markdown text's links, outside code blocks and code spans."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_point_at_existing_files_and_headings(page):
    bad = []
    for target in links(_read(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(resolved):
            bad.append(f"{target}: no file {_name(resolved)}")
        elif fragment and fragment not in anchors(_read(resolved)):
            bad.append(f"{target}: no heading #{fragment} in {_name(resolved)}")
    assert not bad, f"{_name(page)}: " + "; ".join(bad)


def commands(text):
    """Each `loraforge <command> ...` in a bash block: (line, command, flags), with backslash
    continuations joined and comments, quotes and shell operators handled as the shell would."""
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").split("\n"):
            if "loraforge " not in line:
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
            for i, token in enumerate(tokens):
                if token != "loraforge" or i + 1 == len(tokens):
                    continue
                words = []
                for word in tokens[i + 2 :]:
                    if word and all(c in "&|;<>()" for c in word):
                        break  # the end of this command: &&, ;, |, a redirection, ...
                    words.append(word)
                flags = [w.split("=")[0] for w in words if re.match(r"^--?[A-Za-z]", w)]
                found.append((" ".join(line.split()), tokens[i + 1], flags))
    return found


def test_commands_are_found_in_bash_blocks():
    text = (
        "```bash\nx && loraforge merge --a 1 \\\n  --b=2 >log # --c\n"
        "loraforge clean w; echo --d\n```\n"
    )
    assert commands(text) == [
        ("x && loraforge merge --a 1 --b=2 >log # --c", "merge", ["--a", "--b"]),
        ("loraforge clean w; echo --d", "clean", []),
    ]


@pytest.fixture(scope="module")
def cli():
    typer = pytest.importorskip("typer")
    from loraforge.pipeline.cli import app

    return typer.main.get_command(app)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_bash_blocks_use_commands_and_flags_the_cli_has(page, cli):
    found = commands(_read(page))
    bad = []
    for line, name, flags in found:
        command = cli.commands.get(name)
        if command is None:
            bad.append(f"no command {name!r}: {line}")
            continue
        options = {"--help"}
        for param in command.params:
            options.update(param.opts, param.secondary_opts)
        bad += [f"{name} has no {flag}: {line}" for flag in flags if flag not in options]
    assert not bad, f"{_name(page)}:\n" + "\n".join(bad)
    if page == README:
        assert {name for _line, name, _flags in found} >= set(cli.commands)


def test_the_module_map_names_every_package_and_module():
    """docs/architecture.md's tree is kept in step with the code: every package folder under
    pipeline/ and every module file of pipeline/, stages/ and kernels/ is named in it (by its
    file name, or for stages/ in the stage list)."""
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        doc = f.read()
    tree = doc[doc.index("### Where things live") : doc.index("### The parts")]
    missing = []
    for top in ("pipeline", "stages", "kernels"):
        for directory, _dirs, files in os.walk(os.path.join(ROOT, top)):
            if "__pycache__" in directory:
                continue
            folder = os.path.basename(directory)
            if (
                top == "pipeline"
                and directory != os.path.join(ROOT, top)
                and folder + "/" not in tree
            ):
                missing.append(os.path.relpath(directory, ROOT) + "/")
            for name in files:
                if not name.endswith(".py") or name == "__init__.py":
                    continue
                stem = name[:-3]
                if name not in tree and not re.search(rf"\b{re.escape(stem)}\b", tree):
                    missing.append(os.path.relpath(os.path.join(directory, name), ROOT))
    assert missing == []
