"""Everything family-specific, behind one small adapter interface.

A `BackboneAdapter` knows, for one VLM family: its model class, special tokens
and chat template, how to build and load an image-only processor offline, the
multimodal position ids of a (left-padded) prefix and of appended positions,
the post-projection visual features (language-model input space) and where
each image's tokens sit in the prompt, and how a box in original pixels maps
onto the visual-token grid. `LatentVLM`, the collator, the trainers and the
explanations only talk to this interface; a new family is one more adapter.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.processing_utils import ProcessorMixin

from medlvr.errors import MedlvrError

LATENT_START, LATENT_PAD, LATENT_END = "<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"
LATENT_TOKENS = (LATENT_START, LATENT_PAD, LATENT_END)

# CLIP normalisation, which the Qwen vision towers were trained with.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TokenGrid:
    """The visual-token grid one image becomes: `rows x cols` cells of `cell_w x cell_h` original pixels."""

    rows: int
    cols: int
    cell_w: float
    cell_h: float

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols


@dataclass
class PositionState:
    """What appended positions need to know about the prefix (kept in the loop, not in the model)."""

    next_pos: torch.Tensor  # [B] text position of the next appended token
    delta: torch.Tensor  # [B] multimodal RoPE offset (0 for 1-D RoPE families)


class BackboneAdapter(ABC):
    """The family-specific knowledge `LatentVLM` and the data layer need."""

    family: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    model_types: ClassVar[tuple[str, ...]]

    # ---- offline building (tiny models) ----
    @abstractmethod
    def tiny_special_tokens(self) -> dict[str, Any]: ...

    @abstractmethod
    def tiny_chat_template(self) -> str: ...

    @abstractmethod
    def build_tiny_processor(self, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin: ...

    @abstractmethod
    def tiny_config(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> Any: ...

    def init_tiny_weights(self, model: PreTrainedModel) -> None:
        """Make a random tiny model usable (e.g. projections that start at zero)."""

    # ---- loading ----
    @abstractmethod
    def load_processor(self, path: Path) -> ProcessorMixin: ...

    # ---- inputs ----
    @abstractmethod
    def image_token_id(self, model: PreTrainedModel) -> int: ...

    def processor_images(self, images_per_sample: list[list[Any]]) -> Any:
        """How the processor wants a batch's images (flat for Qwen, nested for Gemma)."""
        return [img for imgs in images_per_sample for img in imgs] or None

    # ---- features and positions ----
    @abstractmethod
    def image_features(self, model: PreTrainedModel, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Post-projection visual tokens, one `[n_tokens, d]` tensor per image, in prompt order."""

    @abstractmethod
    def prefix_position_ids(self, model: PreTrainedModel, batch: dict[str, Any]) -> tuple[torch.Tensor, PositionState]:
        """Position ids of the (left-padded) prompt and the state appended positions continue from."""

    @abstractmethod
    def appended_position_ids(self, state: PositionState, length: int) -> torch.Tensor:
        """Position ids of `length` positions appended after the prefix (does not advance `state`)."""

    def prefill_kwargs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Extra forward arguments only the prefix pass takes (e.g. Gemma 3 token types)."""
        return {}

    def token_grid(self, processor: ProcessorMixin, width: int, height: int) -> TokenGrid:
        """The visual-token grid of an image of `width x height` original pixels."""
        raise NotImplementedError

    # ---- generation config ----
    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        ids = {tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<eos>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
                ids.add(tid)
        return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------
# Qwen2-VL and Qwen2.5-VL
# ----------------------------------------------------------------------------

_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _qwen_processor_class() -> type[ProcessorMixin]:
    # Defined lazily so importing medlvr does not import every processor module.
    from transformers.processing_utils import ProcessorMixin as _PM

    class QwenImageProcessor(_PM):
        """Image-only Qwen2/2.5-VL processor: the stock one needs a video processor (torchvision)."""

        return_mm_token_type_ids = True

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = "<|image_pad|>"
            self.video_token = "<|video_pad|>"
            self.vision_start_token = "<|vision_start|>"
            self.vision_end_token = "<|vision_end|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
            _PM.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
            merge = self.image_processor.merge_size**2
            n = int(image_inputs["image_grid_thw"][image_idx].prod()) // merge
            return self.image_token * n

        @property
        def model_input_names(self):
            return [*super().model_input_names, "mm_token_type_ids"]

    return QwenImageProcessor


_PROCESSOR_CLASS: type[ProcessorMixin] | None = None


def qwen_processor_class() -> type[ProcessorMixin]:
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is None:
        _PROCESSOR_CLASS = _qwen_processor_class()
    return _PROCESSOR_CLASS


class QwenVLAdapter(BackboneAdapter):
    """Qwen2.5-VL: 3-axis multimodal RoPE, 14-px patches merged 2x2 into 28-px token cells."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    @property
    def model_class(self):  # type: ignore[override]
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def tiny_special_tokens(self) -> dict[str, Any]:
        return {
            "pad_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "additional": [
                "<|im_start|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|vision_pad|>",
                "<|image_pad|>",
                "<|video_pad|>",
            ],
        }

    def tiny_chat_template(self) -> str:
        return _QWEN_CHAT_TEMPLATE

    def build_tiny_processor(self, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=56 * 56,
            max_pixels=448 * 448,
            patch_size=14,
            temporal_patch_size=2,
            merge_size=2,
            image_mean=list(_CLIP_MEAN),
            image_std=list(_CLIP_STD),
        )
        return qwen_processor_class()(image_processor, tokenizer, chat_template=tokenizer.chat_template)

    def _vision_config(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return {
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_hidden * 2,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.hidden,
            "fullatt_block_indexes": [spec.vision_depth - 1],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "initializer_range": 0.1,
        }

    def tiny_config(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> Any:
        from transformers import AutoConfig

        head_dim = spec.hidden // spec.heads
        # The three mRoPE sections (time, height, width) must sum to head_dim / 2.
        half = head_dim // 2
        sections = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in self.tiny_special_tokens()["additional"]}
        text = {
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
            "tie_word_embeddings": True,
            # Wider than the 0.02 of real checkpoints, so a random tiny model's
            # outputs depend visibly on its input (tests compare token sequences).
            "initializer_range": 0.1,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        return AutoConfig.for_model(
            self.model_types[0],
            text_config=text,
            vision_config=self._vision_config(spec, tokenizer),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    def load_processor(self, path: Path) -> ProcessorMixin:
        return qwen_processor_class().from_pretrained(str(path))

    def image_token_id(self, model: PreTrainedModel) -> int:
        return int(model.config.image_token_id)

    def image_features(self, model: PreTrainedModel, batch: dict[str, Any]) -> list[torch.Tensor]:
        if batch.get("pixel_values") is None:
            return []
        out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        return list(out.pooler_output)

    def prefix_position_ids(self, model: PreTrainedModel, batch: dict[str, Any]) -> tuple[torch.Tensor, PositionState]:
        am = batch["attention_mask"]
        text_pos = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 0)  # [B, L]
        if batch.get("image_grid_thw") is None:
            pos3 = text_pos[None].expand(3, -1, -1)
            delta = torch.zeros(am.shape[0], dtype=torch.long, device=am.device)
        else:
            pos3, delta = model.model.get_rope_index(
                batch["input_ids"],
                batch["mm_token_type_ids"],
                image_grid_thw=batch["image_grid_thw"],
                attention_mask=am,
            )
            delta = delta.reshape(-1).to(am.device)
        position_ids = torch.cat([text_pos[None], pos3.to(text_pos.dtype)], dim=0)  # [4, B, L]
        state = PositionState(next_pos=am.long().sum(-1), delta=delta.long())
        return position_ids, state

    def appended_position_ids(self, state: PositionState, length: int) -> torch.Tensor:
        t = state.next_pos[:, None] + torch.arange(length, device=state.next_pos.device)[None]  # [B, T]
        return torch.cat([t[None], (t + state.delta[:, None])[None].expand(3, -1, -1)], dim=0)  # [4, B, T]

    def token_grid(self, processor: ProcessorMixin, width: int, height: int) -> TokenGrid:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = processor.image_processor
        factor = ip.patch_size * ip.merge_size
        size = dict(ip.size)
        rh, rw = smart_resize(
            height, width, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]
        )
        rows, cols = rh // factor, rw // factor
        return TokenGrid(rows=rows, cols=cols, cell_w=width / cols, cell_h=height / rows)


class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL: as Qwen2.5-VL, with the older vision tower (no window attention, LayerNorm merger)."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)

    @property
    def model_class(self):  # type: ignore[override]
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def _vision_config(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return {
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_hidden,
            "hidden_size": spec.hidden,
            "mlp_ratio": 2,
            "num_heads": spec.vision_heads,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": 0.1,
        }


_ADAPTERS: dict[str, BackboneAdapter] = {a.family: a for a in (QwenVLAdapter(), Qwen2VLAdapter())}


def register_adapter(adapter: BackboneAdapter) -> None:
    """Add a family (e.g. from a plug-in module); later registrations win."""
    _ADAPTERS[adapter.family] = adapter


def families() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(family: str) -> BackboneAdapter:
    try:
        return _ADAPTERS[family]
    except KeyError:
        raise MedlvrError(f"unknown backbone family {family!r}; known: {', '.join(families())}") from None


def detect_family(path: str | Path) -> str:
    """The family of a model folder, from its `config.json` `model_type`."""
    path = Path(path)
    cfg = path / "config.json"
    if not path.is_dir():
        raise MedlvrError(f"model folder not found: {path}")
    if not cfg.is_file():
        raise MedlvrError(f"{path} is not a model folder: no config.json")
    try:
        model_type = json.loads(cfg.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as err:
        raise MedlvrError(f"{cfg} is not a transformers config ({err})") from None
    for adapter in _ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter.family
    raise MedlvrError(f"{path}: model_type {model_type!r} has no adapter; known families: {', '.join(families())}")


def ensure_latent_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Add the latent special tokens if missing and resize the embeddings; returns True if anything changed.

    New rows start at the mean of the existing embeddings, so a real checkpoint's
    outputs stay sensible before any fine-tuning.
    """
    missing = [t for t in LATENT_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if not missing:
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return True


