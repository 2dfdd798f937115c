"""Answer single questions with a `LatentVLM` (used by `medlvr predict`, the web demo and explanations)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from medlvr.data.collate import VQACollator
from medlvr.data.schema import VQASample
from medlvr.model.latent import GenerationOutput, LatentVLM


@dataclass
class Answer:
    text: str
    latent_steps: int
    seconds: float
    output: GenerationOutput


def make_sample(images: Sequence[Image.Image], question: str, options: dict[str, str] | None = None) -> VQASample:
    """A throw-away `VQASample` for an interactive question (the gold answer is unknown)."""
    options = dict(sorted((options or {}).items()))
    if not question.strip():
        raise ValueError("the question is empty")
    return VQASample(
        id="query",
        dataset="interactive",
        split="test",
        images=[f"image_{i}" for i in range(len(images))],
        question=question,
        options=options,
        answer=next(iter(options.values()), ""),
        answer_letter=next(iter(options), None),
        answer_type="choice" if options else "open",
    )


def answer_one(
    vlm: LatentVLM,
    images: Sequence[Image.Image],
    question: str,
    options: dict[str, str] | None = None,
    *,
    latent_steps: int | None = None,
    max_new_tokens: int = 32,
) -> Answer:
    sample = make_sample(images, question, options)
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    batch = collate([sample], images=[list(images)])
    out = vlm.generate(batch, latent_steps, max_new_tokens=max_new_tokens)
    k = vlm.latent.steps if latent_steps is None else latent_steps
    return Answer(out.texts[0], k, out.timings["total_s"], out)
