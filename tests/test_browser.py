"""The web demo in a real browser: headless Debian chromium driven by Playwright."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, random_image

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = REPO / "test-artifacts"
WAIT_MS = 60_000  # generous: CI runs this beside training tests on 2 cores

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir):
    from medlvr.app import ServeConfig, serve
    from medlvr.config import LatentConfig
    from medlvr.model.latent import LatentVLM

    torch.manual_seed(0)
    vlm = LatentVLM.from_pretrained(tiny_dir, LatentConfig(steps=2, projector="linear"))
    cfg = ServeConfig(port=_free_port(), examples=2, max_new_tokens=8)
    page = serve(vlm, cfg, block=False, quiet=True)
    yield f"http://127.0.0.1:{cfg.port}/"
    page.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def _upload(page, path: Path) -> None:
    """Put `path` in the upload box and wait until the page shows its name.

    Under CPU load the File component can re-render between the Clear click and
    the file being set, dropping the file; the upload is then simply repeated.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator("#upload")
    for _ in range(3):
        clear = box.locator("button[aria-label='Clear']")
        if clear.count():
            clear.first.click()
            clear.first.wait_for(state="detached", timeout=WAIT_MS)
        box.locator("input[type=file]").set_input_files(str(path))
        try:
            box.get_by_text(path.name).first.wait_for(timeout=WAIT_MS // 2)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"{path.name} never appeared in the upload box")


def _submit_and_wait(page, number: int) -> str:
    """Click Answer and wait for the status line of request `number` (a note or an error message)."""
    page.locator("#submit").click()
    page.locator("#status").get_by_text(f"request {number}").wait_for(timeout=WAIT_MS)
    return page.locator("#status").inner_text()


def test_upload_answer_evidence_and_bad_upload(server, browser, tmp_path):
    good = tmp_path / "scan.png"
    random_image(168, 140, seed=3).save(good)
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image\n")

    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    page.set_default_timeout(WAIT_MS)
    page.goto(server)
    page.locator("#submit").wait_for(timeout=WAIT_MS)

    _upload(page, good)
    page.locator("#question textarea").fill("Is there a lesion in the upper left region?")
    page.locator("#options textarea").fill("A=yes\nB=no")
    status = _submit_and_wait(page, 1)
    assert "Error" not in status, status
    answer = page.locator("#answer textarea").input_value()
    assert answer.strip(), "an answer should appear"
    assert "latent steps" in page.locator("#timing textarea").input_value()
    evidence = page.locator("#evidence img")
    evidence.wait_for(timeout=WAIT_MS)
    box = evidence.bounding_box()
    assert box is not None and box["width"] > 200 and box["height"] > 100, box
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_answer.png"), full_page=True)

    # A text file: a message on the page, no answer, and the server stays up.
    _upload(page, bad)
    status = _submit_and_wait(page, 2)
    assert "unsupported file type" in status, status
    assert page.locator("#answer textarea").input_value() == ""
    page.screenshot(path=str(ARTIFACTS / "demo_bad_upload.png"), full_page=True)

    # The next request is answered again.
    _upload(page, good)
    status = _submit_and_wait(page, 3)
    assert "Error" not in status, status
    assert page.locator("#answer textarea").input_value().strip()
    page.locator("#evidence img").wait_for(timeout=WAIT_MS)

    # The gallery: clicking a synthetic example loads its image and question.
    page.locator("#examples img").first.click()
    page.wait_for_function(
        "() => document.querySelector('#question textarea').value.startsWith('Is there') === false",
        timeout=WAIT_MS,
    )
    page.locator("#upload").get_by_text(".png").first.wait_for(timeout=WAIT_MS)
    assert page.locator("#question textarea").input_value().endswith("?")
    page.close()
