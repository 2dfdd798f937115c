"""Generic readers of detection and segmentation annotations: COCO JSON, a CSV of boxes, a folder of masks.

Each returns `AnnotatedImage`s for `medlvr.data.ground.build.build_grounded`. The
release presets in `medlvr.data.ground.releases` are thin adapters over these.
"""

from __future__ import annotations

import csv
import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from medlvr.data.ground.annotations import (
    AnnotatedImage,
    Box,
    Region,
    fuse_reader_boxes,
    image_size,
    xywh,
)
from medlvr.data.sources._common import SourceError, read_json, text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


# ---------------------------------------------------------------------------- COCO


def read_coco(
    path: Path,
    image_root: Path,
    *,
    split: str | None = None,
    group_field: str | None = None,
    phrase_field: str | None = None,
    modality: str | None = None,
    organ: str | None = None,
) -> list[AnnotatedImage]:
    """Images of a COCO detection file: `images` (`id, file_name, width, height`), `annotations`
    (`image_id, category_id, bbox = [x, y, w, h]`, optional `iscrowd`) and `categories` (`id, name`).

    COCO annotations are exhaustive for their categories, so an image without a box of a
    category is a negative for it. A crowd annotation (`iscrowd: 1`) covers many instances:
    its box is kept as a region but its category is `partial` there (no count question).
    `group_field` names an image field holding the patient (else the image is its own group);
    `phrase_field` an annotation field holding a phrase for phrase grounding.
    """
    data = read_json(Path(path), "coco")
    try:
        categories = {c["id"]: text(c["name"]) for c in data["categories"]}
        entries = data["images"]
        annotations = data.get("annotations", [])
    except (KeyError, TypeError) as err:
        raise SourceError(
            f"{path}: not a COCO detection file ({type(err).__name__}: {err})"
        ) from None
    by_image: dict[object, list[dict]] = defaultdict(list)
    for ann in annotations:
        by_image[ann["image_id"]].append(ann)
    out = []
    for entry in entries:
        regions, partial = [], set()
        for ann in by_image.get(entry["id"], []):
            label = categories.get(ann["category_id"])
            if label is None:
                raise SourceError(
                    f"{path}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}"
                )
            phrase = text(ann.get(phrase_field)) if phrase_field else ""
            regions.append(Region(label, xywh(*ann["bbox"]), phrase or None))
            if ann.get("iscrowd"):
                partial.add(label)
        file_name = text(entry["file_name"])
        out.append(AnnotatedImage(
            key=str(entry["id"]), path=str((Path(image_root) / file_name).resolve()),
            width=int(entry["width"]), height=int(entry["height"]), regions=regions,
            group=text(entry.get(group_field)) if group_field else "", split=split,
            partial=frozenset(partial), modality=modality, organ=organ, meta={"file_name": file_name},
        ))  # fmt: skip
    return out


# ---------------------------------------------------------------------------- CSV of boxes


@dataclass(frozen=True)
class CsvColumns:
    """Which CSV column holds what: a header name, or `#N` for the N-th column counting from 1
    (for releases whose header leaves columns unnamed, like NIH's `BBox_List_2017.csv`).

    The box is either `x0, y0, x1, y1` (corners) or `x, y, w, h` (top-left corner and size).
    """

    image: str
    label: str
    x0: str | None = None
    y0: str | None = None
    x1: str | None = None
    y1: str | None = None
    x: str | None = None
    y: str | None = None
    w: str | None = None
    h: str | None = None
    phrase: str | None = None
    group: str | None = None
    split: str | None = None
    width: str | None = None
    height: str | None = None
    reader: str | None = None

    def __post_init__(self) -> None:
        corners = [self.x0, self.y0, self.x1, self.y1]
        size = [self.x, self.y, self.w, self.h]
        if not (all(corners) and not any(size)) and not (all(size) and not any(corners)):
            raise SourceError(
                "box columns: give all of x0,y0,x1,y1 (corners) or all of x,y,w,h (corner and size)"
            )

    @classmethod
    def parse(cls, spec: str) -> CsvColumns:
        """`"image=Image Index,label=Finding Label,x=#3,y=#4,w=#5,h=#6"` -> CsvColumns."""
        known = {f.name for f in fields(cls)}
        values: dict[str, str] = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise SourceError(f"column spec {part!r}: expected key=column")
            if key not in known:
                raise SourceError(
                    f"column spec: unknown key {key!r}; known: {', '.join(sorted(known))}"
                )
            values[key] = value
        for required in ("image", "label"):
            if required not in values:
                raise SourceError(f"column spec needs {required}=<column>")
        return cls(**values)


@dataclass(frozen=True)
class ReaderFusion:
    """How boxes of several readers of one image become one box set (see `fuse_reader_boxes`)."""

    min_iou: float = 0.4
    min_readers: int = 2


def read_box_csv(
    path: Path,
    image_root: Path,
    columns: CsvColumns,
    *,
    image_suffix: str = "",
    split: str | None = None,
    fusion: ReaderFusion | None = None,
    exhaustive: bool = True,
    modality: str | None = None,
    organ: str | None = None,
    resolve: Callable[[str], Path] | None = None,
) -> list[AnnotatedImage]:
    """Images of a CSV with one box per row; rows with empty box cells only register their image.

    The image file is `image_root / (value + image_suffix)` unless `resolve` maps the image
    value to a path. Sizes come from the width/height columns or the image header. With a
    `reader` column, each (image, label) pair's boxes are fused across readers (`fusion`):
    clusters with too few readers are dropped and make the label `partial` in that image
    (present for someone, so never a negative, but not countable). `exhaustive=False` says
    the CSV boxes only some findings, so nothing is known to be absent.
    """
    rows = _csv_rows(path)
    header, body = rows[0], rows[1:]
    col = {k: _column_index(v, header, path) for k, v in vars(columns).items() if v}
    entries: dict[str, dict] = {}
    for lineno, row in enumerate(body, start=2):
        if not any(cell.strip() for cell in row):
            continue
        cell = {k: text(row[i]) if i < len(row) else "" for k, i in col.items()}
        key = cell["image"]
        if not key:
            raise SourceError(f"{path}:{lineno}: empty image column")
        entry = entries.setdefault(key, {"boxes": defaultdict(list), "first": cell})
        box = _row_box(cell, path, lineno)
        if box is not None and cell["label"]:
            entry["boxes"][cell["label"]].append(
                (cell.get("reader", ""), box, cell.get("phrase") or None)
            )
    out = []
    for key, entry in entries.items():
        first = entry["first"]
        file = resolve(key) if resolve else Path(image_root) / f"{key}{image_suffix}"
        regions, partial = _regions(entry["boxes"], fusion)
        width = int(float(first["width"])) if first.get("width") else None
        height = int(float(first["height"])) if first.get("height") else None
        if regions and not (width and height):
            width, height = image_size(file)
        out.append(AnnotatedImage(
            key=key, path=str(Path(file).resolve()), width=width, height=height, regions=regions,
            group=first.get("group", ""), split=first.get("split") or split, partial=frozenset(partial),
            absent=None if exhaustive else frozenset(), modality=modality, organ=organ,
        ))  # fmt: skip
    return out


def csv_header(path: Path) -> list[str]:
    """The stripped column names of a CSV file."""
    return [h.strip() for h in _csv_rows(path)[0]]


def _csv_rows(path: Path) -> list[list[str]]:
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except OSError as err:
        raise SourceError(f"cannot read {path}: {err}") from None
    if not rows:
        raise SourceError(f"{path}: empty CSV file")
    return rows


def _column_index(spec: str, header: Sequence[str], path: Path) -> int:
    if spec.startswith("#") and spec[1:].isdigit():
        i = int(spec[1:]) - 1
        if not 0 <= i < len(header):
            raise SourceError(f"{path}: column {spec} out of range ({len(header)} columns)")
        return i
    names = [h.strip() for h in header]
    if spec not in names:
        raise SourceError(
            f"{path}: no column {spec!r}; columns: {', '.join(repr(n) for n in names)}"
        )
    return names.index(spec)


def _row_box(cell: dict[str, str], path: Path, lineno: int) -> Box | None:
    keys = ("x0", "y0", "x1", "y1") if "x0" in cell else ("x", "y", "w", "h")
    values = [cell[k] for k in keys]
    if not any(values):
        return None  # an image-level row ("No finding")
    try:
        a, b, c, d = (float(v) for v in values)
    except ValueError:
        raise SourceError(f"{path}:{lineno}: box cells {values} are not numbers") from None
    return (a, b, c, d) if keys[0] == "x0" else xywh(a, b, c, d)


def _regions(
    boxes: dict[str, list[tuple[str, Box, str | None]]], fusion: ReaderFusion | None
) -> tuple[list[Region], set[str]]:
    regions: list[Region] = []
    partial: set[str] = set()
    for label, marks in boxes.items():
        if fusion is None:
            regions.extend(Region(label, box, phrase) for _, box, phrase in marks)
            continue
        fused, dropped = fuse_reader_boxes(
            [(reader, box) for reader, box, _ in marks], fusion.min_iou, fusion.min_readers
        )
        regions.extend(Region(label, box) for box in fused)
        if dropped:
            partial.add(label)
    return regions, partial


# ---------------------------------------------------------------------------- masks


def components(mask: np.ndarray, min_area: int) -> list[Box]:
    """Boxes `(x0, y0, x1, y1)` (pixel edges) of the 8-connected components of a boolean mask with at
    least `min_area` pixels, in raster order of their first pixel."""
    from scipy import ndimage

    labelled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labelled), start=1):
        if sl is not None and sizes[i] >= min_area:
            ys, xs = sl
            boxes.append((float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)))
    return boxes


def label_regions(label_map: np.ndarray, labels: dict[int, str], min_area: int) -> list[Region]:
    """Regions of a 2-D label map: each named value's connected components of at least `min_area` pixels."""
    regions: list[Region] = []
    for value, name in sorted(labels.items()):
        regions.extend(Region(name, box) for box in components(label_map == value, min_area))
    return regions


def read_mask_array(path: Path, threshold: int | None = None) -> np.ndarray:
    """A 2-D label map from a mask image: palette indices for palette PNGs, grey levels otherwise;
    with `threshold`, 1 where the grey level is >= threshold (JPEG masks carry compression noise)."""
    try:
        with Image.open(path) as im:
            keep = im.mode in ("P", "L", "I", "I;16", "1")
            arr = np.asarray(im if keep else im.convert("L"))
    except OSError as err:
        raise SourceError(f"cannot read mask {path}: {err}") from None
    if threshold is not None:
        return (arr >= threshold).astype(np.uint8)
    return arr.astype(np.int64)


def read_mask_folder(
    masks: Path,
    images: Path,
    labels: dict[int, str],
    *,
    min_area: int = 16,
    threshold: int | None = None,
    mask_suffix: str = "",
    split: str | None = None,
    modality: str | None = None,
    organ: str | None = None,
) -> list[AnnotatedImage]:
    """2-D masks (PNG label maps; JPEG masks with `threshold`) beside images of the same stem.

    A mask `<stem><mask_suffix>.<ext>` in `masks` labels the image `<stem>.<any ext>` in `images`;
    `labels` maps mask values to names (values not listed are ignored); each value's connected
    components of at least `min_area` pixels become regions. A label map is exhaustive: an image
    whose mask lacks a label is a negative for it. The mask must have the image's size.
    """
    found = sorted(p for p in Path(masks).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise SourceError(f"no mask images in {masks}")
    by_stem = {p.stem: p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    out = []
    for mask_path in found:
        stem = (
            mask_path.stem[: -len(mask_suffix)]
            if mask_suffix and mask_path.stem.endswith(mask_suffix)
            else mask_path.stem
        )
        if stem not in by_stem:
            raise SourceError(f"mask {mask_path.name} has no image {stem}.* in {images}")
        image = by_stem[stem]
        label_map = read_mask_array(mask_path, threshold)
        width, height = image_size(image)
        if label_map.shape != (height, width):
            raise SourceError(
                f"mask {mask_path} is {label_map.shape[1]}x{label_map.shape[0]}, its image {width}x{height}"
            )
        out.append(AnnotatedImage(
            key=stem, path=str(image.resolve()), width=width, height=height,
            regions=label_regions(label_map, labels, min_area), split=split, modality=modality, organ=organ,
        ))  # fmt: skip
    return out


def read_nifti_folder(
    labels_dir: Path,
    images_dir: Path,
    labels: dict[int, str],
    export_dir: Path,
    *,
    axis: int = 2,
    slice_step: int = 1,
    empty_slices: int = 0,
    min_area: int = 16,
    mask_suffix: str = "",
    modality: str | None = None,
    organ: str | None = None,
) -> list[AnnotatedImage]:
    """NIfTI label volumes sliced to 2-D along `axis`, beside image volumes of the same name.

    Every `slice_step`-th slice holding a listed label becomes an image, plus `empty_slices`
    evenly spaced label-free slices per volume (negatives from the same patient). Slices are
    rendered as `medlvr.data.images.load_image` shows them (0.5-99.5 percentile range, rotated
    90 degrees counter-clockwise, first volume of a 4-D series) and written as PNG to
    `export_dir` when a sample uses them; the label plane gets the same rotation, so boxes are
    in the PNG's pixels. The volume is the group: slices of one patient never straddle splits.
    """
    import nibabel as nib
    from nibabel.dataobj_images import DataobjImage

    from medlvr.data.images import load_image

    found = sorted(p for p in Path(labels_dir).iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not found:
        raise SourceError(f"no NIfTI label volumes in {labels_dir}")
    if axis not in (0, 1, 2) or slice_step < 1 or empty_slices < 0:
        raise SourceError(
            f"axis must be 0, 1 or 2, slice_step >= 1 and empty_slices >= 0; got {axis}, {slice_step}, {empty_slices}"
        )
    out = []
    for label_path in found:
        case = label_path.name.removesuffix(".gz").removesuffix(".nii")
        case = case[: -len(mask_suffix)] if mask_suffix and case.endswith(mask_suffix) else case
        image_path = next(
            (
                images_dir / f"{case}{ext}"
                for ext in (".nii.gz", ".nii")
                if (images_dir / f"{case}{ext}").is_file()
            ),
            None,
        )
        if image_path is None:
            raise SourceError(
                f"label volume {label_path.name} has no image volume {case}.nii[.gz] in {images_dir}"
            )
        label_img, image_img = nib.load(str(label_path)), nib.load(str(image_path))
        assert isinstance(label_img, DataobjImage) and isinstance(image_img, DataobjImage)  # .nii
        volume = np.asanyarray(label_img.dataobj).astype(np.int64)
        image_shape = tuple(image_img.shape[:3])
        if volume.shape[:3] != image_shape:
            raise SourceError(
                f"{label_path.name}: label volume {volume.shape[:3]} and image volume {image_shape} differ"
            )
        listed = np.isin(volume, list(labels))
        has_label = listed.any(axis=tuple(i for i in range(3) if i != axis))
        labelled = np.flatnonzero(has_label)[::slice_step]
        empty = np.flatnonzero(~has_label)
        picks = (
            empty[np.linspace(0, len(empty) - 1, empty_slices).round().astype(int)]
            if empty_slices and len(empty)
            else []
        )
        for k in sorted({*labelled.tolist(), *np.asarray(picks, dtype=int).tolist()}):
            plane = np.rot90(np.take(volume, k, axis=axis))  # as load_image orients the image plane
            height, width = plane.shape
            out.append(AnnotatedImage(
                key=f"{case}_axis{axis}_{k:04d}", path=str((Path(export_dir) / f"{case}_axis{axis}_{k:04d}.png").resolve()),
                width=width, height=height, regions=label_regions(plane, labels, min_area), group=case,
                modality=modality, organ=organ, meta={"volume": str(image_path), "axis": axis, "slice": k},
                render=functools.partial(load_image, image_path, nifti_axis=axis, nifti_slice=k),
            ))  # fmt: skip
    return out
