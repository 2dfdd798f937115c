"""SLAKE's own regions (Liu et al., ISBI 2021; CC BY 4.0): `detection.json` boxes and `mask.png` label maps.

Licence and access: CC BY 4.0, public download (www.med-vqa.com/slake); attribute the paper.

Release files read:
- `imgs/xmlabN/source.jpg` with `detection.json` = a list of one-key objects `{"<name>": [x, y,
  w, h]}` (absolute pixels, top-left origin) and `mask.png`, a label map of the same size.
- `train.json`, `validate.json`, `test.json`: the question files; an image's split is the file
  whose records use it (the official split is by image), `validate` becoming "val". An image no
  record uses gets a seeded split. `modality` and `location` (the body region) come from them.

Regions: the detection boxes (`regions="boxes"`, the default; zero-size boxes dropped), or the
mask's connected components (`regions="masks"`): the release does not name mask values, so each
value takes the name of the detection box its pixels' bounding box overlaps most (IoU >= 0.5);
values matching no box are left out. An image's boxes cover the structures it shows, so a name
without a box is absent there, but negatives are only drawn from images of the same modality and
body region ("Is there any liver?" is asked of abdominal CT, not of brain MRI). The group is the
image (no patient ids). Sides: the patient's (radiological convention for CT, MRI and X-ray).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from medlvr.data.ground.annotations import AnnotatedImage, Region, image_size, iou
from medlvr.data.ground.readers import components, read_mask_array
from medlvr.data.sources._common import SourceError, read_json, release_glob, text
from medlvr.data.sources.slake import read_detections

NAME = "slake-ground"
SPLIT_FILES = {"train.json": "train", "validate.json": "val", "test.json": "test"}
DEFAULTS: dict[str, Any] = {"sides": "patient", "negatives_within": ("modality", "organ")}
MIN_NAMING_IOU = 0.5


def read_slake(
    root: Path, regions: Literal["boxes", "masks"] = "boxes", min_area: int = 16
) -> list[AnnotatedImage]:
    """Annotated images of every `imgs/*/source.jpg` that has a `detection.json`."""
    root = Path(root)
    if regions not in ("boxes", "masks"):
        raise SourceError(f"{NAME}: regions must be 'boxes' or 'masks', got {regions!r}")
    info = _image_info(root)
    out = []
    for det in release_glob(root, "imgs/*/detection.json", NAME):
        folder = det.parent
        image = folder / "source.jpg"
        width, height = image_size(image)
        boxes = _detections(det)
        found = (
            _mask_regions(folder / "mask.png", boxes, width, height, min_area)
            if regions == "masks"
            else boxes
        )
        split, modality, organ = info.get(f"{folder.name}/source.jpg", (None, None, None))
        out.append(AnnotatedImage(key=folder.name, path=str(image.resolve()), width=width, height=height, regions=found,
                                  split=split, modality=modality, organ=organ))  # fmt: skip
    return out


def _image_info(root: Path) -> dict[str, tuple[str, str | None, str | None]]:
    """img_name -> (split, modality, body region) from the question files present."""
    info: dict[str, tuple[str, str | None, str | None]] = {}
    for file, split in SPLIT_FILES.items():
        path = root / file
        if not path.is_file():
            continue
        for rec in read_json(path, NAME):
            info.setdefault(
                text(rec["img_name"]),
                (split, text(rec.get("modality")) or None, text(rec.get("location")) or None),
            )
    return info


def _detections(path: Path) -> list[Region]:
    return [Region(text(name), box) for name, box in read_detections(path)[0]]


def _mask_regions(
    path: Path, boxes: list[Region], width: int, height: int, min_area: int
) -> list[Region]:
    label_map = read_mask_array(path)
    if label_map.shape != (height, width):
        raise SourceError(
            f"{NAME}: {path} is {label_map.shape[1]}x{label_map.shape[0]}, its image {width}x{height}"
        )
    out: list[Region] = []
    for value in np.unique(label_map[label_map > 0]).tolist():
        ys, xs = np.nonzero(label_map == value)
        extent = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        best = max(boxes, key=lambda r: iou(r.box, extent), default=None)
        if best is None or iou(best.box, extent) < MIN_NAMING_IOU:
            continue
        out.extend(Region(best.label, box) for box in components(label_map == value, min_area))
    return out
