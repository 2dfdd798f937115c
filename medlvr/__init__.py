"""medlvr: latent visual reasoning for medical visual question answering.

The names a script needs are importable from here::

    from medlvr import LatentVLM, answer_one, load_image

    vlm = LatentVLM.from_pretrained("runs/sft/final")  # a folder, `stage0` or a Hub id
    print(answer_one(vlm, [load_image("scan.png")], "Is there a lesion?").text)

They are imported on first use (PEP 562), so `import medlvr` does not import torch or
transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module defining it.
_EXPORTS: dict[str, str] = {
    # models
    "LatentVLM": "medlvr.model.latent",
    "LatentConfig": "medlvr.config",
    "build_tiny": "medlvr.model.tiny",
    "model_folder": "medlvr.model.files",
    # answering and explaining one question
    "Answer": "medlvr.inference",
    "answer_one": "medlvr.inference",
    "load_image": "medlvr.data.images",
    # (`explain` itself stays in `medlvr.explain`: a package attribute named like a submodule is
    # replaced by the module as soon as anything imports the submodule)
    "Explanation": "medlvr.explain",
    "ExplainConfig": "medlvr.explain",
    # data and evaluation
    "VQASample": "medlvr.data.schema",
    "read_jsonl": "medlvr.data.schema",
    "write_jsonl": "medlvr.data.schema",
    "evaluate": "medlvr.eval.harness",
    "EvalResult": "medlvr.eval.harness",
    # training: the two stages and their configs
    "SFTConfig": "medlvr.config",
    "VLPOConfig": "medlvr.config",
    "load_config": "medlvr.config",
    "run_sft": "medlvr.train.sft",
    "run_vlpo": "medlvr.train.vlpo",
    "TrainResult": "medlvr.train.setup",
    "MedlvrError": "medlvr.errors",
}

# Spelled out for linters and type checkers; the same names as _EXPORTS (tests/test_api.py).
__all__ = [
    "__version__",
    "LatentVLM",
    "LatentConfig",
    "build_tiny",
    "model_folder",
    "Answer",
    "answer_one",
    "load_image",
    "Explanation",
    "ExplainConfig",
    "VQASample",
    "read_jsonl",
    "write_jsonl",
    "evaluate",
    "EvalResult",
    "SFTConfig",
    "VLPOConfig",
    "load_config",
    "run_sft",
    "run_vlpo",
    "TrainResult",
    "MedlvrError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medlvr' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # the same names, for type checkers and editors
    from medlvr.config import LatentConfig, SFTConfig, VLPOConfig, load_config
    from medlvr.data.images import load_image
    from medlvr.data.schema import VQASample, read_jsonl, write_jsonl
    from medlvr.errors import MedlvrError
    from medlvr.eval.harness import EvalResult, evaluate
    from medlvr.explain import ExplainConfig, Explanation
    from medlvr.inference import Answer, answer_one
    from medlvr.model.files import model_folder
    from medlvr.model.latent import LatentVLM
    from medlvr.model.tiny import build_tiny
    from medlvr.train.setup import TrainResult
    from medlvr.train.sft import run_sft
    from medlvr.train.vlpo import run_vlpo
