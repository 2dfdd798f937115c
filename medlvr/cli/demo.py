"""`medlvr demo`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach `medlvr demo` to the main app (added by its issue)."""
