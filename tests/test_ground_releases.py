"""Release presets on small fixtures in each release's exact format, with exact expected counts.

Also the checks that matter over the generated data: every box inside its image and reaching
at least one visual token of every backbone family, patient-level split integrity.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlvr.data.ground import ground
from medlvr.data.ground.checks import roi_problems
from medlvr.data.ground.split import split_leaks
from medlvr.data.sources import SourceError
from medlvr.model.backbones import families, get_adapter


def _png(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 40).save(path)


def _jpeg(path: Path, size: tuple[int, int], array: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array) if array is not None else Image.new("RGB", size, (90, 40, 40))).save(
        path, quality=95
    )


def _dicom(path: Path, width: int, height: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
        "DX",
    )
    ds.set_pixel_data(np.full((height, width), 900, np.uint16), "MONOCHROME1", 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _made(result) -> dict[tuple[str, str], int]:
    return dict(result.made)


# ---------------------------------------------------------------------------- NIH ChestX-ray14


@pytest.fixture
def nih_root(tmp_path) -> Path:
    root = tmp_path / "nih"
    # Header exactly as released: the name "Bbox [x,y,w,h]" spreads over four columns, three trailing empty ones.
    (root).mkdir()
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Nodule,100.5,200.25,50.0,40.0\n"
        "00000001_000.png,Effusion,600,500,300,400\n"
        "00000002_001.png,Infiltrate,50,60,200,300,,,\n"
        "00000003_000.png,Nodule,1000,1000,50,50\n"  # sticks out of the 1024-px image: clipped
        "00000004_000.png,Mass,300,300,100,100\n"
    )
    (root / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
        "00000001_000.png,Effusion|Nodule,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
        "00000002_001.png,Infiltration|Nodule,1,2,81,F,AP,2500,2048,0.168,0.168,\n"
        "00000003_000.png,Nodule,0,3,74,F,PA,2048,2500,0.168,0.168,\n"
        "00000005_000.png,No Finding,0,5,60,M,PA,2992,2991,0.143,0.143,\n"
        "00000006_000.png,Effusion,0,6,33,F,PA,2048,2500,0.168,0.168,\n"
        "00000007_000.png,Mass,0,7,45,M,PA,2048,2500,0.168,0.168,\n"
        "00000008_000.png,No Finding,0,8,45,M,PA,2048,2500,0.168,0.168,\n"  # not on disk
    )
    (root / "train_val_list.txt").write_text(
        "00000001_000.png\n00000002_001.png\n00000005_000.png\n00000006_000.png\n00000008_000.png\n"
    )
    (root / "test_list.txt").write_text("00000003_000.png\n00000004_000.png\n00000007_000.png\n")
    for name, folder in [("00000001_000", 1), ("00000002_001", 1), ("00000005_000", 1), ("00000006_000", 1),
                         ("00000003_000", 2), ("00000004_000", 2), ("00000007_000", 2)]:  # fmt: skip
        _png(root / f"images_{folder:03d}" / "images" / f"{name}.png", (1024, 1024))
    return root


def test_nih_cxr14(nih_root):
    result = ground("nih-cxr14", root=nih_root)
    assert _made(result) == {("train", "presence"): 6, ("train", "location"): 3, ("train", "count"): 3, ("train", "size"): 1,
                             ("test", "presence"): 4, ("test", "location"): 2, ("test", "count"): 2}  # fmt: skip
    by = {(s.question_type, s.meta["image"], tuple(s.meta["labels"])): s for s in result.samples}
    # the patient's sides: the nodule sits on the image left, the patient's right
    assert by["location", "00000001_000.png", ("Nodule",)].answer == "upper right"
    assert by["location", "00000001_000.png", ("Effusion",)].answer == "lower left"
    assert by["location", "00000004_000.png", ("Mass",)].answer == "center"
    assert by["location", "00000001_000.png", ("Nodule",)].rois[0].box == (
        100.5,
        200.25,
        150.5,
        240.25,
    )
    assert by["count", "00000003_000.png", ("Nodule",)].rois[0].box == (
        1000,
        1000,
        1024,
        1024,
    )  # clipped
    # negatives come only from the data entry: image 2 is labelled Nodule without a box, image 6 Effusion
    negatives = {
        (s.meta["image"], s.meta["labels"][0])
        for s in result.samples
        if s.question_type == "presence" and s.answer == "no"
    }
    assert not negatives & {
        ("00000002_001.png", "Nodule"),
        ("00000006_000.png", "Effusion"),
        ("00000004_000.png", "Nodule"),
    }
    assert all(
        s.modality == "X-Ray" and s.meta["group"] == s.meta["image"][:8] for s in result.samples
    )
    assert Counter(s.answer for s in result.samples if s.question_type == "presence") == {
        "yes": 5,
        "no": 5,
    }
    assert split_leaks(result.samples) == {}


def test_nih_without_data_entry_has_no_negatives(nih_root):
    (nih_root / "Data_Entry_2017.csv").unlink()
    result = ground("nih-cxr14", root=nih_root)
    assert not any(s.question_type == "presence" for s in result.samples)
    assert (
        result.skipped["presence: positives without a matching negative"] == 5
    )  # boxed findings: 3 train, 2 test


# ---------------------------------------------------------------------------- VinDr-CXR


@pytest.fixture
def vindr_root(tmp_path) -> Path:
    root = tmp_path / "vindr-cxr" / "1.0.0"
    (root / "annotations").mkdir(parents=True)
    header = "image_id,rad_id,class_name,x_min,y_min,x_max,y_max\n"
    (root / "annotations" / "annotations_train.csv").write_text(header + (
        "a1,R8,Cardiomegaly,30.0,60.0,70.0,90.0\n"
        "a1,R9,Cardiomegaly,32.0,62.0,72.0,92.0\n"
        "a1,R10,No finding,,,,\n"
        "a1,R8,Nodule/Mass,5.0,5.0,15.0,15.0\n"  # one reader of three: dropped, Nodule/Mass partial in a1
        "a2,R8,No finding,,,,\n"
        "a2,R9,No finding,,,,\n"
        "a2,R10,No finding,,,,\n"
        "a3,R11,Pleural effusion,0.0,80.0,30.0,120.0\n"
        "a3,R11,Pleural effusion,70.0,80.0,100.0,120.0\n"
        "a3,R12,Pleural effusion,2.0,82.0,31.0,119.0\n"
        "a3,R12,Pleural effusion,71.0,79.0,99.0,119.0\n"
        "a3,R13,Pleural effusion,1.0,81.0,29.0,118.0\n"
        "a3,R11,Cardiomegaly,30.0,50.0,70.0,90.0\n"  # one reader: dropped, Cardiomegaly partial in a3
    ))  # fmt: skip
    (root / "annotations" / "annotations_test.csv").write_text(header + (
        "t1,R1,Aortic enlargement,40.0,20.0,60.0,40.0\n"
        "t1,R1,Cardiomegaly,30.0,60.0,70.0,90.0\n"
        "t2,R1,No finding,,,,\n"
    ))  # fmt: skip
    for split, ids in (("train", ("a1", "a2", "a3")), ("test", ("t1", "t2"))):
        for i in ids:
            _dicom(root / split / f"{i}.dicom", 100, 120)
    return root


def test_vindr_cxr_fuses_readers(vindr_root):
    result = ground("vindr-cxr", root=vindr_root)
    assert _made(result) == {("train", "presence"): 4, ("train", "location"): 1, ("train", "count"): 2,
                             ("test", "presence"): 4, ("test", "location"): 2, ("test", "count"): 2, ("test", "size"): 1}  # fmt: skip
    by = {(s.question_type, s.meta["image"], tuple(s.meta["labels"])): s for s in result.samples}
    cardio = by["location", "a1", ("Cardiomegaly",)]
    assert (
        cardio.rois[0].box == (31.0, 61.0, 71.0, 91.0) and cardio.answer == "center"
    )  # mean of R8 and R9
    effusions = by["count", "a3", ("Pleural effusion",)]
    assert effusions.answer == "2" and [r.box for r in effusions.rois] == [
        (1.0, 81.0, 30.0, 119.0),
        (70.5, 79.5, 99.5, 119.5),
    ]
    # a finding one reader saw is neither a negative nor counted
    assert not any(
        s.meta["image"] == "a3" and s.meta["labels"] == ["Cardiomegaly"] for s in result.samples
    )
    assert not any("Nodule/Mass" in s.meta["labels"] for s in result.samples)
    assert result.samples[0].images[0].endswith(".dicom")
    # a stricter merge keeps only the left effusion (three readers): still present, no longer countable
    strict = ground("vindr-cxr", root=vindr_root, split="train", min_readers=3)
    effusion = {
        (s.question_type, s.meta["image"], s.answer)
        for s in strict.samples
        if "Pleural effusion" in s.meta["labels"]
    }
    assert effusion == {("presence", "a3", "yes"), ("presence", "a2", "no")}
    assert {s.split for s in strict.samples} == {"train"}


# ---------------------------------------------------------------------------- MS-CXR

MS_CXR_HEADER = "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height"
MS_CXR_ROWS = [
    (
        "d1",
        "Pneumonia",
        "Patchy opacity",
        "files/p10/p10000001/s50000001/d1.jpg",
        300,
        500,
        200,
        250,
        "train",
    ),
    (
        "d1",
        "Pleural Effusion",
        "Right pleural effusion",
        "files/p10/p10000001/s50000001/d1.jpg",
        50,
        800,
        250,
        300,
        "train",
    ),
    (
        "d2",
        "Pneumothorax",
        "Small left apical pneumothorax",
        "files/p10/p10000002/s50000002/d2.jpg",
        700,
        100,
        150,
        200,
        "val",
    ),
    (
        "d3",
        "Consolidation",
        "Consolidation",
        "files/p11/p11000003/s50000003/d3.jpg",
        100,
        100,
        300,
        300,
        "test",
    ),
    (
        "d3",
        "Consolidation",
        "Consolidation",
        "files/p11/p11000003/s50000003/d3.jpg",
        120,
        150,
        200,
        150,
        "test",
    ),
    (
        "d4",
        "Atelectasis",
        "Bibasilar atelectasis",
        "files/p10/p10000001/s50000009/d4.jpg",
        100,
        900,
        800,
        200,
        "train",
    ),
]


def _ms_cxr(root: Path, version: str) -> Path:
    root.mkdir(parents=True)
    split = version == "v1.1.0"
    lines = [MS_CXR_HEADER + (",split" if split else "")]
    for d, cat, text, path, x, y, w, h, s in MS_CXR_ROWS:
        lines.append(
            f'{d},{cat},"{text}",{path},{x},{y},{w},{h},1000,1200' + (f",{s}" if split else "")
        )
        _jpeg(root / "mimic" / path, (1000, 1200))
    (root / f"MS_CXR_Local_Alignment_{version}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_ms_cxr_phrase_grounding(tmp_path):
    root = _ms_cxr(tmp_path / "ms-cxr", "v1.1.0")
    result = ground("ms-cxr", root=root, images=root / "mimic")
    assert _made(result) == {("train", "grounding"): 3, ("test", "grounding"): 1}
    assert result.skipped == {
        "grounding: the phrase states the position, or its boxes are apart": 1
    }  # the left apical one
    qs = {s.question: s for s in result.samples}
    patchy = qs[
        "Which region of this image shows patchy opacity? Left and right are the patient's sides."
    ]
    assert (
        patchy.answer == "center"
        and patchy.rois[0].box == (300, 500, 500, 750)
        and patchy.rois[0].label == "Pneumonia"
    )
    assert qs["Which region of this image shows right pleural effusion?"].answer == "lower"
    assert (
        qs[
            "Which region of this image shows bibasilar atelectasis? Left and right are the patient's sides."
        ].answer
        == "center"
    )
    consolidation = qs[
        "Which region of this image shows consolidation? Left and right are the patient's sides."
    ]
    assert (
        consolidation.answer == "upper right"
        and len(consolidation.rois) == 2
        and consolidation.split == "test"
    )
    assert {s.meta["group"] for s in result.samples if s.split == "train"} == {"p10000001"}
    assert all(Path(s.images[0]).is_file() for s in result.samples)


def test_ms_cxr_v1_0_0_has_no_split_column_so_patients_are_split_by_seed(tmp_path):
    root = _ms_cxr(tmp_path / "ms-cxr", "v1.0.0")
    result = ground("ms-cxr", root=root, images=root / "mimic", seed=1)
    assert sum(result.made.values()) == 4
    assert split_leaks(result.samples) == {}
    d1_d4 = {s.split for s in result.samples if s.meta["group"] == "p10000001"}
    assert len(d1_d4) == 1


# ---------------------------------------------------------------------------- Kvasir-SEG

KVASIR = {  # image id -> polyps (x0, y0, x1, y1): image 160 x 120
    "cju0qkwl35piu0993l0dewei2": [(30, 20, 90, 60)],
    "cju0qoxqj9q6s0835b43399p4": [(10, 10, 40, 40), (100, 70, 150, 110)],
    "cju0qx73cjw570799j4n5cjze": [(60, 50, 120, 100)],
}


@pytest.fixture
def kvasir_root(tmp_path) -> Path:
    root = tmp_path / "Kvasir-SEG"
    boxes = {}
    for key, polyps in KVASIR.items():
        mask = np.zeros((120, 160), np.uint8)
        for x0, y0, x1, y1 in polyps:
            mask[y0:y1, x0:x1] = 255
        _jpeg(root / "masks" / f"{key}.jpg", (160, 120), np.stack([mask] * 3, -1))
        _jpeg(root / "images" / f"{key}.jpg", (160, 120))
        boxes[key] = {"height": 120, "width": 160,
                      "bbox": [{"label": "polyp", "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1} for x0, y0, x1, y1 in polyps]}  # fmt: skip
    (root / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    return root


def test_kvasir_seg_boxes_and_masks_agree(kvasir_root):
    result = ground(
        "kvasir-seg", root=kvasir_root.parent
    )  # the folder holding Kvasir-SEG/ works too
    # no official split: seeded by image, 0.8 / 0.1 / 0.1 of three images cut at round(2.4, 2.7, 3) = 2, 3, 3
    assert _made(result) == {("train", "location"): 2, ("train", "count"): 2, ("val", "count"): 1}
    assert result.skipped == {
        "presence: positives without a matching negative": 3
    }  # every image has a polyp
    from_masks = ground("kvasir-seg", root=kvasir_root, regions="masks")
    boxes = sorted(
        (s.meta["image"], r.box)
        for s in result.samples
        if s.question_type == "count"
        for r in s.rois
    )
    mask_boxes = sorted(
        (s.meta["image"], r.box)
        for s in from_masks.samples
        if s.question_type == "count"
        for r in s.rois
    )
    assert len(boxes) == len(mask_boxes) == 4
    for (ka, a), (kb, b) in zip(boxes, mask_boxes):
        assert ka == kb and np.abs(np.subtract(a, b)).max() <= 1, (
            a,
            b,
        )  # JPEG edges blur by a pixel at most
    two = next(s for s in result.samples if s.question_type == "count" and s.answer == "2")
    assert two.meta["image"] == "cju0qoxqj9q6s0835b43399p4" and two.modality == "Endoscopy"


# ---------------------------------------------------------------------------- SLAKE


def _slake_record(qid: int, img: str, modality: str, location: str, lang: str = "en") -> dict:
    return {"img_id": int(img.removeprefix("xmlab")), "img_name": f"{img}/source.jpg", "question": "Which organ?", "answer": "Liver",
            "q_lang": lang, "location": location, "modality": modality, "answer_type": "OPEN", "base_type": "vqa",
            "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}  # fmt: skip


@pytest.fixture
def slake_root(tmp_path) -> Path:
    root = tmp_path / "Slake1.0"
    images = {  # folder -> (modality, region, detection objects, split file)
        "xmlab1": (
            "CT",
            "Abdomen",
            [{"Liver": [20, 30, 80, 60]}, {"Spleen": [140, 40, 30, 30]}, {"Kidney": [1, 1, 0, 4]}],
            "train.json",
        ),
        "xmlab2": ("CT", "Abdomen", [{"Liver": [30, 30, 60, 50]}], "train.json"),
        "xmlab3": ("MRI", "Brain", [{"Brain": [40, 20, 120, 120]}], "train.json"),
        "xmlab5": ("CT", "Abdomen", [{"Spleen": [10, 10, 20, 20]}], "test.json"),
    }
    records: dict[str, list] = {"train.json": [], "validate.json": [], "test.json": []}
    for i, (folder, (modality, region, objects, file)) in enumerate(images.items()):
        _jpeg(root / "imgs" / folder / "source.jpg", (200, 160))
        (root / "imgs" / folder / "detection.json").write_text(json.dumps(objects))
        mask = np.zeros((160, 200), np.uint8)
        for value, obj in enumerate(objects, start=1):
            x, y, w, h = next(iter(obj.values()))
            mask[y : y + h, x : x + w] = value * 40
        mask[150:156, 190:196] = 250  # a value no box names
        Image.fromarray(mask).save(root / "imgs" / folder / "mask.png")
        records[file] += [
            _slake_record(2 * i, folder, modality, region),
            _slake_record(2 * i + 1, folder, modality, region, "zh"),
        ]
    for file, recs in records.items():
        (root / file).write_text(json.dumps(recs))
    return root


def test_slake_regions_from_detection_and_masks(slake_root):
    result = ground("slake-ground", root=slake_root)
    assert _made(result) == {("train", "presence"): 2, ("train", "location"): 4, ("train", "count"): 4, ("train", "size"): 1,
                             ("test", "location"): 1, ("test", "count"): 1}  # fmt: skip
    presence = {
        (s.meta["image"], s.meta["labels"][0], s.answer)
        for s in result.samples
        if s.question_type == "presence"
    }
    assert presence == {
        ("xmlab1", "Spleen", "yes"),
        ("xmlab2", "Spleen", "no"),
    }  # never asked of the brain MRI
    by = {(s.question_type, s.meta["image"], tuple(s.meta["labels"])): s for s in result.samples}
    assert (
        by["location", "xmlab1", ("Liver",)].answer == "middle right"
        and by["location", "xmlab1", ("Spleen",)].answer == "middle left"
    )
    [size] = [s for s in result.samples if s.question_type == "size"]
    assert (
        size.meta["image"] == "xmlab1"
        and size.answer == "liver"
        and sorted(size.meta["labels"]) == ["Liver", "Spleen"]
    )
    assert all(
        s.dataset == "slake-ground" and s.organ in ("Abdomen", "Brain") for s in result.samples
    )
    masks = ground("slake-ground", root=slake_root, regions="masks")
    assert [s.model_dump(exclude={"id"}) for s in masks.samples] == [
        s.model_dump(exclude={"id"}) for s in result.samples
    ]
    with pytest.raises(SourceError, match="regions must be 'boxes' or 'masks'"):
        ground("slake-ground", root=slake_root, regions="polygons")


@pytest.mark.parametrize(
    "release, broken",
    [
        ("kvasir-seg", "kavsir_bboxes.json"),
        ("slake-ground", "train.json"),
        ("slake-ground", "imgs/xmlab2/detection.json"),
    ],
)
def test_a_malformed_release_json_is_one_error_naming_its_file(
    release, broken, kvasir_root, slake_root
):
    root = kvasir_root if release == "kvasir-seg" else slake_root
    (root / broken).write_text('[{"Liver": [30, 30,')
    with pytest.raises(SourceError, match=rf"{root / broken} is not valid JSON: .* at line 1"):
        ground(release, root=root)


def test_a_malformed_coco_file_is_one_error_naming_its_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"images": [')
    with pytest.raises(SourceError, match=rf"coco: {path} is not valid JSON"):
        ground("coco", annotations=[str(path)], images=tmp_path)


# ---------------------------------------------------------------------------- checks over every preset's output


@pytest.fixture
def all_outputs(nih_root, vindr_root, kvasir_root, slake_root, tmp_path):
    ms = _ms_cxr(tmp_path / "ms-cxr", "v1.1.0")
    return {
        "nih-cxr14": ground("nih-cxr14", root=nih_root).samples,
        "vindr-cxr": ground("vindr-cxr", root=vindr_root).samples,
        "ms-cxr": ground("ms-cxr", root=ms, images=ms / "mimic").samples,
        "kvasir-seg": ground("kvasir-seg", root=kvasir_root).samples,
        "slake-ground": ground("slake-ground", root=slake_root).samples,
    }


def test_every_box_is_inside_its_image_and_reaches_tokens_of_every_family(
    all_outputs, tiny_factory
):
    grids = {}
    for family in families():
        adapter = get_adapter(family)
        processor = adapter.load_processor(tiny_factory(family))
        grids[family] = lambda w, h, a=adapter, p=processor: a.token_grid(p, w, h)
    n_rois = 0
    for name, samples in all_outputs.items():
        n_rois += sum(len(s.rois) for s in samples)
        for family, grid in grids.items():
            assert roi_problems(samples, grid) == [], (name, family)
    assert n_rois > 40


def test_patient_level_split_integrity(all_outputs):
    for name, samples in all_outputs.items():
        assert split_leaks(samples) == {}, name
        assert len({s.id for s in samples}) == len(samples), name
