"""User-facing errors: the command line prints these as one line and exits with code 2."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class MedlvrError(ValueError):
    """A problem with the user's input (arguments, files, configuration), not a bug."""


class ImageError(MedlvrError):
    """An image file that cannot be read: unknown format, truncated, corrupt or too large."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def not_a_file(path: str | Path, what: str = "image") -> str:
    """Why `path` is no `what` file: `{what} not found: path`, or what the thing there is."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return f"{what} not found: {path}"
    kind = next((name for test, name in _KINDS if test(mode)), None)
    return (
        f"{path} is {kind}, not {'an' if what[0] in 'aeiou' else 'a'} {what} file"
        if kind
        else f"{what} not found: {path}"
    )
