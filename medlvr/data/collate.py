"""Samples -> a model batch: chat prompt, left padding, answer labels, ROI token indices (also per hop).

The prompt ends with the assistant header; `LatentVLM` appends the latent
segment itself, so one batch serves every latent budget K. Answers are
right-padded separately and end with the family's stop token, so the label
mask is exactly the answer (prompt and latent positions never carry labels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from medlvr.data.prompts import Reasoning, chat_messages, target_text
from medlvr.data.roi import sample_roi_indices
from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError
from medlvr.model.backbones import BackboneAdapter, TokenGrid


def _default_loader(path: str) -> Image.Image:
    from medlvr.data.images import load_image

    return load_image(path)


CHARS_PER_POSITION = 16
"""A question longer than this many characters per model position cannot fit (tokens this long
are rare): refused before tokenising it."""


class VQACollator:
    """Builds batches for `LatentVLM.forward` (with answers) or `LatentVLM.generate` (without)."""

    def __init__(
        self,
        processor: Any,
        adapter: BackboneAdapter,
        *,
        reasoning: Reasoning = "direct",
        with_answers: bool = True,
        with_rois: bool = True,
        image_loader: Callable[[str], Image.Image] = _default_loader,
        max_answer_tokens: int = 64,
        sample_fields: Mapping[
            str, Callable[[VQASample, list[TokenGrid], list[tuple[int, int]]], Any]
        ]
        | None = None,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.adapter = adapter
        self.reasoning = reasoning
        self.with_answers = with_answers
        self.with_rois = with_rois
        self.load = image_loader
        self.max_answer_tokens = max_answer_tokens
        # Extra batch keys, one value per sample from (sample, token grids, image sizes): what an
        # auxiliary loss reads (`medlvr.train.auxiliary`), e.g. the probe's per-token labels.
        self.sample_fields = dict(sample_fields or {})
        stops = adapter.stop_token_ids(self.tokenizer)
        # The chat turn's end token (e.g. <|im_end|>) ends every answer.
        self.stop_token = (
            self.tokenizer.eos_token
            if self.tokenizer.eos_token_id in stops
            else self.tokenizer.convert_ids_to_tokens(stops[0])
        )

    def prompts(self, samples: Sequence[VQASample]) -> list[str]:
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        limit = self.tokenizer.model_max_length  # the model's positions (set by LatentVLM)
        for s in samples:  # tokenising millions of characters takes minutes: refuse them first
            n = len(s.question) + sum(len(o) for o in s.options.values())
            if limit and n > CHARS_PER_POSITION * limit:
                raise MedlvrError(
                    f"the question has {n:,} characters, more than {CHARS_PER_POSITION} for each of the "
                    f"{limit:,} positions the model holds: shorten the question"
                )

        try:
            return [
                self.processor.apply_chat_template(
                    chat_messages(s, self.reasoning), add_generation_prompt=True, tokenize=False
                )
                for s in samples
            ]
        except TemplateError as err:  # the template runs in jinja's sandbox: it is refused, not run
            what = "refused by jinja's sandbox" if isinstance(err, SecurityError) else "broken"
            raise MedlvrError(
                f"the model's chat template (chat_template.jinja) is {what}: {err}"
            ) from None

    def __call__(
        self, samples: Sequence[VQASample], images: Sequence[Sequence[Image.Image]] | None = None
    ) -> dict[str, Any]:
        if not samples:
            raise MedlvrError("empty batch")
        if images is None:
            images = [[self.load(p) for p in s.images] for s in samples]
        if len(images) != len(samples):
            raise MedlvrError(
                f"batch size mismatch: {len(samples)} samples, {len(images)} image lists"
            )
        self.tokenizer.padding_side = "left"
        flat = self.adapter.processor_images([list(imgs) for imgs in images])
        # verbose=False: a prompt too long for the model is refused in one line by LatentVLM.check_length.
        batch = dict(
            self.processor(
                text=self.prompts(samples),
                images=flat,
                return_tensors="pt",
                padding=True,
                verbose=False,
            )
        )
        batch["images_per_sample"] = [len(imgs) for imgs in images]
        batch["sample_ids"] = [s.id for s in samples]
        if self.with_answers:
            # Truncated and right-padded here rather than through the tokenizer's own
            # truncation, which would stay switched on in the fast backend (and be saved with it).
            # The text is cut, never the stop token: a long answer still learns to stop.
            stop_id = self.tokenizer.convert_tokens_to_ids(self.stop_token)
            texts = self.tokenizer([target_text(s) for s in samples], add_special_tokens=False)[
                "input_ids"
            ]
            rows = [ids[: self.max_answer_tokens - 1] + [stop_id] for ids in texts]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id
            batch["answer_ids"] = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            batch["answer_mask"] = torch.tensor(
                [[1] * len(r) + [0] * (width - len(r)) for r in rows]
            )
        if self.with_rois:
            batch["roi_index"] = [self._roi_index(s, imgs) for s, imgs in zip(samples, images)]
        for key, field in self.sample_fields.items():
            batch[key] = [field(s, *self._grids(imgs)) for s, imgs in zip(samples, images)]
        return batch

    def _grids(
        self, images: Sequence[Image.Image]
    ) -> tuple[list[TokenGrid], list[tuple[int, int]]]:
        sizes = [im.size for im in images]
        return [self.adapter.token_grid(self.processor, w, h) for w, h in sizes], sizes

    def _roi_index(self, sample: VQASample, images: Sequence[Image.Image]) -> torch.Tensor:
        """Indices into this sample's visual tokens covered by its ROIs (empty when it has none)."""
        if not sample.rois or not images:
            return torch.zeros(0, dtype=torch.long)
        grids, sizes = self._grids(images)
        return sample_roi_indices([(r.image, r.box) for r in sample.rois], grids, sizes)
