"""MMMU (Yue et al., CVPR 2024), the five Health & Medicine subjects."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from medlvr.data.schema import VQASample
from medlvr.data.sources._common import (
    SourceError,
    image_bytes,
    lettered,
    open_or_closed,
    pick_splits,
    read_parquet_rows,
    save_image,
    text,
)

NAME = "mmmu-med"
SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)
SPLITS = ["dev", "validation", "test"]
PUBLIC_SPLITS = ["dev", "validation"]
ALIASES = {"val": "validation"}
MAX_IMAGES = 7
_TAG = re.compile(r"<image (\d+)>")


def _options(raw: Any, where: str) -> list[str]:
    """`options` is a Python-list *string*: parse it as a literal, never execute it."""
    if isinstance(raw, list):
        return [text(o) for o in raw]
    try:
        value = ast.literal_eval(text(raw) or "[]")
    except (ValueError, SyntaxError) as err:
        raise SourceError(
            f"{NAME}: {where}: options is not a list literal ({err}): {raw!r}"
        ) from None
    if not isinstance(value, list):
        raise SourceError(f"{NAME}: {where}: options is not a list: {raw!r}")
    return [text(o) for o in value]


def convert_mmmu_med(
    root: Path, split: str | None = None, *, image_dir: Path | None = None, **opts: Any
) -> list[VQASample]:
    """Convert `<Subject>/<split>-*.parquet` for the five Health & Medicine subjects.

    Release files: the MMMU parquet shards per subject (`dev`, `validation`
    150 questions, `test` 1,752 with hidden answers); columns `id`, `question`
    with `<image k>` placeholders, `options` (a Python-list string, parsed with
    `ast.literal_eval`), `answer`, `question_type` (multiple-choice | open),
    `image_1..image_7` (embedded bytes, written once each to `image_dir`,
    default `<root>/images_extracted`).

    Official split: as released; `split=None` converts dev and validation, the
    splits with public answers (a hidden "?" answer is an error). Normalisation:
    `images` lists the present `image_k` in order of k and `meta["image_tags"]`
    the matching `<image k>` placeholders, which stay in the text; multiple-choice
    questions get letters A.. and the gold letter; open questions are "closed"
    when the answer is yes/no, else "open".
    """
    root = Path(root)
    out_dir = Path(image_dir) if image_dir is not None else root / "images_extracted"
    splits = PUBLIC_SPLITS if split is None else pick_splits(split, SPLITS, NAME, ALIASES)
    missing = [s for s in SUBJECTS if not (root / s).is_dir()]
    if missing:
        raise SourceError(f"{NAME}: subject folder(s) not found under {root}: {', '.join(missing)}")
    samples: list[VQASample] = []
    for name in splits:
        for subject in SUBJECTS:
            shards = sorted((root / subject).glob(f"{name}-*.parquet"))
            if not shards:
                raise SourceError(
                    f"{NAME}: release file not found: {root / subject}/{name}-*.parquet"
                )
            for shard in shards:
                for rec in read_parquet_rows(shard):
                    samples.append(_sample(rec, name, subject, out_dir))
    return samples


def _sample(rec: dict[str, Any], split: str, subject: str, out_dir: Path) -> VQASample:
    rid = text(rec["id"])
    images: list[str] = []
    tags: list[str] = []
    for k in range(1, MAX_IMAGES + 1):
        data = image_bytes(rec.get(f"image_{k}"))
        if data is not None:
            images.append(str(save_image(data, out_dir)))
            tags.append(f"<image {k}>")
    options_list = _options(rec.get("options"), rid)
    used = {f"<image {k}>" for k in _TAG.findall(" ".join([text(rec["question"]), *options_list]))}
    if used - set(tags):
        raise SourceError(
            f"{NAME}: {rid}: placeholder(s) {sorted(used - set(tags))} refer to absent images"
        )
    answer = text(rec.get("answer"))
    if answer in ("", "?"):
        raise SourceError(
            f"{NAME}: {rid}: the answer is hidden ({answer!r}); MMMU test answers are not public"
        )
    common: dict[str, Any] = dict(
        id=f"{NAME}-{rid}",
        dataset=NAME,
        split=split,
        images=images,
        question=text(rec["question"]),
        question_type=text(rec.get("question_type")) or None,
        meta={
            "subject": subject,
            "subfield": rec.get("subfield"),
            "img_type": rec.get("img_type"),
            "topic_difficulty": rec.get("topic_difficulty"),
            "image_tags": tags,
        },
    )
    if text(rec.get("question_type")) == "multiple-choice":
        options = lettered(options_list)
        if answer not in options:
            raise SourceError(
                f"{NAME}: {rid}: gold letter {answer!r} is not among the options {sorted(options)}"
            )
        return VQASample(
            **common,
            options=options,
            answer=options[answer],
            answer_letter=answer,
            answer_type="choice",
        )
    return VQASample(**common, answer=answer, answer_type=open_or_closed(answer))
