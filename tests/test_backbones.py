"""Every backbone family through its adapter alone: ROI geometry against the real processor,
prefix passes against the backbone's own forward, and a short ROI-supervised run."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from medlvr.config import LatentConfig
from medlvr.data.collate import VQACollator
from medlvr.data.roi import box_to_tokens, pool_targets
from medlvr.data.schema import ROI, VQASample
from medlvr.errors import MedlvrError
from medlvr.model.backbones import TokenGrid, families, get_adapter
from medlvr.model.latent import LatentVLM
from tests.conftest import random_image

FAMILIES = families()


# ---------------------------------------------------------------------------- box -> tokens
# Which visual tokens a change in the processor's output reaches, read from the
# pixel tensor the vision tower receives (the towers attend globally, so their
# outputs change everywhere; the pixels feeding each token do not).


def _qwen_changed(processor, before: dict, after: dict) -> set[int]:
    # pixel_values [n_patches, C*T*P*P], patches grouped by merge window: merge^2 rows make one token.
    merge = processor.image_processor.merge_size
    rows = (before["pixel_values"] != after["pixel_values"]).any(-1).nonzero().flatten()
    return {int(r) // merge**2 for r in rows}


def _gemma_changed(processor, before: dict, after: dict) -> set[int]:
    # pixel_values [1, 3, S, S]; tokens average-pool square cells of S/side pixels, raster order.
    side = round(processor.image_seq_length**0.5)
    diff = (before["pixel_values"][0] != after["pixel_values"][0]).any(0)  # [S, S]
    cell = diff.shape[0] // side
    ys, xs = diff.nonzero(as_tuple=True)
    return set((ys // cell * side + xs // cell).unique().tolist())


def _smolvlm_changed(processor, before: dict, after: dict) -> set[int]:
    # pixel_values [1, views, 3, M, M]: the tiles row-major, then the global image; each view
    # a raster of side x side tokens over cells of token_pixels (pixels past them feed no token).
    side = round(processor.image_seq_len**0.5)
    cell = processor.token_pixels
    diff = (before["pixel_values"][0] != after["pixel_values"][0]).any(1)[
        :, : side * cell, : side * cell
    ]  # [V, S, S]
    vs, ys, xs = diff.nonzero(as_tuple=True)
    return set((vs * side * side + ys // cell * side + xs // cell).unique().tolist())


_CHANGED = {
    "qwen2_vl": _qwen_changed,
    "qwen2_5_vl": _qwen_changed,
    "qwen3_vl": _qwen_changed,
    "gemma3": _gemma_changed,
    "smolvlm": _smolvlm_changed,
}


def _pixels(processor, adapter, image: Image.Image) -> dict:
    imgs = adapter.processor_images([[image]])
    return dict(processor.image_processor(images=imgs, return_tensors="pt"))


def _n_image_tokens(processor, adapter, image: Image.Image, image_token_id: int) -> int:
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    enc = processor(text=[text], images=adapter.processor_images([[image]]), return_tensors="pt")
    return int((enc["input_ids"] == image_token_id).sum())


def _mid_cell_box(grid: TokenGrid, w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
    """A box whose edges fall 30-70% into cells, clear of the resize filter's reach across cell borders."""
    if grid.blocks:
        return _mid_cell_box_in_blocks(grid, w, h, rng)
    c0, c1 = sorted(rng.randrange(grid.cols) for _ in range(2))
    r0, r1 = sorted(rng.randrange(grid.rows) for _ in range(2))

    def edge(i: int, cell: float, limit: int) -> int:
        return min(max(round((i + rng.uniform(0.3, 0.7)) * cell), 0), limit)

    x0, x1 = edge(c0, grid.cell_w, w), edge(c1, grid.cell_w, w)
    y0, y1 = edge(r0, grid.cell_h, h), edge(r1, grid.cell_h, h)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _mid_cell_box_in_blocks(
    grid: TokenGrid, w: int, h: int, rng: random.Random
) -> tuple[int, int, int, int]:
    """As `_mid_cell_box` for tiled images: each edge 25-75% into a cell of every view it crosses
    (tile and global cells nest, so such places exist in every cell of the coarser view)."""

    def clear(v: int, horizontal: bool) -> bool:
        for b in grid.blocks:
            start, cell, n = (b.x0, b.cell_w, b.cols) if horizontal else (b.y0, b.cell_h, b.rows)
            local = (v - start) / cell
            if 0 <= local <= n and not 0.25 <= local % 1 <= 0.75:
                return False
        return True

    def edges(limit: int, horizontal: bool) -> tuple[int, int]:
        ok = [v for v in range(1, limit) if clear(v, horizontal)]
        a, b = sorted(rng.sample(ok, 2))
        return a, b

    x0, x1 = edges(w, True)
    y0, y1 = edges(h, False)
    return x0, y0, x1, y1


@pytest.mark.parametrize("family", FAMILIES)
def test_box_maps_to_exactly_the_tokens_its_pixels_reach(tiny_factory, family):
    if family not in _CHANGED:
        pytest.fail(f"add a pixel-to-token reader for {family} to _CHANGED")
    vlm = LatentVLM.from_pretrained(tiny_factory(family))
    processor, adapter = vlm.processor, vlm.adapter
    rng = random.Random(0)
    checked = 0
    # Landscape, portrait, upscaled and downscaled images; the whole image as a box too.
    for w, h in ((300, 180), (97, 211), (640, 480), (224, 224)):
        image = random_image(w, h, seed=w)
        grid = adapter.token_grid(processor, w, h)
        assert grid.n_tokens == _n_image_tokens(processor, adapter, image, vlm.image_token_id)
        before = _pixels(processor, adapter, image)
        boxes = [_mid_cell_box(grid, w, h, rng) for _ in range(4)] + [(0, 0, w, h)]
        for box in boxes:
            perturbed = image.copy()
            perturbed.paste(ImageOps.invert(image.crop(box)), box[:2])
            changed = _CHANGED[family](processor, before, _pixels(processor, adapter, perturbed))
            predicted = set(box_to_tokens(box, grid, w, h))
            assert changed == predicted, (
                f"{w}x{h} box {box}: changed {sorted(changed)} predicted {sorted(predicted)}"
            )
            checked += 1
    assert checked == 20


# ---------------------------------------------------------------------------- tokens -> cells


def _tiled_grid() -> TokenGrid:
    """An 80x80 image as 2x2 tiles of 2x2 cells (20 px) in row-major order, then a 2x2 global view (40 px)."""
    tiles = tuple(
        TokenGrid(2, 2, 20.0, 20.0, x0=40.0 * c, y0=40.0 * r) for r in range(2) for c in range(2)
    )
    return TokenGrid(4, 4, 20.0, 20.0, blocks=(*tiles, TokenGrid(2, 2, 40.0, 40.0)))


def test_raster_places_tiles_and_spreads_each_global_cell_over_the_cells_under_it():
    grid = _tiled_grid()
    assert grid.n_tokens == 20
    tiles = torch.arange(16.0)  # tile t, cell i -> 4 t + i
    glob = torch.tensor([4.0, 8.0, 12.0, 16.0])  # each over 2x2 cells: +1, +2, +3, +4 per cell
    expected = torch.tensor([
        [0 + 1, 1 + 1, 4 + 2, 5 + 2],
        [2 + 1, 3 + 1, 6 + 2, 7 + 2],
        [8 + 3, 9 + 3, 12 + 4, 13 + 4],
        [10 + 3, 11 + 3, 14 + 4, 15 + 4],
    ])  # fmt: skip
    values = torch.cat([tiles, glob])
    assert torch.equal(grid.raster(values), expected)
    assert grid.raster(values).sum() == values.sum()  # a distribution stays one
    # Leading dimensions (K steps) ride along.
    assert torch.equal(
        grid.raster(torch.stack([values, 2 * values])), torch.stack([expected, 2 * expected])
    )
    # One grid: the raster reshape, unchanged.
    plain = TokenGrid(2, 3, 10.0, 10.0)
    flat = torch.arange(6.0)
    assert torch.equal(plain.raster(flat), flat.view(2, 3))
    with pytest.raises(MedlvrError, match="20 tokens"):
        grid.raster(torch.zeros(16))
    # A block finer than the grid would lose values: refused.
    fine_block = TokenGrid(2, 2, 40.0, 40.0, blocks=(TokenGrid(4, 4, 20.0, 20.0),))
    with pytest.raises(MedlvrError, match="finer"):
        fine_block.raster(torch.zeros(16))


@pytest.mark.parametrize("family", FAMILIES)
def test_raster_puts_a_box_tokens_on_the_cells_the_box_covers(tiny_factory, family):
    """Against `box_to_tokens` (pixel-verified above): the tokens of a box land on the box's cells of the finest view."""
    adapter = get_adapter(family)
    processor = adapter.load_processor(tiny_factory(family))
    for w, h in ((300, 180), (97, 211), (224, 224)):
        grid = adapter.token_grid(processor, w, h)
        finest = TokenGrid(grid.rows, grid.cols, grid.cell_w, grid.cell_h)
        # The finest views' tokens (the tiles; the whole image for one-grid families).
        fine_tokens, offset = set(), 0
        for block in grid.blocks or (grid,):
            if (block.cell_w, block.cell_h) == (grid.cell_w, grid.cell_h):
                fine_tokens.update(range(offset, offset + block.n_tokens))
            offset += block.n_tokens
        for box in ((0, 0, w, h), (w * 0.3, h * 0.2, w * 0.6, h * 0.9), (1, 1, 3, 3)):
            tokens = box_to_tokens(box, grid, w, h)
            ind = torch.zeros(grid.n_tokens)
            ind[tokens] = 1.0
            assert grid.raster(ind).sum() == pytest.approx(len(tokens))
            ind[[t for t in range(grid.n_tokens) if t not in fine_tokens]] = 0.0
            cells = set(grid.raster(ind).flatten().nonzero().flatten().tolist())
            assert cells == set(box_to_tokens(box, finest, w, h)), (w, h, box)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_groups_split_vision_merger_and_language(tiny_factory, family):
    """What `model.freeze_vision/merger/language` freeze: the tower, its projection into the decoder, the rest."""
    vlm = LatentVLM.from_pretrained(tiny_factory(family))
    groups: dict[str, int] = {}
    for name, _ in vlm.backbone.named_parameters():
        group = vlm.adapter.parameter_group(name)
        groups[group] = groups.get(group, 0) + 1
    assert set(groups) == {"vision", "merger", "language"}, groups


# ---------------------------------------------------------------------------- prefix pass


def _samples(n: int = 2) -> list[VQASample]:
    shapes = ["round", "square", "oval", "cross"]
    return [
        VQASample(
            id=f"s{i}",
            dataset="t",
            split="train",
            images=[f"img{i}"],
            question="What is the shape of the lesion in the upper left region?"
            + " Describe the lesions." * i,
            answer=shapes[i % 4],
            answer_type="open",
            rois=[ROI(box=(8 + 10 * i, 12, 70 + 10 * i, 60))],
        )
        for i in range(n)
    ]


def _batch(vlm: LatentVLM, n: int = 2):
    sizes = ((140, 100), (224, 224), (180, 120), (100, 160))
    images = [[random_image(*sizes[i % 4], seed=i)] for i in range(n)]
    return VQACollator(vlm.processor, vlm.adapter)(_samples(n), images=images)


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tiny_factory):
    torch.manual_seed(0)
    return LatentVLM.from_pretrained(
        tiny_factory(request.param), LatentConfig(steps=4, projector="linear")
    )


def test_answer_logits_equal_the_backbones_own_forward(vlm):
    """K=0, cached and uncached: exactly what the backbone computes from token ids and pixels.

    The backbone's own forward applies everything the family does to images (Qwen3-VL
    deepstack, Gemma 3 bidirectional image attention), so a prefix that dropped any of
    it would differ here.
    """
    batch = _batch(vlm)
    ans, amask = batch["answer_ids"], batch["answer_mask"]
    n_prompt, t = batch["input_ids"].shape[1], ans.shape[1]
    full = {
        "input_ids": torch.cat([batch["input_ids"], ans], 1),
        "attention_mask": torch.cat([batch["attention_mask"], amask], 1),
        "pixel_values": batch["pixel_values"],
    }
    for key in ("image_grid_thw", "pixel_attention_mask"):
        if key in batch:
            full[key] = batch[key]
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in batch:
            full[key] = torch.cat([batch[key], torch.zeros_like(ans)], 1)
    with torch.no_grad():
        ref = vlm.backbone(**full).logits[:, n_prompt - 1 : n_prompt - 1 + t]  # [B, T, V]
        cached = vlm(batch, latent_steps=0).logits
        uncached = vlm(batch, latent_inputs=torch.zeros(2, 0, vlm.hidden_size)).logits
    keep = amask.bool()
    assert (cached - ref)[keep].abs().max() < 1e-4
    assert (uncached - ref)[keep].abs().max() < 1e-4


def test_qwen3_deepstack_reaches_the_loss_in_both_paths(tiny_factory):
    vlm = LatentVLM.from_pretrained(
        tiny_factory("qwen3_vl"), LatentConfig(steps=2, projector="linear")
    )
    batch = _batch(vlm)
    deepstack = [p for n, p in vlm.named_parameters() if "deepstack_merger" in n]
    assert deepstack
    for kwargs in (
        {"latent_steps": 2},
        {"latent_inputs": 0.1 * torch.randn(2, 2, vlm.hidden_size)},
    ):
        vlm.zero_grad()
        vlm(batch, **kwargs).loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in deepstack), kwargs


def test_gemma3_image_tokens_attend_bidirectionally_in_the_prefix(tiny_factory):
    """The token types matter (else the check above could pass without them)."""
    vlm = LatentVLM.from_pretrained(tiny_factory("gemma3"))
    batch = _batch(vlm)
    with torch.no_grad():
        with_types = vlm(batch, latent_steps=0).logits
        without = vlm(
            {k: v for k, v in batch.items() if k != "token_type_ids"}, latent_steps=0
        ).logits
    assert (with_types - without).abs().max() > 1e-3


# ---------------------------------------------------------------------------- ROI-supervised training


def test_short_roi_sft_lowers_answer_and_alignment_losses(vlm):
    """Answer cross-entropy plus (1 - cos) between latent z_k and the pooled ROI visual tokens."""
    k = vlm.latent.steps
    batch = _batch(vlm, n=4)
    assert all(idx.numel() > 0 for idx in batch["roi_index"])

    def losses():
        out = vlm(batch)
        # Targets are detached: the latents move toward the image evidence, not the reverse.
        targets = torch.stack(
            [
                pool_targets(v.detach(), idx, k)
                for v, idx in zip(out.visual_tokens, batch["roi_index"])
            ]
        )  # [B, K, d]
        align = (1 - F.cosine_similarity(out.latents.float(), targets.float(), dim=-1)).mean()
        return out.loss, align

    torch.manual_seed(0)
    state = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    opt = torch.optim.AdamW(vlm.parameters(), lr=3e-3)
    vlm.train()
    try:
        with torch.no_grad():
            ce0, al0 = (float(x) for x in losses())
        for _ in range(12):
            ce, al = losses()
            opt.zero_grad()
            (ce + al).backward()
            opt.step()
        with torch.no_grad():
            ce1, al1 = (float(x) for x in losses())
    finally:
        vlm.eval()
        with torch.no_grad():  # the module-scoped model is shared with the tests above
            for n, p in vlm.named_parameters():
                p.copy_(state[n])
    assert ce1 < 0.8 * ce0, (ce0, ce1)
    assert al1 < 0.8 * al0, (al0, al1)


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_projector_puts_latents_at_token_embedding_scale(tiny_factory, family):
    """Gemma scales token embeddings by sqrt(d) inside the embedding module; latents must match what it outputs."""
    vlm = LatentVLM.from_pretrained(tiny_factory(family), LatentConfig(steps=2, projector="norm"))
    with torch.no_grad():
        ids = torch.arange(vlm.backbone.get_input_embeddings().weight.shape[0])
        token_rms = vlm.embed(ids).float().pow(2).mean(-1).sqrt().mean()
        z = vlm.projector(5.0 * torch.randn(8, vlm.hidden_size))
        latent_rms = z.pow(2).mean(-1).sqrt().mean()
    assert abs(latent_rms / token_rms - 1) < 1e-3


# ---------------------------------------------------------------------------- latent special tokens


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_new_latent_tokens_start_at_the_mean_row_even_on_spare_rows(tiny_factory, tied):
    """Real Qwen2.5-VL-7B has 152,064 embedding rows for 151,665 tokenizer entries: the latent tokens land on
    spare rows without the matrix growing. Their input and output rows must still start at the mean
    embedding, not keep whatever the spare rows held (issue 13, item 3)."""
    from medlvr.model.backbones import LATENT_TOKENS, ensure_latent_tokens

    folder = tiny_factory(with_latent_tokens=False)
    adapter = get_adapter("qwen2_5_vl")
    tokenizer = adapter.load_processor(folder).tokenizer
    model = adapter.model_class.from_pretrained(str(folder))
    n = len(tokenizer)
    model.resize_token_embeddings(
        n + 64, mean_resizing=False
    )  # 64 spare rows, as in a real checkpoint
    if not tied:
        model.config.tie_word_embeddings = model.config.get_text_config().tie_word_embeddings = (
            False
        )
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in {model.get_input_embeddings(), model.get_output_embeddings()}:
            layer.weight[n:] = (
                torch.randn_like(layer.weight[n:]) * 5
            )  # spare rows hold something far from the mean
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    assert ensure_latent_tokens(model, tokenizer)
    ids = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    assert (
        all(n <= i < n + 64 for i in ids) and model.get_input_embeddings().weight.shape[0] == n + 64
    ), "spare rows, no growth"
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for i in ids:
        assert torch.allclose(emb[i], old_in[:n].mean(0), atol=1e-6)
        assert torch.allclose(out[i], old_out[:n].mean(0), atol=1e-6)
    others = [i for i in range(n + 64) if i not in ids]
    assert torch.equal(emb[others], old_in[others]) and torch.equal(out[others], old_out[others])
    assert (out.data_ptr() == emb.data_ptr()) == tied
    assert not ensure_latent_tokens(model, tokenizer), "present tokens are left alone"


def test_new_latent_tokens_that_grow_the_matrix_start_at_the_mean_row(tiny_factory):
    from medlvr.model.backbones import LATENT_TOKENS, ensure_latent_tokens

    folder = tiny_factory(with_latent_tokens=False)
    adapter = get_adapter("qwen2_5_vl")
    tokenizer = adapter.load_processor(folder).tokenizer
    model = adapter.model_class.from_pretrained(str(folder))
    n = len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == n
    old = model.get_input_embeddings().weight.detach().clone()
    assert ensure_latent_tokens(model, tokenizer)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n + len(LATENT_TOKENS)
    for i in tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS)):
        assert torch.allclose(emb[i], old.mean(0), atol=1e-6)
