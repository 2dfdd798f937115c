"""NIH ChestX-ray14 boxes (Wang et al., CVPR 2017): `BBox_List_2017.csv` over the 1024 x 1024 PNGs.

Licence and access: public download from the NIH Clinical Center (nihcc.app.box.com, also on
Kaggle as "NIH Chest X-rays", listed CC0), with no restriction on use; the NIH asks that users
cite the paper and acknowledge the NIH Clinical Center as the data provider.

Release files read:
- `BBox_List_2017.csv`: 984 boxes on 880 images, 8 findings (Atelectasis, Cardiomegaly, Effusion,
  Infiltrate, Mass, Nodule, Pneumonia, Pneumothorax). Header `Image Index,Finding Label,Bbox
  [x,y,w,h],,,`: the unquoted name spreads over columns 3-6, which hold x, y, w, h in PNG
  pixels, so they are read by position.
- images `images/<Image Index>`, or the Kaggle layout `images_001/images/...` (found by name).
- `Data_Entry_2017.csv` (or `Data_Entry_2017_v2020.csv`), optional: `Image Index` and its
  image-level `Finding Labels` (`A|B`, "No Finding"). A finding is absent from an image only if
  this file says so (the box list is not exhaustive: an image may carry a finding without its
  box), so without the file there are no negatives and no presence questions. The box list's
  "Infiltrate" is the data entry's "Infiltration". A labelled finding without a box is neither
  asked about nor counted.
- `train_val_list.txt`, `test_list.txt`, optional: the official patient-wise split (train_val
  becomes "train"; carve a validation part with `val_fraction`). Without them: seeded by patient.

Patient: the 8-digit number that starts the file name (`00013118_008.png` -> `00013118`), the
data entry's Patient ID. Sides: the patient's (frontal films, radiological convention).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from medlvr.data.ground.annotations import AnnotatedImage
from medlvr.data.ground.readers import CsvColumns, read_box_csv
from medlvr.data.sources._common import SourceError, release_file, text

NAME = "nih-cxr14"
BOX_FILE = "BBox_List_2017.csv"
COLUMNS = CsvColumns(image="#1", label="#2", x="#3", y="#4", w="#5", h="#6")
DATA_ENTRY = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
SPLIT_LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}
ENTRY_NAMES = {"Infiltration": "Infiltrate"}  # data-entry spelling -> box-list spelling
DEFAULTS: dict[str, Any] = {"sides": "patient", "modality": "X-Ray", "organ": "Chest"}


def read_nih_cxr14(root: Path) -> list[AnnotatedImage]:
    """Annotated images: every boxed image, plus data-entry images on disk as negatives."""
    root = Path(root)
    files = {p.name: p for p in root.glob("images*/**/*.png")}
    splits = _split_lists(root)
    boxed = read_box_csv(
        release_file(root, BOX_FILE, NAME), root, COLUMNS, resolve=lambda name: _find(files, name)
    )
    entries = _data_entry(root)
    labels = {r.label for im in boxed for r in im.regions}
    out = []
    for im in boxed:
        im.absent = frozenset(labels - entries[im.key]) if im.key in entries else frozenset()
        out.append(_finish(im, splits))
    known = {im.key for im in out}
    for name, findings in sorted(entries.items()):
        if name in known or name not in files or (splits and name not in splits):
            continue
        im = AnnotatedImage(key=name, path=str(files[name].resolve()), width=None, height=None,
                            absent=frozenset(labels - findings))  # fmt: skip
        out.append(_finish(im, splits))
    return out


def _find(files: dict[str, Path], name: str) -> Path:
    if name not in files:
        raise SourceError(
            f"{NAME}: image {name} not found under images*/ (is --root the unpacked release?)"
        )
    return files[name]


def _finish(im: AnnotatedImage, splits: dict[str, str]) -> AnnotatedImage:
    im.group = im.key.split("_")[0]
    im.split = splits.get(im.key)
    return im


def _split_lists(root: Path) -> dict[str, str]:
    out = {}
    for split, name in SPLIT_LISTS.items():
        path = root / name
        if path.is_file():
            out.update(
                {
                    line.strip(): split
                    for line in path.read_text(encoding="utf-8-sig").splitlines()
                    if line.strip()
                }
            )
    return out


def _data_entry(root: Path) -> dict[str, set[str]]:
    """Image -> its image-level findings (box-list spelling), from the data entry file if present."""
    path = next((root / n for n in DATA_ENTRY if (root / n).is_file()), None)
    if path is None:
        return {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"Image Index", "Finding Labels"} <= set(rows[0]):
        raise SourceError(
            f"{NAME}: {path.name} lacks the 'Image Index' and 'Finding Labels' columns"
        )
    return {
        text(r["Image Index"]): {
            ENTRY_NAMES.get(f, f) for f in text(r["Finding Labels"]).split("|")
        }
        for r in rows
    }
