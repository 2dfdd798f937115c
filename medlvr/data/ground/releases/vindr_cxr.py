"""VinDr-CXR boxes (Nguyen et al., Scientific Data 2022): `annotations_{train,test}.csv` over DICOM images.

Licence and access: PhysioNet credentialed access (a credentialed PhysioNet account, the required
CITI training and the signed data use agreement) under the PhysioNet Credentialed Health Data
License 1.5.0; the data may not be shared and serve research and education only.

Release files read (PhysioNet `vindr-cxr/1.0.0/`):
- `annotations/annotations_train.csv`, `annotations/annotations_test.csv`: one box per row,
  `image_id, rad_id, class_name, x_min, y_min, x_max, y_max` in DICOM pixels; 22 local findings;
  a "No finding" row (empty coordinates) marks a reader who saw nothing.
- `train/<image_id>.dicom`, `test/<image_id>.dicom`: the images (size from the DICOM header).

Official split: train (15,000 images) and test (3,000); carve a validation part from train with
`val_fraction`. The release has no patient ids, so the group is the image.

How boxes of several readers are merged: every training image was read by three radiologists
independently. Per image and finding, the readers' boxes are clustered (`fuse_reader_boxes`): a
box joins the cluster whose mean box it overlaps with IoU >= 0.4 and that holds no box of the
same reader yet. A cluster marked by at least 2 of the 3 readers (a majority) becomes one box,
the coordinate-wise mean of its boxes; a cluster only one reader marked is dropped, and then the
finding is "partial" in that image: never a negative (someone saw it), never counted, located or
compared. A finding no reader marked is absent. Test labels are the consensus of five
radiologists, one box set, kept as released. Both thresholds are options (`min_iou`, `min_readers`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from medlvr.data.ground.annotations import AnnotatedImage
from medlvr.data.ground.readers import CsvColumns, ReaderFusion, read_box_csv
from medlvr.data.sources._common import pick_splits, release_file

NAME = "vindr-cxr"
SPLITS = ("train", "test")
COLUMNS = CsvColumns(
    image="image_id",
    label="class_name",
    x0="x_min",
    y0="y_min",
    x1="x_max",
    y1="y_max",
    reader="rad_id",
)
DEFAULTS: dict[str, Any] = {"sides": "patient", "modality": "X-Ray", "organ": "Chest"}


def _dicom_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.dicom"


def read_vindr_cxr(
    root: Path, split: str | None = None, *, min_iou: float = 0.4, min_readers: int = 2
) -> list[AnnotatedImage]:
    """Annotated images of the requested official split(s), train boxes fused across readers."""
    root = Path(root)
    out: list[AnnotatedImage] = []
    for name in pick_splits(split, SPLITS, NAME):
        path = release_file(root, f"annotations/annotations_{name}.csv", NAME)
        fusion = ReaderFusion(min_iou, min_readers) if name == "train" else None
        out += read_box_csv(
            path,
            root,
            COLUMNS,
            split=name,
            fusion=fusion,
            resolve=functools.partial(_dicom_path, root / name),
        )
    return out
