"""SLAKE (Liu et al., ISBI 2021; CC BY 4.0), English subset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlvr.data.schema import ROI, VQASample
from medlvr.data.sources._common import (
    ANSWER_KINDS,
    SourceError,
    pick_splits,
    read_json,
    release_file,
    text,
)

NAME = "slake"
SPLIT_FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}
ALIASES = {"validate": "val", "validation": "val"}
REQUIRED = ("q_lang", "qid", "img_name", "question", "answer", "answer_type")


def read_detections(path: Path) -> tuple[list[tuple[str, tuple[float, float, float, float]]], int]:
    """One image's `detection.json` (one-key objects `{name: [x, y, w, h]}`, absolute pixels, top-left
    origin) as (name, (x0, y0, x1, y1)) boxes, and how many zero-size boxes were dropped."""
    boxes, dropped = [], 0
    for obj in read_json(path, NAME):
        for label, (x, y, w, h) in obj.items():
            if w <= 0 or h <= 0:
                dropped += 1  # a zero-size box marks nothing; counted, not silently lost
                continue
            boxes.append((label, (float(x), float(y), float(x) + float(w), float(y) + float(h))))
    return boxes, dropped


def _rois(folder: Path, cache: dict[Path, tuple[list[ROI], int]]) -> tuple[list[ROI], int]:
    """ROIs of one image from its `detection.json`, and how many boxes were empty."""
    if folder not in cache:
        path = folder / "detection.json"
        boxes, dropped = read_detections(path) if path.is_file() else ([], 0)
        cache[folder] = ([ROI(box=box, label=label) for label, box in boxes], dropped)
    return cache[folder]


def convert_slake(root: Path, split: str | None = None, **opts: Any) -> list[VQASample]:
    """Convert `train.json`, `validate.json`, `test.json` (English: 4,919 / 1,053 / 1,061).

    Official split: the three files; `validate.json` becomes split "val".
    Only records with `q_lang == "en"` are kept. Images are `imgs/<img_name>`;
    each image folder's `detection.json` boxes `[x, y, w, h]` (absolute pixels,
    top-left origin) become ROIs `[x, y, x + w, y + h]` labelled with the
    object name. `answer_type` OPEN/CLOSED maps to open/closed; answer text is
    kept as released ("Yes"), the scorer normalises case. `location` is the
    organ; `content_type`, `base_type`, `img_id` and `qid` go to `meta`.
    """
    root = Path(root)
    samples: list[VQASample] = []
    cache: dict[Path, tuple[list[ROI], int]] = {}
    for name in pick_splits(split, list(SPLIT_FILES), NAME, ALIASES):
        path = release_file(root, SPLIT_FILES[name], NAME)
        for i, rec in enumerate(read_json(path, NAME)):
            missing = [f for f in REQUIRED if not isinstance(rec, dict) or f not in rec]
            if missing:  # a record of another release (or a truncated one), never skipped silently
                raise SourceError(
                    f"{NAME}: {path} record {i}: no {', '.join(missing)} field: is --root the SLAKE release?"
                )
            if rec["q_lang"] != "en":
                continue
            kind = ANSWER_KINDS.get(text(rec.get("answer_type")).lower())
            if kind is None:
                raise SourceError(
                    f"{NAME}: {path.name} qid {rec.get('qid')}: unknown answer_type {rec.get('answer_type')!r}"
                )
            image = (root / "imgs" / text(rec["img_name"])).resolve()
            rois, dropped = _rois(image.parent, cache)
            meta = {
                "content_type": rec.get("content_type"),
                "base_type": rec.get("base_type"),
                "img_id": rec.get("img_id"),
                "qid": rec.get("qid"),
            }
            if dropped:
                meta["empty_boxes_dropped"] = dropped
            samples.append(
                VQASample(
                    id=f"{NAME}-{name}-{text(rec['qid'])}",
                    dataset=NAME,
                    split=name,
                    images=[str(image)],
                    question=text(rec["question"]),
                    answer=text(rec["answer"]),
                    answer_type=kind,
                    rois=list(rois),
                    modality=text(rec.get("modality")) or None,
                    organ=text(rec.get("location")) or None,
                    question_type=text(rec.get("content_type")) or None,
                    meta=meta,
                )
            )
    return samples
