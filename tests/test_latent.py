"""The latent reasoning core on tiny real transformers models."""

from __future__ import annotations

import pytest
import torch

from medlvr.config import LatentConfig
from medlvr.data.collate import VQACollator
from medlvr.data.schema import ROI, VQASample
from medlvr.errors import MedlvrError
from medlvr.model.backbones import LATENT_TOKENS, families, get_adapter
from medlvr.model.latent import LatentVLM
from tests.conftest import random_image

FAMILIES = families()


def _samples(n_images=(1, 1)):
    qs = ["What is the shape of the lesion in the upper left region?", "Is there a lesion?"]
    out = []
    for i, n in enumerate(n_images):
        out.append(
            VQASample(
                id=f"s{i}",
                dataset="t",
                split="test",
                images=[f"img{i}_{j}" for j in range(n)],
                question=qs[i % 2] * (1 + i),
                answer="round" if i % 2 == 0 else "yes",
                answer_type="open" if i % 2 == 0 else "closed",
                rois=[ROI(box=(10, 10, 60, 40))] if i % 2 == 0 else [],
            )
        )
    return out


def _batch(vlm, sizes=((140, 100), (224, 224)), n_images=(1, 1), with_answers=True):
    samples = _samples(n_images)
    images, k = [], 0
    for n in n_images:
        images.append([random_image(*sizes[(k + j) % len(sizes)], seed=k + j) for j in range(n)])
        k += n
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=with_answers)
    return collate(samples, images=images)


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tiny_factory):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(
        tiny_factory(request.param), LatentConfig(steps=4, projector="linear")
    )


def test_k0_greedy_equals_backbone_generate(vlm):
    batch = _batch(vlm, with_answers=False)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    keys = (
        "input_ids",
        "attention_mask",
        "pixel_values",
        "pixel_attention_mask",
        "image_grid_thw",
        "mm_token_type_ids",
        "token_type_ids",
    )
    ref = vlm.backbone.generate(
        **{k: batch[k] for k in keys if k in batch}, max_new_tokens=12, do_sample=False
    )
    ref = ref[:, batch["input_ids"].shape[1] :].tolist()
    out = vlm.generate(batch, latent_steps=0, max_new_tokens=12)
    stops = set(vlm.stop_ids)
    for mine, theirs in zip(out.token_ids, ref):
        cut = next((i for i, t in enumerate(theirs) if t in stops), len(theirs))
        assert mine == theirs[:cut]
    assert len(set(map(tuple, out.token_ids))) > 1, "rows should differ, or the test shows nothing"


def test_cached_latent_loop_equals_one_uncached_forward(vlm):
    batch = _batch(vlm)
    with torch.no_grad():
        cached = vlm(batch, latent_steps=4)
        full = vlm(batch, latent_inputs=cached.latents)
    assert cached.latents.shape == (2, 4, vlm.hidden_size)
    assert (cached.logits - full.logits).abs().max() < 1e-4
    assert (cached.latent_means - full.latent_means).abs().max() < 1e-4


def test_generate_latents_match_training_recurrence(vlm):
    batch = _batch(vlm)
    with torch.no_grad():
        gen = vlm.generate(batch, latent_steps=3, max_new_tokens=2)
        fwd = vlm(batch, latent_steps=3)
    assert (gen.latents - fwd.latents).abs().max() < 1e-5
    assert set(gen.timings) >= {"prefill_s", "latent_s", "decode_s", "total_s"}


def test_several_images_per_sample(vlm):
    batch = _batch(vlm, sizes=((84, 56), (112, 140), (56, 56)), n_images=(2, 1))
    out = vlm.generate(batch, latent_steps=2, max_new_tokens=3)
    fwd = vlm(batch, latent_steps=2)
    assert len(out.texts) == 2
    grids = [
        vlm.adapter.token_grid(vlm.processor, w, h) for w, h in ((84, 56), (112, 140), (56, 56))
    ]
    assert [v.shape[0] for v in fwd.visual_tokens] == [
        grids[0].n_tokens + grids[1].n_tokens,
        grids[2].n_tokens,
    ]


def test_training_forward_gradients_reach_vision_lm_and_projector(vlm):
    batch = _batch(vlm)
    vlm.train()
    vlm.zero_grad()
    out = vlm(batch, latent_steps=4)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    named = dict(vlm.named_parameters())
    vision = [
        p
        for n, p in named.items()
        if vlm.adapter.parameter_group(n) != "language" and p.grad is not None
    ]
    # Decoder layers, by a name every family shares (its language model is `language_model`, `text_model` ...).
    lm = [
        p
        for n, p in named.items()
        if ".layers." in n and vlm.adapter.parameter_group(n) == "language" and p.grad is not None
    ]
    assert vision and any(p.grad.abs().sum() > 0 for p in vision)
    assert lm and any(p.grad.abs().sum() > 0 for p in lm)
    # The projector touches the answer only through the latent steps.
    assert vlm.projector.linear.weight.grad.abs().sum() > 0
    vlm.zero_grad()
    vlm(batch, latent_steps=0).loss.backward()
    assert (
        vlm.projector.linear.weight.grad is None
        or vlm.projector.linear.weight.grad.abs().sum() == 0
    )
    vlm.eval()


def test_labels_cover_exactly_the_answer(vlm):
    batch = _batch(vlm)
    out = vlm(batch, latent_steps=2)
    mask = batch["answer_mask"].bool()
    assert out.logits.shape[:2] == batch["answer_ids"].shape
    assert (out.token_logprobs[~mask] == 0).all()
    manual = -out.token_logprobs.sum() / mask.sum()
    assert torch.allclose(manual, out.loss)


def test_recompute_path_equals_cached_path(vlm):
    batch = _batch(vlm)
    vlm.train()
    cached = vlm(batch, latent_steps=3)
    vlm.backbone.activation_checkpointing_enable()
    try:
        recomputed = vlm(batch, latent_steps=3)
    finally:
        vlm.backbone.activation_checkpointing_disable()
        vlm.eval()
    assert abs(cached.loss.item() - recomputed.loss.item()) < 1e-5


def test_group_rollouts_share_the_prefix(vlm):
    batch = _batch(vlm, with_answers=False)
    single = vlm.generate(batch, latent_steps=2, max_new_tokens=5)
    grouped = vlm.generate(batch, latent_steps=2, max_new_tokens=5, group_size=3)
    assert grouped.token_ids == [row for row in single.token_ids for _ in range(3)]


def test_save_load_round_trip_is_exact(vlm, tmp_path):
    batch = _batch(vlm, with_answers=False)
    with torch.no_grad():
        vlm.projector.linear.weight.add_(0.01 * torch.randn_like(vlm.projector.linear.weight))
        before = vlm.generate(batch, latent_steps=3, max_new_tokens=6)
    vlm.save_pretrained(tmp_path / "m")
    again = LatentVLM.from_pretrained(tmp_path / "m")
    assert again.latent == vlm.latent
    after = again.generate(batch, latent_steps=3, max_new_tokens=6)
    assert after.token_ids == before.token_ids
    assert torch.equal(after.latents, before.latents)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_without_latent_tokens_gets_them_on_load(tiny_factory, family):
    path = tiny_factory(family, with_latent_tokens=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert all(tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id) for t in LATENT_TOKENS)
    vlm = LatentVLM.from_pretrained(path, LatentConfig(steps=2))
    ids = [vlm.tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS]
    assert len(set(ids)) == 3 and max(ids) < vlm.backbone.get_input_embeddings().weight.shape[0]
    out = vlm.generate(_batch(vlm, with_answers=False), max_new_tokens=3)
    assert len(out.texts) == 2


def test_bad_inputs_raise_clear_errors(vlm):
    batch = _batch(vlm)
    with pytest.raises(MedlvrError, match="latent steps must be >= 0"):
        vlm.generate(batch, latent_steps=-1)
    no_pixels = {k: v for k, v in batch.items() if k != "pixel_values"}
    with pytest.raises(MedlvrError, match="no images"):
        vlm.generate(no_pixels)
    bad = dict(batch, answer_ids=batch["answer_ids"][:1], answer_mask=batch["answer_mask"][:1])
    with pytest.raises(MedlvrError, match="batch size mismatch"):
        vlm(bad)
    with pytest.raises(MedlvrError, match="unknown backbone family"):
        get_adapter("llava")
    with pytest.raises(MedlvrError, match=r"latent.steps"):
        LatentConfig(steps=-2)


@pytest.mark.parametrize("k", [0, 3])
def test_training_forward_scores_what_generate_decodes(vlm, k):
    """Teacher forcing the greedy answer: the forward's argmax at every answer position is that answer."""
    batch = _batch(vlm, with_answers=False)
    with torch.no_grad():
        gen = vlm.generate(batch, latent_steps=k, max_new_tokens=6, min_new_tokens=6)
        rows = [ids + [vlm.stop_ids[0]] for ids in gen.token_ids]
        batch["answer_ids"] = torch.tensor(rows)
        batch["answer_mask"] = torch.ones_like(batch["answer_ids"])
        out = vlm(batch, latent_steps=k)
        full = vlm(batch, latent_inputs=out.latents) if k else out
    assert out.logits[:, :6].argmax(-1).tolist() == [r[:6] for r in rows]
    assert full.logits[:, :6].argmax(-1).tolist() == [r[:6] for r in rows]
