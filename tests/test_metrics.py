"""Scoring and aggregation, checked against hand computations."""

from __future__ import annotations

import json

import pytest

from medlvr.data.schema import VQASample
from medlvr.eval.metrics import accuracy_reward, prediction_row, score, summarize, token_scores


def _sample(i: int, answer_type: str, answer: str, dataset: str = "vqa-rad", **kw) -> VQASample:
    if answer_type == "choice":
        kw.setdefault("options", {"A": "CT", "B": "MRI", "C": "X-ray"})
        kw.setdefault("answer_letter", next(k for k, v in kw["options"].items() if v == answer))
    return VQASample(
        id=f"q{i}",
        dataset=dataset,
        split="test",
        question="?",
        answer=answer,
        answer_type=answer_type,
        **kw,
    )


def test_token_scores_hand_computed() -> None:
    # pred tokens: [left, lower, lobe, of, lung] (5); gold: [left, lung] (2); overlap 2
    p, r, f = token_scores("The left lower lobe of the lung", "left lung")
    assert (p, r) == (2 / 5, 1.0)  # recall = |pred ∩ gold| / |gold|, not swapped
    assert f == pytest.approx(2 * 0.4 * 1.0 / 1.4)
    # multiset overlap: gold has "2" once, pred twice -> overlap 1
    p, r, f = token_scores("two 2 nodules", "2 nodules")
    assert (p, r) == (2 / 3, 1.0)
    assert token_scores("heart", "left lung") == (0.0, 0.0, 0.0)
    assert token_scores("", "left lung") == (0.0, 0.0, 0.0)


def test_score_open_fields() -> None:
    s = score(_sample(1, "open", "Left lung"), "Answer: the lung, left side")
    assert not s.correct and not s.invalid  # the judge keeps word order ("left to right")
    # pred [lung, left, side] vs gold [left, lung]
    assert (s.exact_match, s.token_precision, s.token_recall) == (0.0, 2 / 3, 1.0)
    assert s.token_f1 == pytest.approx(0.8)
    s = score(_sample(1, "open", "Left lung"), "LEFT LUNG.")
    assert s.correct and (s.exact_match, s.token_recall, s.token_f1) == (1.0, 1.0, 1.0)
    s = score(_sample(1, "open", "Left lung"), "")
    assert s.invalid and not s.correct and s.token_recall == 0.0
    s = score(_sample(1, "open", "2"), "two")
    assert s.correct
    s = score(_sample(1, "open", "Left lung"), "Answer: the lung, right side")
    assert not s.correct and s.exact_match == 0.0 and s.token_recall == 0.5


def test_score_closed_and_choice() -> None:
    yes = _sample(1, "closed", "Yes")
    assert score(yes, "yes").correct and not score(yes, "no").correct
    both = score(yes, "yes and no")
    assert both.invalid and not both.correct and both.token_recall is None
    mri = _sample(2, "closed", "MRI")
    assert score(mri, "mri").correct and not score(mri, "CT").correct
    choice = _sample(3, "choice", "MRI")
    assert score(choice, "B").correct and score(choice, "MRI").correct
    assert not score(choice, "A").correct and score(choice, "A and B").invalid


def test_numbers_score_as_numbers() -> None:
    """ ".5 cm" is 0.5 cm (a wrong "5 cm" must not score right), "2.0" is 2 (issue 13, item 6)."""
    half = _sample(1, "open", ".5 cm")
    assert score(half, "0.5 cm").correct and score(half, "0.50 cm.").correct
    assert not score(half, "5 cm").correct and not accuracy_reward(half, "5 cm")
    count = _sample(2, "open", "2")
    assert (
        score(count, "2.0").correct
        and score(count, "two").correct
        and not score(count, "20").correct
    )
    assert score(_sample(3, "closed", "Yes."), "yes").correct


def test_reward_is_the_scorer() -> None:
    choice = _sample(3, "choice", "MRI")
    for response, reward in [("B", 1.0), ("(b)", 1.0), ("A", 0.0), ("A and B", 0.0), ("", 0.0)]:
        assert accuracy_reward(choice, response) == reward == float(score(choice, response).correct)
    # a prediction row re-scores to the same verdict
    row = prediction_row(choice, "MRI")
    assert accuracy_reward(row, row["response"]) == 1.0


def _rows() -> list[dict]:
    s = [
        _sample(
            1, "closed", "Yes", modality="CT", question_type="PRES", meta={"content_type": "Organ"}
        ),
        _sample(2, "closed", "no", modality="CT", question_type="PRES"),
        _sample(3, "closed", "MRI", modality="MRI", question_type="MODALITY"),
        _sample(4, "open", "left lung", modality="X-Ray", question_type="POS"),
        _sample(5, "open", "2", modality="X-Ray", question_type="COUNT"),
        _sample(
            6,
            "choice",
            "CT",
            dataset="omnimed",
            modality="CT",
            question_type="Modality Recognition",
        ),
        _sample(
            7,
            "choice",
            "MRI",
            dataset="omnimed",
            modality="MRI",
            question_type="Modality Recognition",
        ),
        _sample(8, "choice", "X-ray", dataset="omnimed", modality=None, question_type="Anatomy"),
    ]
    return [
        prediction_row(s[0], "Yes", latent_steps=0, latency_s=1.0, n_tokens=2),  # right
        prediction_row(s[1], "yes, no", latent_steps=0, latency_s=2.0, n_tokens=4),  # invalid
        prediction_row(s[2], "MRI", latent_steps=0, latency_s=3.0, n_tokens=2),  # right
        prediction_row(
            s[3], "left lower lung", latent_steps=4, latency_s=4.0, n_tokens=6
        ),  # wrong, recall 1
        prediction_row(s[4], "two", latent_steps=4, latency_s=5.0, n_tokens=1),  # right
        prediction_row(s[5], "A", latent_steps=4, latency_s=6.0, n_tokens=1),  # right
        prediction_row(s[6], None, latent_steps=4, error="image not found: x.png"),  # error
        prediction_row(s[7], "A and C", latent_steps=4, latency_s=8.0, n_tokens=3),  # invalid
    ]


def test_summary_exact_counts() -> None:
    rows = _rows()
    json.dumps(rows)  # rows are JSON-ready
    summ = summarize(rows)
    o = summ["overall"]
    assert (o["n"], o["n_invalid"], o["n_errors"]) == (8, 2, 1)
    assert o["accuracy"] == 4 / 8
    assert o["invalid_rate"] == 2 / 8
    assert (o["n_closed"], o["closed_accuracy"]) == (3, 2 / 3)
    assert (o["n_choice"], o["choice_accuracy"]) == (3, 1 / 3)
    assert (o["n_open"], o["open_exact_match"]) == (2, 1 / 2)
    assert o["open_token_recall"] == pytest.approx((1.0 + 1.0) / 2)
    assert o["open_token_f1"] == pytest.approx((0.8 + 1.0) / 2)  # p=2/3, r=1 -> 0.8
    # latencies 1,2,3,4,5,6,8 (error row has none): median 4; p95 at rank 0.95 * 6 = 5.7
    assert o["latency_p50"] == 4.0
    assert o["latency_p95"] == pytest.approx(6 + 0.7 * 2)
    assert o["mean_tokens"] == pytest.approx(19 / 7)

    d = summ["by_dataset"]
    assert sorted(d) == ["omnimed", "vqa-rad"]
    assert (d["vqa-rad"]["n"], d["vqa-rad"]["accuracy"], d["vqa-rad"]["n_invalid"]) == (5, 3 / 5, 1)
    assert (d["omnimed"]["n"], d["omnimed"]["accuracy"], d["omnimed"]["n_errors"]) == (3, 1 / 3, 1)
    assert d["omnimed"]["open_token_f1"] is None and d["omnimed"]["n_open"] == 0
    assert summ["dataset_macro_accuracy"] == pytest.approx((3 / 5 + 1 / 3) / 2)

    m = summ["by_modality"]
    assert {k: v["n"] for k, v in m.items()} == {"CT": 3, "MRI": 2, "X-Ray": 2, "unknown": 1}
    assert m["CT"]["accuracy"] == 2 / 3
    q = summ["by_question_type"]
    assert (q["Modality Recognition"]["n"], q["Modality Recognition"]["accuracy"]) == (2, 1 / 2)
    assert q["PRES"]["invalid_rate"] == 1 / 2
    a = summ["by_answer_type"]
    assert {k: v["n"] for k, v in a.items()} == {"choice": 3, "closed": 3, "open": 2}
    assert (
        summ["by_content_type"]["Organ"]["n"] == 1 and summ["by_content_type"]["unknown"]["n"] == 7
    )

    k = summ["by_latent_steps"]
    assert list(k) == ["0", "4"]
    assert (k["0"]["n"], k["0"]["accuracy"]) == (3, 2 / 3)
    assert (k["4"]["n"], k["4"]["accuracy"], k["4"]["n_errors"]) == (5, 2 / 5, 1)
    assert summ["by_latent_steps_dataset"]["4"]["omnimed"]["n"] == 3


def test_error_row_is_wrong_not_invalid() -> None:
    row = _rows()[6]
    assert row["error"] and not row["correct"] and not row["invalid"]
    # even a row that claims correct is counted wrong when it carries an error
    bad = dict(row, correct=True)
    assert summarize([bad])["overall"]["accuracy"] == 0.0


def test_summary_recomputes_missing_token_fields() -> None:
    row = {
        "id": "x",
        "answer_type": "open",
        "gold": "left lung",
        "parsed": "left lower lung",
        "correct": False,
        "invalid": False,
        "dataset": "d",
    }
    o = summarize([row])["overall"]
    assert o["open_token_recall"] == 1.0 and o["open_token_f1"] == pytest.approx(0.8)
    assert "by_latent_steps" not in summarize([row]) and "by_content_type" not in summarize([row])


def test_summary_of_nothing() -> None:
    o = summarize([])["overall"]
    assert o["n"] == 0 and o["accuracy"] is None and o["invalid_rate"] is None


def test_every_vqa_rad_gold_scores_itself(vqa_rad_root) -> None:
    """Real release answers (integers, mixed case, "CLOSED " with a trailing space) parse back to themselves."""
    records = json.loads((vqa_rad_root / "VQA_RAD Dataset Public.json").read_text())
    assert len(records) == 2248
    for r in records:
        row = {"answer_type": r["answer_type"], "answer": r["answer"]}
        for response in (
            str(r["answer"]),
            f"<answer>{r['answer']}</answer>",
            f"The answer is {r['answer']}.",
        ):
            assert score(row, response).correct, (r["qid"], r["answer"], response)
