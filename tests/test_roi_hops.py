"""Per-hop ROI alignment (`align.assign`): step-to-hop assignment and targets on a hand-built grid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medlvr.data.roi import (
    assigned_targets,
    chain_targets,
    hop_of_steps,
    hop_roi_indices,
    roi_hops,
    sample_roi_indices,
)
from medlvr.data.schema import ROI, VQASample
from medlvr.errors import MedlvrError
from medlvr.model.backbones import TokenGrid
from medlvr.train.data import roi_targets
from medlvr.train.rewards import RewardContext, roi_evidence

GRID = TokenGrid(rows=4, cols=5, cell_w=28.0, cell_h=25.0)  # a 140x100 image, token = row * 5 + col
SIZE = [(140, 100)]
# Three hops in reasoning order; hop 3 has two ROIs.
BOXES = [(0, 0, 50, 45), (90, 55, 135, 95), (60, 0, 80, 20), (0, 80, 20, 100)]
HOP_TOKENS = [[0, 1, 5, 6], [13, 14, 18, 19], [2, 15]]
TOKENS = torch.stack([torch.arange(20.0), torch.ones(20)], 1)  # token i = (i, 1)


def _sample(boxes=BOXES, **meta) -> VQASample:
    return VQASample(id="h", dataset="d", split="train", images=["a"], question="q?", answer="round",
                     answer_type="open", rois=[ROI(box=b) for b in boxes], meta=meta)  # fmt: skip


def _hops() -> list[torch.Tensor]:
    return hop_roi_indices(_sample(roi_hops=[1, 2, 3, 3], hops=3), [GRID], SIZE)


@pytest.mark.parametrize(
    ("k", "h", "expected"),
    [
        (4, 3, [0, 1, 2, 2]),
        (2, 3, [1, 2]),
        (6, 2, [0, 0, 0, 1, 1, 1]),
        (5, 2, [0, 0, 1, 1, 1]),
        (3, 1, [0, 0, 0]),
        (3, 3, [0, 1, 2]),
        (2, 4, [1, 3]),
        (6, 4, [0, 1, 1, 2, 3, 3]),
        (0, 2, []),
    ],
)
def test_hop_of_steps_examples(k, h, expected):
    assert hop_of_steps(k, h) == expected


def test_hop_of_steps_groups_are_contiguous_balanced_and_end_on_the_last_hop():
    for k in range(1, 13):
        for h in range(1, 7):
            steps = hop_of_steps(k, h)
            assert steps == sorted(steps) and steps[-1] == h - 1
            counts = [steps.count(j) for j in range(h)]
            if (
                k >= h
            ):  # every hop gets floor or ceil of K/h: the first hop floor, the final hop ceil
                assert set(counts) <= {k // h, math.ceil(k / h)} and sum(counts) == k
                assert counts[0] == k // h and counts[-1] == math.ceil(k / h)
            else:  # one hop per step, spread evenly: the first hop gets none
                assert len(set(steps)) == k and counts[0] == 0


def test_hop_indices_follow_the_boxes_per_hop():
    assert [t.tolist() for t in _hops()] == HOP_TOKENS
    # no roi_hops: one hop holding every ROI, i.e. the raster indices
    one = hop_roi_indices(_sample(), [GRID], SIZE)
    assert (
        len(one) == 1
        and one[0].tolist() == sample_roi_indices([(0, b) for b in BOXES], [GRID], SIZE).tolist()
    )
    assert hop_roi_indices(_sample(boxes=[]), [GRID], SIZE) == []


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (4, [3.0, 16.0, 2.0, 15.0]),
        (2, [16.0, 8.5]),
        (6, [0.5, 5.5, 13.5, 18.5, 2.0, 15.0]),
        (3, [3.0, 16.0, 8.5]),
    ],
)
def test_chain_targets_equal_hand_computed_means(k, expected):
    out = chain_targets(TOKENS, _hops(), k)
    assert out.shape == (k, 2)
    assert out[:, 0].tolist() == expected and (out[:, 1] == 1).all()


def test_raster_first_and_chain_on_the_same_sample():
    hops = _hops()
    union = sample_roi_indices(
        [(0, b) for b in BOXES], [GRID], SIZE
    )  # [0, 1, 2, 5, 6, 13, 14, 15, 18, 19]
    assert assigned_targets(TOKENS, union, 4, "raster")[:, 0].tolist() == [1.0, 8.0, 14.5, 18.5]
    assert assigned_targets(TOKENS, union, 4, "first")[:, 0].tolist() == [pytest.approx(9.3)]
    assert assigned_targets(TOKENS, union, 4, "chain", hops)[:, 0].tolist() == [
        3.0,
        16.0,
        2.0,
        15.0,
    ]
    # one hop (no roi_hops): chain is raster
    assert torch.equal(
        assigned_targets(TOKENS, union, 4, "chain", [union]),
        assigned_targets(TOKENS, union, 4, "raster"),
    )
    with pytest.raises(MedlvrError, match=r"align.assign"):
        assigned_targets(TOKENS, union, 4, "diagonal")


def test_batch_targets_mask_and_negatives_under_chain():
    hops = _hops()
    union = torch.cat(hops).unique()
    vis = [TOKENS, TOKENS + 100]
    targets, mask, negatives = roi_targets(
        vis, [union, torch.zeros(0, dtype=torch.long)], 4, assign="chain", hop_index=[hops, []]
    )
    assert targets.shape == (2, 4, 2) and mask.tolist() == [True, False]
    assert targets[0, :, 0].tolist() == [3.0, 16.0, 2.0, 15.0] and (targets[1] == 0).all()
    # negatives: the other visual tokens of the image, every hop's ROIs excluded
    assert sorted(negatives[0][:, 0].tolist()) == [
        float(i) for i in range(20) if i not in union.tolist()
    ]
    assert negatives[1].shape == (20, 2)
    first, _, _ = roi_targets(vis, [union, torch.zeros(0, dtype=torch.long)], 4, assign="first")
    assert first.shape == (2, 1, 2)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"roi_hops": [1, 2, 3], "hops": 3}, "3 entries for 4 ROIs"),
        ({"roi_hops": [1, 2, 4, 4], "hops": 3}, r"must lie in 1\.\.3"),
        ({"roi_hops": [0, 1, 2, 2], "hops": 2}, r"must lie in 1\.\.2"),
        ({"roi_hops": [1, 3, 3, 3], "hops": 3}, r"hop\(s\) \[2\] of 3 have no ROI"),
        ({"roi_hops": "1,2,3,3", "hops": 3}, "list of 1-based hop numbers"),
        ({"roi_hops": [1, 2, 3, 3], "hops": "3"}, "meta.hops must be an integer"),
    ],
)
def test_malformed_roi_hops_are_clear_errors(meta, message):
    with pytest.raises(MedlvrError, match=message):
        roi_hops(_sample(**meta))


def test_roi_hops_parsing():
    assert roi_hops(_sample(roi_hops=[1, 2, 3, 3], hops=3)) == [0, 1, 2, 2]
    assert roi_hops(_sample(roi_hops=[1, 2, 3, 3])) == [
        0,
        1,
        2,
        2,
    ]  # hops defaults to the largest hop
    assert roi_hops(_sample()) is None
    assert roi_hops(_sample(boxes=[], roi_hops=[])) is None


def test_roi_evidence_scores_the_assignment_of_the_context():
    hops = _hops()
    union = torch.cat(hops).unique()
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    ctx = dict(visual_tokens=TOKENS, roi_index=union)
    raster = roi_evidence(_sample(), "", z, RewardContext(**ctx))
    chain = roi_evidence(_sample(), "", z, RewardContext(**ctx, assign="chain", roi_hop_index=hops))
    first = roi_evidence(_sample(), "", z, RewardContext(**ctx, assign="first"))
    cos = lambda t: float(F.cosine_similarity(z[: len(t)], t, dim=-1).mean())  # noqa: E731
    assert raster == pytest.approx(cos(assigned_targets(TOKENS, union, 4, "raster")))
    assert chain == pytest.approx(cos(chain_targets(TOKENS, hops, 4)))
    assert first == pytest.approx(cos(TOKENS[union].mean(0, keepdim=True)))
    assert chain != pytest.approx(raster)
