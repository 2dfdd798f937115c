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
    generate(
        SynthConfig(
            n=40,
            seed=0,
            image_size=84,
            grid=2,
            level=1,
            large_size=1.0,
            small_size=0.5,
            describe=False,
        ),
        out,
    )
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scan.png"
    random_image(84, 84).save(path)
    return path


# ---------------------------------------------------------------------------- item 4: bounded sizes


def test_latent_steps_beyond_the_models_positions_are_refused_at_once(
    tiny_dir, image, data, tmp_path
):
    line = one_error_line(runner.invoke(app, ["predict", "--model", str(tiny_dir), "--image", str(image),
                                              "--question", "Is there a lesion?", "--latent-steps", "1000000"]))  # fmt: skip
    assert (
        "prompt tokens + K=1000000 latent steps (+2 markers) + 32 answer tokens need" in line
        and "model holds 4096" in line
    )
    out = tmp_path / "R"
    line = one_error_line(runner.invoke(app, ["eval", "--model", str(tiny_dir), "--data", str(data / "test.jsonl"),
                                              "--reasoning", "latent", "--latent-steps", "0,100000000", "--out", str(out)]))  # fmt: skip
    assert (
        "K=100000000 latent steps (+2 markers) + 32 answer tokens need 100000034 positions" in line
    )
    assert not out.exists(), "refused before anything is written"


def test_a_question_longer_than_the_model_holds_is_refused(tiny_dir, image):
    line = one_error_line(runner.invoke(app, ["predict", "--model", str(tiny_dir), "--image", str(image),
                                              "--question", "is " * 5000 + "there a lesion?"]))  # fmt: skip
    assert "prompt tokens" in line and "the model holds 4096: shorten the question" in line


def test_training_with_more_latent_steps_than_positions_fails_with_one_message(
    tiny_dir, data, tmp_path
):
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


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", r"model.safetensors is damaged \(\d[\d,]* bytes, truncated"),
        ("empty", r"model.safetensors is empty; copy or export the model again"),
        ("pickle", r"holds pickle weights only \(pytorch_model.bin\).*--allow-pickle"),
    ],
)
def test_a_broken_or_pickled_model_folder_is_one_line_in_every_command(
    broken_models, image, data, tmp_path, kind, message
):
    import re

    model = str(broken_models[kind])
    question = ["--image", str(image), "--question", "Is there a lesion?"]
    for args in (["predict", "--model", model, *question],
                 ["explain", "--model", model, *question, "--out", str(tmp_path / "e.png")],
                 ["eval", "--model", model, "--data", str(data / "test.jsonl"), "--out", str(tmp_path / "R")],
                 ["train", "sft", f"model.path={model}", f"data.train=[{data / 'train.jsonl'}]", "mode=plain",
                  f"output_dir={tmp_path / 'run'}", "max_steps=1", "log.progress=false"]):  # fmt: skip
        assert re.search(message, one_error_line(runner.invoke(app, args))), args
    assert not list(tmp_path.iterdir()), "nothing written"


def test_pickle_weights_load_only_when_allowed(broken_models, image):
    res = runner.invoke(app, ["predict", "--model", str(broken_models["pickle"]), "--image", str(image),
                              "--question", "Is there a lesion?", "--latent-steps", "1", "--allow-pickle"])  # fmt: skip
    assert res.exit_code == 0 and "answer:" in res.output, res.output


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_resume_is_exact(
    tiny_dir, data, tmp_path, monkeypatch
):
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
    assert (
        f"could not write checkpoint {cut / 'step-0000002'}" in line
        and "No space left on device" in line
    )
    assert "continue with --resume" in line
    assert sorted(p.name for p in cut.glob("*step-*")) == [".tmp-step-0000002", "step-0000001"]
    monkeypatch.undo()
    res = runner.invoke(app, [*args, f"output_dir={cut}", "--resume"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in cut.glob("*step-*")) == ["step-0000002", "step-0000003"]
    import json

    def rows(folder):
        return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]

    assert [(r["step"], r["loss"]) for r in rows(cut)] == [
        (r["step"], r["loss"]) for r in rows(tmp_path / "full")
    ]


# ---------------------------------------------------------------------------- item 7: one set of rules


def _with_box(data: Path, out: Path, box: list[float]) -> Path:
    """The first test record, its ROI moved to `box` (the synthetic images are 84 x 84)."""
    import json

    rec = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    rec["images"] = [str((data / rec["images"][0]).resolve())]
    rec["rois"] = [{"box": box, "image": 0, "label": "lesion"}]
    out.write_text(json.dumps(rec) + "\n")
    return out


def test_an_roi_box_wholly_outside_its_image_fails_validate_and_every_reader(
    tiny_dir, data, tmp_path
):
    from medlvr.config import SFTConfig, load_config
    from medlvr.data.schema import DataError, read_jsonl
    from medlvr.train.sft import run_sft

    bad = _with_box(data, tmp_path / "outside.jsonl", [100, 100, 120, 120])
    res = runner.invoke(app, ["data", "validate", str(bad)])
    assert (
        res.exit_code == 1
        and "rois.0.box: box [100.0, 100.0, 120.0, 120.0] lies wholly outside its 84x84 image"
        in res.output
    )
    with pytest.raises(DataError, match="lies wholly outside its 84x84 image"):
        read_jsonl(bad)
    cfg = load_config(SFTConfig, None, [f"model.path={tiny_dir}", f"data.train=[{bad}]", "mode=roi",
                                        f"output_dir={tmp_path / 'run'}", "log.progress=false"])  # fmt: skip
    with pytest.raises(
        DataError,
        match=r"^problem in the data: .*outside.jsonl:1: rois.0.box: box .* wholly outside",
    ):
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
    root = _slake_root(
        tmp_path / "release", [{"img_name": "xmlab1/source.jpg", "question": "q?", "answer": "Yes"}]
    )
    line = one_error_line(
        runner.invoke(app, ["data", "convert", "slake", "--root", str(root), "--out", str(out)])
    )
    assert "train.json record 0: no q_lang, qid, answer_type field" in line and not out.exists()
    only_zh = {"img_name": "xmlab1/source.jpg", "question": "q?", "answer": "是", "q_lang": "zh", "qid": 1,
               "answer_type": "CLOSED"}  # fmt: skip
    root = _slake_root(tmp_path / "zh", [only_zh])
    line = one_error_line(
        runner.invoke(app, ["data", "convert", "slake", "--root", str(root), "--out", str(out)])
    )
    assert f"slake: no question converted from {root}" in line and not out.exists()


def test_a_malformed_release_json_names_its_file(tmp_path):
    (tmp_path / "VQA_RAD Dataset Public.json").write_text('[{"qid": 1,\n  "question": }]')
    line = one_error_line(runner.invoke(app, ["data", "convert", "vqa-rad", "--root", str(tmp_path), "--out",
                                              str(tmp_path / "out.jsonl")]))  # fmt: skip
    assert line == (
        f"error: vqa-rad: {tmp_path / 'VQA_RAD Dataset Public.json'} is not valid JSON: "
        "Expecting value at line 2, column 15"
    )


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


# ---------------------------------------------------------------------------- issue 24


def test_resume_skips_a_damaged_newest_checkpoint_and_ends_where_an_uninterrupted_run_ends(
    tiny_dir, data, tmp_path
):
    import json

    args = ["train", "sft", f"model.path={tiny_dir}", f"data.train=[{data / 'train.jsonl'}]", "mode=latent",
            "latent.steps=1", "batch_size=2", "checkpoint.every=1", "log.every=1", "log.progress=false",
            "log.tensorboard=false", "optim.schedule=constant", "max_steps=3"]  # fmt: skip
    assert runner.invoke(app, [*args, f"output_dir={tmp_path / 'full'}"]).exit_code == 0
    cut = tmp_path / "cut"
    assert runner.invoke(app, [*args[:-1], "max_steps=2", f"output_dir={cut}"]).exit_code == 0
    weights = cut / "step-0000002" / "model" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # a torn newest checkpoint
    metrics = cut / "metrics.jsonl"
    metrics.write_text(
        "\n".join(metrics.read_text().splitlines()[:1]) + "\n"
    )  # rows after step 1 lost
    with pytest.warns(
        UserWarning,
        match=r"--resume skips step-0000002: model/model.safetensors is damaged .*resuming from step-0000001",
    ):
        res = runner.invoke(app, [*args, f"output_dir={cut}", "--resume"])
    assert res.exit_code == 0, res.output

    def rows(folder):
        return [
            (r["step"], r["loss"])
            for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        ]

    assert rows(cut) == rows(tmp_path / "full")


def test_checkpoint_files_reach_the_disk_before_the_rename_that_publishes_them(
    tiny_dir, data, tmp_path, monkeypatch
):
    import medlvr.train.checkpoint as ckpt

    synced: set[str] = set()
    published: list[tuple[str, bool]] = []
    real_fsync, real_replace = os.fsync, ckpt._replace_dir

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        files = [str(f) for f in [src, *src.rglob("*")]]
        published.append((dst.name, all(f in synced for f in files)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(ckpt, "_replace_dir", replace)
    args = ["train", "sft", f"model.path={tiny_dir}", f"data.train=[{data / 'train.jsonl'}]", "mode=plain",
            "batch_size=2", "max_steps=1", "checkpoint.every=1", "log.progress=false", "log.tensorboard=false",
            f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    assert published == [("step-0000001", True), ("final", True)]


def _medlvr(*args: str):
    """`medlvr ARGS` as its own process (signals reach it as they reach a scheduler's job)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "medlvr", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_rows(path: Path, n: int, proc, timeout: float = 120) -> None:
    import time

    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(
        f"{path} did not reach {n} rows: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
    )


def test_sigterm_ends_training_with_a_checkpoint_that_resumes_exactly(tiny_dir, data, tmp_path):
    import json
    import re
    import signal

    args = ["train", "sft", f"model.path={tiny_dir}", f"data.train=[{data / 'train.jsonl'}]", "mode=latent",
            "latent.steps=1", "batch_size=2", "checkpoint.every=0", "log.every=1", "log.progress=false",
            "log.tensorboard=false", "optim.schedule=constant"]  # fmt: skip
    run = tmp_path / "run"
    proc = _medlvr(*args, "max_steps=500", f"output_dir={run}")
    _wait_for_rows(run / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    m = re.search(
        r"stopped by SIGTERM: checkpoint (\S+step-(\d{7})) saved; continue with --resume", err
    )
    assert m and Path(m.group(1)).is_dir(), err
    n = int(m.group(2))
    assert [p.name for p in run.glob("step-*")] == [f"step-{n:07d}"]
    resumed = runner.invoke(app, [*args, f"max_steps={n + 1}", f"output_dir={run}", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert (
        runner.invoke(
            app, [*args, f"max_steps={n + 1}", f"output_dir={tmp_path / 'whole'}"]
        ).exit_code
        == 0
    )

    def rows(folder):
        return [
            (r["step"], r["loss"])
            for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        ]

    assert rows(run)[-1] == rows(tmp_path / "whole")[-1] and rows(run)[-1][0] == n + 1


def test_sigterm_ends_an_evaluation_after_its_batch_and_the_rerun_completes_it(
    tiny_dir, data, tmp_path
):
    import json
    import signal

    out = tmp_path / "R"
    # Long enough that the run cannot finish before the signal lands, however busy the machine:
    # the test's few records repeated 100 times under new ids (images shared, same folder).
    records = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    many = data / "sigterm_many.jsonl"
    many.write_text(
        "".join(
            json.dumps({**r, "id": f"{r['id']}-{i}"}) + "\n" for i in range(100) for r in records
        )
    )
    args = ["eval", "--model", str(tiny_dir), "--data", str(many), "--batch-size", "1",
            "--out", str(out)]  # fmt: skip
    proc = _medlvr(*args)
    _wait_for_rows(out / "predictions.jsonl", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    done = len((out / "predictions.jsonl").read_text().splitlines())
    assert f"stopped by SIGTERM: {done} new rows are in {out / 'predictions.jsonl'}" in err
    n = len(many.read_text().splitlines())
    assert done < n
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and f"{n - done} new rows ({done} already done)" in res.output, (
        res.output
    )
    ids = [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == n


def test_image_paths_of_a_data_file_stay_in_its_folder_unless_another_root_is_allowed(
    tiny_dir, data, tmp_path, monkeypatch
):
    import json

    from medlvr.data.schema import IMAGE_ROOTS_ENV

    monkeypatch.delenv(IMAGE_ROOTS_ENV)
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    random_image(32, 32).save(secret)
    rec = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    folder = tmp_path / "data"
    folder.mkdir()
    for name, image in (("dots.jsonl", "../elsewhere/secret.png"), ("absolute.jsonl", str(secret))):
        (folder / name).write_text(json.dumps(dict(rec, images=[image], rois=[])) + "\n")
        res = runner.invoke(app, ["data", "validate", str(folder / name)])
        assert (
            res.exit_code == 1
            and (
                f"{folder / name}:1: images.0: image path {image!r} leads outside the data file's folder {folder}: "
                "pass --image-root FOLDER to allow images there"
            )
            in res.output
        ), res.output
        line = one_error_line(runner.invoke(app, ["eval", "--model", str(tiny_dir), "--data", str(folder / name),
                                                  "--out", str(tmp_path / "R")]))  # fmt: skip
        assert "leads outside the data file's folder" in line and not (tmp_path / "R").exists()
        res = runner.invoke(
            app, ["--image-root", str(secret.parent), "data", "validate", str(folder / name)]
        )
        assert res.exit_code == 0 and "no problems" in res.output, res.output
    res = runner.invoke(app, ["data", "validate", str(folder / "dots.jsonl")])
    assert res.exit_code == 1, "an allowance lasts one command"
    # A release file is confined to its release folder.
    root = _slake_root(tmp_path / "slake", [{"img_name": "../../elsewhere/secret.png", "question": "q?", "answer": "Yes",
                                             "q_lang": "en", "qid": 1, "answer_type": "CLOSED"}])  # fmt: skip
    line = one_error_line(runner.invoke(app, ["data", "convert", "slake", "--root", str(root), "--out",
                                              str(tmp_path / "s.jsonl")]))  # fmt: skip
    assert f"names an image outside the release folder {root}" in line


def test_validate_lists_a_deeply_nested_record_and_reads_a_bom(data, tmp_path):
    import json

    rec = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    rec["images"] = [str((data / rec["images"][0]).resolve())]
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps(rec) + "\n" + '{"meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    res = runner.invoke(app, ["data", "validate", str(deep)])
    assert res.exit_code == 1 and f"{deep}:2: JSON nested too deeply to be a record" in res.output
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(rec) + "\n").encode())
    res = runner.invoke(app, ["data", "validate", str(bom)])
    assert res.exit_code == 0 and "no problems" in res.output, res.output
    from medlvr.data.sources._common import read_json

    release = tmp_path / "release.json"
    release.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"qid": 1}]).encode())
    assert read_json(release, "vqa-rad") == [{"qid": 1}]


def test_medxpertqa_authors_file_reads_like_the_release(tmp_path):
    import json

    from medlvr.data.sources import convert

    release = {"id": "MM-7", "question": "Which finding?", "options": {L: f"option {L}" for L in "ABCDE"},
               "label": "C", "images": ["MM-7-a.jpeg"], "medical_task": "Diagnosis", "body_system": "Skeletal",
               "question_type": "Reasoning"}  # fmt: skip
    choices = " ".join(f"({L}) option {L}" for L in "ABCDE")
    authors = dict(release, question=f"Which finding?\nAnswer Choices: {choices}", label=["C"],
                   options=[{"letter": L, "content": f"option {L}"} for L in "ABCDE"],
                   images=[{"image_path": "images/MM-7-a.jpeg"}])  # fmt: skip
    (tmp_path / "hf" / "MM").mkdir(parents=True)
    (tmp_path / "hf" / "MM" / "test.jsonl").write_text(json.dumps(release) + "\n")
    (tmp_path / "authors").mkdir()
    (tmp_path / "authors" / "medxpertqa_mm_input.jsonl").write_text(json.dumps(authors) + "\n")
    [a] = convert("medxpertqa-mm", tmp_path / "hf")
    [b] = convert("medxpertqa-mm", tmp_path / "authors")
    same = (
        "id",
        "question",
        "options",
        "answer",
        "answer_letter",
        "organ",
        "question_type",
        "meta",
    )
    assert [getattr(a, f) for f in same] == [getattr(b, f) for f in same]
    assert b.question == "Which finding?" and b.answer_letter == "C"
    assert b.images == [str((tmp_path / "authors" / "images" / "MM-7-a.jpeg").resolve())]


def test_eval_counts_a_record_without_its_image_as_an_error_row(tiny_dir, data, tmp_path):
    import json

    from medlvr.data.schema import read_jsonl
    from medlvr.eval.harness import evaluate

    samples = read_jsonl(data / "test.jsonl")[:2]
    samples[1] = samples[1].model_copy(update={"images": [], "rois": []})
    result = evaluate(samples, tmp_path / "R", model=tiny_dir, progress=False, report=False)
    rows = [json.loads(x) for x in (tmp_path / "R" / "predictions.jsonl").read_text().splitlines()]
    assert [r["error"] for r in rows if r["id"] == samples[1].id] == ["the record has no image"]
    assert result.n_new == 2


# ---------------------------------------------------------------------------- the table


@pytest.fixture(scope="module")
def ws(tiny_dir, data, broken_models, tmp_path_factory) -> dict[str, Path]:
    """A user's folder: a model, data, a finished eval and training run, broken files, and two busy folders."""
    import json
    import pickle
    import shutil
    import signal
    import subprocess
    import sys

    from medlvr.config import SFTConfig, load_config
    from medlvr.eval.harness import evaluate
    from medlvr.train.sft import run_sft
    from tests.conftest import REPO

    root = tmp_path_factory.mktemp("user")
    w = {
        "root": root,
        "model": Path(shutil.copytree(tiny_dir, root / "model")),
        "data": data,
        **broken_models,
    }
    w["train"], w["test"] = data / "train.jsonl", data / "test.jsonl"
    w["img"] = root / "scan.png"
    random_image(84, 84).save(w["img"])
    w["txt"] = root / "notes.txt"
    w["txt"].write_text("not an image\n")
    w["file"] = root / "a-file"
    w["file"].write_text("mine\n")
    w["empty_jsonl"] = root / "empty.jsonl"
    w["empty_jsonl"].write_text("")
    w["malformed_jsonl"] = root / "malformed.jsonl"
    w["malformed_jsonl"].write_text('{"id": "a", "question": \n')
    w["outside_jsonl"] = _with_box(data, root / "outside.jsonl", [100, 100, 120, 120])
    rec = json.loads(w["test"].read_text().splitlines()[0])
    rec["images"] = [str(root / "gone.png")]
    w["missing_image_jsonl"] = root / "missing_image.jsonl"
    w["missing_image_jsonl"].write_text(json.dumps(rec) + "\n")
    w["bad_yaml"] = root / "bad.yaml"
    w["bad_yaml"].write_text("mode: roi\nlatent: [1,\n")
    w["list_yaml"] = root / "list.yaml"
    w["list_yaml"].write_text("- mode: roi\n")
    w["no_config"] = root / "no_config"
    w["no_config"].mkdir()
    (w["no_config"] / "model.safetensors").write_bytes(b"")
    w["rad"] = root / "vqa-rad"
    w["rad"].mkdir()
    (w["rad"] / "VQA_RAD Dataset Public.json").write_text("[{")
    w["slake"] = _slake_root(
        root / "slake", [{"img_name": "xmlab1/source.jpg", "question": "q?", "answer": "Yes"}]
    )
    w["pathvqa"] = root / "pathvqa"
    (w["pathvqa"] / "qas" / "test").mkdir(parents=True)
    (w["pathvqa"] / "qas" / "test" / "test_qa.pkl").write_bytes(
        pickle.dumps([{"image": "x", "question": "q", "answer": "no"}])
    )
    _user_files(w)  # issue 24's inputs
    # A finished evaluation (mode direct) and a training run with a checkpoint.
    w["evalrun"] = root / "evalrun"
    evaluate([w["test"]], w["evalrun"], model=w["model"], limit=2, progress=False)
    w["run"] = root / "run"
    run_sft(load_config(SFTConfig, None, [f"model.path={w['model']}", f"data.train=[{w['train']}]", "mode=plain",
                                          f"output_dir={w['run']}", "batch_size=2", "max_steps=1", "log.progress=false",
                                          "log.tensorboard=false"]))  # fmt: skip
    # Two folders another run is writing.
    w["busy"] = root / "busy"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = (
        "import sys, time; from medlvr.rundir import run_folder\n"
        "with run_folder(sys.argv[1], '--out'):\n    print('ready', flush=True); time.sleep(900)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(w["busy"])], stdout=subprocess.PIPE, env=env, text=True
    )
    assert holder.stdout.readline().strip() == "ready"
    yield w
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)


def _user_files(w: dict[str, Path]) -> None:
    """Issue 24's files: a manuscript folder, a recipe beside its output_dir, an old figure, broken files."""
    import json
    import shutil

    root = w["root"]
    w["manuscript"] = root / "manuscript"
    w["manuscript"].mkdir()
    (w["manuscript"] / "report.md").write_text("# My paper's results\n")
    (w["manuscript"] / "summary.json").write_text('{"mine": true}\n')
    w["recipe_dir"] = root / "recipe"
    w["recipe_dir"].mkdir()
    w["recipe"] = w["recipe_dir"] / "config.yaml"
    w["recipe"].write_text(f"# my commented recipe\nmode: plain\noutput_dir: {w['recipe_dir']}\n")
    (root / "old.png").write_bytes(w["img"].read_bytes())
    (root / "old.json").write_text("{}\n")
    rec = json.loads(w["test"].read_text().splitlines()[0])
    good = dict(rec, images=[str((w["data"] / rec["images"][0]).resolve())])
    w["inspected"] = root / "inspected.jsonl"
    w["inspected"].write_text(json.dumps(good) + "\n")
    (root / "inspected.jsonl.png").write_bytes(w["img"].read_bytes())
    # Part 2: files that broke with a traceback.
    deep = "[" * 100_000 + "]" * 100_000
    w["deep_jsonl"] = root / "deep.jsonl"
    w["deep_jsonl"].write_text(
        json.dumps(dict(good, id="deep"))[:-1] + f', "meta": {{"x": {deep}}}}}\n'
    )
    w["roi_no_image_jsonl"] = root / "roi_no_image.jsonl"
    w["roi_no_image_jsonl"].write_text(
        json.dumps(dict(good, images=[], rois=[{"box": [1, 1, 9, 9], "image": 0}])) + "\n"
    )
    for name, change in (("jinja", ("chat_template.jinja", "{{ ''.__class__.__mro__[1].__subclasses__() }}")),
                         ("cfg_list", ("config.json", "[1, 2]")),
                         ("latent_types", ("medlvr_latent.json", '{"steps": "lots"}'))):  # fmt: skip
        w[name] = Path(shutil.copytree(w["model"], root / name))
        (w[name] / change[0]).write_text(change[1])
    w["sizes"] = Path(shutil.copytree(w["model"], root / "sizes"))
    cfg = json.loads((w["sizes"] / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] *= 2
    (w["sizes"] / "config.json").write_text(json.dumps(cfg))
    w["mxq_bad"] = root / "mxq"
    (w["mxq_bad"] / "MM").mkdir(parents=True)
    (w["mxq_bad"] / "MM" / "test.jsonl").write_text(
        json.dumps({"id": "MM-1", "question": "Q?", "label": "A", "options": "A) x B) y"}) + "\n"
    )
    # A variable that could hold a secret (here: a folder, so that old code wrote inside the test).
    os.environ.setdefault("MEDLVR_TEST_SECRET", str(root))
    w["env_recipe"] = root / "env.yaml"
    w["env_recipe"].write_text("output_dir: ${oc.env:MEDLVR_TEST_SECRET}/env_recipe_run\n")
    w["rad_ok"] = root / "rad_ok"
    (w["rad_ok"] / "images").mkdir(parents=True)
    random_image(32, 32).save(w["rad_ok"] / "images" / "synpic1.jpg")
    (w["rad_ok"] / "VQA_RAD Dataset Public.json").write_text(json.dumps([
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is it?", "answer": "yes", "answer_type": "CLOSED",
         "question_type": "PRES", "phrase_type": "freeform"}]))  # fmt: skip
    from tests.test_ground import write_coco

    w["coco"] = root / "coco"
    w["coco"].mkdir()
    write_coco(w["coco"])
    # Part 3: wrong or silent results.
    w["no_image_jsonl"] = root / "no_image.jsonl"
    w["no_image_jsonl"].write_text(json.dumps(dict(good, images=[], rois=[])) + "\n")
    w["bad_utf8_jsonl"] = root / "bad_utf8.jsonl"
    w["bad_utf8_jsonl"].write_bytes((json.dumps(good) + "\n").encode() + b'{"id": "caf\xe9"}\n')
    w["nan_box_jsonl"] = root / "nan_box.jsonl"
    w["nan_box_jsonl"].write_text(
        json.dumps(dict(good, rois=[{"box": [float("nan"), 1, 9, 9], "image": 0}])) + "\n"
    )
    import numpy as np
    from PIL import Image

    w["nan_tiff"] = root / "nan.tiff"
    Image.fromarray(np.full((32, 32), np.nan, dtype=np.float32), mode="F").save(w["nan_tiff"])
    import nibabel as nib

    w["nan_nifti"] = root / "nan.nii.gz"
    nib.save(
        nib.Nifti1Image(np.full((16, 16, 4), np.nan, dtype=np.float32), np.eye(4)),
        str(w["nan_nifti"]),
    )
    w["fifo"] = root / "fifo.png"
    os.mkfifo(w["fifo"])
    w["folder_png"] = root / "folder.png"
    w["folder_png"].mkdir()
    w["chr_weights"] = Path(shutil.copytree(w["model"], root / "chr_weights"))
    (w["chr_weights"] / "model.safetensors").unlink()
    (w["chr_weights"] / "model.safetensors").symlink_to("/dev/zero")


def _q(w: dict[str, Path]) -> list[str]:
    return ["--image", str(w["img"]), "--question", "Is there a lesion?"]


def _sft(w: dict[str, Path], *overrides: str) -> list[str]:
    return ["train", "sft", f"model.path={w['model']}", f"data.train=[{w['train']}]", "mode=latent", "latent.steps=1",
            f"output_dir={w['root'] / 'new_run'}", "batch_size=2", "max_steps=1", "log.progress=false",
            "log.tensorboard=false", *overrides]  # fmt: skip


def _vlpo(w: dict[str, Path], *overrides: str, init: Path | None = None) -> list[str]:
    return ["train", "vlpo", "--init", str(init or w["run"] / "final"), f"data.train=[{w['train']}]", "latent.steps=1",
            f"output_dir={w['root'] / 'new_vlpo'}", "batch_size=1", "max_steps=1", "vlpo.group_size=2",
            "log.progress=false", "log.tensorboard=false", *overrides]  # fmt: skip


def _eval(
    w: dict[str, Path], *args: str, model: str = "model", out: str = "new_eval", data: str = "test"
) -> list[str]:
    return [
        "eval",
        "--model",
        str(w[model]),
        "--data",
        str(w[data]),
        "--limit",
        "2",
        "--out",
        str(w["root"] / out),
        *args,
    ]


# (case id, arguments from the user's folder, what the one line must say)
CASES: list[tuple[str, object, str]] = [
    # model
    (
        "init-tiny family",
        lambda w: ["model", "init-tiny", "--out", str(w["root"] / "m"), "--family", "nope"],
        "unknown backbone family",
    ),
    (
        "init-tiny size",
        lambda w: ["model", "init-tiny", "--out", str(w["root"] / "m"), "--size", "huge"],
        "unknown size 'huge'",
    ),
    (
        "init-tiny out is a file",
        lambda w: ["model", "init-tiny", "--out", str(w["file"])],
        "a-file",
    ),
    # data synth
    (
        "synth level",
        lambda w: ["data", "synth", "--out", str(w["root"] / "s"), "--level", "9"],
        "level must be one of",
    ),
    (
        "synth image size",
        lambda w: ["data", "synth", "--out", str(w["root"] / "s"), "--image-size", "100"],
        "multiple of 28",
    ),
    (
        "synth distractors",
        lambda w: ["data", "synth", "--out", str(w["root"] / "s"), "--distractors", "x-y"],
        "--distractors: expected a range 'LO-HI'",
    ),
    (
        "synth question types",
        lambda w: ["data", "synth", "--out", str(w["root"] / "s"), "--question-types", "bogus"],
        "bogus",
    ),
    (
        "synth n",
        lambda w: ["data", "synth", "--out", str(w["root"] / "s"), "--n", "0"],
        "n must be positive",
    ),
    (
        "synth hops",
        lambda w: ["data", "synth", "--out", str(w["root"] / "s"), "--hops", "2-9"],
        "hops must be a range",
    ),
    (
        "synth answers",
        lambda w: ["data", "synth", "--out", str(w["root"] / "s"), "--answers", "digits"],
        "--answers: expected one of words, letters",
    ),
    # data convert
    (
        "convert source",
        lambda w: [
            "data",
            "convert",
            "nope",
            "--root",
            str(w["rad"]),
            "--out",
            str(w["root"] / "o.jsonl"),
        ],
        "unknown source 'nope'",
    ),
    (
        "convert root",
        lambda w: [
            "data",
            "convert",
            "vqa-rad",
            "--root",
            str(w["root"] / "nowhere"),
            "--out",
            str(w["root"] / "o.jsonl"),
        ],
        "release folder not found",
    ),
    (
        "convert json",
        lambda w: [
            "data",
            "convert",
            "vqa-rad",
            "--root",
            str(w["rad"]),
            "--out",
            str(w["root"] / "o.jsonl"),
        ],
        "is not valid JSON",
    ),
    (
        "convert split",
        lambda w: [
            "data",
            "convert",
            "vqa-rad",
            "--root",
            str(w["rad"]),
            "--split",
            "dev",
            "--out",
            str(w["root"] / "o.jsonl"),
        ],
        "unknown split 'dev'",
    ),
    (
        "convert slake fields",
        lambda w: [
            "data",
            "convert",
            "slake",
            "--root",
            str(w["slake"]),
            "--out",
            str(w["root"] / "o.jsonl"),
        ],
        "no q_lang, qid, answer_type field",
    ),
    (
        "convert pickle",
        lambda w: [
            "data",
            "convert",
            "pathvqa",
            "--root",
            str(w["pathvqa"]),
            "--split",
            "test",
            "--out",
            str(w["root"] / "o.jsonl"),
        ],
        "--allow-pickle",
    ),
    # data ground
    ("ground source", lambda w: ["data", "ground", "nope", "--out", str(w["root"] / "g")], "nope"),
    (
        "ground coco without annotations",
        lambda w: [
            "data",
            "ground",
            "coco",
            "--out",
            str(w["root"] / "g"),
            "--images",
            str(w["root"]),
        ],
        "annotation",
    ),
    (
        "ground fractions",
        lambda w: [
            "data",
            "ground",
            "coco",
            "--out",
            str(w["root"] / "g"),
            "--fractions",
            "train=2",
        ],
        "fraction",
    ),
    # data validate / inspect
    (
        "validate missing",
        lambda w: ["data", "validate", str(w["root"] / "nowhere.jsonl")],
        "data file not found",
    ),
    (
        "inspect missing",
        lambda w: ["data", "inspect", str(w["root"] / "nowhere.jsonl")],
        "data file not found",
    ),
    (
        "inspect empty",
        lambda w: ["data", "inspect", str(w["empty_jsonl"])],
        "the file has no records",
    ),
    (
        "inspect malformed",
        lambda w: ["data", "inspect", str(w["malformed_jsonl"])],
        "malformed JSON",
    ),
    # train sft
    (
        "sft config missing",
        lambda w: ["train", "sft", "--config", str(w["root"] / "nowhere.yaml")],
        "config file not found",
    ),
    (
        "sft config yaml",
        lambda w: ["train", "sft", "--config", str(w["bad_yaml"])],
        "is not valid YAML at line 3",
    ),
    (
        "sft config list",
        lambda w: ["train", "sft", "--config", str(w["list_yaml"])],
        "at the top level, not a list",
    ),
    ("sft unknown key", lambda w: _sft(w, "optim.learning_rate=1"), "Key 'learning_rate' not in"),
    ("sft bad value", lambda w: _sft(w, "batch_size=two"), "batch_size"),
    ("sft no model", lambda w: [*_sft(w), "model.path="], "model.path is not set"),
    (
        "sft model missing",
        lambda w: _sft(w, f"model.path={w['root'] / 'nowhere'}"),
        "model.path is not a folder",
    ),
    (
        "sft data missing",
        lambda w: _sft(w, f"data.train=[{w['root'] / 'nowhere.jsonl'}]"),
        "not found",
    ),
    (
        "sft data empty",
        lambda w: _sft(w, f"data.train=[{w['empty_jsonl']}]"),
        "the file has no records",
    ),
    (
        "sft data malformed",
        lambda w: _sft(w, f"data.train=[{w['malformed_jsonl']}]"),
        "malformed JSON",
    ),
    (
        "sft roi outside",
        lambda w: _sft(w, f"data.train=[{w['outside_jsonl']}]", "mode=roi"),
        "wholly outside its 84x84 image",
    ),
    (
        "sft missing image",
        lambda w: _sft(w, f"data.train=[{w['missing_image_jsonl']}]"),
        "image not found",
    ),
    ("sft weights", lambda w: _sft(w, "data.weights=[1,2]"), "data.weights has 2 entries for 1"),
    ("sft val empty", lambda w: _sft(w, f"data.val={w['empty_jsonl']}"), "the file has no records"),
    ("sft holds a run", lambda w: _sft(w, f"output_dir={w['run']}"), "holds a run"),
    (
        "sft resume and overwrite",
        lambda w: [*_sft(w, f"output_dir={w['run']}"), "--resume", "--overwrite"],
        "choose one",
    ),
    (
        "sft resume changed seed",
        lambda w: [
            *_sft(w, f"output_dir={w['run']}", "mode=plain", "latent.steps=4", "seed=3"),
            "--resume",
        ],
        "seed 0 -> 3",
    ),
    ("sft busy", lambda w: _sft(w, f"output_dir={w['busy']}"), "in use by another run"),
    (
        "sft truncated model",
        lambda w: _sft(w, f"model.path={w['truncated']}"),
        "model.safetensors is damaged",
    ),
    (
        "sft empty model",
        lambda w: _sft(w, f"model.path={w['empty']}"),
        "model.safetensors is empty",
    ),
    ("sft pickle model", lambda w: _sft(w, f"model.path={w['pickle']}"), "pickle weights only"),
    ("sft positions", lambda w: _sft(w, "latent.steps=5000"), "the model holds 4096"),
    (
        "sft output is a file",
        lambda w: _sft(w, f"output_dir={w['file']}"),
        "it is a file, not a folder",
    ),
    # train vlpo
    (
        "vlpo no init",
        lambda w: ["train", "vlpo", f"data.train=[{w['train']}]"],
        "model.path is not set",
    ),
    (
        "vlpo init missing",
        lambda w: _vlpo(w, init=w["root"] / "nowhere"),
        "model.path is not a folder",
    ),
    ("vlpo group size", lambda w: _vlpo(w, "vlpo.group_size=1"), "vlpo.group_size must be >= 2"),
    ("vlpo reward", lambda w: _vlpo(w, "vlpo.rewards={nope: 1.0}"), "nope"),
    ("vlpo holds a run", lambda w: _vlpo(w, f"output_dir={w['run']}"), "holds a run"),
    ("vlpo busy", lambda w: _vlpo(w, f"output_dir={w['busy']}"), "in use by another run"),
    (
        "vlpo truncated init",
        lambda w: _vlpo(w, init=w["truncated"]),
        "model.safetensors is damaged",
    ),
    (
        "vlpo data empty",
        lambda w: _vlpo(w, f"data.train=[{w['empty_jsonl']}]"),
        "the file has no records",
    ),
    ("vlpo empty init", lambda w: _vlpo(w, init=w["empty"]), "model.safetensors is empty"),
    ("vlpo pickle init", lambda w: _vlpo(w, init=w["pickle"]), "pickle weights only"),
    (
        "vlpo config yaml",
        lambda w: ["train", "vlpo", "--config", str(w["bad_yaml"])],
        "is not valid YAML at line 3",
    ),
    (
        "vlpo config list",
        lambda w: ["train", "vlpo", "--config", str(w["list_yaml"])],
        "at the top level, not a list",
    ),
    # eval
    (
        "eval no model",
        lambda w: ["eval", "--data", str(w["test"]), "--out", str(w["root"] / "e")],
        "needs --model",
    ),
    (
        "eval data missing",
        lambda w: [
            "eval",
            "--model",
            str(w["model"]),
            "--data",
            str(w["root"] / "nowhere.jsonl"),
            "--out",
            str(w["root"] / "e"),
        ],
        "data file not found",
    ),
    (
        "eval data empty",
        lambda w: [
            "eval",
            "--model",
            str(w["model"]),
            "--data",
            str(w["empty_jsonl"]),
            "--out",
            str(w["root"] / "e"),
        ],
        "the file has no records",
    ),
    (
        "eval data malformed",
        lambda w: [
            "eval",
            "--model",
            str(w["model"]),
            "--data",
            str(w["malformed_jsonl"]),
            "--out",
            str(w["root"] / "e"),
        ],
        "malformed JSON",
    ),
    (
        "eval duplicate ids",
        lambda w: [
            "eval",
            "--model",
            str(w["model"]),
            "--data",
            str(w["test"]),
            str(w["test"]),
            "--out",
            str(w["root"] / "e"),
        ],
        "duplicate question id",
    ),
    ("eval reasoning", lambda w: _eval(w, "--reasoning", "bogus"), "reasoning must be one of"),
    (
        "eval latent steps text",
        lambda w: _eval(w, "--reasoning", "latent", "--latent-steps", "x"),
        "latent steps must be integers",
    ),
    (
        "eval latent steps negative",
        lambda w: _eval(w, "--reasoning", "latent", "--latent-steps=-1"),
        "latent steps must be >= 0",
    ),
    (
        "eval latent steps direct",
        lambda w: _eval(w, "--latent-steps", "4"),
        "use --reasoning latent",
    ),
    (
        "eval positions",
        lambda w: _eval(w, "--reasoning", "latent", "--latent-steps", "100000000"),
        "the model holds 4096",
    ),
    (
        "eval image control",
        lambda w: _eval(w, "--image-control", "sepia"),
        "image control must be one of",
    ),
    ("eval batch size", lambda w: _eval(w, "--batch-size", "0"), "batch_size must be >= 1"),
    ("eval limit", lambda w: _eval(w, "--limit", "0"), "limit must be >= 1"),
    ("eval busy", lambda w: _eval(w, out="busy"), "in use by another run"),
    (
        "eval other reasoning",
        lambda w: _eval(w, "--reasoning", "cot", out="evalrun"),
        "holds a run with reasoning='direct'",
    ),
    ("eval out is a file", lambda w: _eval(w, out="a-file"), "it is a file, not a folder"),
    ("eval truncated model", lambda w: _eval(w, model="truncated"), "model.safetensors is damaged"),
    ("eval empty model", lambda w: _eval(w, model="empty"), "model.safetensors is empty"),
    ("eval pickle model", lambda w: _eval(w, model="pickle"), "pickle weights only"),
    ("eval model without config", lambda w: _eval(w, model="no_config"), "no config.json"),
    # eval report / compare
    (
        "report missing",
        lambda w: ["eval", "report", str(w["root"] / "nowhere")],
        "run folder not found",
    ),
    ("report busy", lambda w: ["eval", "report", str(w["busy"])], "in use by another run"),
    ("report no predictions", lambda w: ["eval", "report", str(w["no_config"])], "predictions"),
    (
        "compare missing",
        lambda w: ["eval", "compare", str(w["evalrun"]), str(w["root"] / "nowhere")],
        "nowhere",
    ),
    # predict
    (
        "predict no image",
        lambda w: ["predict", "--model", str(w["model"]), "--question", "Why?"],
        "at least one --image",
    ),
    (
        "predict image missing",
        lambda w: [
            "predict",
            "--model",
            str(w["model"]),
            "--image",
            str(w["root"] / "gone.png"),
            "--question",
            "Why?",
        ],
        "image not found",
    ),
    (
        "predict not an image",
        lambda w: [
            "predict",
            "--model",
            str(w["model"]),
            "--image",
            str(w["txt"]),
            "--question",
            "Why?",
        ],
        "unknown image format",
    ),
    (
        "predict option",
        lambda w: ["predict", "--model", str(w["model"]), *_q(w), "--option", "yes"],
        "--option must look like A=text",
    ),
    (
        "predict latent steps",
        lambda w: ["predict", "--model", str(w["model"]), *_q(w), "--latent-steps", "-1"],
        "--latent-steps must be >= 0",
    ),
    (
        "predict positions",
        lambda w: ["predict", "--model", str(w["model"]), *_q(w), "--latent-steps", "1000000"],
        "the model holds 4096",
    ),
    (
        "predict long question",
        lambda w: [
            "predict",
            "--model",
            str(w["model"]),
            "--image",
            str(w["img"]),
            "--question",
            "is " * 5000,
        ],
        "shorten the question",
    ),
    (
        "predict empty question",
        lambda w: [
            "predict",
            "--model",
            str(w["model"]),
            "--image",
            str(w["img"]),
            "--question",
            " ",
        ],
        "the question is empty",
    ),
    (
        "predict model missing",
        lambda w: ["predict", "--model", str(w["root"] / "nowhere"), *_q(w)],
        "model folder not found",
    ),
    (
        "predict model without config",
        lambda w: ["predict", "--model", str(w["no_config"]), *_q(w)],
        "no config.json",
    ),
    (
        "predict truncated model",
        lambda w: ["predict", "--model", str(w["truncated"]), *_q(w)],
        "model.safetensors is damaged",
    ),
    (
        "predict empty model",
        lambda w: ["predict", "--model", str(w["empty"]), *_q(w)],
        "model.safetensors is empty",
    ),
    (
        "predict pickle model",
        lambda w: ["predict", "--model", str(w["pickle"]), *_q(w)],
        "pickle weights only",
    ),
    # explain
    (
        "explain latent steps",
        lambda w: ["explain", "--model", str(w["model"]), *_q(w), "--latent-steps", "0"],
        "--latent-steps must be >= 1",
    ),
    (
        "explain out suffix",
        lambda w: [
            "explain",
            "--model",
            str(w["model"]),
            *_q(w),
            "--out",
            str(w["root"] / "e.jpg"),
        ],
        "--out must be a .png",
    ),
    (
        "explain out below a file",
        lambda w: [
            "explain",
            "--model",
            str(w["model"]),
            *_q(w),
            "--out",
            str(w["file"] / "e.png"),
        ],
        "it is a file, not a folder",
    ),
    (
        "explain image missing",
        lambda w: [
            "explain",
            "--model",
            str(w["model"]),
            "--image",
            str(w["root"] / "gone.png"),
            "--question",
            "Why?",
        ],
        "image not found",
    ),
    (
        "explain truncated model",
        lambda w: [
            "explain",
            "--model",
            str(w["truncated"]),
            *_q(w),
            "--out",
            str(w["root"] / "e.png"),
        ],
        "model.safetensors is damaged",
    ),
    (
        "explain pickle model",
        lambda w: [
            "explain",
            "--model",
            str(w["pickle"]),
            *_q(w),
            "--out",
            str(w["root"] / "e.png"),
        ],
        "pickle weights only",
    ),
    (
        "explain empty model",
        lambda w: [
            "explain",
            "--model",
            str(w["empty"]),
            *_q(w),
            "--out",
            str(w["root"] / "e.png"),
        ],
        "model.safetensors is empty",
    ),
    # serve
    (
        "serve port",
        lambda w: ["serve", "--model", str(w["model"]), "--port", "70000"],
        "port must be in 1..65535",
    ),
    (
        "serve upload limit",
        lambda w: ["serve", "--model", str(w["model"]), "--max-upload-mb", "0"],
        "max_upload_mb must be > 0",
    ),
    (
        "serve model missing",
        lambda w: ["serve", "--model", str(w["root"] / "nowhere")],
        "model folder not found",
    ),
    (
        "serve truncated model",
        lambda w: ["serve", "--model", str(w["truncated"])],
        "model.safetensors is damaged",
    ),
    (
        "serve port not a number",
        lambda w: ["serve", "--model", str(w["model"]), "--port", "http"],
        "--port: expected an integer, got 'http'",
    ),
    ("serve pickle model", lambda w: ["serve", "--model", str(w["pickle"])], "pickle weights only"),
    # issue 24, part 1: nothing of the user's is overwritten
    (
        "eval into a manuscript",
        lambda w: _eval(w, out="manuscript"),
        "manuscript holds files that are not eval's output (report.md, summary.json): pass --overwrite",
    ),
    (
        "eval into a dataset",
        lambda w: [
            "eval",
            "--model",
            str(w["model"]),
            "--data",
            str(w["test"]),
            "--limit",
            "2",
            "--out",
            str(w["data"]),
        ],
        "pass --overwrite",
    ),
    (
        "sft onto its recipe",
        lambda w: [*_sft(w), "--config", str(w["recipe"]), f"output_dir={w['recipe_dir']}"],
        "would write onto the input",
    ),
    (
        "sft onto its recipe with --overwrite",
        lambda w: [
            *_sft(w),
            "--config",
            str(w["recipe"]),
            f"output_dir={w['recipe_dir']}",
            "--overwrite",
        ],
        "would write onto the input",
    ),
    (
        "sft into a manuscript",
        lambda w: _sft(w, f"output_dir={w['manuscript']}"),
        "pass --overwrite (checkpoint.overwrite=true)",
    ),
    (
        "vlpo over its own init",
        lambda w: [*_vlpo(w, f"output_dir={w['run']}"), "--overwrite"],
        "would write onto the input",
    ),
    (
        "explain onto its image",
        lambda w: ["explain", "--model", str(w["model"]), *_q(w), "--out", str(w["img"])],
        "would write onto the input",
    ),
    (
        "explain over a figure",
        lambda w: [
            "explain",
            "--model",
            str(w["model"]),
            *_q(w),
            "--out",
            str(w["root"] / "old.png"),
        ],
        "old.png and",
    ),
    (
        "synth into a dataset",
        lambda w: ["data", "synth", "--out", str(w["data"]), "--n", "4"],
        "pass --overwrite",
    ),
    (
        "init-tiny over a model",
        lambda w: ["model", "init-tiny", "--out", str(w["model"])],
        "holds files that are not model init-tiny's output",
    ),
    (
        "inspect over its figure",
        lambda w: ["data", "inspect", str(w["inspected"])],
        "inspected.jsonl.png exists: pass --overwrite",
    ),
    (
        "convert over a file",
        lambda w: [
            "data",
            "convert",
            "vqa-rad",
            "--root",
            str(w["rad_ok"]),
            "--out",
            str(w["file"]),
        ],
        "a-file exists: pass --overwrite",
    ),
    (
        "convert onto the release",
        lambda w: [
            "data",
            "convert",
            "vqa-rad",
            "--root",
            str(w["rad_ok"]),
            "--out",
            str(w["rad_ok"] / "VQA_RAD Dataset Public.json"),
        ],
        "would write onto the input",
    ),
    (
        "ground into a manuscript",
        lambda w: [
            "data",
            "ground",
            "coco",
            "--annotations",
            f"train={w['coco'] / 'instances.json'}",
            "--images",
            str(w["coco"]),
            "--out",
            str(w["manuscript"]),
        ],
        "pass --overwrite",
    ),
    (
        "compare into a manuscript",
        lambda w: [
            "eval",
            "compare",
            str(w["evalrun"]),
            str(w["evalrun"]),
            "--out",
            str(w["manuscript"]),
        ],
        "pass --overwrite",
    ),
    (
        "rescore into a manuscript",
        lambda w: [
            "eval",
            "rescore",
            str(Path(__file__).parent / "data" / "rescore" / "medevalkit_vqa_rad_results.json"),
            "--format",
            "medevalkit",
            "--out",
            str(w["manuscript"]),
        ],
        "pass --overwrite",
    ),
    (
        "demo into a manuscript",
        lambda w: ["demo", "--quick", "--out", str(w["manuscript"])],
        "pass --overwrite",
    ),
    (
        "backbone into a manuscript",
        lambda w: ["demo", "backbone", "--out", str(w["manuscript"])],
        "pass --overwrite",
    ),
    # issue 24, part 4: no environment variable is copied into a saved config
    (
        "sft env override",
        lambda w: _sft(w, "output_dir=${oc.env:MEDLVR_TEST_SECRET}/env_run"),
        "output_dir: ${oc.env:MEDLVR_TEST_SECRET}/env_run reads an environment variable",
    ),
    (
        "sft env recipe",
        lambda w: [
            *[a for a in _sft(w) if not a.startswith("output_dir=")],
            "--config",
            str(w["env_recipe"]),
        ],
        "output_dir: ${oc.env:MEDLVR_TEST_SECRET}/env_recipe_run reads an environment variable",
    ),
    (
        "vlpo env override",
        lambda w: _vlpo(w, "output_dir=${oc.env:MEDLVR_TEST_SECRET}/env_vlpo"),
        "reads an environment variable",
    ),
    (
        "predict 2M-character question",
        lambda w: [
            "predict",
            "--model",
            str(w["model"]),
            "--image",
            str(w["img"]),
            "--question",
            "is " * 700_000,
        ],
        "the question has 2,100,000 characters",
    ),
    # issue 24, part 2: one line, not a traceback
    (
        "eval deep json",
        lambda w: _eval(w, data="deep_jsonl"),
        "deep.jsonl:1: JSON nested too deeply to be a record",
    ),
    (
        "train deep json",
        lambda w: _sft(w, f"data.train=[{w['deep_jsonl']}]"),
        "JSON nested too deeply",
    ),
    (
        "eval roi without image",
        lambda w: _eval(w, data="roi_no_image_jsonl"),
        "ROI refers to image 0 but the sample has 0 image(s)",
    ),
    (
        "predict jinja sandbox",
        lambda w: ["predict", "--model", str(w["jinja"]), *_q(w)],
        "chat template (chat_template.jinja) is refused by jinja's sandbox",
    ),
    (
        "predict config not an object",
        lambda w: ["predict", "--model", str(w["cfg_list"]), *_q(w)],
        "config.json is not a transformers config (not a JSON object",
    ),
    (
        "predict config sizes",
        lambda w: ["predict", "--model", str(w["sizes"]), *_q(w)],
        "the weights do not fit config.json",
    ),
    ("eval config sizes", lambda w: _eval(w, model="sizes"), "the weights do not fit config.json"),
    (
        "predict latent config types",
        lambda w: ["predict", "--model", str(w["latent_types"]), *_q(w)],
        "medlvr_latent.json is not a latent config (steps: Value 'lots'",
    ),
    (
        "convert medxpertqa layout",
        lambda w: [
            "data",
            "convert",
            "medxpertqa-mm",
            "--root",
            str(w["mxq_bad"]),
            "--out",
            str(w["root"] / "o.jsonl"),
        ],
        "MM/test.jsonl:1: options must be",
    ),
    # issue 24, part 3: wrong or silent results
    (
        "eval record without image",
        lambda w: _eval(w, data="no_image_jsonl"),
        "images: no image: a visual question needs its image",
    ),
    (
        "eval invalid utf-8",
        lambda w: _eval(w, data="bad_utf8_jsonl"),
        "bad_utf8.jsonl:2: not valid UTF-8 (byte 0xe9 at column 12)",
    ),
    (
        "eval nan box",
        lambda w: _eval(w, data="nan_box_jsonl"),
        "has a coordinate that is not a finite number",
    ),  # the box shows once Rich markup is escaped
    (
        "predict nan tiff",
        lambda w: [
            "predict",
            "--model",
            str(w["model"]),
            "--image",
            str(w["nan_tiff"]),
            "--question",
            "Why?",
        ],
        "nan.tiff: 1,024 of its 1,024 pixel values are NaN or infinite",
    ),
    (
        "predict nan nifti",
        lambda w: [
            "predict",
            "--model",
            str(w["model"]),
            "--image",
            str(w["nan_nifti"]),
            "--question",
            "Why?",
        ],
        "nan.nii.gz: 256 of its 256 pixel values are NaN or infinite",
    ),
    (
        "predict fifo image",
        lambda w: [
            "predict",
            "--model",
            str(w["model"]),
            "--image",
            str(w["fifo"]),
            "--question",
            "Why?",
        ],
        "fifo.png is a named pipe (FIFO), not an image file",
    ),
    (
        "predict folder image",
        lambda w: [
            "predict",
            "--model",
            str(w["model"]),
            "--image",
            str(w["folder_png"]),
            "--question",
            "Why?",
        ],
        "folder.png is a folder, not an image file",
    ),
    (
        "predict device image",
        lambda w: [
            "predict",
            "--model",
            str(w["model"]),
            "--image",
            "/dev/null",
            "--question",
            "Why?",
        ],
        "/dev/null is a character device, not an image file",
    ),
    (
        "predict device weights",
        lambda w: ["predict", "--model", str(w["chr_weights"]), *_q(w)],
        "model.safetensors is a character device, not a weights file",
    ),
    # demo
    (
        "demo budgets",
        lambda w: ["demo", "--quick", "--full", "--out", str(w["root"] / "d")],
        "choose one of --quick and --full",
    ),
    (
        "demo seeds",
        lambda w: ["demo", "--seeds", "a,b", "--out", str(w["root"] / "d")],
        "--seeds: expected an integer, got 'a'",
    ),
    (
        "demo dataset",
        lambda w: ["demo", "--dataset", "imagenet", "--out", str(w["root"] / "d")],
        "imagenet",
    ),
    (
        "demo arms",
        lambda w: ["demo", "--arms", "xyz", "--out", str(w["root"] / "d")],
        "unknown arm(s) x, y, z",
    ),
    (
        "demo budget twice",
        lambda w: ["demo", "--quick", "--budget", "full", "--out", str(w["root"] / "d")],
        "choose one of --budget and --quick/--full",
    ),
    (
        "backbone lr",
        lambda w: ["demo", "backbone", "--out", str(w["root"] / "b"), "--lr", "fast"],
        "--lr: expected a number, got 'fast'",
    ),
]


def _files(root: Path) -> dict[Path, tuple[int, bytes]]:
    return {
        f: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(root.rglob("*")) if f.is_file()
    }


@pytest.mark.parametrize("case, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(ws, case, args, message):
    """Every row: exit code 2, one `error:` line saying `message`, no traceback, the user's files untouched."""
    before = {**_files(ws["root"]), **_files(ws["data"])}
    res = runner.invoke(app, args(ws))
    line = one_error_line(res)
    assert message in line, line
    after = {**_files(ws["root"]), **_files(ws["data"])}
    assert {f: v for f, v in after.items() if f in before} == before, (
        f"{case}: a file the user had was changed"
    )
    assert not set(after) - set(before), f"{case}: left {sorted(set(after) - set(before))}"
