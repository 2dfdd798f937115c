"""The auxiliary token probe: exact token labels, a loss that falls, checkpoints and a probe-free export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medlvr.config import SFTConfig, load_config
from medlvr.data.schema import ROI, VQASample, read_jsonl
from medlvr.errors import MedlvrError
from medlvr.model.backbones import TokenGrid
from medlvr.train.probe import (
    IGNORE,
    TokenLabeler,
    TokenProbe,
    TokenTargets,
    probe_labels,
    token_centres,
)
from medlvr.train.sft import run_sft


def _sample(rois: list[ROI], question_type: str = "describe", images: int = 2) -> VQASample:
    return VQASample(id="s", dataset="d", split="train", question="q?", answer="a", answer_type="open",
                     images=[f"/x/{i}.png" for i in range(images)], rois=rois, question_type=question_type)  # fmt: skip


def test_labeler_marks_exactly_the_roi_tokens():
    grid = TokenGrid(rows=3, cols=4, cell_w=10, cell_h=10)  # a 40 x 30 image, 12 tokens
    labeler = TokenLabeler(["round", "square"], question_types=["describe"])
    s = _sample([ROI(box=(0, 0, 10, 10), label="square"), ROI(box=(25, 12, 35, 28), label="round"),
                 ROI(box=(0, 20, 5, 25), label="mystery"), ROI(box=(30, 0, 40, 5))])  # fmt: skip
    y, centres = labeler(s, [grid], [(40, 30)])
    expected = torch.zeros(12, dtype=torch.long)
    expected[0] = 2  # square: cell (0, 0)
    expected[[6, 7, 10, 11]] = 1  # round: rows 1-2, cols 2-3
    expected[8] = IGNORE  # an unknown label is ignored, not background
    expected[3] = IGNORE  # so is an unlabelled ROI
    assert torch.equal(y, expected)
    # Token 6 is row 1, column 2: centre (15, 25) px of a 40 x 30 image.
    assert centres.shape == (12, 2) and torch.allclose(centres[6], torch.tensor([15 / 30, 25 / 40]))
    # Two images: the second image's tokens come after the first's.
    two = _sample([ROI(box=(0, 0, 10, 10), label="round", image=1)])
    y2 = labeler(two, [grid, grid], [(40, 30), (40, 30)]).labels
    assert y2.shape == (24,) and y2[12] == 1 and int((y2 != 0).sum()) == 1
    # A question type the probe does not apply to: every token ignored.
    assert (labeler(_sample(s.rois, "ground"), [grid], [(40, 30)]).labels == IGNORE).all()


def test_probe_labels_come_from_the_samples_it_applies_to():
    samples = [_sample([ROI(box=(0, 0, 1, 1), label="b"), ROI(box=(0, 0, 1, 1), label="a")]),
               _sample([ROI(box=(0, 0, 1, 1), label="z")], "ground")]  # fmt: skip
    assert probe_labels(samples, ["describe"]) == ["a", "b"]
    assert probe_labels(samples) == ["a", "b", "z"]
    with pytest.raises(MedlvrError, match="no labelled ROIs"):
        probe_labels(samples, ["presence"])


def test_token_centres_of_a_tiled_grid():
    tile = TokenGrid(rows=1, cols=2, cell_w=10, cell_h=20, x0=20, y0=0)
    glob = TokenGrid(rows=1, cols=1, cell_w=40, cell_h=20)
    grid = TokenGrid(rows=1, cols=4, cell_w=10, cell_h=20, blocks=(tile, glob))
    expected = torch.tensor([[0.5, 25 / 40], [0.5, 35 / 40], [0.5, 0.5]])
    assert torch.allclose(token_centres(grid, 40, 20), expected)


@pytest.mark.parametrize("position_weight", [0.0, 2.0])
def test_probe_loss_is_token_cross_entropy_plus_position_error(position_weight):
    torch.manual_seed(0)
    probe = TokenProbe(8, ["background", "x", "y"], position_weight)
    tokens = [torch.randn(5, 8), torch.randn(3, 8)]
    centres = [torch.rand(5, 2), torch.rand(3, 2)]
    targets = [
        TokenTargets(torch.tensor([0, 1, 2, IGNORE, 0]), centres[0]),
        TokenTargets(torch.full((3,), IGNORE), centres[1]),
    ]
    loss, hits = probe(tokens, targets)
    ce = torch.nn.functional.cross_entropy(
        probe.head(tokens[0][[0, 1, 2, 4]]), torch.tensor([0, 1, 2, 0])
    )
    mse = (
        [
            ((probe.position(torch.nn.functional.layer_norm(t, (8,))) - c) ** 2).sum(-1).mean()
            for t, c in zip(tokens, centres)
        ]
        if position_weight
        else [torch.tensor(0.0)] * 2
    )
    assert (probe.position is None) == (position_weight == 0)  # no unused head
    assert torch.allclose(loss[0], ce + position_weight * mse[0])
    assert torch.allclose(loss[1], position_weight * mse[1])  # not probed: the position term only
    assert hits.tolist() == [
        float((probe.head(tokens[0][[1, 2]]).argmax(-1) == torch.tensor([1, 2])).sum()),
        2.0,
        1.0,
    ]
    with pytest.raises(MedlvrError, match="5 visual tokens but 4"):
        probe(tokens[:1], [TokenTargets(targets[0].labels[:4], centres[0][:4])])


@pytest.fixture(scope="module")
def describe_data(tmp_path_factory) -> Path:
    """Stage-0 describe/ground records on 84-px images (3x3 visual tokens)."""
    from medlvr.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth-describe")
    cfg = SynthConfig(n=60, seed=0, image_size=84, grid=2, level=1, large_size=1.0, small_size=0.6,
                      question_types={"presence": 1})  # fmt: skip
    files = generate(cfg, out)
    return Path(files["describe"])


def test_stage0_records_carry_the_described_attributes(describe_data):
    for s in read_jsonl(describe_data):
        labels = [r.label for r in s.rois]
        if s.question_type == "describe":
            assert labels == [part.split(": ")[1] for part in s.answer.split("; ")]
        elif s.answer == "nothing":  # inspect: an empty region
            assert s.question_type == "inspect" and labels == ["region"]
        else:  # ground / inspect: the one lesion named
            assert len(labels) == 1 and labels[0].split()[-1] in (
                "round",
                "square",
                "triangle",
                "cross",
            )


def test_probe_trains_checkpoints_resumes_and_is_not_exported(tiny_dir, describe_data, tmp_path):
    def cfg(out: Path, *extra: str) -> SFTConfig:
        return load_config(SFTConfig, None, [
            f"model.path={tiny_dir}", f"data.train=[{describe_data}]", f"output_dir={out}", "mode=plain",
            "batch_size=12", "max_steps=16", "optim.lr=1e-2", "optim.warmup_steps=1", "log.every=1",
            "log.progress=false", "log.tensorboard=false", "seed=0", "probe.weight=1.0",
            "probe.question_types=[describe]", "checkpoint.every=8", *extra,
        ])  # fmt: skip

    full = run_sft(cfg(tmp_path / "full"))
    rows = [
        json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum("probe" in r for r in rows) == 16
    probe = [
        r["probe"] for r in rows if r.get("probe") is not None
    ]  # None: no describe record in the batch
    assert len(probe) >= 10 and sum(probe[-4:]) / 4 < 0.8 * sum(probe[:4]) / 4, probe
    assert all(0 <= r["probe_acc"] <= 1 for r in rows if r.get("probe_acc") is not None)
    ckpt = tmp_path / "full" / "step-0000008"
    classes = len(probe_labels(read_jsonl(describe_data), ["describe"])) + 1
    assert load_file(ckpt / "probe.safetensors")["head.weight"].shape == (
        classes,
        full.model.hidden_size,
    )
    # The export is the model alone: no probe tensor anywhere in it.
    exported = [k for f in full.final_model.glob("*.safetensors") for k in load_file(f)]
    assert exported and not any("probe" in k for k in exported)

    # Stopped after step 8 and resumed: the probe comes back, so the run ends where the uninterrupted one did.
    class Stop(Exception):
        pass

    def stop_at_9(row):
        if row["step"] == 9:
            raise Stop

    with pytest.raises(Stop):
        run_sft(cfg(tmp_path / "cut"), on_step=stop_at_9)
    resumed = run_sft(cfg(tmp_path / "cut", "checkpoint.resume=true"))
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert resumed.metrics["probe"] == pytest.approx(full.metrics["probe"], abs=1e-5)
