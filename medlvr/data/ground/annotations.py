"""What a detection or segmentation release says about one image: named boxes, the split unit, what is absent.

Every reader (COCO JSON, a CSV of boxes, a folder of masks, the release presets)
produces `AnnotatedImage`s; the question builder only ever sees these. Boxes are
`(x0, y0, x1, y1)` in the pixels of the image file a model will load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from medlvr.data.sources._common import SourceError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """One annotated region: its finding or structure name, its box, and the release's phrase for it if any."""

    label: str
    box: Box
    phrase: str | None = None


@dataclass
class AnnotatedImage:
    """One image of a release with its regions and what the release lets us say about the rest."""

    key: str
    """Unique image id within the release (file stem, image_id, dicom_id ...)."""
    path: str
    """Absolute path of the image file the samples will point to."""
    width: int | None
    """Image width in pixels (needed when the image has regions)."""
    height: int | None
    regions: list[Region] = field(default_factory=list)
    group: str = ""
    """The split unit: the patient where the release identifies one, else the image key."""
    split: str | None = None
    """The release's official split of this image; None lets the builder assign a seeded split by group."""
    absent: frozenset[str] | None = None
    """Labels the release says are absent here. None = exhaustively annotated: every label of the
    release without a region in this image is absent. An empty set = nothing is known to be absent."""
    partial: frozenset[str] = frozenset()
    """Labels whose regions here may be incomplete (e.g. readers disagreed): no count, location or
    size question about them, since their answers would depend on annotations that are missing."""
    modality: str | None = None
    organ: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    render: Callable[[], Image.Image] | None = None
    """Writes nothing itself: returns the image to save at `path` when it does not exist yet (NIfTI slices)."""

    def __post_init__(self) -> None:
        if not self.group:
            self.group = self.key
        if self.regions and (not self.width or not self.height):
            raise SourceError(
                f"image {self.key}: regions need the image size, got {self.width}x{self.height}"
            )

    @property
    def labels(self) -> set[str]:
        return {r.label for r in self.regions}

    def absent_labels(self, vocabulary: Iterable[str]) -> frozenset[str]:
        """Labels known to be absent, resolving the exhaustive default against the release's vocabulary."""
        if self.absent is None:
            return frozenset(vocabulary) - self.labels - self.partial
        return self.absent - self.labels


# ---------------------------------------------------------------------------- boxes


def xywh(x: float, y: float, w: float, h: float) -> Box:
    """`[x, y, w, h]` (top-left corner, width, height) as `(x0, y0, x1, y1)`."""
    return (float(x), float(y), float(x) + float(w), float(y) + float(h))


def area(box: Box) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def iou(a: Box, b: Box) -> float:
    ix = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    iy = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = ix * iy
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def clip_box(box: Box, width: int, height: int, min_side: float = 1.0) -> Box | None:
    """The box clipped to the image, or None when less than `min_side` pixels of it remain on a side.

    Releases carry boxes that stick out by a pixel or sit wholly outside (annotation slips);
    clipping keeps the first, the builder counts and drops the second.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 - x0 < min_side or y1 - y0 < min_side:
        return None
    return (x0, y0, x1, y1)


def fuse_reader_boxes(
    boxes: Sequence[tuple[str, Box]], min_iou: float, min_readers: int
) -> tuple[list[Box], int]:
    """Merge one finding's boxes from several readers of one image.

    Boxes are clustered greedily in a fixed order (reader, then coordinates): a box joins the
    cluster whose mean box it overlaps most, with IoU >= `min_iou`, provided that cluster holds
    no box of the same reader yet; otherwise it starts a cluster. A cluster marked by at least
    `min_readers` different readers becomes one box, the coordinate-wise mean of its boxes
    (weighted box fusion with equal weights). Returns the fused boxes and the number of
    clusters dropped for lack of readers.
    """
    clusters: list[tuple[set[str], list[Box]]] = []
    for reader, box in sorted(boxes, key=lambda rb: (rb[0], rb[1])):
        best, best_iou = None, min_iou
        for readers, members in clusters:
            if reader in readers:
                continue
            overlap = iou(box, _mean(members))
            if overlap >= best_iou:
                best, best_iou = (readers, members), overlap
        if best is None:
            clusters.append(({reader}, [box]))
        else:
            best[0].add(reader)
            best[1].append(box)
    kept = [_mean(members) for readers, members in clusters if len(readers) >= min_readers]
    return kept, len(clusters) - len(kept)


def _mean(boxes: Sequence[Box]) -> Box:
    n = len(boxes)
    return tuple(sum(b[i] for b in boxes) / n for i in range(4))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- image files


def image_size(path: str | Path) -> tuple[int, int]:
    """`(width, height)` of the image `medlvr.data.images.load_image` would return, from the header only."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"image not found: {path}")
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return int(ds.Columns), int(ds.Rows)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)  # load_image applies EXIF orientation
    except OSError as err:
        raise SourceError(f"cannot read image header of {path}: {err}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
