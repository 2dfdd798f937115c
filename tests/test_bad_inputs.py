"""Bad inputs through every command: exit code 2, one line, no traceback, no user file changed (issue 17).

The first tests reproduce the issue's items one by one; `test_bad_input_table` walks
`CASES`, one row per (command, bad input), and checks for every row that the command
prints exactly one `error: ...` line naming the problem, exits with code 2, shows no
traceback, and leaves every file that existed before it byte for byte as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medlvr.cli import app
from medlvr.errors import MedlvrError
from tests.conftest import random_image

runner = CliRunner()


def one_error_line(res) -> str:
    """The single `error:` line of a refused command (exit code 2, no traceback)."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small synthetic benchmark (84-px images) with exact ROIs."""
    from medlvr.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth84")
    generate(SynthConfig(n=40, seed=0, image_size=84, grid=2, level=1, large_size=1.0, small_size=0.5, describe=False), out)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scan.png"
    random_image(84, 84).save(path)
    return path


# ---------------------------------------------------------------------------- item 4: bounded sizes


def test_latent_steps_beyond_the_models_positions_are_refused_at_once(tiny_dir, image, data, tmp_path):
    line = one_error_line(runner.invoke(app, ["predict", "--model", str(tiny_dir), "--image", str(image),
                                              "--question", "Is there a lesion?", "--latent-steps", "1000000"]))  # fmt: skip
    assert "prompt tokens + K=1000000 latent steps (+2 markers) + 32 answer tokens need" in line and "model holds 4096" in line
    out = tmp_path / "R"
    line = one_error_line(runner.invoke(app, ["eval", "--model", str(tiny_dir), "--data", str(data / "test.jsonl"),
                                              "--mode", "latent", "--latent-steps", "0,100000000", "--out", str(out)]))  # fmt: skip
    assert "K=100000000 latent steps (+2 markers) + 32 answer tokens need 100000034 positions" in line
    assert not out.exists(), "refused before anything is written"


def test_a_question_longer_than_the_model_holds_is_refused(tiny_dir, image):
    line = one_error_line(runner.invoke(app, ["predict", "--model", str(tiny_dir), "--image", str(image),
                                              "--question", "is " * 5000 + "there a lesion?"]))  # fmt: skip
    assert "prompt tokens" in line and "the model holds 4096: shorten the question" in line


def test_training_with_more_latent_steps_than_positions_fails_with_one_message(tiny_dir, data, tmp_path):
    from medlvr.config import SFTConfig, load_config
    from medlvr.train.sft import run_sft

    cfg = load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"data.train=[{data / 'train.jsonl'}]",
                                        f"output_dir={tmp_path / 'run'}", "mode=latent", "latent.steps=5000", "batch_size=2",
                                        "max_steps=1", "log.progress=false", "log.tensorboard=false"])  # fmt: skip
    with pytest.raises(MedlvrError, match=r"K=5000 latent steps .* the model holds 4096"):
        run_sft(cfg)


# ---------------------------------------------------------------------------- item 5: one line, not a traceback


@pytest.fixture(scope="module")
def broken_models(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny model: model.safetensors cut to 90%, emptied, and replaced by pickle weights."""
    import shutil

    import torch

    from medlvr.model.latent import LatentVLM

    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name in ("truncated", "empty", "pickle"):
        out[name] = Path(shutil.copytree(tiny_dir, root / name))
    weights = out["truncated"] / "model.safetensors"
    os.truncate(weights, int(weights.stat().st_size * 0.9))
    (out["empty"] / "model.safetensors").write_bytes(b"")
    state = LatentVLM.from_pretrained(tiny_dir).backbone.state_dict()
    torch.save(state, out["pickle"] / "pytorch_model.bin")
    (out["pickle"] / "model.safetensors").unlink()
    return out


@pytest.mark.parametrize("kind, message", [("truncated", r"model.safetensors is damaged \(\d[\d,]* bytes, truncated"),
                                           ("empty", r"model.safetensors is empty; copy or export the model again"),
                                           ("pickle", r"holds pickle weights only \(pytorch_model.bin\).*--allow-pickle")])
def test_a_broken_or_pickled_model_folder_is_one_line_in_every_command(broken_models, image, data, tmp_path, kind, message):
    import re

    model = str(broken_models[kind])
    question = ["--image", str(image), "--question", "Is there a lesion?"]
    for args in (["predict", "--model", model, *question],
                 ["explain", "--model", model, *question, "--out", str(tmp_path / "e.png")],
                 ["eval", "--model", model, "--data", str(data / "test.jsonl"), "--out", str(tmp_path / "R")],
                 ["train", "sft", f"model.path={model}", f"data.train=[{data / 'train.jsonl'}]", "mode=plain",
                  f"output_dir={tmp_path / 'run'}", "max_steps=1", "log.progress=false"]):  # fmt: skip
        assert re.search(message, one_error_line(runner.invoke(app, args))), args
    assert not [p for p in tmp_path.iterdir()], "nothing written"


def test_pickle_weights_load_only_when_allowed(broken_models, image):
    res = runner.invoke(app, ["predict", "--model", str(broken_models["pickle"]), "--image", str(image),
                              "--question", "Is there a lesion?", "--latent-steps", "1", "--allow-pickle"])  # fmt: skip
    assert res.exit_code == 0 and "answer:" in res.output, res.output


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_resume_is_exact(tiny_dir, data, tmp_path, monkeypatch):
    """The second checkpoint's write fails as a full disk fails it; --resume from the first then ends
    exactly where an uninterrupted run ends, and removes the half-written folder."""
    from safetensors import SafetensorError

    import medlvr.train.checkpoint as ckpt

    args = ["train", "sft", f"model.path={tiny_dir}", f"data.train=[{data / 'train.jsonl'}]", "mode=latent",
            "latent.steps=1", "batch_size=2", "max_steps=3", "checkpoint.every=1", "log.every=1", "log.progress=false",
            "log.tensorboard=false", "optim.schedule=constant"]  # fmt: skip
    assert runner.invoke(app, [*args, f"output_dir={tmp_path / 'full'}"]).exit_code == 0
    real, calls = ckpt.optimizer_to_files, []

    def full_disk(optimizer, folder):
        calls.append(folder)
        if len(calls) == 2:
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')  # fmt: skip
        return real(optimizer, folder)

    monkeypatch.setattr(ckpt, "optimizer_to_files", full_disk)
    cut = tmp_path / "cut"
    line = one_error_line(runner.invoke(app, [*args, f"output_dir={cut}"]))
    assert f"could not write checkpoint {cut / 'step-0000002'}" in line and "No space left on device" in line
    assert "continue with --resume" in line
    assert sorted(p.name for p in cut.glob("*step-*")) == [".tmp-step-0000002", "step-0000001"]
    monkeypatch.undo()
    res = runner.invoke(app, [*args, f"output_dir={cut}", "--resume"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in cut.glob("*step-*")) == ["step-0000002", "step-0000003"]
    import json

    def rows(folder):
        return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]

    assert [(r["step"], r["loss"]) for r in rows(cut)] == [(r["step"], r["loss"]) for r in rows(tmp_path / "full")]


# ---------------------------------------------------------------------------- item 7: one set of rules


def _with_box(data: Path, out: Path, box: list[float]) -> Path:
    """The first test record, its ROI moved to `box` (the synthetic images are 84 x 84)."""
    import json

    rec = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    rec["images"] = [str((data / rec["images"][0]).resolve())]
    rec["rois"] = [{"box": box, "image": 0, "label": "lesion"}]
    out.write_text(json.dumps(rec) + "\n")
    return out


def test_an_roi_box_wholly_outside_its_image_fails_validate_and_every_reader(tiny_dir, data, tmp_path):
    from medlvr.config import SFTConfig, load_config
    from medlvr.data.schema import DataError, read_jsonl
    from medlvr.train.sft import run_sft

    bad = _with_box(data, tmp_path / "outside.jsonl", [100, 100, 120, 120])
    res = runner.invoke(app, ["data", "validate", str(bad)])
    assert res.exit_code == 1 and "rois.0.box: box [100.0, 100.0, 120.0, 120.0] lies wholly outside its 84x84 image" in res.output
    with pytest.raises(DataError, match="lies wholly outside its 84x84 image"):
        read_jsonl(bad)
    cfg = load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"data.train=[{bad}]", "mode=roi",
                                        f"output_dir={tmp_path / 'run'}", "log.progress=false"])  # fmt: skip
    with pytest.raises(DataError, match=r"^problem in the data: .*outside.jsonl:1: rois.0.box: box .* wholly outside"):
        run_sft(cfg)
    # A box partly outside is clipped by training, so every reader accepts it.
    partly = _with_box(data, tmp_path / "partly.jsonl", [70, 70, 120, 120])
    res = runner.invoke(app, ["data", "validate", str(partly)])
    assert res.exit_code == 0 and "no problems" in res.output, res.output


def test_an_empty_jsonl_is_an_error_everywhere(tiny_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    res = runner.invoke(app, ["data", "validate", str(empty)])
    assert res.exit_code == 1 and f"{empty}: the file has no records" in res.output
    line = one_error_line(runner.invoke(app, ["eval", "--model", str(tiny_dir), "--data", str(empty), "--out",
                                              str(tmp_path / "R")]))  # fmt: skip
    assert line == f"error: problem in the data: {empty}: the file has no records"
    assert not (tmp_path / "R").exists()


def _slake_root(root: Path, records: list[dict]) -> Path:
    import json

    (root / "imgs" / "xmlab1").mkdir(parents=True)
    random_image(32, 32).save(root / "imgs" / "xmlab1" / "source.jpg")
    for name in ("train.json", "validate.json", "test.json"):
        (root / name).write_text(json.dumps(records))
    return root


def test_a_slake_root_whose_records_lack_fields_converts_nothing_and_fails(tmp_path):
    out = tmp_path / "slake.jsonl"
    root = _slake_root(tmp_path / "release", [{"img_name": "xmlab1/source.jpg", "question": "q?", "answer": "Yes"}])
    line = one_error_line(runner.invoke(app, ["data", "convert", "slake", "--root", str(root), "--out", str(out)]))
    assert "train.json record 0: no q_lang, qid, answer_type field" in line and not out.exists()
    only_zh = {"img_name": "xmlab1/source.jpg", "question": "q?", "answer": "是", "q_lang": "zh", "qid": 1,
               "answer_type": "CLOSED"}  # fmt: skip
    root = _slake_root(tmp_path / "zh", [only_zh])
    line = one_error_line(runner.invoke(app, ["data", "convert", "slake", "--root", str(root), "--out", str(out)]))
    assert f"slake: no question converted from {root}" in line and not out.exists()


def test_a_malformed_release_json_names_its_file(tmp_path):
    (tmp_path / "VQA_RAD Dataset Public.json").write_text('[{"qid": 1,\n  "question": }]')
    line = one_error_line(runner.invoke(app, ["data", "convert", "vqa-rad", "--root", str(tmp_path), "--out",
                                              str(tmp_path / "out.jsonl")]))  # fmt: skip
    assert line == (f"error: vqa-rad: {tmp_path / 'VQA_RAD Dataset Public.json'} is not valid JSON: "
                    "Expecting value at line 2, column 15")


# ---------------------------------------------------------------------------- item 9: small ones


def test_an_unwritable_output_is_found_before_the_model_loads(tmp_path, image, data, monkeypatch):
    import medlvr.model.latent

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(medlvr.model.latent.LatentVLM, "from_pretrained", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    model = str(tmp_path)  # never loaded
    line = one_error_line(runner.invoke(app, ["explain", "--model", model, "--image", str(image), "--question", "Where?",
                                              "--out", str(blocker / "e.png")]))  # fmt: skip
    assert f"cannot write the folder of --out {blocker}: it is a file, not a folder" in line
    line = one_error_line(runner.invoke(app, ["eval", "--model", model, "--data", str(data / "test.jsonl"),
                                              "--out", str(blocker / "R")]))  # fmt: skip
    assert f"cannot write the folder of --out {blocker / 'R'}: Not a directory" in line
    assert blocker.read_text() == "mine"
