"""A target that says where: a head classifying each latent state's hop region (`align.region_weight`).

InfoNCE towards pooled ROI tokens is met by *what* a lesion looks like; on the synthetic
chains the anchor is the one lesion of its size, so a step can satisfy it without knowing
where the anchor is, and nothing tells the next hop's steps where to move (docs/results.md,
"Latent steps that step"). This head makes each latent state `proj(h_{k-1})` name the cell of
an n x n grid holding the ROI centre of the hop chain alignment assigns step k to. It trains
with the model and is dropped at export, like stage 0's probe (`medlvr.train.probe`). With
`latent.lookup_grid` the labels supervise the model's lookup head instead (exported: it is
what addresses the cells at inference).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medlvr.config import AlignConfig
from medlvr.data.roi import hop_of_steps, roi_hops
from medlvr.data.schema import VQASample
from medlvr.model.backbones import TokenGrid

IGNORE = -100


def hop_regions(sample: VQASample, sizes: list[tuple[int, int]], grid: int) -> list[int]:
    """Per hop (reasoning order) the grid cell of its first ROI's centre; `IGNORE` for a hop without one."""
    from medlvr.eval.diagnostics import box_region

    if not sample.rois or not sizes:
        return []
    hop_of = roi_hops(sample) or [0] * len(sample.rois)
    out = [IGNORE] * (max(hop_of) + 1)
    for roi, j in zip(sample.rois, hop_of):
        if out[j] == IGNORE and roi.image < len(sizes):
            w, h = sizes[roi.image]
            out[j] = box_region(roi.box, w, h, grid)
    return out


class RegionLoss:
    """The region head as an auxiliary loss of `run_sft` (`medlvr.train.auxiliary.AuxiliaryLoss`).

    Logs `region` (mean cross-entropy over the steps with a label) and `region_acc`.
    """

    name = "region"

    def __init__(self, cfg: AlignConfig, hidden_size: int):
        self.weight = cfg.region_weight
        self.grid = cfg.region_grid
        self.module: nn.Module = nn.Linear(hidden_size, self.grid * self.grid)
        self.sample_fields: Mapping[str, Callable[..., Any]] = {"hop_regions": self._field}

    def _field(
        self, sample: VQASample, grids: list[TokenGrid], sizes: list[tuple[int, int]]
    ) -> list[int]:
        return hop_regions(sample, sizes, self.grid)

    def labels(self, batch: dict[str, Any], k: int) -> torch.Tensor:
        """`[B, K]` the region class of each step's hop (`IGNORE` without one)."""
        out = torch.full((len(batch["hop_regions"]), k), IGNORE, dtype=torch.long)
        for i, regions in enumerate(batch["hop_regions"]):
            if regions and k:
                out[i] = torch.tensor(regions)[torch.tensor(hop_of_steps(k, len(regions)))]
        return out

    def loss(
        self, module: nn.Module, fwd: Any, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        states = fwd.latent_means  # [B, K, d]
        labels = self.labels(batch, states.shape[1]).to(states.device)
        # With `latent.lookup_grid` the lookup head's own cell scores are what it supervises.
        lookup = getattr(fwd, "lookup_logits", None)
        logits = lookup if lookup is not None else module(states.float())  # [B, K, C]
        ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        valid = labels != IGNORE
        n = valid.sum(-1)
        per_sample = ce.sum(-1) / n.clamp_min(1)  # [B] mean over the sample's labelled steps
        right = ((logits.argmax(-1) == labels) & valid).sum()
        return per_sample, {
            "region": float(per_sample.detach().sum()),
            "region_samples": float((n > 0).sum()),
            "region_right": float(right),
            "region_steps": float(valid.sum()),
        }

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float | None]:
        return {
            "region": totals["region"] / totals["region_samples"]
            if totals.get("region_samples")
            else None,
            "region_acc": totals["region_right"] / totals["region_steps"]
            if totals.get("region_steps")
            else None,
        }

    def progress(self, row: Mapping[str, Any]) -> str:
        return f" region {row['region_acc']:.2f}" if row.get("region_acc") is not None else ""


__all__ = ["RegionLoss", "hop_regions"]
