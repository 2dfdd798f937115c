"""Kvasir-SEG polyps (Jha et al., MMM 2020): masks and `kavsir_bboxes.json`.

Licence and access: free download from Simula (datasets.simula.no/kvasir-seg); no prior
permission for academic and research use (cite the paper); commercial use needs the authors'
permission.

Release files read (the `Kvasir-SEG/` folder, or its parent):
- `kavsir_bboxes.json` (spelled so in the release): `{<image id>: {"height": H, "width": W,
  "bbox": [{"label": "polyp", "xmin", "ymin", "xmax", "ymax"}, ...]}}` in image pixels.
- `images/<image id>.jpg` and `masks/<image id>.jpg` (a white polyp on black, JPEG-compressed).

Regions: the JSON boxes (`regions="boxes"`, the default), or the connected components of the
mask thresholded at 128 with at least `min_area` pixels (`regions="masks"`; they agree with the
boxes). No official split: a seeded split by image (the release has no patient ids). Every
image shows a polyp, so there are no negatives: no presence questions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from medlvr.data.ground.annotations import AnnotatedImage, Region
from medlvr.data.ground.readers import label_regions, read_mask_array
from medlvr.data.sources._common import SourceError, read_json, text

NAME = "kvasir-seg"
BOX_FILE = "kavsir_bboxes.json"
MASK_THRESHOLD = 128
DEFAULTS: dict[str, Any] = {"modality": "Endoscopy", "organ": "Colon"}


def read_kvasir_seg(
    root: Path, regions: Literal["boxes", "masks"] = "boxes", min_area: int = 64
) -> list[AnnotatedImage]:
    """Annotated images of every entry of `kavsir_bboxes.json`."""
    root = Path(root)
    if not (root / BOX_FILE).is_file() and (root / "Kvasir-SEG" / BOX_FILE).is_file():
        root = root / "Kvasir-SEG"
    path = root / BOX_FILE
    if not path.is_file():
        raise SourceError(
            f"{NAME}: release file not found: {path} (is --root the unpacked Kvasir-SEG folder?)"
        )
    if regions not in ("boxes", "masks"):
        raise SourceError(f"{NAME}: regions must be 'boxes' or 'masks', got {regions!r}")
    out = []
    for key, entry in read_json(path, NAME).items():
        image = root / "images" / f"{key}.jpg"
        if regions == "masks":
            found = label_regions(
                read_mask_array(root / "masks" / f"{key}.jpg", MASK_THRESHOLD),
                {1: "polyp"},
                min_area,
            )
        else:
            found = [
                Region(
                    text(b.get("label")) or "polyp", (b["xmin"], b["ymin"], b["xmax"], b["ymax"])
                )
                for b in entry["bbox"]
            ]
        out.append(AnnotatedImage(key=key, path=str(image.resolve()), width=int(entry["width"]), height=int(entry["height"]),
                                  regions=found))  # fmt: skip
    return out
