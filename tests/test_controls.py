"""Grounding controls: condition parsing, blank images, the shuffled derangement, paired gaps, compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError
from medlvr.eval.controls import blank_like, kept_own, shuffle_donors
from medlvr.eval.harness import parse_image_controls
from medlvr.eval.metrics import prediction_row, summarize
from medlvr.eval.report import compare


def _q(i: int, images: list[str], answer: str = "yes", dataset: str = "d") -> VQASample:
    return VQASample(
        id=f"q{i:02d}",
        dataset=dataset,
        split="test",
        images=images,
        question="Is there a mass?",
        answer=answer,
        answer_type="closed",
    )


def test_parse_image_controls():
    assert parse_image_controls(None) == ["none"]
    assert parse_image_controls(" blank,none ,blank,question-only") == [
        "blank",
        "none",
        "question-only",
    ]
    assert parse_image_controls(["shuffled"]) == ["shuffled"]
    with pytest.raises(MedlvrError, match="must be one of none, blank, shuffled, question-only"):
        parse_image_controls("none,black")
    with pytest.raises(MedlvrError, match="no image control"):
        parse_image_controls(" , ")


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16"])
def test_blank_is_same_size_and_mode_grey_128(mode):
    real = Image.new(
        mode,
        (37, 21),
        7 if mode in ("L", "I;16") else (7,) * len(Image.new(mode, (1, 1)).getbands()),
    )
    blank = blank_like(real)
    assert (blank.mode, blank.size) == (mode, (37, 21))
    assert np.unique(np.asarray(blank)).tolist() == [128]


def test_shuffled_is_a_fixed_derangement_that_keeps_image_counts():
    one = [_q(i, [f"/img/{i // 3}.png"]) for i in range(12)]  # three questions per image
    two = [_q(20 + i, [f"/img/a{i}.png", f"/img/b{i}.png"]) for i in range(4)]
    lone = [_q(30, ["/img/x1.png", "/img/x2.png", "/img/x3.png"])]  # the only 3-image question
    none = [_q(40, [])]
    samples = one + two + lone + none
    donors = shuffle_donors(samples, seed=0)

    assert donors == shuffle_donors(list(reversed(samples)), seed=0)  # order never matters
    assert donors != shuffle_donors(samples, seed=1)
    assert "q40" not in donors  # a question without images has nothing to swap
    by_id = {s.id: s for s in samples}
    for group in (one, two):
        ids = [s.id for s in group]
        assert sorted(donors[i] for i in ids) == sorted(
            ids
        )  # a permutation within the image-count group
        for i in ids:
            assert len(by_id[donors[i]].images) == len(by_id[i].images)
            assert not set(by_id[donors[i]].images) & set(
                by_id[i].images
            )  # no own image, even a shared one
    assert donors["q30"] == "q30" and kept_own(samples, donors) == [
        "q30"
    ]  # a group of one cannot move

    pair = [_q(0, ["/a.png"]), _q(1, ["/b.png"])]
    assert shuffle_donors(pair, seed=5) == {"q00": "q01", "q01": "q00"}  # n = 2: the swap


def test_real_minus_control_is_paired_on_the_questions_both_answered():
    samples = [_q(i, [f"/{i}.png"], dataset="a" if i < 6 else "b") for i in range(10)]
    real = [
        prediction_row(s, "yes", latent_steps=0, image_control="none") for s in samples
    ]  # all right
    # blank answered 8 of the 10 questions (a half-finished control), right on q00..q02 only
    blank = [
        prediction_row(s, "yes" if i < 3 else "no", latent_steps=0, image_control="blank")
        for i, s in enumerate(samples[:8])
    ]
    summary = summarize(real + blank)
    assert (
        summary["overall"]["n"] == 10 and summary["overall"]["accuracy"] == 1.0
    )  # real images only
    assert summary["image_control_main"] == "none"
    assert {c: m["n"] for c, m in summary["by_image_control"].items()} == {"none": 10, "blank": 8}
    dep = summary["image_dependence"]
    assert dep["overall"] == {"n": 8, "real": 1.0, "control": 3 / 8, "delta": 5 / 8}
    assert dep["by_dataset"]["a"] == {"n": 6, "real": 1.0, "control": 3 / 6, "delta": 3 / 6}
    assert dep["by_dataset"]["b"] == {"n": 2, "real": 1.0, "control": 0.0, "delta": 1.0}
    assert summary["real_minus_control"] == {"blank": dep["overall"]}
    # A run of plain rows (no condition field) has none of these keys.
    plain = summarize([prediction_row(s, "yes", latent_steps=0) for s in samples])
    assert not {k for k in plain if "image" in k or "control" in k}


def _write(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True)
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_compare_shows_conditions_and_image_dependence(tmp_path):
    samples = [_q(i, [f"/{i}.png"]) for i in range(10)]

    def rows(real_right: int, blank_right: int) -> list[dict]:
        return [
            prediction_row(
                s, "yes" if i < real_right else "no", latent_steps=0, image_control="none"
            )
            for i, s in enumerate(samples)
        ] + [
            prediction_row(
                s, "yes" if i < blank_right else "no", latent_steps=0, image_control="blank"
            )
            for i, s in enumerate(samples)
        ]

    a = _write(tmp_path / "a", rows(6, 5))  # image dependence +10 points
    b = _write(tmp_path / "b", rows(9, 3))  # +60 points
    c = compare(a, b, n_boot=200, out_dir=tmp_path / "cmp")
    assert c["matched_on"] == "id+latent_steps+image_control" and c["main_image_control"] == "none"
    assert (c["paired"]["n"], c["paired"]["acc_a"], c["paired"]["acc_b"]) == (
        10,
        0.6,
        0.9,
    )  # real images only
    assert c["paired_by_image_control"]["blank"]["acc_b"] == pytest.approx(0.3)
    assert c["image_dependence"]["a"] == pytest.approx(0.1) and c["image_dependence"][
        "b"
    ] == pytest.approx(0.6)
    assert c["image_dependence"]["delta"] == pytest.approx(0.5)
    assert c["metrics"]["by_image_control"]["blank"]["accuracy"]["b"] == pytest.approx(0.3)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert (
        "images=blank" in md
        and "Image dependence (real − blank, points): A +10.0, B +60.0, B − A +50.0" in md
    )

    # A real-image run against a blank-image run of the same model: paired by question.
    real = _write(tmp_path / "real", rows(6, 0)[:10])
    blank = _write(tmp_path / "blank", rows(0, 5)[10:])
    c = compare(real, blank, n_boot=200)
    assert c["matched_on"] == "id+latent_steps" and (c["paired"]["n"], c["paired"]["losses"]) == (
        10,
        1,
    )
