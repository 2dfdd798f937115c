"""`medlvr.cli._options`: command-line options generated from a config dataclass (issue 16, item 5)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

from medlvr.cli import app as cli_app
from medlvr.cli._common import user_errors
from medlvr.cli._options import RANGE, Knobs, config_options, field_docs, grammar_for

runner = CliRunner()


@dataclass
class Toy:
    """A config with one field of each kind."""

    n: int = 3
    """How many things, a
    docstring over two lines."""
    rate: float = 0.5
    """A fraction."""
    mode: Literal["fast", "slow"] = "fast"
    """Which way."""
    span: tuple[int, int] = (1, 3)
    """An inclusive range."""
    seeds: list[int] = field(default_factory=list)
    """Seeds (empty = one)."""
    weights: dict[str, float] = field(default_factory=lambda: {"a": 1.0})
    """Name -> weight."""
    label: str | None = None
    """An optional label."""
    verbose: bool = False
    """Say more."""
    undocumented: int = 0

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"n must be positive, got {self.n}")


def _app() -> tuple[typer.Typer, list[Toy]]:
    built: list[Toy] = []
    toy_app = typer.Typer()

    @toy_app.command()
    @config_options(Toy, grammars={"span": RANGE}, aliases={"rate": ["--r"]})
    @user_errors
    def run(
        knobs: Knobs, out: str = typer.Option("here", "--out", help="A command's own option.")
    ) -> None:
        """Build a Toy."""
        built.append(knobs.build())

    return toy_app, built


def test_field_docs_are_the_strings_under_each_field_on_one_line():
    docs = field_docs(Toy)
    assert docs["n"] == "How many things, a docstring over two lines."
    assert docs["mode"] == "Which way." and "undocumented" not in docs


def test_help_lists_each_field_with_its_docstring_and_default():
    toy_app, _ = _app()
    res = runner.invoke(toy_app, ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for flag, doc in (("--n", "How many things, a docstring over two lines."), ("--rate", "A fraction."), ("--span", "An inclusive range."),
                      ("--verbose", "Say more."), ("--out", "A command's own option.")):  # fmt: skip
        line = next(
            line for line in res.output.splitlines() if f" {flag} " in line or f" {flag}," in line
        )
        assert doc in line, line
    assert (
        "[default: 3]" in res.output
        and "[default: 1-3]" in res.output
        and "[default: a=1.0]" in res.output
    )
    assert "fast|slow" in res.output and "--r " in res.output and "--undocumented" in res.output


def test_options_not_given_keep_the_dataclass_defaults_and_given_ones_are_parsed():
    toy_app, built = _app()
    assert runner.invoke(toy_app, []).exit_code == 0
    assert built[-1] == Toy()
    args = ["--n", "7", "--r", "0.25", "--mode", "slow", "--span", "2-4", "--seeds", "1,2", "--weights", "a=2,b=0.5",
            "--label", "x", "--verbose"]  # fmt: skip
    res = runner.invoke(toy_app, args)
    assert res.exit_code == 0, res.output
    assert built[-1] == Toy(
        n=7,
        rate=0.25,
        mode="slow",
        span=(2, 4),
        seeds=[1, 2],
        weights={"a": 2.0, "b": 0.5},
        label="x",
        verbose=True,
    )


@pytest.mark.parametrize("args, message", [
    (["--n", "x"], "error: --n: expected an integer, got 'x'"),
    (["--r", "fast"], "error: --rate: expected a number, got 'fast'"),
    (["--mode", "medium"], "error: --mode: expected one of fast, slow, got 'medium'"),
    (["--span", "1..3"], "error: --span: expected a range 'LO-HI' or one number 'N', got '1..3'"),
    (["--seeds", "1,b"], "error: --seeds: expected an integer, got 'b'"),
    (["--weights", "a"], "error: --weights: expected KEY=VALUE pairs separated by commas, got 'a'"),
    (["--n", "0"], "error: n must be positive, got 0"),  # the dataclass's own check
])  # fmt: skip
def test_a_bad_value_fails_in_one_line_with_exit_code_2(args, message):
    toy_app, built = _app()
    res = runner.invoke(toy_app, args)
    assert res.exit_code == 2 and not built
    assert [line for line in res.output.splitlines() if line.strip()] == [message]


def test_fixed_tuples_and_misuse_are_caught():
    assert grammar_for(tuple[int, int]).parse("1,2") == (1, 2)
    with pytest.raises(ValueError, match="expected 2 values"):
        grammar_for(tuple[int, int]).parse("1")
    with pytest.raises(TypeError, match="no command-line grammar"):
        grammar_for(set[int])
    with pytest.raises(TypeError, match="no field"):
        config_options(Toy, exclude=("nope",))
    with pytest.raises(TypeError, match="also fields"):
        config_options(Toy)(lambda knobs, n=1: None)


@pytest.mark.parametrize("command, schema, excluded", [
    (["data", "synth"], "medlvr.data.synth:SynthConfig", ()),
    (["demo"], "medlvr.recipes.demo_config:DemoConfig", ("sft_overrides", "progress")),
    (["demo", "backbone"], "medlvr.recipes.stage0:Stage0Config", ()),
    (["serve"], "medlvr.config:ServeConfig", ()),
])  # fmt: skip
def test_every_config_field_is_an_option_of_its_command(command, schema, excluded):
    import importlib

    module, name = schema.split(":")
    cls = getattr(importlib.import_module(module), name)
    res = runner.invoke(cli_app, [*command, "--help"], env={"COLUMNS": "240"})
    assert res.exit_code == 0, res.output
    flags = {
        flag for word in res.output.split() for flag in word.split(",") if flag.startswith("--")
    }
    for f in dataclasses.fields(cls):
        assert (f"--{f.name.replace('_', '-')}" in flags) == (f.name not in excluded), f.name
