"""Splits by patient or image, never by question: official splits kept, the rest seeded by group."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from medlvr.data.ground.annotations import AnnotatedImage
from medlvr.data.schema import VQASample
from medlvr.data.sources._common import SourceError

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def assign_splits(
    images: Sequence[AnnotatedImage],
    seed: int,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    val_fraction: float = 0.0,
) -> list[str]:
    """Groups that straddle official splits (a release defect); sets `split` on every image in place.

    An image keeps its official split. A group none of whose images has one gets a seeded split:
    the sorted groups are permuted with `seed` and cut at the cumulative `fractions`. A group with
    an official split passes it to its other images. `val_fraction` then moves that fraction of
    the train groups to "val" (seeded), for releases whose official split has no validation part.
    """
    check_fractions(fractions, val_fraction)
    official: dict[str, set[str]] = defaultdict(set)
    for im in images:
        if im.split:
            official[im.group].add(im.split)
    straddling = sorted(g for g, s in official.items() if len(s) > 1)
    free = sorted({im.group for im in images} - set(official))
    chosen = _cut(free, seed, fractions)
    for im in images:
        if not im.split:
            im.split = chosen[im.group] if im.group in chosen else next(iter(official[im.group]))
    if val_fraction:
        train_groups = sorted({im.group for im in images if im.split == "train"} - set(straddling))
        moved = set(
            _cut(
                train_groups, seed + 1, {"val": val_fraction, "train": 1 - val_fraction}, keep="val"
            )
        )
        for im in images:
            if im.group in moved:
                im.split = "val"
    return straddling


def check_fractions(fractions: Mapping[str, float], val_fraction: float = 0.0) -> None:
    if (
        not fractions
        or abs(sum(fractions.values()) - 1.0) > 1e-6
        or any(f < 0 for f in fractions.values())
    ):
        raise SourceError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    if not 0.0 <= val_fraction < 1.0:
        raise SourceError(f"val_fraction must be in [0, 1), got {val_fraction}")


def parse_fractions(spec: str) -> dict[str, float]:
    """`"train=0.8,val=0.1,test=0.1"` -> `{"train": 0.8, "val": 0.1, "test": 0.1}` (checked)."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise SourceError(
                f"split fraction {part!r}: expected <split>=<fraction>, e.g. train=0.8"
            )
    check_fractions(out)
    return out


def _cut(
    groups: Sequence[str], seed: int, fractions: Mapping[str, float], keep: str | None = None
) -> dict[str, str]:
    order = np.random.default_rng(seed).permutation(len(groups))
    bounds = np.round(np.cumsum(list(fractions.values())) * len(groups)).astype(int)
    names = list(fractions)
    out = {}
    for rank, i in enumerate(order):
        split = names[int(np.searchsorted(bounds, rank, side="right"))]
        if keep is None or split == keep:
            out[groups[i]] = split
    return out


def split_leaks(samples: Iterable[VQASample]) -> dict[str, set[str]]:
    """Groups (patients, else images) found in more than one split, with their splits: should be empty."""
    seen: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        seen[str(s.meta.get("group", s.meta.get("image", s.id)))].add(s.split)
        for image in s.images:
            seen[f"image:{image}"].add(s.split)
    return {g: splits for g, splits in seen.items() if len(splits) > 1}
