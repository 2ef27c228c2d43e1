"""Option sets expanded into a command's signature: what typer sees, what the command gets."""

import inspect
from dataclasses import dataclass
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from loraforge.pipeline.cli.parameters import OptionSet, expand


@dataclass(frozen=True)
class Pair:
    left: int
    right: str


PAIR = OptionSet(
    "pair",
    Pair,
    {
        "left": (Annotated[int, typer.Option("--left")], 1),
        "right": (Annotated[str, typer.Option("--right")], "r"),
    },
)


def test_the_set_replaces_its_parameter_where_it_stands():
    @expand(PAIR)
    def command(first: str, pair: Pair = None, last: bool = False) -> tuple:
        return first, pair, last

    names = list(inspect.signature(command).parameters)
    assert names == ["first", "left", "right", "last"]
    assert command.__annotations__["left"] == PAIR.options["left"][0]
    assert command(first="a", left=5, right="x", last=True) == ("a", Pair(5, "x"), True)


def test_typer_parses_the_expanded_options():
    app = typer.Typer()

    @app.command()
    @expand(PAIR)
    def command(pair: Pair = None) -> None:
        print(pair)

    assert CliRunner().invoke(app, ["--left", "7"]).output == "Pair(left=7, right='r')\n"


def test_only_keeps_the_named_options_fixes_others_and_replaces_some():
    other = (Annotated[int, typer.Option("--other-left")], 3)
    subset = PAIR.only("left", fixed={"right": "fixed"}, left=other)
    assert dict(subset.options) == {"left": other}
    assert subset.build(**subset.fixed, left=4) == Pair(4, "fixed")


def test_only_refuses_names_the_set_does_not_have():
    with pytest.raises(ValueError, match="not options of this set"):
        PAIR.only("left", "middle")
    with pytest.raises(ValueError, match="not options of this set"):
        PAIR.only("left", right=(int, 0))  # replaced but not kept


def test_a_command_without_the_sets_parameter_is_refused():
    with pytest.raises(TypeError, match="command has no parameter pair"):

        @expand(PAIR)
        def command(first: str) -> None:
            pass
