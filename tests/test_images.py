"""`load_image`: every supported format gives the pixels computed by hand."""

from __future__ import annotations

import gzip
import shutil
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medlvr.data.images import load_image
from medlvr.errors import ImageError, MedlvrError


def _window(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.rint((values.astype(np.float64) - lo) / (hi - lo) * 255), 0, 255).astype(
        np.uint8
    )


def _gray(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im)
    assert im.mode == "RGB"
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


# ---------------------------------------------------------------------- DICOM


def test_ct_rescale_and_explicit_window():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    got = _gray(load_image(path, window=(40, 400)))
    assert np.array_equal(got, _window(hu, 40 - 200, 40 + 200))
    assert (got == 0).any() and (got == 255).any()  # the window clips on both sides


def test_ct_without_window_tags_uses_min_max():
    path = get_testdata_file("CT_small.dcm")
    raw = pydicom.dcmread(path).pixel_array
    got = _gray(load_image(path))
    assert np.array_equal(got, _window(raw, raw.min(), raw.max()))


def test_mr_window_from_tags():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert float(ds.WindowCenter) == 600 and float(ds.WindowWidth) == 1600
    got = _gray(load_image(path))
    assert np.array_equal(got, _window(ds.pixel_array, 600 - 800, 600 + 800))


def test_multi_valued_window_tags_use_first(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.WindowCenter = [300, 5000]
    ds.WindowWidth = [200, 10]
    out = tmp_path / "mw.dcm"
    ds.save_as(out)
    got = _gray(load_image(out))
    assert np.array_equal(got, _window(ds.pixel_array, 200, 400))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    out = tmp_path / "mono1.dcm"
    ds.save_as(out)
    raw = ds.pixel_array
    got = _gray(load_image(out))
    imin = np.unravel_index(raw.argmin(), raw.shape)
    imax = np.unravel_index(raw.argmax(), raw.shape)
    assert got[imin] == 255  # the lowest raw value is the brightest pixel
    assert got[imax] == 0
    assert np.array_equal(got, 255 - _window(raw, raw.min(), raw.max()))


def test_multi_frame_picks_one_frame():
    path = get_testdata_file("rtdose.dcm")
    frames = pydicom.dcmread(path).pixel_array  # [15, 10, 10]
    assert frames.shape[0] == 15
    for k in (0, 7):
        got = _gray(load_image(path, dicom_frame=k))
        assert np.array_equal(got, _window(frames[k], frames[k].min(), frames[k].max()))
    assert not np.array_equal(
        _gray(load_image(path, dicom_frame=0)), _gray(load_image(path, dicom_frame=14))
    )
    with pytest.raises(ImageError, match=r"frame 15 out of range.*15 frame"):
        load_image(path, dicom_frame=15)


def test_rgb_dicom_kept():
    path = get_testdata_file("examples_rgb_color.dcm")
    im = load_image(path)
    assert im.size == (320, 240)
    assert np.array_equal(np.asarray(im), pydicom.dcmread(path).pixel_array)


def test_dicom_without_extension_is_sniffed(tmp_path):
    plain = tmp_path / "IM000001"
    shutil.copy(get_testdata_file("CT_small.dcm"), plain)
    assert np.array_equal(
        np.asarray(load_image(plain)), np.asarray(load_image(get_testdata_file("CT_small.dcm")))
    )


def test_truncated_dicom():
    path = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(ImageError, match=r"MR_truncated.dcm"):
        load_image(path)


def test_dicom_size_guard(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 10_000
    out = tmp_path / "huge.dcm"
    ds.save_as(out)
    with pytest.raises(ImageError, match=r"too large.*10000x10000"):
        load_image(out)


# ---------------------------------------------------------------------- NIfTI


def _nifti(tmp_path: Path, vol: np.ndarray, name: str) -> Path:
    out = tmp_path / name
    nib.save(nib.Nifti1Image(vol, np.eye(4)), out)
    return out


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_default_middle_slice(tmp_path, name):
    vol = np.zeros((4, 5, 6), dtype=np.float32)
    vol[1, 2, 3] = 100.0  # only in the middle slice (6 // 2 = 3)
    vol[0, 0, 1] = 100.0  # only in slice 1
    path = _nifti(tmp_path, vol, name)
    im = load_image(path)
    assert im.size == (4, 5)  # slice [4, 5] rotated 90 degrees -> 5 rows, 4 columns
    got = _gray(im)
    # np.rot90: out[i, j] = plane[j, n - 1 - i] with n = 5, so voxel (1, 2) lands at row 2, column 1.
    assert got[2, 1] == 255 and got.sum() == 255
    got1 = _gray(load_image(path, nifti_slice=1))
    assert got1[4, 0] == 255 and got1.sum() == 255


def test_nifti_axis_and_robust_range(tmp_path):
    vol = np.tile(np.arange(5, dtype=np.int16)[None, :, None], (3, 1, 7))  # value = y
    vol[1, 1, 1] = 30000  # one hot voxel must not squash the rest
    path = _nifti(tmp_path, vol, "ax.nii.gz")
    im = load_image(path, nifti_axis=0, nifti_slice=2)  # plane [y, z] = [5, 7]
    assert im.size == (5, 7)
    got = _gray(im)
    # after rot90 the y axis runs along columns: value rises left to right, 0 -> 0 and 4 -> 255
    assert (got[:, 0] == 0).all() and (got[:, 4] == 255).all()
    assert 0 < got[0, 2] < 255
    with pytest.raises(ImageError, match="slice 9 out of range"):
        load_image(path, nifti_axis=0, nifti_slice=9)


def test_truncated_nifti(tmp_path):
    path = _nifti(
        tmp_path, np.random.default_rng(0).random((32, 32, 32)).astype(np.float32), "t.nii.gz"
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"t.nii.gz"):
        load_image(path)


# ------------------------------------------------------------- PNG / JPEG


def test_16bit_png_scaled_by_actual_range(tmp_path):
    arr = np.array([[1000, 2000], [3000, 1500]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    got = _gray(load_image(path))
    assert got.tolist() == [[0, 128], [255, 64]]


def test_palette_la_rgba_cmyk_one_bit(tmp_path):
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png"))[0, 0].tolist() == [10, 20, 30]

    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (200, 0))
    la.putpixel((1, 0), (200, 255))
    la.save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png"))[0].tolist() == [[0, 0, 0], [200, 200, 200]]

    Image.new("RGBA", (1, 1), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    assert np.asarray(load_image(tmp_path / "rgba.png"))[0, 0].tolist() == [128, 0, 0]

    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert (np.asarray(load_image(tmp_path / "cmyk.jpg")) > 250).all()  # no ink = white

    Image.new("1", (3, 3), 1).save(tmp_path / "bw.png")
    assert (np.asarray(load_image(tmp_path / "bw.png")) == 255).all()


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 255, 0))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "o6.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 1] < 50  # left half went to the top
    assert arr[35, 10, 1] > 200 and arr[35, 10, 0] < 50


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        path
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cannot read image .*cut\.png"):
        load_image(path)


def test_non_image_and_missing(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image\n")
    with pytest.raises(ImageError, match=r"unknown image format: .*notes\.txt"):
        load_image(path)
    with pytest.raises(ImageError, match="image not found"):
        load_image(tmp_path / "nope.png")
    assert issubclass(ImageError, MedlvrError)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims huge dimensions: only the header, nothing to decode."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [8_000, 40_000])  # ours (64M > 50M) and Pillow's own bomb limit
def test_size_guard(tmp_path, side):
    path = tmp_path / "bomb.png"
    _png_header_only(path, side, side)
    with pytest.raises(ImageError, match=r"too large.*bomb\.png"):
        load_image(path)


def test_size_guard_configurable(tmp_path):
    path = tmp_path / "small.png"
    Image.new("L", (20, 20)).save(path)
    assert load_image(path).size == (20, 20)
    with pytest.raises(ImageError, match="400 pixels"):
        load_image(path, max_pixels=399)


def test_gzip_without_nifti_name_is_not_nifti(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(ImageError, match="unknown image format"):
        load_image(path)
