"""`medlvr explain`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach `medlvr explain` to the main app (added by its issue)."""
