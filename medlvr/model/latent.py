"""LatentVLM: a backbone composed (never patched) with a segment of continuous latent steps.

Sequence: `[chat prompt with image tokens] <|latent_start|> z_1 .. z_K <|latent_end|> answer <eos>`.
With K = 0 there is no latent segment at all, and decoding is the backbone's own.

Inference prefills the prompt once, then feeds `z_k = proj(h_{k-1})` (h = the
last-layer hidden state at the previous position) as one new position per step
on the same KV cache, then `<|latent_end|>`, then decodes the answer. Training
runs the same recurrence with gradients through the chain (Coconut-style), or
recomputes full passes when gradient checkpointing drops the cache. The
backbone is driven only through `inputs_embeds`, `position_ids`,
`attention_mask`, the KV-cache argument (`cache`; `past_key_values` before
transformers 5.24) and `output_hidden_states`; everything family-specific comes
from the adapter.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from medlvr.config import LatentConfig
from medlvr.errors import MedlvrError
from medlvr.model.backbones import (
    LATENT_END,
    LATENT_PAD,
    LATENT_START,
    BackboneAdapter,
    PositionState,
    detect_family,
    ensure_latent_tokens,
    get_adapter,
    weight_matrix,
)

LATENT_CONFIG_FILE = "medlvr_latent.json"
PROJECTOR_FILE = "latent_projector.safetensors"
PAUSE_FILE = "latent_pause.safetensors"
LOOKUP_FILE = "latent_lookup.safetensors"


def cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument of `model.forward` in the installed transformers.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns on
    every call and goes in 5.40); earlier 5.x releases take only `past_key_values`.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class LatentProjector(nn.Module):
    """Maps the fed-back hidden state `h [.., d]` to the next input embedding `z [.., d]`."""

    def __init__(self, kind: str, d: int, embed_rms: float = 1.0):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.linear = nn.Linear(d, d)
            nn.init.eye_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        elif kind == "mlp":
            # Residual MLP whose output layer starts at zero: identity at initialisation.
            self.up = nn.Linear(d, 2 * d)
            self.down = nn.Linear(2 * d, d)
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)
        elif kind == "norm":
            # RMS-normalise, then scale to the typical token-embedding RMS (learned). Shape [1],
            # not a scalar: FSDP2 shards no 0-d parameter (files of 0-d scales still load).
            self.scale = nn.Parameter(torch.tensor([float(embed_rms)]))
        elif kind != "none":
            raise MedlvrError(f"unknown projector {kind!r}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = f"{prefix}scale"
        if self.kind == "norm" and key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)  # saved before the scale was [1]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return h
        if self.kind == "linear":
            return self.linear(h)
        if self.kind == "mlp":
            return h + self.down(F.gelu(self.up(h)))
        rms = h.float().pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
        return (h.float() * rms).to(h.dtype) * self.scale.to(h.dtype)


class PauseInputs(nn.Module):
    """Learned constant latent inputs, the pause-token control (`latent.input=pause`).

    `weight [n, d]` holds one input embedding per step index; a step beyond n reuses the
    last row, so a model trained with K steps runs any K. The rows start at the mean token
    embedding plus a little seeded noise (so the steps can differ), each rescaled to the
    token-embedding RMS that the `norm` projector also targets.
    """

    def __init__(self, n: int, mean_embedding: torch.Tensor, embed_rms: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        base = mean_embedding.detach().float().cpu()
        rows = base / base.pow(2).mean().add(1e-12).sqrt() + 0.1 * torch.randn(
            n, base.shape[-1], generator=g
        )  # [n, d]
        self.weight = nn.Parameter(rows * rows.pow(2).mean(-1, keepdim=True).rsqrt() * embed_rms)

    def forward(self, k: int, b: int) -> torch.Tensor:
        """The inputs of K steps for `b` rows: `[b, K, d]` (the same for every row)."""
        idx = torch.arange(k, device=self.weight.device).clamp(max=self.weight.shape[0] - 1)
        return self.weight[idx][None].expand(b, -1, -1)

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Take saved rows `[m, d]`; with fewer than the configured n, the last one fills the rest (as at run time)."""
        n = self.weight.shape[0]
        if weight.shape[0] < n:
            weight = torch.cat([weight, weight[-1:].expand(n - weight.shape[0], -1)])
        self.weight = nn.Parameter(weight.to(self.weight), requires_grad=self.weight.requires_grad)


@dataclass
class GenerationOutput:
    """What `LatentVLM.generate` returns."""

    texts: list[str]
    token_ids: list[list[int]]  # answer tokens per row, stop token excluded
    latents: torch.Tensor  # [B*G, K, d] the fed latent inputs z_k
    latent_means: (
        torch.Tensor
    )  # [B*G, K, d] proj(h_{k-1}), the mean z_k was sampled around (pause: not fed)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    stop_tokens: list[int | None] = field(
        default_factory=list
    )  # the stop id that ended each row; None: cut at the limit
    visual_tokens: list[torch.Tensor] = field(
        default_factory=list
    )  # per prompt [N_i, d], all its images, prompt order
    # With `output_attentions`: [n_layers, B*G, K, P + K] each latent step's attention (mean over heads) over
    # the positions before it and itself (P = the prompt with <|latent_start|>), zero on the later steps.
    latent_attentions: torch.Tensor | None = None


@dataclass
class ForwardOutput:
    """What the training forward returns."""

    loss: torch.Tensor  # answer cross-entropy (mean over answer tokens)
    logits: torch.Tensor  # [B, T, V] logits predicting answer_ids[:, t]
    # [B, K, d] the fed latent inputs z_k: proj(h_{k-1}) (`hidden`), the learned constants (`pause`) or the given ones
    latents: torch.Tensor
    # [B, K, d] proj(h_{k-1}): the model's own latent state, read at the position before step k (<|latent_start|>,
    # then the latent positions). `hidden` feeds it as z_k (equal to latents unless latents were given); `pause`
    # does not feed it. ROI alignment trains this in every mode: the outputs at the latent positions, not the inputs.
    latent_means: torch.Tensor
    visual_tokens: list[
        torch.Tensor
    ]  # per sample [N_i, d], all its images' visual tokens, prompt order
    token_logprobs: torch.Tensor | None = None  # [B, T] log p(answer_ids[:, t]) (0 on padding)
    lookup_logits: torch.Tensor | None = (
        None  # [B, K, n*n] the lookup head's cell scores (`latent.lookup_grid`)
    )
    # [B, d] proj(h) at the last prefix position: with K = 0, the state the first answer token is
    # read from (what ROI supervision without latent steps, `mode=roi_direct`, aligns).
    prompt_state: torch.Tensor | None = None


@dataclass
class _Prefix:
    cache: DynamicCache | None
    attention_mask: torch.Tensor  # [B, L]
    state: PositionState
    last_hidden: torch.Tensor  # [B, d] hidden state at the last prefix position
    last_logits: torch.Tensor  # [B, V]
    visual: list[torch.Tensor]  # per image [n, d]
    embeds: torch.Tensor  # [B, L, d]
    position_ids: torch.Tensor
    # Forward arguments of any pass over the whole prefix (adapter.prefix_inputs), and
    # the batch as prefilled (with <|latent_start|>): full passes extend its token types.
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)


class LatentVLM(nn.Module):
    """A VLM backbone plus the latent segment: batched generation and a training forward.

    Latent step k is fed `proj(h_{k-1})` (`latent.input=hidden`) or, for the pause-token
    control, a learned constant (`latent.input=pause`, `PauseInputs`); the outputs
    `proj(h_{k-1})` are computed and returned as `latent_means` either way.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        processor: Any,
        family: str,
        latent: LatentConfig | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.adapter: BackboneAdapter = get_adapter(family)
        self.latent = latent or LatentConfig()
        self.trained_steps: int | None = None
        """K the loaded weights were trained with (their saved latent config; 0 for a folder
        without one, as a downloaded VLM); None for a model built in memory."""
        ensure_latent_tokens(backbone, self.tokenizer)
        self.latent_start_id = self._token_id(LATENT_START)
        self.latent_pad_id = self._token_id(LATENT_PAD)
        self.latent_end_id = self._token_id(LATENT_END)
        self.image_token_id = self.adapter.image_token_id(backbone)
        self.cache_argument = cache_argument(self.base_model)
        self.stop_ids = self.adapter.stop_token_ids(self.tokenizer)
        limit = (
            self.max_positions
        )  # the collator bounds a question's characters by it, before tokenising
        if limit and (self.tokenizer.model_max_length or 0) > limit:
            self.tokenizer.model_max_length = limit
        d = self.hidden_size
        self.projector = LatentProjector(self.latent.projector, d, embed_rms=self._embed_rms())
        self.projector.to(device=self.device, dtype=self.backbone.dtype)
        self.lookup: nn.Linear | None = None
        if self.latent.lookup_grid:  # zero start: every cell alike, the image's mean token
            self.lookup = nn.Linear(d, self.latent.lookup_grid**2)
            nn.init.zeros_(self.lookup.weight)
            nn.init.zeros_(self.lookup.bias)
            self.lookup.to(device=self.device)
        self.pause: PauseInputs | None = None
        if (
            self.latent.input == "pause"
        ):  # seeded by the global seed (e.g. run_sft's), without drawing from it
            mean = weight_matrix(self.backbone.get_input_embeddings()).float().mean(0)
            self.pause = PauseInputs(
                max(1, self.latent.steps), mean, self._embed_rms(), torch.initial_seed()
            )
            self.pause.to(device=self.device, dtype=self.backbone.dtype)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        latent: LatentConfig | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        allow_pickle: bool = False,
    ) -> LatentVLM:
        """Load a model: a tiny one from `medlvr model init-tiny`, a medlvr checkpoint or a real one.

        `path` is a folder, `stage0` (the shipped backbone) or a Hugging Face Hub id with an
        optional revision (`Qwen/Qwen2.5-VL-7B-Instruct`, `org/name@rev`; `model_folder`). Its weights are checked first (`medlvr.model.files.check_weights`): safetensors that
        open, or pickle weights only with `allow_pickle` (unpickling runs code in the file).
        """
        from safetensors import SafetensorError

        from medlvr.model.files import check_weights, model_folder

        path = model_folder(path, allow_pickle=allow_pickle)
        family = detect_family(path)
        safetensors = check_weights(path, allow_pickle=allow_pickle)
        adapter = get_adapter(family)
        saved = read_latent_config(path)
        latent = latent or saved or LatentConfig()
        try:
            processor = adapter.load_processor(path)
            with _load_report(path):
                backbone = adapter.model_class.from_pretrained(
                    str(path), dtype=dtype or "auto", use_safetensors=safetensors
                )
        except (OSError, SafetensorError) as err:
            raise MedlvrError(f"cannot load a model from {path}: {err}") from None
        model = cls(backbone, processor, family, latent)
        model.trained_steps = saved.steps if saved is not None else 0
        model.load_latent_files(path)
        if device is not None:
            model.to(device)
        model.eval()
        return model

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> Path:
        """A model folder that loads in `LatentVLM.from_pretrained` and in plain transformers."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(path), **kwargs)
        self.processor.save_pretrained(str(path))
        self.save_latent_files(path)
        return path

    def save_latent_files(
        self, path: Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """The latent modules' weights (projector, pause inputs) and the latent config, into folder `path`.

        `state_dict` (LatentVLM keys) is the gathered state under FSDP/ZeRO-3, where the
        modules' own parameters are shards.
        """
        for prefix, name, module in (
            ("projector.", PROJECTOR_FILE, self.projector),
            ("pause.", PAUSE_FILE, self.pause),
            ("lookup.", LOOKUP_FILE, self.lookup),
        ):
            if module is None:
                continue
            own = (
                module.state_dict().items()
                if state_dict is None
                else ((k[len(prefix) :], v) for k, v in state_dict.items() if k.startswith(prefix))
            )
            state = {k: v.detach().contiguous().cpu() for k, v in own}
            if state:
                save_file(state, str(path / name))
        (path / LATENT_CONFIG_FILE).write_text(json.dumps(asdict(self.latent), indent=2))

    def load_latent_files(self, path: Path) -> None:
        """Load the projector and pause inputs saved in folder `path` where they are of this model's kind.

        A saved projector of another kind, or pause inputs under `latent.input=hidden`, are
        not loaded (the model starts those modules fresh).
        """
        saved = read_latent_config(path)
        if saved is None:
            return
        if (path / PROJECTOR_FILE).is_file() and saved.projector == self.latent.projector:
            self.projector.load_state_dict(load_file(str(path / PROJECTOR_FILE)))
        if (path / PAUSE_FILE).is_file() and saved.input == "pause" and self.pause is not None:
            self.pause.load_weight(load_file(str(path / PAUSE_FILE))["weight"])
        if (
            (path / LOOKUP_FILE).is_file()
            and self.lookup is not None
            and saved.lookup_grid == self.latent.lookup_grid
        ):
            self.lookup.load_state_dict(load_file(str(path / LOOKUP_FILE)))

    # ------------------------------------------------------------------ helpers
    @property
    def base_model(self) -> PreTrainedModel:
        """The transformers model itself, also when the backbone is wrapped by peft (LoRA)."""
        get = getattr(self.backbone, "get_base_model", None)
        return get() if callable(get) else self.backbone

    @property
    def device(self) -> torch.device:
        # A parameter's, not the embedding's `.weight`: under peft's trainable tokens that is
        # computed (base rows + deltas), which a sharded model cannot do outside its forward.
        return next(self.backbone.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(weight_matrix(self.backbone.get_input_embeddings()).shape[1])

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise MedlvrError(f"tokenizer has no {token}")
        return int(tid)

    @torch.no_grad()
    def _embed_rms(self) -> float:
        w = weight_matrix(self.backbone.get_input_embeddings()).float()
        # What the decoder sees is the embedding module's output (Gemma scales rows by sqrt(d)).
        return float(w.pow(2).mean(-1).sqrt().mean()) * self.adapter.embedding_scale(
            self.base_model
        )

    @torch.no_grad()
    def visual_tokens(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per sample `[N_i, d]` (all its images, prompt order): the post-merger visual tokens, detached."""
        moved = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        visual = self.adapter.image_features(self.base_model, moved)
        return [v.detach() for v in _per_sample(visual, batch, len(batch["input_ids"]))]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # The backbone's own embedding module (Gemma's scales by sqrt(d) inside it).
        return self.backbone.get_input_embeddings()(ids)

    def resolve_steps(self, latent_steps: int | None) -> int:
        """K for one call: `latent_steps`, or the model's own (`latent.steps`) when it is None."""
        k = self.latent.steps if latent_steps is None else int(latent_steps)
        if k < 0:
            raise MedlvrError(f"latent steps must be >= 0, got {k}")
        return k

    @property
    def max_positions(self) -> int | None:
        """Positions the language model holds (its config's `max_position_embeddings`), if it says."""
        config = self.base_model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(text, "max_position_embeddings", None)
        return int(n) if n else None

    def check_length(self, prompt_tokens: int, latent_steps: int, answer_tokens: int) -> None:
        """Refuse a sequence the model cannot hold: the prompt, K latent steps (with their two markers), the answer."""
        limit = self.max_positions
        total = prompt_tokens + (latent_steps + 2 if latent_steps else 0) + answer_tokens
        if limit is not None and total > limit:
            parts = [f"{prompt_tokens} prompt tokens"] if prompt_tokens else []
            parts += [f"K={latent_steps} latent steps (+2 markers)"] if latent_steps else []
            raise MedlvrError(
                f"{' + '.join([*parts, f'{answer_tokens} answer tokens'])} need {total} positions but the model holds "
                f"{limit}: shorten the question, or lower K or the answer token limit"
            )

    def _check_batch(self, batch: dict[str, Any]) -> None:
        ids = batch.get("input_ids")
        if ids is None or batch.get("attention_mask") is None:
            raise MedlvrError("a batch needs input_ids and attention_mask")
        if ids.shape != batch["attention_mask"].shape:
            raise MedlvrError(
                f"input_ids {tuple(ids.shape)} and attention_mask {tuple(batch['attention_mask'].shape)} differ"
            )
        if bool((batch["attention_mask"][:, -1] == 0).any()):
            raise MedlvrError("prompts must be left-padded (the last column has padding)")
        n_img_tokens = int((ids == self.image_token_id).sum())
        has_pixels = batch.get("pixel_values") is not None
        if n_img_tokens and not has_pixels:
            raise MedlvrError("the prompt has image tokens but the batch has no images")
        if has_pixels and not n_img_tokens:
            raise MedlvrError("the batch has images but the prompt has no image tokens")

    def _forward(self, embeds, attention_mask, position_ids, cache=None, logits_to_keep=0, **extra):
        out = self.backbone(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            output_hidden_states=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_argument: cache},
            **extra,
        )
        return out.logits, out.hidden_states[-1]

    # ------------------------------------------------------------------ phases
    def _prefill(
        self, batch: dict[str, Any], with_latent_start: bool, use_cache: bool = True
    ) -> _Prefix:
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        ids, am = batch["input_ids"], batch["attention_mask"]
        if with_latent_start:
            col = torch.full_like(ids[:, :1], self.latent_start_id)
            batch = dict(batch)
            batch["input_ids"] = ids = torch.cat([ids, col], 1)
            batch["attention_mask"] = am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
            if batch.get("mm_token_type_ids") is not None:
                mm = batch["mm_token_type_ids"]
                batch["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(mm[:, :1])], 1)
            if batch.get("token_type_ids") is not None:
                tt = batch["token_type_ids"]
                batch["token_type_ids"] = torch.cat([tt, torch.zeros_like(tt[:, :1])], 1)
        prefix = self.adapter.prefix_inputs(self.base_model, batch, self.embed(ids))
        position_ids, state = self.adapter.prefix_position_ids(self.base_model, batch)
        cache = DynamicCache(config=self.backbone.config) if use_cache else None
        logits, hidden = self._forward(
            prefix.embeds,
            am,
            position_ids,
            cache,
            logits_to_keep=1,
            **prefix.kwargs,
            **self.adapter.prefill_kwargs(batch),
        )
        return _Prefix(
            cache,
            am,
            state,
            hidden[:, -1],
            logits[:, -1],
            prefix.visual,
            prefix.embeds,
            position_ids,
            prefix.kwargs,
            batch,
        )

    def _append(
        self,
        pre: _Prefix,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        logits_to_keep: int = 1,
    ):
        """Feed `embeds [B, T, d]` after everything so far, on the cache; advances the state."""
        pos = self._advance(pre, embeds, mask)
        return self._forward(
            embeds, pre.attention_mask, pos, pre.cache, logits_to_keep=logits_to_keep
        )

    def _latent_step(
        self, pre: _Prefix, z: torch.Tensor, attentions: list | None = None
    ) -> torch.Tensor:
        """Feed one latent `z [B, d]`; returns the new last hidden state `[B, d]`.

        Runs the decoder without the LM head: a latent step needs no vocabulary
        logits, which keeps it cheaper than a decode step. With a list `attentions`, the
        step's attention weights (per layer `[B, H, 1, positions]`) are appended to it.
        """
        pos = self._advance(pre, z[:, None], None)
        extra = {"output_attentions": True} if attentions is not None else {}
        out = self.base_model.model(
            inputs_embeds=z[:, None],
            attention_mask=pre.attention_mask,
            position_ids=pos,
            use_cache=True,
            **{self.cache_argument: pre.cache},
            **extra,
        )
        if attentions is not None:
            attentions.append(out.attentions)
        return out.last_hidden_state[:, -1]

    def _advance(
        self, pre: _Prefix, embeds: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, t = embeds.shape[:2]
        mask = (
            torch.ones(b, t, dtype=pre.attention_mask.dtype, device=embeds.device)
            if mask is None
            else mask
        )
        pre.attention_mask = torch.cat([pre.attention_mask, mask.to(pre.attention_mask.dtype)], 1)
        pos = self.adapter.appended_position_ids(pre.state, t)
        pre.state.next_pos = pre.state.next_pos + t
        return pos

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Any],
        latent_steps: int | None = None,
        *,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        latent_sigma: float = 0.0,
        group_size: int = 1,
        generator: torch.Generator | None = None,
        output_attentions: bool = False,
        latent_inputs: torch.Tensor | None = None,
        latent_given: torch.Tensor | None = None,
    ) -> GenerationOutput:
        """Prefill, K latent steps, `<|latent_end|>`, then greedy or sampled decoding on one KV cache.

        `group_size` G > 1 prefills each prompt once and shares its cache among G
        rollouts (rows `b*G .. b*G+G-1` belong to prompt b). `latent_sigma` > 0
        samples `z_k ~ N(proj(h_{k-1}), sigma^2 I)` (VLPO exploration; not with pause inputs,
        which are constants). `output_attentions` also returns the latent steps' attention
        rows (`latent_attentions`), computed under eager attention (the only implementation
        that returns weights), switched on for the latent steps and restored afterwards.
        `latent_inputs [B, K, d]` with `latent_given [B, K]` (bool) feeds the given input at the
        steps marked and the model's own elsewhere (gold latents, a gold prefix: the
        diagnostics of `medlvr.eval.diagnostics`); `latent_means` stay the model's own states.
        """
        self._check_batch(batch)
        latent_steps = self.resolve_steps(latent_steps)
        given = _given(latent_inputs, latent_given, batch["input_ids"].shape[0], latent_steps)
        if given is not None and group_size > 1:
            raise MedlvrError("given latent inputs are for one rollout per prompt (group_size 1)")
        self.check_length(batch["input_ids"].shape[1], latent_steps, max_new_tokens)
        if latent_sigma > 0 and self.pause is not None:
            raise MedlvrError(
                "latent_sigma > 0 explores around the fed-back state; latent.input=pause feeds learned constants"
            )
        if max_new_tokens < 1:
            raise MedlvrError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if group_size < 1:
            raise MedlvrError(f"group_size must be >= 1, got {group_size}")
        timings: dict[str, float] = {}
        tick = _Clock(self.device)
        pre = self._prefill(batch, with_latent_start=latent_steps > 0)
        if group_size > 1:
            assert pre.cache is not None  # _prefill keeps a cache unless told not to
            pre.cache.batch_repeat_interleave(group_size)
            pre.attention_mask = pre.attention_mask.repeat_interleave(group_size, 0)
            pre.state = PositionState(
                pre.state.next_pos.repeat_interleave(group_size, 0),
                pre.state.delta.repeat_interleave(group_size, 0),
            )
            pre.last_hidden = pre.last_hidden.repeat_interleave(group_size, 0)
            pre.last_logits = pre.last_logits.repeat_interleave(group_size, 0)
        timings["prefill_s"] = tick()

        b = pre.last_hidden.shape[0]
        d = self.hidden_size
        latents = pre.last_hidden.new_zeros(b, latent_steps, d)
        means = pre.last_hidden.new_zeros(b, latent_steps, d)
        h, logits = pre.last_hidden, pre.last_logits
        pause = self.pause(latent_steps, b) if self.pause is not None else None  # [B, K, d]
        look = self._lookup_cells(pre, group_size) if latent_steps else None
        rows: list[tuple[torch.Tensor, ...]] = []  # per step, per layer [B, H, 1, P + k]
        with eager_attention(self.base_model) if output_attentions else nullcontext():
            for k in range(latent_steps):
                mu, _ = self._state(h, look)  # [B, d]
                z = mu if pause is None else pause[:, k].to(mu.dtype)
                if latent_sigma > 0:
                    noise = torch.randn(
                        mu.shape, generator=generator, device=mu.device, dtype=torch.float32
                    )
                    z = mu + latent_sigma * noise.to(mu.dtype)
                z = _feed(given, k, z)
                means[:, k], latents[:, k] = mu, z
                h = self._latent_step(pre, z, rows if output_attentions else None)
        attentions = (
            _step_attentions(rows, pre.attention_mask.shape[1])
            if output_attentions and rows
            else None
        )
        if latent_steps > 0:
            end = self.embed(torch.full((b, 1), self.latent_end_id, device=self.device))
            logits, _ = self._append(pre, end)
            logits = logits[:, -1]
        timings["latent_s"] = tick()

        stop = torch.tensor(self.stop_ids, device=self.device)
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.stop_ids[0]
        )
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        out_ids: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            if step < min_new_tokens:  # as in transformers: stop tokens are banned until then
                logits = logits.index_fill(-1, stop, float("-inf"))
            next_tok = _pick(logits.float(), do_sample, temperature, top_p, generator)
            next_tok = torch.where(done, torch.full_like(next_tok, pad), next_tok)
            out_ids.append(next_tok)
            done = done | torch.isin(next_tok, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits, _ = self._append(pre, self.embed(next_tok[:, None]))
            logits = logits[:, -1]
        timings["decode_s"] = tick()
        timings["total_s"] = sum(timings.values())

        seqs = torch.stack(out_ids, 1).tolist() if out_ids else [[] for _ in range(b)]
        token_ids = [_until_stop(row, self.stop_ids) for row in seqs]
        stop_tokens = [
            row[len(ids)] if len(ids) < len(row) else None for row, ids in zip(seqs, token_ids)
        ]
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        visual = _per_sample(pre.visual, pre.batch, pre.batch["input_ids"].shape[0])
        return GenerationOutput(
            [t.strip() for t in texts],
            token_ids,
            latents,
            means,
            timings,
            stop_tokens,
            visual,
            attentions,
        )

    # ------------------------------------------------------------------ training
    def forward(
        self,
        batch: dict[str, Any],
        latent_steps: int | None = None,
        *,
        latent_inputs: torch.Tensor | None = None,
        latent_given: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Teacher-forced answer loss through the latent chain.

        `batch` needs `answer_ids [B, T]` (right-padded, ending with the stop
        token) and `answer_mask [B, T]`. With `latent_inputs [B, K, d]` the given
        latents are fed in one parallel pass (teacher-forced latents, and VLPO's
        log-probability recomputation); otherwise the latents come from the
        recurrence, on the cache, or by recomputing full passes when gradient
        checkpointing is on (it drops the cache). With `latent_given [B, K]` (bool) as well, the
        recurrence runs and feeds `latent_inputs` only at the steps marked, its own states elsewhere
        (scheduled sampling between gold and own latents, `SFTConfig.gold_latents`).
        """
        self._check_batch(batch)
        if batch.get("answer_ids") is None or batch.get("answer_mask") is None:
            raise MedlvrError("a training batch needs answer_ids and answer_mask")
        latent_steps = (
            self.resolve_steps(latent_steps) if latent_inputs is None else latent_inputs.shape[1]
        )
        given = _given(latent_inputs, latent_given, batch["input_ids"].shape[0], latent_steps)
        if given is not None:
            latent_inputs = None  # mixed with the model's own: the recurrence below
        answer = batch["answer_ids"].to(self.device)
        amask = batch["answer_mask"].to(self.device)
        if answer.shape[0] != batch["input_ids"].shape[0]:
            raise MedlvrError(
                f"batch size mismatch: {batch['input_ids'].shape[0]} prompts, {answer.shape[0]} answers"
            )
        self.check_length(batch["input_ids"].shape[1], latent_steps, answer.shape[1])
        recompute = (
            latent_inputs is None
            and latent_steps > 0
            and _checkpointing(self.base_model)
            and self.training
        )
        if latent_inputs is not None or recompute:
            return self._parallel_forward(batch, latent_steps, answer, amask, latent_inputs, given)

        pre = self._prefill(batch, with_latent_start=latent_steps > 0)
        zs, mus, logits_k = [], [], []
        look = self._lookup_cells(pre) if latent_steps else None
        h = pre.last_hidden
        pause = (
            self.pause(latent_steps, h.shape[0]) if self.pause is not None else None
        )  # [B, K, d]
        for k in range(latent_steps):
            mu, lg = self._state(h, look)
            logits_k.append(lg)
            z = _feed(given, k, mu if pause is None else pause[:, k].to(mu.dtype))
            zs.append(z)
            mus.append(mu)
            h = self._latent_step(pre, z)
        tail, tmask = self._tail(answer, amask, latent_steps)
        logits, _ = self._append(pre, self.embed(tail), tmask, logits_to_keep=0)
        # The tail is <|latent_end|> + answer: position t (from <|latent_end|>) predicts answer_ids[:, t].
        pred = (
            logits[:, :-1]
            if latent_steps > 0
            else torch.cat([pre.last_logits[:, None], logits[:, :-1]], 1)
        )
        out = self._finish(pred, answer, amask, zs, mus, pre.visual, batch, logits_k)
        out.prompt_state = self.projector(pre.last_hidden)
        return out

    def _tail(
        self, answer: torch.Tensor, amask: torch.Tensor, latent_steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if latent_steps == 0:
            return answer, amask
        end = torch.full_like(answer[:, :1], self.latent_end_id)
        return torch.cat([end, answer], 1), torch.cat([torch.ones_like(amask[:, :1]), amask], 1)

    def _parallel_forward(
        self, batch, latent_steps, answer, amask, latent_inputs, given=None
    ) -> ForwardOutput:
        """One pass over prefix + given latents + tail; with no latents given, K+1 passes (recompute)."""
        pre = self._prefill(batch, with_latent_start=latent_steps > 0, use_cache=False)
        b, d = pre.last_hidden.shape
        tail, tmask = self._tail(answer, amask, latent_steps)
        tail_emb = self.embed(tail)
        L = pre.embeds.shape[1]
        look = self._lookup_cells(pre) if latent_steps else None

        def full(latents: torch.Tensor, with_tail: bool):
            k = latents.shape[1]
            parts = [pre.embeds, latents.to(pre.embeds.dtype)] + ([tail_emb] if with_tail else [])
            masks = [pre.attention_mask, pre.attention_mask.new_ones(b, k)] + (
                [tmask.to(pre.attention_mask.dtype)] if with_tail else []
            )
            n_app = k + (tail.shape[1] if with_tail else 0)
            pos = torch.cat(
                [pre.position_ids, self.adapter.appended_position_ids(pre.state, n_app)], -1
            )
            extra = {**pre.kwargs, **self.adapter.prefill_kwargs(_extend_types(pre.batch, n_app))}
            return self._forward(torch.cat(parts, 1), torch.cat(masks, 1), pos, None, **extra)

        if (
            latent_inputs is None and self.pause is not None and given is None
        ):  # pause inputs are known up front: one pass
            latents = self.pause(latent_steps, b)
        elif latent_inputs is None:  # recompute the chain: pass k sees z_1..z_{k-1}
            zs: list[torch.Tensor] = []
            h = pre.last_hidden
            pause = self.pause(latent_steps, b) if self.pause is not None else None
            for k in range(latent_steps):
                own = self._state(h, look)[0] if pause is None else pause[:, k]
                zs.append(_feed(given, k, own))
                _, hidden = full(torch.stack(zs, 1), with_tail=False)
                h = hidden[:, -1]
            latents = torch.stack(zs, 1) if zs else pre.embeds.new_zeros(b, 0, d)
        else:
            latents = latent_inputs.to(self.device)
        logits, hidden = full(latents, with_tail=True)
        # mu_k = proj(h at the position before z_k): positions L-1 .. L+K-2
        states = [self._state(hidden[:, L - 1 + k], look) for k in range(latent_steps)]
        mus = [mu for mu, _ in states]
        t = answer.shape[1]
        pred = (
            logits[:, -t - 1 : -1] if latent_steps > 0 else logits[:, L - 1 : L - 1 + t]
        )  # <|latent_end|> predicts answer_ids[:, 0]
        out = self._finish(pred, answer, amask, list(latents.unbind(1)), mus, pre.visual, batch,
                           [lg for _, lg in states])  # fmt: skip
        out.prompt_state = self.projector(pre.last_hidden)
        return out

    def _state(
        self, h: torch.Tensor, look: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's own latent state for the next step `[B, d]` from the hidden state `h`:
        `proj(h)`, or with `latent.lookup_grid` the cells' mean tokens weighted by the lookup
        head's softmax over the cells; and the head's logits `[B, C]` (None without lookup)."""
        mu = self.projector(h)
        if look is None or self.lookup is None:
            return mu, None
        cells, valid = look
        logits = self.lookup(mu.float()).masked_fill(~valid, float("-inf"))
        z = torch.einsum("bc,bcd->bd", torch.softmax(logits, -1), cells.float())
        return z.to(mu.dtype), logits

    def _lookup_cells(
        self, pre: _Prefix, group_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`latent.lookup_grid`: per sample the mean visual token of each of the n x n cells `[B, C, d]`
        (all its images) and the cells holding a token `[B, C]`; None when the lookup is off."""
        if self.lookup is None:
            return None
        shapes = self.adapter.visual_grid_shapes(self.base_model, pre.batch)
        if shapes is None:
            raise MedlvrError(
                f"latent.lookup_grid: family {self.family} has no one-grid image tokens"
            )
        n, d = self.latent.lookup_grid, self.hidden_size
        b = pre.batch["input_ids"].shape[0]
        per = pre.batch.get("images_per_sample") or ([1] * b if len(shapes) == b else [0] * b)
        owner = [i for i, c in enumerate(per) for _ in range(c)]
        cells = pre.last_hidden.new_zeros(b, n * n, d, dtype=torch.float32)
        count = cells.new_zeros(b, n * n)
        for tokens, (rows, cols), i in zip(pre.visual, shapes, owner):
            r = torch.arange(rows, device=cells.device) * n // rows
            c = torch.arange(cols, device=cells.device) * n // cols
            idx = (r[:, None] * n + c[None, :]).flatten()
            cells[i] = cells[i].index_add(0, idx, tokens.float())
            count[i] = count[i].index_add(0, idx, torch.ones_like(idx, dtype=count.dtype))
        cells, valid = cells / count.clamp_min(1)[..., None], count > 0
        valid[~valid.any(-1)] = True  # no image: a uniform mix of zeros, the step is fed 0
        if group_size > 1:
            cells, valid = (
                cells.repeat_interleave(group_size, 0),
                valid.repeat_interleave(group_size, 0),
            )
        return cells, valid

    def _finish(self, pred, answer, amask, zs, mus, visual, batch, lookup=None) -> ForwardOutput:
        logp = torch.log_softmax(pred.float(), -1)
        tok_lp = logp.gather(-1, answer.unsqueeze(-1)).squeeze(-1) * amask  # [B, T]
        loss = -tok_lp.sum() / amask.sum().clamp_min(1)
        b = answer.shape[0]
        d = self.hidden_size
        latents = torch.stack(zs, 1) if zs else pred.new_zeros(b, 0, d)
        means = torch.stack(mus, 1) if mus else pred.new_zeros(b, 0, d)
        logits = torch.stack(lookup, 1) if lookup and lookup[0] is not None else None
        return ForwardOutput(
            loss, pred, latents, means, _per_sample(visual, batch, b), tok_lp, logits
        )


# ---------------------------------------------------------------------------- utilities


def _given(
    inputs: torch.Tensor | None, mask: torch.Tensor | None, b: int, k: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Checked `(inputs [B, K, d], mask [B, K] bool)` of given latent inputs, or None without a mask."""
    if mask is None:
        return None
    if inputs is None or tuple(inputs.shape[:2]) != (b, k) or tuple(mask.shape) != (b, k):
        raise MedlvrError(
            f"latent_given needs latent_inputs [B={b}, K={k}, d] and a mask [B, K]: got "
            f"{None if inputs is None else tuple(inputs.shape)} and {tuple(mask.shape)}"
        )
    return inputs, mask.bool()


def _feed(
    given: tuple[torch.Tensor, torch.Tensor] | None, k: int, own: torch.Tensor
) -> torch.Tensor:
    """Step k's input: the given one where the mask marks it, the model's own `[B, d]` elsewhere."""
    if given is None:
        return own
    inputs, mask = given
    return torch.where(
        mask[:, k, None].to(own.device), inputs[:, k].to(device=own.device, dtype=own.dtype), own
    )


def _checkpointing(model: PreTrainedModel) -> bool:
    """Whether activation checkpointing is on (it makes the decoder layers drop the KV cache)."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(
        model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing
    )


def _extend_types(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """Token-type ids (Gemma 3) for a prefix followed by `n` appended non-image positions."""
    if batch.get("token_type_ids") is None:
        return batch
    tt = batch["token_type_ids"]
    return {**batch, "token_type_ids": torch.cat([tt, tt.new_zeros(tt.shape[0], n)], 1)}


def _per_sample(visual: list[torch.Tensor], batch: dict[str, Any], b: int) -> list[torch.Tensor]:
    """Group per-image visual tokens by sample (`images_per_sample` from the collator, else one each)."""
    if not visual:
        return []
    counts = batch.get("images_per_sample") or ([1] * b if len(visual) == b else None)
    if counts is None or sum(counts) != len(visual):
        raise MedlvrError(
            f"cannot assign {len(visual)} images to {b} samples: pass images_per_sample"
        )
    out, i = [], 0
    for c in counts:
        chunk = visual[i : i + c]
        out.append(torch.cat(chunk, 0) if chunk else visual[0].new_zeros(0, visual[0].shape[-1]))
        i += c
    return out


@contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run the model with eager attention (the only one that returns weights), then restore its own."""
    old = model.config._attn_implementation
    if old == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def _step_attentions(rows: list[tuple[torch.Tensor, ...]], width: int) -> torch.Tensor:
    """Latent steps' attention weights -> `[n_layers, B, K, width]`, mean over heads, zero-padded on the right.

    `rows[k][layer]` is step k's `[B, H, 1, width - K + k + 1]` (the positions before it and itself).
    """
    steps = [
        torch.stack([a[:, :, -1].float().mean(1) for a in layers]) for layers in rows
    ]  # [n_layers, B, P + k]
    return torch.stack([F.pad(s, (0, width - s.shape[-1])) for s in steps], 2)


def _pick(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator
) -> torch.Tensor:
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _until_stop(row: list[int], stop_ids: list[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[:i]
    return row


def read_latent_config(path: Path) -> LatentConfig | None:
    """The latent settings a model folder was saved with (`medlvr_latent.json`), or None (a plain backbone)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    f = path / LATENT_CONFIG_FILE
    if not f.is_file():
        return None
    try:
        raw = json.loads(f.read_text(encoding="utf-8-sig"))
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON object of settings, not a {type(raw).__name__}")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LatentConfig), raw))  # type: ignore[return-value]
    except (ValueError, OmegaConfBaseException) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        key = getattr(err, "full_key", None)
        raise MedlvrError(
            f"{f} is not a latent config ({f'{key}: ' if key else ''}{why}); copy or export the model again"
        ) from None


@contextmanager
def _load_report(path: Path) -> Iterator[None]:
    """transformers' load report held back while the weights load: shown as it is when the load
    succeeds, one line naming the first mismatch when the weights do not fit `config.json`."""
    import logging

    held: list[logging.LogRecord] = []

    class Hold(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "LOAD REPORT" in record.getMessage():
                held.append(record)
                return False
            return True

    handlers = logging.getLogger("transformers").handlers
    hold = Hold()
    for h in handlers:
        h.addFilter(hold)
    try:
        yield
    except RuntimeError as err:
        report = "\n".join(r.getMessage() for r in held)
        first = next((ln for ln in report.splitlines() if "MISMATCH" in ln and "|" in ln), "")
        example = " ".join(part.strip() for part in first.split("|") if part.strip())
        raise MedlvrError(
            f"{path}: the weights do not fit config.json"
            + (f" ({example})" if example else f" ({str(err).splitlines()[0]})")
            + "; copy or export the model again"
        ) from None
    finally:
        for h in handlers:
            h.removeFilter(hold)
    for record in held:
        logging.getLogger(record.name).handle(record)


class _Clock:
    """Wall time between calls, synchronising the accelerator so phases are attributed right."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = time.perf_counter()

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        return dt


def gaussian_logprob(
    z: torch.Tensor, mu: torch.Tensor, sigma: float, reduction: str = "mean"
) -> torch.Tensor:
    """Gaussian log-density of latent steps `z ~ N(mu, sigma^2 I)`, shape [.., K] (`vlpo.latent_logprob`).

    `sum`: the step's log-density `-||z - mu||^2 / (2 sigma^2)`, so ratios are the true
    density ratios (Monet's VLPO); `mean`: divided by d, the per-dimension log-density, on
    the scale of one token's log-probability, whose ratio is the true one to the power 1/d.
    The constant term is dropped (it cancels in ratios and KL).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"latent log-density reduction must be mean or sum, got {reduction!r}")
    sq = (z.float() - mu.float()).pow(2).sum(-1) / (2 * sigma**2)
    return -sq / z.shape[-1] if reduction == "mean" else -sq


__all__ = [
    "LatentVLM",
    "LatentProjector",
    "PauseInputs",
    "GenerationOutput",
    "ForwardOutput",
    "gaussian_logprob",
    "eager_attention",
    "read_latent_config",
]
