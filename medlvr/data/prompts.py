"""The prompts, in one place: how a question, its options and the instruction are shown to a model.

Instructions follow the conventions of the public medical VQA kits
(docs/scoring.md, "Prompts"), so numbers stay comparable:
- choice: "Answer with the option's letter from the given choices directly."
- yes/no: "Please answer 'yes' or 'no'."
- other: "Answer the question using a single word or phrase."
Reasoning `cot` asks for written reasoning and a tagged answer instead.
"""

from __future__ import annotations

from typing import Literal

from medlvr.data.schema import VQASample
from medlvr.eval.answers import yes_no_question

Reasoning = Literal["direct", "latent", "cot"]
"""How a model reasons before it answers: not at all (`direct`), in K latent steps (`latent`, with
the direct prompt) or in writing (`cot`: a reasoning prompt, then a tagged answer)."""

CHOICE = "Answer with the option's letter from the given choices directly."
YES_NO = "Please answer 'yes' or 'no'."
SHORT = "Answer the question using a single word or phrase."
COT = "Think step by step, then give the final answer inside <answer></answer>."


def instruction(sample: VQASample, reasoning: Reasoning = "direct") -> str:
    if sample.answer_type == "choice":
        base = CHOICE
    elif yes_no_question(
        sample
    ):  # the scorer's definition: asked as yes/no exactly when scored as one
        base = YES_NO
    else:
        base = SHORT
    if reasoning == "cot":
        return f"{base.rstrip('.')}, after your reasoning. {COT}"
    return base


def question_text(sample: VQASample, reasoning: Reasoning = "direct") -> str:
    """Question, options (one per line, `A. text`) and the instruction."""
    parts = [sample.question.strip()]
    if sample.options:
        parts.append(
            "Options:\n" + "\n".join(f"{k}. {v}" for k, v in sorted(sample.options.items()))
        )
    parts.append(instruction(sample, reasoning))
    return "\n".join(parts)


def target_text(sample: VQASample) -> str:
    """What the model is trained to write: the letter for choice questions, else the gold text."""
    if sample.answer_type == "choice":
        return str(sample.answer_letter)
    return sample.answer.strip()


REASONING_SEPARATOR = "; "
"""Between the steps of a record's written reasoning (`meta.reasoning`), and before its answer."""


def written_reasoning(sample: VQASample, hidden: int = 0) -> VQASample:
    """The record trained to write its reasoning before the answer, its first `hidden` steps left out.

    `meta.reasoning` holds the steps in order, separated by `REASONING_SEPARATOR` (the synthetic
    chain questions write each hop's region: "largest lesion: center; below it: lower middle").
    The answer becomes the steps from `hidden` on, then "answer: X", which the evaluation parser
    reads (`medlvr.eval.answers`), so the same scorer applies. `hidden` > 0 is the Coconut
    curriculum's stage (`SFTConfig.replace_reasoning`): latent steps stand in for the steps left
    out. Records without written reasoning, and choice questions (trained on their letter), are
    returned unchanged.
    """
    chain = sample.meta.get("reasoning")
    if not chain or sample.answer_type == "choice":
        return sample
    if hidden < 0:
        raise ValueError(f"hidden reasoning steps must be >= 0, got {hidden}")
    shown = chain.split(REASONING_SEPARATOR)[hidden:]
    return sample.model_copy(
        update={"answer": REASONING_SEPARATOR.join([*shown, f"answer: {sample.answer}"])}
    )


def chat_messages(sample: VQASample, reasoning: Reasoning = "direct") -> list[dict]:
    """One user turn: every image first (in order), then the question text."""
    content: list[dict] = [{"type": "image"} for _ in sample.images]
    content.append({"type": "text", "text": question_text(sample, reasoning)})
    return [{"role": "user", "content": content}]
