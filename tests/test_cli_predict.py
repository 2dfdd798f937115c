"""`medlvr predict` and `medlvr model init-tiny` from the command line: answers, and one clear error per bad input."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from medlvr.cli import app
from tests.conftest import random_image

runner = CliRunner()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scan.png"
    random_image(120, 90).save(path)
    return path


def test_predict_prints_answer_steps_and_time(tiny_dir, image_path):
    res = runner.invoke(
        app,
        [
            "predict",
            "--model",
            str(tiny_dir),
            "--image",
            str(image_path),
            "--question",
            "Is there a lesion?",
            "--latent-steps",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "answer:" in res.output
    assert "latent steps: 3" in res.output
    assert " ms" in res.output


def test_predict_with_options_and_two_images(tiny_dir, image_path):
    res = runner.invoke(
        app,
        [
            "predict",
            "--model",
            str(tiny_dir),
            "--image",
            str(image_path),
            "--image",
            str(image_path),
            "--question",
            "Which shape?",
            "--option",
            "A=round",
            "--option",
            "B=square",
        ],
    )
    assert res.exit_code == 0, res.output


def test_init_tiny_writes_a_loadable_folder(tmp_path):
    res = runner.invoke(
        app, ["model", "init-tiny", "--out", str(tmp_path / "m"), "--family", "qwen2_vl"]
    )
    assert res.exit_code == 0, res.output
    assert "qwen2_vl (tiny" in res.output
    assert (tmp_path / "m" / "config.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--latent-steps", "-1"], "--latent-steps must be >= 0"),
        (["--option", "Around"], "--option must look like A=text"),
    ],
)
def test_predict_bad_arguments_exit_2(tiny_dir, image_path, args, message):
    res = runner.invoke(
        app,
        [
            "predict",
            "--model",
            str(tiny_dir),
            "--image",
            str(image_path),
            "--question",
            "q?",
            *args,
        ],
    )
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


def test_predict_without_image_exit_2(tiny_dir):
    res = runner.invoke(
        app, ["predict", "--model", str(tiny_dir), "--question", "Is there a lesion?"]
    )
    assert res.exit_code == 2 and "needs at least one --image" in res.output


def test_predict_unreadable_image_exit_2(tiny_dir, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    for path in (bad, tmp_path / "missing.png"):
        res = runner.invoke(
            app, ["predict", "--model", str(tiny_dir), "--image", str(path), "--question", "q?"]
        )
        assert res.exit_code == 2, res.output
        assert str(path.name) in res.output and "Traceback" not in res.output


def test_predict_folder_that_is_not_a_model_exit_2(tmp_path, image_path):
    res = runner.invoke(
        app, ["predict", "--model", str(tmp_path), "--image", str(image_path), "--question", "q?"]
    )
    assert res.exit_code == 2 and "not a model folder" in res.output


def test_init_tiny_unknown_family_exit_2(tmp_path):
    res = runner.invoke(
        app, ["model", "init-tiny", "--out", str(tmp_path / "m"), "--family", "llava"]
    )
    assert res.exit_code == 2 and "unknown backbone family 'llava'" in res.output
