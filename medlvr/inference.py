"""Answer single questions with a `LatentVLM` (used by `medlvr predict`, the web demo and explanations)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from medlvr.data.collate import VQACollator
from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError
from medlvr.model.latent import GenerationOutput, LatentVLM


@dataclass
class Answer:
    text: str
    latent_steps: int
    seconds: float
    output: GenerationOutput
    batch: dict[str, Any] = field(
        default_factory=dict
    )  # the prompt batch it answered (explanations read its tokens)


def parse_options(items: Iterable[str], name: str = "--option") -> dict[str, str]:
    """Answer options, one per item, as `A=text` (or `A. text`, `A) text`, `A: text`): letter -> text.

    The one grammar of `medlvr predict --option`, `medlvr explain --option` and the web
    demo's options box (one per line). Blank items are skipped; a letter given twice, or a
    single option (a choice needs two), is refused; `name` says where they came from.
    """
    options: dict[str, str] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        letter, rest = item[:1].upper(), item[1:].lstrip()
        if not letter.isalpha() or rest[:1] not in ("=", ".", ")", ":") or not rest[1:].strip():
            raise MedlvrError(f"{name} must look like A=text; cannot read {item!r}")
        if letter in options:
            raise MedlvrError(f"{name}: letter {letter} appears twice")
        options[letter] = rest[1:].strip()
    if len(options) == 1:
        raise MedlvrError(f"{name}: give at least two, or none for an open question")
    return options


def make_sample(
    images: Sequence[Image.Image], question: str, options: dict[str, str] | None = None
) -> VQASample:
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
    output_attentions: bool = False,
) -> Answer:
    """One question answered with K latent steps (None: the model's K); `output_attentions` as in `generate`."""
    sample = make_sample(images, question, options)
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    batch = collate([sample], images=[list(images)])
    k = vlm.resolve_steps(latent_steps)
    if k > 0 and vlm.trained_steps == 0:
        # Its latent steps feed it states it never learned to read: often an empty answer.
        warnings.warn(
            f"this model was trained without latent steps (K=0), so its answer with K={k} may be "
            "empty or wrong: answer with latent_steps=0 (--latent-steps 0), or use a model "
            "trained with latent steps (e.g. `medlvr train sft --config tiny/sft`)",
            stacklevel=2,
        )
    out = vlm.generate(batch, k, max_new_tokens=max_new_tokens, output_attentions=output_attentions)
    return Answer(out.texts[0], k, out.timings["total_s"], out, batch)
