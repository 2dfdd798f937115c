"""`medlvr demo --quick`: the whole method end to end, a report with all four variants, reproducible."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medlvr.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]


def _run(out):
    res = CliRunner().invoke(app, ["demo", "--quick", "--seeds", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads((out / "results.json").read_text())["table"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "a"
    return out, _run(out)


def test_quick_demo_reports_all_four_variants(first):
    out, table = first
    report = (out / "report.md").read_text()
    assert {r["variant"] for r in table} == set("abcd")
    for split in ("test", "compositional"):
        rows = [r for r in table if r["split"] == split]
        assert len(rows) == 4
        assert len({r["n"] for r in rows}) == 1 and rows[0]["n"] > 0  # every variant scored on the same questions
        assert all(0.0 <= r["mean"] <= 1.0 for r in rows)
    for name in ("family_test.png", "family_compositional.png", "accuracy_vs_k.png", "training_curves.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert "| (c) ROI-SFT | compositional |" in report and "ROI-SFT (c) minus direct (a)" in report


def test_quick_demo_is_reproducible(first, tmp_path):
    _, table = first
    again = _run(tmp_path / "b")
    assert [(r["variant"], r["split"], r["per_seed"], r["n"]) for r in again] == [
        (r["variant"], r["split"], r["per_seed"], r["n"]) for r in table
    ]


def test_demo_rejects_bad_arguments(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--quick", "--full", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "choose one of --quick and --full" in res.output
    res = CliRunner().invoke(app, ["demo", "--dataset", "vqa-rad", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--data-root" in res.output
