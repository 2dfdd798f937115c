"""ROI boxes to visual tokens, K-target pooling, and the collator's prompts, labels and padding."""

from __future__ import annotations

import pytest
import torch

from medlvr.data.collate import VQACollator
from medlvr.data.prompts import CHOICE, SHORT, YES_NO, question_text, target_text
from medlvr.data.roi import box_to_tokens, pool_targets, sample_roi_indices
from medlvr.data.schema import ROI, VQASample
from medlvr.errors import MedlvrError
from medlvr.model.backbones import TokenGrid
from medlvr.model.latent import LatentVLM
from tests.conftest import random_image

GRID = TokenGrid(rows=4, cols=5, cell_w=28.0, cell_h=25.0)  # a 140x100 image


def test_box_inside_one_cell_and_across_cells():
    assert box_to_tokens((1, 1, 27, 24), GRID, 140, 100) == [0]
    assert box_to_tokens((30, 30, 60, 55), GRID, 140, 100) == [6, 7, 11, 12]
    # a box touching the right/bottom edges maps to the last row and column only
    assert box_to_tokens((113, 76, 140, 100), GRID, 140, 100) == [19]


def test_box_partly_outside_is_clipped_with_a_warning():
    with pytest.warns(UserWarning, match="clipped"):
        assert box_to_tokens((-20, -5, 20, 20), GRID, 140, 100) == [0]


def test_empty_box_is_an_error():
    with pytest.raises(
        MedlvrError, match="wholly outside its 140x100 image"
    ):  # the readers' rule (schema.box_outside)
        box_to_tokens((150, 10, 160, 20), GRID, 140, 100)


def test_indices_offset_by_earlier_images():
    g2 = TokenGrid(2, 2, 28.0, 28.0)
    idx = sample_roi_indices(
        [(1, (0, 0, 10, 10)), (0, (0, 0, 10, 10))], [GRID, g2], [(140, 100), (56, 56)]
    )
    assert idx.tolist() == [0, 20]


def test_pool_targets_chunks_in_raster_order():
    tokens = torch.arange(10.0)[:, None].repeat(1, 3)  # token i has value i
    out = pool_targets(tokens, torch.tensor([2, 3, 4, 5]), 2)
    assert out[:, 0].tolist() == [2.5, 4.5]
    few = pool_targets(tokens, torch.tensor([7, 9]), 4)  # fewer tokens than K: repeated in order
    assert few[:, 0].tolist() == [7, 7, 9, 9]
    with pytest.raises(MedlvrError):
        pool_targets(tokens, torch.tensor([], dtype=torch.long), 2)


def test_token_grid_follows_the_processor_on_non_square_images(tiny_dir):
    vlm = LatentVLM.from_pretrained(tiny_dir)
    for w, h in ((140, 100), (300, 90), (57, 233)):
        grid = vlm.adapter.token_grid(vlm.processor, w, h)
        thw = vlm.processor.image_processor(images=[random_image(w, h)], return_tensors="pt")[
            "image_grid_thw"
        ][0]
        assert (grid.rows, grid.cols) == (int(thw[1]) // 2, int(thw[2]) // 2)


def _sample(**kw):
    base = dict(
        id="x",
        dataset="d",
        split="test",
        images=["a"],
        question="Which shape?",
        answer="round",
        answer_type="open",
    )
    base.update(kw)
    return VQASample(**base)


def test_prompts_per_answer_type():
    choice = _sample(options={"A": "round", "B": "square"}, answer_letter="A", answer_type="choice")
    assert question_text(choice).endswith("Options:\nA. round\nB. square\n" + CHOICE)
    assert target_text(choice) == "A"
    assert question_text(_sample(answer="Yes", answer_type="closed")).endswith(YES_NO)
    assert question_text(_sample(answer="MRI", answer_type="closed")).endswith(SHORT)


def test_collator_pads_left_masks_labels_and_maps_rois(tiny_dir):
    vlm = LatentVLM.from_pretrained(tiny_dir)
    samples = [
        _sample(id="a", rois=[ROI(box=(0, 0, 30, 30))]),
        _sample(
            id="b",
            question="Is there a lesion in the upper left region?",
            answer="yes",
            answer_type="closed",
        ),
    ]
    batch = VQACollator(vlm.processor, vlm.adapter)(
        samples, images=[[random_image(140, 100)], [random_image(56, 56)]]
    )
    am = batch["attention_mask"]
    assert (am[:, -1] == 1).all() and (am[:, 0] == 0).sum() == 1  # left padded
    stop = vlm.tokenizer.eos_token_id  # the chat turn end (<|im_end|>)
    for row, mask, text in zip(batch["answer_ids"], batch["answer_mask"], ["round", "yes"]):
        ids = row[mask.bool()].tolist()
        assert ids[-1] == stop and vlm.tokenizer.decode(ids[:-1]) == text
    assert batch["roi_index"][0].tolist() == [0, 1, 5, 6]  # 30x30 px box over 28x25 cells
    assert batch["roi_index"][1].numel() == 0
    assert batch["images_per_sample"] == [1, 1] and batch["sample_ids"] == ["a", "b"]
    with pytest.raises(MedlvrError, match="batch size mismatch"):
        VQACollator(vlm.processor, vlm.adapter)(samples, images=[[random_image(56, 56)]])


def test_data_inspect_counts_and_draws(tmp_path):
    from typer.testing import CliRunner

    from medlvr.cli import app
    from medlvr.data.schema import write_jsonl

    img = tmp_path / "i.png"
    random_image(64, 64).save(img)
    rows = [
        _sample(
            id=str(i),
            images=[str(img)],
            rois=[ROI(box=(1, 1, 9, 9))] if i % 2 else [],
            modality="CT",
        )
        for i in range(4)
    ]
    write_jsonl(rows, tmp_path / "d.jsonl")
    res = CliRunner().invoke(
        app, ["data", "inspect", str(tmp_path / "d.jsonl"), "--png", str(tmp_path / "s.png")]
    )
    assert res.exit_code == 0, res.output
    assert "4 samples, 2 with ROIs (50.0%" in res.output and "CT: 4" in res.output
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size[0] > 100


def test_truncated_answers_keep_their_stop_token(tiny_dir):
    """An answer longer than `max_answer_tokens` is cut before the stop token, never the stop token itself:
    otherwise long answers are trained never to stop (issue 13, item 4)."""
    vlm = LatentVLM.from_pretrained(tiny_dir)
    long = "the lesion is in the upper left region of the left lung near the hilum"
    samples = [_sample(id="a", answer=long), _sample(id="b", answer="round")]
    batch = VQACollator(vlm.processor, vlm.adapter, with_rois=False, max_answer_tokens=4)(
        samples, images=[[random_image(56, 56)], [random_image(56, 56)]]
    )
    stop = vlm.tokenizer.eos_token_id
    full = vlm.tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(full) > 4, "the answer must need truncating"
    rows = [
        row[mask.bool()].tolist() for row, mask in zip(batch["answer_ids"], batch["answer_mask"])
    ]
    assert rows[0] == full[:3] + [stop]  # max_answer_tokens counts the stop token
    assert rows[1][-1] == stop and vlm.tokenizer.decode(rows[1][:-1]) == "round"
