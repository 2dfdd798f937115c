"""Resumable checkpoints and the final export, all safetensors (never pickle), written atomically.

A checkpoint `output_dir/step-0000120/` holds:

- `model/`       full fine-tuning: a `LatentVLM.save_pretrained` folder (weights, tokenizer,
                 processor, projector, pause inputs, latent config): loads in `medlvr predict`, the harness
                 and plain transformers;
  `adapter/`     LoRA: the peft adapter (`adapter_model.safetensors`), the projector (and pause
                 inputs), the processor and latent config (the base model is `model.path` of the config);
- `optimizer.safetensors` + `optimizer.json`: AdamW moments (tensors) and param groups;
- `scheduler.json`, `rng-rank{r}.safetensors` + `rng-rank{r}.json` (torch, CUDA, numpy,
  python), `trainer_state.json` (step, data position, metrics), `config.yaml` (resolved);
- `sharded/`     under `model.sharding=fsdp2`, in place of `model/` (`adapter/`) and `optimizer.*`:
                 each process's shards of the trained parameters and AdamW moments
                 (`medlvr.train.sharding.ShardedState`, safetensors).

Everything is written into `.tmp-step-.../` first and renamed when complete, so a crash
never leaves a half checkpoint that `latest_checkpoint` would pick up (a run that resumes
deletes such leftovers; a write that fails, e.g. on a full disk, stops the run with one line).

The one exception to safetensors: sharded engines (FSDP, DeepSpeed ZeRO-3) keep their
optimizer state in `engine_state/`, written by accelerate in the engine's own format
(`torch.save` or torch.distributed.checkpoint, which pickle), since that state only exists
sharded. Those files are listed in `trainer_state.json` under `pickle_files`, and only
`--resume` of the same run reads them (with torch's restricted `weights_only` loader).
accelerate's RNG pickles (`random_states_*.pkl`) are deleted: the RNG states are in
`rng-rank{r}.*` on every path.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medlvr.config import save_config
from medlvr.errors import MedlvrError

STEP_DIR = re.compile(r"^step-(\d{7})$")
TRAINER_STATE = "trainer_state.json"
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".distcp")


def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"step-{step:07d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of a crashed save are ignored)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in out.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def intact_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files all read (JSON parses, safetensors open), and why
    each newer one was skipped (`step-0000120: <reason>`): a resume continues from there."""
    skipped: list[str] = []
    for folder in reversed(list_checkpoints(output_dir)):
        why = damage(folder)
        if why is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {why}")
    return None, skipped


def damage(folder: Path) -> str | None:
    """Why checkpoint `folder` cannot be resumed (a file that does not read), or None."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.rglob("*")):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix == ".safetensors":
                with safe_open(str(f), "pt"):
                    pass
        except (OSError, ValueError, SafetensorError) as err:
            size = f.stat().st_size if f.is_file() else 0
            return f"{f.relative_to(folder)} is {'empty' if size == 0 else 'damaged'} ({_first_line(err)})"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder`, and the folders themselves, to the disk: the rename that
    publishes a checkpoint then cannot outlive its contents in a power loss."""
    for f in [*folder.rglob("*"), folder]:
        if f.is_dir():
            _fsync_dir(f)
        elif f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform opens folders (Windows)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints; returns what was deleted."""
    old = list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


# ---------------------------------------------------------------------------- optimizer and RNG


def optimizer_to_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (param groups, non-tensor state)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = val
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(
        json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})
    )


def optimizer_from_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    meta = json.loads((folder / "optimizer.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for name, val in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise MedlvrError(
            "the checkpoint's optimizer has different parameter groups: was the config changed?"
        )
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_to_files(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    save_file(tensors, str(folder / f"rng-rank{rank}.safetensors"))
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy MT19937 state of the global generator
    py_state = random.getstate()
    meta = {
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    (folder / f"rng-rank{rank}.json").write_text(json.dumps(meta))


def rng_from_files(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for this rank."""
    f = folder / f"rng-rank{rank}.safetensors"
    if not f.is_file():
        return False
    tensors = load_file(str(f))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    meta = json.loads((folder / f"rng-rank{rank}.json").read_text())
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    return True


# ---------------------------------------------------------------------------- model


def save_model_files(
    vlm: Any, folder: Path, *, lora: bool, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """`model/` (full) or `adapter/` (LoRA) under `folder`; returns it.

    `state_dict` (LatentVLM keys) is the gathered state under FSDP/ZeRO-3, where the
    module's own parameters are shards.
    """
    if lora:
        out = folder / "adapter"
        bb_state = _strip(state_dict, "backbone.") if state_dict is not None else None
        vlm.backbone.save_pretrained(
            str(out), state_dict=bb_state
        ) if bb_state else vlm.backbone.save_pretrained(str(out))
        vlm.processor.save_pretrained(str(out))
        vlm.save_latent_files(out, state_dict)  # projector, pause inputs, latent config
        return out
    out = folder / "model"
    if state_dict is None:
        vlm.save_pretrained(out)
    else:
        vlm.backbone.save_pretrained(str(out), state_dict=_strip(state_dict, "backbone."))
        vlm.processor.save_pretrained(str(out))
        vlm.save_latent_files(out, state_dict)  # projector, pause inputs, latent config
    return out


def _strip(state: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in (state or {}).items() if k.startswith(prefix)}


def load_adapter_files(vlm: Any, folder: Path) -> None:
    """Load a LoRA checkpoint's adapter, projector and pause inputs into a peft-wrapped `vlm`."""
    from peft import set_peft_model_state_dict

    src = folder / "adapter"
    weights = load_file(str(src / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(vlm.backbone, weights)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise MedlvrError(
            f"adapter in {src} does not fit the model (e.g. {bad[0]}): was lora.target_modules changed?"
        )
    vlm.load_latent_files(src)


# ---------------------------------------------------------------------------- whole checkpoints


def save_checkpoint(
    accelerator: Any,
    model: Any,
    vlm: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    output_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    config: Any,
    lora: bool,
    save_optimizer: bool = True,
    keep_last: int | None = None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
    sharded_state: Any = None,
) -> Path:
    """Write checkpoint `step` atomically (every process must call this; the main one writes the model).

    `model` is what `accelerator.prepare` returned, `vlm` the unwrapped `LatentVLM`;
    `extra` maps a file stem to the tensors of a training-only module (e.g. the
    `probe`), written as `<stem>.safetensors` inside the checkpoint. `sharded_state`
    (`medlvr.train.sharding.ShardedState`, under `model.sharding=fsdp2`) writes the trained
    parameters and the optimizer state in place of `model/` (`adapter/`) and `optimizer.*`.
    """
    final = step_dir(output_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    sharded = _sharded(accelerator)
    state_dict = accelerator.get_state_dict(model) if sharded else None  # a collective: all ranks
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _write_errors(f"checkpoint {final}"):
        if sharded_state is not None:  # every process writes its shards
            sharded_state.save(tmp / "sharded")
        if save_optimizer:
            rng_to_files(tmp, accelerator.process_index)
            if sharded:
                accelerator.save_state(str(tmp / "engine_state"), safe_serialization=True)
                (tmp / "engine_state" / f"random_states_{accelerator.process_index}.pkl").unlink(
                    missing_ok=True
                )
                accelerator.wait_for_everyone()  # every rank's RNG pickle is gone before the listing below
        if accelerator.is_main_process:
            if sharded_state is None:
                save_model_files(vlm, tmp, lora=lora, state_dict=state_dict)
            for stem, tensors in (extra or {}).items():
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    tmp / f"{stem}.safetensors",
                )
            if save_optimizer:
                if not sharded and sharded_state is None:
                    optimizer_to_files(optimizer, tmp)
                (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
            save_config(config, tmp / "config.yaml")
            state = {
                **trainer_state,
                "step": step,
                "saved_at": time.time(),
                "world_size": accelerator.num_processes,
            }
            pickled = sorted(
                str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.suffix in PICKLE_SUFFIXES
            )
            if pickled:  # the sharded engines' optimizer state (see the module docstring)
                state["pickle_files"] = pickled
            (tmp / TRAINER_STATE).write_text(
                json.dumps(state, indent=2)
            )  # written last: marks completeness
            _fsync_tree(tmp)  # on the disk before the rename publishes it
            _replace_dir(tmp, final)
            _fsync_dir(final.parent)
            if keep_last:
                prune_checkpoints(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def _write_errors(what: str) -> Iterator[None]:
    """A failed write (a full disk, a quota) as one line: what was being written, and why."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        reason = (
            f"{err.strerror}: {err.filename}"
            if isinstance(err, OSError) and err.strerror and err.filename
            else str(err)
        )
        raise MedlvrError(
            f"could not write {what} ({reason}); the checkpoints before it are complete: "
            "make room and continue with --resume"
        ) from None


def recorded_result(
    output_dir: str | Path, resume_dir: Path | None, total_steps: int
) -> dict[str, Any] | None:
    """`result.json` of a finished run when the checkpoint to resume is its last step, else None.

    Resuming a finished run is then a no-op: no model is loaded and nothing is
    rewritten. Every process decides alike (the files are on the shared output folder).
    """
    import warnings

    done = Path(output_dir) / "result.json"
    if resume_dir is None or not done.is_file():
        return None
    step = int(json.loads((resume_dir / TRAINER_STATE).read_text())["step"])
    result = json.loads(done.read_text())
    if step < total_steps or result.get("steps") != step:
        return None
    if step > total_steps:
        warnings.warn(
            f"the run in {output_dir} finished at step {step}, beyond {total_steps} steps: nothing to do",
            stacklevel=3,
        )
    return result


# ---------------------------------------------------------------------------- starting a run

# What a training run writes into its output_dir (anything else there is the user's and stays);
# a run that has trained (a step logged, a checkpoint, an export) is what a restart would lose.
RUN_FILES = ("final", "result.json", "metrics.jsonl", "config.yaml", "tb")
TRAINED = ("final", "result.json")  # and a metrics.jsonl with a row
LEFTOVERS = re.compile(r"^\.(tmp|old)-(step-\d{7}|final)$")  # a save or an export cut short
# Settings a resumed run cannot take up: the checkpoint's weights, adapters, optimizer groups
# and data position were made under the old values. Every other setting applies from the
# resumed step on (optimizer hyperparameters included: `load_training_state` re-applies them).
FIXED_ON_RESUME = ("mode", "seed", "model.path", "model.finetune", "model.freeze_vision", "model.freeze_merger",
                   "model.freeze_language", "model.sharding", "latent.projector", "latent.input", "lora.", "probe.", "data.train",
                   "data.weights", "data.max_samples")  # fmt: skip
NOT_SETTINGS = (
    "output_dir",
    "checkpoint.resume",
    "checkpoint.overwrite",
)  # where and how, not what, the run trains


TRAIN_WRITES = (*RUN_FILES, "step-*", ".tmp-*", ".old-*")  # no input may be there


def claim_run_dir(cfg: Any, recipe: str | Path | None = None) -> None:
    """`rundir.claim_output` for a training run: `cfg.output_dir` is new, holds a run (see
    `start_or_resume`) or `checkpoint.overwrite` is set, and never holds the model, data or `recipe`."""
    from medlvr.rundir import claim_output

    out, ck = Path(cfg.output_dir), cfg.checkpoint
    if _trained(out, run_files(out)) and not (ck.resume or ck.overwrite):
        return  # start_or_resume refuses it: it holds a run, and --resume or --overwrite says what to do
    data = cfg.data
    inputs = [cfg.model.path, recipe, *data.train, data.val]
    claim_output(cfg.output_dir, "train", overwrite=cfg.checkpoint.overwrite, inputs=inputs,
                 writes=TRAIN_WRITES, own=lambda f: any(n != "config.yaml" for n in run_files(f)),
                 flag="output_dir", overwrite_flag="--overwrite (checkpoint.overwrite=true)")  # fmt: skip


def run_files(output_dir: str | Path) -> list[str]:
    """Names in `output_dir` that a training run wrote (checkpoints, leftovers, metrics, export), sorted."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if STEP_DIR.match(p.name) or LEFTOVERS.match(p.name) or p.name in RUN_FILES
    )


def _trained(output_dir: Path, found: list[str]) -> bool:
    """Whether `found` holds a run that trained (not only the config and empty logs of a start that failed)."""
    logged = "metrics.jsonl" in found and (output_dir / "metrics.jsonl").stat().st_size > 0
    return logged or any(STEP_DIR.match(n) or LEFTOVERS.match(n) or n in TRAINED for n in found)


def start_or_resume(accelerator: Any, cfg: Any) -> Path | None:
    """The checkpoint to continue from (None: start fresh), once `cfg.output_dir` may be used.

    An output_dir that holds a run is refused unless `checkpoint.resume` (continue it) or
    `checkpoint.overwrite` (delete that run's files and start over) says what to do with it.
    A resume compares the settings with the checkpoint's `config.yaml`: a changed setting in
    `FIXED_ON_RESUME` is refused, every other one applies from the resumed step on and is
    listed in a warning (`config.yaml` then records what runs). Every process decides alike;
    the main one deletes.
    """
    import warnings

    out, ck = Path(cfg.output_dir), cfg.checkpoint
    claim_run_dir(cfg)
    found = run_files(out)
    trained = _trained(out, found)
    if trained and not (ck.resume or ck.overwrite):
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise MedlvrError(
            f"{out} holds a run ({shown}): pass --resume (checkpoint.resume=true) to continue it, or "
            "--overwrite (checkpoint.overwrite=true) to delete it and start over"
        )
    resume_dir, skipped = intact_checkpoint(out) if ck.resume else (None, [])
    applied: list[str] = []
    if resume_dir is not None:
        applied, fixed = config_changes(cfg, resume_dir / "config.yaml")
        if fixed:
            raise MedlvrError(
                f"cannot resume {out} with changed settings: {', '.join(fixed)} (the checkpoint was "
                "made with the old values); set them back, or start a new run with --overwrite or another output_dir"
            )
    accelerator.wait_for_everyone()  # every process has looked before the main one deletes
    if accelerator.is_main_process:
        # Overwrite: the old run goes; a resume: the leftovers of a save cut short; a start that never
        # trained left only its config and empty logs, which the new start replaces.
        for name in (
            [n for n in found if LEFTOVERS.match(n)] if trained and not ck.overwrite else found
        ):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for why in skipped:
            warnings.warn(
                f"--resume skips {why}; "
                + (f"resuming from {resume_dir.name}" if resume_dir else "no intact checkpoint"),
                stacklevel=2,
            )
        if ck.resume and resume_dir is None and found:
            warnings.warn(
                f"checkpoint.resume is set but {out} has no complete checkpoint: starting over",
                stacklevel=2,
            )
        if applied:
            step = json.loads((resume_dir / TRAINER_STATE).read_text())["step"]  # type: ignore[operator]
            warnings.warn(
                f"resuming {out} at step {step} with changed settings, applied from there on (config.yaml "
                f"records them): {', '.join(applied)}",
                stacklevel=2,
            )
    accelerator.wait_for_everyone()
    return resume_dir


def config_changes(cfg: Any, saved: Path) -> tuple[list[str], list[str]]:
    """Settings of `cfg` that differ from the config file `saved`: (applied on resume, refused), as `key old -> new`."""
    from omegaconf import OmegaConf

    if not saved.is_file():
        return [], []
    old = _flat(OmegaConf.to_container(OmegaConf.load(saved)))
    new = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    applied: list[str] = []
    fixed: list[str] = []
    for key in sorted(set(old) & set(new)):  # a setting newer than the checkpoint has no old value
        if old[key] == new[key] or key.startswith(NOT_SETTINGS):
            continue
        (fixed if key.startswith(FIXED_ON_RESUME) else applied).append(
            f"{key} {old[key]!r} -> {new[key]!r}"
        )
    return applied, fixed


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_training_state(
    accelerator: Any,
    folder: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sharded_state: Any = None,
) -> dict[str, Any]:
    """Restore optimizer, scheduler and this rank's RNG from `folder`; returns the trainer state.

    The optimizer's moments and the schedule's position come from the checkpoint; its
    hyperparameters (learning rates, betas, eps, weight decay) stay those `optimizer` and
    `scheduler` were built with, so a changed `optim.*` applies from the resumed step on.
    `sharded_state` loads the trained parameters too (see `save_checkpoint`).
    """
    if not (folder / "scheduler.json").is_file():
        raise MedlvrError(
            f"{folder} has no optimizer state (saved with checkpoint.save_optimizer=false): cannot resume exactly"
        )
    built = [
        {k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups
    ]
    if sharded_state is not None:
        sharded_state.load(folder / "sharded")
    elif _sharded(accelerator):
        accelerator.load_state(str(folder / "engine_state"))
    else:
        optimizer_from_files(optimizer, folder)
    sched = json.loads((folder / "scheduler.json").read_text())
    sched["base_lrs"] = [g["initial_lr"] for g in built]
    sched["_last_lr"] = [
        base * f(sched["last_epoch"]) for base, f in zip(sched["base_lrs"], scheduler.lr_lambdas)
    ]
    scheduler.load_state_dict(sched)
    for group, hyper, lr in zip(optimizer.param_groups, built, sched["_last_lr"]):
        group.update(hyper, lr=lr)
    if not rng_from_files(folder, accelerator.process_index):
        import warnings

        warnings.warn(
            f"{folder} has no RNG state for rank {accelerator.process_index}; dropout streams will differ",
            stacklevel=2,
        )
    return json.loads((folder / TRAINER_STATE).read_text())


def resume_training(
    accelerator: Any,
    folder: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    expected: dict[str, int],
    sharded_state: Any = None,
) -> tuple[int, int, dict[str, Any]]:
    """`load_training_state`, then (step, samples seen, last logged metrics).

    Warns when a setting in `expected` differs from the one the checkpoint recorded:
    the resumed run is then not the interrupted run's continuation.
    """
    import warnings

    state = load_training_state(accelerator, folder, optimizer, scheduler, sharded_state)
    if accelerator.is_main_process:
        for key, value in expected.items():
            if key in state and state[key] != value:
                warnings.warn(
                    f"{key} changed from {state[key]} to {value} on resume: the remaining steps sample and "
                    "normalise differently from the interrupted run", stacklevel=3,
                )  # fmt: skip
    return int(state["step"]), int(state["samples_seen"]), dict(state.get("metrics") or {})


def export_final(vlm: Any, out: str | Path, *, lora: bool, merge_lora: bool) -> Path:
    """The final model folder: full weights (LoRA merged) or, with `merge_lora=False`, the adapter only.

    Merging changes `vlm` in place (the adapters are folded into the weights), so call it last.
    """
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _write_errors(f"the final model {out}"):  # the last step's checkpoint is complete
        tmp.mkdir(parents=True)
        if lora and merge_lora:
            vlm.backbone = vlm.backbone.merge_and_unload()
            vlm.save_pretrained(tmp)
        elif lora:
            save_model_files(vlm, tmp, lora=True)
        else:
            vlm.save_pretrained(tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, out)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, replacing an existing `dst` (renames are atomic on one filesystem)."""
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


__all__ = [
    "start_or_resume",
    "claim_run_dir",
    "config_changes",
    "run_files",
    "save_checkpoint",
    "load_training_state",
    "resume_training",
    "export_final",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "load_adapter_files",
    "save_model_files",
    "optimizer_to_files",
    "optimizer_from_files",
]
