"""Diagnostics of the latent chain: given latent inputs, gold sources, next-hop pointing, probes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medlvr.config import LatentConfig
from medlvr.data.collate import VQACollator
from medlvr.data.roi import chain_targets, hop_of_steps
from medlvr.errors import MedlvrError
from medlvr.eval import diagnostics as dg
from medlvr.model.latent import LatentVLM


@pytest.fixture(scope="module")
def vlm(tiny_dir):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(tiny_dir, LatentConfig(steps=6, projector="norm"))


@pytest.fixture(scope="module")
def chain():
    """Synthetic chain questions of 1-3 hops with their images (a few of each depth)."""
    from medlvr.data.synth import SynthConfig, generate_samples

    cfg = SynthConfig(n=200, seed=0, question_types={"chain": 1.0}, hops=(1, 3), describe=False)
    out = []
    for i in range(40):
        item = generate_samples(cfg, "train", [i])[0]
        out.append((item.sample, [Image.fromarray(item.image).convert("RGB")]))
    depths = {dg.n_hops(s) for s, _ in out}
    assert depths == {1, 2, 3}
    return out


def _batch(vlm, samples, images, answers=False):
    collate = VQACollator(vlm.processor, vlm.adapter, reasoning="latent", with_answers=answers,
                          with_rois=False, sample_fields={"roi_hop_index": dg._hop_index})  # fmt: skip
    return collate(samples, images=images)


def test_given_latents_replace_exactly_the_marked_steps(vlm, chain):
    samples, images = [s for s, _ in chain[:4]], [i for _, i in chain[:4]]
    batch = _batch(vlm, samples, images)
    own = vlm.generate(batch, 4, max_new_tokens=3)
    x = torch.randn(4, 4, vlm.hidden_size)
    none = vlm.generate(batch, 4, max_new_tokens=3, latent_inputs=x,
                        latent_given=torch.zeros(4, 4, dtype=torch.bool))  # fmt: skip
    assert torch.equal(none.latents, own.latents) and none.texts == own.texts
    mask = torch.tensor([[True, False, True, False]] * 4)
    mixed = vlm.generate(batch, 4, max_new_tokens=3, latent_inputs=x, latent_given=mask)
    assert torch.equal(mixed.latents[mask], x[mask])
    # the first state precedes every input; the second follows the given first input
    assert torch.allclose(mixed.latent_means[:, 0], own.latent_means[:, 0], atol=1e-6)
    assert not torch.allclose(mixed.latent_means[:, 1], own.latent_means[:, 1], atol=1e-3)
    assert torch.equal(mixed.latents[:, 1], mixed.latent_means[:, 1])  # own where unmarked
    with pytest.raises(MedlvrError, match="latent_given"):
        vlm.generate(batch, 4, latent_inputs=x[:, :3], latent_given=mask)


def test_forward_with_every_step_given_equals_the_parallel_teacher_forced_pass(vlm, chain):
    samples, images = [s for s, _ in chain[:3]], [i for _, i in chain[:3]]
    batch = _batch(vlm, samples, images, answers=True)
    x = torch.randn(3, 4, vlm.hidden_size) * 0.05
    parallel = vlm(batch, latent_inputs=x)
    mixed = vlm(batch, latent_inputs=x, latent_given=torch.ones(3, 4, dtype=torch.bool))
    assert torch.allclose(parallel.loss, mixed.loss, atol=1e-5)
    assert torch.allclose(parallel.latent_means, mixed.latent_means, atol=1e-5)
    own = vlm(batch, latent_steps=4)
    unmarked = vlm(batch, latent_inputs=x, latent_given=torch.zeros(3, 4, dtype=torch.bool))
    assert torch.allclose(own.loss, unmarked.loss, atol=1e-6)


def test_gold_sources_mark_the_steps_of_their_hops(vlm, chain):
    by_depth = {}
    for s, im in chain:
        by_depth.setdefault(dg.n_hops(s), (s, im))
    samples = [by_depth[h][0] for h in (1, 2, 3)]
    images = [by_depth[h][1] for h in (1, 2, 3)]
    batch = _batch(vlm, samples, images)
    visual = vlm.visual_tokens(batch)
    hops = [1, 2, 3]
    assert dg.given_latents(visual, batch["roi_hop_index"], hops, 6, "own") is None
    x, gold = dg.given_latents(visual, batch["roi_hop_index"], hops, 6, "gold")
    assert gold.all()
    for i in range(3):  # the alignment's chain targets, hop by hop
        expect = chain_targets(visual[i].float(), batch["roi_hop_index"][i], 6)
        assert torch.allclose(x[i], expect)
    _, prefix = dg.given_latents(visual, batch["roi_hop_index"], hops, 6, "gold-prefix")
    assert prefix.tolist() == [[False] * 6, [True] * 3 + [False] * 3, [True] * 4 + [False] * 2]
    _, before = dg.given_latents(visual, batch["roi_hop_index"], hops, 6, "own", [0, 1, 2])
    assert before.tolist() == [[False] * 6, [True] * 3 + [False] * 3, [True] * 4 + [False] * 2]


def test_gold_donors_are_other_boxes_of_the_same_depth_whatever_the_order(chain):
    samples = [s for s, _ in chain]
    donors = dg.gold_donors(samples, seed=3)
    assert donors == dg.gold_donors(list(reversed(samples)), seed=3)
    by_id = {s.id: s for s in samples}
    assert set(donors) == {s.id for s in samples}
    for q, d in donors.items():
        assert dg.n_hops(by_id[q]) == dg.n_hops(by_id[d])
        assert dg._boxes(by_id[q]) != dg._boxes(by_id[d])


class _Pointer:
    """A producer whose state for hop j is exactly the first visual token of hop j's ROI."""

    def __init__(self, vlm):
        self.vlm = vlm

    def __getattr__(self, name):
        return getattr(self.vlm, name)

    def generate(self, batch, k, **kw):
        out = self.vlm.generate(batch, k, **kw)
        visual = self.vlm.visual_tokens(batch)
        for i, idx in enumerate(batch["roi_hop_index"]):
            for step, j in enumerate(hop_of_steps(k, len(idx))):
                out.latent_means[i, step] = visual[i][idx[j][0]]
        return out


def test_next_hop_pointing_scores_a_producer_that_steps_and_the_floor(vlm, chain):
    samples, images = [s for s, _ in chain], [i for _, i in chain]
    deep = [s for s in samples if dg.n_hops(s) >= 2]
    m = dg.next_hop_pointing(_Pointer(vlm), samples, 6, images=images, batch_size=16)
    assert m["questions"] == len(deep)
    assert set(m["by_hop"]) == {"2", "3"}
    n3 = sum(dg.n_hops(s) == 3 for s in samples)
    assert m["by_hop"]["3"]["questions"] == n3 and m["by_hop"]["3"]["steps"] == 2 * n3
    assert m["by_hop"]["2"]["steps"] == 3 * (len(deep) - n3) + 2 * n3
    for j in ("2", "3"):
        assert m["by_hop"][j]["pointing"] == 1.0 and m["by_hop"][j]["own_prefix"] == 1.0
        assert m["by_hop"][j]["random"] < 0.5
    real = dg.next_hop_pointing(vlm, samples, 6, images=images, batch_size=16)
    assert all(0 <= v["pointing"] <= 1 for v in real["by_hop"].values())
    with pytest.raises(MedlvrError, match="2 or more hops"):
        dg.next_hop_pointing(vlm, [s for s in samples if dg.n_hops(s) == 1], 6,
                             images=[i for s, i in chain if dg.n_hops(s) == 1])  # fmt: skip


def test_probe_reads_what_the_features_hold_and_reports_the_majority_floor():
    g = torch.Generator().manual_seed(0)
    labels = [i % 3 for i in range(90)]
    x = torch.randn(90, 8, generator=g)
    x[:, 0] += 10 * torch.tensor(labels, dtype=torch.float)  # the label is linear in feature 0
    rows = [(x[i], labels[i], 1 + i % 2) for i in range(90)]
    res = dg._probe(rows[:60], rows[60:])
    assert res["accuracy"] >= 0.9 and res["n"] == 30
    assert set(res["by_hops"]) == {"1", "2"}
    noise = [(torch.randn(8, generator=g), y, h) for _, y, h in rows]
    assert dg._probe(noise[:60], noise[60:])["accuracy"] < 0.7
    assert abs(res["chance"] - 1 / 3) < 0.05


def test_latent_probes_and_diagnostics_on_a_tiny_model(vlm, chain, monkeypatch):
    images = {s.images[0]: im[0] for s, im in chain}
    samples = [s for s, _ in chain]
    out = dg.latent_diagnostics(vlm, samples[:20], samples[20:], 6, image_loader=images.__getitem__)
    probes = out["probes"]
    assert probes["fit"] == 20 and probes["scored"] == 20 and probes["answer"]["n"] == 20
    assert set(probes["region"]) == {"1", "2", "3"}
    assert probes["region"]["1"]["n"] == 20
    assert out["next_hop_pointing"]["questions"] == sum(dg.n_hops(s) > 1 for s in samples[20:])
    assert dg.box_region([0, 0, 10, 10], 90, 90) == 0
    assert dg.box_region([80, 80, 90, 90], 90, 90) == 8
    assert dg.box_region([40, 0, 50, 10], 90, 90) == 1


def test_eval_records_the_latent_source_and_refuses_to_mix_sources(vlm, chain, tmp_path):
    import json

    from medlvr.eval.harness import evaluate

    samples = []
    for s, im in chain[:12]:
        path = tmp_path / f"{s.id}.png"
        im[0].save(path)
        samples.append(s.model_copy(update={"images": [str(path)]}))
    kw = {
        "vlm": vlm,
        "reasoning": "latent",
        "latent_steps": [6],
        "batch_size": 6,
        "progress": False,
    }
    res = evaluate(samples, tmp_path / "gold", latents="gold", explain=True, probes=samples, **kw)
    rows = [
        json.loads(x) for x in (tmp_path / "gold" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 12 and {r["latents"] for r in rows} == {"gold"}
    assert json.loads((tmp_path / "gold" / "run.json").read_text())["latents"] == "gold"
    summary = json.loads((tmp_path / "gold" / "summary.json").read_text())
    assert summary["latents"] == "gold" and summary["probes"]["6"]["scored"] == 12
    assert res.summary is not None and res.summary["latents"] == "gold"
    assert (tmp_path / "gold" / "probes.json").is_file()
    explain = json.loads((tmp_path / "gold" / "explain.json").read_text())
    assert set(explain["6"]["next_hop_pointing"]["by_hop"]) == {"2", "3"}
    with pytest.raises(MedlvrError, match="latents='gold'"):
        evaluate(samples, tmp_path / "gold", latents="own", **kw)
    own = evaluate(samples, tmp_path / "own", **kw)
    assert "latents" not in own.summary
    with pytest.raises(MedlvrError, match="latents must be one of"):
        evaluate(samples, tmp_path / "bad", latents="golden", **kw)
