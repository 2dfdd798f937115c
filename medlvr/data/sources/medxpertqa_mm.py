"""MedXpertQA (Zuo et al., 2025), multimodal subset MM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medlvr.data.schema import VQASample
from medlvr.data.sources._common import SourceError, pick_splits, release_file, text

NAME = "medxpertqa-mm"
SPLIT_FILES = {"test": "MM/test.jsonl", "dev": "MM/dev.jsonl"}


def convert_medxpertqa_mm(root: Path, split: str | None = None, **opts: Any) -> list[VQASample]:
    """Convert `MM/test.jsonl` (2,000 questions; and `MM/dev.jsonl` when asked for split "dev").

    Records: `{id, question, options: {A..E}, label, images: [file names],
    medical_task, body_system, question_type: Reasoning|Understanding}`; image
    files are looked up in `<root>/images/`. Official split: test (the default).
    Normalisation: five-option multiple choice, gold letter = `label`;
    `body_system` is the organ; `medical_task` goes to `meta`.
    """
    root = Path(root)
    samples: list[VQASample] = []
    for name in pick_splits(split or "test", list(SPLIT_FILES), NAME):
        path = release_file(root, SPLIT_FILES[name], NAME)
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(f"{NAME}: {path}:{lineno}: malformed JSON: {err.msg}") from None
            options = {text(k): text(v) for k, v in rec["options"].items()}
            letter = text(rec.get("label"))
            if letter not in options:
                raise SourceError(
                    f"{NAME}: {path}:{lineno} id {rec.get('id')}: gold letter {letter!r} is not among the options {sorted(options)}"
                )
            samples.append(
                VQASample(
                    id=f"{NAME}-{text(rec['id'])}",
                    dataset=NAME,
                    split=name,
                    images=[
                        str((root / "images" / text(f)).resolve()) for f in rec.get("images", [])
                    ],
                    question=text(rec["question"]),
                    options=options,
                    answer=options[letter],
                    answer_letter=letter,
                    answer_type="choice",
                    organ=text(rec.get("body_system")) or None,
                    question_type=text(rec.get("question_type")) or None,
                    meta={
                        "medical_task": rec.get("medical_task"),
                        "body_system": rec.get("body_system"),
                    },
                )
            )
    return samples
