"""Annotated images -> grounded `VQASample`s with exact ROIs: splits, balanced negatives, every question type.

`build_grounded(images, GroundConfig(dataset="my-release"))` clips boxes to their images,
assigns splits (official kept, else seeded by patient or image), asks the question types of
`medlvr.data.ground.questions` and returns the samples with a report of what was made and what
was skipped and why. The output is deterministic for a given seed.
"""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlvr.data.ground import questions as q
from medlvr.data.ground.annotations import AnnotatedImage, Region, area, clip_box
from medlvr.data.ground.split import DEFAULT_FRACTIONS, assign_splits, check_fractions
from medlvr.data.schema import ROI, VQASample
from medlvr.data.sources._common import SourceError

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class GroundConfig:
    """How annotations become questions."""

    dataset: str
    """`VQASample.dataset` of every sample (and the prefix of its id)."""
    question_types: tuple[str, ...] = q.QUESTION_TYPES
    """Question types to ask (see `medlvr.data.ground.questions`)."""
    seed: int = 0
    """Seed of the split, the negatives drawn and the option order of size questions."""
    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    """Split fractions for groups without an official split."""
    val_fraction: float = 0.0
    """Fraction of train groups moved to "val" (for releases whose official split has none)."""
    sides: q.Sides = "image"
    """Whose left and right the position answers use: the viewer's (`image`) or the patient's."""
    size_ratio: float = 1.5
    """A size question needs the larger box to be at least this many times the smaller's area."""
    max_size_pairs: int = 2
    """Size questions per image at most."""
    negatives_within: tuple[str, ...] = ()
    """Image attributes (`modality`, `organ`) a negative must share with a positive of the same
    finding: "Is there a liver?" is asked of abdominal slices, not of brain MRIs."""
    names: dict[str, str] = field(default_factory=dict)
    """Label -> name used in questions (default: `questions.display_name(label)`)."""
    min_box_side: float = 1.0
    """Boxes with less than this many pixels on a side after clipping to the image are dropped."""
    modality: str | None = None
    """Modality of images that do not carry one."""
    organ: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.question_types) - set(q.QUESTION_TYPES)
        if unknown or not self.question_types:
            raise SourceError(
                f"unknown question types {sorted(unknown)}; known: {', '.join(q.QUESTION_TYPES)}"
            )
        if self.size_ratio < 1 or self.max_size_pairs < 0:
            raise SourceError("size_ratio must be >= 1 and max_size_pairs >= 0")
        if self.sides not in ("image", "patient"):
            raise SourceError(f"sides must be 'image' or 'patient', got {self.sides!r}")
        check_fractions(self.fractions, self.val_fraction)

    def name(self, label: str) -> str:
        return self.names.get(label) or q.display_name(label)


@dataclass
class GroundResult:
    """The samples, the images they came from (split assigned, boxes clipped) and what happened."""

    samples: list[VQASample]
    images: list[AnnotatedImage]
    made: Counter = field(default_factory=Counter)
    """(split, question type) -> questions."""
    skipped: Counter = field(default_factory=Counter)
    """reason -> count: boxes dropped, questions not asked."""
    straddling_groups: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """Lines for a terminal: questions per split and question type, then what was skipped."""
        lines = []
        for split in sorted({s for s, _ in self.made}, key=lambda s: (SPLIT_ORDER.get(s, 9), s)):
            per = "  ".join(
                f"{f}={self.made[split, f]}" for f in q.QUESTION_TYPES if self.made[split, f]
            )
            total = sum(c for (s, _), c in self.made.items() if s == split)
            n_images = len({s.meta["image"] for s in self.samples if s.split == split})
            lines.append(f"{split:>6}: {total:>6} questions on {n_images} images  {per}")
        lines += [f"skipped: {reason}: {n}" for reason, n in sorted(self.skipped.items())]
        if self.straddling_groups:
            lines.append(
                f"warning: {len(self.straddling_groups)} group(s) straddle official splits, e.g. {self.straddling_groups[0]}"
            )
        return lines


def build_grounded(images: Sequence[AnnotatedImage], cfg: GroundConfig) -> GroundResult:
    """Grounded samples of `images`; writes rendered images (NIfTI slices) that samples use."""
    if not images:
        raise SourceError(f"{cfg.dataset}: no annotated images")
    keys = Counter(im.key for im in images)
    if dup := [k for k, n in keys.items() if n > 1]:
        raise SourceError(f"{cfg.dataset}: image key {dup[0]!r} occurs {keys[dup[0]]} times")
    result = GroundResult([], list(images))
    for im in result.images:
        _clip_regions(im, cfg, result.skipped)
        im.modality = im.modality or cfg.modality
        im.organ = im.organ or cfg.organ
    result.straddling_groups = assign_splits(
        result.images, cfg.seed, cfg.fractions, cfg.val_fraction
    )
    vocabulary = sorted({r.label for im in result.images for r in im.regions})
    presence = (
        _presence_plan(result.images, vocabulary, cfg, result.skipped)
        if "presence" in cfg.question_types
        else {}
    )
    ordered = sorted(
        result.images, key=lambda im: (SPLIT_ORDER.get(im.split or "", 9), im.split or "", im.key)
    )
    for im in ordered:
        for qtype, question, answer, options, regions, labels in _questions(
            im, presence.get(im.key, []), cfg, result.skipped
        ):
            n = result.made[im.split, qtype]
            result.made[im.split, qtype] += 1
            result.samples.append(
                _sample(im, cfg, qtype, n, question, answer, options, regions, labels)
            )
    _render_used(result)
    return result


def _clip_regions(im: AnnotatedImage, cfg: GroundConfig, skipped: Counter) -> None:
    kept = []
    for r in im.regions:
        box = clip_box(r.box, im.width, im.height, cfg.min_box_side)  # type: ignore[arg-type]
        if box is None:
            skipped["box outside its image or thinner than min_box_side (dropped)"] += 1
            im.partial = im.partial | {r.label}  # its count is no longer known
            continue
        kept.append(Region(r.label, box, r.phrase))
    im.regions = kept


def _rng(cfg: GroundConfig, *parts: str) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, *(zlib.crc32(p.encode()) for p in parts)])


def _presence_plan(
    images: Sequence[AnnotatedImage], vocabulary: Sequence[str], cfg: GroundConfig, skipped: Counter
) -> dict[str, list[tuple[str, bool]]]:
    """image key -> [(label, present)]: per split and label, as many negatives as positives.

    Balancing makes yes and no equally likely for every (finding, split), so the question alone
    tells nothing; the larger side is subsampled (seeded)."""
    plan: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for split in sorted({im.split for im in images}):  # type: ignore[type-var]
        in_split = [im for im in images if im.split == split]
        for label in vocabulary:
            pos = [im for im in in_split if label in im.labels]
            contexts = {tuple(getattr(im, a) for a in cfg.negatives_within) for im in pos}
            neg = [im for im in in_split if label in im.absent_labels(vocabulary)
                   and tuple(getattr(im, a) for a in cfg.negatives_within) in contexts]  # fmt: skip
            n = min(len(pos), len(neg))
            if len(pos) > n:
                skipped["presence: positives without a matching negative"] += len(pos) - n
            rng = _rng(cfg, "presence", str(split), label)
            for group, present in ((pos, True), (neg, False)):
                for i in sorted(rng.choice(len(group), n, replace=False).tolist()) if n else []:
                    plan[group[i].key].append((label, present))
    return plan


Question = tuple[str, str, str, dict[str, str], list[Region], list[str]]


def _questions(
    im: AnnotatedImage, presence: list[tuple[str, bool]], cfg: GroundConfig, skipped: Counter
) -> list[Question]:
    """(question type, question, answer, options, ROI regions, labels) of one image."""
    out: list[Question] = []
    by_label: dict[str, list[Region]] = defaultdict(list)
    for r in im.regions:
        by_label[r.label].append(r)
    countable = {
        label: regions for label, regions in sorted(by_label.items()) if label not in im.partial
    }
    for label, present in presence:
        out.append(("presence", q.presence_question(cfg.name(label)), "yes" if present else "no", {},
                    by_label[label] if present else [], [label]))  # fmt: skip
    if "location" in cfg.question_types:
        for label, regions in countable.items():
            if len(regions) != 1:
                continue
            assert im.width and im.height  # an image with regions has its size
            choice = q.position_choice(
                [regions[0].box], im.width, im.height, cfg.sides, q.named_axes(cfg.name(label))
            )
            if choice is None:
                skipped["location: the name states the position"] += 1
                continue
            options, letter = choice
            out.append(
                (
                    "location",
                    q.location_question(cfg.name(label), options, cfg.sides),
                    letter,
                    options,
                    regions,
                    [label],
                )
            )
    if "count" in cfg.question_types:
        for label, regions in countable.items():
            out.append(
                (
                    "count",
                    q.count_question(cfg.name(label)),
                    str(len(regions)),
                    {},
                    regions,
                    [label],
                )
            )
    if "size" in cfg.question_types:
        out.extend(_size_questions(im, countable, cfg, skipped))
    if "grounding" in cfg.question_types:
        out.extend(_grounding_questions(im, cfg, skipped))
    return out


def _size_questions(
    im: AnnotatedImage, countable: dict[str, list[Region]], cfg: GroundConfig, skipped: Counter
) -> list[Question]:
    single = [(label, regions[0]) for label, regions in countable.items() if len(regions) == 1]
    pairs = []
    for i, (la, ra) in enumerate(single):
        for lb, rb in single[i + 1 :]:
            big, small = sorted((area(ra.box), area(rb.box)), reverse=True)
            if big >= cfg.size_ratio * small:
                pairs.append(((la, ra), (lb, rb)))
            else:
                skipped["size: areas too close"] += 1
    rng = _rng(cfg, "size", im.key)
    out: list[Question] = []
    for k in sorted(rng.permutation(len(pairs))[: cfg.max_size_pairs].tolist()):
        (la, ra), (lb, rb) = pairs[k] if rng.random() < 0.5 else pairs[k][::-1]
        options = {"A": cfg.name(la), "B": cfg.name(lb)}
        letter = "A" if area(ra.box) > area(rb.box) else "B"
        out.append(
            (
                "size",
                q.size_question(cfg.name(la), cfg.name(lb)),
                letter,
                options,
                [ra, rb],
                [la, lb],
            )
        )
    return out


def _grounding_questions(im: AnnotatedImage, cfg: GroundConfig, skipped: Counter) -> list[Question]:
    by_phrase: dict[tuple[str, str], list[Region]] = defaultdict(list)
    for r in im.regions:
        if r.phrase:
            by_phrase[r.phrase, r.label].append(r)
    out: list[Question] = []
    for (phrase, label), regions in sorted(by_phrase.items()):
        assert im.width and im.height  # an image with regions has its size
        choice = q.position_choice(
            [r.box for r in regions], im.width, im.height, cfg.sides, q.named_axes(phrase)
        )
        if choice is None:
            skipped["grounding: the phrase states the position, or its boxes are apart"] += 1
            continue
        options, letter = choice
        out.append(
            (
                "grounding",
                q.grounding_question(phrase, options, cfg.sides),
                letter,
                options,
                regions,
                [label],
            )
        )
    return out


def _sample(
    im: AnnotatedImage, cfg: GroundConfig, qtype: str, n: int, question: str, answer: str,
    options: dict[str, str], regions: list[Region], labels: list[str],
) -> VQASample:  # fmt: skip
    is_choice = bool(options)
    return VQASample(
        id=f"{cfg.dataset}-{im.split}-{qtype}-{n}",
        dataset=cfg.dataset,
        split=im.split,  # type: ignore[arg-type]
        images=[im.path],
        question=question,
        options=options,
        answer=options[answer] if is_choice else answer,
        answer_letter=answer if is_choice else None,
        answer_type="choice" if is_choice else ("closed" if qtype == "presence" else "open"),
        rois=[ROI(box=r.box, label=r.label) for r in regions],
        modality=im.modality,
        organ=im.organ,
        question_type=qtype,
        meta={
            "image": im.key,
            "group": im.group,
            "labels": labels,
            "image_size": [im.width, im.height],
            **im.meta,
        },
    )


def _render_used(result: GroundResult) -> None:
    used = {s.images[0] for s in result.samples}
    for im in result.images:
        if im.render is not None and im.path in used and not Path(im.path).is_file():
            Path(im.path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(im.path).with_suffix(".tmp.png")
            im.render().save(tmp)
            tmp.replace(im.path)
