"""The generic inputs by name (`coco`, `csv`, `masks`, `nifti`), with options as a command line gives them.

`read_generic("csv", annotations=["train=boxes_train.csv"], images="imgs", columns="image=file,...")`
parses the option strings and calls the matching reader of `medlvr.data.ground.readers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medlvr.data.ground.annotations import AnnotatedImage
from medlvr.data.ground.readers import (
    CsvColumns,
    ReaderFusion,
    read_box_csv,
    read_coco,
    read_mask_folder,
    read_nifti_folder,
)
from medlvr.data.sources._common import SourceError

GENERIC = ("coco", "csv", "masks", "nifti")


def parse_annotation_files(specs: Sequence[str]) -> list[tuple[Path, str | None]]:
    """`["train=a.json", "b.json"]` -> `[(a.json, "train"), (b.json, None)]`: the official split of each file."""
    out: list[tuple[Path, str | None]] = []
    for spec in specs:
        name, sep, file = spec.partition("=")
        path, split = (
            (Path(file), name.strip()) if sep and not Path(spec).is_file() else (Path(spec), None)
        )
        if not path.is_file():
            raise SourceError(f"annotation file not found: {path}")
        out.append((path, split or None))
    if not out:
        raise SourceError("give the annotation file(s) with --annotations [SPLIT=]FILE")
    return out


def parse_labels(spec: str) -> dict[int, str]:
    """`"1=liver,2=liver tumour"` -> `{1: "liver", 2: "liver tumour"}`: mask values and their names."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        value, sep, name = part.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise SourceError(f"label spec {part!r}: expected <mask value>=<name>, e.g. 1=liver")
        out[int(value)] = name.strip()
    if not out:
        raise SourceError(
            "give the mask values and their names with --labels, e.g. '1=liver,2=liver tumour'"
        )
    return out


def read_generic(
    kind: str,
    *,
    annotations: Sequence[str] = (),
    images: str | None = None,
    masks: str | None = None,
    columns: str | None = None,
    image_suffix: str = "",
    labels: str = "",
    group_field: str | None = None,
    phrase_field: str | None = None,
    min_iou: float = 0.4,
    min_readers: int = 2,
    min_area: int = 16,
    threshold: int | None = None,
    mask_suffix: str = "",
    axis: int = 2,
    slice_step: int = 1,
    empty_slices: int = 0,
    export_dir: str | None = None,
) -> list[AnnotatedImage]:
    """Annotated images of a generic input (see the readers for what each option means)."""
    if kind not in GENERIC:
        raise SourceError(f"unknown input {kind!r}; generic inputs: {', '.join(GENERIC)}")
    if images is None or not Path(images).is_dir():
        raise SourceError(f"{kind}: give the image folder with --images (got {images})")
    root = Path(images)
    if kind == "coco":
        return [im for path, split in parse_annotation_files(annotations)
                for im in read_coco(path, root, split=split, group_field=group_field, phrase_field=phrase_field)]  # fmt: skip
    if kind == "csv":
        if not columns:
            raise SourceError(
                "csv: give the columns with --columns, e.g. 'image=file,label=finding,x0=xmin,y0=ymin,x1=xmax,y1=ymax'"
            )
        spec = CsvColumns.parse(columns)
        fusion = ReaderFusion(min_iou, min_readers) if spec.reader else None
        return [im for path, split in parse_annotation_files(annotations)
                for im in read_box_csv(path, root, spec, image_suffix=image_suffix, split=split, fusion=fusion)]  # fmt: skip
    if masks is None or not Path(masks).is_dir():
        raise SourceError(f"{kind}: give the mask folder with --masks (got {masks})")
    if kind == "masks":
        return read_mask_folder(
            Path(masks),
            root,
            parse_labels(labels),
            min_area=min_area,
            threshold=threshold,
            mask_suffix=mask_suffix,
        )
    if export_dir is None:
        raise SourceError("nifti: slices need an export folder")
    return read_nifti_folder(Path(masks), root, parse_labels(labels), Path(export_dir), axis=axis, slice_step=slice_step,
                             empty_slices=empty_slices, min_area=min_area, mask_suffix=mask_suffix)  # fmt: skip
