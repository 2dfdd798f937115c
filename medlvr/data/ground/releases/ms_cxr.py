"""MS-CXR phrase grounding (Boecking et al., ECCV 2022): `MS_CXR_Local_Alignment_*.csv` over MIMIC-CXR-JPG.

Licence and access: PhysioNet credentialed access under the PhysioNet Credentialed Health Data
License 1.5.0, for MS-CXR and for the MIMIC-CXR-JPG images it points to (credentialed account,
CITI training, signed data use agreement for each project); no redistribution of either.

Release files read:
- `MS_CXR_Local_Alignment_v1.1.0.csv` (or v1.0.0; the newest present is used): one box per row,
  `dicom_id, category_name, label_text, path, x, y, w, h, image_width, image_height` and, from
  v1.1.0, `split` (train / val / test). `label_text` is the report phrase the box grounds;
  `path` is `files/p1X/p<subject>/s<study>/<dicom_id>.jpg` under MIMIC-CXR-JPG; x, y, w, h are
  pixels of that JPG.
- the MIMIC-CXR-JPG images: `images` names the folder holding `files/` (default: `root`).

Official split: v1.1.0's `split` column; v1.0.0 has none, so a seeded split by patient. Patient:
the `p<subject>` folder of `path`. Only some findings of an image are boxed (those its report
phrases name), so nothing is known to be absent and boxes are not counted: the release yields
phrase-grounding questions, one per (image, phrase), with all of the phrase's boxes as ROIs.
Sides: the patient's (frontal films, radiological convention).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlvr.data.ground.annotations import AnnotatedImage
from medlvr.data.ground.readers import CsvColumns, csv_header, read_box_csv
from medlvr.data.sources._common import release_glob

NAME = "ms-cxr"
DEFAULTS: dict[str, Any] = {
    "sides": "patient",
    "modality": "X-Ray",
    "organ": "Chest",
    "question_types": ("grounding",),
}


def read_ms_cxr(root: Path, images: Path | None = None) -> list[AnnotatedImage]:
    """Annotated images of the newest `MS_CXR_Local_Alignment_*.csv` under `root`."""
    root = Path(root)
    path = release_glob(root, "MS_CXR_Local_Alignment_*.csv", NAME)[-1]
    has_split = "split" in csv_header(path)
    columns = CsvColumns(image="path", label="category_name", x="x", y="y", w="w", h="h", phrase="label_text",
                         width="image_width", height="image_height", split="split" if has_split else None)  # fmt: skip
    base = Path(images) if images else root
    out = read_box_csv(path, base, columns, exhaustive=False)
    for im in out:
        parts = Path(im.key).parts
        im.meta["dicom_id"] = Path(im.key).stem
        im.group = parts[2] if len(parts) > 3 else im.key
        im.partial = frozenset(im.labels)  # boxed only where a phrase named it: not exhaustive
    return out
