"""Presets for public detection and segmentation releases: each a documented adapter over the generic readers.

`RELEASES[name]` holds the reader (`read(root, **opts) -> list[AnnotatedImage]`) and the
`GroundConfig` defaults the release calls for (whose sides the positions use, modality ...).
Each reader's module docstring names the release files, the licence and access terms, the
official split and how its annotations become regions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medlvr.data.ground.annotations import AnnotatedImage
from medlvr.data.ground.releases import kvasir_seg, ms_cxr, nih_cxr14, slake, vindr_cxr


@dataclass(frozen=True)
class Release:
    name: str
    read: Callable[..., list[AnnotatedImage]]
    defaults: dict[str, Any] = field(default_factory=dict)


RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        Release(nih_cxr14.NAME, nih_cxr14.read_nih_cxr14, nih_cxr14.DEFAULTS),
        Release(vindr_cxr.NAME, vindr_cxr.read_vindr_cxr, vindr_cxr.DEFAULTS),
        Release(ms_cxr.NAME, ms_cxr.read_ms_cxr, ms_cxr.DEFAULTS),
        Release(kvasir_seg.NAME, kvasir_seg.read_kvasir_seg, kvasir_seg.DEFAULTS),
        Release(slake.NAME, slake.read_slake, slake.DEFAULTS),
    )
}

__all__ = ["RELEASES", "Release"]
