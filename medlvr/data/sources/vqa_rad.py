"""VQA-RAD (Lau et al., Scientific Data 2018; CC0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlvr.data.schema import VQASample
from medlvr.data.sources._common import (
    ANSWER_KINDS,
    SourceError,
    pick_splits,
    read_json,
    release_file,
    text,
)

NAME = "vqa-rad"
RELEASE_FILE = "VQA_RAD Dataset Public.json"
TEST_PHRASES = frozenset({"test_freeform", "test_para"})
# Two one-off typos and one lower-case spelling in the release's question_type.
QTYPE_FIXES = {"ATRIB": "ATTRIB", "PRSE": "PRES"}


def convert_vqa_rad(root: Path, split: str | None = None, **opts: Any) -> list[VQASample]:
    """Convert `VQA_RAD Dataset Public.json` (2,248 QA) with images from `images/`.

    Official split: `phrase_type` in {test_freeform, test_para} is test (451 QA),
    freeform and para are train (1,797 QA).

    Normalisation: `answer_type` is stripped and lower-cased ("CLOSED " has a
    trailing space in two rows); integer answers become strings; answer case
    is kept (the scorer normalises it). A CLOSED question whose answer is not
    yes/no ("MRI or CT?" -> "MRI") stays "closed", as the dataset labels it:
    the scorer compares normalised text for every closed question, so it does
    not need the answer to be yes/no. `question_type` is upper-cased, with
    multi-valued types ("POS, PRES") kept as one string and also listed in
    `meta["question_types"]`; `phrase_type` and `qid` go to `meta`.
    """
    root = Path(root)
    wanted = set(pick_splits(split, ["train", "test"], NAME))
    path = release_file(root, RELEASE_FILE, NAME)
    records = read_json(path, NAME)
    images = root / "images"
    samples: list[VQASample] = []
    for rec in records:
        phrase = text(rec.get("phrase_type"))
        rec_split = "test" if phrase in TEST_PHRASES else "train"
        if rec_split not in wanted:
            continue
        kind = ANSWER_KINDS.get(text(rec.get("answer_type")).lower())
        if kind is None:
            raise SourceError(
                f"{NAME}: qid {rec.get('qid')}: unknown answer_type {rec.get('answer_type')!r}"
            )
        qtypes = [
            QTYPE_FIXES.get(t, t)
            for t in (p.strip().upper() for p in text(rec.get("question_type")).split(","))
            if t
        ]
        samples.append(
            VQASample(
                id=f"{NAME}-{text(rec['qid'])}",
                dataset=NAME,
                split=rec_split,
                images=[str((images / text(rec["image_name"])).resolve())],
                question=text(rec["question"]),
                answer=text(rec["answer"]),
                answer_type=kind,
                organ=text(rec.get("image_organ")) or None,
                question_type=", ".join(qtypes) or None,
                meta={"phrase_type": phrase, "qid": text(rec["qid"]), "question_types": qtypes},
            )
        )
    return samples
