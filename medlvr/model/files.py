"""Where a model's files are, and its weight files checked before anything loads them.

A model is named by a folder, by a name the package ships (`stage0`) or by a Hugging Face
Hub id with an optional revision (`Qwen/Qwen2.5-VL-7B-Instruct`, `org/name@v1.0`), which
`model_folder` resolves to a snapshot in huggingface_hub's cache (downloading it unless
`HF_HUB_OFFLINE=1`; the cache is `HF_HUB_CACHE`, by default `$HF_HOME/hub`).

medlvr reads and writes safetensors only: a damaged file (truncated by a copy cut short,
or empty) is reported in one line naming it, and a folder whose weights are pickle only
(`pytorch_model.bin`, as older releases ship them) is refused unless the user allows it
explicitly, since unpickling runs code stored in the file (as `--allow-pickle` does for
the PathVQA release).
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatch
from pathlib import Path

from medlvr.errors import MedlvrError, not_a_file
from medlvr.shipped import MODELS

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.pt",
    "model.pth",
    "model.ckpt",
)

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
"""`org/name` or `org/name@revision` (a branch, tag or commit)."""
OTHER_FORMATS = [
    "*.msgpack",
    "*.h5",
    "*.onnx",
    "*.onnx_data",
    "*.ot",
    "*.gguf",
    "*.tflite",
    "*.mlmodel",
]
"""Weights for other frameworks, never downloaded."""
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle"]
"""Pickle files of a Hub repo (weights, and e.g. `training_args.bin`), fetched only with `allow_pickle`."""


def is_hub_id(ref: str | Path) -> bool:
    """True when `ref` names no local file or folder and reads as `org/name[@revision]`."""
    return not Path(ref).exists() and str(ref) not in MODELS and HUB_ID.match(str(ref)) is not None


def model_folder(
    ref: str | Path, *, allow_pickle: bool = False, setting: str | None = None
) -> Path:
    """The local folder holding model `ref`: a folder, a shipped name (`stage0`) or a Hub id.

    A folder of that name wins over a shipped name and a Hub id. A Hub snapshot is fetched
    without pickle weights (and without other frameworks' weights); pickle weights are
    fetched only with `allow_pickle` when the snapshot has no safetensors. The folder's
    weights are checked by `check_weights` when the model loads. `setting` names where `ref`
    came from (`model.path`) in the error for a missing folder.
    """
    path = Path(ref)
    if path.is_dir():
        return path
    if str(ref) in MODELS:
        return MODELS[str(ref)]
    if not is_hub_id(ref):
        what = f"{setting} is not a folder" if setting else "model folder not found"
        raise MedlvrError(
            f"{what}: {ref} (give a folder, `stage0`, or a Hugging Face Hub id "
            "such as Qwen/Qwen2.5-VL-7B-Instruct or org/name@revision)"
        )
    match = HUB_ID.match(str(ref))
    assert match is not None
    return _hub_snapshot(str(ref), match["repo"], match["revision"], allow_pickle)


def _hub_snapshot(ref: str, repo: str, revision: str | None, allow_pickle: bool) -> Path:
    """The snapshot folder of `repo` at `revision` in huggingface_hub's cache; one-line errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(
            snapshot_download(
                repo, revision=revision, ignore_patterns=[*PICKLE_PATTERNS, *OTHER_FORMATS]
            )
        )
        if not any(folder.glob("*.safetensors")):
            if allow_pickle:
                folder = Path(
                    snapshot_download(repo, revision=revision, allow_patterns=PICKLE_PATTERNS)
                )
            elif pickled := _listed_pickle(repo, revision):  # not fetched: say why
                raise MedlvrError(
                    f"{ref} holds pickle weights only ({pickled}): loading them runs code stored in "
                    "the file; pass --allow-pickle (model.allow_pickle=true) if you trust them"
                )
    except GatedRepoError:
        raise MedlvrError(
            f"{ref} is gated on the Hugging Face Hub: accept its terms on its page, then `hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise MedlvrError(f"{ref}: the Hub has no revision {revision!r} of {repo}") from None
    except RepositoryNotFoundError:
        raise MedlvrError(
            f"model folder not found: {ref}, and no model {repo} on the Hugging Face Hub "
            "(a private one needs `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

        why = "HF_HUB_OFFLINE is set" if HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise MedlvrError(
            f"model folder not found: {ref}; as a Hub id it is not in the cache {HF_HUB_CACHE} and {why}"
        ) from None
    except HfHubHTTPError as err:
        raise MedlvrError(
            f"cannot fetch {ref} from the Hugging Face Hub: {str(err).splitlines()[0]}"
        ) from None
    return folder


def _listed_pickle(repo: str, revision: str | None) -> str | None:
    """A pickle weight file the Hub lists in `repo` (None offline, or if the Hub cannot be asked)."""
    import huggingface_hub
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import HfHubHTTPError

    if HF_HUB_OFFLINE:
        return None
    try:
        names = huggingface_hub.list_repo_files(repo, revision=revision)
    except (OSError, HfHubHTTPError):
        return None
    weights = (
        n for n in names if Path(n).name in PICKLE_WEIGHTS or fnmatch(n, "*pytorch_model-*.bin")
    )
    return next(weights, None)


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


__all__ = ["check_weights", "model_folder", "is_hub_id", "PICKLE_WEIGHTS"]
