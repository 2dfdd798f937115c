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

import functools
import json
import math
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
    """The visual-token grid one image becomes: `rows x cols` cells of `cell_w x cell_h` original pixels.

    Most families give one raster grid over the whole image. A tiling family
    (SmolVLM) gives several views of it in prompt order, each its own raster grid
    over part of the image (the tiles, then the global image over all of it):
    `blocks` lists them, the image's tokens are theirs concatenated, and a box maps
    into every block it overlaps. `rows x cols` is then the tiles' combined grid
    over the whole image, the finest view (it describes no token order); `raster`
    brings a value per token onto it.
    """

    rows: int
    cols: int
    cell_w: float
    cell_h: float
    # Where the grid starts in original pixels (a tile's top-left corner; 0 for a whole image).
    x0: float = 0.0
    y0: float = 0.0
    blocks: tuple[TokenGrid, ...] = ()

    @property
    def n_tokens(self) -> int:
        return sum(b.n_tokens for b in self.blocks) if self.blocks else self.rows * self.cols

    def raster(self, values: torch.Tensor) -> torch.Tensor:
        """One value per token `[..., n_tokens]` (token order) -> `[..., rows, cols]` on this grid's cells.

        Without blocks this is the raster reshape. With blocks, each block cell's value
        is spread evenly over the grid cells whose centres it contains: a tile's cell is
        one grid cell, a global-view cell the `tiles_down x tiles_across` cells under it
        (they nest exactly when the tiles cover the image). Totals are kept, so a
        distribution over the tokens stays one over the cells.
        """
        if values.shape[-1] != self.n_tokens:
            raise MedlvrError(f"{values.shape[-1]} values for a grid of {self.n_tokens} tokens")
        lead = values.shape[:-1]
        if not self.blocks:
            return values.reshape(*lead, self.rows, self.cols)
        src, dst, weight = _raster_index(self)  # [P] each: token, cell, share of the token's value
        out = values.new_zeros(*lead, self.rows * self.cols)
        out.index_add_(out.dim() - 1, dst, values[..., src] * weight.to(values.dtype))
        return out.reshape(*lead, self.rows, self.cols)


@functools.lru_cache(maxsize=256)
def _raster_index(grid: TokenGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For `TokenGrid.raster`: (token, cell, weight) triples placing every block's cells on the grid."""
    cy = (
        grid.y0 + (torch.arange(grid.rows, dtype=torch.float64) + 0.5) * grid.cell_h
    )  # [rows] cell centres, pixels
    cx = grid.x0 + (torch.arange(grid.cols, dtype=torch.float64) + 0.5) * grid.cell_w  # [cols]
    src, dst, weight = [], [], []
    offset = 0
    for block in grid.blocks:
        if block.blocks:
            raise MedlvrError("TokenGrid blocks cannot have blocks of their own")
        br = torch.floor(
            (cy - block.y0) / block.cell_h
        ).long()  # [rows] block row under each grid row
        bc = torch.floor((cx - block.x0) / block.cell_w).long()  # [cols]
        rs = torch.nonzero((br >= 0) & (br < block.rows)).flatten()
        cs = torch.nonzero((bc >= 0) & (bc < block.cols)).flatten()
        cell = (rs[:, None] * grid.cols + cs[None, :]).flatten()  # grid cells inside the block
        token = (
            br[rs][:, None] * block.cols + bc[cs][None, :]
        ).flatten()  # the block cell over each
        count = torch.bincount(token, minlength=block.n_tokens)  # [block tokens]
        if (count == 0).any():
            # A block cell over no grid-cell centre would drop its value: the grid must be the finest view.
            raise MedlvrError(
                f"a {block.rows}x{block.cols} block has cells finer than its {grid.rows}x{grid.cols} grid"
            )
        src.append(offset + token)
        dst.append(cell)
        weight.append(1.0 / count[token].double())
        offset += block.n_tokens
    return torch.cat(src), torch.cat(dst), torch.cat(weight)


@dataclass
class PositionState:
    """What appended positions need to know about the prefix (kept in the loop, not in the model)."""

    next_pos: torch.Tensor  # [B] text position of the next appended token
    delta: torch.Tensor  # [B] multimodal RoPE offset (0 for 1-D RoPE families)


@dataclass
class PrefixInputs:
    """The prompt as the backbone takes it, built once per batch by `BackboneAdapter.prefix_inputs`."""

    embeds: torch.Tensor  # [B, L, d] prompt input embeddings
    visual: list[
        torch.Tensor
    ]  # per image [n, d] post-projection visual tokens (with grad), prompt order
    # Extra forward arguments of every pass that covers the whole prompt (cached
    # prefill and uncached full passes; never the appended steps), e.g. Qwen3-VL's
    # encoder outputs, whose deepstack features the backbone adds at the image slots.
    kwargs: dict[str, Any]


class BackboneAdapter(ABC):
    """The family-specific knowledge `LatentVLM` and the data layer need."""

    family: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    model_types: ClassVar[tuple[str, ...]]
    text_only: ClassVar[bool] = True
    """Whether the family answers a prompt with no image at all (the question-only control needs it)."""
    shard_layers: ClassVar[tuple[str, ...]] = ()
    """The module lists whose entries are FSDP units under `model.sharding=fsdp2` (decoder layers
    first, then vision blocks), as attribute paths in the transformers model."""

    # ---- offline building (tiny models) ----
    @abstractmethod
    def tiny_special_tokens(self) -> dict[str, Any]: ...

    @abstractmethod
    def tiny_chat_template(self) -> str: ...

    @abstractmethod
    def build_tiny_processor(self, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin: ...

    @abstractmethod
    def tiny_config(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> Any: ...

    def init_tiny_weights(self, model: PreTrainedModel) -> None:  # noqa: B027 - an optional hook
        """Make a random tiny model usable (e.g. projections that start at zero)."""

    # ---- loading ----
    @abstractmethod
    def load_processor(self, path: Path) -> ProcessorMixin: ...

    # ---- inputs ----
    def image_token_id(self, model: PreTrainedModel) -> int:
        return int(model.config.image_token_id)

    def processor_images(self, images_per_sample: list[list[Any]]) -> Any:
        """How the processor wants a batch's images (flat for Qwen, nested for Gemma)."""
        return [img for imgs in images_per_sample for img in imgs] or None

    # ---- features and positions ----
    @abstractmethod
    def image_features(self, model: PreTrainedModel, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Post-projection visual tokens, one `[n_tokens, d]` tensor per image, in prompt order."""

    @abstractmethod
    def prefix_position_ids(
        self, model: PreTrainedModel, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, PositionState]:
        """Position ids of the (left-padded) prompt and the state appended positions continue from."""

    @abstractmethod
    def appended_position_ids(self, state: PositionState, length: int) -> torch.Tensor:
        """Position ids of `length` positions appended after the prefix (does not advance `state`)."""

    def prefix_inputs(
        self, model: PreTrainedModel, batch: dict[str, Any], embeds: torch.Tensor
    ) -> PrefixInputs:
        """The prompt's input embeddings `embeds [B, L, d]` with the visual tokens in place.

        By default the post-projection features replace the image-token
        embeddings here, so the backbone sees plain `inputs_embeds`. A family whose
        vision features act beyond the input layer (Qwen3-VL deepstack) overrides
        this and hands the backbone its encoder outputs instead.
        """
        visual = self.image_features(model, batch)
        if visual:
            mask = (batch["input_ids"] == self.image_token_id(model)).unsqueeze(-1)  # [B, L, 1]
            feats = torch.cat(visual, 0).to(embeds.dtype)  # [N, d]
            if int(mask.sum()) != feats.shape[0]:
                raise MedlvrError(
                    f"{int(mask.sum())} image tokens in the prompt but {feats.shape[0]} visual features"
                )
            embeds = embeds.masked_scatter(mask, feats)
        return PrefixInputs(embeds, visual, {})

    def prefill_kwargs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Per-position forward arguments only passes over the prefix take (e.g. Gemma 3 token types)."""
        return {}

    def embedding_scale(self, model: PreTrainedModel) -> float:
        """Factor the input-embedding module applies to its weight rows (1 unless the family scales)."""
        return 1.0

    def parameter_group(self, name: str) -> str:
        """`vision`, `merger` or `language`, from a backbone parameter name (what training freezes).

        Qwen keeps its merger inside `model.visual`; LLaVA-style models and Gemma 3 name
        them `vision_tower` and `multi_modal_projector`.
        """
        if "merger" in name or "multi_modal_projector" in name:
            return "merger"
        if ".visual." in f".{name}" or "vision_tower" in name:
            return "vision"
        return "language"

    def visual_grid_shapes(
        self, model: PreTrainedModel, batch: dict[str, Any]
    ) -> list[tuple[int, int]] | None:
        """(rows, cols) of each image's visual tokens in raster order, read from the batch; None
        where the family's tokens are not one grid per image (tiles), so `latent.lookup_grid` is refused."""
        return None

    def token_grid(self, processor: ProcessorMixin, width: int, height: int) -> TokenGrid:
        """The visual-token grid of an image of `width x height` original pixels."""
        raise NotImplementedError

    def shard_units(self, model: PreTrainedModel) -> list[torch.nn.Module]:
        """The decoder layers and vision blocks of `model` (`shard_layers`), each its own FSDP unit."""
        return [unit for path in self.shard_layers for unit in _module_list(model, path)]

    def decoder_layers(self, model: PreTrainedModel) -> list[torch.nn.Module]:
        """The language model's layers (the first of `shard_layers`)."""
        return list(_module_list(model, self.shard_layers[0]))

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


@functools.cache
def qwen_processor_class() -> type[ProcessorMixin]:
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


class QwenVLAdapter(BackboneAdapter):
    """Qwen2.5-VL: 3-axis multimodal RoPE, 14-px patches merged 2x2 into 28-px token cells."""

    family = "qwen2_5_vl"
    shard_layers = ("model.language_model.layers", "model.visual.blocks")
    model_types = ("qwen2_5_vl",)

    @property
    def model_class(self):
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
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=56 * 56,
            max_pixels=448 * 448,
            patch_size=14,
            temporal_patch_size=2,
            merge_size=2,
            image_mean=list(_CLIP_MEAN),
            image_std=list(_CLIP_STD),
        )
        return qwen_processor_class()(
            image_processor, tokenizer, chat_template=tokenizer.chat_template
        )

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
            # Windows as large as the tiny processor's largest image: the window-attention
            # code path still runs, but with one window per image (far fewer small kernels on CPU).
            "window_size": 448,
            "initializer_range": 0.1,
        }

    def tiny_config(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> Any:
        from transformers import AutoConfig

        head_dim = spec.hidden // spec.heads
        # The three mRoPE sections (time, height, width) must sum to head_dim / 2.
        half = head_dim // 2
        sections = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
        ids = {t: _token_id(tokenizer, t) for t in self.tiny_special_tokens()["additional"]}
        text = {
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": sections,
            },
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

    def image_features(self, model: PreTrainedModel, batch: dict[str, Any]) -> list[torch.Tensor]:
        if batch.get("pixel_values") is None:
            return []
        out = model.model.get_image_features(
            batch["pixel_values"], batch["image_grid_thw"], return_dict=True
        )
        return list(out.pooler_output)

    def prefix_position_ids(
        self, model: PreTrainedModel, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, PositionState]:
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
        t = (
            state.next_pos[:, None] + torch.arange(length, device=state.next_pos.device)[None]
        )  # [B, T]
        return torch.cat(
            [t[None], (t + state.delta[:, None])[None].expand(3, -1, -1)], dim=0
        )  # [4, B, T]

    def visual_grid_shapes(
        self, model: PreTrainedModel, batch: dict[str, Any]
    ) -> list[tuple[int, int]] | None:
        """(rows, cols) of each image's post-merger tokens, from `image_grid_thw` (patches, merged m x m)."""
        if batch.get("image_grid_thw") is None:
            return []
        m = int(model.config.vision_config.spatial_merge_size)
        return [(h // m, w // m) for _, h, w in batch["image_grid_thw"].tolist()]

    def token_grid(self, processor: ProcessorMixin, width: int, height: int) -> TokenGrid:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = processor.image_processor
        factor = ip.patch_size * ip.merge_size
        size = dict(ip.size)
        rh, rw = smart_resize(
            height,
            width,
            factor=factor,
            min_pixels=size["shortest_edge"],
            max_pixels=size["longest_edge"],
        )
        rows, cols = rh // factor, rw // factor
        return TokenGrid(rows=rows, cols=cols, cell_w=width / cols, cell_h=height / rows)


class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL: as Qwen2.5-VL, with the older vision tower (no window attention, LayerNorm merger)."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)

    @property
    def model_class(self):
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


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: interleaved multimodal RoPE, 16-px patches merged 2x2 into 32-px token cells, deepstack.

    Deepstack adds features from intermediate vision layers to the hidden states
    of the first decoder layers at the image positions, and the backbone does it
    only in the forward that receives the vision outputs. So the prompt keeps
    `embed(image_token_id)` at its image slots (where the backbone finds and
    fills them) and every pass over the whole prompt gets the encoder outputs,
    computed once per batch, as `mm_encoder_outputs`.
    """

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

    @property
    def model_class(self):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def build_tiny_processor(self, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        # Qwen3-VL's own settings: 16-px patches and mean/std 0.5 (not CLIP's).
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=64 * 64,
            max_pixels=448 * 448,
            patch_size=16,
            temporal_patch_size=2,
            merge_size=2,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        return qwen_processor_class()(
            image_processor, tokenizer, chat_template=tokenizer.chat_template
        )

    def _vision_config(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        return {
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_hidden * 2,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.hidden,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            # Learned positions on a square grid, interpolated to each image's grid.
            "num_position_embeddings": 1024,
            # Deepstack from the first vision layer into the first decoder layer.
            "deepstack_visual_indexes": [0],
            "initializer_range": 0.1,
        }

    def tiny_config(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> Any:
        config = super().tiny_config(spec, tokenizer)
        text = config.text_config
        text.head_dim = spec.hidden // spec.heads
        # Qwen3-VL-8B: head_dim 128, sections [24, 20, 20] interleaved; same proportions here.
        half = text.head_dim // 2
        hw = half * 5 // 16
        text.rope_parameters = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [half - 2 * hw, hw, hw],
            "mrope_interleaved": True,
        }
        return config

    def prefix_inputs(
        self, model: PreTrainedModel, batch: dict[str, Any], embeds: torch.Tensor
    ) -> PrefixInputs:
        if batch.get("pixel_values") is None:
            return PrefixInputs(embeds, [], {})
        out = model.model.get_image_features(
            batch["pixel_values"], batch["image_grid_thw"], return_dict=True
        )
        visual = list(out.pooler_output)
        n_slots = int((batch["input_ids"] == self.image_token_id(model)).sum())
        if n_slots != sum(v.shape[0] for v in visual):
            raise MedlvrError(
                f"{n_slots} image tokens in the prompt but {sum(v.shape[0] for v in visual)} visual features"
            )
        # `embeds` keeps embed(image_token_id) at the image slots: the backbone locates
        # them by that value, scatters `pooler_output` there and adds the deepstack features.
        return PrefixInputs(embeds, visual, {"mm_encoder_outputs": {"image": out}})


# ----------------------------------------------------------------------------
# Gemma 3 (MedGemma)
# ----------------------------------------------------------------------------

_GEMMA_CHAT_TEMPLATE = (
    "{{ '<bos>' }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class _TextPositions:
    """1-D RoPE (Gemma 3; SmolVLM's Llama decoder): a position counts the attended tokens before it in its row."""

    def prefix_position_ids(
        self, model: PreTrainedModel, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, PositionState]:
        am = batch["attention_mask"]
        position_ids = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 0)  # [B, L]
        state = PositionState(
            next_pos=am.long().sum(-1), delta=torch.zeros_like(am[:, 0], dtype=torch.long)
        )
        return position_ids, state

    def appended_position_ids(self, state: PositionState, length: int) -> torch.Tensor:
        return (
            state.next_pos[:, None] + torch.arange(length, device=state.next_pos.device)[None]
        )  # [B, T]


class _NestedImages:
    """Processors that pair images with prompts by nesting (Gemma 3, SmolVLM): one list per sample."""

    def processor_images(self, images_per_sample: list[list[Any]]) -> Any:
        return [list(imgs) for imgs in images_per_sample] if any(images_per_sample) else None


class Gemma3Adapter(_NestedImages, _TextPositions, BackboneAdapter):
    """Gemma 3, the architecture of MedGemma: 1-D RoPE, square images pooled to a fixed token grid.

    Each image is resized to SxS (aspect ratio not kept), cut into 14-px patches and
    average-pooled to `mm_tokens_per_image` tokens, a sqrt x sqrt raster grid
    (MedGemma-4B: 896 px, 256 tokens, 56-px cells). In the prompt's forward the
    image tokens attend to each other bidirectionally, driven by `token_type_ids`
    (1 on image soft tokens); appended steps take none. The embedding module
    scales token embeddings by sqrt(d); fed-back hidden states are not scaled.
    """

    family = "gemma3"
    shard_layers = ("model.language_model.layers", "model.vision_tower.encoder.layers")
    model_types = ("gemma3",)
    image_size = 224  # tiny models; MedGemma uses 896
    tokens_per_side = 8  # tiny models: 64 tokens, 28-px cells; MedGemma 16 (256 tokens)

    @property
    def model_class(self):
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration

    def tiny_special_tokens(self) -> dict[str, Any]:
        named = {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        }
        return {
            "pad_token": "<pad>",
            "eos_token": "<end_of_turn>",
            "additional": ["<bos>", "<eos>", "<start_of_turn>", *named.values()],
            # Attributes the Gemma 3 processor reads from the tokenizer (`tokenizer.boi_token` ...).
            "named": named,
        }

    def tiny_chat_template(self) -> str:
        return _GEMMA_CHAT_TEMPLATE

    def build_tiny_processor(self, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin:
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        image_processor = Gemma3ImageProcessorPil(
            size={"height": self.image_size, "width": self.image_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            do_pan_and_scan=False,
        )
        return Gemma3Processor(
            image_processor,
            tokenizer,
            chat_template=tokenizer.chat_template,
            image_seq_length=self.tokens_per_side**2,
        )

    def tiny_config(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> Any:
        from transformers import Gemma3Config

        head_dim = spec.hidden // spec.heads
        ids = {t: _token_id(tokenizer, t) for t in self.tiny_special_tokens()["additional"]}
        text = {
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            # Gemma 3 alternates local (sliding) and global layers; keep both kinds.
            "layer_types": [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.layers)
            ],
            "sliding_window": 512,
            "max_position_embeddings": 4096,
            "initializer_range": 0.1,
            "bos_token_id": ids["<bos>"],
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        vision = {
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_hidden * 2,
            "num_hidden_layers": spec.vision_depth,
            "num_attention_heads": spec.vision_heads,
            "image_size": self.image_size,
            "patch_size": 14,
            "vision_use_head": False,
        }
        return Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=self.tokens_per_side**2,
            boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"],
            initializer_range=0.1,
            tie_word_embeddings=True,
            # transformers' configs take the base config's kwargs at run time; their
            # dataclass_transform types the fields only.
            eos_token_id=tokenizer.eos_token_id,  # type: ignore[call-arg]
            pad_token_id=tokenizer.pad_token_id,
        )

    def init_tiny_weights(self, model: PreTrainedModel) -> None:
        # The image projection starts at zero in transformers (outputs would ignore the image).
        with torch.no_grad():
            w = model.model.multi_modal_projector.mm_input_projection_weight
            w.normal_(0.0, w.shape[0] ** -0.5)

    def load_processor(self, path: Path) -> ProcessorMixin:
        from transformers import Gemma3Processor

        return Gemma3Processor.from_pretrained(str(path))

    def image_features(self, model: PreTrainedModel, batch: dict[str, Any]) -> list[torch.Tensor]:
        if batch.get("pixel_values") is None:
            return []
        out = model.model.get_image_features(batch["pixel_values"], return_dict=True)
        return list(out.pooler_output)  # n_img x [mm_tokens, d]

    def prefill_kwargs(self, batch: dict[str, Any]) -> dict[str, Any]:
        # Without the token types image tokens attend causally (logits move by ~7e-2).
        tt = batch.get("token_type_ids")
        return {} if tt is None else {"token_type_ids": tt}

    def embedding_scale(self, model: PreTrainedModel) -> float:
        # Gemma's embedding module multiplies token embeddings by sqrt(hidden_size).
        return float(model.config.get_text_config().hidden_size) ** 0.5

    def token_grid(self, processor: ProcessorMixin, width: int, height: int) -> TokenGrid:
        from transformers import Gemma3Processor

        assert isinstance(processor, Gemma3Processor)  # load_processor's
        ip = processor.image_processor
        if getattr(ip, "do_pan_and_scan", False):
            raise MedlvrError(
                "ROI mapping for Gemma 3 assumes pan-and-scan is off (its crops add token blocks)"
            )
        side = round(processor.image_seq_length**0.5)
        if side * side != processor.image_seq_length:
            raise MedlvrError(
                f"Gemma 3 image_seq_length {processor.image_seq_length} is not a square"
            )
        # The whole image is squashed to S x S, so cells are width/side by height/side original pixels.
        return TokenGrid(rows=side, cols=side, cell_w=width / side, cell_h=height / side)


# ----------------------------------------------------------------------------
# SmolVLM (Idefics3 architecture)
# ----------------------------------------------------------------------------

# SmolVLM2's own template (HuggingFaceTB/SmolVLM2-2.2B-Instruct), also taking plain-string contents.
_SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@functools.cache
def smolvlm_processor_class() -> type[ProcessorMixin]:
    # Defined lazily so importing medlvr does not import every processor module.
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin as _PM

    class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
        """Image-only SmolVLM processor that also returns each image's tile layout.

        The stock one needs a video processor (torchvision) and `num2words` (for video
        prompts only); its chat template call reads the video processor. Its prompts and
        pixels are unchanged here. `image_rows_cols [n_images, 2]` (prompt order; 0, 0 when
        the image is not split) tells the adapter which visual tokens belong to which
        image, as `image_grid_thw` does for Qwen. `token_pixels` (vision patch size x
        pixel-shuffle factor, from the model config) is how many tile pixels one visual
        token's cell spans: 384-px tiles with 14-px patches leave 6 px no token sees.
        """

        def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169,
                     token_pixels: int | None = None, chat_template=None, **kwargs):  # fmt: skip
            self.fake_image_token = getattr(
                tokenizer, "fake_image_token", "<fake_token_around_image>"
            )
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(
                tokenizer, "end_of_utterance_token", "<end_of_utterance>"
            )
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            self.image_seq_len = image_seq_len
            self.token_pixels = token_pixels
            _PM.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            return _PM.apply_chat_template(self, conversation, chat_template, **kwargs)

        def _process_images(self, images, **kwargs):
            processed, replacements = super()._process_images(images, **kwargs)
            processed["image_rows_cols"] = [
                [r, c]
                for rows, cols in zip(processed["rows"], processed["cols"])
                for r, c in zip(rows, cols)
            ]
            return processed, replacements

    return SmolVLMImageOnlyProcessor


class SmolVLMAdapter(_NestedImages, _TextPositions, BackboneAdapter):
    """SmolVLM / SmolVLM2 (Idefics3 architecture): a SigLIP tower on square tiles, a Llama decoder.

    Each image is resized to a longest edge `size`, then up to multiples of the tile
    side M and cut into rows x cols M x M tiles, followed by a global image (the whole
    image squashed to M x M); an image that fits one tile is only that one view. Each
    view becomes a raster grid of (M / patch) / shuffle tokens per side (SmolVLM2-2.2B:
    384-px tiles, 14-px patches, pixel-shuffle 3: 9 x 9 = 81 tokens, 42-px cells).
    In the prompt the views come tile by tile in row-major order, each after
    `<fake_token_around_image><row_r_col_c>`, then the global image after `<global-img>`.
    1-D RoPE, causal attention everywhere (no token types).
    """

    family = "smolvlm"
    shard_layers = ("model.text_model.layers", "model.vision_model.encoder.layers")
    model_types = ("smolvlm",)
    # Tiny models: 96-px tiles of 16-px patches shuffled by 2 (3 x 3 tokens, 32-px cells),
    # a 192-px longest edge (at most 2 x 2 tiles plus the global image: 45 tokens).
    tile_size = 96
    patch_size = 16
    scale_factor = 2
    tile_rc = 6  # <row_r_col_c> tokens for r, c <= 6, as in the released tokenizers

    @property
    def model_class(self):
        from transformers import SmolVLMForConditionalGeneration

        return SmolVLMForConditionalGeneration

    def tiny_special_tokens(self) -> dict[str, Any]:
        tiles = [
            f"<row_{r}_col_{c}>"
            for r in range(1, self.tile_rc + 1)
            for c in range(1, self.tile_rc + 1)
        ]
        return {
            "pad_token": "<pad>",
            "eos_token": "<end_of_utterance>",
            "additional": [
                "<|im_start|>",
                "<fake_token_around_image>",
                "<global-img>",
                "<image>",
                *tiles,
            ],
        }

    def tiny_chat_template(self) -> str:
        return _SMOLVLM_CHAT_TEMPLATE

    def build_tiny_processor(self, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil,
        )

        image_processor = SmolVLMImageProcessorPil(
            size={"longest_edge": 2 * self.tile_size},
            max_image_size={"longest_edge": self.tile_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        side = self.tile_size // self.patch_size // self.scale_factor
        return smolvlm_processor_class()(
            image_processor, tokenizer, image_seq_len=side * side,
            token_pixels=self.patch_size * self.scale_factor, chat_template=tokenizer.chat_template,
        )  # fmt: skip

    def tiny_config(self, spec: Any, tokenizer: PreTrainedTokenizerBase) -> Any:
        from transformers import SmolVLMConfig

        text = {
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": True,
            "initializer_range": 0.1,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        vision = {
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_hidden * 2,
            "num_hidden_layers": spec.vision_depth,
            "num_attention_heads": spec.vision_heads,
            "image_size": self.tile_size,
            "patch_size": self.patch_size,
            "initializer_range": 0.1,
        }
        return SmolVLMConfig(
            text_config=text,
            vision_config=vision,
            scale_factor=self.scale_factor,
            image_token_id=_token_id(tokenizer, "<image>"),
            tie_word_embeddings=True,
            # transformers' configs take the base config's kwargs at run time (see Gemma 3).
            pad_token_id=tokenizer.pad_token_id,  # type: ignore[call-arg]
        )

    def load_processor(self, path: Path) -> ProcessorMixin:
        # The cell size comes from the model config: released processor configs do not hold it.
        vision: dict[str, Any] = {}
        scale = None
        cfg = Path(path) / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            vision, scale = data.get("vision_config") or {}, data.get("scale_factor")
        extra: dict[str, Any] = (
            {"token_pixels": int(vision["patch_size"]) * int(scale)}
            if "patch_size" in vision and scale
            else {}
        )
        return smolvlm_processor_class().from_pretrained(str(path), **extra)

    def image_features(self, model: PreTrainedModel, batch: dict[str, Any]) -> list[torch.Tensor]:
        if batch.get("pixel_values") is None:
            return []
        out = model.model.get_image_features(
            batch["pixel_values"], batch.get("pixel_attention_mask"), return_dict=True
        )
        # pooler_output: per sample, the tokens of all its views (tiles, then global, image by image).
        feats = torch.cat(list(out.pooler_output), 0)  # [N, d]
        layout = batch.get("image_rows_cols")
        if layout is None:
            counts = batch.get("images_per_sample")
            if counts is not None and any(c != 1 for c in counts):
                raise MedlvrError("a SmolVLM batch with several images per sample needs image_rows_cols "
                                  "(from the processor medlvr loads)")  # fmt: skip
            return list(out.pooler_output)
        views = layout[:, 0].long() * layout[:, 1].long() + 1  # [n_images] tiles + the global image
        per_view = feats.shape[0] // max(int(views.sum()), 1)
        if per_view * int(views.sum()) != feats.shape[0]:
            raise MedlvrError(
                f"{feats.shape[0]} visual tokens do not split into {int(views.sum())} image views"
            )
        return list(feats.split((views * per_view).tolist()))

    def embedding_scale(self, model: PreTrainedModel) -> float:
        return 1.0

    def parameter_group(self, name: str) -> str:
        # The pixel-shuffle connector is SmolVLM's merger.
        if "connector." in name:
            return "merger"
        return "vision" if "vision_model." in name else "language"

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        ids = set(super().stop_token_ids(tokenizer))
        tid = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
        return sorted(ids)

    def token_grid(self, processor: ProcessorMixin, width: int, height: int) -> TokenGrid:
        from transformers import SmolVLMProcessor
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            MAX_IMAGE_SIZE,
            _resize_output_size_rescale_to_max_len,
            _resize_output_size_scale_below_upper_bound,
        )

        assert isinstance(processor, SmolVLMProcessor)  # load_processor's subclass of it
        ip = processor.image_processor
        m = int(ip.max_image_size["longest_edge"])
        side = round(processor.image_seq_len**0.5)
        if side * side != processor.image_seq_len:
            raise MedlvrError(f"SmolVLM image_seq_len {processor.image_seq_len} is not a square")
        # Tile pixels per token cell (a stock SmolVLMProcessor has no token_pixels: M / side).
        cell = float(getattr(processor, "token_pixels", None) or m / side)
        if not ip.do_image_splitting:
            # One view: the image squashed to M x M.
            return TokenGrid(side, side, width * cell / m, height * cell / m)
        # The image processor's two resizes (`resize`, then `resize_for_vision_encoder`).
        h, w = height, width
        if ip.do_resize:
            h, w = _resize_output_size_rescale_to_max_len(h, w, max_len=ip.size["longest_edge"])
            # transformers annotates max_len as a dict; the function compares it with an int.
            h, w = _resize_output_size_scale_below_upper_bound(h, w, max_len=MAX_IMAGE_SIZE)  # type: ignore[arg-type]
        aspect = w / h
        if w >= h:
            w = math.ceil(w / m) * m
            h = math.ceil(int(w / aspect) / m) * m
        else:
            h = math.ceil(h / m) * m
            w = math.ceil(int(h * aspect) / m) * m
        sx, sy = width / w, height / h  # original pixels per resized pixel
        glob = TokenGrid(side, side, width * cell / m, height * cell / m)
        if h <= m and w <= m:
            return glob  # fits one tile: no split, the single view
        rows, cols = h // m, w // m
        tiles = tuple(
            TokenGrid(side, side, cell * sx, cell * sy, x0=c * m * sx, y0=r * m * sy)
            for r in range(rows) for c in range(cols)
        )  # fmt: skip
        return TokenGrid(rows * side, cols * side, cell * sx, cell * sy, blocks=(*tiles, glob))


_ADAPTERS: dict[str, BackboneAdapter] = {
    a.family: a
    for a in (
        QwenVLAdapter(),
        Qwen2VLAdapter(),
        Qwen3VLAdapter(),
        Gemma3Adapter(),
        SmolVLMAdapter(),
    )
}


def register_adapter(adapter: BackboneAdapter) -> None:
    """Add a family (e.g. from a plug-in module); later registrations win."""
    _ADAPTERS[adapter.family] = adapter


def families() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(family: str) -> BackboneAdapter:
    try:
        return _ADAPTERS[family]
    except KeyError:
        raise MedlvrError(
            f"unknown backbone family {family!r}; known: {', '.join(families())}"
        ) from None


def detect_family(path: str | Path) -> str:
    """The family of a model folder, from its `config.json` `model_type`."""
    path = Path(path)
    cfg = path / "config.json"
    if not path.is_dir():
        raise MedlvrError(f"model folder not found: {path}")
    if not cfg.is_file():
        raise MedlvrError(f"{path} is not a model folder: no config.json")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8-sig"))["model_type"]
    except (ValueError, KeyError, TypeError) as err:  # TypeError: not a JSON object
        why = err if not isinstance(err, TypeError) else "not a JSON object of settings"
        raise MedlvrError(f"{cfg} is not a transformers config ({why})") from None
    for adapter in _ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter.family
    raise MedlvrError(
        f"{path}: model_type {model_type!r} has no adapter; known families: {', '.join(families())}"
    )


def ensure_latent_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Add the latent special tokens if missing and give them their rows; returns True if anything changed.

    Each new token's input row, and its output row when the head is not tied to the
    embeddings, starts at the mean row of the vocabulary (the tokens there before), so a
    real checkpoint's outputs stay sensible before any fine-tuning. This happens whether
    or not the matrix grows: real checkpoints keep spare rows (Qwen2.5-VL-7B has 152,064
    for 151,665 tokenizer entries), and a new token placed on one would otherwise keep
    whatever that untrained row holds.
    """
    missing = [
        t
        for t in LATENT_TOKENS
        if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
    ]
    if not missing:
        return False
    n_vocab = min(
        len(tokenizer), weight_matrix(model.get_input_embeddings()).shape[0]
    )  # rows of the tokens there before
    tokenizer.add_special_tokens(
        {"additional_special_tokens": missing}, replace_extra_special_tokens=False
    )
    if len(tokenizer) > weight_matrix(model.get_input_embeddings()).shape[0]:
        model.resize_token_embeddings(
            len(tokenizer), mean_resizing=False
        )  # the new rows are set just below
    new = torch.tensor(tokenizer.convert_tokens_to_ids(missing))
    layers = {
        id(m.weight): m
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
    }
    with torch.no_grad():
        for layer in layers.values():  # a tied head shares the input matrix: set once
            w = weight_matrix(layer)
            w[new] = w[:n_vocab].float().mean(0).to(w.dtype)
            bias = getattr(layer, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias[new] = bias[:n_vocab].float().mean().to(bias.dtype)
    return True


def _module_list(model: torch.nn.Module, path: str) -> torch.nn.ModuleList:
    layers = model.get_submodule(path)
    assert isinstance(layers, torch.nn.ModuleList), f"{path} is not a module list"
    return layers


def weight_matrix(layer: torch.nn.Module) -> torch.Tensor:
    """An embedding's or a head's weight matrix (torch types `Module.weight` loosely)."""
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    return w


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one token (`convert_tokens_to_ids` is typed for a list of tokens too)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(tid, int)
    return tid
