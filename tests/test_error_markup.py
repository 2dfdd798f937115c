"""One-line errors print their text as written: square brackets in a message are not Rich markup."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from typer.testing import CliRunner

from medlvr.cli import app

runner = CliRunner()


def test_missing_extra_hint_keeps_its_brackets(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails as if not installed
    res = runner.invoke(app, ["serve", "--model", str(tiny_dir)])
    assert res.exit_code == 2
    assert "pip install 'medlvr[web]'" in res.output


def test_a_file_name_with_brackets_is_named_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["data", "inspect", "scan[web].jsonl"])  # no such file: one line
    assert res.exit_code == 2 and "scan[web].jsonl" in res.output, res.output
    Path("scan[web].jsonl").write_text("not json\n")  # its problems, one per line, name it too
    res = runner.invoke(app, ["data", "validate", "scan[web].jsonl"])
    assert res.exit_code == 1 and res.output.count("scan[web].jsonl") == 2, res.output


def test_a_name_that_reads_as_a_closing_tag_is_one_line_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["data", "validate", "runs[/x].jsonl"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1
    assert "runs[/x].jsonl" in res.output


def test_an_answer_with_brackets_prints_as_the_model_wrote_it(tiny_dir, monkeypatch, tmp_path):
    from medlvr import inference
    from tests.conftest import random_image

    real = inference.answer_one

    def bracketed(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), text="[bold]left[/] lobe")

    monkeypatch.setattr(inference, "answer_one", bracketed)
    image = tmp_path / "scan.png"
    random_image(32, 32).save(image)
    res = runner.invoke(
        app, ["predict", "--model", str(tiny_dir), "--image", str(image), "--question", "Where?"]
    )
    assert res.exit_code == 0, res.output
    assert "answer: [bold]left[/] lobe" in res.output
