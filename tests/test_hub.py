"""Models by Hugging Face Hub id, resolved offline from a cache laid out as huggingface_hub lays it out.

The cache holds `models--medlvr-test--tiny/` with `blobs/` (the files' contents, named by
hash), `snapshots/<commit>/<file>` (symlinks into blobs) and `refs/<branch or tag>` (the
commit), exactly as `snapshot_download` writes it; with `HF_HUB_OFFLINE=1` nothing is fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medlvr.errors import MedlvrError
from tests.conftest import random_image

REPO = "medlvr-test/tiny"
MAIN = "a" * 40
V1 = "b" * 40


def _lay_out(hub: Path, repo: str, commit: str, files: dict[str, Path], refs: list[str]) -> Path:
    """Add snapshot `commit` of `repo` (files: name in the repo -> source file) to cache folder `hub`."""
    root = hub / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for name, src in files.items():
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_dir) -> Path:
    """HF_HOME whose hub cache holds medlvr-test/tiny at main (K=3) and at tag v1 (K=1), and a pickle-only repo."""
    home = tmp_path_factory.mktemp("hf_home")
    files = {p.name: p for p in tiny_dir.iterdir() if p.is_file()}
    edited = tmp_path_factory.mktemp("k1")
    for steps, commit, refs in ((3, MAIN, ["main"]), (1, V1, ["v1"])):
        latent = edited / f"medlvr_latent_{steps}.json"
        latent.write_text(json.dumps({"steps": steps, "projector": "norm", "input": "hidden"}))
        _lay_out(home / "hub", REPO, commit, {**files, "medlvr_latent.json": latent}, refs)
    pickled = {k: v for k, v in files.items() if not k.endswith(".safetensors")}
    import torch
    from safetensors.torch import load_file

    pt = edited / "pytorch_model.bin"
    torch.save(load_file(str(tiny_dir / "model.safetensors")), pt)
    _lay_out(home / "hub", "medlvr-test/pickled", MAIN, {**pickled, pt.name: pt}, ["main"])
    return home


@pytest.fixture
def offline_cache(hf_home, monkeypatch):
    """huggingface_hub read its environment at import: point its constants at the fixture, offline."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


def test_hub_ids_and_revisions_load_from_the_cache(offline_cache):
    from medlvr.model.files import model_folder
    from medlvr.model.latent import LatentVLM

    snapshots = offline_cache / "models--medlvr-test--tiny" / "snapshots"
    assert model_folder(REPO) == snapshots / MAIN
    assert model_folder(f"{REPO}@v1") == snapshots / V1
    assert model_folder(f"{REPO}@{MAIN}") == snapshots / MAIN
    assert LatentVLM.from_pretrained(REPO).latent.steps == 3
    assert LatentVLM.from_pretrained(f"{REPO}@v1").latent.steps == 1


def test_hub_errors_are_one_line(offline_cache):
    import torch

    from medlvr.model.files import model_folder
    from medlvr.model.latent import LatentVLM

    with pytest.raises(MedlvrError, match=r"not in the cache .*HF_HUB_OFFLINE is set"):
        model_folder("medlvr-test/absent")
    with pytest.raises(MedlvrError, match="not in the cache"):
        model_folder(f"{REPO}@v2")  # a revision the cache has no ref for
    with pytest.raises(MedlvrError, match="model folder not found: no/such/folder"):
        model_folder("no/such/folder")  # not a Hub id either
    # The same check as a local folder: a snapshot with pickle weights only is refused ...
    with pytest.raises(MedlvrError, match=r"holds pickle weights only \(pytorch_model.bin\)"):
        LatentVLM.from_pretrained("medlvr-test/pickled")
    vlm = LatentVLM.from_pretrained("medlvr-test/pickled", allow_pickle=True)  # ... unless allowed
    assert torch.equal(
        vlm.backbone.get_input_embeddings().weight,
        LatentVLM.from_pretrained(REPO).backbone.get_input_embeddings().weight,
    )


def test_a_local_folder_wins_over_a_hub_id_and_stage0_is_the_shipped_backbone(
    offline_cache, tiny_dir, tmp_path, monkeypatch
):
    from medlvr.model.files import model_folder
    from medlvr.shipped import MODELS

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "medlvr-test" / "tiny")
    assert model_folder(REPO) == Path(REPO)
    assert model_folder("stage0") == MODELS["stage0"]
    assert (MODELS["stage0"] / "model.safetensors").is_file()


@pytest.mark.slow  # two fresh processes importing torch: ~25 s on a busy 2-core machine
def test_cli_honours_hf_home_and_hf_hub_offline(hf_home, tmp_path):
    """A fresh process: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE from the environment."""
    image = tmp_path / "scan.png"
    random_image(64, 64).save(image)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, "-m", "medlvr", "predict", "--image", str(image), "--question", "Is it?"]
    done = subprocess.run(
        [*cmd, "--model", f"{REPO}@v1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "latent steps: 1" in done.stdout  # the v1 snapshot's K, not main's
    done = subprocess.run(
        [*cmd, "--model", "medlvr-test/absent"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert str(hf_home / "hub") in done.stderr.replace("\n", "")


def test_sft_then_vlpo_from_a_hub_id_export_model_cards(offline_cache, tmp_path):
    """model.path and --init take Hub ids; each export's README.md carries the card metadata."""
    from huggingface_hub import ModelCard
    from typer.testing import CliRunner

    from medlvr.cli import app
    from medlvr.data.synth import SynthConfig, generate

    data = generate(SynthConfig(n=40, seed=0, image_size=84, grid=2, level=1, large_size=1.0, small_size=0.5, question_types={"presence": 1.0},
                                describe=False), tmp_path / "synth")  # fmt: skip
    common = [f"data.train=[{data['train']}]", "data.val=", "max_steps=1", "batch_size=2", "log.progress=false",
              "log.tensorboard=false"]  # fmt: skip
    runner = CliRunner()
    sft = ["train", "sft", "--config", "tiny/sft", f"model.path={REPO}@v1", "mode=latent", "latent.steps=2",
           f"output_dir={tmp_path / 'sft'}", *common]  # fmt: skip
    res = runner.invoke(app, sft)
    assert res.exit_code == 0, res.output
    card = ModelCard.load(tmp_path / "sft" / "final" / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == REPO and meta["datasets"] == ["synth"]
    assert (
        meta["medlvr"]["latent"].items()
        >= {"steps": 2, "projector": "norm", "input": "hidden"}.items()
    )
    assert (
        meta["medlvr"]["training"]["stage"] == "sft"
        and meta["medlvr"]["training"]["mode"] == "latent"
    )
    assert meta["medlvr"]["training"]["started_from"] == f"{REPO}@v1"
    vlpo = ["train", "vlpo", "--config", "tiny/vlpo", "--init", REPO, "vlpo.group_size=2", "vlpo.max_new_tokens=2",
            "vlpo.micro_batch_size=4", f"output_dir={tmp_path / 'vlpo'}", *common]  # fmt: skip
    res = runner.invoke(app, vlpo)
    assert res.exit_code == 0, res.output
    meta = ModelCard.load(tmp_path / "vlpo" / "final" / "README.md").data.to_dict()
    assert meta["base_model"] == REPO and meta["medlvr"]["training"]["stage"] == "vlpo"
    # A run from a local export inherits the export's base model.
    from medlvr.train.card import base_model

    assert base_model(str(tmp_path / "sft" / "final")) == REPO


def test_online_a_pickle_only_repo_is_named_as_such(tiny_dir, tmp_path, monkeypatch):
    """Pickle files are not fetched: the Hub's file list says why the snapshot holds no weights.

    The network is stood in for: the download returns a snapshot without weights (the pickle
    file skipped) and the Hub's listing names a `pytorch_model.bin`.
    """
    import huggingface_hub
    import huggingface_hub.constants as c

    from medlvr.model.files import model_folder

    folder = _lay_out(
        tmp_path, "medlvr-test/online", MAIN, {"config.json": tiny_dir / "config.json"}, ["main"]
    )
    asked: list[dict] = []
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(kw) or str(folder)
    )
    monkeypatch.setattr(
        huggingface_hub,
        "list_repo_files",
        lambda repo, revision=None: ["config.json", "pytorch_model.bin"],
    )
    with pytest.raises(
        MedlvrError,
        match=r"online@v2 holds pickle weights only \(pytorch_model.bin\).*--allow-pickle",
    ):
        model_folder("medlvr-test/online@v2")
    assert asked[0]["revision"] == "v2" and "*.bin" in asked[0]["ignore_patterns"]
