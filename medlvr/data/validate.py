"""Whole-file checks of a JSONL dataset: every problem, located by line, nothing fixed silently."""

from __future__ import annotations

from pathlib import Path

from medlvr.data.images import load_image
from medlvr.data.schema import RecordProblem, iter_jsonl, load_jsonl
from medlvr.errors import ImageError


def validate_file(
    path: str | Path, *, check_images: bool = True, decode_images: bool = True
) -> list[RecordProblem]:
    """All problems of `path`, sorted by line.

    Schema problems (malformed JSON, missing fields, a gold letter not among the
    options), duplicate ids and missing or empty images come from
    `load_jsonl(skip_bad=True)`; with `decode_images` every image that exists is
    also decoded with `load_image`, so truncated or unknown files show up here
    rather than in the middle of a training run.
    """
    report = load_jsonl(path, skip_bad=True, check_images=check_images)
    problems = list(report.problems)
    if check_images and decode_images:
        flagged = {(p.line, p.field) for p in problems}
        verdict: dict[str, str | None] = {}  # one decode per file even when many questions share it
        for lineno, sample, _ in iter_jsonl(path):
            if sample is None:
                continue
            for i, image in enumerate(sample.images):
                if (lineno, f"images.{i}") in flagged or not Path(image).is_file():
                    continue
                if image not in verdict:
                    try:
                        load_image(image)
                        verdict[image] = None
                    except ImageError as err:
                        verdict[image] = str(err)
                if verdict[image] is not None:
                    problems.append(
                        RecordProblem(
                            str(path), lineno, f"images.{i}", f"unreadable image: {verdict[image]}"
                        )
                    )
    problems.sort(key=lambda p: p.line)
    return problems
