"""Run reports (files, plots) and the paired comparison of two runs."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest
from PIL import Image

from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError
from medlvr.eval.metrics import prediction_row
from medlvr.eval.report import (
    PLOTS_DIR,
    REPORT_FILE,
    SUMMARY_FILE,
    compare,
    mcnemar_exact,
    paired_bootstrap_ci,
    read_predictions,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sample(i: int, dataset: str) -> VQASample:
    return VQASample(
        id=f"{dataset}-{i}",
        dataset=dataset,
        split="test",
        question="Is there a mass?",
        answer="Yes" if i % 2 else "no",
        answer_type="closed",
        modality="CT",
        question_type="PRES" if i % 3 else "POS",
    )


def _write_run(
    run: Path, answers: dict[tuple[str, int], str], extra: list[dict] | None = None
) -> Path:
    """A run dir whose predictions answer each (sample id, K) with the given response."""
    run.mkdir(parents=True, exist_ok=True)
    samples = {s.id: s for d in ("rad", "slake") for s in (_sample(i, d) for i in range(10))}
    rows = [
        prediction_row(
            samples[sid], resp, latent_steps=k, latency_s=0.1 * (1 + len(resp)), n_tokens=len(resp)
        )
        for (sid, k), resp in answers.items()
    ]
    rows += extra or []
    with (run / "predictions.jsonl").open("w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return run


def _gold(sid: str) -> str:
    return "yes" if int(sid.split("-")[1]) % 2 else "no"


def _flip(answer: str) -> str:
    return "no" if answer == "yes" else "yes"


def test_report_files_and_plots(tmp_path: Path) -> None:
    ids = [f"{d}-{i}" for d in ("rad", "slake") for i in range(10)]
    answers = {}
    for j, sid in enumerate(ids):
        for k in (0, 2, 4):
            answers[(sid, k)] = _gold(sid) if (j + k) % 3 else _flip(_gold(sid))
    answers[("rad-0", 4)] = "yes and no"  # invalid
    err = prediction_row(_sample(99, "rad"), None, latent_steps=4, error="image not found: /x.png")
    run = _write_run(tmp_path / "run", answers, [err])

    out = write_report(run)
    assert (run / SUMMARY_FILE).is_file() and (run / REPORT_FILE).is_file()
    names = sorted(p.name for p in out["plots"])
    assert names == [
        "accuracy_by_dataset.png",
        "accuracy_by_latent_steps.png",
        "accuracy_by_question_type.png",
    ]
    for p in out["plots"]:
        assert p.parent == run / PLOTS_DIR
        assert p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100

    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["overall"]["n"] == 61 and summary["overall"]["n_errors"] == 1
    assert summary["overall"]["n_invalid"] == 1
    assert list(summary["by_latent_steps"]) == ["0", "2", "4"]
    md = (run / REPORT_FILE).read_text()
    for heading in (
        "## Overall",
        "## By dataset",
        "## By question type",
        "## By latent steps K",
        "## Invalid answers",
        "## Errors",
        f"]({PLOTS_DIR}/accuracy_by_dataset.png)",
    ):
        assert heading in md
    assert "image not found: /x.png" in md


def test_single_k_has_no_k_plot(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", {(f"rad-{i}", 0): "yes" for i in range(4)})
    out = write_report(run, title="tiny")
    assert [p.name for p in out["plots"]] == [
        "accuracy_by_dataset.png",
        "accuracy_by_question_type.png",
    ]
    assert (run / REPORT_FILE).read_text().startswith("# tiny")


def test_mcnemar_against_hand_computation() -> None:
    # 6 wins, 1 loss: p = 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * (1 + 7) / 128
    assert (
        mcnemar_exact(6, 1)
        == pytest.approx(2 * (comb(7, 0) + comb(7, 1)) / 2**7)
        == pytest.approx(0.125)
    )
    assert mcnemar_exact(1, 6) == pytest.approx(0.125)
    assert mcnemar_exact(3, 3) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0
    # 10 vs 0: 2 / 2**10
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)


def test_bootstrap_ci_is_seeded_and_covers_delta() -> None:
    a = [True] * 50 + [False] * 50
    b = [True] * 45 + [False] * 5 + [True] * 25 + [False] * 25  # delta = +0.15
    ci1 = paired_bootstrap_ci(a, b, n_boot=4000, seed=3)
    assert ci1 == paired_bootstrap_ci(a, b, n_boot=4000, seed=3)
    assert ci1[0] < 0.15 < ci1[1] and ci1[0] > 0  # 25 wins vs 5 losses is clearly positive
    assert paired_bootstrap_ci(a, a, n_boot=100) == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a, b[:-1])


def test_compare_wins_losses_and_pvalue(tmp_path: Path) -> None:
    ids = [f"rad-{i}" for i in range(10)] + [f"slake-{i}" for i in range(10)]
    # A right on rad-0..6 and slake-*, B flips: wins on rad-7..9 and slake-0..2 (6), loss on rad-0 (1)
    a = {
        (sid, 4): _gold(sid)
        if sid not in ("rad-7", "rad-8", "rad-9", "slake-0", "slake-1", "slake-2")
        else _flip(_gold(sid))
        for sid in ids
    }
    b = {(sid, 4): _flip(_gold(sid)) if sid == "rad-0" else _gold(sid) for sid in ids}
    extra_a = [
        {
            "id": "only-a",
            "dataset": "rad",
            "answer_type": "closed",
            "gold": "yes",
            "correct": True,
            "invalid": False,
            "latent_steps": 4,
        }
    ]  # unmatched, only in A
    run_a = _write_run(tmp_path / "a", a, extra_a)
    run_b = _write_run(tmp_path / "b", b)

    c = compare(run_a, run_b, out_dir=tmp_path / "cmp", n_boot=2000, seed=0)
    p = c["paired"]
    assert c["matched_on"] == "id+latent_steps"
    assert (p["n"], p["wins"], p["losses"], p["ties"]) == (20, 6, 1, 13)
    assert (c["only_a"], c["only_b"]) == (1, 0)
    assert p["acc_a"] == 14 / 20 and p["acc_b"] == 19 / 20 and p["delta"] == pytest.approx(5 / 20)
    assert p["mcnemar_p"] == pytest.approx(0.125)
    assert p["ci"][0] <= 0.25 <= p["ci"][1]
    assert sorted(x["id"] for x in c["won"]) == [
        "rad-7",
        "rad-8",
        "rad-9",
        "slake-0",
        "slake-1",
        "slake-2",
    ]
    assert [x["id"] for x in c["lost"]] == ["rad-0"]
    rad = c["paired_by_dataset"]["rad"]
    assert (rad["wins"], rad["losses"]) == (3, 1)
    assert rad["mcnemar_p"] == pytest.approx(2 * (1 + 4) / 16)  # Bin(4, 1/2): 2 * P(X <= 1) = 0.625
    slake = c["paired_by_dataset"]["slake"]
    assert (slake["wins"], slake["losses"]) == (3, 0) and slake["mcnemar_p"] == pytest.approx(0.25)
    overall = c["metrics"]["overall"]["accuracy"]
    assert overall["a"] == pytest.approx(15 / 21) and overall["b"] == pytest.approx(19 / 20)
    assert overall["delta"] == pytest.approx(19 / 20 - 15 / 21)
    assert (tmp_path / "cmp" / "compare.json").is_file()
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| all | 20 | 70.0 | 95.0 | +25.0 | 6 | 1 | 0.125 |" in md


def test_compare_baseline_k0_against_latent_k4_pairs_by_id(tmp_path: Path) -> None:
    ids = [f"rad-{i}" for i in range(6)]
    run_a = _write_run(tmp_path / "a", {(sid, 0): _flip(_gold(sid)) for sid in ids})
    run_b = _write_run(tmp_path / "b", {(sid, 4): _gold(sid) for sid in ids})
    c = compare(run_a, run_b, n_boot=500)
    assert c["matched_on"] == "id"
    assert (c["paired"]["n"], c["paired"]["wins"], c["paired"]["losses"]) == (6, 6, 0)
    assert c["paired"]["mcnemar_p"] == pytest.approx(2 / 64)


def test_error_rows_lose_in_compare(tmp_path: Path) -> None:
    s = _sample(1, "rad")
    run_a = _write_run(tmp_path / "a", {("rad-1", 0): "yes"})
    run_b = tmp_path / "b"
    run_b.mkdir()
    bad = prediction_row(s, None, latent_steps=0, error="unreadable image")
    (run_b / "predictions.jsonl").write_text(json.dumps(bad) + "\n")
    c = compare(run_a, run_b, n_boot=100)
    assert (c["paired"]["wins"], c["paired"]["losses"]) == (0, 1)


def test_read_predictions_errors(tmp_path: Path) -> None:
    with pytest.raises(MedlvrError, match="not found"):
        read_predictions(tmp_path)
    (tmp_path / "predictions.jsonl").write_text('{"id": "a"}\n\n{oops\n')
    with pytest.raises(MedlvrError, match=r"predictions.jsonl:3: malformed JSON"):
        read_predictions(tmp_path)


def test_compare_with_no_common_question(tmp_path: Path) -> None:
    run_a = _write_run(tmp_path / "a", {("rad-1", 0): "yes"})
    run_b = _write_run(tmp_path / "b", {("rad-2", 0): "no"})
    c = compare(run_a, run_b, out_dir=tmp_path / "cmp", n_boot=100)
    assert c["paired"]["n"] == 0 and c["paired"]["ci"] is None and c["paired"]["mcnemar_p"] == 1.0
    json.loads(
        (tmp_path / "cmp" / "compare.json").read_text(), parse_constant=lambda x: pytest.fail(x)
    )
