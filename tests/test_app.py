"""The web demo's logic without a browser: input checks, answers, evidence, failures as messages."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medlvr.app import DemoService, InputError, ServeConfig, parse_options
from medlvr.cli import app as cli_app
from medlvr.config import LatentConfig
from medlvr.errors import MedlvrError
from medlvr.model.latent import LatentVLM
from tests.conftest import random_image


@pytest.fixture(scope="module")
def service(tiny_dir):
    torch.manual_seed(0)
    vlm = LatentVLM.from_pretrained(tiny_dir, LatentConfig(steps=2, projector="linear"))
    return DemoService(vlm, ServeConfig(max_upload_mb=1.0, examples=2, max_new_tokens=6))


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "scan.png"
    random_image(140, 112, seed=1).save(path)
    return path


def test_parse_options():
    assert parse_options("") == {}
    assert parse_options("A=left lung\nb. right lung\n\nC) both") == {
        "A": "left lung",
        "B": "right lung",
        "C": "both",
    }
    for bad, msg in [
        ("A=x", "at least two"),
        ("A=x\nA=y", "twice"),
        ("left lung\nB=x", "one per line"),
        ("A=\nB=x", "one per line"),
    ]:
        with pytest.raises(InputError, match=msg):
            parse_options(bad)


def test_good_png_gets_answer_time_and_evidence(service, png):
    r = service.answer(str(png), "Is there a lesion in the upper left region?", "A=yes\nB=no", 2)
    assert r.ok, r.message
    assert r.answer and "K = 2" in r.timing and "ms" in r.timing
    assert isinstance(r.evidence, Image.Image) and r.evidence.size[0] > 300
    assert r.regions["latent_steps"] == 2 and r.regions["images"][0]["size"] == [140, 112]
    assert r.preview.size == (140, 112)


def test_k0_answers_without_evidence(service, png):
    r = service.answer(str(png), "What is shown?", "", 0)
    assert r.ok and r.evidence is None and "no latent steps" in r.message


def test_dicom_upload_is_answered(service, tmp_path):
    from pydicom.data import get_testdata_file

    dcm = tmp_path / "ct"  # no extension: recognised by the DICM marker
    shutil.copy(get_testdata_file("CT_small.dcm"), dcm)
    r = service.answer(str(dcm), "Which organ is shown?", "", 1)
    assert r.ok, r.message
    assert r.preview.size == (128, 128) and r.evidence is not None


def test_tiled_backbone_gets_evidence(tiny_factory, png):
    """SmolVLM's tiles + global view reach the page as one map per image on its finest grid."""
    torch.manual_seed(0)
    vlm = LatentVLM.from_pretrained(
        tiny_factory("smolvlm"), LatentConfig(steps=2, projector="linear")
    )
    r = DemoService(vlm, ServeConfig(examples=0, max_new_tokens=4)).answer(
        str(png), "Where is the lesion?", "A=left\nB=right", 2
    )
    assert r.ok, r.message
    assert isinstance(r.evidence, Image.Image) and r.evidence.size[0] > 300
    grid = vlm.adapter.token_grid(vlm.processor, 140, 112)
    assert grid.blocks and r.regions["images"][0]["grid"] == [grid.rows, grid.cols]
    assert r.regions["images"][0]["similarity"]["mass"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: p.with_name("notes.txt").write_text("hello") and p.with_name("notes.txt"),
            "unsupported file type (.txt)",
        ),
        (
            lambda p: p.with_name("empty.png").write_bytes(b"") or p.with_name("empty.png"),
            "is empty",
        ),
        (
            lambda p: (
                p.with_name("fake.png").write_text("not a png at all") and p.with_name("fake.png")
            ),
            "could not be read as an image",
        ),
        (
            lambda p: random_image(8, 8).save(p.with_name("tiny.png")) or p.with_name("tiny.png"),
            "at least 16",
        ),
        (
            lambda p: (
                random_image(400, 16).save(p.with_name("strip.png")) or p.with_name("strip.png")
            ),
            "long side",
        ),
        (
            lambda p: (
                p.with_name("big.png").write_bytes(b"\x89PNG" + b"0" * 1_100_000)
                and p.with_name("big.png")
            ),
            "the limit is 1 MB",
        ),
        (lambda p: p.with_name("gone.png"), "did not arrive"),
        (lambda p: None, "upload an image first"),
    ],
)
def test_bad_uploads_become_messages(service, png, make, message):
    path = make(png)
    r = service.answer(None if path is None else str(path), "What is shown?", "", 2)
    assert not r.ok and message in r.message, r.message
    assert r.evidence is None and r.answer == ""


@pytest.mark.parametrize(
    "question, options, k, message",
    [
        ("  ", "", 2, "type a question"),
        ("Q?", "A=x", 2, "at least two"),
        ("Q?", "", 99, "latent steps must be in 0..16"),
    ],
)
def test_bad_form_values_become_messages(service, png, question, options, k, message):
    r = service.answer(str(png), question, options, k)
    assert not r.ok and message in r.message


def test_a_bug_is_a_message_and_the_next_request_is_answered(service, png, monkeypatch):
    import medlvr.explain

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(medlvr.explain, "explain", broken)
    r = service.answer(str(png), "What is shown?", "", 2)
    assert not r.ok and "internal error (RuntimeError: boom)" in r.message
    monkeypatch.undo()
    first = r.request
    r = service.answer(str(png), "What is shown?", "", 2)
    assert r.ok and r.request == first + 1


def test_examples_come_from_the_synthetic_benchmark(service, tmp_path):
    examples = service.make_examples(tmp_path / "ex")
    assert len(examples) == 2
    for e in examples:
        assert e.image.is_file() and Image.open(e.image).size == (168, 168)
        assert e.question.endswith("?")
        if e.options:
            assert len(parse_options(e.options)) >= 2
    r = service.answer(str(examples[0].image), examples[0].question, examples[0].options, 2)
    assert r.ok, r.message


def test_serve_config_checks():
    assert ServeConfig().host == "127.0.0.1"
    for bad in (
        {"port": 0},
        {"max_upload_mb": 0},
        {"min_side": 0},
        {"max_aspect": 0.5},
        {"examples": -1},
    ):
        with pytest.raises(MedlvrError):
            ServeConfig(**bad)


def test_cli_serve_user_errors(tmp_path):
    res = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path), "--port", "70000"])
    assert res.exit_code == 2 and "port" in res.output
    res = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "model folder not found" in res.output


# ---------------------------------------------------------------------------- uploads (issue 17, item 8)


def test_no_message_shows_a_server_path(service, tmp_path):
    folder = tmp_path / "gradio" / "0a1b2c"
    folder.mkdir(parents=True)
    fake = folder / "fake.png"
    fake.write_text("not a png at all")
    r = service.answer(str(fake), "What is shown?", "", 2)
    assert not r.ok and "fake.png could not be read as an image" in r.message
    assert str(tmp_path) not in r.message and "/gradio/" not in r.message, r.message


def test_an_upload_is_deleted_when_its_request_ends(service, png, tmp_path):
    uploads = tmp_path / "uploads"
    received = uploads / "3f2a" / "scan.png"  # Gradio keeps each upload in a folder of its own
    received.parent.mkdir(parents=True)
    shutil.copy(png, received)
    mine = DemoService(service.vlm, service.cfg, upload_dir=uploads)
    assert mine.answer(str(received), "What is shown?", "", 1).ok
    assert not received.exists() and not received.parent.exists() and uploads.is_dir()
    received.parent.mkdir()
    received.write_text("not an image")
    assert not mine.answer(str(received), "What is shown?", "", 1).ok
    assert not received.exists(), "a refused upload goes too"
    assert mine.answer(str(png), "What is shown?", "", 0).ok and png.is_file(), (
        "a file outside the upload folder stays"
    )


def test_the_server_refuses_an_upload_over_the_limit_and_deletes_its_files_on_close(tiny_dir, png):
    import socket
    import tempfile

    import httpx

    from medlvr.app import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    vlm = LatentVLM.from_pretrained(tiny_dir, LatentConfig(steps=1, projector="linear"))
    server = serve(
        vlm,
        ServeConfig(port=port, max_upload_mb=0.5, examples=1, max_new_tokens=4),
        block=False,
        quiet=True,
    )
    try:
        uploads = server.service.upload_dir
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        big = httpx.post(
            url, files={"files": ("big.png", b"\x89PNG" + b"0" * 600_000, "image/png")}, timeout=60
        )
        assert big.status_code == 413 and "maximum allowed size" in big.text
        kept = [f for f in uploads.rglob("*") if f.is_file() and f.stat().st_size > 500_000]
        assert not kept and not list(uploads.rglob("big.png")), (
            "nothing of a refused upload is kept"
        )
        ok = httpx.post(
            url, files={"files": ("scan.png", png.read_bytes(), "image/png")}, timeout=60
        )
        assert ok.status_code == 200, ok.text
        [shown] = ok.json()  # the upload's name for the page: no server path (issue 24) ...
        pages = [
            httpx.get(f"http://127.0.0.1:{port}{p}", timeout=60).text for p in ("/", "/config")
        ]
        for text in [ok.text, *pages]:
            assert str(server.folder) not in text and tempfile.gettempdir() + "/" not in text
        assert '"show_error":false' in pages[1].replace(" ", "")
        received = str(server.real_path(shown))  # ... which the server maps back to the file
        assert Path(received).is_file() and uploads in Path(received).parents
        r = server.service.answer(received, "What is shown?", "", 1)
        assert r.ok and not Path(received).exists()
    finally:
        server.close()
    assert not server.folder.exists(), "uploads and the gallery go with the server"
    assert os.environ.get("GRADIO_TEMP_DIR") != str(uploads)
