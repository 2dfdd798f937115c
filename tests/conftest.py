"""Shared fixtures: tiny real models built once per session, deterministic CPU settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two xdist workers share two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)
# Denormals made early CPU steps ~7x slower in the synthetic trial.
torch.set_flush_denormal(True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
VQA_RAD = SHARED / "datasets" / "vqa-rad"


@pytest.fixture(scope="session", autouse=True)
def image_roots(tmp_path_factory):
    """Data files may name images anywhere under the session's temporary folder (fixtures share
    images across folders) and in the shared datasets: the explicit allowance `MEDLVR_IMAGE_ROOTS`
    a user gives (tests of the confinement itself unset it)."""
    from medlvr.data.schema import IMAGE_ROOTS_ENV

    roots = [str(tmp_path_factory.getbasetemp().resolve()), str(SHARED)]
    os.environ[IMAGE_ROOTS_ENV] = os.pathsep.join(roots)
    yield
    os.environ.pop(IMAGE_ROOTS_ENV, None)


@pytest.fixture(scope="session")
def vqa_rad_root() -> Path:
    if not VQA_RAD.is_dir():
        pytest.fail(f"VQA-RAD not found at {VQA_RAD}: CI always has ../shared beside the repo")
    return VQA_RAD


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """Build (once per session and worker) a tiny model folder per (family, size, latent tokens)."""
    from medlvr.model.tiny import build_tiny

    built: dict[tuple, Path] = {}

    def make(
        family: str = "qwen2_5_vl", size: str = "tiny", with_latent_tokens: bool = True
    ) -> Path:
        key = (family, size, with_latent_tokens)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{family}_{size}_{int(with_latent_tokens)}")
            built[key] = build_tiny(
                out, family=family, size=size, with_latent_tokens=with_latent_tokens
            )
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_dir(tiny_factory) -> Path:
    return tiny_factory()


def torchrun(
    worker: Path, *args: str, nproc: int = 2, timeout: float = 120, env: dict | None = None
):
    """`torchrun --nproc_per_node nproc worker args...` on a free port (gloo on CPU, one thread per process).

    Returns the completed process; the repository is on PYTHONPATH so the worker imports medlvr from here.
    """
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(worker), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def random_image(width: int, height: int, seed: int = 0):
    """A noise RGB image (tests want inputs that differ visibly)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


class Killed(RuntimeError):
    """A crash at a chosen optimizer step (`kill_at`), to test resuming."""


def kill_at(step: int):
    """An `on_step` hook of `run_sft`/`run_vlpo` that raises `Killed` after optimizer step `step`."""

    def hook(row: dict) -> None:
        if row["step"] == step:
            raise Killed

    return hook
