"""Stage 1, ROI-supervised fine-tuning: `run_sft(cfg)`, one explicit loop on accelerate.

Per optimizer step (global batch G = batch_size x processes x grad_accum samples):

    loss = sum_i CE_i / G  +  lambda * sum_{i aligned} align_i / R

CE_i is sample i's mean answer cross-entropy, align_i its alignment loss between the
latent states and the K pooled ROI targets (detached), R the number of samples of the
step whose alignment term carries a signal (`losses.alignment_mask`: an ROI on some
visual tokens, and for InfoNCE not on all). Normalising by step-wide counts (G known
before the step, R counted over the step's micro-batches on every process before the
first backward) makes one process, several processes and any gradient accumulation
give the same gradient up to float reduction order.

Modes: `plain` (K = 0), `latent` (K steps, CE only), `roi` (K steps + alignment),
`teacher_forced` (ROI targets fed as the latent inputs in one parallel pass; the
alignment trains the latents the model itself predicts at those positions).
The same entry point runs stage-0 pretraining (`plain` on describe records).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlvr.config import SFTConfig
from medlvr.data.roi import roi_hops
from medlvr.data.schema import VQASample, read_jsonl
from medlvr.errors import MedlvrError
from medlvr.rundir import check_launch, holds_run_folder
from medlvr.train.data import SampleStream, TrainSet, check_files, load_image, load_train_set, roi_targets
from medlvr.train.losses import alignment_loss, alignment_mask, pad_tokens, sample_mean_ce


@dataclass
class SFTResult:
    """What `run_sft` returns."""

    output_dir: Path
    final_model: Path  # the export: loads in LatentVLM.from_pretrained, `medlvr predict`, transformers
    steps: int
    metrics: dict[str, Any]  # the last logged training row, plus `val_accuracy` when validated
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged row (this process)
    model: Any = None  # the trained LatentVLM in memory (LoRA merged when the export merged it)


# ---------------------------------------------------------------------------- checks before compute


def check_config(cfg: SFTConfig) -> TrainSet:
    """Everything that can be checked without a model: paths, data records, ROI availability."""
    if not cfg.model.path:
        raise MedlvrError("model.path is not set (a model folder, e.g. from `medlvr model init-tiny`)")
    if not Path(cfg.model.path).is_dir():
        raise MedlvrError(f"model.path is not a folder: {cfg.model.path}")
    if not cfg.data.train:
        raise MedlvrError("data.train is empty: give one or more training JSONL files")
    check_files(cfg.data.train, "training data")
    if cfg.data.val:
        check_files([cfg.data.val], "validation data")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.train):
        raise MedlvrError(f"data.weights has {len(cfg.data.weights)} entries for {len(cfg.data.train)} data.train files")
    if cfg.model.finetune == "lora" and cfg.model.freeze_language:
        warnings.warn("model.freeze_language has no effect with LoRA (the backbone is frozen anyway)", stacklevel=2)
    if cfg.model.freeze_vision and cfg.model.freeze_merger and cfg.model.freeze_language and cfg.model.finetune == "full" and cfg.latent.projector in ("none", "norm") and cfg.mode == "plain":
        raise MedlvrError("everything is frozen: nothing would train")
    data = load_train_set(cfg.data.train, cfg.data.max_samples)
    if cfg.uses_rois and not data.has_roi.any():
        raise MedlvrError(
            f"mode {cfg.mode!r} uses the ROI alignment (align.weight={cfg.align.weight}) but no training record "
            "has ROIs: use mode=latent, or data with `rois`"
        )
    if cfg.uses_rois:
        for s in data.samples:
            roi_hops(s)  # malformed multi-hop metadata fails here, not mid-run in the collator
    if any(not s.images for s in data.samples) and cfg.uses_rois:
        warnings.warn("some training records have no image: they get no alignment term", stacklevel=2)
    return data


# ---------------------------------------------------------------------------- model set-up


def build_model(cfg: SFTConfig, resume_dir: Path | None) -> Any:
    """LatentVLM in fp32 with freezing, LoRA and checkpointing applied; weights from `resume_dir` if given."""
    from medlvr.model.latent import LatentVLM

    latent = dataclasses.replace(cfg.latent, steps=cfg.latent_steps)
    full_resume = resume_dir is not None and cfg.model.finetune == "full"
    src = resume_dir / "model" if full_resume else Path(cfg.model.path)
    # Trained weights stay fp32 (master copies; autocast computes in bf16). A LoRA run keeps
    # the frozen base in bf16 when autocasting to bf16 anyway: half the weight memory.
    lora_bf16 = cfg.model.finetune == "lora" and _precision(cfg.model.precision) == "bf16"
    vlm = LatentVLM.from_pretrained(src, latent, dtype=torch.bfloat16 if lora_bf16 else torch.float32,
                                    allow_pickle=cfg.model.allow_pickle)
    vlm.check_length(0, cfg.latent_steps, cfg.data.max_answer_tokens)  # a K the model cannot hold, before any file
    frozen = {g for g, on in (("vision", cfg.model.freeze_vision), ("merger", cfg.model.freeze_merger),
                              ("language", cfg.model.freeze_language)) if on}  # fmt: skip
    for name, p in vlm.backbone.named_parameters():
        p.requires_grad_(vlm.adapter.parameter_group(name) not in frozen)
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing: no need for inputs that require grad (LoRA, frozen embeddings).
        enable = getattr(vlm.backbone, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            vlm.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.finetune == "lora":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        # The latent tokens' rows train through peft's trainable tokens: 3 rows, not the whole embedding.
        latent_rows = [vlm.latent_start_id, vlm.latent_pad_id, vlm.latent_end_id] if cfg.lora.train_latent_tokens else None
        peft_cfg = PeftLoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules), modules_to_save=list(cfg.lora.modules_to_save) or None,
            trainable_token_indices=latent_rows,
        )  # fmt: skip
        try:
            with warnings.catch_warnings():
                # Not ours: peft's PeftModel.__init__ (0.21) reads `model.is_gradient_checkpointing`,
                # which transformers 5.24 deprecated in favour of `is_activation_checkpointing`.
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils")
                vlm.backbone = get_peft_model(vlm.backbone, peft_cfg)
        except ValueError as err:
            raise MedlvrError(f"LoRA: {err}") from None
        if resume_dir is not None:
            from medlvr.train.checkpoint import load_adapter_files

            load_adapter_files(vlm, resume_dir)
    vlm.projector.float()  # trainable: fp32 master weights (peft keeps adapters in fp32 too)
    # The projector trains whenever it has parameters and is used (K > 0; with pause inputs
    # only the ROI alignment reads it); unused parameters would also break DDP's gradient reduction.
    for p in vlm.projector.parameters():
        p.requires_grad_(cfg.mode != "plain" and (vlm.pause is None or cfg.mode == "roi"))
    if vlm.pause is not None:
        vlm.pause.float().requires_grad_(cfg.mode != "plain")
    vlm.train()
    return vlm


def _precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return name


# ---------------------------------------------------------------------------- batches


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batch j of this process, counted from the data position the run starts at."""

    def __init__(self, data: TrainSet, stream: SampleStream, collate: Any, start: int, n: int, batch: int, world: int, rank: int):
        self.data, self.stream, self.collate = data, stream, collate
        self.start, self.n, self.batch, self.world, self.rank = start, n, batch, world, rank

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> dict[str, Any]:
        pos = self.start + j * self.batch * self.world + self.rank * self.batch
        samples = [self.data.samples[i] for i in self.stream.take(pos, self.batch)]
        return self.collate(samples, images=[[load_image(p) for p in s.images] for s in samples])


def _keep(batch: Any) -> Any:
    return batch


# ---------------------------------------------------------------------------- validation


@torch.no_grad()
def validation_accuracy(
    vlm: Any, samples: Sequence[VQASample], *, latent_steps: int, batch_size: int = 16, max_new_tokens: int = 16,
    accelerator: Any = None,
) -> float:
    """Accuracy of greedy answers under the evaluation scorer (`medlvr.eval.metrics.score`).

    With an accelerator the samples are sharded over processes and the counts summed.
    """
    from medlvr.data.collate import VQACollator
    from medlvr.eval.metrics import score

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(samples)[rank::world]
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    was_training = vlm.training
    vlm.eval()
    correct = 0
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        batch = collate(chunk, images=[[load_image(p) for p in s.images] for s in chunk])
        with accelerator.autocast() if accelerator is not None else _nullcontext():
            out = vlm.generate(batch, latent_steps, max_new_tokens=max_new_tokens)
        correct += sum(score(s, text).correct for s, text in zip(chunk, out.texts))
    vlm.train(was_training)
    counts = torch.tensor([correct, len(mine)], dtype=torch.float64, device=vlm.device)
    if accelerator is not None and world > 1:
        counts = accelerator.reduce(counts, "sum")
    return float(counts[0] / counts[1].clamp_min(1))


# ---------------------------------------------------------------------------- the loop


@holds_run_folder(lambda args: args["cfg"].output_dir, "output_dir")  # one run writes it at a time
def run_sft(cfg: SFTConfig, *, on_step: Callable[[dict[str, Any]], None] | None = None) -> SFTResult:
    """Train `cfg` and export the model to `output_dir/final`; see the module docstring for the loss.

    `on_step(row)` is called on every process after each optimizer step (after any
    checkpoint due at that step), with the step's metrics: a live hook for notebooks
    and demos. An exception raised there stops the run as a crash would.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from medlvr.data.collate import VQACollator
    from medlvr.train import checkpoint as ckpt
    from medlvr.train.optim import build_optimizer, build_scheduler

    torch.set_flush_denormal(True)  # denormals made early CPU steps ~7x slower (NOTES-synthetic.md)
    data = check_config(cfg)  # every configuration error surfaces here, before any compute
    val_samples = read_jsonl(cfg.data.val)[: cfg.data.val_samples or None] if cfg.data.val else []

    accelerator = Accelerator(mixed_precision=_precision(cfg.model.precision), cpu=not torch.cuda.is_available())
    check_launch(accelerator.num_processes, accelerator.distributed_type)  # N lone copies would share output_dir
    world, rank = accelerator.num_processes, accelerator.process_index
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and cfg.grad_accum > 1:
        # DeepSpeed steps inside backward and rescales by its own accumulation count; this
        # loop accumulates explicitly, so the two would fight. Raise batch_size instead.
        raise MedlvrError("with DeepSpeed use grad_accum=1 (raise batch_size or the number of GPUs instead)")
    out_dir = Path(cfg.output_dir)
    resume_dir = ckpt.start_or_resume(accelerator, cfg)  # refuses a run it would overwrite or mix
    global_batch = cfg.batch_size * world * cfg.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data.samples) / global_batch))
    done = ckpt.recorded_result(out_dir, resume_dir, total_steps)
    if done is not None:  # resuming a finished run is a no-op (no model load, nothing rewritten)
        return SFTResult(out_dir, Path(done["final_model"]), done["steps"], done["metrics"])

    set_seed(cfg.seed)
    vlm = build_model(cfg, resume_dir)
    probe, labeler = _build_probe(cfg, data, vlm.hidden_size, resume_dir)
    named = [*vlm.named_parameters(), *(probe.named_parameters(prefix="probe.") if probe is not None else [])]
    optimizer = build_optimizer(named, cfg.optim)
    scheduler = build_scheduler(optimizer, total_steps, cfg.optim)
    if probe is not None:
        model, probe_model, optimizer = accelerator.prepare(vlm, probe, optimizer)
    else:
        (model, optimizer), probe_model = accelerator.prepare(vlm, optimizer), None
    vlm = accelerator.unwrap_model(model)

    step, pos = 0, 0  # optimizer steps done; samples consumed by all processes together
    last_row: dict[str, Any] = {}
    if resume_dir is not None:  # last_row: what the export reports if no step is left to run
        step, pos, last_row = ckpt.resume_training(accelerator, resume_dir, optimizer, scheduler, {"global_batch": global_batch})
    else:
        torch.manual_seed(cfg.seed + 1000 * rank)  # dropout streams differ per process

    stream = SampleStream(data.source, cfg.seed, cfg.data.weights)
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=True, with_rois=cfg.uses_rois,
                          image_loader=load_image, max_answer_tokens=cfg.data.max_answer_tokens,
                          token_labeler=labeler)  # fmt: skip
    micro = _MicroBatches(data, stream, collate, pos, (total_steps - step) * cfg.grad_accum, cfg.batch_size, world, rank)
    loader = iter(torch.utils.data.DataLoader(micro, batch_size=None, num_workers=cfg.data.num_workers, collate_fn=_keep))

    log = _Logger(cfg, accelerator, out_dir, resume_step=step if resume_dir is not None else 0)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        from medlvr.config import save_config

        save_config(cfg, out_dir / "config.yaml")
    lam = cfg.align.weight if cfg.uses_rois else 0.0
    history: list[dict[str, Any]] = []
    start_step = step

    def save(metrics: dict[str, Any]) -> None:
        """A resumable checkpoint at the current step and data position."""
        ckpt.save_checkpoint(
            accelerator, model, vlm, optimizer, scheduler, output_dir=out_dir, step=step,
            trainer_state={"samples_seen": pos, "global_batch": global_batch, "metrics": metrics},
            config=cfg, lora=cfg.model.finetune == "lora", save_optimizer=cfg.checkpoint.save_optimizer,
            keep_last=cfg.checkpoint.keep_last,
            extra={"probe": accelerator.unwrap_model(probe_model).state_dict()} if probe_model is not None else None,
        )  # fmt: skip

    t_window, n_window = time.perf_counter(), 0
    log.start(total_steps, step)
    try:
        while step < total_steps:
            k = _steps_at(cfg, step, total_steps)
            batches = [next(loader) for _ in range(cfg.grad_accum)]
            n_roi = _aligned_samples(batches, vlm.image_token_id, cfg.align.kind, accelerator) if lam else 0
            # CE sum, align sum, samples, ROI samples, probe sum, probe-right and foreground tokens, probed samples (this process)
            sums = torch.zeros(8, dtype=torch.float64)
            for m, batch in enumerate(batches):
                sync = m == cfg.grad_accum - 1
                ctx = accelerator.no_sync(model) if not sync else _nullcontext()
                with ctx:
                    with accelerator.autocast():
                        ce, al, roi, fwd = _losses(cfg, model, vlm, batch, k)
                        pr, hits = probe_model(fwd.visual_tokens, batch["token_labels"]) if probe_model is not None else (torch.zeros_like(ce), torch.zeros(3))
                    loss = (ce.sum() + cfg.probe.weight * pr.sum()) / global_batch
                    if lam and n_roi:
                        loss = loss + lam * al.sum() / n_roi
                    accelerator.backward(loss * world)  # DDP averages over processes; the loss is a global sum
                sums += torch.tensor([float(ce.detach().sum()), float(al.detach().sum()), len(ce), float(roi.sum()),
                                      float(pr.detach().sum()), *hits.tolist()], dtype=torch.float64)  # fmt: skip
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm) if cfg.optim.max_grad_norm > 0 else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pos += global_batch
            n_window += global_batch
            totals = accelerator.reduce(sums.to(accelerator.device), "sum").cpu() if world > 1 else sums
            row = {
                "step": step, "loss": float(totals[0] / totals[2]), "ce": float(totals[0] / totals[2]),
                "align": float(totals[1] / n_roi) if lam and n_roi else None, "lr": lr, "latent_steps": k,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "epoch": pos / len(data.samples), "samples_seen": pos,
            }  # fmt: skip
            if row["align"] is not None:
                row["loss"] = row["ce"] + lam * row["align"]
            if probe is not None:
                row["probe"] = float(totals[4] / totals[7]) if totals[7] else None  # mean over probed samples
                row["probe_acc"] = float(totals[5] / totals[6]) if totals[6] else None  # foreground tokens only
            now = time.perf_counter()
            row["samples_per_s"] = n_window / max(now - t_window, 1e-9)
            if step % cfg.log.every == 0 or step == total_steps:
                t_window, n_window = now, 0
            if cfg.log.val_every and val_samples and step % cfg.log.val_every == 0 and step < total_steps:
                row["val_accuracy"] = validation_accuracy(
                    vlm, val_samples, latent_steps=k, batch_size=cfg.log.val_batch_size,
                    max_new_tokens=cfg.log.val_max_new_tokens, accelerator=accelerator,
                )  # fmt: skip
            last_row = row
            if step % cfg.log.every == 0 or step == total_steps or "val_accuracy" in row:
                history.append(row)
                log.write(row)
            log.advance(row)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total_steps:
                save(row)
            if on_step is not None:
                on_step(row)
    finally:
        log.stop()

    # The last step is a checkpoint too (so `--resume` of a finished run is a no-op) ...
    if step > start_step:  # (else the resumed checkpoint is this step's: do not overwrite it)
        save(last_row)
    metrics = dict(last_row)
    if val_samples:
        metrics["val_accuracy"] = validation_accuracy(
            vlm, val_samples, latent_steps=cfg.latent_steps, batch_size=cfg.log.val_batch_size,
            max_new_tokens=cfg.log.val_max_new_tokens, accelerator=accelerator,
        )  # fmt: skip
        log.write({"step": step, "val_accuracy": metrics["val_accuracy"], "final": True})
    # ... and the export goes last (merging LoRA changes the model in place).
    final = out_dir / "final"
    if accelerator.is_main_process:
        ckpt.export_final(vlm, final, lora=cfg.model.finetune == "lora", merge_lora=cfg.checkpoint.merge_lora)
        (out_dir / "result.json").write_text(json.dumps({"steps": step, "metrics": metrics, "final_model": str(final)}, indent=2))
    accelerator.wait_for_everyone()
    log.close()
    return SFTResult(out_dir, final, step, metrics, history, vlm)


def _steps_at(cfg: SFTConfig, step: int, total: int) -> int:
    """K at optimizer step `step`: the curriculum stage's, else the configured K."""
    if cfg.curriculum:
        return cfg.curriculum[min(step * len(cfg.curriculum) // total, len(cfg.curriculum) - 1)]
    return cfg.latent_steps


def _losses(cfg: SFTConfig, model: Any, vlm: Any, batch: dict[str, Any], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Per-sample answer CE `[B]`, alignment loss `[B]` (zero without ROI), the ROI mask `[B]`, and the forward."""
    if cfg.mode == "teacher_forced":
        # Targets first (no grad: they are detached anyway), then one parallel pass with them as latents.
        per_sample = vlm.visual_tokens(batch)
        targets, mask, negatives = _roi_targets(cfg, per_sample, batch, k, fed=True)
        # Samples without ROI get the whole image pooled into K chunks as latent inputs.
        fill = torch.stack([_pool_all(v.detach().float(), k) for v in per_sample])
        inputs = torch.where(mask[:, None, None], targets, fill)
        fwd = model(batch, latent_inputs=inputs)
    else:
        fwd = model(batch, latent_steps=k)
        if cfg.mode == "roi":
            targets, mask, negatives = _roi_targets(cfg, fwd.visual_tokens, batch, k)
    ce = sample_mean_ce(fwd.token_logprobs, batch["answer_mask"].to(fwd.token_logprobs.device))
    if cfg.mode not in ("roi", "teacher_forced"):
        return ce, torch.zeros_like(ce), torch.zeros_like(ce, dtype=torch.bool), fwd
    # proj(h_{k-1}), the outputs at the latent positions: the fed latents, except when teacher-forced or with pause inputs
    latents = fwd.latent_means
    if cfg.align.assign == "first":
        latents, targets = latents[:, :1], targets[:, :1]
    mask = mask & _aligned(batch, vlm.image_token_id, cfg.align.kind).to(mask.device)  # the ones R counts
    neg, neg_mask = pad_tokens(negatives, latents.shape[-1], latents.device) if cfg.align.kind == "infonce" else (None, None)
    al = alignment_loss(cfg.align.kind, latents, targets, mask, negatives=neg, negatives_mask=neg_mask,
                        temperature=cfg.align.temperature)  # fmt: skip
    return ce, al, mask, fwd


def _aligned(batch: dict[str, Any], image_token_id: int, kind: str) -> torch.Tensor:
    """`[B]` bool: the batch's samples whose alignment term counts (`losses.alignment_mask`).

    A sample's visual tokens are its image tokens in the prompt (one per visual token in every family).
    """
    return alignment_mask(batch["roi_index"], (batch["input_ids"] == image_token_id).sum(-1).tolist(), kind)


def _aligned_samples(batches: list[dict[str, Any]], image_token_id: int, kind: str, accelerator: Any) -> int:
    """R: the samples of the optimizer step (all micro-batches, all processes) whose alignment term counts."""
    local = sum(int(_aligned(b, image_token_id, kind).sum()) for b in batches)
    if accelerator.num_processes == 1:
        return local
    return int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))


def _roi_targets(cfg: SFTConfig, visual: Any, batch: dict[str, Any], k: int, fed: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The batch's alignment targets under `align.assign` (`train.data.roi_targets`).

    `fed`: the K latent inputs of teacher forcing, raster chunks when only the first latent is aligned.
    """
    assign = "raster" if fed and cfg.align.assign == "first" else cfg.align.assign
    return roi_targets(visual, batch["roi_index"], k, assign=assign, hop_index=batch.get("roi_hop_index"))


def _build_probe(cfg: SFTConfig, data: TrainSet, hidden_size: int, resume_dir: Path | None) -> tuple[Any, Any]:
    """The auxiliary token probe and the collator's token labeler (both None when `probe.weight` is 0)."""
    if not cfg.probe.weight:
        return None, None
    from safetensors.torch import load_file

    from medlvr.train.probe import TokenLabeler, TokenProbe, probe_labels

    labeler = TokenLabeler(cfg.probe.labels or probe_labels(data.samples, cfg.probe.question_types), cfg.probe.question_types)
    probe = TokenProbe(hidden_size, labeler.classes, cfg.probe.position_weight)
    if resume_dir is not None:
        probe.load_state_dict(load_file(resume_dir / "probe.safetensors"))
    return probe, labeler


def _pool_all(tokens: torch.Tensor, k: int) -> torch.Tensor:
    from medlvr.data.roi import pool_targets

    return pool_targets(tokens, torch.arange(tokens.shape[0], device=tokens.device), k)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ---------------------------------------------------------------------------- logging


class _Logger:
    """Progress bar (rich), metrics.jsonl and TensorBoard, on the main process only."""

    def __init__(self, cfg: SFTConfig, accelerator: Any, out_dir: Path, resume_step: int):
        self.main = accelerator.is_main_process
        self.cfg = cfg
        self.path = out_dir / "metrics.jsonl"
        self.bar = None
        self.task = None
        self.tb = None
        if not self.main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():  # drop rows a crashed run wrote after its last checkpoint
            rows = [r for r in self.path.read_text().splitlines() if r.strip() and json.loads(r).get("step", 0) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        elif not resume_step:
            self.path.write_text("")
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step or None)
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only", stacklevel=2)

    def label(self) -> str:
        """The progress bar's name (the VLPO logger overrides it)."""
        return f"sft[{self.cfg.mode}]"

    def start(self, total: int, done: int) -> None:
        if not (self.main and self.cfg.log.progress):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(self.label()), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
        )  # fmt: skip
        self.task = self.bar.add_task("train", total=total, completed=done, info="")
        self.bar.start()

    def info(self, row: dict[str, Any]) -> str:
        """The progress bar's metrics line (the VLPO logger overrides it)."""
        info = f"loss {row['loss']:.4f}"
        if row.get("align") is not None:
            info += f" align {row['align']:.4f}"
        if row.get("probe") is not None:
            info += f" probe {row['probe']:.3f}"
        info += f" lr {row['lr']:.2e} {row['samples_per_s']:.1f} samples/s"
        if row.get("val_accuracy") is not None:
            info += f" val {row['val_accuracy']:.3f}"
        return info

    def advance(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], info=self.info(row))

    def write(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({**row, "time": time.time()}) + "\n")
        if self.tb is not None:
            for key, val in row.items():
                if isinstance(val, (int, float)) and not isinstance(val, bool) and key != "step" and np.isfinite(val):
                    self.tb.add_scalar(f"train/{key}" if key != "val_accuracy" else "val/accuracy", val, row["step"])
            self.tb.flush()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def close(self) -> None:
        self.stop()
        if self.tb is not None:
            self.tb.close()


__all__ = ["run_sft", "check_config", "build_model", "validation_accuracy", "SFTResult"]
