"""Helpers shared by the benchmark converters: release files, answers, options, embedded images."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from medlvr.data.schema import LETTERS
from medlvr.errors import MedlvrError

YES_NO = frozenset({"yes", "no"})
# A release's own answer type, lower-cased -> medlvr's (releases that state one).
ANSWER_KINDS: dict[str, Literal["open", "closed"]] = {"open": "open", "closed": "closed"}
_PREFIX = re.compile(r"^\s*\(?([A-J])\s*[:.)]\s*")


class SourceError(MedlvrError):
    """A benchmark release that cannot be converted: missing file, unknown split, inconsistent record."""


def release_file(root: Path, rel: str, dataset: str) -> Path:
    """`root / rel`, or a `SourceError` that says which release file is missing."""
    path = Path(root) / rel
    if not path.is_file():
        raise SourceError(
            f"{dataset}: release file not found: {path} (is --root the unpacked release folder?)"
        )
    return path


def read_json(path: Path, dataset: str) -> Any:
    """A release's JSON file, or a `SourceError` that names the file and where it breaks."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise SourceError(
            f"{dataset}: {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from None
    except UnicodeDecodeError as err:
        raise SourceError(
            f"{dataset}: {path} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except OSError as err:
        raise SourceError(f"{dataset}: cannot read {path}: {err.strerror or err}") from None


def release_glob(root: Path, pattern: str, dataset: str) -> list[Path]:
    """Files matching `pattern` under `root`, sorted; a `SourceError` if there are none."""
    found = sorted(Path(root).glob(pattern))
    if not found:
        raise SourceError(f"{dataset}: no release file matches {pattern!r} under {root}")
    return found


def pick_splits(
    split: str | None, known: Sequence[str], dataset: str, aliases: dict[str, str] | None = None
) -> list[str]:
    """All known splits for `None`, else the one asked for (after aliases), or a `SourceError`."""
    if split is None:
        return list(known)
    name = (aliases or {}).get(split, split)
    if name not in known:
        raise SourceError(f"{dataset}: unknown split {split!r}; known: {', '.join(known)}")
    return [name]


def text(value: Any) -> str:
    """Release values as clean text: integers become strings, surrounding whitespace goes."""
    return "" if value is None else str(value).strip()


def is_yes_no(answer: str) -> bool:
    return answer.strip().lower() in YES_NO


def open_or_closed(answer: str) -> Literal["closed", "open"]:
    """For releases without an answer type: yes/no answers are closed, the rest open."""
    return "closed" if is_yes_no(answer) else "open"


def strip_prefix(option: str, letter: str) -> str:
    """'A:Diffuse uptake' -> 'Diffuse uptake', only when the prefix is this option's own letter."""
    m = _PREFIX.match(option)
    return option[m.end() :].strip() if m and m.group(1) == letter else option.strip()


def lettered(options: Iterable[Any]) -> dict[str, str]:
    """A list of option texts as `{A: ..., B: ...}`, dropping empty trailing slots."""
    values = [text(o) for o in options]
    while values and not values[-1]:
        values.pop()
    if len(values) > len(LETTERS):
        raise SourceError(f"{len(values)} options: at most {len(LETTERS)} are supported")
    return {LETTERS[i]: strip_prefix(v, LETTERS[i]) for i, v in enumerate(values)}


def letter_of(answer: str, options: dict[str, str]) -> str | None:
    """The letter whose text equals `answer` (exact, then case-insensitive), or None."""
    for letter, option in options.items():
        if option == answer:
            return letter
    folded = answer.casefold()
    for letter, option in options.items():
        if option.casefold() == folded:
            return letter
    return None


def image_bytes(cell: Any) -> bytes | None:
    """Bytes of an embedded image: HF parquet stores `{bytes, path}` structs or raw bytes."""
    if cell is None:
        return None
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    return bytes(cell) if cell else None


def save_image(data: bytes, image_dir: Path) -> Path:
    """Write embedded image bytes once, named by content hash (stable, deduplicated across questions)."""
    ext = (
        ".png"
        if data[:8] == b"\x89PNG\r\n\x1a\n"
        else ".jpg"
        if data[:2] == b"\xff\xd8"
        else ".img"
    )
    path = Path(image_dir).resolve() / (hashlib.sha1(data).hexdigest()[:20] + ext)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises several unrelated types for a bad file
        raise SourceError(f"cannot read parquet file {path}: {err}") from None
