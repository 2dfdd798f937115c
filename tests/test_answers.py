"""The answer parser on a table of tricky responses (one row = one documented rule)."""

from __future__ import annotations

import pytest

from medlvr.data.schema import VQASample
from medlvr.eval.answers import (
    AnswerKey,
    Parsed,
    answer_key,
    is_yes_no,
    normalize_text,
    parse_answer,
    same_answer,
)

OPTS = {"A": "Pneumonia", "B": "Pleural effusion", "C": "Pneumothorax", "D": "Normal"}
CHOICE = AnswerKey("choice", "B", OPTS)
HEP = AnswerKey(
    "choice", "A", {"A": "Hepatitis B", "B": "Vitamin D deficiency", "C": "Type A dissection"}
)
NOTA = AnswerKey("choice", "D", {"A": "CT", "B": "MRI", "C": "X-ray", "D": "None of the above"})
YES = AnswerKey("closed", "Yes")  # SLAKE capitalises gold answers
NO = AnswerKey("closed", "no")
MRI = AnswerKey("closed", "MRI")  # VQA-RAD: closed but not yes/no ("MRI or CT?")
OPEN = AnswerKey("open", "Left lung")
COUNT = AnswerKey("open", "2")
SIZE = AnswerKey("open", ".5 cm")
YES_DOT = AnswerKey("closed", "Yes.")
CT_OR_MRI = AnswerKey("closed", "MRI", question="Is this a CT or an MRI?")
SIDE = AnswerKey("closed", "Right", question="Is the lesion on the left, right, or both sides?")
EFFUSION = AnswerKey("closed", "yes", question="Is there a pleural effusion?")

LONG_REASONING = (
    "Let me look at the image carefully. A large opacity is seen in the right lower lobe. Option A "
    "(pneumonia) would show air bronchograms, option C would show a visible pleural line, and "
    "D is excluded. " * 5
)

# (key, response, expected value or None for invalid, expected rule)
CASES = [
    # --- choice: bare letters
    (CHOICE, "B", "B", "full:letter"),
    (CHOICE, "b", "B", "full:letter"),
    (CHOICE, "(b)", "B", "full:letter"),
    (CHOICE, "B.", "B", "full:letter"),
    (CHOICE, "  **B**  ", "B", "full:letter"),
    (CHOICE, "[C]", "C", "full:letter"),
    (CHOICE, "Answer: (c)", "C", "marker:letter"),
    (CHOICE, "answer: c", "C", "marker:letter"),
    (CHOICE, "The answer is B.", "B", "marker:letter"),
    (CHOICE, "The correct answer is (D) Normal", "D", "marker:letter"),
    (CHOICE, "Option B", "B", "full:letter"),
    (CHOICE, "I would choose option b here.", "B", "full:letter"),
    (CHOICE, "B. Pleural effusion", "B", "full:letter"),
    (CHOICE, "B) Pleural effusion", "B", "full:letter"),
    (CHOICE, "E", None, "full:not_an_option"),
    # --- choice: several letters, none, letters inside words
    (CHOICE, "A and B", None, "full:several_letters"),
    (CHOICE, "Either (A) or (C).", None, "full:several_letters"),
    (CHOICE, "A/B", None, "full:several_letters"),
    (CHOICE, "CT shows it", None, "full:no_match"),
    (CHOICE, "Bone window", None, "full:no_match"),
    (CHOICE, "B-mode ultrasound", None, "full:no_match"),
    (CHOICE, "Vitamin B12", None, "full:no_match"),
    (CHOICE, "A mass is seen in the lung.", None, "full:no_match"),
    (CHOICE, "A 45-year-old with a mass. B", "B", "full:letter"),
    (CHOICE, "A is correct", "A", "full:letter"),
    (CHOICE, "I cannot tell from this image.", None, "full:no_match"),
    (CHOICE, "", None, "full:empty"),
    (CHOICE, "   \n ", None, "full:empty"),
    (CHOICE, "None of the above", None, "full:no_match"),
    (CHOICE, "Pneumonia or effusion", None, "full:several_options"),  # names two options
    # --- choice: option text instead of a letter
    (CHOICE, "Pleural effusion", "B", "full:option_text"),
    (CHOICE, "pleural effusion.", "B", "full:option_text"),
    (CHOICE, "The answer is Pneumothorax", "C", "marker:option_text"),
    (CHOICE, "B. Pneumothorax", None, "full:letter_text_conflict"),
    (HEP, "Hepatitis B", "A", "full:option_text"),
    (HEP, "A. Hepatitis B", "A", "full:letter"),
    (HEP, "Vitamin D deficiency", "B", "full:option_text"),
    (HEP, "It is Type A dissection.", "C", "full:option_text"),  # names option C
    (NOTA, "None of the above", "D", "full:option_text"),
    (NOTA, "CT", "A", "full:option_text"),
    # --- choice: tags, boxed, reasoning
    (CHOICE, LONG_REASONING + "<answer>B</answer>", "B", "tag:letter"),
    (CHOICE, "<answer>A</answer> wait, re-checking <answer>(B)</answer>", "B", "tag:letter"),
    (CHOICE, "<think>A or C? Probably A.</think>\\boxed{B}", "B", "boxed:letter"),
    (CHOICE, "So the final result is \\boxed{\\text{C}}.", "C", "boxed:letter"),
    (CHOICE, "<think>Options A and C look likely.</think>B", "B", "full:letter"),
    (CHOICE, LONG_REASONING + "<answer>", None, "tag:empty"),
    (CHOICE, "<answer>B. Pleural", "B", "tag:letter"),  # truncated inside the final tag
    (CHOICE, "<answer></answer>", None, "tag:empty"),
    (CHOICE, "<|latent_start|><|latent_end|>B<|im_end|>", "B", "full:letter"),
    (CHOICE, LONG_REASONING, None, "full:several_letters"),
    (CHOICE, "Answer:\nB", "B", "marker:letter"),
    (CHOICE, "**Answer:** B", "B", "marker:letter"),
    (CHOICE, "The answer is: A", "A", "marker:letter"),
    (CHOICE, "Answer: B\nExplanation: option A shows consolidation instead.", "B", "marker:letter"),
    (CHOICE, "Final Answer: The final answer is $\\boxed{C}$", "C", "boxed:letter"),
    # --- yes/no
    (YES, "yes", "yes", "full:yes_no"),
    (YES, "Yes.", "yes", "full:yes_no"),
    (YES, "YES, there is a fracture", "yes", "full:yes_no"),
    (NO, "No", "no", "full:yes_no"),
    (NO, "no evidence", "no", "full:yes_no"),
    (YES, "Yes, there is no fracture.", "yes", "full:yes_no"),  # "no fracture": a negation
    (YES, "Not sure", None, "full:hedge"),
    (YES, "Yesterday", None, "full:no_match"),
    (NO, "Nodule present", None, "full:no_match"),
    (YES, "No wait. Let me think: yes or no? <answer>Yes</answer>", "yes", "tag:yes_no"),
    (NO, "Is there a mass? Yes or no... The answer is no.", "no", "marker:yes_no"),
    (YES, "", None, "full:empty"),
    # --- open and non-yes/no closed
    (MRI, "MRI", "mri", "full:text"),
    (MRI, "The answer is MRI.", "mri", "marker:text"),
    (OPEN, "The left lung.", "left lung", "full:text"),
    (COUNT, "two", "2", "full:text"),
    (COUNT, "\\boxed{2}", "2", "boxed:text"),
    (OPEN, "...", None, "full:empty"),
    # --- numbers are compared as numbers: a leading point is a decimal, trailing zeros go
    (SIZE, ".5 cm", "0.5 cm", "full:text"),
    (SIZE, "0.50 cm", "0.5 cm", "full:text"),
    (SIZE, "5 cm", "5 cm", "full:text"),  # another number: scored wrong
    (COUNT, "2.0", "2", "full:text"),
    (COUNT, "2.", "2", "full:text"),
    (COUNT, "02", "2", "full:text"),
    (YES_DOT, "yes", "yes", "full:yes_no"),  # a gold "Yes." is a yes/no question
    (YES_DOT, "No.", "no", "full:yes_no"),
    # --- yes/no without the words, hedges, an unfinished think
    (EFFUSION, "There is a left pleural effusion.", "yes", "full:yes_no"),
    (EFFUSION, "Negative for effusion", "no", "full:yes_no"),
    (EFFUSION, "Not seen.", "no", "full:yes_no"),
    (EFFUSION, "Present or absent", None, "full:hedge"),
    (EFFUSION, "Possibly a small effusion.", None, "full:hedge"),
    (EFFUSION, "Nodule present", None, "full:no_match"),  # about something else
    (EFFUSION, "<think>There is an effusion, so yes", None, "think:unfinished"),
    # --- questions naming their alternatives
    (CT_OR_MRI, "It's an MRI", "mri", "full:alternative"),
    (CT_OR_MRI, "Magnetic resonance imaging", "mri", "full:alternative"),
    (CT_OR_MRI, "CT scan", "ct", "full:alternative"),
    (CT_OR_MRI, "An MRI, not a CT.", "mri", "full:alternative"),
    (CT_OR_MRI, "CT or MRI", None, "full:several_alternatives"),
    (CT_OR_MRI, "Ultrasound", "ultrasound", "full:text"),
    (SIDE, "On the right side", "right", "full:alternative"),
    (SIDE, "both", "both", "full:alternative"),
    # --- options named by text
    (CHOICE, "There is a pleural effusion.", "B", "full:option_text"),
    (NOTA, "Computed tomography", "A", "full:option_text"),
    (NOTA, "Radiograph", "C", "full:option_text"),
]


@pytest.mark.parametrize(("key", "response", "value", "how"), CASES)
def test_parse_table(key: AnswerKey, response: str, value: str | None, how: str) -> None:
    parsed = parse_answer(response, key)
    assert (parsed.value, parsed.invalid, parsed.how) == (value, value is None, how), parsed


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 50


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("two", "2"),
        ("Twenty-one", "21"),
        ("twenty one", "21"),
        ("The Left  Lung!", "left lung"),
        ("an X-ray", "x ray"),
        ("1,000", "1000"),
        ("ZERO", "0"),
        ("Yes", "yes"),
        (".5 cm", "0.5 cm"),
        ("2.0", "2"),
        ("2.50", "2.5"),
        ("1,000.0", "1000"),
        ("Yes.", "yes"),
    ],
)
def test_normalize_equalities(a: str, b: str) -> None:
    assert normalize_text(a) == normalize_text(b)


def test_normalize_keeps_decimals_and_differences() -> None:
    assert normalize_text("2.5 cm.") == "2.5 cm"
    assert normalize_text("two") != normalize_text("twelve")
    assert normalize_text("a") == ""
    assert normalize_text(".5 cm") != normalize_text("5 cm")
    assert normalize_text("2.05") != normalize_text("2.5")
    assert normalize_text("10") == "10" and normalize_text("100.0") == "100"


def test_capitalised_gold_is_yes_no() -> None:
    assert is_yes_no("Yes") and is_yes_no(" NO ") and not is_yes_no("MRI")


@pytest.mark.parametrize(
    "gold", ["Yes", "Yes.", " no ", "NO!", "MRI", "yes and no", "Nope", "None"]
)
def test_prompt_and_scorer_share_one_yes_no_definition(gold: str) -> None:
    """A question prompted with "Please answer 'yes' or 'no'." is exactly one the scorer reads as yes/no."""
    from medlvr.data.prompts import YES_NO, question_text

    sample = VQASample(
        id="x", dataset="d", split="test", question="Is it?", answer=gold, answer_type="closed"
    )
    prompted = question_text(sample).endswith(YES_NO)
    scored = parse_answer("yes", sample).how.endswith(":yes_no")
    assert prompted == scored == is_yes_no(gold)


def test_sample_and_mapping_inputs_agree() -> None:
    sample = VQASample(
        id="x",
        dataset="d",
        split="test",
        question="Which finding?",
        options=OPTS,
        answer="Pleural effusion",
        answer_letter="B",
        answer_type="choice",
    )
    fields = {"answer_type": "choice", "gold": "B", "options": OPTS}
    for response in ["B", "pleural effusion", "A and B", "CT"]:
        assert parse_answer(response, sample) == parse_answer(response, fields)
    assert answer_key({"answer_type": "CLOSED ", "answer": "Yes"}) == AnswerKey("closed", "Yes", {})


def test_mapping_without_gold_is_rejected() -> None:
    with pytest.raises(ValueError, match="gold"):
        answer_key({"answer_type": "choice"})
    with pytest.raises(ValueError, match="answer_type"):
        answer_key({"answer_type": "essay", "gold": "x"})
    with pytest.raises(ValueError, match="eval rescore"):  # a kit's row: was a bare KeyError
        answer_key({"question": "Is there a mass?", "answer": "yes", "response": "yes"})


def test_parsed_is_a_plain_value() -> None:
    assert Parsed("B", False, "full:letter", "B") == parse_answer("B", CHOICE)


@pytest.mark.parametrize(
    ("response", "value", "how"),
    [
        (
            "A. Pleural effusion",
            None,
            "full:letter_text_conflict",
        ),  # article removal must not hide the letter
        ("(C) Pleural effusion", None, "full:letter_text_conflict"),
        ("(B) Pleural effusion", "B", "full:letter"),
        ("A pleural effusion", "B", "full:option_text"),  # here "A" is the article
        ("B. Because the pleura is thickened.", "B", "full:letter"),
    ],
)
def test_letter_with_option_text(response: str, value: str | None, how: str) -> None:
    parsed = parse_answer(response, CHOICE)
    assert (parsed.value, parsed.how) == (value, how)


@pytest.mark.parametrize(
    ("answer", "gold", "same"),
    [
        ("4mm", "4 mm", True),
        ("0.4 cm", "4 mm", True),
        ("34 mm", "3.4cm", True),
        ("five millimeters", "5mm", True),
        ("4 cm", "4 mm", False),
        ("0.4 mm", "4 mm", False),
        ("kidneys", "kidney", True),
        ("masses", "mass", True),
        ("arteries", "artery", True),
        ("pelvis", "pelvi", False),
        ("oedema", "edema", True),
        ("grey matter", "gray matter", True),
        ("haemorrhage", "hemorrhage", True),
        ("tumour", "tumor", True),
        ("X-ray", "radiograph", True),
        ("xray", "plain film", True),
        ("computed tomography", "CT", True),
        ("MR", "MRI", True),
        ("magnetic resonance imaging", "MRI", True),
        ("T2-weighted", "T2", True),
        ("upper right lobe", "right upper lobe", True),
        ("Fourth ventricle", "4th ventricle", True),
        ("liver, spleen, kidney", "liver", False),
        ("left lung", "right lung", False),
        ("no effusion", "effusion", False),
    ],
)
def test_same_answer(answer: str, gold: str, same: bool) -> None:
    assert same_answer(answer, gold) is same
    assert same_answer(gold, answer) is same


def test_word_order_is_kept_outside_known_phrases() -> None:
    assert same_answer("right upper lobe", "upper right lobe")  # one phrase, one spelling
    assert not same_answer("right to left", "left to right")
    assert not same_answer(
        "upper left: large dark cross; center: small bright round",
        "upper left: small bright round; center: large dark cross",
    )
