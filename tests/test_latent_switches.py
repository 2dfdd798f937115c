"""Training switches that aim at a latent producer that steps (issue 23): scheduled sampling between
gold and own latents, other hops' ROI tokens among the InfoNCE negatives, a region head."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from medlvr.config import AlignConfig, SFTConfig, load_config
from medlvr.data.collate import VQACollator
from medlvr.data.schema import read_jsonl
from medlvr.errors import MedlvrError
from medlvr.model.latent import LatentVLM
from medlvr.train import sft
from medlvr.train.latent_region import IGNORE, RegionLoss, hop_regions
from medlvr.train.losses import infonce_alignment
from medlvr.train.setup import hop_fields


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> Path:
    """Chain questions of 1-3 hops, 112-px images (4x4 visual tokens on the tiny model)."""
    from medlvr.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("chains13")
    generate(SynthConfig(n=60, seed=0, image_size=112, large_size=1.0, small_size=0.5,
                         question_types={"chain": 1.0}, hops=(1, 3), describe=False), out)  # fmt: skip
    return out


def _cfg(tiny_dir: Path, chains: Path, out: Path, *overrides: str) -> SFTConfig:
    return load_config(SFTConfig, None, [
        f"model.path={tiny_dir}", f"data.train=[{chains / 'train.jsonl'}]", f"output_dir={out}",
        "batch_size=4", "max_steps=6", "optim.lr=3e-3", "optim.warmup_steps=1", "log.every=1",
        "log.progress=false", "log.tensorboard=false", "latent.steps=6", "seed=0", "mode=roi",
        "align.assign=chain", *overrides,
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["gold_latents=1.5"], r"gold_latents and gold_latents_end must be in \[0, 1\]"),
        (["gold_latents_end=0.5"], "set both"),
        (["gold_latents=0.5", "mode=latent"], "mode roi"),
        (["gold_latents=0.5", "align.assign=raster"], "align.assign=chain"),
        (["align.negatives=other_hops", "align.assign=raster"], "align.assign=chain"),
        (["align.negatives=elsewhere"], "align.negatives"),
        (["align.region_weight=-1"], "region_weight must be >= 0"),
    ],
)
def test_switches_are_checked(tiny_dir, chains, tmp_path, overrides, message):
    with pytest.raises(MedlvrError, match=message):
        _cfg(tiny_dir, chains, tmp_path / "run", *overrides)


def test_a_per_step_negative_mask_equals_the_shared_one_when_alike_and_counts_other_hops():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    neg = torch.randn(2, 5, 8, generator=g)
    m2 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = torch.ones(2, dtype=torch.bool)
    shared = infonce_alignment(z, t, mask, neg, m2)
    per_step = infonce_alignment(z, t, mask, neg, m2[:, None].repeat(1, 3, 1))
    assert torch.allclose(shared, per_step)
    # a latent sitting on a token that becomes a negative for its step pays for it
    z2 = neg[:, 3:4].repeat(1, 3, 1)
    m3 = m2[:, None].repeat(1, 3, 1)
    m3[0, :, 3] = True
    assert (infonce_alignment(z2, t, mask, neg, m3) > infonce_alignment(z2, t, mask, neg, m2))[0]


def _batch(vlm, samples, chain_fields=True):
    fields = hop_fields(True) if chain_fields else {}
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=True, with_rois=True,
                          sample_fields=fields)  # fmt: skip
    return collate(samples)


def test_other_hop_negatives_leave_out_only_the_steps_own_hop(tiny_dir, chains):
    vlm = LatentVLM.from_pretrained(tiny_dir)
    samples = [s for s in read_jsonl(chains / "train.jsonl") if s.meta["hops"] == 3][:2]
    samples = [
        s.model_copy(update={"images": [str(chains / p) for p in s.images]}) for s in samples
    ]
    batch = _batch(vlm, samples)
    visual = vlm.visual_tokens(batch)
    neg, mask = sft._other_hop_negatives(visual, batch, 6)
    assert neg.shape[:2] == mask.shape[::2] and mask.shape[1] == 6
    for i, hops in enumerate(batch["roi_hop_index"]):
        for step, j in enumerate([0, 0, 1, 1, 2, 2]):
            out = set(torch.nonzero(~mask[i, step]).flatten().tolist())
            assert out == set(hops[j].tolist())  # the own hop's ROI tokens, and nothing else
        other = sorted(set(hops[1].tolist()) - set(hops[0].tolist()))
        assert other and mask[i, 0, other].all()  # hop 2's lesion is a negative of hop 1's steps


def test_gold_schedule_goes_linearly_from_start_to_end(tiny_dir, chains, tmp_path):
    cfg = _cfg(tiny_dir, chains, tmp_path / "r", "gold_latents=0.8", "gold_latents_end=0.2")
    assert [round(sft._gold_at(cfg, t, 4), 6) for t in range(4)] == [0.8, 0.6, 0.4, 0.2]
    off = _cfg(tiny_dir, chains, tmp_path / "r")
    assert sft._gold_at(off, 0, 4) == 0.0
    decay = _cfg(tiny_dir, chains, tmp_path / "r", "gold_latents=1.0")
    assert sft._gold_at(decay, 3, 4) == 0.0 and sft._gold_at(decay, 0, 4) == 1.0


def test_gold_given_marks_whole_hops_with_the_scheduled_probability(tiny_dir, chains, tmp_path):
    vlm = LatentVLM.from_pretrained(tiny_dir)
    cfg = _cfg(tiny_dir, chains, tmp_path / "r", "gold_latents=1.0")
    samples = [
        s.model_copy(update={"images": [str(chains / p) for p in s.images]})
        for s in read_jsonl(chains / "train.jsonl")[:8]
    ]
    batch = _batch(vlm, samples)
    targets, given = sft._gold_given(cfg, vlm, batch, 6, 1.0)
    assert given.all() and targets.shape == (8, 6, vlm.hidden_size)
    assert not sft._gold_given(cfg, vlm, batch, 6, 0.0)[1].any()
    torch.manual_seed(0)
    half = torch.stack([sft._gold_given(cfg, vlm, batch, 6, 0.5)[1] for _ in range(20)])
    assert 0.35 < half.float().mean() < 0.65
    for i, s in enumerate(samples):  # a hop's steps are fed gold together
        steps = {1: [[0] * 6], 2: [[0, 0, 0, 1, 1, 1]], 3: [[0, 0, 1, 1, 2, 2]]}[s.meta["hops"]][0]
        for a in range(6):
            for b in range(6):
                if steps[a] == steps[b]:
                    assert torch.equal(half[:, i, a], half[:, i, b])


def test_region_labels_follow_the_hops_of_the_steps(chains):
    s = next(s for s in read_jsonl(chains / "train.jsonl") if s.meta["hops"] == 3)
    regions = hop_regions(s, [(112, 112)], 3)
    names = [
        "upper left", "upper middle", "upper right", "middle left", "center", "middle right",
        "lower left", "lower middle", "lower right",
    ]  # fmt: skip
    assert [names[r] for r in regions] == s.meta["chain"]  # the synthetic regions are the 3x3 cells
    assert hop_regions(s.model_copy(update={"rois": []}), [(112, 112)], 3) == []
    loss = RegionLoss(AlignConfig(region_weight=1.0), 8)
    labels = loss.labels({"hop_regions": [regions, [], [4]]}, 6)
    assert labels[0].tolist() == [regions[0]] * 2 + [regions[1]] * 2 + [regions[2]] * 2
    assert labels[1].tolist() == [IGNORE] * 6 and labels[2].tolist() == [4] * 6


def test_sft_with_every_switch_trains_the_region_head_and_exports_without_it(
    tiny_dir, chains, tmp_path
):
    cfg = _cfg(tiny_dir, chains, tmp_path / "run", "gold_latents=0.5", "align.negatives=other_hops",
               "align.region_weight=1.0", "model.freeze_vision=true", "model.freeze_merger=true",
               "max_steps=12")  # fmt: skip
    res = sft.run_sft(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "region" in r]
    assert len(rows) == 12 and all(r["align"] is not None for r in rows)
    assert rows[-1]["region"] < rows[0]["region"]  # the head learns
    assert not any("region" in p.name for p in Path(res.final_model).iterdir())
    LatentVLM.from_pretrained(res.final_model)


def test_lookup_feeds_cell_means_trains_its_head_and_round_trips(tiny_dir, chains, tmp_path):
    from medlvr.config import LatentConfig

    vlm = LatentVLM.from_pretrained(tiny_dir, LatentConfig(steps=3, lookup_grid=2))
    samples = [
        s.model_copy(update={"images": [str(chains / p) for p in s.images]})
        for s in read_jsonl(chains / "train.jsonl")[:3]
    ]
    batch = _batch(vlm, samples)
    out = vlm.generate(batch, 3, max_new_tokens=2)
    visual = vlm.visual_tokens(batch)
    (rows, cols) = vlm.adapter.visual_grid_shapes(vlm.base_model, batch)[0]
    cell = (
        torch.arange(rows)[:, None] * 2 // rows * 2 + torch.arange(cols)[None] * 2 // cols
    ).flatten()
    for i, v in enumerate(
        visual
    ):  # a zero head weighs the four cells alike: the mean of their means
        means = torch.stack([v[cell == c].float().mean(0) for c in range(4)])
        for k in range(3):
            assert torch.allclose(out.latent_means[i, k].float(), means.mean(0), atol=1e-5)
    assert torch.equal(out.latents, out.latent_means)
    fwd = vlm(_batch(vlm, samples), latent_steps=3)
    assert fwd.lookup_logits.shape == (3, 3, 4)
    fwd.loss.backward()
    assert vlm.lookup.weight.grad is not None and vlm.lookup.weight.grad.abs().sum() > 0
    with torch.no_grad():
        vlm.lookup.weight.normal_()
    vlm.save_pretrained(tmp_path / "m")
    again = LatentVLM.from_pretrained(tmp_path / "m")
    assert again.latent.lookup_grid == 2 and torch.equal(again.lookup.weight, vlm.lookup.weight)
    with pytest.raises(MedlvrError, match="lookup_grid"):
        LatentConfig(lookup_grid=2, input="pause")


def test_sft_with_lookup_supervises_the_lookup_head(tiny_dir, chains, tmp_path):
    with pytest.raises(MedlvrError, match=r"must equal latent\.lookup_grid"):
        _cfg(tiny_dir, chains, tmp_path / "x", "latent.lookup_grid=2", "align.region_weight=1.0")
    cfg = _cfg(tiny_dir, chains, tmp_path / "run", "latent.lookup_grid=3", "align.region_weight=1.0",
               "align.negatives=other_hops", "max_steps=10")  # fmt: skip
    res = sft.run_sft(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "region" in r]
    # the zero-started lookup head is what the labels score (uniform: ln 9), then it moves
    assert rows[0]["region"] == pytest.approx(math.log(9), abs=1e-4)
    assert len({round(r["region"], 4) for r in rows}) > 5
    model = LatentVLM.from_pretrained(res.final_model)
    assert model.lookup is not None and model.lookup.weight.abs().sum() > 0
