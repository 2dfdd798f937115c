"""The demo's data and its arms: one function trains and scores one arm for one seed.

`run_arm` is what a worker process runs; it returns plain data (paths, histories,
prediction rows) so the runner can gather arms trained in parallel.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medlvr.data.schema import IMAGE_ROOTS_ENV, VQASample, read_jsonl, write_jsonl
from medlvr.recipes.demo_config import WRITTEN_ARMS, ArmResult, DemoConfig, DemoData

if TYPE_CHECKING:
    from medlvr.data.prompts import Reasoning

CONTROLS = ("blank", "question-only")
"""Grounding controls every arm is scored under (`medlvr.eval.controls`): mean-grey images, no image."""

REASONING_TOKENS = 64
"""Answer token limit of the text-reasoning arm (a 3-hop chain written out is ~40 tokens)."""


def demo_synth(cfg: DemoConfig):
    """The demo's synthetic world. Depth: chain questions at depths 1..max_hops. Subtlety: one
    lookup, the intensity of the largest or smallest lesion, at rungs 0..subtlety_rungs-1 of
    `SUBTLETY_RUNGS`. Word answers in both."""
    from medlvr.data.synth import SynthConfig

    common = SynthConfig(
        n=cfg.spec.n, seed=cfg.data_seed, describe=False, splits={"train": 0.8, "val": 0.1, "test": 0.1},
        question_types={"chain": 1.0}, hops=(1, cfg.max_hops),
    )  # fmt: skip
    if cfg.ladder == "subtlety":
        # The intensity of the anchored lesion: the one-lookup question the shipped backbone reads
        # at 0.98 on the easiest rung (named-region questions reach only 0.83-0.88 there, below
        # the ladder's 0.95 floor; docs/results.md).
        return dataclasses.replace(common, hops=(1, 1), subtlety=(0, cfg.subtlety_rungs - 1))
    return common


def prepare_data(cfg: DemoConfig, folder: Path, progress: bool = False) -> DemoData:
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.dataset == "synth":
        from medlvr.data.prompts import written_reasoning
        from medlvr.data.synth import generate

        files = generate(demo_synth(cfg), folder, progress=progress)
        train_reasoning = folder / "train_reasoning.jsonl"
        write_jsonl([written_reasoning(s) for s in read_jsonl(files["train"])], train_reasoning)
        tests: dict[str, list[VQASample]] = {
            cfg.split: _head(read_jsonl(files[cfg.split]), cfg.spec.eval_test)
        }
        return DemoData(Path(files["train"]), Path(files["val"]), tests, True, train_reasoning)

    from medlvr.data.sources import convert

    root = Path(cfg.data_root)
    # The converted files name the release's images: allowed here and in the arms' workers.
    os.environ[IMAGE_ROOTS_ENV] = os.pathsep.join(
        [*filter(None, [os.environ.get(IMAGE_ROOTS_ENV)]), str(root.resolve())]
    )
    train = convert("vqa-rad", root, split="train")
    test = convert("vqa-rad", root, split="test")
    # VQA-RAD has no validation split: a seeded tenth of train, so nothing is tuned on test.
    rng = random.Random(cfg.data_seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    n_val = max(1, len(train) // 10)
    val = [train[i] for i in sorted(order[:n_val])]
    train = [train[i] for i in sorted(order[n_val:])]
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(val, folder / "val.jsonl")
    notes = [
        "VQA-RAD has no ROI boxes, so arm (c) trains without the alignment term "
        "(it equals (b) up to seeds) and (d) starts from it; it has no written reasoning, so no arm (t)."
    ]
    # Real data are scored on the whole official test split (451 questions), or on the held-out tenth.
    scored = {"test": test} if cfg.split == "test" else {"val": val}
    return DemoData(folder / "train.jsonl", folder / "val.jsonl", scored, False, None, notes)


def _head(samples: list[VQASample], n: int) -> list[VQASample]:
    return samples[:n] if n else samples


def train_arm(
    cfg: DemoConfig,
    arm: str,
    seed: int,
    backbone: Path,
    data: DemoData,
    run_dir: Path,
    init: Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Train one arm for one seed; returns the exported model folder and the logged history."""
    from medlvr.config import SFTConfig, VLPOConfig, load_config

    spec = cfg.spec
    common = [
        f"seed={seed}",
        f"output_dir={run_dir}",
        # A rerun trains its arms afresh; `--resume` takes a finished training run as it is
        # (interrupted while being scored, it has its export but no arm_result.json).
        "checkpoint.resume=true" if _trained_alike(cfg, run_dir) else "checkpoint.overwrite=true",
        f"data.val={data.val}",
        "data.val_samples=32",
        "log.tensorboard=false",
        f"log.progress={str(cfg.progress and on_step is None).lower()}",
        "log.every=5",
        f"model.freeze_vision={str(cfg.freeze_vision).lower()}",
        f"latent.projector={cfg.projector}",
    ]
    if arm == "d":
        from medlvr.train.vlpo import run_vlpo

        vlpo = load_config(VLPOConfig, overrides=[
            *common,
            f"data.train=[{data.train}]",
            f"model.path={init}",
            f"max_steps={spec.vlpo_steps}",
            f"batch_size={max(2, spec.batch_size // 4)}",
            f"latent.steps={cfg.latent_steps_of(arm)}",
            "optim.lr=1e-4",
            "vlpo.group_size=4",
            "vlpo.max_new_tokens=8",
            "log.val_every=0",
        ])  # fmt: skip
        result = run_vlpo(vlpo, on_step=on_step)
        return result.final_model, result.history

    from medlvr.train.sft import run_sft

    mode = {
        "a": "plain",
        "t": "plain",
        "p": "latent",
        "b": "latent",
        "c": "roi" if data.has_rois else "latent",
        "e": "latent",
        "r": "roi_direct" if data.has_rois else "plain",
    }[arm]
    train = data.train_reasoning if arm == "t" and data.train_reasoning else data.train
    sft = load_config(SFTConfig, overrides=[
        *common,
        f"data.train=[{train}]",
        f"mode={mode}",
        f"model.path={backbone}",
        f"max_steps={spec.sft_steps}",
        f"batch_size={spec.batch_size}",
        f"latent.steps={cfg.latent_steps_of(arm)}",
        f"latent.input={'pause' if arm == 'p' else 'hidden'}",
        f"optim.lr={cfg.lr}",
        f"optim.warmup_steps={max(1, spec.sft_steps // 10)}",
        "optim.min_lr_ratio=0.1",
        f"align.kind={cfg.align_kind}",
        f"align.weight={cfg.align_weight if mode in ('roi', 'roi_direct') else 0.0}",
        f"align.assign={cfg.align_assign}",
        *([f"data.max_answer_tokens={REASONING_TOKENS}"] if arm in WRITTEN_ARMS else []),
        *(["replace_reasoning=true", f"curriculum=[{','.join(map(str, cfg.curriculum()))}]"] if arm == "e" else []),
        *(cfg.sft_overrides if arm == "c" else []),
    ])  # fmt: skip
    result = run_sft(sft, on_step=on_step)
    return result.final_model, result.history


def evaluate_arm(
    cfg: DemoConfig,
    arm: str,
    model_dir: Path,
    tests: dict[str, list[VQASample]],
    out: Path,
    latent_steps: Sequence[int],
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Harness rows per scored split for every K in `latent_steps`, and the grounding controls (`CONTROLS`) at the arm's K."""
    from medlvr.eval.harness import evaluate
    from medlvr.eval.report import read_predictions
    from medlvr.model.latent import LatentVLM

    vlm = LatentVLM.from_pretrained(model_dir)
    reasoning: Reasoning = "latent" if any(k > 0 for k in latent_steps) else "direct"
    tokens = REASONING_TOKENS if arm in WRITTEN_ARMS else 8
    rows: dict[str, list[dict[str, Any]]] = {}
    for split, samples in tests.items():
        evaluate(samples, out / split, vlm=vlm, reasoning=reasoning, latent_steps=list(latent_steps), batch_size=32,
                 max_new_tokens=tokens, progress=False, report=False)  # fmt: skip
        rows[split] = read_predictions(out / split)
    own = cfg.latent_steps_of(arm)
    evaluate(tests[cfg.split], out / "controls", vlm=vlm, reasoning="latent" if own else "direct", latent_steps=[own], batch_size=32,
             max_new_tokens=tokens, progress=False, report=False, image_control=list(CONTROLS))  # fmt: skip
    return rows, read_predictions(out / "controls")


def arm_latent_steps(cfg: DemoConfig, arm: str, data: DemoData) -> list[int]:
    """K values an arm is scored at: its own, plus the sweep for (c) and (d) on the synthetic benchmark."""
    if arm in "cd" and data.has_rois:
        return sorted({cfg.latent_steps_of(arm), *cfg.spec.sweep})
    return [cfg.latent_steps_of(arm)]


def run_arm(
    cfg: DemoConfig,
    arm: str,
    seed: int,
    backbone: Path,
    data: DemoData,
    out: Path,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> ArmResult:
    """Train and score one arm for one seed (what a worker process runs)."""
    import torch

    torch.set_flush_denormal(True)
    run_dir = out / "runs" / f"{arm}_seed{seed}"
    saved = run_dir / "arm_result.json"
    if cfg.resume and saved.is_file():
        found = json.loads(saved.read_text())
        if found.get("settings") == arm_settings(cfg):
            return ArmResult(**found["result"])
    init = out / "runs" / f"c_seed{seed}" / "final" if arm == "d" else None
    started = time.time()
    model, history = train_arm(cfg, arm, seed, backbone, data, run_dir, init, on_step)
    (run_dir / "arm_settings.json").write_text(json.dumps(arm_settings(cfg)))
    seconds = time.time() - started
    scored = arm_latent_steps(cfg, arm, data)
    rows, controls = evaluate_arm(cfg, arm, Path(model), data.tests, run_dir / "eval", scored)
    result = ArmResult(arm, seed, str(model), history, rows, controls, scored, seconds)
    # Written last, so an interrupted run leaves no result behind; `--resume` reuses it.
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {"settings": arm_settings(cfg), "result": dataclasses.asdict(result)}, default=str
        )
    )
    tmp.replace(saved)
    return result


def _trained_alike(cfg: DemoConfig, run_dir: Path) -> bool:
    """`--resume`: the arm's training run finished under these settings (`arm_settings.json`)."""
    settings = run_dir / "arm_settings.json"
    return (
        cfg.resume
        and (run_dir / "result.json").is_file()
        and settings.is_file()
        and json.loads(settings.read_text()) == arm_settings(cfg)
    )


def arm_settings(cfg: DemoConfig) -> dict[str, Any]:
    """What decides an arm's result: every setting but where it runs and how it is shown."""
    keep = dataclasses.asdict(cfg)
    for name in ("out", "resume", "workers", "progress", "arms", "seeds"):
        keep.pop(name)
    return json.loads(json.dumps(keep))


def accuracy(
    rows: list[dict[str, Any]],
    latent_steps: int,
    key: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[Any, float]:
    """Accuracy of the rows at `latent_steps`, overall (key None) or grouped by `key(row)`."""
    groups: dict[Any, list[bool]] = defaultdict(list)
    for r in rows:
        if int(r.get("latent_steps") or 0) == latent_steps:
            groups["all" if key is None else key(r)].append(bool(r["correct"]))
    return {g: sum(v) / len(v) for g, v in groups.items() if v}
