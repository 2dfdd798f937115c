"""PathVQA (He et al., 2020)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from medlvr.data.schema import VQASample
from medlvr.data.sources._common import (
    SourceError,
    image_bytes,
    open_or_closed,
    pick_splits,
    read_parquet_rows,
    save_image,
    text,
)

NAME = "pathvqa"
SPLITS = ["train", "val", "test"]
ALIASES = {"validation": "val"}
PARQUET_PREFIX = {"train": "train", "val": "validation", "test": "test"}


def convert_pathvqa(
    root: Path,
    split: str | None = None,
    *,
    image_dir: Path | None = None,
    allow_pickle: bool = False,
    **opts: Any,
) -> list[VQASample]:
    """Convert PathVQA from its parquet release, or from its pickles when explicitly allowed.

    Release files: parquet `**/<train|validation|test>-*.parquet` with columns
    `image` (bytes or `{bytes, path}`), `question`, `answer`; the images are
    written once each (named by content hash) to `image_dir` (default
    `<root>/images_extracted`). Fallback: `qas/<split>/*_qa.pkl` lists of
    `{image, question, answer}` with images `images/<split>/<image>.jpg`, read
    only with `allow_pickle=True` because unpickling runs arbitrary code.

    Official split: train / val / test as released. Normalisation: answers
    yes/no (any case) are "closed", everything else "open"; answer text kept.
    """
    root = Path(root)
    out_dir = Path(image_dir) if image_dir is not None else root / "images_extracted"
    samples: list[VQASample] = []
    for name in pick_splits(split, SPLITS, NAME, ALIASES):
        rows: list[tuple[dict[str, Any], Path | None]]
        parquets = sorted(root.glob(f"**/{PARQUET_PREFIX[name]}-*.parquet"))
        if parquets:
            rows = [(r, None) for p in parquets for r in read_parquet_rows(p)]
        else:
            rows = [(r, root / "images" / name) for r in _pickle_rows(root, name, allow_pickle)]
        for i, (rec, folder) in enumerate(rows):
            if folder is None:
                data = image_bytes(rec.get("image"))
                if data is None:
                    raise SourceError(f"{NAME}: {name} row {i}: no image bytes")
                image = save_image(data, out_dir)
            else:
                image = (folder / f"{text(rec['image'])}.jpg").resolve()
            answer = text(rec["answer"])
            samples.append(
                VQASample(
                    id=f"{NAME}-{name}-{i}",
                    dataset=NAME,
                    split=name,
                    images=[str(image)],
                    question=text(rec["question"]),
                    answer=answer,
                    answer_type=open_or_closed(answer),
                    meta={"image_name": text(rec["image"])} if folder is not None else {},
                )
            )
    return samples


def _pickle_rows(root: Path, split: str, allow_pickle: bool) -> list[dict[str, Any]]:
    found = sorted((root / "qas" / split).glob("*_qa.pkl"))
    if not found:
        raise SourceError(
            f"{NAME}: no release file for split {split!r} under {root}: expected "
            f"{PARQUET_PREFIX[split]}-*.parquet or qas/{split}/*_qa.pkl"
        )
    if not allow_pickle:
        raise SourceError(
            f"{NAME}: only pickle files found ({found[0]}); unpickling executes code, "
            "so pass allow_pickle=True (--allow-pickle) if you trust them, or use the parquet release"
        )
    rows: list[dict[str, Any]] = []
    for path in found:
        with path.open("rb") as fh:
            rows.extend(pickle.load(fh))  # unpickling explicitly allowed by the caller
    return rows
