"""PMC-VQA (Zhang et al., 2023): test sets v1 (`test_clean.csv`) and v2 (`test_2.csv`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from medlvr.data.schema import VQASample
from medlvr.data.sources._common import (
    SourceError,
    letter_of,
    lettered,
    pick_splits,
    release_file,
    text,
)

NAME = "pmc-vqa"
FILES = {"v1": "test_clean.csv", "v2": "test_2.csv"}
IMAGE_DIRS = ("images", "figures", "images_2", ".")


def _image(root: Path, figure: str) -> Path:
    """Releases unpack figures to different folders; take the first that has the file."""
    for folder in IMAGE_DIRS:
        path = root / folder / figure
        if path.is_file():
            return path.resolve()
    return (
        root / IMAGE_DIRS[0] / figure
    ).resolve()  # reported as missing by `medlvr data validate`


def convert_pmc_vqa(
    root: Path, split: str | None = None, *, version: str | None = None, **opts: Any
) -> list[VQASample]:
    """Convert the PMC-VQA test set.

    Release files: v1 `test_clean.csv` (2,000 rows: Figure_path, Question,
    Answer, Choice A..D, Answer_label) and v2 `test_2.csv` (index,
    Figure_path, Caption, Question, Choice A..D, Answer, split). `version`
    picks one; by default v1 if its file is present, else v2.

    Official split: test only. Normalisation: the "A:" prefixes of the choices
    are removed; the gold letter is `Answer_label` (v1) or `Answer` when it is
    a letter, else the option whose text equals the answer (prefix removed).
    """
    root = Path(root)
    pick_splits(split, ["test"], NAME)
    if version is None:
        version = "v1" if (root / FILES["v1"]).is_file() else "v2"
    if version not in FILES:
        raise SourceError(f"{NAME}: unknown version {version!r}; known: {', '.join(FILES)}")
    path = release_file(root, FILES[version], NAME)
    samples: list[VQASample] = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        for i, rec in enumerate(csv.DictReader(fh)):
            row = text(rec.get("index")) or str(i)
            options = lettered(rec.get(f"Choice {L}", "") for L in "ABCD")
            gold = text(rec.get("Answer_label")) or text(rec.get("Answer"))
            # A letter wins; otherwise match the answer text, which may carry a prefix ("B:Diffuse uptake").
            letter = (
                gold
                if gold in options
                else letter_of(_drop_any_prefix(text(rec.get("Answer"))), options)
            )
            if letter is None:
                raise SourceError(
                    f"{NAME}: {path.name} row {row}: gold {gold!r} is not among the options {options}"
                )
            meta: dict[str, Any] = {"version": version, "row": row}
            if text(rec.get("Caption")):
                meta["caption"] = text(rec["Caption"])
            samples.append(
                VQASample(
                    id=f"{NAME}-{version}-{row}",
                    dataset=NAME,
                    split="test",
                    images=[str(_image(root, text(rec["Figure_path"])))],
                    question=text(rec["Question"]),
                    options=options,
                    answer=options[letter],
                    answer_letter=letter,
                    answer_type="choice",
                    meta=meta,
                )
            )
    return samples


def _drop_any_prefix(answer: str) -> str:
    head, sep, rest = answer.partition(":")
    return rest.strip() if sep and len(head.strip()) == 1 else answer
