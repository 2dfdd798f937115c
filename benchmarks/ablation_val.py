"""Settings are chosen on VAL: the demo's arms scored on the synthetic val split, by depth.

    .venv/bin/python benchmarks/ablation_val.py --out runs/val [--arms atpbcde] [--seeds 1,2,3]
        [--budget default] [--backbone DIR] [--max-hops 3] [--latent-steps 6] [key=value ...]

The same runner as `medlvr demo` (two single-threaded arms at a time), with `split=val`,
so nothing is tuned on test; extra `key=value` pairs set `DemoConfig` fields (e.g.
`align_assign=raster`, `lr=1e-3`). Writes `report.md` and `results.json` under `--out`
and prints the accuracy by depth (docs/results.md records what was run and found).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields

# As `medlvr demo` does: transformers' per-load bars off here and in the spawned arm workers.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from medlvr.recipes.demo import DemoConfig, run_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arms", default="atpbcd")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--budget", default="default")
    ap.add_argument("--backbone", default="")
    ap.add_argument("--max-hops", type=int, default=3)
    ap.add_argument("--latent-steps", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("settings", nargs="*", help="DemoConfig key=value")
    args = ap.parse_args()
    types = {f.name: f.type for f in fields(DemoConfig)}
    extra = {}
    for item in args.settings:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"unknown DemoConfig field {key!r}")
        extra[key] = (
            json.loads(value)
            if value[:1] in "[{0123456789-" or value in ("true", "false")
            else value
        )
    cfg = DemoConfig(out=args.out, budget=args.budget, arms=args.arms, seeds=[int(s) for s in args.seeds.split(",")],
                     backbone=args.backbone, max_hops=args.max_hops, latent_steps=args.latent_steps,
                     workers=args.workers, split="val", **extra)  # fmt: skip
    result = run_demo(cfg)
    for r in result.table:
        print(
            f"({r['variant']}) {r['split']:<16} {r['mean']:.3f} ± {r['std']:.3f}  seeds {r['per_seed']}  n={r['n']}"
        )
    print(f"report: {result.report} ({result.seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
