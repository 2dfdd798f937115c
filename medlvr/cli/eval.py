"""`medlvr eval ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="Evaluate models on medical VQA benchmarks.")
