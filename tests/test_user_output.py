"""What a user sees: no deprecation warning from the libraries medlvr drives, no library progress bars.

transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the old
name warns on every call and is removed in 5.40); medlvr must use the name of the
transformers it runs on. The suite's `filterwarnings` (pyproject.toml) turns such
warnings into errors everywhere; the first test checks the latent paths directly.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medlvr.cli import app
from medlvr.config import LatentConfig
from medlvr.data.collate import VQACollator
from medlvr.data.schema import ROI, VQASample
from medlvr.model.backbones import families
from medlvr.model.latent import LatentVLM, cache_argument
from tests.conftest import random_image


@pytest.mark.parametrize("family", families())
def test_latent_paths_raise_no_future_or_deprecation_warning(tiny_factory, family):
    sample = VQASample(id="s", dataset="t", split="test", images=["i"], question="Is there a lesion?", answer="yes",
                       answer_type="closed", rois=[ROI(box=(10, 10, 60, 40))])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        vlm = LatentVLM.from_pretrained(
            tiny_factory(family), LatentConfig(steps=2, projector="linear")
        )
        batch = VQACollator(vlm.processor, vlm.adapter, with_answers=True)(
            [sample], images=[[random_image(64, 48)]]
        )
        vlm.generate(
            batch, latent_steps=2, max_new_tokens=3
        )  # prefill, latent steps, decoding on the cache
        vlm.train()
        vlm(batch, latent_steps=2).loss.backward()  # the training recurrence
    shown = [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught
             if issubclass(w.category, (FutureWarning, DeprecationWarning))]  # fmt: skip
    assert not shown, "\n".join(shown)


def test_cache_argument_is_the_name_the_installed_forward_takes():
    class Before524(nn.Module):
        def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None): ...

    class Since524(nn.Module):
        def forward(self, inputs_embeds=None, cache=None, use_cache=None): ...

    assert cache_argument(Before524()) == "past_key_values"
    assert cache_argument(Since524()) == "cache"


@pytest.mark.parametrize("module", ["transformers.utils.generic", "peft.tuners.lora", "accelerate.accelerator",
                                    "torch.nn.modules.module", "medlvr.model.latent"])  # fmt: skip
@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
def test_suite_turns_library_deprecations_into_errors(module, category):
    # A warning attributed to medlvr's own module is a library warning whose stacklevel points at our call.
    with pytest.raises(category):
        warnings.warn_explicit("`x` is deprecated", category, "f.py", 1, module=module)


@pytest.fixture
def progress_bars(monkeypatch):
    """Restores transformers' global progress-bar switch and the environment, which the CLI sets."""
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was = hf_logging.is_progress_bar_enabled()
    yield
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_transformers_progress_bars_only_with_verbose(tmp_path, progress_bars):
    runner = CliRunner()
    loud = runner.invoke(app, ["--verbose", "model", "init-tiny", "--out", str(tmp_path / "v")])
    quiet = runner.invoke(app, ["model", "init-tiny", "--out", str(tmp_path / "q")])
    assert quiet.exit_code == 0 and loud.exit_code == 0, quiet.output + loud.output
    assert "Writing model shards" in loud.output
    assert "Writing model shards" not in quiet.output
    assert "wrote qwen2_5_vl" in quiet.output
    # Worker processes the command starts (the demo's parallel arms) stay quiet too.
    child = subprocess.run([sys.executable, "-c", "from transformers.utils import logging; print(logging.is_progress_bar_enabled())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert child.stdout.strip() == "False"
