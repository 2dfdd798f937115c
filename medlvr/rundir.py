"""Run folders (a training `output_dir`, an evaluation `--out`): one run writes a folder at a time.

`run_folder(folder, flag)` holds an exclusive lock on `folder/.medlvr.lock` while a run
writes there. The lock file names its holder (process id, host, command, start time),
so a second run into the same folder is refused at once, with one line naming the
first, instead of both exiting 0 with rows or checkpoints lost. The lock is the
operating system's (`flock`): it goes with its process however the process ends
(`kill -9` included), so a crashed run never leaves a stale lock behind. A process
that already holds a folder's lock takes it again freely (nested calls).

Under torchrun / accelerate launch only rank 0 takes the lock, and where a process group
is already initialised every rank learns rank 0's verdict, so the whole launch stops
with the same line.

`claim_output` is the one rule of every command that writes (eval, training, explain, data
synth/convert/ground/inspect, model init-tiny, the demo): it writes into a folder that is new
or holds its own earlier output (a marker file it wrote, `.medlvr-output.json`, or the files
it recognises as its own), never onto one of its inputs; an existing file or a folder of
other files is replaced only with `--overwrite`. Otherwise one line names the path and the
flag, and nothing is changed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from inspect import signature
from pathlib import Path
from typing import Any, TypeVar

from medlvr.errors import MedlvrError

LOCK_FILE = ".medlvr.lock"
OUTPUT_MARKER = ".medlvr-output.json"  # names the command whose output a folder holds
F = TypeVar("F", bound=Callable[..., Any])

_held: dict[Path, list[Any]] = {}  # folder -> [open lock file, depth]: the locks this process holds
_guard = threading.Lock()


class FolderBusy(MedlvrError):
    """Another run is writing the folder."""


def writable_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Create `folder` if needed and check that files can be written there (before any model loads)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MedlvrError(f"cannot write the {what} {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".medlvr-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise MedlvrError(f"cannot write the {what} {folder}: {err.strerror or err}") from None
    return folder


def claim_output(
    path: str | Path,
    command: str,
    *,
    overwrite: bool = False,
    file: bool = False,
    inputs: Iterable[str | Path | None] = (),
    writes: Iterable[str] = (),
    own: Callable[[Path], bool] | None = None,
    flag: str = "--out",
    overwrite_flag: str = "--overwrite",
    mark: bool = False,
) -> Path:
    """May `command` write `path`? The one rule of every command that writes (module docstring).

    `file`: `path` is a file the command writes (with its siblings named in `writes`, e.g. a
    figure's JSON), its own when the marker of its folder lists it under `command` (the
    command calls `mark_output(folder, command, files)` once written); else a folder, inside
    which it writes the names (fnmatch patterns) in `writes`, its own when its marker names
    `command` or `own(folder)` holds (hidden lock and marker files alone leave it new). No
    written path may be (or hold) one of `inputs`, even with `overwrite`. Raises a one-line
    `MedlvrError` (nothing written); with `mark`, creates the folder and writes its marker.
    """
    path, writes = Path(path), tuple(writes)
    targets = [path, *(path.with_name(n) for n in writes)] if file else [path]
    for p in (Path(i) for i in inputs if i not in (None, "")):
        hit = next((t for t in targets if _same_or_inside(p, t, None if file else writes)), None)
        if hit is not None:
            raise MedlvrError(
                f"{flag} {path} would write onto the input {p}: choose another {flag}"
            )
    if file:
        if path.is_dir():
            raise MedlvrError(f"{flag} {path} is a folder; give a file name")
        marked = _marker(path.parent).get("files", {})
        existing = [
            t for t in targets if (t.exists() or t.is_symlink()) and marked.get(t.name) != command
        ]
        if existing and not overwrite:
            shown = " and ".join(str(t) for t in existing)
            verb, it = ("exist", "them") if len(existing) > 1 else ("exists", "it")
            raise MedlvrError(
                f"{shown} {verb}: pass {overwrite_flag} to replace {it}, or choose another {flag}"
            )
        return path
    if path.exists() and not path.is_dir():
        raise MedlvrError(f"cannot write the folder of {flag} {path}: it is a file, not a folder")
    others = _foreign(path, command, own)
    if others and not overwrite:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise MedlvrError(
            f"{flag} {path} holds files that are not {command}'s output ({shown}): pass {overwrite_flag} "
            f"to write over them, or choose another {flag}"
        )
    if mark:
        mark_output(path, command)
    return path


def mark_output(folder: str | Path, command: str, files: Iterable[str | Path] = ()) -> None:
    """Record in `folder` (created if needed) that it holds `command`'s output, or with `files`,
    that those files of it are `command`'s."""
    folder = writable_folder(folder)
    marker = _marker(folder)
    if files:
        marker["files"] = {**marker.get("files", {}), **{Path(f).name: command for f in files}}
    else:
        marker["command"] = command
    (folder / OUTPUT_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")


def _marker(folder: Path) -> dict[str, Any]:
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) and isinstance(marker.get("files", {}), dict) else {}


def _foreign(folder: Path, command: str, own: Callable[[Path], bool] | None) -> list[str]:
    """Names in `folder` that are not `command`'s output ([] for a new, empty or own folder)."""
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".medlvr"))
    if not names or (own is not None and own(folder)) or _marker(folder).get("command") == command:
        return []
    return names


def _same_or_inside(p: Path, target: Path, names: Iterable[str] | None) -> bool:
    """Whether input `p` is `target` or lies inside it (for a folder: is or lies in one of `names` there)."""
    import fnmatch

    p, target = p.resolve(), target.resolve()
    if names is None:  # a file: the input, inside it, or a file of an input folder
        return p == target or target in p.parents or (target.exists() and p in target.parents)
    if target not in p.parents:
        return False
    first = p.relative_to(target).parts[0]
    return any(fnmatch.fnmatch(first, n) for n in names)


@contextlib.contextmanager
def run_folder(
    folder: str | Path,
    flag: str,
    *,
    main: bool | None = None,
    check: Callable[[], Any] | None = None,
) -> Iterator[Path]:
    """Hold `folder`'s lock for the duration (see the module docstring); creates the folder.

    `flag` names the setting that chooses the folder (`--out`, `output_dir`) in the message.
    `main` (default: rank 0 of the launch) is whether this process takes the lock, and runs
    `check` (e.g. a `claim_output`) once it holds it; every rank learns its verdict. A folder
    this call created is removed again if the run leaves nothing in it.
    """
    folder = Path(folder)
    created = not folder.exists()
    takes = _rank() == 0 if main is None else main
    error: tuple[bool, str] | None = None  # (busy, message)
    if takes:
        try:
            writable_folder(folder, f"folder of {flag}")
            _acquire(folder.resolve(), flag)
            try:
                if check is not None:
                    check()
            except MedlvrError:
                _release(folder.resolve())
                raise
        except MedlvrError as err:
            error = (isinstance(err, FolderBusy), str(err))
    error = _agree(error)
    if error is not None:
        with contextlib.suppress(OSError):
            if takes and created and not any(folder.iterdir()):
                folder.rmdir()
        raise (FolderBusy if error[0] else MedlvrError)(error[1])
    try:
        yield folder
    finally:
        if takes:
            _release(folder.resolve())
            with contextlib.suppress(OSError):
                if created and not any(folder.iterdir()):
                    folder.rmdir()


def holds_run_folder(
    folder_of: Callable[[dict[str, Any]], str | Path],
    flag: str,
    check: Callable[[dict[str, Any]], Any] | None = None,
) -> Callable[[F], F]:
    """Decorate a function that writes a run folder: `folder_of(arguments by name)` names the folder,
    `check(arguments by name)` runs on the main process once it holds the lock (`run_folder`).

    An explicit `rank` argument other than 0 (an unsynchronised shard) does not take the lock.
    """

    def wrap(fn: F) -> F:
        sig = signature(fn)

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            rank = bound.arguments.get("rank")
            named = bound.arguments
            with run_folder(folder_of(named), flag, main=None if rank is None else rank == 0,
                            check=None if check is None else functools.partial(check, named)):  # fmt: skip
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def check_launch(num_processes: int, kind: object = None) -> None:
    """Stop a launch whose processes did not join one group: `WORLD_SIZE` (set by torchrun and
    accelerate launch) differs from the processes accelerate counts. Each would run alone (rank 0 of
    a world of one) and write the same folder, e.g. `accelerate launch` with a GPU config (FSDP) on
    a machine without GPUs."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched != num_processes:
        raise MedlvrError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate joined {num_processes} "
            f"({kind}): each would run alone on the same folder; without GPUs launch with torchrun --nproc_per_node "
            f"{launched} or accelerate launch --multi_gpu --num_processes {launched}"
        )


def holder(folder: str | Path) -> dict[str, Any]:
    """What the lock file of `folder` says about the run holding it ({} if nothing readable)."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------- the lock itself


def _acquire(folder: Path, flag: str) -> None:
    with _guard:
        if folder in _held:
            _held[folder][1] += 1
            return
        path = folder / LOCK_FILE
        while True:
            fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run's lifetime
            if not _try_lock(fh):
                fh.close()
                raise FolderBusy(_busy_message(folder, flag))
            try:  # a holder that just released may have deleted the file we opened: lock the current one
                same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}))  # fmt: skip
        fh.flush()
        _held[folder] = [fh, 1]


def _release(folder: Path) -> None:
    with _guard:
        entry = _held.get(folder)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[folder]
        fh = entry[0]
        with contextlib.suppress(OSError):
            (folder / LOCK_FILE).unlink()  # while still locked: the next run creates a fresh file
        fh.close()  # closing the file releases the lock


def _try_lock(fh: Any) -> bool:
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _busy_message(folder: Path, flag: str) -> str:
    info = holder(folder)
    who = (
        f"process {info['pid']} on {info.get('host', '?')}" if "pid" in info else "another process"
    )
    what = f" ({info['command']})" if info.get("command") else ""
    since = f", started {info['started']}" if info.get("started") else ""
    return f"{folder} is in use by another run: {who}{what}{since}; wait for it to end or choose another {flag}"


def _command() -> str:
    args = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    text = " ".join(args)
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------------------- launches


def _rank() -> int:
    """This process's rank: the process group's if one is initialised, else the launcher's RANK."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def _agree(error: Any) -> Any:
    """Rank 0's verdict on every rank, when a process group is there to tell them."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = [
    "LOCK_FILE",
    "OUTPUT_MARKER",
    "claim_output",
    "mark_output",
    "FolderBusy",
    "run_folder",
    "holds_run_folder",
    "holder",
    "writable_folder",
    "check_launch",
]
