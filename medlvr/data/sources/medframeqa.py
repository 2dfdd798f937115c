"""MedFrameQA (2025; CC BY 4.0): multi-image questions over 2 to 5 video frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlvr.data.schema import VQASample
from medlvr.data.sources._common import (
    SourceError,
    image_bytes,
    lettered,
    pick_splits,
    read_parquet_rows,
    release_glob,
    save_image,
    text,
)

NAME = "medframeqa"
MAX_FRAMES = 5


def convert_medframeqa(
    root: Path, split: str | None = None, *, image_dir: Path | None = None, **opts: Any
) -> list[VQASample]:
    """Convert the MedFrameQA parquet release (`**/*.parquet`, 2,851 questions).

    Columns: `question_id, system, organ, modality, question, options (list),
    correct_answer (letter), reasoning_chain, image_1..image_5` (embedded bytes,
    written once each to `image_dir`, default `<root>/images_extracted`).
    Official split: test only. Normalisation: options become letters A..
    (a leading "A." prefix of an option's own letter is removed); the present
    frames, 2 to 5, keep their order; fewer than 2 is an error naming the record;
    `system` and `reasoning_chain` go to `meta`.
    """
    root = Path(root)
    pick_splits(split, ["test"], NAME)
    out_dir = Path(image_dir) if image_dir is not None else root / "images_extracted"
    samples: list[VQASample] = []
    for shard in release_glob(root, "**/*.parquet", NAME):
        for rec in read_parquet_rows(shard):
            qid = text(rec["question_id"])
            frames = [image_bytes(rec.get(f"image_{k}")) for k in range(1, MAX_FRAMES + 1)]
            images = [str(save_image(d, out_dir)) for d in frames if d is not None]
            if len(images) < 2:
                raise SourceError(
                    f"{NAME}: question_id {qid}: {len(images)} frame(s), expected 2 to 5"
                )
            options = lettered(rec.get("options") or [])
            letter = text(rec.get("correct_answer")).upper()
            if letter not in options:
                raise SourceError(
                    f"{NAME}: question_id {qid}: gold letter {letter!r} is not among the options {sorted(options)}"
                )
            samples.append(
                VQASample(
                    id=f"{NAME}-{qid}",
                    dataset=NAME,
                    split="test",
                    images=images,
                    question=text(rec["question"]),
                    options=options,
                    answer=options[letter],
                    answer_letter=letter,
                    answer_type="choice",
                    modality=text(rec.get("modality")) or None,
                    organ=text(rec.get("organ")) or None,
                    meta={
                        "system": rec.get("system"),
                        "reasoning_chain": rec.get("reasoning_chain"),
                    },
                )
            )
    return samples
