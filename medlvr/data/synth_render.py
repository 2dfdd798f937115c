"""Pixels of the embedded synthetic benchmark: modality backgrounds and lesion masks.

Everything here is a pure function of its arguments (a `numpy.random.Generator`
for the background, exact geometry for the lesions), so the same scene always
renders to the same bytes. `synth.py` decides *what* is in a scene; this module
only draws it.

Intensities are floats in [0, 1]. Every background is windowed into
`[0.5 - window/2, 0.5 + window/2]` and lesions are an additive offset of
`+-contrast`, so with `contrast > window/2` every bright lesion is brighter than
every dark one whatever lies under it (comparisons stay well posed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


def gaussian_filter(image: np.ndarray, sigma: float) -> np.ndarray:
    """scipy's Gaussian blur, imported on first use: the CLI imports this module to declare its
    options, and scipy.ndimage alone would add ~150 ms to every command's start."""
    from scipy.ndimage import gaussian_filter as blur

    return blur(image, sigma)


TOKEN_PX = 28
"""Pixels covered by one Qwen2.5-VL visual token after the 2x2 merge (patch 14)."""

MODALITIES: dict[str, str] = {
    "chest_xray": "chest",
    "brain_mri": "brain",
    "ct": "abdomen",
    "fundus": "eye",
    "histology": "tissue",
}
"""Modality style -> organ written in the record."""

SHAPES = ("round", "square", "triangle", "cross")


@dataclass(frozen=True)
class Geometry:
    """A lesion's pixels: a boolean mask whose top-left pixel is `(x0, y0)` in the image."""

    mask: np.ndarray  # [h, w] bool, tight: every row and column holds a True pixel
    x0: int
    y0: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """`[x0, y0, x1, y1]` in pixel edges: covers pixels x0..x1-1, y0..y1-1."""
        h, w = self.mask.shape
        return (self.x0, self.y0, self.x0 + w, self.y0 + h)


def lesion_geometry(shape: str, cx: float, cy: float, extent: float, size: int) -> Geometry:
    """The mask of a lesion of `shape` centred at `(cx, cy)` whose outline spans about `extent` pixels.

    Pixels are tested at their centres, so the mask (and its box) is exact.
    """
    h = extent / 2.0
    x_lo, x_hi = max(int(np.floor(cx - h)) - 1, 0), min(int(np.ceil(cx + h)) + 1, size)
    y_lo, y_hi = max(int(np.floor(cy - h)) - 1, 0), min(int(np.ceil(cy + h)) + 1, size)
    dx = (np.arange(x_lo, x_hi) + 0.5 - cx)[None, :]  # [1, w]
    dy = (np.arange(y_lo, y_hi) + 0.5 - cy)[:, None]  # [h, 1]
    if shape == "round":
        mask = dx**2 + dy**2 <= h**2
    elif shape == "square":
        # 0.9 of the extent: a square of side `extent` looks much bigger than the disc.
        s = 0.9 * h
        mask = (np.abs(dx) <= s) & (np.abs(dy) <= s)
    elif shape == "triangle":
        # Apex up, base `extent` wide at the bottom.
        t = (dy + h) / (2 * h)  # 0 at the apex, 1 at the base
        mask = (dy >= -h) & (dy <= h) & (np.abs(dx) <= t * h)
    elif shape == "cross":
        a = extent / 6.0  # arms one third of the extent wide
        mask = ((np.abs(dx) <= a) & (np.abs(dy) <= h)) | ((np.abs(dy) <= a) & (np.abs(dx) <= h))
    else:
        raise ValueError(f"unknown lesion shape {shape!r}; expected one of {', '.join(SHAPES)}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError(f"lesion of extent {extent:.1f} px has no pixels")
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return Geometry(np.ascontiguousarray(mask), x_lo + int(cols[0]), y_lo + int(rows[0]))


# --------------------------------------------------------------------------- backgrounds


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: `(x, y)`, each [size, size]."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c)


def _ellipse(
    size: int, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0
) -> np.ndarray:
    """Normalised squared radius of an (optionally rotated) ellipse: < 1 inside. [size, size]"""
    x, y = _grid(size)
    dx, dy = x - cx, y - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx / rx) ** 2 + (dy / ry) ** 2


def _soft(r2: np.ndarray, edge: float = 0.08) -> np.ndarray:
    """A soft-edged indicator from a normalised squared radius (1 inside, 0 outside)."""
    return np.clip((1.0 - r2) / edge, 0.0, 1.0)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise, about `cells` blobs across, roughly in [-1, 1]. [size, size]"""
    coarse = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    img = Image.fromarray(coarse).resize(
        (size + 2 * size // cells, size + 2 * size // cells), Image.Resampling.BICUBIC
    )
    off = size // cells
    return np.asarray(img, dtype=np.float32)[off : off + size, off : off + size] / 1.5


@functools.lru_cache(maxsize=8)
def _dicom_layer(name: str, size: int) -> np.ndarray | None:
    """A pydicom test file (shipped with pydicom) as a [size, size] float image in [0, 1], or None."""
    try:
        from pydicom import dcmread
        from pydicom.data import get_testdata_file

        path = get_testdata_file(name)
        if path is None:
            return None
        arr = dcmread(path).pixel_array.astype(np.float32)
    except Exception:  # noqa: BLE001 - the anatomy layer is decoration; render without it
        return None
    lo, hi = np.percentile(arr, [1, 99])
    arr = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    return np.asarray(
        Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
    )


def _anatomy(rng: np.random.Generator, name: str, size: int) -> np.ndarray | None:
    layer = _dicom_layer(name, size)
    if layer is None:
        return None
    if rng.random() < 0.5:
        layer = layer[:, ::-1]
    shift = rng.integers(-size // 10, size // 10 + 1, size=2)
    return np.roll(layer, tuple(int(s) for s in shift), axis=(0, 1))


def _chest_xray(rng: np.random.Generator, size: int) -> np.ndarray:
    j = rng.uniform(-0.03, 0.03, size=4)
    img = 0.25 + 0.45 * _soft(_ellipse(size, 0.5, 0.6, 0.56, 0.62), 0.3)
    for side in (-1, 1):  # lung fields: dark
        img -= 0.32 * _soft(
            _ellipse(size, 0.5 + side * (0.2 + j[0]), 0.47 + j[1], 0.17, 0.34, side * 0.12), 0.4
        )
    img += 0.25 * _soft(_ellipse(size, 0.55 + j[2], 0.66 + j[3], 0.13, 0.17), 0.5)  # heart
    x, _ = _grid(size)
    img += 0.15 * np.exp(-(((x - 0.5) / 0.05) ** 2))  # spine
    ribs = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ribs)
    width = max(size // 60, 2)
    for k in range(7):
        y0 = (0.16 + 0.1 * k + j[1]) * size
        for side in (-1, 1):
            pts = [
                (
                    (0.5 + side * t) * size,
                    y0 + (0.12 * t - 0.35 * t * t) * size * -1 + 0.05 * size * t,
                )
                for t in np.linspace(0.05, 0.45, 9)
            ]
            draw.line(pts, fill=255, width=width)
    draw.line(
        [(0.12 * size, 0.14 * size), (0.45 * size, 0.2 * size)], fill=255, width=width + 1
    )  # clavicles
    draw.line([(0.88 * size, 0.14 * size), (0.55 * size, 0.2 * size)], fill=255, width=width + 1)
    img += 0.12 * gaussian_filter(np.asarray(ribs, dtype=np.float32) / 255.0, 1.0)
    return img


def _brain_mri(rng: np.random.Generator, size: int) -> np.ndarray:
    j = rng.uniform(-0.02, 0.02, size=3)
    head = _ellipse(size, 0.5 + j[0], 0.5 + j[1], 0.46, 0.49)
    brain = _ellipse(size, 0.5 + j[0], 0.5 + j[1], 0.4, 0.43)
    img = (
        0.08 + 0.55 * _soft(head, 0.05) - 0.35 * _soft(brain, 0.05) * (1 - _soft(brain, 0.5))
    )  # skull, CSF rim
    gyri = smooth_noise(rng, size, 14)
    img += _soft(brain, 0.2) * (0.1 + 0.12 * np.tanh(3 * gyri))  # grey/white matter
    for side in (-1, 1):  # ventricles
        img -= 0.3 * _soft(
            _ellipse(size, 0.5 + side * 0.06 + j[0], 0.48 + j[2], 0.045, 0.14, side * 0.35), 0.4
        )
    return img


def _ct(rng: np.random.Generator, size: int) -> np.ndarray:
    j = rng.uniform(-0.03, 0.03, size=4)
    body = _ellipse(size, 0.5, 0.52 + j[0], 0.48, 0.42)
    img = 0.04 + 0.3 * _soft(body, 0.05) + 0.1 * _soft(body, 0.6)  # fat rim darker than muscle
    img += 0.12 * _soft(_ellipse(size, 0.33 + j[1], 0.45, 0.17, 0.2, 0.3), 0.2)  # liver
    img += 0.06 * _soft(_ellipse(size, 0.66 + j[2], 0.42, 0.1, 0.09), 0.3)  # spleen
    for side in (-1, 1):
        img += 0.14 * _soft(
            _ellipse(size, 0.5 + side * 0.17, 0.66 + j[3], 0.05, 0.08, side * 0.4), 0.3
        )  # kidneys
    img += 0.5 * _soft(_ellipse(size, 0.5, 0.8 + j[0], 0.06, 0.055), 0.3)  # vertebral body
    img += 0.4 * _soft(_ellipse(size, 0.5, 0.88 + j[0], 0.02, 0.04), 0.3)  # spinous process
    gas = smooth_noise(rng, size, 10)
    img -= 0.2 * _soft(body, 0.3) * (gas > 1.0)  # bowel gas
    return img


def _fundus(rng: np.random.Generator, size: int) -> np.ndarray:
    j = rng.uniform(-0.03, 0.03, size=3)
    retina = _ellipse(size, 0.5, 0.5, 0.49, 0.49)
    img = 0.05 + 0.5 * _soft(retina, 0.04) * (1.0 - 0.4 * np.clip(retina, 0, 1))  # brighter centre
    disc_x, disc_y = 0.72 + j[0], 0.5 + j[1]
    img += 0.35 * _soft(_ellipse(size, disc_x, disc_y, 0.07, 0.08), 0.4)  # optic disc
    img -= 0.12 * _soft(_ellipse(size, 0.4 + j[2], 0.5, 0.08, 0.08), 0.8)  # macula
    vessels = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(vessels)
    for k in range(6):
        angle = np.pi * (0.55 + 0.15 * k) + rng.uniform(-0.1, 0.1)
        pts, x, y = [], disc_x * size, disc_y * size
        for _ in range(10):
            pts.append((x, y))
            angle += rng.uniform(-0.25, 0.25)
            x, y = x + np.cos(angle) * size * 0.06, y + np.sin(angle) * size * 0.06
        draw.line(pts, fill=255, width=max(size // 60, 2))
    img -= (
        0.18
        * gaussian_filter(np.asarray(vessels, dtype=np.float32) / 255.0, 0.7)
        * _soft(retina, 0.04)
    )
    return img


def _histology(rng: np.random.Generator, size: int) -> np.ndarray:
    img = 0.75 + 0.08 * smooth_noise(rng, size, 6) + 0.05 * smooth_noise(rng, size, 20)  # stroma
    nuclei = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(nuclei)
    n = int(size * size / 500)
    xs, ys = rng.uniform(0, size, n), rng.uniform(0, size, n)
    rs = rng.uniform(1.2, 2.6, n) * size / 168
    for x, y, r in zip(xs, ys, rs, strict=True):
        draw.ellipse([x - r, y - 0.8 * r, x + r, y + 0.8 * r], fill=255)
    img -= 0.3 * gaussian_filter(np.asarray(nuclei, dtype=np.float32) / 255.0, 0.6)
    return img


_STYLES = {  # style -> (drawer, pydicom anatomy file, drawn at half resolution)
    "chest_xray": (_chest_xray, None, True),
    "brain_mri": (_brain_mri, "MR_small.dcm", True),
    "ct": (_ct, "CT_small.dcm", True),
    "fundus": (_fundus, None, True),
    "histology": (_histology, None, False),  # nuclei are a few pixels wide
}


def _draw_anatomy(rng: np.random.Generator, modality: str, size: int) -> np.ndarray:
    style, _, half = _STYLES[modality]
    if half:  # smooth anatomy: shade 4x fewer pixels, then upsample
        img = style(rng, max(size // 2, 16)).astype(np.float32)
        return np.array(
            Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
        )
    return style(rng, size).astype(np.float32)


@functools.lru_cache(maxsize=512)
def _anatomy_variant(modality: str, size: int, variant: int) -> np.ndarray:
    """Anatomy drawing number `variant` of `modality`: a pure function of its arguments, cached per process."""
    img = _draw_anatomy(
        np.random.default_rng([variant, list(_STYLES).index(modality), size]), modality, size
    )
    img.setflags(write=False)
    return img


def background(
    rng: np.random.Generator,
    modality: str,
    size: int,
    *,
    window: float = 0.4,
    texture: float = 1.0,
    anatomy_blend: float = 0.3,
    variants: int = 0,
) -> np.ndarray:
    """A grayscale scan of `modality` windowed into `[0.5 - window/2, 0.5 + window/2]`. [size, size] float32

    `variants > 0` reuses one of that many cached anatomy drawings per modality
    (mirrored at random; texture, anatomy layer and noise stay per image), which
    is several times faster than drawing every image's anatomy afresh.
    """
    if modality not in _STYLES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(_STYLES)}")
    _, dicom, _ = _STYLES[modality]
    if variants > 0:
        img = _anatomy_variant(modality, size, int(rng.integers(variants)))
        if modality == "histology":  # no up or down in a tissue section
            img = np.rot90(img, int(rng.integers(4)))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = img.copy()
    else:
        img = _draw_anatomy(rng, modality, size)
    if dicom is not None and anatomy_blend > 0:
        layer = _anatomy(rng, dicom, size)
        if layer is not None:
            img = (1 - anatomy_blend) * img + anatomy_blend * layer * (img > 0.15)
    img += texture * (0.05 * smooth_noise(rng, size, 8) + 0.025 * smooth_noise(rng, size, 30))
    x, y = _grid(size)
    img *= 1.0 - 0.35 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)  # vignette
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / max(hi - lo, 1e-6)
    return (0.5 - window / 2 + window * img).astype(np.float32)


def paint_lesion(
    img: np.ndarray, geom: Geometry, offset: float, mottled: bool, rng: np.random.Generator
) -> None:
    """Add `offset` (positive: bright, negative: dark) on the lesion's pixels, in place.

    A mottled lesion scales the offset by 0.55-1.0 in blotches: never less than
    half, so every mask pixel still differs from the background.
    """
    h, w = geom.mask.shape
    scale = np.ones((h, w), dtype=np.float32)
    if mottled:
        blotch = rng.random((max(h // 3, 2), max(w // 3, 2))).astype(np.float32)
        up = np.asarray(
            Image.fromarray(blotch).resize((w, h), Image.Resampling.NEAREST), dtype=np.float32
        )
        scale = 0.55 + 0.45 * (up > 0.5)
    region = img[geom.y0 : geom.y0 + h, geom.x0 : geom.x0 + w]
    region += np.where(geom.mask, offset * scale, 0.0).astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 8-bit grey levels (clipped, rounded). [size, size] uint8"""
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
