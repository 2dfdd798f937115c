"""The weight files of a model folder, checked before anything loads them.

medlvr reads and writes safetensors only: a damaged file (truncated by a copy cut short,
or empty) is reported in one line naming it, and a folder whose weights are pickle only
(`pytorch_model.bin`, as older releases ship them) is refused unless the user allows it
explicitly, since unpickling runs code stored in the file (as `--allow-pickle` does for
the PathVQA release).
"""

from __future__ import annotations

import json
from pathlib import Path

from medlvr.errors import MedlvrError, not_a_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.pt",
    "model.pth",
    "model.ckpt",
)


def check_weights(path: str | Path, *, allow_pickle: bool = False) -> bool:
    """Raise a `MedlvrError` unless `path` holds readable weights; True when they are safetensors.

    Every `*.safetensors` file of the folder must open (its header fits the file), and the
    shards a `model.safetensors.index.json` lists must all be there. Without safetensors
    weights, pickle weights load only with `allow_pickle`.
    """
    path = Path(path)
    from safetensors import SafetensorError, safe_open

    for f in sorted(path.glob("*.safetensors")):
        if not f.is_file():  # e.g. a link to a character device: not "empty"
            raise MedlvrError(not_a_file(f, "weights"))
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            size = f.stat().st_size
            what = (
                "empty"
                if size == 0
                else f"damaged ({size:,} bytes, truncated or not safetensors: {err})"
            )
            raise MedlvrError(f"{f} is {what}; copy or export the model again") from None
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise MedlvrError(
                f"{index} is not a safetensors index ({type(err).__name__}: {err})"
            ) from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise MedlvrError(
                f"{path} lacks {len(missing)} weight shard(s) listed in {SAFETENSORS_INDEX}, e.g. {missing[0]}"
            )
        return True
    if (path / "model.safetensors").is_file():
        return True
    pickled = [name for name in PICKLE_WEIGHTS if (path / name).is_file()]
    if not pickled:
        raise MedlvrError(f"{path} has no model weights (model.safetensors)")
    if not allow_pickle:
        raise MedlvrError(
            f"{path} holds pickle weights only ({pickled[0]}): loading them runs code stored in the file; "
            "convert them to safetensors, or pass --allow-pickle (model.allow_pickle=true) if you trust them"
        )
    return False


__all__ = ["check_weights", "PICKLE_WEIGHTS"]
