"""Shared command-line plumbing: user errors become one red line and exit code 2."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True)
"""Console for errors and warnings: pass text from messages, files or models through `escape`."""
console = Console()
F = TypeVar("F", bound=Callable[..., Any])

# Errors that mean "bad input", never a bug: shown without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    IsADirectoryError,
    PermissionError,
    OSError,
)


def user_errors(fn: F) -> F:
    """Wrap a command so that bad input prints `error: ...` and exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except USER_ERRORS as err:
            # The message is text, not markup: `medlvr[web]` or a file `scan[web].jsonl` print as is.
            err_console.print(
                f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


ALLOW_PICKLE = typer.Option(
    False,
    "--allow-pickle",
    help="Load a model folder whose weights are pickle only (pytorch_model.bin): unpickling runs code, so only for trusted files.",
)
"""The one `--allow-pickle` of the commands that load a model."""
