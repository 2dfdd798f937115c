"""The judge against hand labels: agreement with a careful reader, false accepts, no exploitable reward.

`tests/data/scoring_labels.jsonl` holds 657 responses in the style of real model outputs on
VQA-RAD, SLAKE and PathVQA (and multiple-choice sets), each labelled right or wrong by a reader
before the judge scored it; `class` names the kind of answer. `scoring_labels_heldout.jsonl`
(102 more) was labelled after the judge was written. The tables of docs/scoring.md are
`agreement_table` of these files (`python -m pytest tests/test_scoring_labels.py -s` prints them).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from medlvr.data.schema import VQASample
from medlvr.eval.kit_rules import KIT_RULES
from medlvr.eval.metrics import accuracy_reward, score
from medlvr.train.rewards import RewardContext, accuracy, format_reward

DATA = Path(__file__).parent / "data"


def _read(name: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (DATA / name).read_text(encoding="utf-8").splitlines() if x]


ROWS = _read("scoring_labels.jsonl")
HELD_OUT = _read("scoring_labels_heldout.jsonl")
"""Labelled after the judge was tuned on ROWS and before it scored them (a check on overfitting)."""
CLASSES = {
    "yes_no_words",
    "yes_no_without_words",
    "yes_no_hedge_or_both",
    "closed_alternatives",
    "choice_letter",
    "choice_text",
    "open_answer",
    "open_form",
    "open_number",
    "thinking",
    "empty",
    "asserts_all",
}


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("answer_type", "gold", "options", "question")}


def _sample(row: dict[str, Any]) -> VQASample:
    choice = row["answer_type"] == "choice"
    return VQASample(
        id=row["id"],
        dataset=row["dataset"],
        split="test",
        question=row["question"],
        options=row["options"],
        answer=row["options"][row["gold"]] if choice else row["gold"],
        answer_letter=row["gold"] if choice else None,
        answer_type=row["answer_type"],
    )


def agreement_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per class and `ALL`: n, agreement with the labels, false accepts, false rejects."""
    table: dict[str, dict[str, float]] = defaultdict(
        lambda: dict.fromkeys(("n", "agree", "fa", "fr"), 0)
    )
    for row in rows:
        judged = score(_fields(row), row["response"]).correct
        for name in (row["class"], "ALL"):
            t = table[name]
            t["n"] += 1
            t["agree"] += judged == row["label"]
            t["fa"] += judged and not row["label"]
            t["fr"] += row["label"] and not judged
    return dict(table)


TABLE = agreement_table(ROWS)
LABELS_TITLE = "labels"


def _print(table: dict[str, dict[str, float]], title: str) -> None:
    print(f"\n{title}\n{'class':24s} {'n':>4s} {'agree %':>8s} {'false acc':>9s} {'false rej':>9s}")
    for name in sorted(table, key=lambda k: (k == "ALL", k)):
        t = table[name]
        print(f"{name:24s} {t['n']:4d} {100 * t['agree'] / t['n']:8.1f} {t['fa']:9d} {t['fr']:9d}")


def test_the_labelled_set_covers_every_class() -> None:
    assert len(ROWS) >= 400
    assert len({r["id"] for r in ROWS}) == len(ROWS)
    counts = {c: TABLE[c]["n"] for c in CLASSES}
    assert set(TABLE) - {"ALL"} == CLASSES
    assert min(counts.values()) >= 15, counts
    assert {r["dataset"] for r in ROWS} >= {"vqa-rad", "slake", "pathvqa"}
    for c in CLASSES - {"empty", "asserts_all", "yes_no_hedge_or_both"}:  # both verdicts in a class
        assert {r["label"] for r in ROWS if r["class"] == c} == {True, False}, c


def test_agreement_with_the_labels(capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        _print(TABLE, LABELS_TITLE)
    every = TABLE["ALL"]
    assert every["agree"] / every["n"] >= 0.92
    assert every["fa"] / every["n"] <= 0.01
    for name in CLASSES:
        assert TABLE[name]["agree"] / TABLE[name]["n"] >= 0.9, name


def test_agreement_on_the_held_out_labels(capsys: pytest.CaptureFixture[str]) -> None:
    table = agreement_table(HELD_OUT)
    with capsys.disabled():
        _print(table, "held-out labels")
    assert len(HELD_OUT) >= 100
    assert table["ALL"]["agree"] / table["ALL"]["n"] >= 0.9
    assert table["ALL"]["fa"] / table["ALL"]["n"] <= 0.01


@pytest.mark.parametrize("cls", ["asserts_all", "yes_no_hedge_or_both", "empty"])
def test_no_reward_for_hedging_listing_or_nothing(cls: str) -> None:
    """Every response that names several answers, hedges or says nothing earns 0, whatever the gold."""
    rows = [r for r in ROWS if r["class"] == cls]
    for row in rows:
        assert accuracy_reward(_fields(row), row["response"]) == 0.0, row["response"]


@pytest.mark.parametrize(
    ("question", "gold", "options"),
    [
        ("Is there a pleural effusion?", "yes", {}),
        ("Is there a pleural effusion?", "no", {}),
        ("Is this a CT or an MRI?", "MRI", {}),
        ("Is this a CT or an MRI?", "CT", {}),
        ("Is the lesion on the left, right, or both sides?", "left", {}),
        ("Which organ is enlarged?", "liver", {}),
    ],
)
def test_asserting_every_answer_earns_nothing_whichever_is_gold(
    question: str, gold: str, options: dict[str, str]
) -> None:
    kind = "closed" if gold in ("yes", "no") or " or " in question else "open"
    fields = {"answer_type": kind, "gold": gold, "options": options, "question": question}
    for response in [
        "yes or no",
        "Yes. No.",
        "yes/no",
        "present and absent",
        "CT or MRI",
        "MRI, CT",
        "It is a CT and an MRI",
        "left, right or both",
        "left and right",
        "liver, spleen, kidney",
        "liver or spleen",
    ]:
        assert accuracy_reward(fields, response) == 0.0, response


def test_listing_every_option_earns_nothing() -> None:
    options = {"A": "Pneumonia", "B": "Pleural effusion", "C": "Pneumothorax", "D": "Normal"}
    for gold in options:
        fields = {"answer_type": "choice", "gold": gold, "options": options, "question": "?"}
        for response in [
            "A B C D",
            "A, B, C or D",
            "(A)(B)(C)(D)",
            "ABCD",
            "Pneumonia, pleural effusion, pneumothorax or normal",
            "pneumonia and pneumothorax",
        ]:
            assert accuracy_reward(fields, response) == 0.0, (gold, response)


def test_an_unfinished_think_is_no_answer() -> None:
    fields = {"answer_type": "closed", "gold": "yes", "options": {}, "question": "Is there a mass?"}
    for response in [
        "<think>Yes, there is a mass in the right lobe. So the answer is yes",
        "<think>",
        "<think>The answer is yes.\\boxed{yes}",
    ]:
        s = score(fields, response)
        assert s.invalid and not s.correct and s.parsed.how == "think:unfinished", response
    assert score(fields, "<think>A mass.</think>Yes").correct
    assert score(
        fields, "<think>Unsure</think><think>A mass.</think>\n<answer>yes</answer>"
    ).correct


def test_the_vlpo_reward_is_the_judge() -> None:
    """VLPO's accuracy reward gives the judge's verdict on every labelled row; format, its parse."""
    latents = torch.zeros(0, 4)
    for row in ROWS + HELD_OUT:
        s = score(_sample(row), row["response"])
        assert accuracy(_sample(row), row["response"], latents, RewardContext()) == float(s.correct)
        assert format_reward(_sample(row), row["response"], latents, RewardContext()) == float(
            not s.invalid
        )


def test_the_judge_agrees_with_the_labels_more_than_any_kit_rule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The kits' rules (medlvr's implementation, `medlvr.eval.kit_rules`) on the same labelled rows;
    a kit's fractional score (LLaVA-Med's open recall) counts as right only when it is 1."""
    ours = TABLE["ALL"]["agree"] / TABLE["ALL"]["n"]
    with capsys.disabled():
        print(
            f"\n{'rule':12s} {'agree %':>8s} {'false acc':>9s}\n{'medlvr':12s} {100 * ours:8.1f} 0"
        )
        for name, rule in KIT_RULES.items():
            right = [(s is not None and s >= 1.0, r["label"]) for r in ROWS for s in [rule(r)]]
            agree = sum(a == b for a, b in right) / len(right)
            false_accepts = sum(a and not b for a, b in right)
            print(f"{name:12s} {100 * agree:8.1f} {false_accepts:9d}")
            assert agree < ours - 0.2, name
