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
A curriculum raises K in stages; with `replace_reasoning` (Coconut) the answer is the record's
written reasoning and stage s leaves its first s steps to the latents. The same entry point runs
stage-0 pretraining (`plain` on describe records). Auxiliary losses
(`medlvr.train.auxiliary`; stage 0's visual-token probe is one) add their terms,
batch fields and metrics through one interface, so this loop names none of them. Model
set-up, accelerator, logger, validation, checkpoints and export: `medlvr.train.setup`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, set_seed

from medlvr.config import SFTConfig, save_config
from medlvr.data.collate import VQACollator
from medlvr.data.prompts import written_reasoning
from medlvr.data.roi import hop_of_steps, pool_targets, roi_hops
from medlvr.data.schema import VQASample, read_jsonl
from medlvr.errors import MedlvrError
from medlvr.model.files import model_folder
from medlvr.model.latent import LatentVLM
from medlvr.rundir import holds_run_folder
from medlvr.stop import StopSignals
from medlvr.train import checkpoint as ckpt
from medlvr.train import setup, sharding
from medlvr.train.auxiliary import AuxiliaryLoss, auxiliary_losses
from medlvr.train.data import SampleStream, TrainSet, load_image, load_train_set, roi_targets
from medlvr.train.losses import alignment_loss, alignment_mask, pad_tokens, sample_mean_ce
from medlvr.train.optim import build_optimizer, build_scheduler
from medlvr.train.setup import TrainResult, validation_accuracy

SFTResult = TrainResult  # what `run_sft` returns


# ---------------------------------------------------------------------------- checks before compute


def check_config(cfg: SFTConfig) -> TrainSet:
    """Everything that can be checked without a model: paths, data records, ROI availability."""
    if not cfg.model.path:
        raise MedlvrError(
            "model.path is not set (a model folder, e.g. from `medlvr model init-tiny`)"
        )
    # A Hub id is fetched here, before the data are read.
    model_folder(cfg.model.path, allow_pickle=cfg.model.allow_pickle, setting="model.path")
    setup.check_data_files(cfg, "training JSONL files")
    if cfg.model.finetune == "lora" and cfg.model.freeze_language:
        warnings.warn(
            "model.freeze_language has no effect with LoRA (the backbone is frozen anyway)",
            stacklevel=2,
        )
    if (
        cfg.model.freeze_vision
        and cfg.model.freeze_merger
        and cfg.model.freeze_language
        and cfg.model.finetune == "full"
        and cfg.latent.projector in ("none", "norm")
        and cfg.mode == "plain"
    ):
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
        warnings.warn(
            "some training records have no image: they get no alignment term", stacklevel=2
        )
    if cfg.replace_reasoning and not any(s.meta.get("reasoning") for s in data.samples):
        raise MedlvrError(
            "replace_reasoning hides written reasoning steps, but no training record has them "
            "(`meta.reasoning`, e.g. the synthetic chain questions)"
        )
    return data


def build_model(cfg: SFTConfig, resume_dir: Path | None) -> LatentVLM:
    """The model `setup.build_model` builds for this mode, at the run's final K.

    The projector trains whenever it has parameters and is used (K > 0; with pause inputs
    only the ROI alignment reads it); the pause inputs train whenever there are latent steps.
    """
    latent = dataclasses.replace(cfg.latent, steps=cfg.latent_steps)
    pause = cfg.latent.input == "pause"
    return setup.build_model(cfg, latent, resume_dir, answer_tokens=cfg.data.max_answer_tokens,
                             train_projector=cfg.mode != "plain" and (not pause or cfg.mode in ("roi", "roi_direct")),
                             train_pause=cfg.mode not in ("plain", "roi_direct"))  # fmt: skip


# ---------------------------------------------------------------------------- batches


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batch j of this process, counted from the data position the run starts at.

    `target(step, sample)` rewrites a sample's answer for the optimizer step it trains in
    (the reasoning curriculum's stage); None trains every record on its own answer.
    """

    def __init__(self, data: TrainSet, stream: SampleStream, collate: Any, start: int, n: int, batch: int, world: int, rank: int,
                 *, first_step: int = 0, grad_accum: int = 1, target: Callable[[int, VQASample], VQASample] | None = None):  # fmt: skip
        self.data, self.stream, self.collate = data, stream, collate
        self.start, self.n, self.batch, self.world, self.rank = start, n, batch, world, rank
        self.first_step, self.grad_accum, self.target = first_step, grad_accum, target

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> dict[str, Any]:
        pos = self.start + j * self.batch * self.world + self.rank * self.batch
        samples = [self.data.samples[i] for i in self.stream.take(pos, self.batch)]
        if self.target is not None:
            step = self.first_step + j // self.grad_accum
            samples = [self.target(step, s) for s in samples]
        return self.collate(samples, images=[[load_image(p) for p in s.images] for s in samples])


def _keep(batch: Any) -> Any:
    return batch


# ---------------------------------------------------------------------------- the loop


@holds_run_folder(lambda args: args["cfg"].output_dir, "output_dir")  # one run writes it at a time
def run_sft(
    cfg: SFTConfig, *, on_step: Callable[[dict[str, Any]], None] | None = None
) -> TrainResult:
    """Train `cfg` and export the model to `output_dir/final`; see the module docstring for the loss.

    `on_step(row)` is called on every process after each optimizer step (after any
    checkpoint due at that step), with the step's metrics: a live hook for notebooks
    and demos. An exception raised there stops the run as a crash would.
    """
    data = check_config(cfg)  # every configuration error surfaces here, before any compute
    val_samples = read_jsonl(cfg.data.val)[: cfg.data.val_samples or None] if cfg.data.val else []

    accelerator = setup.open_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    if accelerator.distributed_type == DistributedType.DEEPSPEED and cfg.grad_accum > 1:
        # DeepSpeed steps inside backward and rescales by its own accumulation count; this
        # loop accumulates explicitly, so the two would fight. Raise batch_size instead.
        raise MedlvrError(
            "with DeepSpeed use grad_accum=1 (raise batch_size or the number of GPUs instead)"
        )
    out_dir = Path(cfg.output_dir)
    resume_dir = ckpt.start_or_resume(accelerator, cfg)  # refuses a run it would overwrite or mix
    global_batch = cfg.batch_size * world * cfg.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data.samples) / global_batch))
    done = ckpt.recorded_result(out_dir, resume_dir, total_steps)
    if done is not None:  # resuming a finished run is a no-op (no model load, nothing rewritten)
        return TrainResult(out_dir, Path(done["final_model"]), done["steps"], done["metrics"])

    set_seed(cfg.seed)
    vlm = build_model(cfg, resume_dir)
    aux = auxiliary_losses(cfg, data.samples, vlm.hidden_size, resume_dir)
    sharding.shard(
        vlm, cfg, accelerator, plain=lambda: build_model(cfg, None)
    )  # model.sharding=fsdp2
    named = [
        *vlm.named_parameters(),
        *(p for a in aux for p in a.module.named_parameters(prefix=f"{a.name}.")),
    ]
    optimizer = build_optimizer(named, cfg.optim)
    scheduler = build_scheduler(optimizer, total_steps, cfg.optim)
    model, *aux_modules, optimizer = sharding.prepare(
        accelerator, vlm, *(a.module for a in aux), optimizer
    )
    vlm = accelerator.unwrap_model(model)

    step, pos = 0, 0  # optimizer steps done; samples consumed by all processes together
    last_row: dict[str, Any] = {}
    if resume_dir is not None:  # last_row: what the export reports if no step is left to run
        step, pos, last_row = ckpt.resume_training(
            accelerator,
            resume_dir,
            optimizer,
            scheduler,
            {"global_batch": global_batch},
            sharding.state_of(cfg, vlm, optimizer),
        )
    else:
        torch.manual_seed(cfg.seed + 1000 * rank)  # dropout streams differ per process

    stream = SampleStream(data.source, cfg.seed, cfg.data.weights)
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=True, with_rois=cfg.uses_rois,
                          image_loader=load_image, max_answer_tokens=cfg.data.max_answer_tokens,
                          sample_fields=_sample_fields(cfg, aux))  # fmt: skip
    target = (
        functools.partial(_curriculum_target, cfg, total_steps) if cfg.replace_reasoning else None
    )
    micro = _MicroBatches(data, stream, collate, pos, (total_steps - step) * cfg.grad_accum, cfg.batch_size, world, rank,
                          first_step=step, grad_accum=cfg.grad_accum, target=target)  # fmt: skip
    loader = iter(
        torch.utils.data.DataLoader(
            micro, batch_size=None, num_workers=cfg.data.num_workers, collate_fn=_keep
        )
    )

    log = setup.Logger(accelerator, out_dir, cfg.log, label=f"sft[{cfg.mode}]", info=lambda row: _progress_line(row, aux),
                       resume_step=step if resume_dir is not None else 0)  # fmt: skip
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    lam = cfg.align.weight if cfg.uses_rois else 0.0
    history: list[dict[str, Any]] = []
    start_step = step

    def save(metrics: dict[str, Any]) -> None:
        """A resumable checkpoint at the current step and data position."""
        extra = {a.name: accelerator.unwrap_model(m).state_dict() for a, m in zip(aux, aux_modules)}
        setup.save(cfg, accelerator, model, vlm, optimizer, scheduler, step=step,
                   trainer_state={"samples_seen": pos, "global_batch": global_batch, "metrics": metrics}, extra=extra or None)  # fmt: skip

    t_window, n_window = time.perf_counter(), 0
    log.start(total_steps, step)
    signals = StopSignals()  # SIGTERM/SIGINT: a checkpoint at the next step boundary, then stop
    try:
        while step < total_steps:
            k = _steps_at(cfg, step, total_steps)
            batches = [next(loader) for _ in range(cfg.grad_accum)]
            # [B] per micro-batch: the samples whose alignment term counts, and R, their count over the step
            aligned: list[torch.Tensor | None] = (
                [_aligned(b, vlm.image_token_id, cfg.align.kind) for b in batches]
                if lam
                else [None] * len(batches)
            )
            n_roi = (
                _aligned_samples([a for a in aligned if a is not None], accelerator) if lam else 0
            )
            sums = {
                "ce": 0.0,
                "align": 0.0,
                "samples": 0.0,
            }  # this process's sums over the step's micro-batches
            gold = _gold_at(cfg, step, total_steps)
            for m, (batch, align_mask) in enumerate(zip(batches, aligned)):
                sync = m == cfg.grad_accum - 1
                with accelerator.no_sync(model) if not sync else nullcontext():
                    with accelerator.autocast():
                        ce, al, fwd = _losses(cfg, model, vlm, batch, k, align_mask, gold)
                        terms = [
                            a.loss(module, fwd, batch) for a, module in zip(aux, aux_modules)
                        ]  # ([B], named sums)
                    loss = (
                        ce.sum() + sum(a.weight * t.sum() for a, (t, _) in zip(aux, terms))
                    ) / global_batch
                    if lam and n_roi:
                        loss = loss + lam * al.sum() / n_roi
                    accelerator.backward(
                        loss * world
                    )  # DDP averages over processes; the loss is a global sum
                sums["ce"] += float(ce.detach().sum())
                sums["align"] += float(al.detach().sum())
                sums["samples"] += len(ce)
                for _, named_sums in terms:
                    for key, val in named_sums.items():
                        sums[key] = sums.get(key, 0.0) + val
            grad_norm = (
                sharding.clip_grad_norm_(accelerator, model, cfg.optim.max_grad_norm)
                if cfg.optim.max_grad_norm > 0
                else None
            )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pos += global_batch
            n_window += global_batch
            totals = setup.reduce_sums(accelerator, sums)
            row = {
                "step": step, "loss": totals["ce"] / totals["samples"], "ce": totals["ce"] / totals["samples"],
                "align": totals["align"] / n_roi if lam and n_roi else None, "lr": lr, "latent_steps": k,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "epoch": pos / len(data.samples), "samples_seen": pos,
            }  # fmt: skip
            if row["align"] is not None:
                row["loss"] = row["ce"] + lam * row["align"]
            for a in aux:
                row.update(a.metrics(totals))
            now = time.perf_counter()
            row["samples_per_s"] = n_window / max(now - t_window, 1e-9)
            if step % cfg.log.every == 0 or step == total_steps:
                t_window, n_window = now, 0
            if (
                cfg.log.val_every
                and val_samples
                and step % cfg.log.val_every == 0
                and step < total_steps
            ):
                row["val_accuracy"] = validation_accuracy(
                    vlm, val_samples, latent_steps=k, batch_size=cfg.log.val_batch_size,
                    max_new_tokens=cfg.log.val_max_new_tokens, accelerator=accelerator,
                )  # fmt: skip
            last_row = row
            if step % cfg.log.every == 0 or step == total_steps or "val_accuracy" in row:
                history.append(row)
                log.write(row)
            log.advance(row)
            stop = step < total_steps and signals.requested(accelerator)
            if stop or (
                cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total_steps
            ):
                save(row)
            if stop:
                raise signals.stopped(
                    f"checkpoint {ckpt.step_dir(out_dir, step)} saved; continue with --resume"
                )
            if on_step is not None:
                on_step(row)
    finally:
        signals.restore()
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
    final = setup.export(cfg, accelerator, vlm, log, step, metrics)
    return TrainResult(out_dir, final, step, metrics, history, vlm)


def _progress_line(row: dict[str, Any], aux: list[AuxiliaryLoss]) -> str:
    """The progress bar's metrics line."""
    info = f"loss {row['loss']:.4f}"
    if row.get("align") is not None:
        info += f" align {row['align']:.4f}"
    info += "".join(a.progress(row) for a in aux)
    info += f" lr {row['lr']:.2e} {row['samples_per_s']:.1f} samples/s"
    if row.get("val_accuracy") is not None:
        info += f" val {row['val_accuracy']:.3f}"
    return info


def _stage_at(cfg: SFTConfig, step: int, total: int) -> int:
    """The curriculum stage (0-based) of optimizer step `step`: stages of equal length over the run."""
    return (
        min(step * len(cfg.curriculum) // total, len(cfg.curriculum) - 1) if cfg.curriculum else 0
    )


def _curriculum_target(cfg: SFTConfig, total: int, step: int, sample: VQASample) -> VQASample:
    """The sample written out with its first s reasoning steps left to the latents, at stage s."""
    return written_reasoning(sample, hidden=_stage_at(cfg, step, total))


def _steps_at(cfg: SFTConfig, step: int, total: int) -> int:
    """K at optimizer step `step`: the curriculum stage's, else the configured K."""
    return cfg.curriculum[_stage_at(cfg, step, total)] if cfg.curriculum else cfg.latent_steps


def _losses(cfg: SFTConfig, model: Any, vlm: Any, batch: dict[str, Any], k: int,
            aligned: torch.Tensor | None, gold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, Any]:  # fmt: skip
    """Per-sample answer CE `[B]`, alignment loss `[B]` (zero without ROI) and the forward.

    `aligned [B]`: the samples whose alignment term counts (`_aligned`; None in the modes without ROI).
    `gold`: the probability that a hop's latent steps are fed their gold targets (`gold_latents`).
    """
    if cfg.mode == "teacher_forced":
        # Targets first (no grad: they are detached anyway), then one parallel pass with them as latents.
        per_sample = vlm.visual_tokens(batch)
        targets, mask, negatives = _roi_targets(cfg, per_sample, batch, k, fed=True)
        # Samples without ROI get the whole image pooled into K chunks as latent inputs.
        fill = torch.stack([_pool_all(v.detach().float(), k) for v in per_sample])
        inputs = torch.where(mask[:, None, None], targets, fill)
        fwd = model(batch, latent_inputs=inputs)
    elif gold > 0 and k > 0:
        given = _gold_given(cfg, vlm, batch, k, gold)
        fwd = model(batch, latent_inputs=given[0], latent_given=given[1])
        targets, mask, negatives = _roi_targets(cfg, fwd.visual_tokens, batch, k)
    else:
        fwd = model(batch, latent_steps=k)
        if cfg.mode == "roi":
            targets, mask, negatives = _roi_targets(cfg, fwd.visual_tokens, batch, k)
        elif cfg.mode == "roi_direct":  # one target: the ROI tokens pooled, for the answer position
            targets, mask, negatives = _roi_targets(cfg, fwd.visual_tokens, batch, 1)
    ce = sample_mean_ce(fwd.token_logprobs, batch["answer_mask"].to(fwd.token_logprobs.device))
    if not cfg.uses_rois:
        return ce, torch.zeros_like(ce), fwd
    # proj(h_{k-1}), the outputs at the latent positions: the fed latents, except when teacher-forced or with pause inputs
    latents = fwd.latent_means if cfg.mode != "roi_direct" else fwd.prompt_state[:, None]
    if cfg.align.assign == "first":
        latents, targets = latents[:, :1], targets[:, :1]
    assert aligned is not None  # the ROI modes pass it
    mask = mask & aligned.to(mask.device)  # the ones R counts
    neg, neg_mask = (
        pad_tokens(negatives, latents.shape[-1], latents.device)
        if cfg.align.kind == "infonce"
        else (None, None)
    )
    if cfg.align.kind == "infonce" and cfg.align.negatives == "other_hops":
        neg, neg_mask = _other_hop_negatives(fwd.visual_tokens, batch, latents.shape[1])
    al = alignment_loss(cfg.align.kind, latents, targets, mask, negatives=neg, negatives_mask=neg_mask,
                        temperature=cfg.align.temperature)  # fmt: skip
    return ce, al, fwd


def _aligned(batch: dict[str, Any], image_token_id: int, kind: str) -> torch.Tensor:
    """`[B]` bool: the batch's samples whose alignment term counts (`losses.alignment_mask`).

    A sample's visual tokens are its image tokens in the prompt (one per visual token in every family).
    """
    return alignment_mask(
        batch["roi_index"], (batch["input_ids"] == image_token_id).sum(-1).tolist(), kind
    )


def _aligned_samples(aligned: list[torch.Tensor], accelerator: Any) -> int:
    """R: the samples of the optimizer step (all micro-batches `aligned`, all processes) whose alignment term counts."""
    local = sum(int(a.sum()) for a in aligned)
    if accelerator.num_processes == 1:
        return local
    return int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))


def _roi_targets(
    cfg: SFTConfig, visual: Any, batch: dict[str, Any], k: int, fed: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The batch's alignment targets under `align.assign` (`train.data.roi_targets`).

    `fed`: the K latent inputs of teacher forcing, raster chunks when only the first latent is aligned.
    """
    assign = "raster" if fed and cfg.align.assign == "first" else cfg.align.assign
    return roi_targets(
        visual, batch["roi_index"], k, assign=assign, hop_index=batch.get("roi_hop_index")
    )


def _gold_at(cfg: SFTConfig, step: int, total: int) -> float:
    """Scheduled sampling's probability at optimizer step `step` (0-based): linear from
    `gold_latents` to `gold_latents_end` at the last step."""
    if not cfg.gold_latents:
        return 0.0
    return cfg.gold_latents + (cfg.gold_latents_end - cfg.gold_latents) * step / max(total - 1, 1)


def _gold_given(
    cfg: SFTConfig, vlm: Any, batch: dict[str, Any], k: int, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scheduled sampling: the gold chain targets `[B, K, d]` and the steps fed them `[B, K]`,
    each hop of each sample with ROIs drawn with probability `p`."""
    visual = vlm.visual_tokens(batch)  # no grad: the targets are detached anyway
    targets, mask, _ = _roi_targets(cfg, visual, batch, k, fed=True)
    given = torch.zeros(len(visual), k, dtype=torch.bool)
    for i, hops in enumerate(batch["roi_hop_index"]):
        if bool(mask[i]) and hops:
            coin = torch.rand(len(hops)) < p
            given[i] = coin[torch.tensor(hop_of_steps(k, len(hops)))]
    return targets, given


def _other_hop_negatives(
    visual: list[torch.Tensor], batch: dict[str, Any], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every visual token as a negative `[B, N, d]`, masked per step `[B, K, N]`: all but the
    ROI tokens of the step's own hop (`align.negatives=other_hops`)."""
    d, dev = visual[0].shape[-1], visual[0].device
    neg, real = pad_tokens([v.detach() for v in visual], d, dev)
    mask = real[:, None, :].repeat(1, k, 1)
    for i, hops in enumerate(batch["roi_hop_index"]):
        if not hops:  # no ROI: every token stays a negative (the sample is not aligned anyway)
            continue
        for step, j in enumerate(hop_of_steps(k, len(hops))):
            mask[i, step, hops[j].to(dev)] = False
    return neg, mask


def _pool_all(tokens: torch.Tensor, k: int) -> torch.Tensor:
    return pool_targets(tokens, torch.arange(tokens.shape[0], device=tokens.device), k)


__all__ = ["run_sft", "check_config", "build_model", "validation_accuracy", "SFTResult"]


def _sample_fields(cfg: SFTConfig, aux: Sequence[Any]) -> dict[str, Any]:
    """Per-sample batch fields the collator computes: the auxiliary losses' and, under chain
    alignment only, each sample's ROI token indices per hop (`roi_hop_index`)."""
    fields = {k: f for a in aux for k, f in a.sample_fields.items()}
    return fields | setup.hop_fields(cfg.uses_rois and cfg.align.assign == "chain")
