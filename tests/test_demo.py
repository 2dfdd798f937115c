"""`medlvr demo --quick`: every arm end to end, a report that answers the question, reproducible."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from medlvr.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]


def _run(out, *extra):
    res = CliRunner().invoke(app, ["demo", "--quick", "--seeds", "1", "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """One quick run of both ladders (the default), as `make demo` runs them."""
    out = tmp_path_factory.mktemp("demo") / "a"
    return out, _run(out)


@pytest.fixture(scope="module")
def first(both):
    out, results = both
    return out / "depth", results["ladders"]["depth"]


def test_quick_demo_runs_both_ladders_into_one_report(both):
    out, results = both
    assert set(results["ladders"]) == {"depth", "subtlety"}
    report = (out / "report.md").read_text()
    assert report.index("the depth ladder") < report.index("the subtlety ladder")
    headings = re.findall(r"^#+ Verdict$", report, flags=re.M)
    assert headings == ["### Verdict", "### Verdict"], headings  # each ladder's, one level down
    for ladder in ("depth", "subtlety"):
        assert f"[{ladder}/report.md]({ladder}/report.md)" in report
    # images of each ladder's report are linked into its folder, and exist
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert links and all((out / link).is_file() for link in links), links


def test_quick_demo_reports_every_arm_by_subtlety_rung(both):
    out, results = both
    sub = results["ladders"]["subtlety"]
    table = sub["table"]
    assert [r["variant"] for r in table if r["rung"] is None] == list("atpbcdr")
    for arm in "atpbcdr":
        rows = [r for r in table if r["variant"] == arm]
        rungs = [r["rung"] for r in rows[1:]]
        assert rungs == sorted(rungs) and set(rungs) <= set(range(8))
        assert sum(r["n"] for r in rows[1:]) == rows[0]["n"] == 24  # every question has a rung
    assert {r["variant"]: r["K"] for r in table}["r"] == 0
    assert {(p["arm"], p["against"]) for p in sub["pairs"]} >= {("c", "r"), ("c", "a"), ("r", "a")}
    report = (out / "subtlety" / "report.md").read_text()
    for text in (
        "## The rungs",
        "Calibration: direct (a)",
        "## Accuracy by subtlety rung",
        "rung 0",
    ):
        assert text in report, text
    assert (out / "subtlety" / "plots" / "accuracy_by_rung.png").stat().st_size > 1000
    # (r) trained with the ROI alignment at the answer position and no latent steps
    r_config = (out / "subtlety" / "runs" / "r_seed1" / "config.yaml").read_text()
    assert "mode: roi_direct" in r_config and "weight: 0.5" in r_config
    # (t) wrote where the evidence is and what it looks like before the answer
    t_train = (out / "subtlety" / "data" / "train_reasoning.jsonl").read_text()
    assert re.search(
        r"(largest|smallest) lesion: [a-z ]+, (large|small) (bright|dark) lesion; answer: ", t_train
    )


def test_quick_demo_reports_every_arm_by_depth(first):
    out, results = first
    table = results["table"]
    assert [r["variant"] for r in table if r["hops"] is None] == list("atpbcde")
    for arm in "atpbcde":
        rows = [r for r in table if r["variant"] == arm]
        assert [r["hops"] for r in rows] == [None, 1, 2, 3]
        assert (
            sum(r["n"] for r in rows[1:]) == rows[0]["n"] == 24
        )  # every test question has a depth
        assert all(0.0 <= r["mean"] <= 1.0 for r in rows)
    assert {r["variant"]: r["K"] for r in table} == {
        "a": 0,
        "t": 0,
        "p": 6,
        "b": 6,
        "c": 6,
        "d": 6,
        "e": 6,
    }
    pairs = {(p["arm"], p["against"], p["hops"]) for p in results["pairs"]}
    assert {
        ("c", "a", 3),
        ("c", "p", 3),
        ("c", "t", 3),
        ("d", "c", 3),
        ("e", "a", 3),
        ("e", "t", 3),
        ("e", "b", 3),
    } <= pairs
    assert (
        set(results["controls"]["blank"])
        == set(results["controls"]["question-only"])
        == set("atpbcde")
    )
    assert 0 < results["chance"] <= 1
    assert {"p", "b", "c", "d", "e"} == set(results["diagnostics"])
    assert all(set(d) == {"next_hop_pointing", "probes"} for d in results["diagnostics"].values())
    assert {"p", "b", "c", "d", "e"} == set(results["explain"]) and all(
        "hop_pointing" in m for m in results["explain"].values()
    )
    report = (out / "report.md").read_text()
    for text in (
        "## Verdict",
        "Regime: direct (a)",
        "ROI-SFT (c) minus the pause control (p)",
        "Blank images",
        "The latent curriculum (e) minus the text reasoning it starts from (t)",
        "## Paired comparisons by depth",
        "per-hop pointing",
        "ms / question",
        "## Latent diagnostics (the producer's gates)",
        "| next hop 2 | next hop 3 | answer probe |",
    ):
        assert text in report, text
    for name in ("accuracy_by_hops.png", "accuracy_vs_k.png", "training_curves.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    # the text-reasoning arm was trained on the chain written out, the others on the bare answer
    t_train = (out / "data" / "train_reasoning.jsonl").read_text()
    assert "; answer: " in t_train and (
        "largest lesion: " in t_train or "smallest lesion: " in t_train
    )
    # the curriculum arm handed one hop per stage to K / hops = 2 latent steps, ending at K = 6
    e_rows = [
        json.loads(line)
        for line in (out / "runs" / "e_seed1" / "metrics.jsonl").read_text().splitlines()
    ]
    e_config = (out / "runs" / "e_seed1" / "config.yaml").read_text()
    assert "replace_reasoning: true" in e_config and "- 0\n- 2\n- 4\n- 6" in e_config
    assert [r["latent_steps"] for r in e_rows if "latent_steps" in r][-1] == 6


def test_quick_demo_is_reproducible_in_parallel_and_resumes(both, tmp_path):
    _, results = both
    again = _run(tmp_path / "b", "--arms", "ac", "--workers", "2", "--ladder", "subtlety")
    key = lambda r: (r["variant"], r["split"], r["per_seed"], r["n"])  # noqa: E731
    assert [key(r) for r in again["table"]] == [
        key(r) for r in results["ladders"]["subtlety"]["table"] if r["variant"] in "ac"
    ]
    # --resume reuses the finished arms: the same numbers, and no arm trained again
    saved = tmp_path / "b" / "runs" / "a_seed1" / "arm_result.json"
    stamp = saved.stat().st_mtime_ns
    resumed = _run(
        tmp_path / "b", "--arms", "ac", "--workers", "1", "--ladder", "subtlety", "--resume"
    )
    assert [key(r) for r in resumed["table"]] == [key(r) for r in again["table"]]
    assert saved.stat().st_mtime_ns == stamp
    # an arm trained but interrupted while being scored: its training run is taken as it is
    saved.unlink()
    weights = tmp_path / "b" / "runs" / "a_seed1" / "final" / "model.safetensors"
    trained = weights.stat().st_mtime_ns
    again_a = _run(
        tmp_path / "b", "--arms", "a", "--workers", "1", "--ladder", "subtlety", "--resume"
    )
    assert weights.stat().st_mtime_ns == trained and saved.is_file()
    assert [key(r) for r in again_a["table"]] == [
        key(r) for r in again["table"] if r["variant"] == "a"
    ]
    # a different setting is not a finished arm of this run: trained afresh
    _run(
        tmp_path / "b",
        "--arms",
        "a",
        "--workers",
        "1",
        "--ladder",
        "subtlety",
        "--resume",
        "--lr",
        "0.001",
    )
    assert saved.stat().st_mtime_ns != stamp


def test_demo_rejects_bad_arguments(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--quick", "--full", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "choose one of --quick and --full" in res.output
    res = CliRunner().invoke(app, ["demo", "--dataset", "vqa-rad", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--data-root" in res.output
    res = CliRunner().invoke(app, ["demo", "--quick", "--arms", "ad", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "arm d (VLPO) starts from arm c" in res.output
    res = CliRunner().invoke(app, ["demo", "--quick", "--arms", "az", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown arm" in res.output
    res = CliRunner().invoke(app, ["demo", "--quick", "--sft-steps", "-1", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "sft_steps must be >= 0" in res.output


def test_sft_steps_overrides_the_budget_for_every_sft_arm_and_the_curriculum_splits_them():
    from medlvr.recipes.demo_config import BUDGETS, DemoConfig

    assert DemoConfig().spec.sft_steps == BUDGETS["default"].sft_steps == 400
    longer = DemoConfig(sft_steps=800)
    assert longer.spec.sft_steps == 800 and longer.spec.batch_size == BUDGETS["default"].batch_size
    assert longer.curriculum() == [0, 2, 4, 6] and DemoConfig(latent_steps=8).curriculum() == [
        0,
        2,
        5,
        8,
    ]
