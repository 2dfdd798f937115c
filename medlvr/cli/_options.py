"""Command-line options generated from a config dataclass, so that a knob is declared once.

A field's type, default and attribute docstring (the string right under it, as in litgpt's
`TrainArgs`) become its `--option`, its parser, the `[default: ...]` shown by `--help` and its
help text. A command asks for them with `@config_options(SomeConfig)` and a `knobs: Knobs`
parameter, then builds the config with `knobs.build()`:

    @app.command("serve")
    @config_options(ServeConfig)
    @user_errors
    def serve(knobs: Knobs, model: Path = typer.Option(...)) -> None:
        cfg = knobs.build()  # a bad value: `error: --port: expected an integer, got 'x'`, exit 2

Options the user did not give keep the dataclass default; validation stays in the dataclass's
`__post_init__`. Every option but a boolean flag is read as text and parsed here (not by click),
so a bad value is one `error:` line through `user_errors` like any other bad input.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import linecache
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import typer
from rich.markup import escape

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Grammar:
    """How an option's text becomes a field value, and how a value is written back (defaults in `--help`)."""

    metavar: str
    parse: Callable[[str], Any]
    """Text -> value; a `ValueError` says what was expected (the flag is prefixed by `Knobs.build`)."""
    show: Callable[[Any], str] = str


def _scalar(kind: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text.strip())
        except ValueError:
            raise ValueError(f"expected {what}, got {text!r}") from None

    return parse


def _parse_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not (lo.strip().isdigit() and (not sep or hi.strip().isdigit())):
        raise ValueError(f"expected a range 'LO-HI' or one number 'N', got {text!r}")
    return int(lo), int(hi if sep else lo)


RANGE = Grammar("LO-HI", _parse_range, lambda v: f"{v[0]}-{v[1]}")
"""An inclusive integer range `LO-HI` (or `N` for `N-N`), e.g. chain depths `1-3`."""


def grammar_for(tp: Any) -> Grammar:
    """The grammar of a field type: numbers, text, paths, `Literal` choices, comma-separated
    lists and tuples, `KEY=VALUE,...` mappings; `X | None` reads as `X` (None is only a default)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return grammar_for(rest[0])
    elif tp is int:
        return Grammar("<int>", _scalar(int, "an integer"))
    elif tp is float:
        return Grammar("<float>", _scalar(float, "a number"))
    elif tp is str:
        return Grammar("<str>", str)
    elif tp is Path:
        return Grammar("<path>", Path)
    elif origin is Literal:
        choices = {str(a): a for a in args}

        def choose(text: str) -> Any:
            if text not in choices:
                raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
            return choices[text]

        return Grammar("|".join(choices), choose)
    elif (
        origin in (list, tuple)
        and args
        and (origin is list or args[-1] is Ellipsis or len(set(args)) == 1)
    ):
        item = grammar_for(args[0])
        size = len(args) if origin is tuple and args[-1] is not Ellipsis else None

        def items(text: str) -> Any:
            values = [item.parse(p) for p in text.split(",") if p.strip()]
            if size is not None and len(values) != size:
                raise ValueError(f"expected {size} values separated by commas, got {text!r}")
            return origin(values)

        return Grammar(f"{item.metavar},...", items, lambda v: ",".join(item.show(x) for x in v))
    elif origin is dict and args and args[0] is str:
        value = grammar_for(args[1])

        def mapping(text: str) -> dict[str, Any]:
            out = {}
            for part in (p.strip() for p in text.split(",") if p.strip()):
                key, sep, raw = part.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"expected KEY=VALUE pairs separated by commas, got {text!r}")
                out[key.strip()] = value.parse(raw)
            return out

        return Grammar(
            f"KEY={value.metavar},...",
            mapping,
            lambda v: ",".join(f"{k}={value.show(x)}" for k, x in v.items()),
        )
    raise TypeError(f"no command-line grammar for {tp!r}: give the field one in `grammars`")


def _class_body(cls: type) -> list[ast.stmt]:
    """The statements of a top-level class, parsed from its own lines only.

    `inspect.getsource` parses the whole module per class to find it (tens of ms for
    medlvr/data/synth.py, most of the command line's start-up); the class's block, found by
    its `class` line and cut by `inspect.getblock` as getsource does, is a tenth of that.
    """
    lines = linecache.getlines(inspect.getsourcefile(cls) or "")
    start = next(i for i, line in enumerate(lines) if re.match(rf"class {cls.__name__}\b", line))
    node = ast.parse("".join(inspect.getblock(lines[start:]))).body[0]
    assert isinstance(node, ast.ClassDef)
    return node.body


def field_docs(schema: type) -> dict[str, str]:
    """Field name -> its attribute docstring on one line (base classes first, so a subclass's wins)."""
    docs: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        body = _class_body(cls)
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):  # fmt: skip
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return ...


@dataclass(frozen=True)
class _Knob:
    flag: str
    grammar: Grammar | None
    """None for a boolean (`--x/--no-x`, parsed by click: it cannot be malformed)."""


class Knobs:
    """The options of one config dataclass that the user gave, still as text until `build`."""

    def __init__(self, schema: type, knobs: Mapping[str, _Knob], given: Mapping[str, Any]) -> None:
        self.schema, self._knobs, self._given = schema, knobs, dict(given)

    def given(self, name: str) -> bool:
        """Whether the user set the field `name` (else it keeps the dataclass default)."""
        return name in self._given

    def build(self, **fixed: Any) -> Any:
        """The config: the given options parsed (a bad one is a `ValueError` naming its flag), the
        `fixed` values set by the command itself, the dataclass defaults for the rest."""
        values: dict[str, Any] = {}
        for name, raw in self._given.items():
            knob = self._knobs[name]
            if name in fixed:
                raise ValueError(
                    f"{knob.flag} cannot be combined with the option of this command that sets it"
                )
            if knob.grammar is None:
                values[name] = raw
                continue
            try:
                values[name] = knob.grammar.parse(raw)
            except ValueError as err:
                raise ValueError(f"{knob.flag}: {err}") from None
        return self.schema(**values, **fixed)


def config_options(
    schema: type,
    *,
    exclude: Sequence[str] = (),
    grammars: Mapping[str, Grammar] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> Callable[[F], F]:
    """Add an option `--field-name` per init field of the dataclass `schema` to a command that
    takes `knobs: Knobs`. `exclude` leaves fields to their defaults (or to the command),
    `grammars` replaces a field's type grammar (e.g. `RANGE`), `aliases` keeps older flag names."""
    grammars, aliases = dict(grammars or {}), dict(aliases or {})
    hints = typing.get_type_hints(schema)
    docs = field_docs(schema)
    fields = [f for f in dataclasses.fields(schema) if f.init and f.name not in exclude]
    unknown = (set(grammars) | set(aliases) | set(exclude)) - {
        f.name for f in dataclasses.fields(schema)
    }
    if unknown:
        raise TypeError(f"{schema.__name__} has no field(s) {sorted(unknown)}")

    def decorate(fn: F) -> F:
        own = inspect.signature(fn)
        own_hints = typing.get_type_hints(fn)
        if "knobs" not in own.parameters:
            raise TypeError(f"{fn.__name__} must take a `knobs: Knobs` parameter")
        params = [
            p.replace(annotation=own_hints.get(p.name, p.annotation))
            for p in own.parameters.values()
            if p.name != "knobs"
        ]
        clash = {p.name for p in params} & {f.name for f in fields}
        if clash:
            raise TypeError(
                f"{fn.__name__}: parameter(s) {sorted(clash)} are also fields of {schema.__name__}"
            )
        knobs: dict[str, _Knob] = {}
        shown: dict[str, Any] = {}  # field -> the default typer passes when the option is not given
        for f in fields:
            flag = "--" + f.name.replace("_", "-")
            default, help_text = _default(f), escape(docs.get(f.name, ""))
            if hints[f.name] is bool:
                knobs[f.name] = _Knob(flag, None)
                shown[f.name] = default
                option = typer.Option(default, f"{flag}/--no-{flag[2:]}", help=help_text)
                annotation: Any = bool
            else:
                grammar = grammars.get(f.name) or grammar_for(hints[f.name])
                knobs[f.name] = _Knob(flag, grammar)
                # The default is shown as text; a value not from the command line is never parsed.
                shown[f.name] = default if default in (None, ...) else grammar.show(default)
                option = typer.Option(
                    shown[f.name],
                    flag,
                    *aliases.get(f.name, ()),
                    metavar=grammar.metavar,
                    help=help_text,
                )
                annotation = str | None
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
                )
            )

        def command(**kwargs: Any) -> Any:
            # A value other than the shown default was given; the default itself stays the field's.
            values = {name: kwargs.pop(name) for name in knobs}
            given = {name: v for name, v in values.items() if v != shown[name]}
            return fn(knobs=Knobs(schema, knobs, given), **kwargs)

        command.__name__, command.__qualname__, command.__doc__ = (
            fn.__name__,
            fn.__qualname__,
            fn.__doc__,
        )
        command.__module__ = fn.__module__
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return decorate
