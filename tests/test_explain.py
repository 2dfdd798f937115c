"""Evidence maps of the latent steps and their measured faithfulness."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from medlvr.cli import app as cli_app
from medlvr.config import LatentConfig
from medlvr.data.collate import VQACollator
from medlvr.data.roi import box_to_tokens, pool_targets
from medlvr.errors import MedlvrError
from medlvr.explain import (
    ExplainConfig,
    compute_maps,
    explain,
    explain_metrics,
    format_metrics,
    normalise,
    pointing_hit,
    roi_coverage,
    roi_mass,
    top_regions,
)
from medlvr.model.backbones import TokenGrid, families
from medlvr.model.latent import LatentVLM
from tests.conftest import random_image


@pytest.fixture(scope="module")
def vlm(tiny_dir):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(tiny_dir, LatentConfig(steps=3, projector="linear"))


# ---------------------------------------------------------------------------- metrics on hand-made maps

GRID = TokenGrid(rows=4, cols=6, cell_w=28.0, cell_h=28.0)  # a 168 x 112 image
SIZE = (168, 112)


def test_roi_mass_of_the_box_indicator_is_one_and_of_its_complement_zero():
    box = (28.0, 28.0, 84.0, 56.0)  # cells (1, 1) and (1, 2)
    cov = roi_coverage(GRID, SIZE, [box])
    assert cov.shape == (4, 6)
    inside = torch.zeros(4, 6)
    inside[1, 1:3] = 1.0
    assert torch.equal(cov, inside)
    assert roi_mass(inside, cov) == pytest.approx(1.0)
    assert roi_mass(1 - inside, cov) == pytest.approx(0.0)
    assert roi_mass(torch.ones(4, 6), cov) == pytest.approx(
        2 / 24
    )  # a uniform map: the box's share of the area


def test_roi_coverage_is_fractional_for_a_box_inside_one_cell():
    cov = roi_coverage(GRID, SIZE, [(0, 0, 14, 28)])  # the left half of cell (0, 0)
    assert cov[0, 0] == pytest.approx(0.5)
    assert cov.sum() == pytest.approx(0.5)
    peak_there = torch.zeros(4, 6)
    peak_there[0, 0] = 1.0
    assert roi_mass(peak_there, cov) == pytest.approx(0.5)


def test_pointing_game_hits_and_misses_as_constructed():
    cov = roi_coverage(GRID, SIZE, [(30, 60, 50, 80)])  # inside cell (2, 1)
    hit = torch.full((4, 6), 0.1)
    hit[2, 1] = 0.9
    miss = torch.full((4, 6), 0.1)
    miss[0, 5] = 0.9
    assert pointing_hit(hit, cov)
    assert not pointing_hit(miss, cov)
    # Two boxes: a peak in either one hits.
    cov2 = roi_coverage(GRID, SIZE, [(30, 60, 50, 80), (150, 0, 168, 20)])
    assert pointing_hit(miss, cov2)


def test_normalise_and_top_regions():
    m = normalise(torch.tensor([[0.0, 3.0], [1.0, -2.0]]))
    assert m.sum() == pytest.approx(1.0) and m.min() >= 0
    top = top_regions(m, TokenGrid(2, 2, 50.0, 40.0), 2)
    assert top[0]["cell"] == [0, 1] and top[0]["box"] == [50.0, 0.0, 100.0, 40.0]
    assert top[0]["score"] == pytest.approx(0.75) and top[1]["cell"] == [1, 0]
    assert torch.allclose(normalise(torch.zeros(3)), torch.full((3,), 1 / 3))


# ---------------------------------------------------------------------------- maps on a tiny model


def test_maps_have_grid_shape_sum_to_one_and_reproduce_the_latent_chain(vlm, tmp_path):
    images = [random_image(140, 100, seed=1), random_image(168, 168, seed=2)]
    ex = explain(
        vlm,
        images,
        "What is the shape of the lesion?",
        {"A": "round", "B": "square"},
        latent_steps=3,
    )
    m = ex.maps
    grids = [vlm.adapter.token_grid(vlm.processor, *im.size) for im in images]
    n = sum(g.n_tokens for g in grids)
    for kind in ("similarity", "attention"):
        maps = m.get(kind)
        assert maps.shape == (3, n)
        assert torch.allclose(maps.sum(-1), torch.ones(3), atol=1e-5)
        assert (maps >= 0).all()
        per_image = m.per_image(maps)
        assert [tuple(t.shape) for t in per_image] == [(3, g.rows, g.cols) for g in grids]
        assert m.aggregate(kind).sum() == pytest.approx(1.0, abs=1e-5)
    assert ((m.cosine >= -1 - 1e-5) & (m.cosine <= 1 + 1e-5)).all()
    assert ((m.attention_to_image > 0) & (m.attention_to_image < 1)).all()
    # The attention pass recomputes proj(h_{k-1}) = z_k: it is the same computation as generation.
    assert m.recompute_gap < 1e-4
    # The backbone's own attention implementation is restored afterwards.
    assert vlm.base_model.config._attn_implementation != "eager"
    # Different steps point differently (the maps are not one constant).
    assert not torch.allclose(m.similarity[0], m.similarity[1])

    png, js = ex.save(tmp_path / "ex.png")
    assert Image.open(png).size[0] > 400
    regions = json.loads(js.read_text())
    assert regions["latent_steps"] == 3 and len(regions["images"]) == 2
    entry = regions["images"][1]
    assert entry["grid"] == [grids[1].rows, grids[1].cols]
    assert len(entry["similarity"]["steps"]) == 3 and len(entry["attention"]["aggregate"]) == 5
    assert sum(e["similarity"]["mass"] for e in regions["images"]) == pytest.approx(1.0, abs=1e-4)
    box = entry["similarity"]["aggregate"][0]["box"]
    assert 0 <= box[0] < box[2] <= 168 and 0 <= box[1] < box[3] <= 168


@pytest.mark.parametrize("family", families())
def test_explanations_and_roi_metrics_work_for_every_family(tiny_factory, family, tmp_path):
    """Maps, figure, regions, ROI mass and pointing on each family's own token layout (SmolVLM: tiles + a global view)."""
    torch.manual_seed(0)
    vlm = LatentVLM.from_pretrained(tiny_factory(family), LatentConfig(steps=2, projector="linear"))
    images = [random_image(140, 100, seed=1), random_image(96, 160, seed=2)]
    ex = explain(
        vlm,
        images,
        "Where is the lesion?",
        {"A": "left", "B": "right"},
        latent_steps=2,
        max_new_tokens=4,
    )
    m = ex.maps
    grids = [vlm.adapter.token_grid(vlm.processor, *im.size) for im in images]
    n = sum(g.n_tokens for g in grids)
    n_cells = sum(g.rows * g.cols for g in grids)
    for kind in ("similarity", "attention"):
        maps = m.get(kind)  # [K, N]
        assert maps.shape == (2, n) and (maps >= 0).all()
        assert torch.allclose(maps.sum(-1), torch.ones(2), atol=1e-5)
        per_image = m.per_image(maps)
        assert [tuple(t.shape) for t in per_image] == [(2, g.rows, g.cols) for g in grids]
        assert torch.allclose(
            sum(t.sum((-2, -1)) for t in per_image), torch.ones(2), atol=1e-5
        )  # still sums to 1 per step
        assert m.cells(maps).shape == (2, n_cells)

    # An indicator map over the tokens of a box on image 2 puts all its mass inside the box. The box is one
    # cell of the image's coarsest view, so each view's cells it touches lie inside it. (Its tokens are taken
    # 1e-6 px inside its edges: they lie on cell edges, where float rounding could add a neighbouring cell.)
    w, h = images[1].size
    coarse = max([grids[1], *grids[1].blocks], key=lambda b: b.cell_w * b.cell_h)
    box = (coarse.cell_w, coarse.cell_h, 2 * coarse.cell_w, 2 * coarse.cell_h)
    inner = (box[0] + 1e-6, box[1] + 1e-6, box[2] - 1e-6, box[3] - 1e-6)
    tokens = [grids[0].n_tokens + t for t in box_to_tokens(inner, grids[1], w, h)]
    indicator = torch.zeros(n)
    indicator[tokens] = 1.0 / len(tokens)
    cov = torch.cat(
        [
            roi_coverage(grids[0], images[0].size, []).flatten(),
            roi_coverage(grids[1], (w, h), [box]).flatten(),
        ]
    )
    assert cov.shape == (n_cells,)
    assert roi_mass(m.cells(indicator), cov) == pytest.approx(1.0, abs=1e-6)
    assert pointing_hit(m.cells(indicator), cov)
    elsewhere = torch.zeros(n)
    elsewhere[: grids[0].n_tokens] = 1.0  # all on image 1
    assert roi_mass(m.cells(elsewhere), cov) == 0.0 and not pointing_hit(m.cells(elsewhere), cov)

    png, js = ex.save(tmp_path / "ex.png")
    assert Image.open(png).size[0] > 400
    regions = json.loads(js.read_text())
    assert [e["grid"] for e in regions["images"]] == [[g.rows, g.cols] for g in grids]
    assert sum(e["attention"]["mass"] for e in regions["images"]) == pytest.approx(1.0, abs=1e-4)
    for e, (iw, ih) in zip(regions["images"], (im.size for im in images)):
        for cell in e["similarity"]["aggregate"]:
            x0, y0, x1, y1 = cell["box"]
            assert 0 <= x0 < x1 <= iw + 0.01 and 0 <= y0 < y1 <= ih + 0.01

    _, test = _synth(0, 2)
    metrics = explain_metrics(vlm, [s for s, _ in test], 2, images=[im for _, im in test])
    assert metrics["n"] == 2 and metrics["max_recompute_gap"] < 1e-4
    for name in ("similarity", "attention", "random"):
        assert 0 <= metrics[name]["pointing"] <= 1 and 0 <= metrics[name]["roi_mass"] <= 1
    assert 0 < metrics["chance"]["roi_mass"] < metrics["chance"]["pointing"] < 1


def test_attention_layers_choice_changes_the_map_and_bad_layers_fail(vlm):
    images = [random_image(112, 112, seed=5)]
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    from medlvr.inference import make_sample

    batch = collate([make_sample(images, "Where?")], images=[images])
    out = vlm.generate(batch, 2, max_new_tokens=1, output_attentions=True)
    first = compute_maps(vlm, batch, out, [images], ExplainConfig(layers=(0,)))[0]
    last = compute_maps(vlm, batch, out, [images], ExplainConfig(layers=(-1,)))[0]
    assert not torch.allclose(first.attention, last.attention)
    assert torch.allclose(first.similarity, last.similarity)  # similarity does not use attention
    with pytest.raises(MedlvrError, match="out of range"):
        compute_maps(vlm, batch, out, [images], ExplainConfig(layers=(99,)))
    with pytest.raises(MedlvrError, match="0 latent steps"):
        explain(vlm, images, "Where?", latent_steps=0)


def _synth(n_train: int, n_test: int, seed: int = 0):
    from medlvr.data.synth import SynthConfig, generate_samples

    cfg = SynthConfig(n=20 * (n_train + n_test), seed=seed, level=1, describe=False)
    fams = ("attribute", "location")

    def take(split, n):
        out, i = [], 0
        while len(out) < n:
            item = generate_samples(cfg, split, [i])[0]
            i += 1
            if item.sample.question_type in fams:
                out.append((item.sample, [Image.fromarray(item.image).convert("RGB")]))
        return out

    return take("train", n_train), take("test", n_test)


def test_explain_metrics_keys_floor_and_skips(vlm):
    _, test = _synth(0, 4)
    samples = [s for s, _ in test]
    images = [im for _, im in test]
    no_roi = samples[0].model_copy(update={"rois": [], "id": "no-roi"})
    m = explain_metrics(vlm, [*samples, no_roi], 2, images=[*images, images[0]], batch_size=3)
    assert m["n"] == 4 and m["skipped_no_roi"] == 1 and m["latent_steps"] == 2
    for name in ("similarity", "attention", "random"):
        assert 0 <= m[name]["pointing"] <= 1 and 0 <= m[name]["roi_mass"] <= 1
        assert 0 <= m[name]["any_lesion_pointing"] <= 1
    assert len(m["similarity"]["per_step"]["roi_mass"]) == 2
    assert 0 < m["chance"]["roi_mass"] < m["chance"]["pointing"] < 1
    assert m["max_recompute_gap"] < 1e-4
    assert "similarity" in format_metrics(m)
    with pytest.raises(MedlvrError, match="ROI"):
        explain_metrics(vlm, [no_roi], 2, images=[images[0]])


# ---------------------------------------------------------------------------- faithfulness after ROI training


def _align_loss(
    latents: torch.Tensor,
    visual: list[torch.Tensor],
    roi_index: list[torch.Tensor],
    tau: float = 0.1,
) -> torch.Tensor:
    """InfoNCE of each latent z_k: its pooled ROI target against the image's non-ROI tokens (docs/synthetic.md)."""
    losses = []
    for z, v, idx in zip(latents, visual, roi_index):  # z [K, d], v [N, d]
        k = z.shape[0]
        target = pool_targets(v, idx, k)  # [K, d]
        keep = torch.ones(v.shape[0], dtype=torch.bool)
        keep[idx] = False
        cands = torch.cat(
            [target[:, None], v[keep][None].expand(k, -1, -1)], 1
        )  # [K, 1 + N_neg, d]
        logits = F.cosine_similarity(z[:, None], cands, dim=-1) / tau  # [K, 1 + N_neg]
        losses.append(F.cross_entropy(logits, torch.zeros(k, dtype=torch.long)))
    return torch.stack(losses).mean()


@pytest.mark.slow
def test_roi_trained_similarity_maps_beat_the_random_floor(tiny_factory):
    """A tiny model trained with answer loss + ROI alignment: its maps put more mass on held-out ROIs than chance."""
    torch.manual_seed(0)
    started = time.perf_counter()
    vlm = LatentVLM.from_pretrained(
        tiny_factory(size="tiny"), LatentConfig(steps=2, projector="linear")
    )
    train, test = _synth(64, 24, seed=0)
    collate = VQACollator(vlm.processor, vlm.adapter)
    test_samples, test_images = [s for s, _ in test], [im for _, im in test]
    before = explain_metrics(vlm, test_samples, 2, images=test_images)

    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=3e-3)
    rng = np.random.default_rng(0)
    vlm.train()
    for _ in range(80):
        pick = rng.choice(len(train), 16, replace=False)
        batch = collate([train[i][0] for i in pick], images=[train[i][1] for i in pick])
        out = vlm(batch)
        loss = out.loss + 1.0 * _align_loss(out.latents, out.visual_tokens, batch["roi_index"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    vlm.eval()
    after = explain_metrics(vlm, test_samples, 2, images=test_images)
    print(
        f"\nROI mass on held-out synth: similarity {after['similarity']['roi_mass']:.3f} (before training "
        f"{before['similarity']['roi_mass']:.3f}), attention {after['attention']['roi_mass']:.3f}, "
        f"random {after['random']['roi_mass']:.3f}, chance {after['chance']['roi_mass']:.3f}; pointing: similarity "
        f"{after['similarity']['pointing']:.3f}, attention {after['attention']['pointing']:.3f}, random "
        f"{after['random']['pointing']:.3f}, chance {after['chance']['pointing']:.3f}; {time.perf_counter() - started:.1f} s"
    )
    assert after["similarity"]["roi_mass"] > after["random"]["roi_mass"]
    assert after["similarity"]["roi_mass"] > after["chance"]["roi_mass"]


# ---------------------------------------------------------------------------- CLI


def test_cli_explain_writes_png_and_json(tiny_dir, tmp_path):
    img = tmp_path / "scan.png"
    random_image(140, 112, seed=4).save(img)
    out = tmp_path / "maps" / "ex.png"
    args = ["explain", "--model", str(tiny_dir), "--image", str(img), "--question", "Which side?",
            "--option", "A=left", "--option", "B=right", "--latent-steps", "2", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(cli_app, args)
    assert res.exit_code == 0, res.output
    assert "answer:" in res.output and out.is_file()
    regions = json.loads(out.with_suffix(".json").read_text())
    assert regions["latent_steps"] == 2 and regions["images"][0]["size"] == [140, 112]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--latent-steps", "0"], "latent-steps"),
        (["--option", "A"], "A=text"),
        (["--out", "x.jpg"], ".png"),
    ],
)
def test_cli_explain_user_errors_exit_2(tiny_dir, tmp_path, extra, message):
    img = tmp_path / "scan.png"
    random_image(56, 56).save(img)
    res = CliRunner().invoke(
        cli_app,
        ["explain", "--model", str(tiny_dir), "--image", str(img), "--question", "Q?", *extra],
    )
    assert res.exit_code == 2 and message in res.output


def test_cli_explain_unreadable_image_exit_2(tiny_dir, tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_text("not a png")
    res = CliRunner().invoke(
        cli_app, ["explain", "--model", str(tiny_dir), "--image", str(bad), "--question", "Q?"]
    )
    assert res.exit_code == 2 and "error" in res.output
