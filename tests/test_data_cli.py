"""`medlvr data convert` and `medlvr data validate` through the real CLI app."""

from __future__ import annotations

import io
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from typer.testing import CliRunner

from medlvr.cli import app
from medlvr.data.schema import read_jsonl

runner = CliRunner()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_convert_vqa_rad_and_validate_clean(vqa_rad_root, tmp_path):
    out = tmp_path / "vqa_rad.jsonl"
    res = runner.invoke(
        app,
        [
            "data",
            "convert",
            "vqa-rad",
            "--root",
            str(vqa_rad_root),
            "--out",
            str(out),
            "--split",
            "test",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "451" in res.output and "closed=272" in res.output and "open=179" in res.output
    samples = read_jsonl(out, check_images=True)
    assert len(samples) == 451
    res = runner.invoke(app, ["data", "validate", str(out)])
    assert res.exit_code == 0, res.output
    assert "no problems" in res.output


def test_convert_unknown_source_is_a_one_line_error(tmp_path):
    res = runner.invoke(
        app,
        ["data", "convert", "nope", "--root", str(tmp_path), "--out", str(tmp_path / "o.jsonl")],
    )
    assert res.exit_code == 2
    assert "unknown source 'nope'" in res.output and "vqa-rad" in res.output
    assert "Traceback" not in res.output


def test_convert_missing_release_file(tmp_path):
    res = runner.invoke(
        app,
        ["data", "convert", "slake", "--root", str(tmp_path), "--out", str(tmp_path / "o.jsonl")],
    )
    assert res.exit_code == 2 and "train.json" in res.output


def test_convert_pathvqa_pickle_flag_and_parquet_images_beside_output(tmp_path):
    root = tmp_path / "pathvqa"
    (root / "qas" / "test").mkdir(parents=True)
    with (root / "qas" / "test" / "test_qa.pkl").open("wb") as fh:
        pickle.dump([{"image": "test_0001", "question": "Is it benign?", "answer": "no"}], fh)
    (root / "images" / "test").mkdir(parents=True)
    (root / "images" / "test" / "test_0001.jpg").write_bytes(_jpeg())
    out = tmp_path / "out" / "pathvqa.jsonl"
    args = ["data", "convert", "pathvqa", "--root", str(root), "--out", str(out), "--split", "test"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--allow-pickle" in res.output
    res = runner.invoke(app, [*args, "--allow-pickle"])
    assert res.exit_code == 0, res.output
    assert "closed=1" in res.output

    pq.write_table(
        pa.Table.from_pylist(
            [{"image": {"bytes": _jpeg(), "path": None}, "question": "What?", "answer": "x"}]
        ),
        root / "test-00000-of-00001.parquet",
    )
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    [s] = read_jsonl(out)
    assert s.images[0].startswith(str((tmp_path / "out" / "images" / "pathvqa").resolve()))
    assert json.loads(out.read_text())["images"][0].startswith(
        "images/pathvqa/"
    )  # relative on disk


def _record(i: int, image: str, **over) -> dict:
    rec = {
        "id": f"s{i}",
        "dataset": "t",
        "split": "test",
        "images": [image],
        "question": "Which?",
        "options": {"A": "x", "B": "y"},
        "answer": "x",
        "answer_letter": "A",
        "answer_type": "choice",
    }
    rec.update(over)
    return rec


def test_validate_reports_every_problem_with_its_line(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg())
    cut = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, format="PNG")
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    no_question = _record(3, "good.jpg")
    del no_question["question"]
    lines = [
        json.dumps(_record(1, "good.jpg")),  # 1: clean
        '{"id": "s2", "dataset": ',  # 2: malformed JSON
        json.dumps(no_question),  # 3: missing field
        json.dumps(_record(4, "good.jpg", answer_letter="E")),  # 4: gold letter not among options
        json.dumps(_record(1, "good.jpg")),  # 5: duplicate id
        json.dumps(_record(6, "absent.jpg")),  # 6: missing image
        json.dumps(_record(7, "cut.png")),  # 7: unreadable image
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    res = runner.invoke(app, ["data", "validate", str(path)])
    assert res.exit_code == 1, res.output
    out = res.output
    assert f"{path}:2: malformed JSON" in out
    assert f"{path}:3: question: Field required" in out
    assert f"{path}:4:" in out and "gold letter 'E' is not among the options" in out
    assert f"{path}:5: id: duplicate id 's1' (first at line 1)" in out
    assert f"{path}:6: images.0: image not found" in out
    assert f"{path}:7: images.0: unreadable image" in out and "cut.png" in out
    assert f"{path}:1:" not in out
    assert "6 problem(s)" in out


def test_validate_missing_file_and_no_images_flag(tmp_path):
    res = runner.invoke(app, ["data", "validate", str(tmp_path / "none.jsonl")])
    assert res.exit_code == 2 and "data file not found" in res.output
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_record(1, "absent.jpg")) + "\n")
    assert runner.invoke(app, ["data", "validate", str(path)]).exit_code == 1
    assert runner.invoke(app, ["data", "validate", str(path), "--no-images"]).exit_code == 0
