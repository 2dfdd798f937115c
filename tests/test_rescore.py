"""`medlvr eval rescore`: other kits' prediction files into run folders, scored by medlvr and by the
kits' rules, against numbers computed by hand; `eval report` on rows without `correct`.

Fixtures in tests/data/rescore follow the kits' documented output layouts: lmms-eval's
`--log_samples` JSONL (SLAKE with its release record as `doc`; VQA-RAD whose dataset has only
question and answer), MedEvalKit's results JSON (release fields plus `response`), a plain CSV.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medlvr.cli import app
from medlvr.errors import MedlvrError
from medlvr.eval.rescore import read_kit_file, rescore

runner = CliRunner()
DATA = Path(__file__).parent / "data" / "rescore"
MEK = DATA / "medevalkit_vqa_rad_results.json"

# Hand-computed on the 8 VQA-RAD predictions of MEK (and of lmms_eval_vqa_rad_samples.jsonl):
#   q  gold            response                     medlvr  medevalkit       llava-med     lmms-eval
#   10 yes (closed)    Yes, there is an aneurysm.   1       1 (yes only)     1 (substring) 0
#   33 No (closed)     Not seen.                    1       1 ("no" in not)  1             0
#  819 MRI (closed)    It's an MRI                  1       0 (exact)        1             0
# 1625 5mm (open)      0.5 cm                       1       0                0 (recall)    0
#  286 Right lung      Left lung                    0       0                0.5           0
# 1330 Diverticulitis  (empty)                      0 inv.  crash            0             0
#  116 no (closed)     I don't know                 0 inv.  1 ("no" in know) 1             0
# 1069 CT (open)       CT                           1       1                1             1
HAND = {
    "medlvr": {"accuracy": 5 / 8, "closed_accuracy": 3 / 4, "open_score": 2 / 4, "n_crash": 0},
    "medevalkit": {"accuracy": 4 / 8, "closed_accuracy": 3 / 4, "open_score": 1 / 4, "n_crash": 1},
    "llava-med": {
        "accuracy": 5.5 / 8,
        "closed_accuracy": 4 / 4,
        "open_score": 1.5 / 4,
        "n_crash": 0,
    },
    "lmms-eval": {"accuracy": 1 / 8, "closed_accuracy": 0 / 4, "open_score": 1 / 4, "n_crash": 0},
}


def _rules(out: Path) -> dict[str, dict[str, float]]:
    from medlvr.eval.kit_rules import rule_table

    summary = json.loads((out / "summary.json").read_text())
    return _round(
        {
            name: {k: m[k] for k in ("accuracy", "closed_accuracy", "open_score", "n_crash")}
            for name, m in rule_table(summary).items()
        }
    )


def _round(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {k: round(v, 9) for k, v in m.items()} for name, m in table.items()}


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_rescoring_medevalkit_reproduces_the_hand_computed_numbers(tmp_path: Path) -> None:
    out = tmp_path / "mek"
    res = runner.invoke(app, ["eval", "rescore", str(MEK), "--format", "medevalkit",
                              "--data", str(DATA / "vqa_rad_records.jsonl"), "--out", str(out)])  # fmt: skip
    _ok(res)
    assert _rules(out) == _round(HAND)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n_invalid"] == 2 and summary["overall"]["n"] == 8
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, True, True, True, False, False, False, True]
    assert rows[6]["kit_scores"] == {"medevalkit": 1.0, "llava-med": 1.0, "lmms-eval": 0.0}
    assert rows[5]["kit_scores"]["medevalkit"] is None  # the kit crashes on an empty open answer
    assert json.loads((out / "run.json").read_text())["rescore"]["matched"] == {"by qid": 8}
    report = (out / "report.md").read_text()
    assert "| medevalkit | 8 | 50.0 | 75.0 | 25.0 | 1 |" in report
    assert "| medlvr | 8 | 62.5 | 75.0 | 50.0 | 0 |" in report
    assert "62.5" in res.output and "llava-med" in res.output


def test_the_same_predictions_from_lmms_eval_give_the_same_run(tmp_path: Path) -> None:
    """lmms-eval's VQA-RAD docs hold only question and answer: matched on them, kinds from the data."""
    a = rescore(MEK, "medevalkit", tmp_path / "a", data=[DATA / "vqa_rad_records.jsonl"])
    b = rescore(DATA / "lmms_eval_vqa_rad_samples.jsonl", "lmms-eval", tmp_path / "b",
                data=[DATA / "vqa_rad_records.jsonl"])  # fmt: skip
    assert b["matched"] == {"by question": 8}
    assert _rules(tmp_path / "a") == _rules(tmp_path / "b") == _round(HAND)
    assert a["data"]["by_answer_type"] == b["data"]["by_answer_type"]
    res = runner.invoke(app, ["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")])
    _ok(res)
    assert "B wins (0)" in res.output and "B losses (0)" in res.output


def test_without_data_the_kind_comes_from_the_file_or_the_gold(tmp_path: Path) -> None:
    rescore(
        MEK, "medevalkit", tmp_path / "a", dataset="vqa-rad"
    )  # answer_type CLOSED/OPEN in the file
    assert _rules(tmp_path / "a") == _round(HAND)
    out = rescore(DATA / "lmms_eval_vqa_rad_samples.jsonl", "lmms-eval", tmp_path / "b")
    assert out["matched"] == {"kind inferred": 8}
    types = out["data"]["by_answer_type"]
    assert (types["closed"]["n"], types["open"]["n"]) == (3, 5)  # "MRI or CT?" has no yes/no gold
    assert out["data"]["overall"]["accuracy"] == 5 / 8  # the judge reads alternatives in open too


def test_rescoring_lmms_eval_slake(tmp_path: Path) -> None:
    """SLAKE: capitalised golds, case-sensitive MedEvalKit, lmms-eval's normalised exact match."""
    out = rescore(DATA / "lmms_eval_slake_samples.jsonl", "lmms-eval", tmp_path / "s",
                  data=[DATA / "slake_records.jsonl"])  # fmt: skip
    assert out["matched"] == {"by qid": 6}
    assert _rules(tmp_path / "s") == _round(
        {
            "medlvr": {"accuracy": 1.0, "closed_accuracy": 1.0, "open_score": 1.0, "n_crash": 0},
            "medevalkit": {
                "accuracy": 1 / 6,
                "closed_accuracy": 1 / 3,
                "open_score": 0.0,
                "n_crash": 0,
            },
            "llava-med": {
                "accuracy": 2 / 6,
                "closed_accuracy": 1 / 3,
                "open_score": 1 / 3,
                "n_crash": 0,
            },
            "lmms-eval": {
                "accuracy": 2 / 6,
                "closed_accuracy": 1 / 3,
                "open_score": 1 / 3,
                "n_crash": 0,
            },
        }
    )
    assert out["data"]["by_content_type"]["Modality"]["accuracy"] == 1.0


def test_rescoring_a_plain_csv_of_choices(tmp_path: Path) -> None:
    """MedEvalKit maps an unparseable answer to the most similar option; medlvr calls it invalid."""
    rows = read_kit_file(DATA / "plain_choice.csv", "jsonl")
    assert [r.prediction for r in rows][:2] == ["B", "Computed tomography"]
    out = rescore(DATA / "plain_choice.csv", "jsonl", tmp_path / "c", dataset="omnimedvqa")
    lines = [json.loads(x) for x in (tmp_path / "c" / "predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in lines] == [True, True, False, False]
    assert [r["invalid"] for r in lines] == [False, False, True, True]
    assert out["data"]["overall"]["n_invalid"] == 2
    assert lines[3]["kit_scores"]["medevalkit"] == 0.0  # "A and C": it reads the first letter, A
    assert lines[0]["dataset"] == "omnimedvqa" and lines[0]["answer_type"] == "choice"


def test_unmatched_predictions_and_foreign_folders_are_refused_in_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["eval", "rescore", str(DATA / "lmms_eval_slake_samples.jsonl"),
                              "--format", "lmms-eval", "--data", str(DATA / "vqa_rad_records.jsonl"),
                              "--out", str(tmp_path / "x")])  # fmt: skip
    assert res.exit_code == 2
    assert "6 of 6 predictions match no record of --data" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    res = runner.invoke(
        app, ["eval", "rescore", str(MEK), "--format", "lmms-eval", "--out", str(tmp_path / "y")]
    )
    assert res.exit_code == 2 and "one JSON object per line" in res.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    args = ["eval", "rescore", str(MEK), "--format", "medevalkit", "--out", str(foreign)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    _ok(runner.invoke(app, [*args, "--overwrite"]))
    _ok(runner.invoke(app, args))  # its own earlier output: rewritten without --overwrite
    assert (foreign / "notes.txt").read_text() == "keep"
    with pytest.raises(MedlvrError, match="not eval rescore's output"):
        rescore(MEK, "medevalkit", DATA)  # the fixtures' folder
    inside = tmp_path / "run" / "predictions.jsonl"  # the input is a file the rescore writes
    inside.parent.mkdir()
    shutil.copy(MEK, inside)
    with pytest.raises(MedlvrError, match="onto the input"):
        rescore(inside, "medevalkit", inside.parent, overwrite=True)
    assert inside.read_bytes() == MEK.read_bytes()


def test_eval_report_rescores_rows_without_correct(tmp_path: Path) -> None:
    """Rows written by another tool (no `correct`) were read as wrong: accuracy 0.0."""
    rescore(MEK, "medevalkit", tmp_path / "r", data=[DATA / "vqa_rad_records.jsonl"])
    path = tmp_path / "r" / "predictions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    keep = ("id", "dataset", "question", "answer_type", "gold", "options", "response")
    path.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows))
    res = runner.invoke(app, ["eval", "report", str(tmp_path / "r")])
    _ok(res)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["overall"]["accuracy"] == 5 / 8 and summary["overall"]["n_invalid"] == 2
    path.write_text(
        "".join(json.dumps({"id": r["id"], "response": r["response"]}) + "\n" for r in rows)
    )
    res = runner.invoke(app, ["eval", "report", str(tmp_path / "r")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "cannot be scored again" in res.output and "medlvr eval rescore" in res.output


def test_rescore_keeps_what_the_kit_file_says(tmp_path: Path) -> None:
    copy = tmp_path / "results.json"
    shutil.copy(MEK, copy)
    rescore(copy, "medevalkit", tmp_path / "o", data=[DATA / "vqa_rad_records.jsonl"])
    assert copy.read_bytes() == MEK.read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert rows[2]["source"] == "results.json[2]"
    assert rows[2]["response"] == "It's an MRI" and rows[2]["parsed"] == "mri"


def test_data_takes_several_files_after_one_flag(tmp_path: Path) -> None:
    res = runner.invoke(app, ["eval", "rescore", str(DATA / "lmms_eval_slake_samples.jsonl"), "--format",
                              "lmms-eval", "--data", str(DATA / "vqa_rad_records.jsonl"),
                              str(DATA / "slake_records.jsonl"), "--out", str(tmp_path / "s")])  # fmt: skip
    _ok(res)
    assert "6 by qid" in res.output
    data = json.loads((tmp_path / "s" / "run.json").read_text())["rescore"]["data"]
    assert [Path(p).name for p in data] == ["vqa_rad_records.jsonl", "slake_records.jsonl"]
