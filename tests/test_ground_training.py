"""ROI-SFT on a mixture: real VQA-RAD (no ROIs) and a generated grounded set, sampled by weight."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from medlvr.config import SFTConfig, load_config
from medlvr.data.ground import ground
from medlvr.data.schema import write_jsonl
from medlvr.data.sources import convert
from medlvr.train.data import SampleStream, load_train_set
from medlvr.train.sft import run_sft


def detection_release(folder: Path, n: int = 160, size: int = 112, seed: int = 0) -> Path:
    """A small COCO release whose boxes show: bright small nodules and dark red masses on noise."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        im = Image.fromarray(
            rng.normal(60, 12, (size, size)).clip(0, 255).astype(np.uint8)
        ).convert("RGB")
        draw = ImageDraw.Draw(im)
        for category, side, colour in ((1, 14, (230, 230, 230)), (2, 30, (150, 40, 40))):
            if rng.random() < 0.5:
                x, y = (int(v) for v in rng.integers(0, size - side, 2))
                draw.ellipse([x, y, x + side, y + side], fill=colour)
                annotations.append(
                    {
                        "id": len(annotations),
                        "image_id": i,
                        "category_id": category,
                        "bbox": [x, y, side, side],
                    }
                )
        im.save(folder / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "nodule"}, {"id": 2, "name": "mass"}]}))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, vqa_rad_root) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("mixture")
    release = detection_release(out / "release")
    grounded = ground(
        "coco",
        annotations=[f"train={release}"],
        images=str(out / "release" / "images"),
        dataset="toy-ground",
    )
    write_jsonl(grounded.samples, out / "grounded.jsonl")
    # VQA-RAD is read from ../shared and only referenced: the JSONL points at its images there.
    write_jsonl(convert("vqa-rad", vqa_rad_root, "train"), out / "vqa-rad-train.jsonl")
    return out / "vqa-rad-train.jsonl", out / "grounded.jsonl"


def test_mixture_weights_decide_each_files_share(mixture):
    data = load_train_set([str(p) for p in mixture])
    assert not data.has_roi[data.source == 0].any() and data.has_roi[data.source == 1].mean() > 0.7
    for weights in ([0.5, 0.5], [0.8, 0.2]):
        drawn = SampleStream(data.source, seed=0, weights=weights).take(0, 4000)
        share = np.bincount(data.source[drawn], minlength=2) / len(drawn)
        assert np.abs(share - weights).max() < 0.03, (weights, share)


@pytest.mark.slow
def test_roi_sft_on_vqa_rad_plus_grounded_data_lowers_the_roi_loss(mixture, tiny_dir, tmp_path):
    rad, grounded = mixture
    cfg = load_config(SFTConfig, None, [
        f"model.path={tiny_dir}", f"data.train=[{rad},{grounded}]", "data.weights=[0.5,0.5]", "data.max_answer_tokens=8",
        f"output_dir={tmp_path / 'run'}", "mode=roi", "align.kind=infonce", "latent.steps=2", "batch_size=8", "max_steps=30",
        "optim.lr=3e-3", "optim.warmup_steps=1", "log.every=1", "log.progress=false", "log.tensorboard=false",
        "checkpoint.every=0", "seed=0",
    ])  # fmt: skip
    result = run_sft(cfg)
    ce = [r["ce"] for r in result.history]
    align = [r["align"] for r in result.history if r.get("align") is not None]
    assert (
        len(ce) == 30 and len(align) == 30
    )  # every batch of the mixture holds grounded samples with ROIs
    assert np.mean(align[-5:]) < np.mean(align[:5]) - 0.15, align
    assert np.mean(ce[-5:]) < 0.6 * np.mean(ce[:5]), ce
