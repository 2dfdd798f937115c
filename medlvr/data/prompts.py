"""The prompts, in one place: how a question, its options and the instruction are shown to a model.

Instructions follow the conventions of the public medical VQA kits
(see BENCHMARKS.md, "Prompts commonly used"), so numbers stay comparable:
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
    elif yes_no_question(sample):  # the scorer's definition: asked as yes/no exactly when scored as one
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
        parts.append("Options:\n" + "\n".join(f"{k}. {v}" for k, v in sorted(sample.options.items())))
    parts.append(instruction(sample, reasoning))
    return "\n".join(parts)


def target_text(sample: VQASample) -> str:
    """What the model is trained to write: the letter for choice questions, else the gold text."""
    if sample.answer_type == "choice":
        return str(sample.answer_letter)
    return sample.answer.strip()


def chat_messages(sample: VQASample, reasoning: Reasoning = "direct") -> list[dict]:
    """One user turn: every image first (in order), then the question text."""
    content: list[dict] = [{"type": "image"} for _ in sample.images]
    content.append({"type": "text", "text": question_text(sample, reasoning)})
    return [{"role": "user", "content": content}]
