"""One record type for every benchmark: `VQASample`, stored as JSONL.

Image paths in a JSONL file are absolute or relative to the file's folder;
`read_jsonl` resolves them to absolute paths so a loaded sample never depends
on the working directory, and `write_jsonl` writes them back relative where
they live under the file's folder.

A data file is untrusted input: its image paths must lead into its own folder
(after `..` and links are resolved). Other folders are allowed explicitly, with
`medlvr --image-root DIR ...`, `MEDLVR_IMAGE_ROOTS` (folders separated by the
path separator) or `allow_image_roots`; anything else is a problem of the record.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medlvr.errors import not_a_file

AnswerType = Literal["closed", "open", "choice"]
LETTERS = "ABCDEFGHIJ"
IMAGE_ROOTS_ENV = "MEDLVR_IMAGE_ROOTS"
_allowed_roots: list[Path] = []  # allow_image_roots (the CLI's --image-root)


def allow_image_roots(*roots: str | Path, replace: bool = False) -> None:
    """Let data files of this process name images under `roots` too (beside their own folder);
    `replace`: instead of the folders allowed so far."""
    if replace:
        _allowed_roots.clear()
    _allowed_roots.extend(Path(r).resolve() for r in roots)


def image_roots() -> list[Path]:
    """The folders every data file may name images in, beyond its own (see the module docstring)."""
    env = [Path(p).resolve() for p in os.environ.get(IMAGE_ROOTS_ENV, "").split(os.pathsep) if p]
    return [*_allowed_roots, *env]


def outside(image: str | Path, roots: Iterable[str | Path]) -> bool:
    """Whether `image` (resolved) lies outside every folder of `roots` and `image_roots()`."""
    p = Path(image).resolve()
    return not any(
        p == r or r in p.parents for r in [*(Path(x).resolve() for x in roots), *image_roots()]
    )


class ROI(BaseModel):
    """A region of interest: a box `[x0, y0, x1, y1]` in original pixels of image `image`."""

    model_config = ConfigDict(extra="forbid")

    box: tuple[float, float, float, float]
    image: int = 0
    label: str | None = None

    @field_validator("box")
    @classmethod
    def _ordered(cls, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"box {list(box)} has a coordinate that is not a finite number")
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"empty or inverted box {list(box)}: need x1 > x0 and y1 > y0")
        return box


class VQASample(BaseModel):
    """One visual question with its gold answer, evidence regions and metadata."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    dataset: str = Field(min_length=1)
    split: str = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    question: str = Field(min_length=1)
    options: dict[str, str] = Field(default_factory=dict)
    """Letter -> option text, in letter order; empty for open and yes/no questions."""
    answer: str
    """Gold answer text (for choice questions, the text of the correct option)."""
    answer_letter: str | None = None
    answer_type: AnswerType
    rois: list[ROI] = Field(default_factory=list)
    modality: str | None = None
    organ: str | None = None
    question_type: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("answer", mode="before")
    @classmethod
    def _answer_text(cls, value: Any) -> str:
        # Several releases store integer answers (VQA-RAD "2"); keep one type.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> VQASample:
        if self.answer_type == "choice":
            if len(self.options) < 2:
                raise ValueError("a choice question needs at least 2 options")
            if self.answer_letter is None:
                raise ValueError("a choice question needs answer_letter")
            if self.answer_letter not in self.options:
                raise ValueError(
                    f"gold letter {self.answer_letter!r} is not among the options {sorted(self.options)}"
                )
        for letter in self.options:
            if letter not in LETTERS:
                raise ValueError(f"option key {letter!r} is not a capital letter A-J")
        for roi in self.rois:
            if roi.image >= len(self.images):
                raise ValueError(
                    f"ROI refers to image {roi.image} but the sample has {len(self.images)} image(s)"
                )
        return self

    @property
    def gold(self) -> str:
        """What the scorer compares against: the letter for choice questions, else the answer text."""
        if self.answer_type == "choice":
            assert self.answer_letter is not None  # the validator requires it
            return self.answer_letter
        return self.answer


def box_outside(box: Sequence[float], width: int, height: int) -> str | None:
    """Why a box covers no pixel of a `width` x `height` image, or None if it covers some.

    The one rule for every reader, `medlvr data validate` and training (`medlvr.data.roi.clip_box`):
    a box partly outside its image is clipped to it; a box wholly outside is an error.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if min(x1, width) <= max(x0, 0.0) or min(y1, height) <= max(y0, 0.0):
        return f"box {list(box)} lies wholly outside its {width}x{height} image"
    return None


@dataclass
class RecordProblem:
    """One problem found in a JSONL file, located by file, line and field."""

    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = (
            f"{self.path}:{self.line}" if self.line else self.path
        )  # line 0: the file as a whole
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class DataError(ValueError):
    """Raised when a dataset file has problems; carries every problem found."""

    def __init__(self, problems: list[RecordProblem]):
        self.problems = problems
        if len(problems) == 1:  # one line
            super().__init__(f"problem in the data: {problems[0]}")
            return
        head = "\n".join(str(p) for p in problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} problem(s) in the data:\n{head}{more}")


@dataclass
class LoadReport:
    """What a tolerant load kept and what it skipped (nothing is dropped silently)."""

    samples: list[VQASample] = field(default_factory=list)
    problems: list[RecordProblem] = field(default_factory=list)


def _parse_line(
    text: str, path: str, lineno: int, base: Path
) -> tuple[VQASample | None, list[RecordProblem]]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        return None, [
            RecordProblem(path, lineno, "", f"malformed JSON: {err.msg} at column {err.colno}")
        ]
    except RecursionError:
        return None, [RecordProblem(path, lineno, "", "JSON nested too deeply to be a record")]
    if not isinstance(raw, dict):
        return None, [RecordProblem(path, lineno, "", "a record must be a JSON object")]
    try:
        sample = VQASample.model_validate(raw)
    except RecursionError:
        return None, [RecordProblem(path, lineno, "", "JSON nested too deeply to be a record")]
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "record"
            problems.append(RecordProblem(path, lineno, loc, e["msg"]))
        return None, problems
    sample.images = [
        str((base / p).resolve()) if not Path(p).is_absolute() else p for p in sample.images
    ]
    escaped = [
        RecordProblem(path, lineno, f"images.{i}", f"image path {raw['images'][i]!r} leads outside the data "
                      f"file's folder {base}: pass --image-root FOLDER to allow images there")
        for i, p in enumerate(sample.images) if outside(p, [base])
    ]  # fmt: skip
    return (None, escaped) if escaped else (sample, [])


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, VQASample | None, list[RecordProblem]]]:
    """Yield `(line number, sample or None, problems)` for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    base = path.parent
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:  # a byte-order mark (as Windows editors save UTF-8) is read, not refused
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                why = f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                yield lineno, None, [RecordProblem(str(path), lineno, "", why)]
                continue
            if text.strip():
                yield (lineno, *_parse_line(text, str(path), lineno, base))


def check_samples(
    rows: Iterable[tuple[int, VQASample]], path: str, check_images: bool = True
) -> list[RecordProblem]:
    """Problems that span records or touch the disk: duplicate ids, missing or empty images, ROI boxes
    wholly outside their image (`box_outside`; the image's size read from its header)."""
    problems: list[RecordProblem] = []
    seen: dict[str, int] = {}
    sizes: dict[str, tuple[int, int] | None] = {}
    for lineno, sample in rows:
        if sample.id in seen:
            problems.append(
                RecordProblem(
                    path,
                    lineno,
                    "id",
                    f"duplicate id {sample.id!r} (first at line {seen[sample.id]})",
                )
            )
        else:
            seen[sample.id] = lineno
        if not sample.images:
            problems.append(
                RecordProblem(path, lineno, "images", "no image: a visual question needs its image")
            )
        if check_images:
            bad = set()
            for i, img in enumerate(sample.images):
                p = Path(img)
                why = (
                    not_a_file(p)
                    if not p.is_file()
                    else f"image file is empty: {img}"
                    if p.stat().st_size == 0
                    else None
                )
                if why is not None:
                    problems.append(RecordProblem(path, lineno, f"images.{i}", why))
                    bad.add(i)
            for j, roi in enumerate(sample.rois):
                size = None if roi.image in bad else _image_size(sample.images[roi.image], sizes)
                why = box_outside(roi.box, *size) if size is not None else None
                if why is not None:
                    problems.append(
                        RecordProblem(path, lineno, f"rois.{j}.box", f"{why} (image {roi.image})")
                    )
    return problems


def _image_size(path: str, cache: dict[str, tuple[int, int] | None]) -> tuple[int, int] | None:
    """(width, height) of an image as `load_image` returns it, from its header where it can; None if unreadable."""
    if path not in cache:
        from medlvr.data.ground.annotations import image_size

        try:
            cache[path] = image_size(path)
        except Exception:  # noqa: BLE001 - not a PNG/JPEG/DICOM header (e.g. NIfTI): decode it
            from medlvr.data.images import load_image

            try:
                cache[path] = load_image(path).size
            except Exception:  # noqa: BLE001 - unreadable: reported by the decode check, not here
                cache[path] = None
    return cache[path]


def load_jsonl(
    path: str | Path, *, skip_bad: bool = False, check_images: bool = True
) -> LoadReport:
    """Read and validate a JSONL file.

    By default the first bad file fails fast with a `DataError` that lists every
    problem; with `skip_bad=True` bad records are skipped and reported in the
    returned `LoadReport.problems`. A file without records is a problem too: empty
    input is an error, never a run over nothing.
    """
    report = LoadReport()
    good: list[tuple[int, VQASample]] = []
    records = 0
    for lineno, sample, problems in iter_jsonl(path):
        records += 1
        report.problems.extend(problems)
        if sample is not None:
            good.append((lineno, sample))
    if not records:
        report.problems.append(RecordProblem(str(path), 0, "", "the file has no records"))
    cross = check_samples(good, str(path), check_images=check_images)
    report.problems.extend(cross)
    bad_lines = {p.line for p in cross}
    report.samples = [s for ln, s in good if ln not in bad_lines]
    report.problems.sort(key=lambda p: p.line)
    if report.problems and not skip_bad:
        raise DataError(report.problems)
    return report


def read_jsonl(path: str | Path, **kwargs: Any) -> list[VQASample]:
    """Samples of a JSONL file (fails fast on any problem unless `skip_bad=True`)."""
    return load_jsonl(path, **kwargs).samples


def write_jsonl(samples: Iterable[VQASample], path: str | Path) -> int:
    """Write samples as JSONL, image paths relative to the file's folder when below it. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    n = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for sample in samples:
            record = sample.model_dump(mode="json", exclude_defaults=False)
            record["images"] = [_relative(p, base) for p in sample.images]
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)  # never leave a half-written file behind
    return n


def _relative(image: str, base: Path) -> str:
    p = Path(image)
    if not p.is_absolute():
        return image
    try:
        return str(p.resolve().relative_to(base))
    except ValueError:
        return str(p)
