"""The grounded-VQA builder on generic inputs: COCO JSON, CSV of boxes, PNG label maps, NIfTI volumes.

Exact expected counts on small hand-made fixtures, the position scheme, splits by group,
reader fusion, the question-only baseline and the command line.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medlvr.cli import app
from medlvr.data.ground import (
    GroundConfig,
    build_grounded,
    ground,
    read_box_csv,
    read_coco,
    read_mask_folder,
)
from medlvr.data.ground.annotations import AnnotatedImage, Region, fuse_reader_boxes
from medlvr.data.ground.checks import question_only_baseline, roi_problems
from medlvr.data.ground.questions import GRID, display_name, named_axes, position_choice
from medlvr.data.ground.readers import CsvColumns, ReaderFusion
from medlvr.data.ground.split import split_leaks
from medlvr.data.schema import read_jsonl
from medlvr.data.sources import SourceError

runner = CliRunner()


# ---------------------------------------------------------------------------- a COCO fixture

# Five 100 x 80 images: 0 has a nodule (upper left) and a larger mass (lower right); 1 two
# nodules; 2 a mass in the centre; 3 nothing; 4 a nodule box wholly outside the image.
COCO_BOXES = {0: [(1, [10, 10, 20, 20]), (2, [60, 40, 30, 30])], 1: [(1, [5, 50, 10, 10]), (1, [70, 5, 10, 10])],
              2: [(2, [40, 30, 20, 15])], 3: [], 4: [(1, [200, 200, 10, 10])]}  # fmt: skip


def write_coco(
    folder: Path, boxes: dict[int, list] = COCO_BOXES, size=(100, 80), files: bool = True
) -> Path:
    images, annotations = [], []
    for i, objs in boxes.items():
        images.append(
            {
                "id": i,
                "file_name": f"img{i}.png",
                "width": size[0],
                "height": size[1],
                "patient_id": f"p{i // 2}",
            }
        )
        annotations += [{"id": len(annotations), "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for c, b in objs]  # fmt: skip
        if files:
            Image.new("L", size, 30).save(folder / f"img{i}.png")
    path = folder / "instances.json"
    categories = [
        {"id": 1, "name": "Nodule", "supercategory": "lesion"},
        {"id": 2, "name": "Mass", "supercategory": "lesion"},
    ]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def test_coco_fixture_gives_exact_questions(tmp_path):
    images = read_coco(write_coco(tmp_path), tmp_path, split="train", group_field="patient_id")
    result = build_grounded(images, GroundConfig(dataset="fixture"))
    assert result.made == {
        ("train", "presence"): 8,
        ("train", "location"): 3,
        ("train", "count"): 4,
        ("train", "size"): 1,
    }
    assert result.skipped == {"box outside its image or thinner than min_box_side (dropped)": 1}
    by = {(s.question_type, s.meta["image"], tuple(s.meta["labels"])): s for s in result.samples}
    # location: the nodule of image 0 is upper left, the mass lower right; image 2's mass is in the centre
    assert (
        by["location", "0", ("Nodule",)].answer == "upper left"
        and by["location", "0", ("Nodule",)].answer_letter == "A"
    )
    assert by["location", "0", ("Mass",)].answer == "lower right"
    assert by["location", "2", ("Mass",)].answer == "center"
    assert by["location", "0", ("Nodule",)].options == dict(zip("ABCDEFGHI", GRID))
    # count: image 1 has two nodules, both its boxes are the ROIs
    count = by["count", "1", ("Nodule",)]
    assert count.answer == "2" and count.answer_type == "open" and len(count.rois) == 2
    assert count.question == "How many nodule regions are there in this image?"
    # size: the mass (900 px) is larger than the nodule (400 px); both boxes are ROIs
    [size] = [s for s in result.samples if s.question_type == "size"]
    assert (
        size.answer == "mass" and size.options[size.answer_letter] == "mass" and len(size.rois) == 2
    )
    # presence: yes and no balanced per finding; yes carries the finding's boxes, no none
    presence = [s for s in result.samples if s.question_type == "presence"]
    assert Counter((s.meta["labels"][0], s.answer) for s in presence) == {
        ("Nodule", "yes"): 2,
        ("Nodule", "no"): 2,
        ("Mass", "yes"): 2,
        ("Mass", "no"): 2,
    }
    assert all(bool(s.rois) == (s.answer == "yes") for s in presence)
    # image 4 lost its only nodule box: not a negative for nodule, never counted
    assert not any(
        s.meta["image"] == "4" and s.meta["labels"] == ["Nodule"] for s in result.samples
    )
    assert {s.id for s in result.samples} == {
        f"fixture-train-{f}-{i}" for (_, f), n in result.made.items() for i in range(n)
    }
    assert roi_problems(result.samples) == []


def test_same_seed_same_output_and_seeded_split_by_patient(tmp_path):
    path = write_coco(tmp_path)
    runs = [
        build_grounded(
            read_coco(path, tmp_path, group_field="patient_id"), GroundConfig(dataset="f", seed=s)
        )
        for s in (3, 3, 4)
    ]
    assert [s.model_dump() for s in runs[0].samples] == [s.model_dump() for s in runs[1].samples]
    for run in runs:
        assert split_leaks(run.samples) == {}
        by_patient = {}
        for im in run.images:
            by_patient.setdefault(im.group, set()).add(im.split)
        assert all(len(splits) == 1 for splits in by_patient.values())
    # the split leak check sees a patient in two splits
    moved = runs[0].samples[0].model_copy(update={"split": "elsewhere"})
    assert split_leaks([*runs[0].samples, moved])


def test_official_split_kept_and_val_carved_by_group():
    images = [AnnotatedImage(key=f"i{i}", path=f"/x/{i}.png", width=10, height=10, regions=[Region("a", (1, 1, 5, 5))],
                             group=f"p{i // 2}", split="test" if i < 4 else "train") for i in range(40)]  # fmt: skip
    result = build_grounded(
        images, GroundConfig(dataset="d", val_fraction=0.25, question_types=("count",))
    )
    splits = {im.key: im.split for im in result.images}
    assert all(splits[f"i{i}"] == "test" for i in range(4))
    # 18 train patients of 2 images: round(0.25 x 18) = 4 patients (8 images) move to val
    assert Counter(splits.values()) == {"test": 4, "train": 28, "val": 8}
    assert split_leaks(result.samples) == {}


# ---------------------------------------------------------------------------- positions and templates


def test_position_scheme_sides_and_named_axes():
    assert (
        position_choice([(0, 0, 10, 10)], 90, 90, "image", (False, False))[1] == "A"
    )  # upper left
    assert (
        position_choice([(0, 0, 10, 10)], 90, 90, "patient", (False, False))[0]["C"]
        == "upper right"
    )
    assert (
        position_choice([(0, 0, 10, 10)], 90, 90, "patient", (False, False))[1] == "C"
    )  # image left = patient's right
    # a name stating the side leaves only the height to ask, and the reverse
    opts, letter = position_choice([(0, 70, 10, 80)], 90, 90, "image", named_axes("left kidney"))
    assert opts == {"A": "upper", "B": "middle", "C": "lower"} and letter == "C"
    opts, letter = position_choice(
        [(80, 0, 90, 10)], 90, 90, "image", named_axes("apical pneumothorax")
    )
    assert opts == {"A": "left", "B": "center", "C": "right"} and letter == "C"
    assert (
        position_choice([(0, 0, 10, 10)], 90, 90, "image", named_axes("right lower lobe opacity"))
        is None
    )
    # boxes in different cells have no one answer
    assert (
        position_choice([(0, 0, 10, 10), (80, 80, 90, 90)], 90, 90, "image", (False, False)) is None
    )
    assert (
        display_name("Nodule/Mass") == "nodule/mass"
        and display_name("Enlarged PA") == "enlarged PA"
        and display_name("ILD") == "ILD"
    )


def test_grounding_questions_never_state_their_answer():
    regions = [Region("Opacity", (5, 5, 20, 20), "Small left apical opacity"),  # names both: not asked
               Region("Opacity", (70, 60, 90, 85), "Patchy opacity"),  # names neither: 9 positions
               Region("Effusion", (0, 60, 30, 90), "Right pleural effusion"),  # names the side: height only
               Region("Effusion", (5, 62, 28, 88), "Right pleural effusion")]  # fmt: skip
    im = AnnotatedImage(
        key="a",
        path="/x/a.png",
        width=90,
        height=90,
        regions=regions,
        split="train",
        partial=frozenset({"Opacity", "Effusion"}),
    )
    result = build_grounded(
        [im], GroundConfig(dataset="g", question_types=("grounding",), sides="patient")
    )
    qs = {s.question: s for s in result.samples}
    assert set(qs) == {"Which region of this image shows patchy opacity? Left and right are the patient's sides.",
                       "Which region of this image shows right pleural effusion?"}  # fmt: skip
    patchy = qs[
        "Which region of this image shows patchy opacity? Left and right are the patient's sides."
    ]
    assert (
        patchy.answer == "lower left" and len(patchy.rois) == 1
    )  # image right = the patient's left
    effusion = qs["Which region of this image shows right pleural effusion?"]
    assert (
        effusion.answer == "lower"
        and len(effusion.rois) == 2
        and effusion.options == {"A": "upper", "B": "middle", "C": "lower"}
    )
    assert result.skipped == {
        "grounding: the phrase states the position, or its boxes are apart": 1
    }


def test_negatives_within_modality_and_organ():
    def im(key, labels, organ):
        return AnnotatedImage(key=key, path=f"/x/{key}", width=50, height=50, regions=[Region(a, (1, 1, 9, 9)) for a in labels],
                              split="train", modality="CT", organ=organ)  # fmt: skip

    images = [
        im("a", ["Liver"], "Abdomen"),
        im("b", ["Spleen"], "Abdomen"),
        im("c", ["Brain"], "Head"),
        im("d", ["Brain"], "Head"),
    ]
    within = build_grounded(
        images,
        GroundConfig(
            dataset="s", question_types=("presence",), negatives_within=("modality", "organ")
        ),
    )
    asked = {(s.meta["image"], s.meta["labels"][0], s.answer) for s in within.samples}
    assert ("c", "Liver", "no") not in asked and ("d", "Liver", "no") not in asked
    assert asked == {
        ("a", "Liver", "yes"),
        ("b", "Liver", "no"),
        ("b", "Spleen", "yes"),
        ("a", "Spleen", "no"),
    }
    anywhere = build_grounded(images, GroundConfig(dataset="s", question_types=("presence",)))
    assert len(anywhere.samples) == 8  # brain is asked of the abdomen too, once the context is free


# ---------------------------------------------------------------------------- CSV of boxes and reader fusion


def test_fuse_reader_boxes_majority_and_one_box_per_reader():
    boxes = [
        ("R1", (10, 10, 50, 50)),
        ("R2", (12, 12, 52, 52)),
        ("R3", (200, 200, 220, 220)),
        ("R1", (11, 11, 49, 49)),
    ]
    kept, dropped = fuse_reader_boxes(boxes, min_iou=0.4, min_readers=2)
    assert kept == [
        (11.0, 11.0, 51.0, 51.0)
    ]  # R1's first box with R2's; R1's second box cannot join R1's cluster
    assert dropped == 2
    assert fuse_reader_boxes(boxes, 0.4, 1) == (
        [(11.0, 11.0, 51.0, 51.0), (11, 11, 49, 49), (200, 200, 220, 220)],
        0,
    )


def test_csv_with_named_and_numbered_columns(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    Image.new("L", (64, 32)).save(tmp_path / "a.png")
    Image.new("L", (64, 32)).save(tmp_path / "b.png")
    (tmp_path / "boxes.csv").write_text("file,finding,left,top,width,height,who\n"
                                        "a,Polyp,1,2,10,8,R1\na,Polyp,2,2,10,8,R2\na,Cyst,40,1,5,5,R1\nb,,,,,,R1\n")  # fmt: skip
    cols = CsvColumns.parse("image=file,label=finding,x=left,y=#4,w=width,h=height,reader=who")
    images = {
        im.key: im
        for im in read_box_csv(
            tmp_path / "boxes.csv", tmp_path, cols, image_suffix=".png", fusion=ReaderFusion()
        )
    }
    assert images["a"].regions == [Region("Polyp", (1.5, 2.0, 11.5, 10.0))] and images[
        "a"
    ].partial == {"Cyst"}
    assert (images["a"].width, images["a"].height) == (64, 32)
    assert images["b"].regions == [] and images["b"].absent_labels({"Polyp", "Cyst"}) == {
        "Polyp",
        "Cyst",
    }
    assert (
        images["a"].absent_labels({"Polyp", "Cyst"}) == set()
    )  # one reader saw a cyst: never a negative
    with pytest.raises(SourceError, match="no column 'nope'"):
        read_box_csv(
            tmp_path / "boxes.csv",
            tmp_path,
            CsvColumns.parse("image=nope,label=finding,x0=a,y0=b,x1=c,y1=d"),
        )
    with pytest.raises(SourceError, match="x0,y0,x1,y1"):
        CsvColumns.parse("image=file,label=finding,x0=left")


# ---------------------------------------------------------------------------- masks


def test_png_label_maps_give_components_with_a_minimum_size(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "images").mkdir()
    label = np.zeros((48, 64), np.uint8)
    label[5:20, 5:30] = 1  # liver
    label[30:40, 40:50] = 2  # tumour
    label[30:34, 5:9] = 2  # a second tumour, 16 px
    label[45:47, 60:62] = 2  # 4 px of noise
    Image.fromarray(label).save(tmp_path / "masks" / "case1_mask.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "case1.jpg")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "masks" / "case2_mask.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "case2.jpg")
    images = read_mask_folder(
        tmp_path / "masks",
        tmp_path / "images",
        {1: "liver", 2: "tumour"},
        min_area=10,
        mask_suffix="_mask",
    )
    assert [im.key for im in images] == ["case1", "case2"]
    assert images[0].regions == [
        Region("liver", (5, 5, 30, 20)),
        Region("tumour", (5, 30, 9, 34)),
        Region("tumour", (40, 30, 50, 40)),
    ]
    result = build_grounded(images, GroundConfig(dataset="m", fractions={"train": 1.0}))
    # case2 is the negative for both; the liver is larger than each tumour, but tumours are two: no size question
    assert result.made == {
        ("train", "presence"): 4,
        ("train", "count"): 2,
        ("train", "location"): 1,
    }


def test_nifti_label_volume_sliced_rendered_and_boxes_match_the_png(tmp_path):
    import nibabel as nib

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    vol = np.zeros((40, 30, 6), np.float32)
    lab = np.zeros((40, 30, 6), np.int16)
    lab[5:15, 20:28, 1:4] = 1  # the organ on slices 1-3
    vol[lab == 1] = 1000.0
    vol[30:35, 2:6, :] = 500.0  # something bright but unlabelled
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "imagesTr" / "case_001.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "labelsTr" / "case_001.nii.gz")
    out = tmp_path / "out"
    res = runner.invoke(app, ["data", "ground", "nifti", "--images", str(tmp_path / "imagesTr"), "--masks", str(tmp_path / "labelsTr"),
                              "--labels", "1=kidney", "--empty-slices", "2", "--min-area", "4", "--out", str(out), "--dataset", "msd"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        ".medlvr-output.json",  # the marker: a rerun may write here again (issue 24)
        "images",
        "train.jsonl",
    ]  # one volume, one patient: one split
    samples = read_jsonl(out / "train.jsonl")
    assert all(Path(s.images[0]).parent == out / "images" for s in samples)
    slices = sorted({s.meta["slice"] for s in samples})
    assert slices == [0, 1, 2, 3, 5]  # three labelled slices and two empty ones (first and last)
    assert Counter(s.question_type for s in samples) == {"count": 3, "location": 3, "presence": 4}
    for s in samples:
        assert Path(s.images[0]).is_file() and s.meta["group"] == "case_001"
        if s.rois:  # the box is where the bright organ shows in the written PNG
            arr = np.asarray(Image.open(s.images[0]).convert("L"))
            ys, xs = np.nonzero(arr > 200)
            assert s.rois[0].box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert roi_problems(samples) == []


# ---------------------------------------------------------------------------- leak check


def _random_coco(folder: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    boxes = {}
    for i in range(n):
        objs = []
        for c in (1, 2):
            for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.6 else 0):
                w, h = rng.uniform(5, 40, 2)
                objs.append(
                    (
                        c,
                        [
                            float(rng.uniform(0, 100 - w)),
                            float(rng.uniform(0, 80 - h)),
                            float(w),
                            float(h),
                        ],
                    )
                )
        boxes[i] = objs
    return write_coco(folder, boxes, files=False)


def test_question_only_baseline_is_at_chance_on_a_fixture(tmp_path):
    result = build_grounded(read_coco(_random_coco(tmp_path, 900, 0), tmp_path, group_field="patient_id"),
                            GroundConfig(dataset="r", fractions={"train": 0.5, "test": 0.5}))  # fmt: skip
    train = [s for s in result.samples if s.split == "train"]
    test = [s for s in result.samples if s.split == "test"]
    scores = question_only_baseline(train, test)
    assert set(scores) == {"presence", "location", "count", "size"}
    assert scores["presence"].accuracy == pytest.approx(0.5)  # yes and no balanced per finding
    for qtype, score in scores.items():
        assert score.n >= 15, qtype
        assert score.accuracy <= score.prior + 0.03, (qtype, score)


def test_question_only_baseline_catches_a_leaking_template(tmp_path):
    result = build_grounded(read_coco(_random_coco(tmp_path, 400, 1), tmp_path, group_field="patient_id"),
                            GroundConfig(dataset="r", fractions={"train": 0.5, "test": 0.5}, question_types=("location",)))  # fmt: skip
    leaky = [
        s.model_copy(update={"question": f"{s.question} It is {s.answer}."}) for s in result.samples
    ]
    scores = question_only_baseline(
        [s for s in leaky if s.split == "train"], [s for s in leaky if s.split == "test"]
    )
    assert scores["location"].accuracy > scores["location"].prior + 0.3


# ---------------------------------------------------------------------------- command line


def test_cli_coco_and_inspect_per_source(tmp_path, vqa_rad_root):
    path = write_coco(tmp_path)
    out = tmp_path / "out" / "toy"
    res = runner.invoke(app, ["data", "ground", "coco", "--annotations", f"train={path}", "--images", str(tmp_path),
                              "--out", str(out), "--dataset", "toy", "--question-types", "presence,count"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "train:     12 questions on 5 images  presence=8  count=4" in res.output
    assert f"wrote 12 samples to {out / 'train.jsonl'}" in res.output and sorted(
        p.name for p in out.iterdir()
    ) == [".medlvr-output.json", "train.jsonl"]  # and the marker (issue 24)
    rad = tmp_path / "out" / "rad.jsonl"
    assert (
        runner.invoke(
            app,
            [
                "data",
                "convert",
                "vqa-rad",
                "--root",
                str(vqa_rad_root),
                "--split",
                "test",
                "--out",
                str(rad),
            ],
        ).exit_code
        == 0
    )
    res = runner.invoke(app, ["data", "inspect", str(rad), str(out / "train.jsonl"), "--n", "0"])
    assert res.exit_code == 0, res.output
    assert f"{rad}: 0/451 samples with ROIs (0.0%" in res.output
    assert f"{out / 'train.jsonl'}: 8/12 samples with ROIs (66.7%, 1.25 boxes each)" in res.output


def test_cli_errors_are_one_line(tmp_path):
    cases = [
        (["data", "ground", "nope", "--out", str(tmp_path / "o")], "unknown source 'nope'"),
        (
            [
                "data",
                "ground",
                "vindr-cxr",
                "--root",
                str(tmp_path / "absent"),
                "--out",
                str(tmp_path / "o"),
            ],
            "release folder not found",
        ),
        (
            [
                "data",
                "ground",
                "vindr-cxr",
                "--root",
                str(tmp_path),
                "--labels",
                "1=a",
                "--out",
                str(tmp_path / "o"),
            ],
            "not used by this source: labels",
        ),
        (
            [
                "data",
                "ground",
                "csv",
                "--images",
                str(tmp_path),
                "--annotations",
                str(tmp_path / "x.csv"),
                "--columns",
                "image=a,label=b,x=c,y=d,w=e,h=f",
                "--out",
                str(tmp_path / "o"),
            ],
            "annotation file not found",
        ),
        (
            [
                "data",
                "ground",
                "coco",
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--question-types",
                "colour",
            ],
            "unknown question types",
        ),
        (
            [
                "data",
                "ground",
                "coco",
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--fractions",
                "train=0.9,test=0.2",
            ],
            "sum to 1",
        ),
        (
            [
                "data",
                "ground",
                "coco",
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--sides",
                "up",
            ],
            "sides must be",
        ),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and "Traceback" not in res.output, res.output


def test_ground_library_call_rejects_unknown_reader_options(tmp_path):
    with pytest.raises(SourceError, match="not used by this source: colour"):
        ground("kvasir-seg", root=tmp_path, colour="red")
