"""medlvr as a user installs it: metadata, README links, the sdist, and the wheel running the tour.

The slow test builds the sdist from a copy of the project, the wheel from that sdist (as
`python -m build` does), installs the wheel into a fresh venv and runs the README's tour from
a folder outside the project. The venv takes medlvr from the wheel only; its dependencies
(torch, transformers, ...) come from the running environment's site-packages through a `.pth`
file, so the test needs no registry and takes about a minute instead of a multi-GB install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

import medlvr

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_metadata_licence_urls_and_the_tested_python():
    assert PROJECT["license"] == "Apache-2.0"
    assert all((REPO / f).is_file() for f in PROJECT["license-files"])
    assert "Apache License" in (REPO / "LICENSE").read_text()
    assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
    tested = f"Programming Language :: Python :: {sys.version_info.major}.{sys.version_info.minor}"
    assert tested in PROJECT["classifiers"]
    assert {"Homepage", "Repository", "Changelog"} <= set(PROJECT["urls"])
    assert (REPO / "medlvr" / "py.typed").is_file()
    assert f"## {medlvr.__version__}" in (REPO / "CHANGELOG.md").read_text()


def test_readme_links_are_absolute_and_point_at_files_of_the_project():
    """The package index shows the README without the repository: links to its files are absolute."""
    base = PROJECT["urls"]["Repository"]
    raw = base.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    links = re.findall(r"\]\(([^)\s]+)\)", (REPO / "README.md").read_text())
    assert links
    for link in links:
        if link.startswith("#"):
            continue
        assert link.startswith(("http://", "https://")), f"relative link {link}"
        for prefix in (f"{base}/blob/main/", f"{base}/tree/main/", raw):
            if link.startswith(prefix):
                path = link[len(prefix) :].split("#")[0]
                assert (REPO / path).exists(), f"{link}: no such file in the project"


def test_code_and_recipes_cite_docs_of_the_project_not_the_design_notes():
    """A user has the package and its docs/, not the notes it was designed from."""
    cited: dict[str, set[str]] = {}
    files = [
        *REPO.glob("medlvr/**/*.py"),
        *REPO.glob("medlvr/configs/**/*.yaml"),
        *REPO.glob("tests/*.py"),
    ]
    for f in (f for f in files if f.name != Path(__file__).name):
        for doc in re.findall(r"\b((?:docs/)?[\w./-]*\.md)\b", f.read_text()):
            cited.setdefault(doc, set()).add(str(f.relative_to(REPO)))
    docs = {d: where for d, where in cited.items() if d.startswith("docs/")}
    assert docs, "the code cites docs/"
    for doc, where in docs.items():
        assert (REPO / doc).is_file(), f"{sorted(where)} cite {doc}, not in the project"
    assert "NOTES-synthetic.md" not in cited, sorted(cited["NOTES-synthetic.md"])


def _copy_project(dst: Path) -> Path:
    """The project's files without venvs, run folders and caches (what a clean checkout holds)."""
    skip = shutil.ignore_patterns(
        ".git", ".venv*", "runs", "*.egg-info", "__pycache__", ".pytest_cache", "build", "dist"
    )
    shutil.copytree(REPO, dst, ignore=skip)
    return dst


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """The command's standard output."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.slow
def test_the_wheel_runs_the_tour_from_outside_the_project(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf_home")

    # sdist from a clean copy, wheel from the sdist.
    src = _copy_project(tmp_path / "src")
    dist = tmp_path / "dist"
    build = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    sdist = dist / _run([sys.executable, "-c", build, str(dist)], src, env).strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "unpacked", filter="data")
    for needed in ("tests/conftest.py", "tests/test_packaging.py", "docs/results.md", "docs/synthetic.md",
                   "medlvr/configs/tiny/sft.yaml", "LICENSE", "CHANGELOG.md", "Makefile", "benchmarks/cli_startup.py"):  # fmt: skip
        assert needed in names, f"the sdist lacks {needed}"
    unpacked = next((tmp_path / "unpacked").iterdir())
    collected = _run(
        [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider"],
        unpacked,
        env,
    )
    assert re.search(r"^\d+ tests collected in ", collected, re.M), collected[
        -2000:
    ]  # no collection error
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), "."],
         unpacked, env)  # fmt: skip
    wheel = next(dist.glob("medlvr-*.whl"))
    assert wheel.name.startswith(f"medlvr-{medlvr.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
        meta = zf.read(f"medlvr-{medlvr.__version__}.dist-info/METADATA").decode()
    assert {"medlvr/py.typed", "medlvr/configs/tiny/sft.yaml", "medlvr/assets/stage0/model.safetensors",
            f"medlvr-{medlvr.__version__}.dist-info/licenses/LICENSE"} <= files  # fmt: skip
    assert not any(f.startswith("tests/") for f in files)
    assert "License-Expression: Apache-2.0" in meta

    # A venv with medlvr from the wheel only; its dependencies from this environment.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            tmp_path,
            env,
        ).strip()
    )
    (site / "deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )  # appended after the venv's own
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         tmp_path, env)  # fmt: skip
    where = _run([str(python), "-c", "import medlvr; print(medlvr.__file__)"], tmp_path, env)
    assert where.strip().startswith(str(site)), where

    # The tour, in a folder outside the project (smaller sizes, the same commands).
    home = tmp_path / "user"
    home.mkdir()
    medlvr_cmd = str(env_dir / "bin" / "medlvr")

    def run(*args: str) -> str:
        return _run([medlvr_cmd, *args], home, env)

    assert run("--version").strip() == f"medlvr {medlvr.__version__}"
    assert "tiny/sft" in run("recipes")
    run("data", "synth", "--out", "runs/synth", "--n", "60", "--seed", "0")
    assert "ROI coverage" in run("data", "inspect", "runs/synth/test.jsonl")
    run("train", "sft", "--config", "tiny/sft", "output_dir=runs/sft", "max_steps=2", "batch_size=4",
        "data.val_samples=4", "log.progress=false")  # fmt: skip
    assert (home / "runs/sft/final/README.md").is_file()  # the model card
    run("eval", "--model", "runs/sft/final", "--data", "runs/synth/test.jsonl", "runs/synth/compositional.jsonl",
        "--reasoning", "latent", "--latent-steps", "0,2", "--out", "runs/eval-sft", "--explain-metrics", "--limit", "6")  # fmt: skip
    assert (home / "runs/eval-sft/report.md").is_file()
    run("explain", "--model", "runs/sft/final", "--image", "runs/synth/images/test-000000.png",
        "--question", "What is the shape of the lesion in the center region?", "--out", "explain.png")  # fmt: skip
    assert (home / "explain.png").is_file()
    assert "answer:" in run("predict", "--model", "stage0", "--image", "runs/synth/images/test-000000.png",
                            "--question", "What is the intensity of the largest lesion?")  # fmt: skip
    out = _run([str(python), "-c", _readme_python_example()], home, env)
    assert "warn" not in out.lower() and out.strip().endswith("4"), (
        out
    )  # answered with the model's K = 4
