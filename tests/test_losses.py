"""Pure training losses: alignment kinds, masking, detached targets, shard-invariant CE; LR schedule."""

from __future__ import annotations

import itertools

import pytest
import torch

from medlvr.config import OptimConfig
from medlvr.train.losses import alignment_loss, pad_tokens, sample_mean_ce
from medlvr.train.optim import lr_factor


def _setup(b=3, k=2, d=8, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, k, d, generator=g, requires_grad=True)
    targets = torch.randn(b, k, d, generator=g, requires_grad=True)
    neg = [torch.randn(n - i, d, generator=g) for i in range(b)]
    return latents, targets, neg


@pytest.mark.parametrize("kind", ["cosine", "mse", "infonce"])
def test_masked_samples_contribute_nothing_and_targets_get_no_gradient(kind):
    latents, targets, neg = _setup()
    mask = torch.tensor([True, False, True])
    negs, nmask = pad_tokens(neg, 8)
    per = alignment_loss(kind, latents, targets, mask, negatives=negs, negatives_mask=nmask)
    assert per.shape == (3,) and per[1] == 0 and (per[[0, 2]] > 0).all()
    per.sum().backward()
    assert targets.grad is None, "targets must be detached"
    assert latents.grad[1].abs().max() == 0 and latents.grad[0].abs().max() > 0


def test_alignment_is_zero_or_minimal_at_the_target():
    _, targets, neg = _setup()
    mask = torch.ones(3, dtype=torch.bool)
    t = targets.detach()
    assert alignment_loss("cosine", t.clone(), t, mask).abs().max() < 1e-6
    assert alignment_loss("mse", t.clone(), t, mask).abs().max() < 1e-12
    # InfoNCE: at the target the positive wins against unrelated negatives
    negs, nmask = pad_tokens(neg, 8)
    at = alignment_loss(
        "infonce", t.clone(), t, mask, negatives=negs, negatives_mask=nmask, temperature=0.1
    )
    away = alignment_loss(
        "infonce", -t.clone(), t, mask, negatives=negs, negatives_mask=nmask, temperature=0.1
    )
    assert (at < 0.5).all() and (away > at).all()


def test_infonce_penalises_the_shared_direction_that_cosine_rewards():
    """The NOTES shortcut: a latent on the mean visual token satisfies cosine, not InfoNCE."""
    torch.manual_seed(0)
    d = 16
    common = torch.randn(d) * 3  # the direction every visual token shares
    tokens = common + torch.randn(10, d)  # one image's visual tokens
    roi, others = tokens[:1], tokens[1:]
    mask = torch.ones(1, dtype=torch.bool)
    on_mean = tokens.mean(0).view(1, 1, d)
    on_roi = roi.view(1, 1, d)
    negs, nmask = pad_tokens([others], d)
    cos_mean = alignment_loss("cosine", on_mean, roi.view(1, 1, d), mask)
    nce_mean = alignment_loss(
        "infonce", on_mean, roi.view(1, 1, d), mask, negatives=negs, negatives_mask=nmask
    )
    nce_roi = alignment_loss(
        "infonce", on_roi, roi.view(1, 1, d), mask, negatives=negs, negatives_mask=nmask
    )
    assert cos_mean < 0.2, "cosine is nearly satisfied by the shared direction"
    assert nce_mean > nce_roi + 0.5, "InfoNCE separates the ROI from the image's other tokens"


def test_padded_negatives_are_ignored():
    latents, targets, neg = _setup()
    mask = torch.ones(3, dtype=torch.bool)
    negs, nmask = pad_tokens(neg, 8)
    a = alignment_loss("infonce", latents, targets, mask, negatives=negs, negatives_mask=nmask)
    negs2 = negs.clone()
    negs2[~nmask] = 100.0  # garbage in padded slots
    b = alignment_loss("infonce", latents, targets, mask, negatives=negs2, negatives_mask=nmask)
    assert torch.allclose(a, b)


def test_unknown_kind_and_shape_mismatch():
    latents, targets, _ = _setup()
    with pytest.raises(ValueError, match="unknown alignment kind"):
        alignment_loss("l1", latents, targets, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="differ"):
        alignment_loss("cosine", latents[:, :1], targets, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="negatives"):
        alignment_loss("infonce", latents, targets, torch.ones(3, dtype=torch.bool))


def test_sample_mean_ce_sums_the_same_over_any_split():
    torch.manual_seed(0)
    lp = -torch.rand(6, 5)
    mask = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 0, 0, 0, 0],
        ]
    )
    whole = sample_mean_ce(lp, mask).sum()
    halves = sample_mean_ce(lp[:3], mask[:3]).sum() + sample_mean_ce(lp[3:], mask[3:]).sum()
    assert torch.allclose(whole, halves)
    assert torch.allclose(sample_mean_ce(lp, mask)[2], -lp[2, 0])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_then_decays_to_the_floor(schedule):
    cfg = OptimConfig(warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    f = [lr_factor(s, 20, cfg) for s in range(21)]
    assert f[0] == pytest.approx(0.25) and f[3] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(f[:4]))
    if schedule == "constant":
        assert f[20] == 1.0
    else:
        assert f[20] == pytest.approx(0.1) and all(
            a >= b - 1e-12 for a, b in itertools.pairwise(f[4:])
        )
