"""OmniMedVQA (Hu et al., CVPR 2024), open-access part."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlvr.data.schema import LETTERS, VQASample
from medlvr.data.sources._common import (
    SourceError,
    letter_of,
    pick_splits,
    read_json,
    release_glob,
    text,
)

NAME = "omnimedvqa"
QA_GLOB = "QA_information/Open-access/*.json"


def convert_omnimedvqa(root: Path, split: str | None = None, **opts: Any) -> list[VQASample]:
    """Convert `QA_information/Open-access/<Dataset>.json` (42 files) with images at `<root>/<image_path>`.

    Official split: none, the whole benchmark is a test set (split "test").
    Normalisation: `option_A..option_D` (2 to 4 present) become options;
    `gt_answer` is an option text and is mapped to its letter (exact, then
    case-insensitive match); a gold text not among the options is an error
    naming the file and `question_id`. The modality is `modality_type`, or
    `modality` in the one file that spells it so. The source sub-dataset goes
    to `meta["source"]`.
    """
    root = Path(root)
    pick_splits(split, ["test"], NAME)
    samples: list[VQASample] = []
    for path in release_glob(root, QA_GLOB, NAME):
        records = read_json(path, NAME)
        for rec in records:
            qid = text(rec.get("question_id"))
            options = {
                L: text(rec[f"option_{L}"]) for L in LETTERS[:4] if text(rec.get(f"option_{L}"))
            }
            if len(options) < 2:
                raise SourceError(
                    f"{NAME}: {path.name} question_id {qid}: {len(options)} option(s), need 2 to 4"
                )
            gold = text(rec.get("gt_answer"))
            letter = letter_of(gold, options)
            if letter is None:
                raise SourceError(
                    f"{NAME}: {path.name} question_id {qid}: gold answer {gold!r} is not among the options {options}"
                )
            samples.append(
                VQASample(
                    id=f"{NAME}-{qid}",
                    dataset=NAME,
                    split="test",
                    images=[str((root / text(rec["image_path"])).resolve())],
                    question=text(rec["question"]),
                    options=options,
                    answer=options[letter],
                    answer_letter=letter,
                    answer_type="choice",
                    modality=text(rec.get("modality_type", rec.get("modality"))) or None,
                    question_type=text(rec.get("question_type")) or None,
                    meta={"source": text(rec.get("dataset")) or path.stem, "file": path.name},
                )
            )
    return samples
