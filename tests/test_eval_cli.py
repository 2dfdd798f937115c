"""`medlvr eval` end to end on the tiny model: run, report, compare, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medlvr.cli import app
from medlvr.data.schema import VQASample, read_jsonl, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def synth_test(tmp_path_factory) -> Path:
    """The synthetic test split plus one question whose image does not exist."""
    from medlvr.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    files = generate(SynthConfig(n=60, seed=3), out)
    samples = read_jsonl(files["test"])[:5]
    samples.append(
        VQASample(
            id="ghost",
            dataset="synth",
            split="test",
            images=[str(out / "images" / "gone.png")],
            question="Is there a lesion?",
            answer="yes",
            answer_type="closed",
        )
    )
    path = out / "eval.jsonl"
    write_jsonl(samples, path)
    return path


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_eval_run_report_and_compare(tiny_dir, synth_test, tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--data",
            str(synth_test),
            "--reasoning",
            "direct",
            "--out",
            str(run_a),
            "--batch-size",
            "4",
            "--max-new-tokens",
            "4",
        ],
    )
    _ok(res)
    for name in (
        "predictions.jsonl",
        "summary.json",
        "report.md",
        "run.json",
        "plots/accuracy_by_dataset.png",
        "plots/accuracy_by_question_type.png",
    ):
        assert (run_a / name).is_file(), name
    summary = json.loads((run_a / "summary.json").read_text())
    assert summary["overall"]["n"] == 6 and summary["overall"]["n_errors"] == 1
    rows = [json.loads(line) for line in (run_a / "predictions.jsonl").read_text().splitlines()]
    ghost = next(r for r in rows if r["id"] == "ghost")
    assert "image not found" in ghost["error"] and not ghost["correct"]
    assert all(r["latent_steps"] == 0 and r["reasoning"] == "direct" for r in rows)
    assert all(r["n_tokens"] is not None and r["n_tokens"] <= 4 for r in rows if not r.get("error"))
    assert "ghost" in (run_a / "report.md").read_text()

    # A latent sweep: one row per (question, K), the K plot drawn.
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--data",
            str(synth_test),
            "--reasoning",
            "latent",
            "--latent-steps",
            "0,2",
            "--out",
            str(run_b),
            "--batch-size",
            "4",
            "--max-new-tokens",
            "4",
        ],
    )
    _ok(res)
    summary_b = json.loads((run_b / "summary.json").read_text())
    assert set(summary_b["by_latent_steps"]) == {"0", "2"} and summary_b["overall"]["n"] == 12
    assert (run_b / "plots" / "accuracy_by_latent_steps.png").is_file()
    # K=0 in mode latent is the model's plain greedy answer, as in mode direct.
    a = {r["id"]: r["response"] for r in rows}
    b0 = {
        r["id"]: r["response"]
        for r in map(json.loads, (run_b / "predictions.jsonl").read_text().splitlines())
        if r["latent_steps"] == 0
    }
    assert a == b0

    # Rerunning is a resume: nothing new.
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--data",
            str(synth_test),
            "--reasoning",
            "direct",
            "--out",
            str(run_a),
            "--max-new-tokens",
            "4",
        ],
    )
    _ok(res)
    assert "0 new rows (6 already done)" in res.output

    (run_a / "report.md").unlink()
    res = runner.invoke(app, ["eval", "report", str(run_a)])
    _ok(res)
    assert (run_a / "report.md").is_file()

    res = runner.invoke(
        app,
        [
            "eval",
            "compare",
            str(run_a),
            str(run_b),
            "--out",
            str(tmp_path / "cmp"),
            "--n-boot",
            "200",
        ],
    )
    _ok(res)
    for text in ("McNemar p", "B wins", "B losses", "delta", "accuracy"):
        assert text in res.output, text
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert cmp["paired"]["n"] == 6  # A holds K=0 only, B holds 0 and 2: paired on (id, K=0)
    assert (tmp_path / "cmp" / "compare.md").is_file()


def test_data_takes_several_files_and_user_errors_exit_2(tiny_dir, synth_test, tmp_path):
    second = tmp_path / "second.jsonl"
    write_jsonl(
        [
            s.model_copy(update={"id": f"{s.id}-bis", "dataset": "synth2"})
            for s in read_jsonl(synth_test, check_images=False)[:2]
        ],
        second,
    )
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--data",
            str(synth_test),
            str(second),
            "--out",
            str(tmp_path / "r"),
            "--max-new-tokens",
            "2",
            "--limit",
            "7",
        ],
    )
    _ok(res)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["overall"]["n"] == 7 and set(summary["by_dataset"]) == {"synth", "synth2"}

    for args, message in [
        (["eval", "--model", str(tiny_dir), "--out", str(tmp_path / "x")], "needs --data"),
        (
            [
                "eval",
                "--model",
                str(tiny_dir),
                "--data",
                str(tmp_path / "nope.jsonl"),
                "--out",
                str(tmp_path / "x"),
            ],
            "not found",
        ),
        (
            [
                "eval",
                "--model",
                str(tiny_dir),
                "--data",
                str(synth_test),
                "--out",
                str(tmp_path / "x"),
                "--reasoning",
                "direct",
                "--latent-steps",
                "4",
            ],
            "reasoning latent",
        ),
        (
            [
                "eval",
                "--model",
                str(tiny_dir),
                "--data",
                str(synth_test),
                "--out",
                str(tmp_path / "x"),
                "--reasoning",
                "latent",
                "--latent-steps",
                "two",
            ],
            "integers",
        ),
        (
            [
                "eval",
                "--model",
                str(tiny_dir),
                "--data",
                str(synth_test),
                "--out",
                str(tmp_path / "x"),
                "--explain-metrics",
            ],
            "K >= 1",
        ),
        (
            [
                "eval",
                "--model",
                str(tiny_dir),
                "--data",
                str(synth_test),
                "--out",
                str(tmp_path / "x"),
                "--image-control",
                "none,grey",
            ],
            "image control must be one of none, blank, shuffled, question-only",
        ),
        (["eval", "compare", str(tmp_path / "none"), str(tmp_path / "r")], "not found"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (message, res.output)


def test_explain_metrics_merge_into_summary_and_report(tiny_dir, synth_test, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--data",
            str(synth_test),
            "--reasoning",
            "latent",
            "--latent-steps",
            "0,2",
            "--out",
            str(run),
            "--max-new-tokens",
            "2",
            "--explain-metrics",
        ],
    )
    _ok(res)
    explain = json.loads((run / "summary.json").read_text())["explain"]
    assert (
        set(explain) == {"2"} and explain["2"]["n"] == 5
    )  # the ghost question has an image path, no ROI
    for kind in ("similarity", "attention", "random"):
        assert 0.0 <= explain["2"][kind]["roi_mass"] <= 1.0
    assert "Evidence maps" in (run / "report.md").read_text()
    res = runner.invoke(app, ["eval", "report", str(run)])  # a rebuilt report keeps them
    _ok(res)
    assert "explain" in json.loads((run / "summary.json").read_text())


def test_image_controls_in_one_command_then_compare(tiny_dir, synth_test, tmp_path):
    run = tmp_path / "run"
    args = [
        "eval",
        "--model",
        str(tiny_dir),
        "--data",
        str(synth_test),
        "--out",
        str(run),
        "--max-new-tokens",
        "3",
    ]
    res = runner.invoke(
        app, [*args, "--image-control", "none,blank,shuffled,question-only", "--control-seed", "1"]
    )
    _ok(res)
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["by_image_control"]) == ["none", "blank", "shuffled", "question-only"]
    assert summary["overall"]["n"] == 6 and summary["image_dependence"]["overall"]["n"] == 6
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    ghost = {r["image_control"]: r for r in rows if r["id"] == "ghost"}
    assert ghost["blank"]["error"] and not ghost["question-only"].get(
        "error"
    )  # no image needed without images
    for text in ("question-only", "image dependence (real − blank)", "Image controls"):
        assert text in res.output, text
    md = (run / "report.md").read_text()
    assert "## Grounding controls" in md and "every pixel grey 128" in md

    res = runner.invoke(app, [*args, "--image-control", "none,blank", "--control-seed", "1"])
    _ok(res)
    assert "0 new rows (12 already done)" in res.output
    res = runner.invoke(app, ["eval", "compare", str(run), str(run), "--n-boot", "50"])
    _ok(res)
    assert "images=question-only" in res.output and "B − A +0.0" in res.output
