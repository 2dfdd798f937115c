"""The main job: MedLVR end to end on a laptop, reported honestly.

1. Data: the embedded synthetic benchmark (default) or a converted real dataset (VQA-RAD).
2. Four variants fine-tuned from the same stage-0 backbone (`medlvr/assets/stage0`,
   a tiny model pretrained to see the synthetic scans), same budget and seeds:
   (a) direct-answer SFT, K = 0; (b) K latent steps without the ROI loss;
   (c) ROI-SFT; (d) ROI-SFT followed by VLPO.
3. Every variant evaluated with the evaluation harness on the test split and (synthetic)
   the compositional split, by question family and by number of lesions; the latent
   budget swept for (c) and (d); the evidence maps' faithfulness measured.
4. `report.md` with mean and spread over seeds, plots and explanation images.

Settings are chosen on val, never on test; the budget presets only scale sizes and steps.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from medlvr.data.schema import VQASample, read_jsonl, write_jsonl
from medlvr.errors import MedlvrError

Budget = Literal["quick", "default", "full"]
VARIANTS = {
    "a": "direct (K=0)",
    "b": "latent, no ROI",
    "c": "ROI-SFT",
    "d": "ROI-SFT + VLPO",
}


@dataclass(frozen=True)
class BudgetSpec:
    """What a budget preset scales: data size, steps and evaluation size."""

    n: int  # synthetic benchmark size (all splits)
    sft_steps: int
    vlpo_steps: int
    batch_size: int
    eval_test: int  # test questions scored per split (0 = all)
    sweep: tuple[int, ...]  # K values swept for (c) and (d)
    explain_samples: int


BUDGETS: dict[str, BudgetSpec] = {
    "quick": BudgetSpec(n=300, sft_steps=12, vlpo_steps=2, batch_size=8, eval_test=24, sweep=(0, 4), explain_samples=8),
    "default": BudgetSpec(n=3000, sft_steps=130, vlpo_steps=10, batch_size=16, eval_test=300, sweep=(0, 2, 4, 8), explain_samples=64),
    "full": BudgetSpec(n=12000, sft_steps=1000, vlpo_steps=60, batch_size=32, eval_test=0, sweep=(0, 1, 2, 4, 8, 16), explain_samples=300),
}


@dataclass
class DemoConfig:
    """One demo run."""

    out: str = "runs/demo"
    """Output folder: data, runs per variant and seed, report.md, plots."""
    budget: Budget = "default"
    """quick (~2 min, used by a test), default (~10 min on 2 CPU cores), full (longer, better numbers)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Training seeds; every variant trains once per seed (the data are the same for all)."""
    dataset: Literal["synth", "vqa-rad"] = "synth"
    """The embedded synthetic benchmark, or VQA-RAD converted from `data_root`."""
    data_root: str = ""
    """Release folder of a real dataset (VQA-RAD: the folder with `VQA_RAD Dataset Public.json`)."""
    backbone: str = ""
    """Starting model folder (empty = the shipped stage-0 backbone)."""
    latent_steps: int = 4
    """K of variants (b), (c) and (d)."""
    projector: str = "norm"
    """Latent projector of variants (b)-(d) (see `LatentConfig.projector`)."""
    align_weight: float = 0.5
    """lambda of ROI-SFT."""
    align_kind: str = "infonce"
    """Alignment loss of ROI-SFT."""
    lr: float = 5e-4
    freeze_vision: bool = False
    """Freeze the vision tower while fine-tuning the variants (stage 0 taught it to see; the
    GPU recipes keep the pretrained tower frozen too)."""
    data_seed: int = 0
    """Seed of the synthetic benchmark itself."""
    sft_overrides: list[str] = field(default_factory=list)
    """Extra `key=value` overrides for the ROI-SFT run of variant (c) (ablations, e.g. `align.assign=first`)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise MedlvrError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if not self.seeds:
            raise MedlvrError("give at least one seed")
        if self.dataset not in ("synth", "vqa-rad"):
            raise MedlvrError(f"dataset must be synth or vqa-rad, got {self.dataset!r}")
        if self.dataset == "vqa-rad" and not self.data_root:
            raise MedlvrError("--dataset vqa-rad needs --data-root (the release folder)")
        if self.latent_steps < 1:
            raise MedlvrError(f"latent_steps must be >= 1 for the latent variants, got {self.latent_steps}")

    @property
    def spec(self) -> BudgetSpec:
        return BUDGETS[self.budget]


@dataclass
class DemoResult:
    out: Path
    report: Path
    table: list[dict[str, Any]]
    seconds: float


# ---------------------------------------------------------------------------- data


@dataclass
class DemoData:
    train: Path
    val: Path
    tests: dict[str, list[VQASample]]  # split name -> questions scored
    has_rois: bool
    notes: list[str] = field(default_factory=list)


def prepare_data(cfg: DemoConfig, folder: Path) -> DemoData:
    folder.mkdir(parents=True, exist_ok=True)
    spec = cfg.spec
    if cfg.dataset == "synth":
        from medlvr.data.synth import SynthConfig, generate

        files = generate(SynthConfig(n=spec.n, seed=cfg.data_seed, describe=False), folder, progress=cfg.progress)
        tests = {s: _head(read_jsonl(files[s]), spec.eval_test) for s in ("test", "compositional")}
        return DemoData(Path(files["train"]), Path(files["val"]), tests, has_rois=True)

    from medlvr.data.sources import convert

    root = Path(cfg.data_root)
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
        "VQA-RAD has no ROI boxes, so variant (c) trains without the alignment term "
        "(it equals (b) up to seeds) and (d) starts from it."
    ]
    # Real data are always scored on the whole official test split (451 questions), at the trained K only.
    return DemoData(folder / "train.jsonl", folder / "val.jsonl", {"test": test}, False, notes)


def _head(samples: list[VQASample], n: int) -> list[VQASample]:
    return samples[:n] if n else samples


# ---------------------------------------------------------------------------- training


def train_variant(
    cfg: DemoConfig, variant: str, seed: int, backbone: Path, data: DemoData, run_dir: Path, init: Path | None = None
) -> tuple[Path, list[dict[str, Any]]]:
    """Train one variant for one seed; returns the exported model folder and the logged history."""
    from medlvr.config import SFTConfig, VLPOConfig, load_config
    from medlvr.train.sft import run_sft

    spec = cfg.spec
    common = [
        f"seed={seed}",
        f"output_dir={run_dir}",
        f"data.train=[{data.train}]",
        f"data.val={data.val}",
        "data.val_samples=32",
        "log.tensorboard=false",
        f"log.progress={str(cfg.progress).lower()}",
        "log.every=5",
        f"model.freeze_vision={str(cfg.freeze_vision).lower()}",
    ]
    if variant == "d":
        from medlvr.train.vlpo import run_vlpo

        vlpo = load_config(
            VLPOConfig,
            overrides=[
                *common,
                f"model.path={init}",
                f"max_steps={spec.vlpo_steps}",
                f"batch_size={max(2, spec.batch_size // 4)}",
                f"latent.steps={cfg.latent_steps}",
                f"latent.projector={cfg.projector}",
                "optim.lr=1e-4",
                "vlpo.group_size=4",
                "vlpo.max_new_tokens=8",
                "log.val_every=0",
            ],
        )
        result = run_vlpo(vlpo)
        return result.final_model, result.history

    mode = {"a": "plain", "b": "latent", "c": "roi" if data.has_rois else "latent"}[variant]
    k = 0 if variant == "a" else cfg.latent_steps
    sft = load_config(
        SFTConfig,
        overrides=[
            *common,
            f"mode={mode}",
            f"model.path={backbone}",
            f"max_steps={spec.sft_steps}",
            f"batch_size={spec.batch_size}",
            f"latent.steps={k}",
            f"latent.projector={cfg.projector}",
            f"optim.lr={cfg.lr}",
            f"optim.warmup_steps={max(1, spec.sft_steps // 10)}",
            "optim.min_lr_ratio=0.1",
            f"align.kind={cfg.align_kind}",
            f"align.weight={cfg.align_weight if mode == 'roi' else 0.0}",
            *(cfg.sft_overrides if variant == "c" else []),
        ],
    )
    result = run_sft(sft)
    return result.final_model, result.history


# ---------------------------------------------------------------------------- evaluation


def evaluate_variant(
    model_dir: Path, tests: dict[str, list[VQASample]], out: Path, ks: Sequence[int], progress: bool
) -> dict[str, list[dict[str, Any]]]:
    """Harness rows per test split, for every K in `ks`."""
    from medlvr.eval.harness import evaluate
    from medlvr.eval.report import read_predictions
    from medlvr.model.latent import LatentVLM

    vlm = LatentVLM.from_pretrained(model_dir)
    rows: dict[str, list[dict[str, Any]]] = {}
    for split, samples in tests.items():
        run = out / split
        mode = "latent" if any(k > 0 for k in ks) else "direct"
        evaluate(samples, run, vlm=vlm, mode=mode, latent_steps=list(ks), batch_size=32,
                 max_new_tokens=8, progress=progress, title=f"{model_dir.parent.name} on {split}")
        rows[split] = read_predictions(run)
    return rows


def accuracy(rows: list[dict[str, Any]], k: int, key: Callable[[dict[str, Any]], Any] | None = None) -> dict[Any, float]:
    """Accuracy of the rows at latent budget k, overall (key None) or grouped by `key(row)`."""
    groups: dict[Any, list[bool]] = defaultdict(list)
    for r in rows:
        if int(r.get("latent_steps") or 0) == k:
            groups["all" if key is None else key(r)].append(bool(r["correct"]))
    return {g: sum(v) / len(v) for g, v in groups.items() if v}


# ---------------------------------------------------------------------------- the whole run


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Data, four variants per seed, evaluation, explanations, report."""
    import torch

    from medlvr.recipes.stage0 import default_stage0

    torch.set_flush_denormal(True)
    started = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    backbone = Path(cfg.backbone) if cfg.backbone else default_stage0()
    log(f"[1/4] data: {cfg.dataset} ({cfg.budget} budget)")
    data = prepare_data(cfg, out / "data")
    meta = {s.id: s.meta for samples in data.tests.values() for s in samples}

    results: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for seed in cfg.seeds:
        for variant in "abcd":
            run_dir = out / "runs" / f"{variant}_seed{seed}"
            log(f"[2/4] train ({variant}) {VARIANTS[variant]}, seed {seed}")
            init = out / "runs" / f"c_seed{seed}" / "final" if variant == "d" else None
            model, history = train_variant(cfg, variant, seed, backbone, data, run_dir, init)
            log(f"[3/4] evaluate ({variant}) seed {seed}")
            ks = (0,) if variant == "a" else (cfg.latent_steps,)
            if variant in "cd" and data.has_rois:  # the latent-budget sweep (synthetic benchmark)
                ks = tuple(sorted({cfg.latent_steps, *cfg.spec.sweep}))
            rows = evaluate_variant(model, data.tests, run_dir / "eval", ks, cfg.progress)
            results[variant][seed] = {"model": str(model), "rows": rows, "history": history, "ks": ks}

    log("[4/4] explanations and report")
    explain = _explanations(cfg, data, results, out)
    from medlvr.recipes.demo_report import write_demo_report

    report, table = write_demo_report(cfg, data, results, meta, explain, out, time.time() - started)
    return DemoResult(out, report, table, time.time() - started)


def _explanations(cfg: DemoConfig, data: DemoData, results, out: Path) -> dict[str, Any]:
    """Faithfulness of the evidence maps for the latent variants, and a few explanation images."""
    if not data.has_rois:
        return {}
    try:
        from medlvr.explain import explain, explain_metrics
    except ImportError:  # the explanation module is optional for the report
        return {}
    from medlvr.model.latent import LatentVLM

    seed = cfg.seeds[0]
    samples = [s for s in data.tests["test"] if s.rois][: cfg.spec.explain_samples]
    found: dict[str, Any] = {"metrics": {}, "images": []}
    for variant in "bcd":
        vlm = LatentVLM.from_pretrained(results[variant][seed]["model"])
        found["metrics"][variant] = explain_metrics(vlm, samples, cfg.latent_steps, seed=seed)
        if variant == "c":
            from medlvr.data.images import load_image

            for s in samples[:3]:
                ex = explain(vlm, [load_image(p) for p in s.images], s.question, s.options or None,
                             latent_steps=cfg.latent_steps, max_new_tokens=8)
                png, _ = ex.save(out / "explain" / f"{s.id}.png")
                found["images"].append(png)
    return found
