"""AdamW parameter groups and the warmup + decay learning-rate schedule (shared by SFT and VLPO)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from medlvr.config import OptimConfig


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: decay on matrices only; the latent projector and pause inputs at `projector_lr`.

    Norm weights, biases and scalar scales are not decayed (decaying a norm gain
    towards 0 shrinks the activations, not the capacity).
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name.lower()
        proj = name.startswith(("projector.", "pause."))
        groups.setdefault((decay, proj), []).append(p)
    if not groups:
        raise ValueError("no trainable parameters: check the model.freeze_* options")
    param_groups = []
    for (decay, proj), params in sorted(groups.items()):
        lr = cfg.projector_lr if proj and cfg.projector_lr > 0 else cfg.lr
        param_groups.append(
            {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": lr}
        )
    return torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps
    )


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, then cosine/linear decay to `min_lr_ratio` at `total_steps`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]
