"""`medlvr recipes [NAME]`: the training recipes the package ships, by name."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from medlvr.cli._common import console, user_errors


def register(app: typer.Typer) -> None:
    app.command("recipes")(recipes)


@user_errors
def recipes(
    name: str | None = typer.Argument(
        None, help="A recipe's name (e.g. tiny/sft): print its YAML (to copy and edit)."
    ),
    path: bool = typer.Option(
        False, "--path", help="Print the recipe's file path instead (e.g. for --config_file)."
    ),
) -> None:
    """List the shipped recipes (`medlvr train sft --config tiny/sft` takes a name), or print one."""
    from medlvr.shipped import recipe_path, recipe_summary
    from medlvr.shipped import recipes as shipped

    if name is None:
        table = Table("name", "what it is", box=None, show_edge=False)
        for key, yaml_file in shipped().items():
            table.add_row(key, escape(recipe_summary(yaml_file)))
        console.print(table)
        return
    file = recipe_path(name)
    if file is None:
        raise ValueError(f"no shipped recipe {name!r}: {', '.join(shipped())}")
    if path:
        print(file)
    else:
        print(file.read_text(), end="")
