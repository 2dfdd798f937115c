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


@pytest.fixture(scope="session")
def vqa_rad_root() -> Path:
    if not VQA_RAD.is_dir():
        pytest.fail(f"VQA-RAD not found at {VQA_RAD}: CI always has ../shared beside the repo")
    return VQA_RAD
