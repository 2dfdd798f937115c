"""Read any benchmark image as an 8-bit RGB `PIL.Image`: PNG/JPEG, DICOM and NIfTI.

The format is chosen from the file's content first (the `DICM` marker at byte
128, the gzip or NIfTI magic), then from its extension, because DICOM files
often carry no extension at all. Every failure is an `ImageError` whose one-line
message names the file.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medlvr.errors import ImageError, not_a_file

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest image (width x height of the decoded 2-D plane) accepted before decoding."""

NIFTI_PERCENTILES = (0.5, 99.5)
"""Robust range of a NIfTI slice: a few hot voxels must not wash out the rest."""


def load_image(
    path: str | Path,
    *,
    window: tuple[float, float] | None = None,
    dicom_frame: int = 0,
    nifti_axis: int = 2,
    nifti_slice: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load `path` as an RGB image.

    - PNG/JPEG/...: any mode and bit depth; EXIF orientation applied; alpha
      composited on black; 16-bit and float images scaled by their actual range.
    - DICOM: RescaleSlope/Intercept applied, then a linear window
      `[c - w/2, c + w/2] -> [0, 255]` from `window=(center, width)` or the
      WindowCenter/WindowWidth tags (first value when multi-valued), else the
      frame's min/max; MONOCHROME1 is inverted; `dicom_frame` picks one frame.
    - NIfTI (.nii, .nii.gz): slice `nifti_slice` (default: the middle one) along
      `nifti_axis`, scaled by its 0.5-99.5 percentiles, rotated 90 degrees
      counter-clockwise so that for RAS+ volumes anterior/superior is up.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(not_a_file(path))
    kind = _sniff(path)
    try:
        if kind == "dicom":
            return _load_dicom(path, window, dicom_frame, max_pixels)
        if kind == "nifti":
            return _load_nifti(path, nifti_axis, nifti_slice, max_pixels)
        return _load_pil(path, max_pixels)
    except ImageError:
        raise
    except (
        OSError,
        EOFError,
        SyntaxError,
        ValueError,
        zlib.error,
        RuntimeError,
        NotImplementedError,
        AttributeError,
    ) as err:
        # Decoders report truncation and corruption with many exception types.
        raise ImageError(
            f"cannot read image {path}: corrupt or truncated {kind} file ({_one_line(err)})"
        ) from None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _sniff(path: Path) -> str:
    """'dicom', 'nifti' or 'pil', from magic bytes first and the extension second."""
    with path.open("rb") as fh:
        head = fh.read(352)
    name = path.name.lower()
    if head[128:132] == b"DICM":
        return "dicom"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        return "nifti"
    if head[:2] == b"\x1f\x8b" and name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".dcm", ".dicom")):
        return "dicom"  # preamble-less DICOM: pydicom reads it with force=True
    return "pil"


def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"image too large: {path} is {width}x{height} = {width * height:,} pixels, "
            f"more than the limit of {max_pixels:,} (raise max_pixels if this is intended)"
        )


def _to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of `[lo, hi]` to `[0, 255]`, clipped; a flat image maps to 0."""
    arr = arr.astype(np.float64)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((arr - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _finite(arr: np.ndarray, path: Path, *, some: bool = False) -> np.ndarray:
    """`arr` if its values are finite (with `some`, if any is: the others become its minimum),
    else an `ImageError` naming the file: a NaN or infinite pixel has no grey level."""
    if arr.dtype.kind != "f":
        return arr
    ok = np.isfinite(arr)
    if ok.all():
        return arr
    n = int(arr.size - ok.sum())
    if some and ok.any():
        return np.where(ok, arr, arr[ok].min())
    raise ImageError(
        f"cannot read image {path}: {n:,} of its {arr.size:,} pixel values are NaN or infinite"
    )


def _gray_to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr), mode="L").convert("RGB")


# ---------------------------------------------------------------- PIL formats


def _load_pil(path: Path, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # Our own limit decides; Pillow's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            raise ImageError(
                f"unknown image format: {path} is not PNG/JPEG/DICOM/NIfTI or another known format"
            ) from None
        except Image.DecompressionBombError as err:
            raise ImageError(f"image too large: {path} ({_one_line(err)})") from None
        with im:
            _check_size(path, im.width, im.height, max_pixels)
            im.load()  # decode now so truncation surfaces here, inside the error handler
            if im.mode == "F":
                _finite(np.asarray(im), path)
            return _pil_to_rgb(ImageOps.exif_transpose(im))


def _pil_to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im)
        return _gray_to_rgb(_to_uint8(arr, float(arr.min()), float(arr.max())))
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, RGB, CMYK, YCbCr


# ---------------------------------------------------------------------- DICOM


def _first(value: Any) -> float:
    """A DS tag may be multi-valued (one value per window preset): take the first."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def _load_dicom(
    path: Path, window: tuple[float, float] | None, frame: int, max_pixels: int
) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, pixel_array

    try:
        ds = pydicom.dcmread(path, force=True)
    except InvalidDicomError as err:
        raise ImageError(f"not a valid DICOM file: {path} ({_one_line(err)})") from None
    if "PixelData" not in ds:
        raise ImageError(f"DICOM file has no pixel data: {path}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(path, cols, rows, max_pixels)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < n_frames:
        raise ImageError(f"DICOM frame {frame} out of range: {path} has {n_frames} frame(s)")
    # index= decodes only the requested frame of a multi-frame file.
    arr = pixel_array(ds, index=frame if n_frames > 1 else None)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour (pydicom already converted YBR to RGB)
        arr = _finite(arr, path)
        if arr.dtype != np.uint8:
            arr = _to_uint8(arr, float(arr.min()), float(arr.max()))
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]), mode="RGB")

    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = _finite(arr.astype(np.float64) * slope + intercept, path)
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    if window is not None:
        center, width = float(window[0]), float(window[1])
        if width <= 0:
            raise ImageError(f"window width must be positive, got {width} for {path}")
        gray = _to_uint8(values, center - width / 2, center + width / 2)
    else:
        gray = _to_uint8(values, float(values.min()), float(values.max()))
    if photometric == "MONOCHROME1":  # low values are bright in MONOCHROME1
        gray = 255 - gray
    return _gray_to_rgb(gray)


# ---------------------------------------------------------------------- NIfTI


def _load_nifti(path: Path, axis: int, index: int | None, max_pixels: int) -> Image.Image:
    import nibabel as nib
    from nibabel.dataobj_images import DataobjImage
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(str(path))
    except (ImageFileError, gzip.BadGzipFile) as err:
        raise ImageError(f"not a valid NIfTI file: {path} ({_one_line(err)})") from None
    if not isinstance(img, DataobjImage):  # nibabel reads other formats too
        raise ImageError(f"not a NIfTI volume: {path} ({type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2:
        raise ImageError(f"NIfTI volume {path} has shape {shape}: need at least 2 dimensions")
    if len(shape) == 2:
        _check_size(path, shape[0], shape[1], max_pixels)
        plane = np.asanyarray(img.dataobj)
    else:
        if axis not in (0, 1, 2):
            raise ImageError(f"nifti_axis must be 0, 1 or 2, got {axis}")
        k = shape[axis] // 2 if index is None else index
        if not 0 <= k < shape[axis]:
            raise ImageError(
                f"NIfTI slice {k} out of range: {path} has {shape[axis]} slices along axis {axis}"
            )
        in_plane = [s for i, s in enumerate(shape[:3]) if i != axis]
        _check_size(path, in_plane[0], in_plane[1], max_pixels)
        slicer: list[Any] = [slice(None)] * 3 + [0] * (
            len(shape) - 3
        )  # first volume of a 4-D series
        slicer[axis] = k
        plane = np.asanyarray(img.dataobj[tuple(slicer)])  # the proxy applies scl_slope/scl_inter
    plane = _finite(plane.astype(np.float64), path, some=True)  # masked volumes hold NaN voxels
    lo, hi = np.percentile(plane, NIFTI_PERCENTILES)
    return _gray_to_rgb(np.rot90(_to_uint8(plane, float(lo), float(hi))))
