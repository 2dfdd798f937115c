"""MedXpertQA (Zuo et al., 2025), multimodal subset MM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medlvr.data.schema import VQASample
from medlvr.data.sources._common import SourceError, pick_splits, release_file, text

NAME = "medxpertqa-mm"
SPLIT_FILES = {"test": "MM/test.jsonl", "dev": "MM/dev.jsonl"}
# The authors' evaluation file (their repository's eval/data/medxpertqa/input/), the test split.
AUTHORS_FILE = "medxpertqa_mm_input.jsonl"
AUTHORS_PLACES = (".", "input", "eval/data/medxpertqa/input")
CHOICES_MARK = "Answer Choices:"


def convert_medxpertqa_mm(root: Path, split: str | None = None, **opts: Any) -> list[VQASample]:
    """Convert `MM/test.jsonl` (2,000 questions; and `MM/dev.jsonl` when asked for split "dev"),
    or, without it, the authors' `medxpertqa_mm_input.jsonl` (test).

    Records: `{id, question, options: {A..E}, label, images: [file names],
    medical_task, body_system, question_type: Reasoning|Understanding}`; the authors' file
    has `options` as a list of `{letter, content}`, `label` as a one-letter list, `images`
    as a list of `{image_path}` and the choices appended to the question after "Answer
    Choices:" (dropped: the prompt lists the options). Image files are looked up by name in
    `<root>/images/`. Official split: test (the default). Normalisation: five-option
    multiple choice, gold letter = `label`; `body_system` is the organ; `medical_task` goes
    to `meta`. A record of any other layout is one error naming its file and line.
    """
    root = Path(root)
    samples: list[VQASample] = []
    for name in pick_splits(split or "test", list(SPLIT_FILES), NAME):
        path = _split_file(root, name)
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(f"{NAME}: {path}:{lineno}: malformed JSON: {err.msg}") from None
            try:
                samples.append(_sample(rec, root, name))
            except (KeyError, TypeError, AttributeError, ValueError) as err:
                why = f"no {err.args[0]!r} field" if isinstance(err, KeyError) else str(err)
                raise SourceError(f"{NAME}: {path}:{lineno}: {why}") from None
    return samples


def _split_file(root: Path, split: str) -> Path:
    if split == "test" and not (root / SPLIT_FILES[split]).is_file():
        for place in AUTHORS_PLACES:
            if (root / place / AUTHORS_FILE).is_file():
                return root / place / AUTHORS_FILE
    return release_file(root, SPLIT_FILES[split], NAME)


def _sample(rec: Any, root: Path, split: str) -> VQASample:
    if not isinstance(rec, dict):
        raise TypeError(f"a record must be a JSON object, not a {type(rec).__name__}")
    options = _options(rec["options"])
    label = rec.get("label")
    if isinstance(label, list) and len(label) == 1:  # the authors' file: ["C"]
        label = label[0]
    letter = text(label)
    if letter not in options:
        raise ValueError(
            f"id {rec.get('id')}: gold letter {letter!r} is not among the options {sorted(options)}"
        )
    question = text(rec["question"])
    if isinstance(rec["options"], list) and CHOICES_MARK in question:
        question = question[: question.rindex(CHOICES_MARK)].strip()
    return VQASample(
        id=f"{NAME}-{text(rec['id'])}",
        dataset=NAME,
        split=split,
        images=[str((root / "images" / _image_name(f)).resolve()) for f in rec.get("images", [])],
        question=question,
        options=options,
        answer=options[letter],
        answer_letter=letter,
        answer_type="choice",
        organ=text(rec.get("body_system")) or None,
        question_type=text(rec.get("question_type")) or None,
        meta={"medical_task": rec.get("medical_task"), "body_system": rec.get("body_system")},
    )


def _options(raw: Any) -> dict[str, str]:
    """`{A: text}` (the release) or `[{letter, content}]` (the authors' file)."""
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    if isinstance(raw, list) and all(
        isinstance(o, dict) and {"letter", "content"} <= set(o) for o in raw
    ):
        return {text(o["letter"]): text(o["content"]) for o in raw}
    raise TypeError(
        f"options must be {{letter: text}} or a list of {{letter, content}}, not {json.dumps(raw)[:60]}"
    )


def _image_name(entry: Any) -> str:
    """A file name in `images/`: the release lists names, the authors' file `{image_path}`."""
    if isinstance(entry, dict):
        entry = entry["image_path"]
    if not isinstance(entry, str) or not entry.strip():
        raise TypeError(
            f"an image must be a file name or {{image_path}}, not {json.dumps(entry)[:60]}"
        )
    return Path(entry.strip()).name
