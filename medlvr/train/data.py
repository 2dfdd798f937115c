"""Training data for the trainers: mixed JSONL files, a resumable sample stream, images, targets.

The order of samples is a pure function of `(seed, epoch)`, and the loop's data
position is one integer: the number of samples consumed by all processes together.
An optimizer step takes the next `batch_size x processes x grad_accum` samples of the
stream; micro-batch m goes to every process in turn (rank r takes its r-th slice).
So resuming needs only that integer, and a single process with the same global batch
sees exactly the same samples per step as several processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medlvr.data.images import load_image
from medlvr.data.roi import assigned_targets
from medlvr.data.schema import VQASample, read_jsonl
from medlvr.errors import MedlvrError


@dataclass
class TrainSet:
    """Training records of one or more JSONL files, with the file each came from."""

    samples: list[VQASample]
    source: np.ndarray  # [N] index of the file each sample came from
    paths: list[str]

    @property
    def has_roi(self) -> np.ndarray:
        """[N] bool: the sample has at least one ROI box."""
        return np.array([bool(s.rois) for s in self.samples], dtype=bool)


def load_train_set(paths: Sequence[str], max_samples: int = 0) -> TrainSet:
    """Read and validate every file (fails fast with every problem); ids must be unique across files."""
    samples: list[VQASample] = []
    source: list[int] = []
    for i, p in enumerate(paths):
        recs = read_jsonl(p)
        if max_samples:
            recs = recs[:max_samples]
        if not recs:
            raise MedlvrError(f"training file has no records: {p}")
        samples.extend(recs)
        source.extend([i] * len(recs))
    seen: dict[str, int] = {}
    for s, f in zip(samples, source):
        if s.id in seen and seen[s.id] != f:
            raise MedlvrError(f"sample id {s.id!r} occurs in {paths[seen[s.id]]} and {paths[f]}")
        seen[s.id] = f
    return TrainSet(samples, np.asarray(source, dtype=np.int64), [str(p) for p in paths])


class SampleStream:
    """An endless, seeded stream of sample indices, epoch after epoch; `take(pos, n)` is random access."""

    def __init__(self, source: np.ndarray, seed: int, weights: Sequence[float] = ()):
        self.n = int(source.shape[0])
        self.seed = seed
        self.prob: np.ndarray | None = None
        if weights:
            n_files = int(source.max()) + 1
            if len(weights) != n_files:
                raise MedlvrError(
                    f"data.weights has {len(weights)} entries for {n_files} training files"
                )
            counts = np.bincount(source, minlength=n_files).astype(np.float64)
            w = (
                np.asarray(weights, dtype=np.float64)[source] / counts[source]
            )  # each file gets its weight's share
            self.prob = w / w.sum()
        self._cache: dict[int, np.ndarray] = {}

    def epoch(self, e: int) -> np.ndarray:
        """Sample indices of epoch `e` (a permutation, or weighted draws with replacement)."""
        if e not in self._cache:
            rng = np.random.default_rng([self.seed, e])
            order = (
                rng.permutation(self.n)
                if self.prob is None
                else rng.choice(self.n, self.n, p=self.prob)
            )
            self._cache = {e: order}  # one epoch at a time is enough
        return self._cache[e]

    def take(self, pos: int, n: int) -> np.ndarray:
        """The `n` indices at stream positions `pos .. pos+n-1`."""
        out = []
        while n > 0:
            e, off = divmod(pos, self.n)
            chunk = self.epoch(e)[off : off + n]
            out.append(chunk)
            pos += len(chunk)
            n -= len(chunk)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def roi_targets(
    visual_tokens: Sequence[torch.Tensor],
    roi_index: Sequence[torch.Tensor],
    k: int,
    *,
    assign: str = "raster",
    hop_index: Sequence[Sequence[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Pooled ROI targets `[B, k, d]` (`[B, 1, d]` for `first`), the ROI mask `[B]`, and per-sample negatives.

    `assign` is `align.assign` (`medlvr.data.roi.assigned_targets`); `chain` reads the
    collator's per-hop indices `hop_index` (`roi_hop_index`). The negatives are the non-ROI
    tokens (every hop's ROIs excluded). Everything is detached: targets are the backbone's
    own visual tokens, a moving target when the vision side trains, but never pulled
    towards the latents.
    """
    if not visual_tokens:
        raise MedlvrError("ROI alignment needs images: the batch has no visual tokens")
    d = visual_tokens[0].shape[-1]
    dev = visual_tokens[0].device
    targets = torch.zeros(
        len(visual_tokens), 1 if assign == "first" else k, d, device=dev, dtype=torch.float32
    )
    mask = torch.zeros(len(visual_tokens), dtype=torch.bool, device=dev)
    negatives: list[torch.Tensor] = []
    for i, (vis, idx) in enumerate(zip(visual_tokens, roi_index)):
        vis = vis.detach().float()
        keep = torch.ones(vis.shape[0], dtype=torch.bool, device=dev)
        if idx.numel():
            idx = idx.to(dev)
            targets[i] = assigned_targets(
                vis, idx, k, assign, hop_index[i] if hop_index is not None else None
            )
            mask[i] = True
            keep[idx] = False
        negatives.append(vis[keep])
    return targets, mask, negatives


def check_files(paths: Sequence[str], what: str) -> None:
    for p in paths:
        if not Path(p).is_file():
            raise MedlvrError(f"{what} file not found: {p}")


__all__ = ["TrainSet", "SampleStream", "load_train_set", "load_image", "roi_targets", "check_files"]
