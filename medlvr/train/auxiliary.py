"""Auxiliary losses: terms beside the answer loss that `run_sft` adds without knowing what they are.

An auxiliary loss owns a small trainable module (prepared, optimised and checkpointed
with the model, never exported), the per-sample fields it needs in the batch (the
collator computes them from the sample and its token grids), its per-sample loss on
the training forward, and the metrics it logs. `run_sft` adds `weight x loss.sum()`
to the step's loss (normalised by the global batch, as the answer cross-entropy).

The visual-token probe (`medlvr.train.probe.ProbeLoss`, stage 0 of the demo) is one
implementation; `auxiliary_losses` builds those the config switches on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from medlvr.config import SFTConfig
from medlvr.data.schema import VQASample
from medlvr.model.latent import ForwardOutput
from medlvr.train.probe import ProbeLoss


class AuxiliaryLoss(Protocol):
    """What `run_sft` needs of an auxiliary loss."""

    name: str
    """Its parameters' prefix (`<name>.`), its checkpoint file (`<name>.safetensors`) and its metrics' prefix."""
    weight: float
    """Its weight next to the answer cross-entropy."""
    module: nn.Module
    """Its trainable parameters."""
    sample_fields: Mapping[str, Callable[..., Any]]
    """Batch keys it reads, each computed per sample by the collator (`VQACollator(sample_fields=...)`)."""

    def loss(
        self, module: nn.Module, fwd: ForwardOutput, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-sample loss `[B]` through `module` (the prepared `self.module`), and named sums for its metrics."""
        ...

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float | None]:
        """The logged row's entries from the step's sums (over micro-batches and processes)."""
        ...

    def progress(self, row: Mapping[str, Any]) -> str:
        """Its part of the progress line ("" for none)."""
        ...


def auxiliary_losses(
    cfg: SFTConfig, samples: Sequence[VQASample], hidden_size: int, resume_dir: Path | None
) -> list[AuxiliaryLoss]:
    """The auxiliary losses `cfg` switches on, their modules' weights from `resume_dir` when resuming."""
    losses: list[AuxiliaryLoss] = []
    if cfg.probe.weight:
        losses.append(ProbeLoss(cfg.probe, samples, hidden_size))
    if cfg.align.region_weight and cfg.mode != "plain":
        from medlvr.train.latent_region import RegionLoss

        losses.append(RegionLoss(cfg.align, hidden_size))
    if resume_dir is not None:
        for aux in losses:
            aux.module.load_state_dict(load_file(resume_dir / f"{aux.name}.safetensors"))
    return losses


__all__ = ["AuxiliaryLoss", "auxiliary_losses"]
