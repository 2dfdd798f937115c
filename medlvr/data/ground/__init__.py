"""Grounded VQA from detection and segmentation releases: boxes or masks -> `VQASample`s with exact ROIs.

    from medlvr.data.ground import GroundConfig, build_grounded, ground, read_coco

    result = ground("vindr-cxr", root="/data/vindr-cxr/1.0.0", val_fraction=0.1)
    images = read_coco(Path("instances.json"), Path("images/"))
    result = build_grounded(images, GroundConfig(dataset="my-release"))

Modules: `annotations` (what a release says about an image), `readers` (COCO JSON, CSV of
boxes, mask folders: PNG label maps and NIfTI volumes), `questions` (templates and the coarse
position scheme), `split` (official or seeded by patient or image), `build` (the builder),
`checks` (boxes inside images and reaching tokens, question-only baseline) and `releases`
(presets for NIH ChestX-ray14, VinDr-CXR, MS-CXR, Kvasir-SEG and SLAKE).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import fields
from pathlib import Path
from typing import Any

from medlvr.data.ground.annotations import AnnotatedImage, Region
from medlvr.data.ground.build import GroundConfig, GroundResult, build_grounded
from medlvr.data.ground.generic import GENERIC, read_generic
from medlvr.data.ground.readers import (
    CsvColumns,
    ReaderFusion,
    read_box_csv,
    read_coco,
    read_mask_folder,
    read_nifti_folder,
)
from medlvr.data.ground.releases import RELEASES
from medlvr.data.schema import outside
from medlvr.data.sources._common import SourceError

CONFIG_FIELDS = frozenset(f.name for f in fields(GroundConfig))


def ground(source: str, **opts: Any) -> GroundResult:
    """Grounded samples of a release preset (`root=` its folder) or a generic input (`coco`, `csv`,
    `masks`, `nifti`; `dataset=` names the samples).

    `opts` are `GroundConfig` fields (overriding a release's defaults) and reader options
    (`split`, `regions`, `min_readers`, `images`, `columns` ...), told apart by name; an option
    the reader does not take is an error, never silently ignored.
    """
    config = {k: v for k, v in opts.items() if k in CONFIG_FIELDS}
    reader_opts = {k: v for k, v in opts.items() if k not in CONFIG_FIELDS}
    if source in GENERIC:
        read, defaults = functools.partial(read_generic, source), {"dataset": source}
    elif source in RELEASES:
        root = Path(reader_opts.pop("root", "") or "")
        if not root.is_dir():
            raise SourceError(f"{source}: release folder not found: {root} (give it with --root)")
        release = RELEASES[source]
        read, defaults = (
            functools.partial(release.read, root),
            {"dataset": source, **release.defaults},
        )
    else:
        raise SourceError(
            f"unknown source {source!r}; releases: {', '.join(RELEASES)}; generic inputs: {', '.join(GENERIC)}"
        )
    accepted = inspect.signature(read).parameters
    if unknown := sorted(set(reader_opts) - set(accepted)):
        raise SourceError(f"{source}: option(s) not used by this source: {', '.join(unknown)}")
    cfg = GroundConfig(**{**defaults, **config})  # checked before any file is read
    result = build_grounded(read(**reader_opts), cfg)
    # Annotation files are untrusted: their image paths stay in the folders the user gave.
    roots: list[str | Path] = [
        opts[k] for k in ("root", "images", "masks", "export_dir") if opts.get(k)
    ]
    for s in result.samples:
        escaped = next((p for p in s.images if outside(p, roots)), None)
        if escaped is not None:
            raise SourceError(
                f"{source}: {s.id} names an image outside the folders given ({', '.join(map(str, roots))}): "
                f"{escaped}; pass --image-root FOLDER to allow it"
            )
    return result


__all__ = [
    "GENERIC", "AnnotatedImage", "CsvColumns", "GroundConfig", "GroundResult", "RELEASES", "ReaderFusion", "Region",
    "build_grounded", "ground", "read_box_csv", "read_coco", "read_mask_folder", "read_nifti_folder",
]  # fmt: skip
