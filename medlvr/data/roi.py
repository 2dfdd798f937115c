"""ROI boxes -> the backbone's visual-token indices -> K pooled alignment targets.

A box in original pixels is mapped through the processor's own resize (the
adapter's `token_grid`, which calls e.g. Qwen's `smart_resize`), so the tokens
are the ones whose cells overlap the box in the image the vision tower sees.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from medlvr.errors import MedlvrError
from medlvr.model.backbones import TokenGrid


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Clip a box to the image, warning if it stuck out; an empty result is an error."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        raise MedlvrError(f"ROI box {list(box)} is empty inside a {width}x{height} image")
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
            local = (max(x0, block.x0) - block.x0, max(y0, block.y0) - block.y0, x1 - block.x0, y1 - block.y0)
            out.extend(offset + t for t in _cells(local, block))
        offset += block.n_tokens
    return out


def _cells(box: tuple[float, float, float, float], grid: TokenGrid) -> list[int]:
    """Raster indices of the cells of one grid a box (in the grid's own coordinates) overlaps."""
    x0, y0, x1, y1 = box
    c0 = min(int(math.floor(x0 / grid.cell_w)), grid.cols - 1)
    r0 = min(int(math.floor(y0 / grid.cell_h)), grid.rows - 1)
    c1 = max(int(math.ceil(x1 / grid.cell_w)) - 1, c0)
    r1 = max(int(math.ceil(y1 / grid.cell_h)) - 1, r0)
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
