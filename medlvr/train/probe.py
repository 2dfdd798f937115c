"""An auxiliary per-token probe: teach the visual tokens what the ROIs contain.

A linear head on the post-merger visual tokens classifies every token as the
label of the ROI covering it, or as background; an optional second head regresses
each token's position from its content. They only shape training (their losses
are added to the answer loss) and are never exported. Stage 0 of the laptop demo
uses both: through the answer text alone a tiny backbone learned where lesions
are and how bright, but hardly their shapes (shape 0.36 -> 0.59 with the probe,
docs/results.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medlvr.config import ProbeConfig
from medlvr.data.roi import box_to_tokens
from medlvr.data.schema import VQASample
from medlvr.errors import MedlvrError
from medlvr.model.backbones import TokenGrid

IGNORE = -100
BACKGROUND = "background"


def probe_labels(samples: Sequence[VQASample], question_types: Sequence[str] = ()) -> list[str]:
    """Every ROI label on the samples the probe applies to, sorted (background not included)."""
    labels = {r.label for s in samples if _applies(s, question_types) for r in s.rois if r.label}
    if not labels:
        raise MedlvrError(
            "probe: no labelled ROIs on the training samples it applies to (check probe.question_types)"
        )
    return sorted(labels)


def _applies(sample: VQASample, question_types: Sequence[str]) -> bool:
    return bool(sample.rois) and (not question_types or sample.question_type in question_types)


class TokenTargets(NamedTuple):
    """What the probe learns for one sample's visual tokens."""

    labels: torch.Tensor  # [N] long: 0 background, i for classes[i], -100 not probed
    centres: (
        torch.Tensor
    )  # [N, 2] float: each token's cell centre (y, x) as a fraction of its image


def token_centres(grid: TokenGrid, width: int, height: int) -> torch.Tensor:
    """Cell centres `[n_tokens, 2]` (y, x) in token order, as fractions of the image's height and width."""
    if grid.blocks:
        return torch.cat([token_centres(b, width, height) for b in grid.blocks])
    ys = (grid.y0 + (torch.arange(grid.rows) + 0.5) * grid.cell_h) / height
    xs = (grid.x0 + (torch.arange(grid.cols) + 0.5) * grid.cell_w) / width
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2).float()


class TokenLabeler:
    """A sample -> `TokenTargets`: the class of the ROI covering each visual token, and its position.

    Class ids: 0 background, i for `classes[i]`, -100 if the sample is not probed.
    Tokens covered by an unlabelled ROI, or by one whose label is not a class, are
    ignored (not background). Where ROIs overlap, the later ROI wins.
    """

    def __init__(self, classes: Sequence[str], question_types: Sequence[str] = ()):
        self.classes = [BACKGROUND, *classes]
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.question_types = list(question_types)

    def __call__(
        self, sample: VQASample, grids: list[TokenGrid], sizes: list[tuple[int, int]]
    ) -> TokenTargets:
        offsets = [0]
        for g in grids:
            offsets.append(offsets[-1] + g.n_tokens)
        centres = (
            torch.cat([token_centres(g, w, h) for g, (w, h) in zip(grids, sizes)])
            if grids
            else torch.zeros(0, 2)
        )
        if not _applies(sample, self.question_types):
            return TokenTargets(torch.full((offsets[-1],), IGNORE, dtype=torch.long), centres)
        out = torch.zeros(offsets[-1], dtype=torch.long)
        for roi in sample.rois:
            w, h = sizes[roi.image]
            tokens = (
                torch.tensor(box_to_tokens(roi.box, grids[roi.image], w, h)) + offsets[roi.image]
            )
            out[tokens] = self.index.get(roi.label or "", IGNORE)
        return TokenTargets(out, centres)


class TokenProbe(nn.Module):
    """Linear heads over visual tokens `[N, d]`: the ROI class `[N, len(classes)]`, and the position `[N, 2]`.

    The position head regresses each token's cell centre from its content. RoPE gives
    attention only *relative* positions, so a question naming a region ("Is there a
    lesion in the upper left region?") can find its tokens only if their content says
    where they are; `position_weight` > 0 teaches that.
    """

    def __init__(self, hidden_size: int, classes: Sequence[str], position_weight: float = 0.0):
        super().__init__()
        self.classes = list(classes)
        self.head = nn.Linear(hidden_size, len(self.classes))
        self.position_weight = position_weight
        self.position = nn.Linear(hidden_size, 2) if position_weight else None

    def forward(
        self, visual_tokens: Sequence[torch.Tensor], targets: Sequence[TokenTargets]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss `[B]`: mean token cross-entropy where probed (else 0) plus `position_weight`
        times the mean squared position error (every sample); and counts `[3]`: foreground
        tokens classified right, foreground tokens, probed samples."""
        losses, hits = [], torch.zeros(3)
        for tokens, (y, centres) in zip(visual_tokens, targets):
            if not tokens.shape[0] == y.shape[0] == centres.shape[0]:
                raise MedlvrError(
                    f"probe: {tokens.shape[0]} visual tokens but {y.shape[0]} token labels, {centres.shape[0]} positions"
                )
            y = y.to(tokens.device)
            position = tokens.new_zeros(())
            if self.position is not None:
                # On normalised tokens: the raw post-merger states are large, and a regression on them
                # dominated the gradient (norm 20-60 against ~1 for the answer loss) in a first trial.
                where = self.position(F.layer_norm(tokens.float(), tokens.shape[-1:]))  # [N, 2]
                position = ((where - centres.to(where)) ** 2).sum(-1).mean()
            logits = self.head(tokens.float())  # [N, C]
            keep = y != IGNORE
            if not keep.any():
                losses.append(
                    logits.sum() * 0.0 + self.position_weight * position
                )  # zero terms keep DDP's graph whole
                continue
            losses.append(F.cross_entropy(logits[keep], y[keep]) + self.position_weight * position)
            fg = keep & (y > 0)
            hits += torch.tensor(
                [float((logits[fg].argmax(-1) == y[fg]).sum()), float(fg.sum()), 1.0]
            )
        return torch.stack(losses), hits


class ProbeLoss:
    """The probe as an auxiliary loss of `run_sft` (`medlvr.train.auxiliary.AuxiliaryLoss`).

    Logs `probe` (the mean loss over probed samples) and `probe_acc` (foreground tokens only).
    """

    name = "probe"

    def __init__(self, cfg: ProbeConfig, samples: Sequence[VQASample], hidden_size: int):
        labeler = TokenLabeler(
            cfg.labels or probe_labels(samples, cfg.question_types), cfg.question_types
        )
        self.weight = cfg.weight
        self.module: nn.Module = TokenProbe(hidden_size, labeler.classes, cfg.position_weight)
        self.sample_fields: Mapping[str, Callable[..., Any]] = {"token_labels": labeler}

    def loss(
        self, module: nn.Module, fwd: Any, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, hits = module(fwd.visual_tokens, batch["token_labels"])  # [B], [3]
        right, tokens, probed = hits.tolist()
        return loss, {
            "probe": float(loss.detach().sum()),
            "probe_right": right,
            "probe_tokens": tokens,
            "probe_samples": probed,
        }

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float | None]:
        return {
            "probe": totals["probe"] / totals["probe_samples"]
            if totals["probe_samples"]
            else None,  # mean over probed samples
            "probe_acc": totals["probe_right"] / totals["probe_tokens"]
            if totals["probe_tokens"]
            else None,  # foreground tokens only
        }

    def progress(self, row: Mapping[str, Any]) -> str:
        return f" probe {row['probe']:.3f}" if row.get("probe") is not None else ""


__all__ = [
    "BACKGROUND",
    "IGNORE",
    "ProbeLoss",
    "TokenLabeler",
    "TokenProbe",
    "TokenTargets",
    "probe_labels",
    "token_centres",
]
