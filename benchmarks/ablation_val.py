"""Which ROI-SFT settings help? Variants of (c) against (a), scored on the synthetic VAL split only.

    .venv/bin/python benchmarks/ablation_val.py [--seeds 1] [--budget default] [--out runs/ablation]

Every run fine-tunes the shipped stage-0 backbone with the demo's budget; only val
questions are scored, so nothing here is tuned on test (docs/results.md reports the
outcome). Prints one table: accuracy on val overall and on the relational family.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from medlvr.data.schema import read_jsonl
from medlvr.recipes.demo import DemoConfig, accuracy, evaluate_variant, prepare_data, train_variant
from medlvr.recipes.stage0 import default_stage0

SETTINGS = {
    "(a) direct": ("a", {}),
    "(b) latent, no ROI": ("b", {}),
    "(c) ROI-SFT default (norm, InfoNCE, lambda 0.5, K 4)": ("c", {}),
    "(c) projector none": ("c", {"projector": "none"}),
    "(c) projector linear": ("c", {"projector": "linear"}),
    "(c) lambda 2.0": ("c", {"align_weight": 2.0}),
    "(c) align first latent only": ("c", {"sft_overrides": ["align.assign=first"]}),
    "(c) teacher-forced latents": ("c", {"sft_overrides": ["mode=teacher_forced"]}),
    "(c) K 2": ("c", {"latent_steps": 2}),
    "(c) cosine alignment": ("c", {"align_kind": "cosine"}),
    "(a) direct, vision frozen": ("a", {"freeze_vision": True}),
    "(c) ROI-SFT, vision frozen": ("c", {"freeze_vision": True}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--budget", default="default")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--only", default="", help="comma-separated setting numbers (0-based) to run")
    ap.add_argument("--backbone", default="", help="starting model folder (default: the shipped stage-0 backbone)")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    out = Path(args.out)
    base = DemoConfig(out=str(out), budget=args.budget, seeds=[int(s) for s in args.seeds.split(",")], progress=False)
    data = prepare_data(base, out / "data")
    val = read_jsonl(data.val)[: base.spec.eval_test or None]
    chosen = [list(SETTINGS)[int(i)] for i in args.only.split(",")] if args.only else list(SETTINGS)
    results = {}
    for name in chosen:
        variant, changes = SETTINGS[name]
        cfg = DemoConfig(**{**base.__dict__, **changes})
        accs, rel = [], []
        by_family: dict[str, list[float]] = {}
        for seed in cfg.seeds:
            run = out / "runs" / f"{list(SETTINGS).index(name)}_seed{seed}"
            model, _ = train_variant(cfg, variant, seed, Path(args.backbone) if args.backbone else default_stage0(), data, run)
            k = 0 if variant == "a" else cfg.latent_steps
            rows = evaluate_variant(model, {"val": val}, run / "eval", (k,), progress=False)["val"]
            accs.append(accuracy(rows, k)["all"])
            families = accuracy(rows, k, lambda r: r.get("question_type"))
            rel.append(families.get("relational", float("nan")))
            for fam, acc in families.items():
                by_family.setdefault(fam, []).append(acc)
        results[name] = {"val": accs, "val_relational": rel, "val_by_family": by_family}
        print(f"{name:<58} val {statistics.fmean(accs):.3f}  relational {statistics.fmean(rel):.3f}  ({accs})", flush=True)
        print("    " + "  ".join(f"{f} {statistics.fmean(v):.2f}" for f, v in sorted(by_family.items())), flush=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
