"""The public API: `from medlvr import ...`, imported lazily; one version; the K=0 warning."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
from PIL import Image
from typer.testing import CliRunner

import medlvr
from medlvr.cli import app


def test_every_public_name_is_the_defining_modules_object():
    # Importing every submodule first: Python then sets `medlvr.<submodule>` to the module, which
    # must not shadow an exported name (it did for the `explain` function).
    for module in set(medlvr._EXPORTS.values()):
        importlib.import_module(module)
    assert set(medlvr.__all__) == {"__version__", *medlvr._EXPORTS}
    for name, module in medlvr._EXPORTS.items():
        assert getattr(medlvr, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = medlvr.nope  # type: ignore[attr-defined]


def test_import_medlvr_imports_no_heavy_library():
    code = "import sys, medlvr; print(sorted(m for m in ('torch', 'transformers', 'typer', 'pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version_has_one_source():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"medlvr {medlvr.__version__}"
    from importlib.metadata import version

    assert version("medlvr") == medlvr.__version__  # pyproject reads it from medlvr/__init__.py


def test_latent_steps_from_a_model_trained_without_them_warn():
    """The README's old example: the shipped K=0 backbone asked for 4 latent steps answered ''."""
    from medlvr import LatentVLM, answer_one

    vlm = LatentVLM.from_pretrained("stage0")
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    assert vlm.trained_steps == 0
    with pytest.warns(UserWarning, match=r"trained without latent steps \(K=0\).*K=4"):
        answer_one(vlm, [image], "What is the shape of the lesion?", latent_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert answer_one(vlm, [image], "What is the shape of the lesion?").latent_steps == 0
