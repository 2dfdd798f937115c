"""Benchmark converters: `convert(name, root, split)` turns a release folder into `VQASample`s.

Each converter's docstring names the release files it reads, the official
split and the answer normalisation it applies.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medlvr.data.schema import VQASample
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
    return SOURCES[name](root, split, **opts)


__all__ = ["EMBEDS_IMAGES", "SOURCES", "SourceError", "convert"]
