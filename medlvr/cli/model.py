"""`medlvr model ...`: build and inspect backbones."""

from __future__ import annotations

from pathlib import Path

import typer

from medlvr.cli._common import console, user_errors

app = typer.Typer(no_args_is_help=True, help="Build and inspect backbones.")


@app.command("init-tiny")
@user_errors
def init_tiny(
    out: Path = typer.Option(..., "--out", help="Folder to write the model to."),
    family: str = typer.Option("qwen2_5_vl", help="Backbone family (see `medlvr model families`)."),
    size: str = typer.Option(
        "tiny",
        help="tiny (~0.2M), mini (~1.2M, the demo), small (~3.6M) or medium (~24M parameters).",
    ),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into an --out folder that holds something else (a model)."
    ),
) -> None:
    """Write a randomly initialised backbone of the real class, with an offline tokenizer and processor."""
    from medlvr.model.backbones import get_adapter
    from medlvr.model.tiny import SPECS, build_tiny

    get_adapter(family)  # a clear error for an unknown family, before any work
    if size not in SPECS:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SPECS)}")
    from medlvr.rundir import claim_output

    claim_output(out, "model init-tiny", overwrite=overwrite, mark=True)
    path = build_tiny(out, family=family, size=size, seed=seed)  # type: ignore[arg-type]
    n = count_parameters(path)
    console.print(f"wrote {family} ({size}, {n / 1e6:.2f}M parameters) to {path}")


def count_parameters(path: Path) -> int:
    """Parameters stored in a model folder's safetensors files (read from the headers only)."""
    from math import prod

    from safetensors import safe_open

    n = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            n += sum(prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118 - a safe_open handle is no mapping
    return n


@app.command("families")
def list_families() -> None:
    """List the supported backbone families."""
    from medlvr.model.backbones import families

    for f in families():
        console.print(f)
