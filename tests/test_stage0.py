"""Stage 0 of the demo: the description parser, a tiny end-to-end run, and the shipped backbone's card."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from medlvr.recipes.stage0 import ASSET, parse_description


def test_parse_description_reads_every_lesion():
    text = (
        "upper left: small bright round; center: large dark cross; Lower Right: small dark square"
    )
    assert parse_description(text) == {
        "upper left": ("small", "bright", "round"),
        "center": ("large", "dark", "cross"),
        "lower right": ("small", "dark", "square"),
    }
    assert parse_description("a lesion somewhere") == {}


def test_tiny_stage0_run_writes_a_loadable_model_and_its_card(tmp_path):
    from medlvr.cli import app
    from medlvr.model.latent import LatentVLM

    out = tmp_path / "stage0"
    args = ["demo", "backbone", "--out", str(out), "--size", "tiny", "--n", "60", "--steps", "3",
            "--batch-size", "4", "--eval-samples", "4", "--probe-weight", "2.0"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    scores = json.loads((out / "stage0_metrics.json").read_text())
    assert (
        scores["describe_records"] == scores["inspect_records"] == scores["hop1_questions"] == 4
        and scores["steps"] == 3
    )
    assert (
        scores["ground_records"] <= 4
    )  # a crowded chain image may have no lesion to name by its attributes
    assert sum(v for k, v in scores.items() if k.startswith("hop1_") and k.endswith("_n")) == 4
    for key in (
        "region_found",
        "shape_acc",
        "size_acc",
        "intensity_acc",
        "ground_acc",
        "inspect_acc",
    ):
        assert 0.0 <= scores[key] <= 1.0, key
    assert scores["final_probe_token_acc"] is None or 0.0 <= scores["final_probe_token_acc"] <= 1.0
    card = (out / "STAGE0.md").read_text()
    assert "--probe-weight 2.0" in card and "--n 60 --steps 3" in card
    vlm = LatentVLM.from_pretrained(out)
    assert not any("probe" in name for name, _ in vlm.named_parameters())


def test_shipped_backbone_card_matches_its_metrics():
    scores = json.loads((ASSET / "stage0_metrics.json").read_text())
    card = (ASSET / "STAGE0.md").read_text()
    for key in ("shape_acc", "ground_acc", "region_found", "hop1_acc", "hop1_chain_acc"):
        assert f"| {key} | {scores[key]:.3f} |" in card
    assert f"--steps {scores['steps']}" in card
