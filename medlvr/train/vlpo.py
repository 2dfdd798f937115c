"""Stage 2, Visual-Latent Policy Optimization: `run_vlpo(cfg)`, one explicit loop on accelerate.

Per step, on every process (B = batch_size prompts, G = vlpo.group_size):

1. rollout: G trajectories per prompt on a shared prefix (`LatentVLM.generate(...,
   group_size=G)`): latent step k samples `z_k ~ N(mu_k, sigma^2 I)`, the answer is
   sampled at temperature T;
2. log-probs: one parallel forward per micro-batch of finished trajectories gives the
   log-probabilities of every latent step (Gaussian, `gaussian_logprob`: per dimension
   or summed, `vlpo.latent_logprob`) and answer token under the rollout policy (`old`), and, with beta > 0, under the
   reference (the starting checkpoint: the adapter disabled under LoRA, else a frozen copy);
3. rewards: the weighted reward functions of `vlpo.rewards` (accuracy is the evaluation
   scorer; ROI evidence under the assignment its name gives, `RewardSet.assign`), then
   group-relative advantages `(r - mean_g) / std_g` (std optional);
4. update: `vlpo.update_epochs` passes over the rollouts, each split into
   `vlpo.mini_batches` optimizer steps, minimising per unit (latent step or token)

       -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3(pi, ref),   r = pi / pi_old,

   with the latent steps' own epsilons (`vlpo.latent_clip_low/high`),

   aggregated per token or per sequence (`vlpo.aggregation`) with normalisers counted
   over the whole optimizer step on all processes, so gradient accumulation and DDP
   sharding give the single-batch gradient.

Dropout is switched off for the whole run (as TRL's GRPO does): the ratio must compare
the same function, so at the first update epoch on fresh rollouts it is exactly 1.
The model set-up (freezing, LoRA), accelerator, validation, checkpoints, export and the
metrics logger are the training wing's shared ones (`medlvr.train.setup`), as are the
optimizer, schedule and data stream (`optim`, `data`); `sft.py` is a sibling, not a base.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn

from medlvr.config import VLPOConfig, save_config
from medlvr.data.collate import VQACollator
from medlvr.data.roi import roi_hops
from medlvr.data.schema import VQASample, read_jsonl
from medlvr.errors import MedlvrError
from medlvr.eval.metrics import accuracy_reward
from medlvr.model.files import model_folder
from medlvr.model.latent import PROJECTOR_FILE, LatentProjector, LatentVLM, read_latent_config
from medlvr.rundir import holds_run_folder
from medlvr.stop import StopSignals
from medlvr.train import checkpoint as ckpt
from medlvr.train import setup, sharding
from medlvr.train.data import SampleStream, TrainSet, load_image, load_train_set
from medlvr.train.losses import kl_k3, policy_loss, policy_normaliser
from medlvr.train.optim import build_optimizer, build_scheduler
from medlvr.train.rewards import RewardContext, RewardSet
from medlvr.train.rollout import (
    Rollouts,
    answer_tensors,
    flat_groups,
    group_advantages,
    latents_are_actions,
    pad_id,
    repeat_rows,
    sample_rollouts,
    trajectory_logprobs,
    unit_mask,
)
from medlvr.train.setup import TrainResult, validation_accuracy

VLPOResult = TrainResult  # what `run_vlpo` returns


# ---------------------------------------------------------------------------- checks and set-up


def check_config(cfg: VLPOConfig) -> TrainSet:
    """Everything checkable before loading a model: paths, records, rewards, the checkpoint's latent set-up."""
    if not cfg.model.path:
        raise MedlvrError(
            "model.path is not set: give the SFT checkpoint with --init (e.g. runs/sft/final)"
        )
    path = model_folder(cfg.model.path, allow_pickle=cfg.model.allow_pickle, setting="model.path")
    recorded = read_latent_config(path)
    if recorded is not None:
        proj = recorded.projector
        if proj != cfg.latent.projector:
            raise MedlvrError(
                f"the checkpoint's latent projector is {proj!r} but latent.projector={cfg.latent.projector!r}: "
                f"its trained projector would be dropped; set latent.projector={proj}"
            )
    if "pause" in (cfg.latent.input, recorded.input if recorded is not None else None):
        # Rollouts would feed the same constants in every trajectory: nothing to explore or to credit.
        raise MedlvrError(
            "VLPO explores the latent steps with Gaussian noise around the fed-back state, but a pause-input model "
            "(latent.input=pause, the pause-token control) feeds learned constants: start VLPO from a "
            "latent.input=hidden checkpoint"
        )
    setup.check_data_files(cfg, "JSONL files of prompts with gold answers")
    rewards = RewardSet(cfg.vlpo.rewards)  # unknown names and bad import paths fail here
    data = load_train_set(cfg.data.train, cfg.data.max_samples)
    if rewards.assign == "chain":
        for s in data.samples:
            roi_hops(s)  # malformed multi-hop metadata fails here, not mid-run in the collator
    return data


def build_model(cfg: VLPOConfig, resume_dir: Path | None) -> LatentVLM:
    """The policy `setup.build_model` builds, with dropout off; the projector trains when the latents are actions."""
    trains_latents = latents_are_actions(
        cfg.latent.steps, cfg.vlpo.latent_policy, cfg.vlpo.latent_sigma
    )
    vlm = setup.build_model(cfg, cfg.latent, resume_dir, answer_tokens=cfg.vlpo.max_new_tokens, train_projector=trains_latents,
                            train_pause=False)  # fmt: skip
    disable_dropout(vlm)
    return vlm


def disable_dropout(module: nn.Module) -> None:
    """p = 0 in every dropout layer and attention dropout: pi_old and pi must be the same function."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            # torch types Module.__setattr__ for tensors and modules; a float attribute is fine.
            m.attention_dropout = 0.0  # type: ignore[assignment]


def _reference_projector(cfg: VLPOConfig, vlm: Any) -> nn.Module:
    """The starting checkpoint's latent projector (LoRA's reference keeps it; the adapter does not hold it)."""
    proj = LatentProjector(cfg.latent.projector, vlm.hidden_size, embed_rms=vlm._embed_rms())
    f = model_folder(cfg.model.path) / PROJECTOR_FILE
    if f.is_file():
        proj.load_state_dict(load_file(str(f)))
    proj.to(device=vlm.device, dtype=vlm.backbone.dtype).requires_grad_(False)
    return proj


class Reference:
    """The KL reference policy: the same model with the LoRA adapter disabled, or a frozen copy."""

    def __init__(self, cfg: VLPOConfig, vlm: Any):
        self.lora = cfg.model.finetune == "lora"
        self.vlm = vlm
        if self.lora:
            self.projector = _reference_projector(cfg, vlm)
            self.copy = None
        else:
            self.copy = LatentVLM.from_pretrained(
                cfg.model.path,
                vlm.latent,
                dtype=vlm.backbone.dtype,
                device=vlm.device,
                allow_pickle=cfg.model.allow_pickle,
            )
            self.copy.requires_grad_(False)
            self.copy.eval()

    @contextmanager
    def active(self):
        """Yields a callable model computing the reference's forward."""
        if self.copy is not None:
            yield self.copy
            return
        trained = self.vlm.projector
        self.vlm.projector = self.projector
        try:
            with self.vlm.backbone.disable_adapter():
                yield self.vlm
        finally:
            self.vlm.projector = trained


def _rollout_seed(seed: int, rank: int, step: int) -> int:
    """A per-(process, step) stream: resuming at step s replays exactly the rollouts of step s."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


# ---------------------------------------------------------------------------- held-out reward


@torch.no_grad()
def held_out_reward(
    vlm: Any,
    samples: Sequence[VQASample],
    rewards: RewardSet,
    *,
    latent_steps: int,
    n_samples: int,
    temperature: float,
    latent_sigma: float,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 8,
    accelerator: Any = None,
) -> dict[str, float]:
    """Mean reward (and accuracy) of `n_samples` sampled answers per held-out prompt, as in training.

    This is the quantity VLPO optimises, measured on prompts it never trains on: rollouts
    with the training temperature and latent sigma, a fixed seed, the same reward set.
    The visual tokens the rewards read are the rollouts' own (one vision pass per chunk).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(samples)[rank::world]
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=rewards.needs_visual,
                          sample_fields=setup.hop_fields(rewards.assign == "chain"))  # fmt: skip
    was_training = vlm.training
    vlm.eval()
    gen = torch.Generator(device=vlm.device).manual_seed(_rollout_seed(seed, rank, 0))
    sums = torch.zeros(3, dtype=torch.float64)  # reward sum, accuracy sum, count
    with sharding.gathered(vlm):  # once: processes may hold different numbers of chunks
        for i in range(0, len(mine), batch_size):
            chunk = mine[i : i + batch_size]
            images = [[load_image(p) for p in s.images] for s in chunk]
            ro = sample_rollouts(
                vlm, collate, chunk, images, group_size=n_samples, latent_steps=latent_steps, temperature=temperature,
                latent_sigma=latent_sigma, max_new_tokens=max_new_tokens, generator=gen,
            )  # fmt: skip
            rois = (
                collate(chunk, images=images) if rewards.needs_visual else {}
            )  # the ROI indices (no model pass)
            roi_index, hops = (
                repeat_rows(rois.get(key, [None] * len(chunk)), n_samples)
                for key in ("roi_index", "roi_hop_index")
            )
            visual = ro.visual_tokens if rewards.needs_visual else [None] * len(ro.texts)
            ctxs = _reward_contexts(ro, rewards, 0, visual, roi_index, hops)
            total, _ = rewards(ro.samples, ro.texts, ro.latents.cpu(), ctxs)
            acc = sum(accuracy_reward(s, t) for s, t in zip(ro.samples, ro.texts))
            sums += torch.tensor([float(total.sum()), acc, len(ro.texts)], dtype=torch.float64)
    vlm.train(was_training)
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    n = max(float(sums[2]), 1.0)
    return {"reward": float(sums[0]) / n, "accuracy": float(sums[1]) / n}


# ---------------------------------------------------------------------------- the loop


@holds_run_folder(lambda args: args["cfg"].output_dir, "output_dir")  # one run writes it at a time
def run_vlpo(
    cfg: VLPOConfig, *, on_step: Callable[[dict[str, Any]], None] | None = None
) -> VLPOResult:
    """Optimise the policy of `cfg` from the checkpoint `model.path`; export to `output_dir/final`."""
    data = check_config(cfg)
    p = cfg.vlpo
    rewards = RewardSet(p.rewards)
    val_samples = read_jsonl(cfg.data.val)[: cfg.data.val_samples or None] if cfg.data.val else []

    accelerator = setup.open_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    out_dir = Path(cfg.output_dir)
    resume_dir = ckpt.start_or_resume(accelerator, cfg)  # refuses a run it would overwrite or mix
    done = ckpt.recorded_result(out_dir, resume_dir, cfg.max_steps)
    if done is not None:  # resuming a finished run is a no-op (no model load, nothing rewritten)
        return TrainResult(out_dir, Path(done["final_model"]), done["steps"], done["metrics"])

    set_seed(cfg.seed)
    latent_steps = cfg.latent.steps
    vlm = build_model(cfg, resume_dir)
    trains_latents = latents_are_actions(latent_steps, p.latent_policy, p.latent_sigma)
    reference = Reference(cfg, vlm) if p.beta > 0 else None
    sharding.shard(
        vlm, cfg, accelerator, plain=lambda: build_model(cfg, None)
    )  # model.sharding=fsdp2
    if reference is not None and reference.copy is not None:
        sharding.shard(reference.copy, cfg, accelerator)
    optimizer = build_optimizer(vlm.named_parameters(), cfg.optim)
    total_opt_steps = cfg.optimizer_steps
    scheduler = build_scheduler(optimizer, total_opt_steps, cfg.optim)
    model, optimizer = sharding.prepare(accelerator, vlm, optimizer)
    vlm = accelerator.unwrap_model(model)

    step, pos = 0, 0  # rollout steps done; prompts consumed by all processes together
    last_row: dict[str, Any] = {}
    if resume_dir is not None:  # last_row: what the export reports if no step is left to run
        expected = {"group_size": p.group_size, "prompts_per_step": cfg.batch_size * world}
        step, pos, last_row = ckpt.resume_training(
            accelerator,
            resume_dir,
            optimizer,
            scheduler,
            expected,
            sharding.state_of(cfg, vlm, optimizer),
        )
    start_step = step

    stream = SampleStream(data.source, cfg.seed, cfg.data.weights)
    prompt_collate = VQACollator(
        vlm.processor, vlm.adapter, with_answers=False, with_rois=False, image_loader=load_image
    )
    traj_collate = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=rewards.needs_visual,
                               image_loader=load_image, sample_fields=setup.hop_fields(rewards.assign == "chain"))  # fmt: skip
    pad = pad_id(vlm)
    logprobs = functools.partial(
        trajectory_logprobs,
        temperature=p.temperature,
        latent_sigma=p.latent_sigma,
        latent_policy=p.latent_policy,
        latent_logprob=p.latent_logprob,
    )  # (model, batch, latents) -> TrajectoryLogprobs, for the rollout policy, the reference and the update
    log = setup.Logger(accelerator, out_dir, cfg.log, label="vlpo", info=_progress_line,
                       resume_step=step if resume_dir is not None else 0)  # fmt: skip
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    history: list[dict[str, Any]] = []
    log.start(cfg.max_steps, step)
    signals = StopSignals()  # SIGTERM/SIGINT: a checkpoint at the next step boundary, then stop
    try:
        while step < cfg.max_steps:
            times: dict[str, float] = {}
            t0 = time.perf_counter()
            # ---- 1. rollouts (this process's B prompts of the global batch)
            idx = stream.take(pos + rank * cfg.batch_size, cfg.batch_size)
            samples = [data.samples[i] for i in idx]
            images = [[load_image(path) for path in s.images] for s in samples]
            gen = torch.Generator(device=vlm.device).manual_seed(
                _rollout_seed(cfg.seed, rank, step)
            )
            vlm.eval()
            with sharding.gathered(vlm):  # processes decode answers of different lengths
                ro = sample_rollouts(
                    vlm, prompt_collate, samples, images, group_size=p.group_size, latent_steps=latent_steps,
                    temperature=p.temperature, latent_sigma=p.latent_sigma, max_new_tokens=p.max_new_tokens,
                    top_p=p.top_p, generator=gen,
                )  # fmt: skip
            vlm.train()
            times["rollout_s"] = time.perf_counter() - t0

            # ---- 2. log-probabilities of the finished trajectories: rollout policy and reference
            t0 = time.perf_counter()
            n_traj = len(ro.texts)
            micro: list[_Micro] = []
            parts_per_opt: list[
                list[int]
            ] = []  # per optimizer step, its micro-batches (indices into `micro`)
            for part in _mini_batches(n_traj, p.mini_batches, p.micro_batch_size):
                parts_per_opt.append(list(range(len(micro), len(micro) + len(part))))
                micro.extend(
                    _micro_batch(ro, rows, traj_collate, pad, trains_latents) for rows in part
                )
            old, ref, entropy_sum = [], [], 0.0
            visual: list[torch.Tensor | None] = [None] * n_traj
            with torch.no_grad():
                for mb in micro:
                    with accelerator.autocast():
                        lp = logprobs(model, mb.batch, mb.latents)
                    old.append(lp.logp.detach())
                    entropy_sum += float(lp.entropy.sum())
                    if rewards.needs_visual:
                        for i, v in zip(mb.rows, lp.visual_tokens):
                            visual[i] = v.detach()
                    if reference is not None:
                        with reference.active() as ref_model, accelerator.autocast():
                            ref.append(logprobs(ref_model, mb.batch, mb.latents).logp.detach())
            times["logprob_s"] = time.perf_counter() - t0

            # ---- 3. rewards and group-relative advantages
            t0 = time.perf_counter()
            ctxs = _reward_contexts(ro, rewards, step, visual, _per_row(micro, "roi_index", n_traj),
                                    _per_row(micro, "roi_hop_index", n_traj))  # fmt: skip
            reward, parts = rewards(ro.samples, ro.texts, ro.latents.detach().cpu(), ctxs)
            adv = group_advantages(reward, p.group_size, scale=p.scale_advantages)  # [N]
            times["reward_s"] = time.perf_counter() - t0

            # ---- 4. clipped policy updates
            t0 = time.perf_counter()
            stats = dict.fromkeys(
                ("clipped", "kl", "ratio", "units", "loss", "latent_clipped", "latent_units"), 0.0
            )
            grad_norms: list[float] = []
            for _epoch in range(p.update_epochs):
                for group in parts_per_opt:
                    norm_local = sum(
                        float(policy_normaliser(micro[j].mask, p.aggregation)) for j in group
                    )
                    norm = (
                        float(
                            accelerator.reduce(
                                torch.tensor(norm_local, device=accelerator.device), "sum"
                            )
                        )
                        if world > 1
                        else norm_local
                    )
                    for n_mb, j in enumerate(group):
                        mb = micro[j]
                        sync = n_mb == len(group) - 1
                        with accelerator.no_sync(model) if not sync else nullcontext():
                            with accelerator.autocast():
                                lp = logprobs(model, mb.batch, mb.latents)
                            per_seq, st = policy_loss(
                                lp.logp, old[j], adv[mb.rows].to(lp.logp.device), mb.mask.to(lp.logp.device),
                                clip_low=p.clip_low, clip_high=p.clip_high, latent_steps=latent_steps,
                                latent_clip_low=p.latent_clip_low, latent_clip_high=p.latent_clip_high,
                                aggregation=p.aggregation, ref_logp=ref[j] if ref else None, beta=p.beta,
                            )  # fmt: skip
                            loss = per_seq.sum() / max(norm, 1.0)
                            accelerator.backward(
                                loss * world
                            )  # DDP averages over processes; the loss is a global sum
                        for key in stats:
                            stats[key] += float(loss.detach()) if key == "loss" else float(st[key])
                    if cfg.optim.max_grad_norm > 0:
                        grad_norms.append(
                            float(
                                sharding.clip_grad_norm_(
                                    accelerator, model, cfg.optim.max_grad_norm
                                )
                            )
                        )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            times["update_s"] = time.perf_counter() - t0
            step += 1
            pos += cfg.batch_size * world

            # ---- metrics: this process's sums, reduced over processes
            acc = torch.tensor([accuracy_reward(s, t) for s, t in zip(ro.samples, ro.texts)])
            flat = flat_groups(reward, p.group_size).float()
            kl_units = [
                kl_k3(o, r) * mb.mask for o, r, mb in zip(old, ref, micro)
            ]  # [n, K + T] each (none without a reference)
            z = ro.latents.float()
            sums = {
                "reward": float(reward.sum()), "reward_sq": float(reward.pow(2).sum()), "accuracy": float(acc.sum()),
                "trajectories": n_traj, "flat": float(flat.sum()), "groups": float(flat.numel()), "entropy": entropy_sum,
                "answer_tokens": float(sum(mb.amask.sum() for mb in micro)),
                "latent_norm": float(z.norm(dim=-1).mean(-1).sum()) if latent_steps else 0.0,
                "response_tokens": float(sum(len(t) for t in ro.token_ids)), "stopped": float(sum(ro.stopped)),
                "kl_rollout": sum(float(u.sum()) for u in kl_units), "rollout_units": float(sum(mb.mask.sum() for mb in micro)),
                **{f"reward/{name}": float(v.sum()) for name, v in parts.items()},
                **{f"update_{key}": v for key, v in stats.items()},
                "kl_latent": sum(float(u[:, :latent_steps].sum()) for u in kl_units),
                "rollout_latent_units": float(sum(mb.mask[:, :latent_steps].sum() for mb in micro)),
            }  # fmt: skip
            tot = setup.reduce_sums(accelerator, sums)
            n = tot["trajectories"]
            mean_r = tot["reward"] / n
            row: dict[str, Any] = {
                "step": step,
                "reward_mean": mean_r,
                "reward_std": max(tot["reward_sq"] / n - mean_r**2, 0.0) ** 0.5,
                "accuracy": tot["accuracy"] / n,
                "flat_groups": tot["flat"] / max(tot["groups"], 1.0),
                "entropy": tot["entropy"] / max(tot["answer_tokens"], 1.0),
                "latent_norm": tot["latent_norm"] / n if latent_steps else None,
                "response_tokens": tot["response_tokens"] / n,
                "stopped": tot["stopped"] / n,
                "kl": tot["kl_rollout"] / max(tot["rollout_units"], 1.0) if ref else None,
            }
            for name in parts:
                row[f"reward/{name}"] = tot[f"reward/{name}"] / n
            units = max(tot["update_units"], 1.0)
            row["clip_fraction"] = tot["update_clipped"] / units
            latent_units = tot[
                "update_latent_units"
            ]  # per update pass; rollout_latent_units: in the rollouts once
            row["clip_fraction_latent"] = (
                tot["update_latent_clipped"] / latent_units if latent_units else None
            )
            row["kl_latent"] = (
                tot["kl_latent"] / tot["rollout_latent_units"] if ref and latent_units else None
            )
            row["kl_update"] = tot["update_kl"] / units if ref else None
            row["ratio_mean"] = tot["update_ratio"] / units
            # Each process's loss is its share of the global sum (normalised over all processes), so
            # the reduced sum is already the global loss: mean over the step's optimizer steps.
            row["loss"] = tot["update_loss"] / (p.update_epochs * len(parts_per_opt))
            row["lr"] = scheduler.get_last_lr()[0]
            row["optimizer_steps"] = (
                scheduler.last_epoch
            )  # update_epochs x mini_batches per step, whatever the process count
            row["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else None
            row.update(times)
            row["trajectories_per_s"] = n_traj / max(sum(times.values()), 1e-9)
            row["samples_seen"] = pos
            if (
                cfg.log.val_every
                and val_samples
                and step % cfg.log.val_every == 0
                and step < cfg.max_steps
            ):
                row.update(_validate(cfg, vlm, val_samples, rewards, accelerator))
            last_row = row
            if step % cfg.log.every == 0 or step == cfg.max_steps or "val_reward" in row:
                history.append(row)
                log.write(row)
            log.advance(row)
            stop = step < cfg.max_steps and signals.requested(accelerator)
            if stop or (
                cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.max_steps
            ):
                _save(cfg, accelerator, model, vlm, optimizer, scheduler, step, pos, row)
            if stop:
                raise signals.stopped(
                    f"checkpoint {ckpt.step_dir(out_dir, step)} saved; continue with --resume"
                )
            if on_step is not None:
                on_step(row)
    finally:
        signals.restore()
        log.stop()

    if step > start_step:  # else the resumed checkpoint is this step's (do not overwrite it)
        _save(cfg, accelerator, model, vlm, optimizer, scheduler, step, pos, last_row)
    metrics = dict(last_row)
    if val_samples:
        metrics.update(_validate(cfg, vlm, val_samples, rewards, accelerator))
        log.write(
            {
                "step": step,
                **{k: v for k, v in metrics.items() if k.startswith("val_")},
                "final": True,
            }
        )
    final = setup.export(cfg, accelerator, vlm, log, step, metrics)
    return TrainResult(out_dir, final, step, metrics, history, vlm)


@dataclass
class _Micro:
    """A micro-batch of finished trajectories, collated once and reused by every pass of the step."""

    rows: list[int]  # rows of the step's N trajectories (of this process)
    batch: dict[str, Any]  # prompts (repeated per trajectory) + answer_ids / answer_mask
    latents: torch.Tensor  # [n, K, d]
    mask: torch.Tensor  # [n, K + T] policy units
    amask: torch.Tensor  # [n, T]
    n: int


def _mini_batches(n: int, mini_batches: int, micro_batch_size: int) -> list[list[list[int]]]:
    """This process's `n` trajectories as `mini_batches` optimizer steps, each a list of micro-batches (row lists).

    Optimizer step m takes rows m, m + M, m + 2M, ... (M = mini_batches), so every process
    takes exactly M steps, and when n is a multiple of M the global step m holds the same
    trajectories under any process count (a process's rows are a contiguous block of the
    global batch). `VLPOConfig` checks n >= M, so no step is empty.
    """
    parts = [list(range(m, n, mini_batches)) for m in range(mini_batches)]
    return [
        [rows[a : a + micro_batch_size] for a in range(0, len(rows), micro_batch_size)]
        for rows in parts
    ]


def _micro_batch(
    ro: Rollouts, rows: list[int], collate: Any, pad: int, latent_actions: bool
) -> _Micro:
    """Trajectories `rows` of the rollouts, collated with their sampled answers and their unit mask."""
    batch = collate([ro.samples[i] for i in rows], images=[ro.images[i] for i in rows])
    batch["answer_ids"], batch["answer_mask"] = answer_tensors(
        [ro.token_ids[i] for i in rows], [ro.stop_tokens[i] for i in rows], pad
    )
    mask = unit_mask(batch["answer_mask"], ro.latents.shape[1], latent_actions)
    return _Micro(rows, batch, ro.latents[rows], mask, batch["answer_mask"], len(rows))


def _per_row(micro: list[_Micro], key: str, n: int) -> list[Any]:
    """The micro-batches' per-sample field `key` in rollout row order, `[n]` (None where not collated)."""
    out: list[Any] = [None] * n
    for mb in micro:
        for row, value in zip(mb.rows, mb.batch.get(key, [None] * mb.n)):
            out[row] = value
    return out


def _reward_contexts(ro: Rollouts, rewards: RewardSet, step: int, visual: Sequence[torch.Tensor | None],
                     roi_index: Sequence[torch.Tensor | None], roi_hop_index: Sequence[Any]) -> list[RewardContext]:  # fmt: skip
    """One context per trajectory, under the reward set's ROI assignment; the tensors are per row, `[N]`."""
    return [
        RewardContext(stopped=s, n_tokens=len(t), step=step, visual_tokens=v, roi_index=r, assign=rewards.assign,
                      roi_hop_index=h)
        for s, t, v, r, h in zip(ro.stopped, ro.token_ids, visual, roi_index, roi_hop_index, strict=True)
    ]  # fmt: skip


def _validate(
    cfg: VLPOConfig, vlm: Any, samples: list[VQASample], rewards: RewardSet, accelerator: Any
) -> dict[str, float]:
    p = cfg.vlpo
    held = held_out_reward(
        vlm, samples, rewards, latent_steps=cfg.latent.steps, n_samples=p.eval_samples, temperature=p.temperature,
        latent_sigma=p.latent_sigma, max_new_tokens=p.max_new_tokens, seed=cfg.seed, batch_size=cfg.log.val_batch_size,
        accelerator=accelerator,
    )  # fmt: skip
    greedy = validation_accuracy(
        vlm, samples, latent_steps=cfg.latent.steps, batch_size=cfg.log.val_batch_size,
        max_new_tokens=cfg.log.val_max_new_tokens, accelerator=accelerator,
    )  # fmt: skip
    return {
        "val_reward": held["reward"],
        "val_sampled_accuracy": held["accuracy"],
        "val_accuracy": greedy,
    }


def _save(cfg: VLPOConfig, accelerator: Any, model: Any, vlm: Any, optimizer: Any, scheduler: Any, step: int, pos: int,
          row: dict[str, Any]) -> None:  # fmt: skip
    setup.save(cfg, accelerator, model, vlm, optimizer, scheduler, step=step, trainer_state={
        "samples_seen": pos, "prompts_per_step": cfg.batch_size * accelerator.num_processes,
        "group_size": cfg.vlpo.group_size, "metrics": row,
    })  # fmt: skip


def _progress_line(row: dict[str, Any]) -> str:
    """The progress bar's metrics line."""
    info = f"reward {row['reward_mean']:.3f}±{row['reward_std']:.3f} acc {row['accuracy']:.3f} clip {row['clip_fraction']:.3f}"
    if row.get("kl") is not None:
        info += f" kl {row['kl']:.4f}"
    info += f" flat {row['flat_groups']:.2f} {row['trajectories_per_s']:.1f} traj/s"
    if row.get("val_reward") is not None:
        info += f" val {row['val_reward']:.3f}"
    return info


__all__ = [
    "run_vlpo",
    "check_config",
    "build_model",
    "held_out_reward",
    "disable_dropout",
    "Reference",
    "VLPOResult",
]
