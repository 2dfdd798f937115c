"""Typed configuration: dataclasses with one docstring per field, YAML recipes, dotted overrides.

`load_config(Schema, "recipe.yaml", ["sft.lr=1e-4", "latent.steps=8"])` merges a
YAML file and command-line overrides onto the schema with OmegaConf, so an
unknown key or a value of the wrong type fails before any compute, with the
key's full name in the message. `__post_init__` checks values.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from medlvr.errors import MedlvrError

ProjectorKind = Literal["none", "linear", "mlp", "norm"]
LatentInput = Literal["hidden", "pause"]


@dataclass
class LatentConfig:
    """The latent segment inserted between the question and the answer."""

    steps: int = 4
    """K: number of continuous latent steps (0 = answer directly, the plain backbone)."""
    projector: ProjectorKind = "norm"
    """Map from the fed-back last hidden state to the next input embedding.
    `none` feeds it as is; `linear` and `mlp` are learned (initialised to identity);
    `norm` rescales it to the typical norm of token embeddings (with a learned
    scale), since the final-norm hidden state is 18-50x larger than token embeddings."""
    input: LatentInput = "hidden"
    """What each latent step is fed. `hidden`: `z_k = proj(h_{k-1})`, the fed-back state (the
    method). `pause`: the pause-token control of Coconut-style studies: the same K, positions,
    curriculum and special tokens, but step k's input is a learned constant embedding (one
    per step index; steps beyond the trained count reuse the last one) instead of the
    fed-back state, so any gain of `hidden` over `pause` comes from the recurrence, not from
    extra positions. ROI alignment still trains `proj(h_{k-1})`, the outputs at the latent
    positions; VLPO (Gaussian exploration of the fed state) refuses `pause`."""
    lookup_grid: int = 0
    """n > 0: a latent step addresses the visual tokens by position. A learned head on the
    state `proj(h_{k-1})` scores the n x n cells of the image grid, and step k is fed the
    softmax-weighted mean of each cell's visual tokens (what chain alignment's gold targets are
    made of: pooled ROI tokens) instead of the state itself; `latent_means` are these inputs.
    The head starts at zero (every cell alike) and trains through the answer loss, the ROI
    alignment and `align.region_weight` (which then supervises the head itself). 0 = off."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise MedlvrError(f"latent.steps must be >= 0, got {self.steps}")
        if self.projector not in ("none", "linear", "mlp", "norm"):
            raise MedlvrError(
                f"latent.projector must be none, linear, mlp or norm, got {self.projector!r}"
            )
        if self.input not in ("hidden", "pause"):
            raise MedlvrError(f"latent.input must be hidden or pause, got {self.input!r}")
        if self.lookup_grid < 0 or (self.lookup_grid and self.input == "pause"):
            raise MedlvrError(
                f"latent.lookup_grid must be >= 0 and needs latent.input=hidden, got "
                f"{self.lookup_grid} with input {self.input!r}"
            )


# ---------------------------------------------------------------------------- training groups
# Shared by the SFT and VLPO stages: each stage's top-level config composes these.

Precision = Literal["auto", "no", "bf16", "fp16"]
Finetune = Literal["full", "lora"]
Sharding = Literal["none", "fsdp2"]
AlignKind = Literal["cosine", "mse", "infonce"]
AlignAssign = Literal["raster", "first", "chain"]
AlignNegatives = Literal["background", "other_hops"]
Schedule = Literal["cosine", "linear", "constant"]
SFTMode = Literal["plain", "latent", "roi", "teacher_forced", "roi_direct"]


@dataclass
class ModelConfig:
    """Which backbone to start from and how much of it trains."""

    path: str = ""
    """The model to start from: a folder (`medlvr model init-tiny` output, a medlvr export, a
    downloaded VLM; relative to the working directory), `stage0` (the shipped backbone), or a
    Hugging Face Hub id `org/name` or `org/name@revision` (fetched into huggingface_hub's cache)."""
    allow_pickle: bool = False
    """Let a `path` whose weights are pickle only (`pytorch_model.bin`) load: unpickling runs code
    stored in the file, so only for files you trust (medlvr itself writes safetensors only)."""
    finetune: Finetune = "full"
    """`full` trains every unfrozen parameter; `lora` adds peft adapters (see `lora`) and
    freezes the rest of the backbone. The latent projector always trains when it has parameters."""
    freeze_vision: bool = False
    """Freeze the vision tower (patch embedding and blocks, not the merger)."""
    freeze_merger: bool = False
    """Freeze the vision-to-language merger/projector. The freeze_* options apply to full
    fine-tuning: under LoRA everything outside the adapters and `lora.modules_to_save` is frozen."""
    freeze_language: bool = False
    """Freeze the language model (embeddings, decoder, head): with LoRA off, only the
    vision side and the latent projector train."""
    precision: Precision = "auto"
    """Autocast precision: `auto` = bf16 where the hardware has it (CUDA with bf16), else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, ~30% slower; the latent chain is
    then recomputed with full passes, since checkpointed layers drop the KV cache)."""
    sharding: Sharding = "none"
    """`fsdp2` shards parameters, gradients and optimizer state over the launch's processes with
    torch's FSDP2 (`medlvr.train.sharding`: decoder layers and vision blocks as units; CPU
    processes over gloo or GPUs); checkpoints are then torch.distributed.checkpoint shards
    (safetensors) that resume on any process count. `none`: one full copy per process (DDP).
    accelerate's own FSDP and ZeRO-3 configs have never run (docs/gpu.md)."""

    def __post_init__(self) -> None:
        if self.finetune not in ("full", "lora"):
            raise MedlvrError(f"model.finetune must be full or lora, got {self.finetune!r}")
        if self.sharding not in ("none", "fsdp2"):
            raise MedlvrError(f"model.sharding must be none or fsdp2, got {self.sharding!r}")


@dataclass
class DataConfig:
    """Training and validation data (VQASample JSONL files)."""

    train: list[str] = field(default_factory=list)
    """One or more training JSONL files; several are mixed (see `weights`)."""
    weights: list[float] = field(default_factory=list)
    """Sampling weight per `train` file; empty = every record once per epoch. With weights,
    an epoch still has as many samples as all files together, drawn with replacement."""
    val: str = ""
    """Validation JSONL for periodic accuracy (empty = no validation)."""
    val_samples: int = 64
    """Validation records used (the first N; 0 = all)."""
    max_samples: int = 0
    """Cap on training records per file (the first N; 0 = all): quick runs and tests."""
    max_answer_tokens: int = 64
    """Answers are truncated to this many tokens (stop token included)."""
    num_workers: int = 0
    """DataLoader worker processes that load images and build batches (0 = in the training process)."""

    def __post_init__(self) -> None:
        if self.val_samples < 0 or self.max_samples < 0 or self.num_workers < 0:
            raise MedlvrError(
                "data.val_samples, data.max_samples and data.num_workers must be >= 0"
            )
        if self.max_answer_tokens < 2:
            raise MedlvrError(f"data.max_answer_tokens must be >= 2, got {self.max_answer_tokens}")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise MedlvrError(f"data.weights must be >= 0 and not all 0, got {list(self.weights)}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then cosine/linear decay; gradient clipping."""

    lr: float = 1e-4
    """Peak learning rate (after warmup)."""
    projector_lr: float = 0.0
    """Learning rate of the latent projector and of the pause inputs (`latent.input=pause`) (0 = same as `lr`)."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only (not to norms, biases, scales)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `lr`."""
    schedule: Schedule = "cosine"
    """Decay after warmup, down to `min_lr_ratio * lr` at the last step."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of `lr`."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (0 = no clipping)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.projector_lr < 0:
            raise MedlvrError(
                f"optim.lr must be > 0 and optim.projector_lr >= 0, got {self.lr}, {self.projector_lr}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise MedlvrError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise MedlvrError(
                "optim.warmup_steps, optim.max_grad_norm and optim.weight_decay must be >= 0"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise MedlvrError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LoraConfig:
    """peft LoRA adapters (used when `model.finetune=lora`)."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Module names (suffixes) that get adapters. The defaults hit the language model's
    attention only (Qwen's vision blocks name theirs `qkv`/`proj`); add `gate_proj`,
    `up_proj`, `down_proj` for the MLPs."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapters (e.g. the vision merger). Not needed for the
    latent special tokens: see `train_latent_tokens`."""
    train_latent_tokens: bool = True
    """Train the embedding rows of the latent special tokens (`<|latent_start|>`, `<|latent_pad|>`,
    `<|latent_end|>`: new tokens, starting at the mean embedding) with peft's trainable tokens
    (`trainable_token_indices`): 3 rows and their optimizer state, not the whole embedding
    (545M parameters on Qwen2.5-VL-7B). A tied output head follows them; the LoRA export merges
    them, and disabling the adapter (the VLPO reference) disables them too. Under FSDP, peft needs
    `use_orig_params=True` for it."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise MedlvrError(
                f"lora: need r >= 1, alpha > 0, 0 <= dropout < 1, got {self.r}, {self.alpha}, {self.dropout}"
            )
        if not self.target_modules:
            raise MedlvrError("lora.target_modules is empty")
        if self.train_latent_tokens and "embed_tokens" in self.modules_to_save:
            raise MedlvrError(
                "lora.modules_to_save trains the whole embed_tokens, the latent tokens' rows included: "
                "set lora.train_latent_tokens=false (or drop embed_tokens, 3 rows train without it)"
            )


@dataclass
class AlignConfig:
    """ROI alignment: pull the latent states towards the pooled ROI visual tokens (targets detached)."""

    kind: AlignKind = "infonce"
    """`cosine` (1 - cos), `mse`, or `infonce` (the pooled ROI token against the other visual
    tokens of the same image as negatives). On the synthetic scans plain cosine collapsed
    onto the direction every visual token shares and only InfoNCE carried the queried
    location (docs/synthetic.md), hence the default."""
    weight: float = 0.5
    """lambda: weight of the alignment term next to the answer cross-entropy."""
    temperature: float = 0.1
    """InfoNCE temperature (cosine similarities are divided by it)."""
    assign: AlignAssign = "raster"
    """Which ROI tokens each latent step is aligned to (`medlvr.data.roi`). `raster`: all the
    sample's ROI tokens, in raster order, pooled into K contiguous chunks, step k to chunk k;
    `first`: only the first step, to the mean ROI token (the later steps stay free);
    `chain`: per hop, for multi-hop records (`meta.roi_hops`, the 1-based hop of each ROI in
    reasoning order, and `meta.hops` = h): step k (0-based) is aligned to hop
    ceil((k+1) h / K) - 1, so every hop gets floor(K/h) or ceil(K/h) contiguous steps (a
    remainder's extra steps go to later hops, spread evenly; K=6, h=4: 1, 2, 1, 2 steps) and
    the last step always aligns to the final hop; with K < h each step gets its own hop,
    spread evenly (K=2, h=3: hops 2 and 3; the first hop gets none). A hop's s steps pool
    that hop's ROI tokens into s raster chunks. A record without `roi_hops` is one hop
    (chain = raster). The InfoNCE negatives are the image's non-ROI tokens (all hops' ROIs
    excluded) under every assignment, unless `negatives=other_hops`."""
    negatives: AlignNegatives = "background"
    """InfoNCE negatives. `background`: the image's tokens outside every ROI. `other_hops` (with
    `assign=chain`): also the ROI tokens of the *other* hops, so a step aligned to hop j is
    pushed off the lesions of hops != j (staying on the anchor is contrasted with moving on)."""
    region_weight: float = 0.0
    """Weight of a linear head on every latent state that classifies the cell of an n x n grid
    (`region_grid`) holding its hop's ROI centre (the step's hop as `assign=chain` gives it):
    a target that says *where*, which the visual tokens carry only as far as their content does
    (0 = off; training only, the head is not exported)."""
    region_grid: int = 3
    """n of the region head's n x n grid (3: the synthetic benchmark's nine named regions)."""

    def __post_init__(self) -> None:
        if self.negatives not in ("background", "other_hops"):
            raise MedlvrError(
                f"align.negatives must be background or other_hops, got {self.negatives!r}"
            )
        if self.region_weight < 0 or self.region_grid < 1:
            raise MedlvrError(
                f"align.region_weight must be >= 0 and align.region_grid >= 1, got "
                f"{self.region_weight}, {self.region_grid}"
            )
        if self.assign not in ("raster", "first", "chain"):
            raise MedlvrError(f"align.assign must be raster, first or chain, got {self.assign!r}")
        if self.weight < 0:
            raise MedlvrError(f"align.weight must be >= 0, got {self.weight}")
        if self.temperature <= 0:
            raise MedlvrError(f"align.temperature must be > 0, got {self.temperature}")


@dataclass
class ProbeConfig:
    """An auxiliary linear probe on the post-merger visual tokens (training only, dropped at export).

    Each visual token is classified as the label of the ROI covering it, or as
    background. Stage 0 of the laptop demo uses it: a tiny backbone trained only
    through the answer text learned where lesions are but not their shapes, while
    a per-token head taught the visual tokens shapes within minutes (docs/synthetic.md).
    """

    weight: float = 0.0
    """Weight of the probe's token cross-entropy next to the answer cross-entropy (0 = off)."""
    labels: list[str] = field(default_factory=list)
    """The ROI labels the probe tells apart (background is added); empty = every label found
    on the training samples it applies to."""
    question_types: list[str] = field(default_factory=list)
    """Apply only to samples of these question types, whose ROIs cover every object of the
    image, so that the tokens outside them really are background (empty = all samples with ROIs)."""
    position_weight: float = 0.0
    """Weight of a second head regressing each visual token's position (its cell centre as a
    fraction of the image) from its content, on every sample: RoPE gives attention only
    relative positions, so finding the region a question names needs tokens that say where they are."""

    def __post_init__(self) -> None:
        if self.weight < 0 or self.position_weight < 0:
            raise MedlvrError(
                f"probe.weight and probe.position_weight must be >= 0, got {self.weight}, {self.position_weight}"
            )
        if "background" in self.labels:
            raise MedlvrError(
                "probe.labels: 'background' is implicit (the tokens outside every ROI)"
            )


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (safetensors) and the final export."""

    every: int = 0
    """Save every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest N step checkpoints (the final export is never deleted)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in `output_dir` (if there is one). Settings
    that shape the checkpoint (mode, seed, model.path/finetune/freeze_*, latent.projector/input,
    lora.*, probe.*, data.train/weights/max_samples) must equal the checkpoint's; any other
    changed setting applies from the resumed step on and is reported."""
    overwrite: bool = False
    """Start afresh in an `output_dir` that holds a run, deleting that run's checkpoints, metrics
    and export (an `output_dir` holding a run is refused unless `resume` or `overwrite` is set)."""
    merge_lora: bool = True
    """Export a LoRA run as a merged full model (loads in `medlvr predict`, the harness and
    plain transformers); False writes only the adapter (`final/adapter`, apply with peft)."""
    save_optimizer: bool = True
    """Store optimizer, scheduler and RNG states (needed to resume exactly)."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise MedlvrError(
                f"checkpoint.every must be >= 0 and checkpoint.keep_last >= 1, got {self.every}, {self.keep_last}"
            )
        if self.resume and self.overwrite:
            raise MedlvrError(
                "checkpoint.resume continues the run in output_dir and checkpoint.overwrite deletes it: choose one"
            )


@dataclass
class LogConfig:
    """What a run shows and records."""

    every: int = 10
    """Write metrics every N optimizer steps (JSONL, TensorBoard)."""
    progress: bool = True
    """Show a rich progress bar (main process only)."""
    tensorboard: bool = True
    """Also write TensorBoard event files under `output_dir/tb`."""
    val_every: int = 0
    """Validation accuracy every N optimizer steps (0 = only at the end, if `data.val` is set)."""
    val_batch_size: int = 16
    """Generation batch size during validation."""
    val_max_new_tokens: int = 16
    """Answer token limit during validation."""

    def __post_init__(self) -> None:
        if (
            self.every < 1
            or self.val_every < 0
            or self.val_batch_size < 1
            or self.val_max_new_tokens < 1
        ):
            raise MedlvrError(
                "log.every, log.val_batch_size and log.val_max_new_tokens must be >= 1, log.val_every >= 0"
            )


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning with optional latent steps and ROI alignment (`run_sft`)."""

    mode: SFTMode = "roi"
    """`plain`: K = 0, answer cross-entropy only (the baseline, also stage-0 pretraining);
    `latent`: K latent steps, no ROI loss; `roi`: K latent steps plus lambda * alignment
    (ROI-SFT); `teacher_forced`: the ROI targets are fed as the latent inputs in one
    parallel pass and the alignment trains the predicted latents (faster, but training
    differs from inference); `roi_direct`: K = 0 and the same alignment applied without
    latent steps, to proj(h) at the last prompt position, from which the answer is read (the
    control that separates ROI supervision from latent reasoning). `latent.steps` is K
    (ignored by `plain`, 0 for `roi_direct`)."""
    output_dir: str = "runs/sft"
    """Checkpoints, metrics.jsonl, tb/ and the final export (`final/`)."""
    seed: int = 0
    """Seeds the data order, initialisation of new modules and dropout."""
    batch_size: int = 8
    """Micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = batch_size x processes x grad_accum."""
    max_steps: int = 0
    """Optimizer steps (0 = derive from `epochs`)."""
    epochs: float = 1.0
    """Passes over the training data when `max_steps` is 0."""
    curriculum: list[int] = field(default_factory=list)
    """Raise K in stages: K per stage, stages of equal length over the run (e.g. [1, 2, 4]);
    empty = `latent.steps` throughout. Not for `plain` or `teacher_forced`."""
    replace_reasoning: bool = False
    """With a curriculum, Coconut's (Hao et al., 2024): train on each record's written reasoning
    (`meta.reasoning`, see `medlvr.data.prompts.written_reasoning`) and at stage s leave its first
    s steps to the stage's K latent steps, so latents replace written steps one at a time (e.g.
    curriculum [0, 2, 4, 6] for 3-step chains, 2 latent steps per step; K = 0 allowed here).
    Records without written reasoning keep their plain answer."""
    gold_latents: float = 0.0
    """Scheduled sampling between gold and own latents (mode `roi`): at optimizer step t each hop
    of each sample with ROIs is fed its gold latents (the chain alignment's pooled ROI targets,
    as `medlvr eval --latents gold`) with a probability going linearly from `gold_latents` at the
    first step to `gold_latents_end` at the last, its own elsewhere, so the answer learns to read
    latents while the producer, behind gold prefixes, is trained through the answer loss.
    0 = own latents throughout."""
    gold_latents_end: float = 0.0
    """The scheduled-sampling probability at the last optimizer step (see `gold_latents`)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("plain", "latent", "roi", "teacher_forced", "roi_direct"):
            raise MedlvrError(
                f"mode must be plain, latent, roi, teacher_forced or roi_direct, got {self.mode!r}"
            )
        if self.batch_size < 1 or self.grad_accum < 1:
            raise MedlvrError(
                f"batch_size and grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}"
            )
        if self.max_steps < 0 or self.epochs <= 0:
            raise MedlvrError(
                f"max_steps must be >= 0 and epochs > 0, got {self.max_steps}, {self.epochs}"
            )
        if any(k < (0 if self.replace_reasoning else 1) for k in self.curriculum):
            raise MedlvrError(
                f"curriculum stages need K >= 1 (>= 0 with replace_reasoning), got {list(self.curriculum)}"
            )
        if self.replace_reasoning and not self.curriculum:
            raise MedlvrError(
                "replace_reasoning hides written steps stage by stage: give a curriculum, e.g. [0, 2, 4, 6]"
            )
        if self.replace_reasoning and self.mode != "latent":
            raise MedlvrError(
                f"replace_reasoning runs with mode=latent (latent steps standing in for written ones), got mode {self.mode!r}"
            )
        if self.mode == "teacher_forced" and self.latent.input == "pause":
            raise MedlvrError(
                "mode teacher_forced feeds the ROI targets as the latent inputs, so latent.input=pause "
                "would replace nothing: use mode=roi or mode=latent for the pause control"
            )
        if self.curriculum and self.mode in ("plain", "teacher_forced"):
            raise MedlvrError(
                f"a curriculum raises K; mode {self.mode!r} does not run the latent recurrence"
            )
        if (
            self.mode in ("latent", "roi", "teacher_forced")
            and self.latent.steps == 0
            and not self.curriculum
        ):
            raise MedlvrError(
                f"mode {self.mode!r} needs latent.steps >= 1 (use mode=plain for K = 0)"
            )
        if not (0 <= self.gold_latents <= 1 and 0 <= self.gold_latents_end <= 1):
            raise MedlvrError(
                f"gold_latents and gold_latents_end must be in [0, 1], got {self.gold_latents}, "
                f"{self.gold_latents_end}"
            )
        if self.gold_latents_end and not self.gold_latents:
            raise MedlvrError("gold_latents_end ends the schedule gold_latents starts: set both")
        if self.gold_latents and self.mode != "roi":
            raise MedlvrError(
                f"gold_latents mixes gold and own latents in the recurrence of mode roi, not {self.mode!r}"
            )
        if (
            self.gold_latents or self.align.negatives == "other_hops" or self.align.region_weight
        ) and (self.align.assign != "chain"):
            raise MedlvrError(
                "gold_latents, align.negatives=other_hops and align.region_weight work per hop: "
                "set align.assign=chain"
            )
        if (
            self.latent.lookup_grid
            and self.align.region_weight
            and self.align.region_grid != self.latent.lookup_grid
        ):
            raise MedlvrError(
                f"align.region_grid ({self.align.region_grid}) must equal latent.lookup_grid "
                f"({self.latent.lookup_grid}): the region labels supervise the lookup head"
            )
        if self.mode == "roi_direct" and (self.latent.steps or self.curriculum):
            raise MedlvrError(
                f"mode roi_direct answers with no latent steps (K = 0), got latent.steps={self.latent.steps}"
                + (f", curriculum {self.curriculum}" if self.curriculum else "")
            )
        if self.mode in ("roi", "teacher_forced", "roi_direct") and self.align.weight == 0:
            raise MedlvrError(
                f"mode {self.mode!r} with align.weight=0 trains no alignment: use mode=latent"
            )

    @property
    def uses_rois(self) -> bool:
        """Whether the run needs ROI targets."""
        return self.mode in ("roi", "teacher_forced", "roi_direct")

    @property
    def latent_steps(self) -> int:
        """The final K (0 in plain mode; the last curriculum stage if there is one)."""
        if self.mode in ("plain", "roi_direct"):
            return 0
        return self.curriculum[-1] if self.curriculum else self.latent.steps


PolicyAggregation = Literal["token", "sequence"]
LatentLogprob = Literal["mean", "sum"]


@dataclass
class VLPOParams:
    """Stage 2 knobs: rollouts, rewards, advantages and the clipped policy update (`vlpo.*`)."""

    group_size: int = 8
    """G: rollouts per prompt. The prompt is prefilled once and its KV cache shared by the group."""
    temperature: float = 1.0
    """Sampling temperature of answer tokens; log-probabilities are taken under the same
    `softmax(logits / T)`, so the ratio compares the distributions that actually sampled."""
    top_p: float = 1.0
    """Nucleus sampling for answer tokens (1.0 = off; < 1 makes the sampler differ from the
    policy whose log-probabilities are trained, as in most GRPO implementations)."""
    latent_sigma: float = 0.05
    """sigma: latent step k samples `z_k ~ N(mu_k, sigma^2 I)`. Absolute, in the input-embedding
    space: compare it with the logged `latent_norm / sqrt(d)` (the per-dimension RMS of mu;
    with `latent.projector=norm` this is about the token-embedding RMS). 0 = the latents are
    deterministic context, not actions (only answer tokens are trained)."""
    max_new_tokens: int = 16
    """Answer token limit per rollout; a rollout that hits it has no stop token (format reward 0)."""
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    """Reward name -> weight; the reward is the weighted sum. Built-ins: `accuracy` (the
    evaluation scorer), `format` (the answer parses and the rollout stopped), `roi_evidence`
    (mean cosine of the latents to the pooled ROI targets, ROIs split over the K steps in raster
    order), `roi_evidence_first` (every step to the first ROI) and `roi_evidence_chain` (step k to
    the ROIs of its hop, as `align.assign=chain`; at most one of the three). Any other key is an import path
    `package.module:function` with the contract `(sample, response, latents, context) -> float`
    (see `medlvr.train.rewards`)."""
    scale_advantages: bool = True
    """Divide the group-relative advantage by the group's reward std (GRPO); False keeps
    reward minus group mean (Dr. GRPO), which does not up-weight nearly-solved groups."""
    clip_low: float = 0.2
    """PPO epsilon below 1: the ratio is clipped at `1 - clip_low`."""
    clip_high: float = 0.28
    """PPO epsilon above 1: `1 + clip_high` (DAPO's clip-higher keeps low-probability
    tokens explorable; set equal to `clip_low` for symmetric PPO clipping)."""
    latent_logprob: LatentLogprob = "mean"
    """Log-density of a latent step in the ratio and the KL. `sum`: the step's Gaussian density
    `-||z - mu||^2 / (2 sigma^2)` (Monet's VLPO), whose ratio is the true density ratio, so
    PPO's clip range is a trust region for the latent steps too; `mean`: divided by d (the
    per-dimension density, on the scale of one token's log-probability), whose ratio is the
    true one to the power 1/d. On the tiny recipe (docs/results.md, "VLPO: the latent
    log-density", 3 seeds) `sum` clipped a quarter of the latent units, multiplied the gradient
    norm by 25 and pinned the latent KL at the estimator's clamp, for the same held-out reward:
    hence `mean`."""
    latent_clip_low: float = 0.2
    """PPO epsilon below 1 for latent steps (their ratio is a density ratio, on another
    scale than a token's): the latent ratio is clipped at `1 - latent_clip_low`."""
    latent_clip_high: float = 0.28
    """PPO epsilon above 1 for latent steps: `1 + latent_clip_high`."""
    aggregation: PolicyAggregation = "token"
    """`token`: every latent step and answer token of the optimizer step weighs the same
    (DAPO); `sequence`: mean within each trajectory, then over trajectories (GRPO)."""
    update_epochs: int = 1
    """Passes of policy updates over each batch of rollouts (PPO epochs). The first pass
    starts on-policy (ratio exactly 1); later ones are off-policy and clipping matters."""
    mini_batches: int = 1
    """Optimizer steps per update epoch: each process's rollouts are split into this many parts
    (strided: part m takes trajectories m, m + M, ...), so the number of optimizer steps does not
    depend on the number of processes. At most batch_size x group_size."""
    beta: float = 0.0
    """Weight of the k3 KL estimate to the reference policy (the starting checkpoint). Under
    LoRA the reference is the same model with the adapter disabled (no second copy in
    memory); with full fine-tuning, a frozen copy. 0 = no reference pass at all."""
    latent_policy: bool = True
    """Train the latent steps as actions (their Gaussian log-densities join the ratio and
    the KL). False: the sampled latents are context and only answer tokens are trained."""
    micro_batch_size: int = 8
    """Trajectories per forward pass when recomputing log-probabilities and updating (a
    memory knob; the result does not depend on it)."""
    eval_samples: int = 4
    """Samples per validation prompt when measuring the mean reward (`data.val`)."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise MedlvrError(
                f"vlpo.group_size must be >= 2 (advantages are relative to the group), got {self.group_size}"
            )
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise MedlvrError(
                f"vlpo.temperature must be > 0 and vlpo.top_p in (0, 1], got {self.temperature}, {self.top_p}"
            )
        if self.latent_sigma < 0:
            raise MedlvrError(f"vlpo.latent_sigma must be >= 0, got {self.latent_sigma}")
        if (
            self.max_new_tokens < 1
            or self.update_epochs < 1
            or self.mini_batches < 1
            or self.micro_batch_size < 1
        ):
            raise MedlvrError(
                "vlpo.max_new_tokens, update_epochs, mini_batches and micro_batch_size must be >= 1"
            )
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise MedlvrError(
                f"vlpo.clip_low must be in [0, 1) and vlpo.clip_high >= 0, got {self.clip_low}, {self.clip_high}"
            )
        if not 0 <= self.latent_clip_low < 1 or self.latent_clip_high < 0:
            raise MedlvrError(
                f"vlpo.latent_clip_low must be in [0, 1) and vlpo.latent_clip_high >= 0, "
                f"got {self.latent_clip_low}, {self.latent_clip_high}"
            )
        if self.latent_logprob not in ("mean", "sum"):
            raise MedlvrError(
                f"vlpo.latent_logprob must be mean or sum, got {self.latent_logprob!r}"
            )
        if self.aggregation not in ("token", "sequence"):
            raise MedlvrError(
                f"vlpo.aggregation must be token or sequence, got {self.aggregation!r}"
            )
        if self.beta < 0:
            raise MedlvrError(f"vlpo.beta must be >= 0, got {self.beta}")
        if not any(w != 0 for w in self.rewards.values()):
            raise MedlvrError("vlpo.rewards needs at least one reward with a non-zero weight")
        if self.eval_samples < 1:
            raise MedlvrError(f"vlpo.eval_samples must be >= 1, got {self.eval_samples}")


@dataclass
class VLPOConfig:
    """Stage 2: Visual-Latent Policy Optimization from an SFT checkpoint (`run_vlpo`)."""

    output_dir: str = "runs/vlpo"
    """Checkpoints, metrics.jsonl, tb/ and the final export (`final/`)."""
    seed: int = 0
    """Seeds the prompt order and the rollout sampling streams (per process)."""
    batch_size: int = 4
    """Prompts per process per step; each step samples batch_size x group_size trajectories per process."""
    max_steps: int = 100
    """Rollout-and-update steps (each makes update_epochs x mini_batches optimizer steps)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    vlpo: VLPOParams = field(default_factory=VLPOParams)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_steps < 1:
            raise MedlvrError(
                f"batch_size and max_steps must be >= 1, got {self.batch_size}, {self.max_steps}"
            )
        if self.vlpo.mini_batches > self.batch_size * self.vlpo.group_size:
            raise MedlvrError(
                f"vlpo.mini_batches={self.vlpo.mini_batches} exceeds the {self.batch_size * self.vlpo.group_size} "
                "trajectories per process and step (batch_size x vlpo.group_size)"
            )

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps over the whole run (for the learning-rate schedule)."""
        return self.max_steps * self.vlpo.update_epochs * self.vlpo.mini_batches


@dataclass
class ServeConfig:
    """Settings of the web demo."""

    host: str = "127.0.0.1"
    """Interface to bind; loopback by default, so the demo is not exposed on the network by accident."""
    port: int = 7860
    """TCP port."""
    max_upload_mb: float = 20.0
    """Largest upload accepted, in megabytes (bigger files get a message, not an answer)."""
    min_side: int = 16
    """Smallest accepted image side in pixels."""
    max_side: int = 8192
    """Largest accepted image side in pixels."""
    max_aspect: float = 20.0
    """Largest accepted ratio of the long to the short side (the processor rejects extreme strips)."""
    max_latent_steps: int = 16
    """Top of the latent-budget slider."""
    max_new_tokens: int = 32
    """Answer token limit."""
    examples: int = 4
    """Synthetic benchmark examples generated for the gallery at start (0 = no gallery)."""
    examples_seed: int = 0
    """Seed of the gallery's synthetic scans."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise MedlvrError(f"port must be in 1..65535, got {self.port}")
        if self.max_upload_mb <= 0:
            raise MedlvrError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        if not 1 <= self.min_side <= self.max_side:
            raise MedlvrError(
                f"need 1 <= min_side <= max_side, got {self.min_side}, {self.max_side}"
            )
        if self.max_aspect < 1:
            raise MedlvrError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.max_latent_steps < 1 or self.max_new_tokens < 1 or self.examples < 0:
            raise MedlvrError("max_latent_steps and max_new_tokens must be >= 1 and examples >= 0")


T = TypeVar("T")


def load_config(
    schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Build a `schema` instance from an optional YAML file and `key.sub=value` overrides.

    `path` is a YAML file or the name of a shipped recipe (`tiny/sft`, `medlvr recipes`).

    `${oc.env:VAR}` is refused in both: the resolved config is saved with every run, so a
    shared recipe would copy the variable (a token, a password) into each run folder.
    """
    # Imported here: the command line imports this module to declare its options (start-up time).
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(schema)
    try:
        if path is not None:
            path = _recipe_file(path)
            base = OmegaConf.merge(base, _load_yaml(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise MedlvrError(f"overrides must look like key.sub=value, got {bad}")
            base = OmegaConf.merge(
                base, OmegaConf.from_dotlist([_empty_value(base, o) for o in overrides])
            )
        _refuse_env(OmegaConf.to_container(base, resolve=False))
        obj = OmegaConf.to_object(base)
    except OmegaConfBaseException as err:
        raise MedlvrError(f"bad configuration: {_first_line(err)}") from None
    return obj  # type: ignore[return-value]


_ENV = re.compile(r"\$\{\s*oc\.env\s*:")


def _refuse_env(tree: Any, key: str = "") -> None:
    """`${oc.env:VAR}` anywhere is refused: a shared recipe would copy the variable (a token, a
    password) into the config.yaml saved with every run."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _refuse_env(v, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _refuse_env(v, f"{key}[{i}]")
    elif isinstance(tree, str) and _ENV.search(tree):
        raise MedlvrError(
            f"{key}: {tree} reads an environment variable, which the config.yaml saved with the run "
            "would then hold: write the value itself"
        )


def _recipe_file(path: str | Path) -> Path:
    """A YAML file that exists, else the shipped recipe of that name; a `MedlvrError` if neither."""
    from medlvr.shipped import recipe_path

    if Path(path).is_file():
        return Path(path)
    shipped = recipe_path(path)
    if shipped is None:
        raise MedlvrError(
            f"config file not found: {path} (nor a shipped recipe: `medlvr recipes` lists them)"
        )
    return shipped


def _load_yaml(path: Path) -> Any:
    """A YAML recipe as an OmegaConf mapping; a syntax error or a top-level list is a `MedlvrError`."""
    import yaml
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or _first_line(err)
        raise MedlvrError(f"{path} is not valid YAML{where}: {problem}") from None
    if not OmegaConf.is_dict(loaded):
        kind = "list" if OmegaConf.is_list(loaded) else type(loaded).__name__
        raise MedlvrError(
            f"{path} must be a mapping of settings (e.g. `mode: roi`) at the top level, not a {kind}"
        )
    return loaded


def _empty_value(base: Any, override: str) -> str:
    """`data.val=` (nothing after `=`) means an empty string or list where the field is one, not null."""
    key, _, value = override.partition("=")
    if value.strip():
        return override
    from omegaconf import OmegaConf

    current = OmegaConf.select(base, key.strip(), default=None)
    if isinstance(current, str):
        return f"{key}=''"
    return f"{key}=[]" if OmegaConf.is_list(current) else override


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for saving next to checkpoints)."""
    if not is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass, got {type(cfg).__name__}")
    return asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.structured(cfg), Path(path))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    msg = text[0] if text else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


__all__ = [
    "LatentConfig",
    "ProjectorKind",
    "LatentInput",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "LoraConfig",
    "AlignConfig",
    "CheckpointConfig",
    "LogConfig",
    "SFTConfig",
    "SFTMode",
    "VLPOParams",
    "VLPOConfig",
    "load_config",
    "save_config",
    "to_dict",
    "field",
]
