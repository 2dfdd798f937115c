"""The subtlety ladder's verdict, from numbers built to sit on either side of its thresholds."""

from __future__ import annotations

import random

import pytest

from medlvr.data.schema import VQASample
from medlvr.recipes.demo_config import ArmResult, DemoConfig, DemoData
from medlvr.recipes.demo_report import MID_BAND, Numbers, mid_rungs, subtlety_verdict

QUESTIONS_PER_RUNG = 200


def _questions() -> list[VQASample]:
    return [
        VQASample(id=f"q{r}-{i}", dataset="synth", split="test", images=["x.png"], question="Is it?",
                  answer="yes" if i % 2 else "no", answer_type="closed", question_type="presence", meta={"rung": r})
        for r in range(4) for i in range(QUESTIONS_PER_RUNG)
    ]  # fmt: skip


def _numbers(accuracy: dict[str, list[float]], seeds=(1, 2, 3)) -> Numbers:
    """Every arm right on a share `accuracy[arm][rung]` of each rung's questions (its first ones,
    so two arms at the same rate agree question by question), the same for every seed."""
    questions = _questions()
    cfg = DemoConfig(ladder="subtlety", seeds=list(seeds), arms="".join(accuracy), split="test")
    data = DemoData(train=None, val=None, tests={"test": questions}, has_rois=True)  # type: ignore[arg-type]
    results = {}
    for arm, by_rung in accuracy.items():
        k = cfg.latent_steps_of(arm)
        rows = [{"id": q.id, "latent_steps": k, "correct": int(q.id.split("-")[1]) < by_rung[q.meta["rung"]] * QUESTIONS_PER_RUNG}
                for q in questions]  # fmt: skip
        controls = [
            {**r, "image_control": "blank", "correct": random.Random(r["id"]).random() < 0.5}
            for r in rows
        ]
        results[arm] = {
            s: ArmResult(arm, s, "m", [], {"test": rows}, controls, [k], 1.0) for s in seeds
        }
    return Numbers(cfg, data, results)


def _pairs(n: Numbers) -> dict:
    mid = mid_rungs(n)
    return {(a, b, mid): p for a, b in (("c", "a"), ("c", "r"), ("c", "p"), ("d", "c"))
            if (p := n.paired(a, b, mid)) is not None}  # fmt: skip


def test_claims_are_judged_only_on_the_rungs_where_direct_is_in_the_band():
    n = _numbers({"a": [0.98, 0.8, 0.65, 0.5], "c": [0.98, 0.9, 0.75, 0.5]})
    assert mid_rungs(n) == frozenset({1, 2}) and MID_BAND == (0.6, 0.9)
    said = "\n".join(subtlety_verdict(n, _pairs(n)))
    assert "rungs 1, 2 have (a) between 0.6 and 0.9" in said
    assert "(c) minus direct (a) on rungs 1, 2: **+10.0 points**" in said
    assert "at least +5 points" in said and "**met**" in said


@pytest.mark.parametrize(
    ("c_mid", "r_mid", "expect_c_a", "expect_c_r"),
    [
        (0.85, 0.75, "met", "met"),  # latent steps add to what ROI supervision alone gives
        (0.85, 0.84, "met", "not met"),  # (c) beats (a) but not (r): the gain is ROI supervision's
        (0.72, 0.60, "not met", "met"),  # +2 over (a): below the +5 threshold
    ],
)
def test_the_latent_claim_needs_to_beat_the_roi_control_by_three_points(
    c_mid, r_mid, expect_c_a, expect_c_r
):
    n = _numbers(
        {"a": [0.99, 0.7, 0.5, 0.5], "c": [0.99, c_mid, 0.5, 0.5], "r": [0.99, r_mid, 0.5, 0.5]}
    )
    said = subtlety_verdict(n, _pairs(n))
    c_a = next(line for line in said if "(c) minus direct (a)" in line)
    c_r = next(line for line in said if "without latent steps (r)" in line)
    assert c_a.endswith(f"**{expect_c_a}**."), c_a
    assert c_r.endswith(f"**{expect_c_r}**."), c_r


def test_no_rung_in_the_band_means_no_claim_is_judged():
    n = _numbers({"a": [0.99, 0.97, 0.5, 0.5], "c": [0.99, 0.99, 0.55, 0.5]})
    said = subtlety_verdict(n, _pairs(n))
    assert any(
        "no rung has (a) between 0.6 and 0.9: the claims cannot be judged" in line for line in said
    )
    assert not any("Claim:" in line for line in said)


def test_one_seed_is_judged_by_the_paired_test():
    n = _numbers({"a": [0.99, 0.7, 0.5, 0.5], "c": [0.99, 0.8, 0.5, 0.5]}, seeds=(1,))
    line = next(x for x in subtlety_verdict(n, _pairs(n)) if "(c) minus direct (a)" in x)
    # 20 wins, 0 losses over 200 pairs: McNemar p ~ 2e-6
    assert "paired p < 0.05" in line and line.endswith("**met**.")
