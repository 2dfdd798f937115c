"""Benchmark converters: real VQA-RAD, and tiny fixtures in each other release's exact format."""

from __future__ import annotations

import csv
import io
import json
import pickle
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medlvr.data.sources import SOURCES, SourceError, convert
from medlvr.errors import MedlvrError

# ---------------------------------------------------------------- helpers


def _jpeg(color: tuple[int, int, int] = (200, 0, 0), size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_registry_lists_every_benchmark_and_rejects_unknown(tmp_path):
    assert set(SOURCES) == {
        "vqa-rad",
        "slake",
        "pathvqa",
        "omnimedvqa",
        "pmc-vqa",
        "mmmu-med",
        "medxpertqa-mm",
        "medframeqa",
    }
    with pytest.raises(
        SourceError, match=r"unknown source 'rad'.*known: medframeqa, medxpertqa-mm"
    ):
        convert("rad", tmp_path)
    with pytest.raises(SourceError, match="release folder not found"):
        convert("slake", tmp_path / "absent")
    assert issubclass(SourceError, MedlvrError)


# ---------------------------------------------------------------- VQA-RAD (real data)


@pytest.fixture(scope="module")
def vqa_rad(vqa_rad_root):
    return convert("vqa-rad", vqa_rad_root)


def test_vqa_rad_official_split(vqa_rad):
    counts = Counter(s.split for s in vqa_rad)
    assert counts == {"train": 1797, "test": 451}
    assert Counter((s.split, s.answer_type) for s in vqa_rad) == {
        ("train", "closed"): 1027,
        ("train", "open"): 770,
        ("test", "closed"): 272,
        ("test", "open"): 179,
    }
    assert len({s.id for s in vqa_rad}) == 2248 and all(
        s.id.startswith("vqa-rad-") for s in vqa_rad
    )
    assert all(Path(s.images[0]).is_absolute() and Path(s.images[0]).is_file() for s in vqa_rad)
    assert len({s.images[0] for s in vqa_rad if s.split == "test"}) == 203


def test_vqa_rad_split_argument(vqa_rad_root):
    assert len(convert("vqa-rad", vqa_rad_root, "test")) == 451
    with pytest.raises(SourceError, match="unknown split 'val'; known: train, test"):
        convert("vqa-rad", vqa_rad_root, "val")


def test_vqa_rad_quirks(vqa_rad):
    by_qid = {s.meta["qid"]: s for s in vqa_rad}
    # "CLOSED " with a trailing space is closed.
    assert by_qid["2156"].answer_type == "closed" and by_qid["2157"].answer_type == "closed"
    # Integer answers become strings.
    assert any(s.answer == "12" for s in vqa_rad) and all(
        isinstance(s.answer, str) for s in vqa_rad
    )
    # Mixed case kept as released: the scorer normalises it.
    assert {"Yes", "yes", "No", "no", "YES"} <= {s.answer for s in vqa_rad}
    # Multi-valued question_type kept as one string, also split in meta.
    multi = [s for s in vqa_rad if s.question_type == "POS, PRES"]
    assert len(multi) == 6 and multi[0].meta["question_types"] == ["POS", "PRES"]
    assert "Other" not in {s.question_type for s in vqa_rad}  # upper-cased
    # Closed questions whose answer is not yes/no stay closed, with their text answer.
    closed_text = [
        s for s in vqa_rad if s.answer_type == "closed" and s.answer.lower() not in ("yes", "no")
    ]
    assert len(closed_text) == 106
    assert any(
        s.question == "Is the abnormality focal or diffuse?" and s.answer == "Diffuse"
        for s in closed_text
    )
    assert {s.meta["phrase_type"] for s in vqa_rad if s.split == "test"} == {
        "test_freeform",
        "test_para",
    }


def test_vqa_rad_missing_release_file(tmp_path):
    with pytest.raises(SourceError, match=r"release file not found: .*VQA_RAD Dataset Public.json"):
        convert("vqa-rad", tmp_path)


# ---------------------------------------------------------------- SLAKE


def _slake_record(qid, lang, answer, answer_type, img="xmlab1/source.jpg", content="Organ"):
    return {
        "img_id": 1,
        "img_name": img,
        "question": f"q{qid}?",
        "answer": answer,
        "q_lang": lang,
        "location": "Abdomen",
        "modality": "CT",
        "answer_type": answer_type,
        "base_type": "vqa",
        "content_type": content,
        "triple": ["vhead", "_", "_"],
        "qid": qid,
    }


@pytest.fixture
def slake_root(tmp_path):
    for n in (1, 2):
        (tmp_path / "imgs" / f"xmlab{n}").mkdir(parents=True)
        (tmp_path / "imgs" / f"xmlab{n}" / "source.jpg").write_bytes(_jpeg())
    (tmp_path / "imgs" / "xmlab1" / "detection.json").write_text(
        json.dumps(
            [{"Liver": [10, 20, 30, 40]}, {"Spleen": [50, 60, 5, 8]}, {"Kidney": [1, 1, 0, 4]}]
        )
    )
    (tmp_path / "train.json").write_text(
        json.dumps(
            [
                _slake_record(1, "en", "Yes", "CLOSED"),
                _slake_record(2, "zh", "是", "CLOSED"),
                _slake_record(3, "en", "Liver", "OPEN", content="Position"),
            ]
        )
    )
    (tmp_path / "validate.json").write_text(
        json.dumps([_slake_record(4, "en", "CT", "OPEN", img="xmlab2/source.jpg")])
    )
    (tmp_path / "test.json").write_text(json.dumps([_slake_record(5, "en", "No", "CLOSED")]))
    return tmp_path


def test_slake(slake_root):
    samples = convert("slake", slake_root)
    assert [s.id for s in samples] == [
        "slake-train-1",
        "slake-train-3",
        "slake-val-4",
        "slake-test-5",
    ]
    first = samples[0]
    assert first.answer == "Yes" and first.answer_type == "closed"
    assert [(r.box, r.label) for r in first.rois] == [
        ((10, 20, 40, 60), "Liver"),
        ((50, 60, 55, 68), "Spleen"),
    ]
    assert first.meta["empty_boxes_dropped"] == 1  # Kidney has width 0
    assert (
        first.modality == "CT"
        and first.organ == "Abdomen"
        and first.meta["content_type"] == "Organ"
    )
    assert samples[1].answer_type == "open" and samples[1].question_type == "Position"
    assert samples[2].rois == []  # no detection.json for xmlab2
    assert Path(first.images[0]) == (slake_root / "imgs/xmlab1/source.jpg").resolve()
    assert [s.id for s in convert("slake", slake_root, "validate")] == ["slake-val-4"]


def test_slake_missing_file(slake_root):
    (slake_root / "test.json").unlink()
    assert len(convert("slake", slake_root, "train")) == 2
    with pytest.raises(SourceError, match=r"release file not found: .*test\.json"):
        convert("slake", slake_root)


# ---------------------------------------------------------------- PathVQA


def test_pathvqa_parquet(tmp_path):
    red, blue = _jpeg((255, 0, 0)), _jpeg((0, 0, 255))
    _write_parquet(
        tmp_path / "data" / "test-00000-of-00001.parquet",
        [
            {
                "image": {"bytes": red, "path": None},
                "question": "Is this necrosis?",
                "answer": "yes",
            },
            {
                "image": {"bytes": red, "path": None},
                "question": "What is shown?",
                "answer": "granuloma",
            },
            {"image": {"bytes": blue, "path": None}, "question": "Is this normal?", "answer": "No"},
        ],
    )
    out = tmp_path / "out" / "images"
    samples = convert("pathvqa", tmp_path, "test", image_dir=out)
    assert [s.id for s in samples] == ["pathvqa-test-0", "pathvqa-test-1", "pathvqa-test-2"]
    assert [s.answer_type for s in samples] == ["closed", "open", "closed"]
    assert samples[0].images == samples[1].images != samples[2].images
    assert len(list(out.iterdir())) == 2  # one file per distinct image
    assert Image.open(samples[2].images[0]).getpixel((4, 4))[2] > 200
    with pytest.raises(SourceError, match="no release file for split 'train'"):
        convert("pathvqa", tmp_path, "train", image_dir=out)


def test_pathvqa_pickle_needs_explicit_flag(tmp_path):
    (tmp_path / "qas" / "val").mkdir(parents=True)
    with (tmp_path / "qas" / "val" / "val_qa.pkl").open("wb") as fh:
        pickle.dump([{"image": "val_0001", "question": "Is it benign?", "answer": "yes"}], fh)
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "images" / "val" / "val_0001.jpg").write_bytes(_jpeg())
    with pytest.raises(SourceError, match=r"unpickling executes code.*allow_pickle=True"):
        convert("pathvqa", tmp_path, "val")
    [s] = convert("pathvqa", tmp_path, "val", allow_pickle=True)
    assert s.id == "pathvqa-val-0" and s.answer_type == "closed"
    assert Path(s.images[0]) == (tmp_path / "images/val/val_0001.jpg").resolve()


# ---------------------------------------------------------------- OmniMedVQA


def _omni(qid, gold, n_options=4, modality_key="modality_type"):
    rec = {
        "dataset": "ACRIMA",
        "question_id": qid,
        "question_type": "Disease Diagnosis",
        "question": f"{qid}?",
        "gt_answer": gold,
        "image_path": f"Images/ACRIMA/{qid}.png",
        modality_key: "Fundus Photography",
    }
    for letter, textv in zip("ABCD", ["Glaucoma", "Normal", "Cataract", "Myopia"][:n_options]):
        rec[f"option_{letter}"] = textv
    return rec


def test_omnimedvqa(tmp_path):
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (qa / "ACRIMA.json").write_text(
        json.dumps([_omni("ACRIMA_0000", "Normal"), _omni("ACRIMA_0001", "myopia")])
    )
    (qa / "Other.json").write_text(
        json.dumps([_omni("Other_0000", "Glaucoma", n_options=2, modality_key="modality")])
    )
    samples = convert("omnimedvqa", tmp_path)
    assert [(s.id, s.answer_letter, len(s.options)) for s in samples] == [
        ("omnimedvqa-ACRIMA_0000", "B", 4),
        ("omnimedvqa-ACRIMA_0001", "D", 4),
        ("omnimedvqa-Other_0000", "A", 2),
    ]
    assert all(s.answer_type == "choice" and s.modality == "Fundus Photography" for s in samples)
    assert samples[1].answer == "Myopia" and samples[0].question_type == "Disease Diagnosis"
    assert samples[0].images == [str((tmp_path / "Images/ACRIMA/ACRIMA_0000.png").resolve())]


def test_omnimedvqa_gold_not_in_options(tmp_path):
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (qa / "Bad.json").write_text(json.dumps([_omni("Bad_0007", "Cataract", n_options=2)]))
    with pytest.raises(
        SourceError, match=r"Bad.json question_id Bad_0007: gold answer 'Cataract' is not among"
    ):
        convert("omnimedvqa", tmp_path)


# ---------------------------------------------------------------- PMC-VQA


def test_pmc_vqa_v1_and_v2(tmp_path):
    _write_csv(
        tmp_path / "test_clean.csv",
        [
            "Figure_path",
            "Question",
            "Answer",
            "Choice A",
            "Choice B",
            "Choice C",
            "Choice D",
            "Answer_label",
        ],
        [
            [
                "PMC1_fig1.jpg",
                "What uptake?",
                "Diffuse uptake",
                "A:Focal uptake ",
                "B:Diffuse uptake",
                "C:No uptake",
                "D:Both",
                "B",
            ],
            [
                "PMC2_fig3.jpg",
                "Which organ?",
                "Liver",
                "A:Liver",
                "B:Lung",
                "C:Heart",
                "D:Bone",
                "A",
            ],
        ],
    )
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "PMC1_fig1.jpg").write_bytes(_jpeg())
    v1 = convert("pmc-vqa", tmp_path)
    assert [(s.id, s.answer_letter, s.answer) for s in v1] == [
        ("pmc-vqa-v1-0", "B", "Diffuse uptake"),
        ("pmc-vqa-v1-1", "A", "Liver"),
    ]
    assert v1[0].options == {
        "A": "Focal uptake",
        "B": "Diffuse uptake",
        "C": "No uptake",
        "D": "Both",
    }
    assert v1[0].images == [str((tmp_path / "images/PMC1_fig1.jpg").resolve())]

    _write_csv(
        tmp_path / "test_2.csv",
        [
            "index",
            "Figure_path",
            "Caption",
            "Question",
            "Choice A",
            "Choice B",
            "Choice C",
            "Choice D",
            "Answer",
            "split",
        ],
        [
            [
                "17",
                "PMC9.jpg",
                "A CT scan.",
                "Modality?",
                "A:MRI",
                "B:CT",
                "C:PET",
                "D:US",
                "B",
                "test",
            ],
            [
                "18",
                "PMC9.jpg",
                "A CT scan.",
                "Plane?",
                "A:Axial",
                "B:Coronal",
                "C:Sagittal",
                "D:Oblique",
                "C:Sagittal",
                "test",
            ],
        ],
    )
    v2 = convert("pmc-vqa", tmp_path, version="v2")
    assert [(s.id, s.answer_letter) for s in v2] == [("pmc-vqa-v2-17", "B"), ("pmc-vqa-v2-18", "C")]
    assert v2[0].meta["caption"] == "A CT scan."
    with pytest.raises(SourceError, match="unknown version 'v3'"):
        convert("pmc-vqa", tmp_path, version="v3")


# ---------------------------------------------------------------- MMMU Health & Medicine

SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)


def _mmmu(rid, qtype, options, answer, n_images=1, question=None):
    row = {
        "id": rid,
        "question": question or "Look at <image 1>. Which?",
        "options": options,
        "explanation": "",
        "answer": answer,
        "question_type": qtype,
        "img_type": "['CT']",
        "topic_difficulty": "Easy",
        "subfield": "x",
    }
    for k in range(1, 8):
        row[f"image_{k}"] = (
            {"bytes": _jpeg((30 * k, 0, 0)), "path": f"{k}.jpg"} if k <= n_images else None
        )
    return row


@pytest.fixture
def mmmu_root(tmp_path):
    for subject in SUBJECTS:
        rows = [
            _mmmu(
                f"validation_{subject}_1",
                "multiple-choice",
                "['Liver', 'Kidney', '<image 2>']",
                "C",
                n_images=2,
            )
        ]
        if subject == "Clinical_Medicine":
            rows.append(
                _mmmu(
                    f"validation_{subject}_2",
                    "open",
                    "[]",
                    "3.5 mg",
                    question="Dose for <image 1>?",
                )
            )
        _write_parquet(tmp_path / subject / "validation-00000-of-00001.parquet", rows)
    return tmp_path


def test_mmmu_med(mmmu_root, tmp_path):
    samples = convert("mmmu-med", mmmu_root, "validation", image_dir=tmp_path / "imgs")
    assert len(samples) == 6 and Counter(s.answer_type for s in samples) == {"choice": 5, "open": 1}
    mc = samples[0]
    assert mc.id == "mmmu-med-validation_Basic_Medical_Science_1"
    assert mc.options == {"A": "Liver", "B": "Kidney", "C": "<image 2>"} and mc.answer_letter == "C"
    assert len(mc.images) == 2 and mc.meta["image_tags"] == ["<image 1>", "<image 2>"]
    assert "<image 1>" in mc.question  # placeholders stay in the text
    opened = next(s for s in samples if s.question_type == "open")
    assert opened.answer == "3.5 mg" and opened.options == {} and len(opened.images) == 1


def test_mmmu_med_options_are_never_executed(mmmu_root, tmp_path):
    shard = mmmu_root / "Pharmacy" / "validation-00000-of-00001.parquet"
    _write_parquet(
        shard, [_mmmu("validation_Pharmacy_9", "multiple-choice", "__import__('os').getcwd()", "A")]
    )
    with pytest.raises(SourceError, match="validation_Pharmacy_9: options is not a list literal"):
        convert("mmmu-med", mmmu_root, "validation", image_dir=tmp_path / "imgs")


def test_mmmu_med_errors(mmmu_root, tmp_path):
    _write_parquet(
        mmmu_root / "Pharmacy" / "validation-00000-of-00001.parquet",
        [
            _mmmu(
                "validation_Pharmacy_3",
                "multiple-choice",
                "['a', 'b']",
                "A",
                question="See <image 3>.",
            )
        ],
    )
    with pytest.raises(
        SourceError, match=r"validation_Pharmacy_3: placeholder\(s\) \['<image 3>'\]"
    ):
        convert("mmmu-med", mmmu_root, "validation", image_dir=tmp_path / "imgs")
    with pytest.raises(SourceError, match=r"release file not found: .*dev-\*\.parquet"):
        convert("mmmu-med", mmmu_root, "dev", image_dir=tmp_path / "imgs")
    (mmmu_root / "Public_Health" / "validation-00000-of-00001.parquet").unlink()
    (mmmu_root / "Public_Health").rmdir()
    with pytest.raises(SourceError, match=r"subject folder.*Public_Health"):
        convert("mmmu-med", mmmu_root, "validation")


# ---------------------------------------------------------------- MedXpertQA-MM


def test_medxpertqa_mm(tmp_path):
    (tmp_path / "MM").mkdir()
    options = {L: f"option {L}" for L in "ABCDE"}
    recs = [
        {
            "id": "MM-0",
            "question": "Q0",
            "options": options,
            "label": "E",
            "images": ["MM-0-a.jpeg", "MM-0-b.jpeg"],
            "medical_task": "Diagnosis",
            "body_system": "Cardiovascular",
            "question_type": "Reasoning",
        },
        {
            "id": "MM-1",
            "question": "Q1",
            "options": options,
            "label": "A",
            "images": ["MM-1.jpeg"],
            "medical_task": "Treatment",
            "body_system": "Skeletal",
            "question_type": "Understanding",
        },
    ]
    (tmp_path / "MM" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    samples = convert("medxpertqa-mm", tmp_path)
    assert [(s.id, s.answer_letter, s.answer, len(s.images)) for s in samples] == [
        ("medxpertqa-mm-MM-0", "E", "option E", 2),
        ("medxpertqa-mm-MM-1", "A", "option A", 1),
    ]
    assert samples[0].question_type == "Reasoning" and samples[0].organ == "Cardiovascular"
    assert samples[0].meta["medical_task"] == "Diagnosis" and len(samples[0].options) == 5
    assert samples[0].images[0] == str((tmp_path / "images/MM-0-a.jpeg").resolve())
    with pytest.raises(SourceError, match=r"release file not found: .*MM/dev\.jsonl"):
        convert("medxpertqa-mm", tmp_path, "dev")


# ---------------------------------------------------------------- MedFrameQA


def _frames_row(qid, n_frames, letter="B"):
    row = {
        "question_id": qid,
        "system": "Digestive",
        "organ": "Liver",
        "modality": "CT",
        "question": "Which frame?",
        "options": ["A. first", "B. second", "C. third", "D. fourth"],
        "correct_answer": letter,
        "reasoning_chain": "...",
    }
    for k in range(1, 6):
        row[f"image_{k}"] = (
            {"bytes": _jpeg((0, 40 * k, 0)), "path": None} if k <= n_frames else None
        )
    return row


def test_medframeqa(tmp_path):
    _write_parquet(
        tmp_path / "data" / "test-00000-of-00001.parquet",
        [_frames_row("q1", 2), _frames_row("q2", 5, "D")],
    )
    samples = convert("medframeqa", tmp_path, image_dir=tmp_path / "imgs")
    assert [(s.id, len(s.images), s.answer_letter, s.answer) for s in samples] == [
        ("medframeqa-q1", 2, "B", "second"),
        ("medframeqa-q2", 5, "D", "fourth"),
    ]
    assert samples[0].options == {"A": "first", "B": "second", "C": "third", "D": "fourth"}
    assert (
        samples[0].organ == "Liver"
        and samples[0].modality == "CT"
        and samples[0].meta["system"] == "Digestive"
    )


def test_medframeqa_errors(tmp_path):
    _write_parquet(tmp_path / "test.parquet", [_frames_row("q9", 1)])
    with pytest.raises(SourceError, match="question_id q9: 1 frame"):
        convert("medframeqa", tmp_path, image_dir=tmp_path / "imgs")
    _write_parquet(tmp_path / "test.parquet", [_frames_row("q8", 3, "F")])
    with pytest.raises(SourceError, match="question_id q8: gold letter 'F' is not among"):
        convert("medframeqa", tmp_path, image_dir=tmp_path / "imgs")


def test_an_unreadable_release_json_is_a_source_error(tmp_path):
    from medlvr.data.sources._common import read_json

    with pytest.raises(SourceError, match=rf"slake: cannot read {tmp_path}: Is a directory"):
        read_json(tmp_path, "slake")
