"""An auxiliary per-token probe: teach the visual tokens what the ROIs contain.

A linear head on the post-merger visual tokens classifies every token as the
label of the ROI covering it, or as background. It only shapes training (its
cross-entropy is added to the answer loss) and is never exported. Stage 0 of the
laptop demo needs it: through the answer text alone a tiny backbone learned where
lesions are and how bright, but hardly their shapes (NOTES-synthetic.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
        raise MedlvrError("probe: no labelled ROIs on the training samples it applies to (check probe.question_types)")
    return sorted(labels)


def _applies(sample: VQASample, question_types: Sequence[str]) -> bool:
    return bool(sample.rois) and (not question_types or sample.question_type in question_types)


class TokenLabeler:
    """A sample -> class id per visual token: 0 background, i for `classes[i]`, -100 if not probed.

    Tokens covered by an unlabelled ROI, or by one whose label is not a class, are
    ignored (not background). Where ROIs overlap, the later ROI wins.
    """

    def __init__(self, classes: Sequence[str], question_types: Sequence[str] = ()):
        self.classes = [BACKGROUND, *classes]
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.question_types = list(question_types)

    def __call__(self, sample: VQASample, grids: list[TokenGrid], sizes: list[tuple[int, int]]) -> torch.Tensor:
        offsets = [0]
        for g in grids:
            offsets.append(offsets[-1] + g.n_tokens)
        if not _applies(sample, self.question_types):
            return torch.full((offsets[-1],), IGNORE, dtype=torch.long)
        out = torch.zeros(offsets[-1], dtype=torch.long)
        for roi in sample.rois:
            w, h = sizes[roi.image]
            tokens = torch.tensor(box_to_tokens(roi.box, grids[roi.image], w, h)) + offsets[roi.image]
            out[tokens] = self.index.get(roi.label or "", IGNORE)
        return out


class TokenProbe(nn.Module):
    """Linear classifier over visual tokens `[N, d]` -> `[N, len(classes)]`."""

    def __init__(self, hidden_size: int, classes: Sequence[str]):
        super().__init__()
        self.classes = list(classes)
        self.head = nn.Linear(hidden_size, len(self.classes))

    def forward(self, visual_tokens: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample mean token cross-entropy `[B]` (0 where nothing is probed), and counts `[3]`:
        foreground tokens classified right, foreground tokens, probed samples."""
        losses, hits = [], torch.zeros(3)
        for tokens, y in zip(visual_tokens, labels):
            y = y.to(tokens.device)
            if tokens.shape[0] != y.shape[0]:
                raise MedlvrError(f"probe: {tokens.shape[0]} visual tokens but {y.shape[0]} token labels")
            logits = self.head(tokens.float())  # [N, C]
            keep = y != IGNORE
            if not keep.any():
                losses.append(logits.sum() * 0.0)  # keeps the graph (DDP wants every parameter used)
                continue
            losses.append(F.cross_entropy(logits[keep], y[keep]))
            fg = keep & (y > 0)
            hits += torch.tensor([float((logits[fg].argmax(-1) == y[fg]).sum()), float(fg.sum()), 1.0])
        return torch.stack(losses), hits


__all__ = ["BACKGROUND", "IGNORE", "TokenLabeler", "TokenProbe", "probe_labels"]
