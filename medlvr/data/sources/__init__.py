"""Benchmark converters: `convert(name, root, split)` turns a release folder into `VQASample`s.

Each converter's docstring names the release files it reads, the official
split and the answer normalisation it applies.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from medlvr.data.schema import VQASample, outside
from medlvr.data.sources._common import SourceError
from medlvr.data.sources.medframeqa import convert_medframeqa
from medlvr.data.sources.medxpertqa_mm import convert_medxpertqa_mm
from medlvr.data.sources.mmmu_med import convert_mmmu_med
from medlvr.data.sources.omnimedvqa import convert_omnimedvqa
from medlvr.data.sources.pathvqa import convert_pathvqa
from medlvr.data.sources.pmc_vqa import convert_pmc_vqa
from medlvr.data.sources.slake import convert_slake
from medlvr.data.sources.vqa_rad import convert_vqa_rad

SOURCES: dict[str, Callable[..., list[VQASample]]] = {
    "vqa-rad": convert_vqa_rad,
    "slake": convert_slake,
    "pathvqa": convert_pathvqa,
    "omnimedvqa": convert_omnimedvqa,
    "pmc-vqa": convert_pmc_vqa,
    "mmmu-med": convert_mmmu_med,
    "medxpertqa-mm": convert_medxpertqa_mm,
    "medframeqa": convert_medframeqa,
}

# Converters that extract embedded images and so accept `image_dir`.
EMBEDS_IMAGES = frozenset({"pathvqa", "mmmu-med", "medframeqa"})


def convert(name: str, root: str | Path, split: str | None = None, **opts: Any) -> list[VQASample]:
    """Run the converter registered as `name` on the release folder `root`."""
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{name}: release folder not found: {root}")
    try:
        samples = SOURCES[name](root, split, **opts)
    except KeyError as err:  # a field every record of the release has
        raise SourceError(
            f"{name}: a record under {root} has no {err} field: is --root the {name} release?"
        ) from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "record"
        raise SourceError(
            f"{name}: a record under {root} does not convert: {where}: {first['msg']}"
        ) from None
    roots = [root, *([opts["image_dir"]] if opts.get("image_dir") else [])]
    for s in samples:  # a release file is untrusted: its image paths stay in the release
        escaped = next((p for p in s.images if outside(p, roots)), None)
        if escaped is not None:
            raise SourceError(
                f"{name}: {s.id} names an image outside the release folder {root}: {escaped}"
            )
    if not samples:  # empty input is an error: never a file of 0 samples and exit code 0
        which = f"split {split!r} of " if split else ""
        raise SourceError(f"{name}: no question converted from {which}{root}")
    return samples


__all__ = ["EMBEDS_IMAGES", "SOURCES", "SourceError", "convert"]
