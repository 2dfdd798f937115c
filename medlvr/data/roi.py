"""ROI boxes -> the backbone's visual-token indices -> K pooled alignment targets.

Which ROI tokens each latent step is aligned to is `align.assign`: `raster` pools all
of a sample's ROI tokens into K chunks in raster order, `first` into one target for
the first step, `chain` gives each hop of a multi-hop record its own contiguous group
of steps (`hop_of_steps`), pooled from that hop's ROIs only (`chain_targets`).

A box in original pixels is mapped through the processor's own resize (the
adapter's `token_grid`, which calls e.g. Qwen's `smart_resize`), so the tokens
are the ones whose cells overlap the box in the image the vision tower sees.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from medlvr.data.schema import VQASample, box_outside
from medlvr.errors import MedlvrError
from medlvr.model.backbones import TokenGrid


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Clip a box to the image, warning if it stuck out; an empty result is an error."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if (
        why := box_outside(box, width, height)
    ) is not None:  # the readers' rule (`medlvr data validate`)
        raise MedlvrError(f"ROI {why}")
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        warnings.warn(f"ROI box {list(box)} clipped to the {width}x{height} image", stacklevel=2)
    return cx0, cy0, cx1, cy1


def box_to_tokens(box: Sequence[float], grid: TokenGrid, width: int, height: int) -> list[int]:
    """Indices of the visual tokens whose cells a box overlaps, within one image.

    Raster order (row-major) in a one-grid image; with `grid.blocks` (tiles plus a
    global image), the overlapped cells of each block in turn, offset by the tokens
    of the blocks before it.
    """
    clipped = clip_box(box, width, height)
    if not grid.blocks:
        return _cells(clipped, grid)
    out: list[int] = []
    offset = 0
    for block in grid.blocks:
        x0, y0, x1, y1 = clipped
        bx1, by1 = block.x0 + block.cols * block.cell_w, block.y0 + block.rows * block.cell_h
        if x1 > block.x0 and x0 < bx1 and y1 > block.y0 and y0 < by1:
            local = (
                max(x0, block.x0) - block.x0,
                max(y0, block.y0) - block.y0,
                x1 - block.x0,
                y1 - block.y0,
            )
            out.extend(offset + t for t in _cells(local, block))
        offset += block.n_tokens
    return out


def _cells(box: tuple[float, float, float, float], grid: TokenGrid) -> list[int]:
    """Raster indices of the cells of one grid a box (in the grid's own coordinates) overlaps."""
    x0, y0, x1, y1 = box
    c0 = min(math.floor(x0 / grid.cell_w), grid.cols - 1)
    r0 = min(math.floor(y0 / grid.cell_h), grid.rows - 1)
    c1 = max(math.ceil(x1 / grid.cell_w) - 1, c0)
    r1 = max(math.ceil(y1 / grid.cell_h) - 1, r0)
    c1, r1 = min(c1, grid.cols - 1), min(r1, grid.rows - 1)
    return [r * grid.cols + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def sample_roi_indices(
    rois: Sequence[tuple[int, Sequence[float]]],
    grids: Sequence[TokenGrid],
    sizes: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Indices into a sample's visual tokens (all its images concatenated in order) covered by its ROIs.

    `rois` are `(image index, box)`; `grids[i]` and `sizes[i] = (width, height)` describe image i.
    Returns sorted unique indices, i.e. the images' token order (raster, block by block for tiled images).
    """
    offsets = [0]
    for g in grids:
        offsets.append(offsets[-1] + g.n_tokens)
    out: set[int] = set()
    for image, box in rois:
        if image >= len(grids):
            raise MedlvrError(f"ROI on image {image} but the sample has {len(grids)} image(s)")
        w, h = sizes[image]
        out.update(offsets[image] + t for t in box_to_tokens(box, grids[image], w, h))
    return torch.tensor(sorted(out), dtype=torch.long)


def pool_targets(visual_tokens: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """K targets `[k, d]`: the ROI tokens in raster order, split into k contiguous chunks and averaged.

    With fewer ROI tokens than k, chunks repeat tokens (target i uses token floor(i * n / k)).
    """
    n = int(indices.numel())
    if n == 0:
        raise MedlvrError("no ROI tokens to pool")
    if k < 1:
        raise MedlvrError(f"k must be >= 1, got {k}")
    roi = visual_tokens[indices.to(visual_tokens.device)]  # [n, d]
    if n < k:
        pick = torch.tensor([i * n // k for i in range(k)], device=roi.device)
        return roi[pick]
    return torch.stack([chunk.mean(0) for chunk in torch.tensor_split(roi, k, dim=0)])


# ---------------------------------------------------------------------------- per-hop alignment (align.assign)


def roi_hops(sample: VQASample) -> list[int] | None:
    """The 0-based hop of each of a sample's ROIs, from its multi-hop metadata; None without it.

    Multi-hop records list their `rois` in reasoning order and carry `meta["roi_hops"]`,
    the 1-based hop of each ROI (several ROIs may share a hop), and `meta["hops"]`, the
    number of hops h (defaults to the largest hop). Every hop 1..h needs at least one ROI,
    since each hop's latent steps are aligned to that hop's ROI tokens. A record without
    `roi_hops` is one hop (chain alignment then equals raster alignment).
    """
    hops = sample.meta.get("roi_hops")
    if hops is None or not sample.rois:
        return None
    where = f"sample {sample.id!r}: meta.roi_hops"
    if not isinstance(hops, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hops
    ):
        raise MedlvrError(f"{where} must be a list of 1-based hop numbers, got {hops!r}")
    if len(hops) != len(sample.rois):
        raise MedlvrError(
            f"{where} has {len(hops)} entries for {len(sample.rois)} ROIs (one hop per ROI)"
        )
    n = sample.meta.get("hops", max(hops, default=0))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise MedlvrError(f"sample {sample.id!r}: meta.hops must be an integer >= 1, got {n!r}")
    if any(not 1 <= h <= n for h in hops):
        raise MedlvrError(f"{where} = {hops} must lie in 1..{n} (meta.hops)")
    missing = sorted(set(range(1, n + 1)) - set(hops))
    if missing:
        raise MedlvrError(
            f"{where} = {hops}: hop(s) {missing} of {n} have no ROI to align their latent steps to"
        )
    return [h - 1 for h in hops]


def hop_roi_indices(
    sample: VQASample, grids: Sequence[TokenGrid], sizes: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Per hop, in reasoning order, the sample's visual-token indices covered by that hop's ROIs.

    Each entry is `sample_roi_indices` of the hop's ROIs (sorted, raster order); a sample
    without `meta.roi_hops` is one hop holding all its ROIs; no ROI gives `[]`.
    """
    if not sample.rois:
        return []
    rois = [(r.image, r.box) for r in sample.rois]
    hops = roi_hops(sample) or [0] * len(rois)
    return [
        sample_roi_indices([r for r, h in zip(rois, hops) if h == j], grids, sizes)
        for j in range(max(hops) + 1)
    ]


def hop_of_steps(k: int, hops: int) -> list[int]:
    """The 0-based hop each of K latent steps is aligned to under `align.assign=chain`.

    Step i (0-based) goes to hop `ceil((i + 1) * h / K) - 1`: contiguous groups in reasoning
    order, every hop floor(K/h) or ceil(K/h) steps (the first hop floor, the final hop ceil: a
    remainder's extra steps are spread evenly over the later hops), and the last step always
    on the final hop (the one the answer reads). With K < h every step
    gets its own hop, spread evenly and ending on the final one, so some hops, always the
    first, get none. E.g. K=4, h=3 -> [0, 1, 2, 2]; K=6, h=2 -> [0, 0, 0, 1, 1, 1];
    K=2, h=3 -> [1, 2]; K=2, h=4 -> [1, 3].
    """
    if k < 0 or hops < 1:
        raise MedlvrError(f"need K >= 0 latent steps and h >= 1 hops, got K={k}, h={hops}")
    return [-(-(i + 1) * hops // k) - 1 for i in range(k)]


def chain_targets(
    visual_tokens: torch.Tensor, hop_indices: Sequence[torch.Tensor], k: int
) -> torch.Tensor:
    """K per-hop targets `[k, d]`: the s steps of hop j (`hop_of_steps`) pool hop j's ROI tokens as `pool_targets` does."""
    steps = hop_of_steps(k, len(hop_indices))
    parts = []
    for j, idx in enumerate(hop_indices):
        s = steps.count(j)
        if s:
            if idx.numel() == 0:
                raise MedlvrError(
                    f"hop {j + 1} of {len(hop_indices)} has no ROI tokens to align its {s} latent step(s) to"
                )
            parts.append(pool_targets(visual_tokens, idx, s))
    return torch.cat(parts) if parts else visual_tokens.new_zeros(0, visual_tokens.shape[-1])


def assigned_targets(
    visual_tokens: torch.Tensor,
    roi_index: torch.Tensor,
    k: int,
    assign: str = "raster",
    hop_indices: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One sample's alignment targets under `align.assign`: `[k, d]`, or `[1, d]` for `first`.

    `raster`: the ROI tokens (`roi_index`, all hops) pooled into K chunks in raster order;
    `first`: all of them pooled into one target (the mean ROI token) for the first latent;
    `chain`: `chain_targets` over `hop_indices` (`hop_roi_indices`; None = one hop = raster).
    """
    if assign == "first":
        return pool_targets(visual_tokens, roi_index, 1)
    if assign == "chain" and hop_indices is not None and len(hop_indices) > 1:
        return chain_targets(visual_tokens, hop_indices, k)
    if assign not in ("raster", "chain"):
        raise MedlvrError(f"align.assign must be raster, first or chain, got {assign!r}")
    return pool_targets(visual_tokens, roi_index, k)
