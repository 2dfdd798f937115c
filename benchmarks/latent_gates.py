"""The gates of a latent arm on VAL (issue 23): does the producer step, before any accuracy.

    .venv/bin/python benchmarks/latent_gates.py --out runs/gates/f1 --seed 1 [key=value ...]
    .venv/bin/python benchmarks/latent_gates.py --out runs/gates/c --model DIR   # score a trained model

Trains arm (c) of the demo (`medlvr.recipes.demo_arms.train_arm`, the demo's val data and
budget) with extra `SFTConfig` overrides (`key=value`, e.g. `gold_latents=0.75
align.negatives=other_hops align.region_weight=1.0 model.freeze_merger=true`), or takes a trained
`--model`, then measures on val, in the order the gates are read:

1. next-hop pointing with a gold prefix at hops 2 and 3 (`diagnostics.next_hop_pointing`; floor ~0.09);
2. the answer decodable from the last latent state at 2-3 hops (`diagnostics.latent_probes`, fitted
   on `--fit` training questions), and the region of each hop;
3. accuracy by depth with the model's own latents, gold, gold-prefix and shuffled-gold
   (`medlvr eval --latents`).

Writes `gates.json` under `--out` and prints the numbers (docs/results.md records them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="", help="a trained model folder (skips training)")
    ap.add_argument(
        "--fit", type=int, default=1200, help="training questions the probes are fitted on"
    )
    ap.add_argument("--align-weight", type=float, default=0.5)
    ap.add_argument("--freeze-vision", action="store_true")
    ap.add_argument("--sources", default="own,gold,gold-prefix,shuffled-gold")
    ap.add_argument("overrides", nargs="*", help="SFTConfig key=value for the run of (c)")
    args = ap.parse_args()

    import torch

    from medlvr.data.schema import read_jsonl
    from medlvr.eval.diagnostics import latent_diagnostics, n_hops
    from medlvr.eval.harness import evaluate
    from medlvr.eval.report import read_predictions
    from medlvr.model.latent import LatentVLM
    from medlvr.recipes.demo_arms import prepare_data, train_arm
    from medlvr.recipes.demo_config import DemoConfig

    torch.set_flush_denormal(True)
    out = Path(args.out)
    cfg = DemoConfig(out=str(out), split="val", align_weight=args.align_weight,
                     freeze_vision=args.freeze_vision, sft_overrides=list(args.overrides),
                     progress=False, workers=1)  # fmt: skip
    data_dir = out.parent / "data"
    data = prepare_data(cfg, data_dir) if not (data_dir / "val.jsonl").is_file() else None
    train = read_jsonl(data_dir / "train.jsonl")
    val = read_jsonl(data_dir / "val.jsonl")
    result: dict = {"overrides": args.overrides, "seed": args.seed}
    t0 = time.time()
    if args.model:
        model = Path(args.model)
    else:
        from medlvr.recipes.stage0 import default_stage0

        if data is None:
            from medlvr.recipes.demo_config import DemoData

            data = DemoData(data_dir / "train.jsonl", data_dir / "val.jsonl", {"val": val}, True)
        model, history = train_arm(cfg, "c", args.seed, default_stage0(), data, out / "run")
        result["train_minutes"] = (time.time() - t0) / 60
        result["last_row"] = history[-1] if history else None
    vlm = LatentVLM.from_pretrained(model)
    fit = train[: args.fit]  # read_jsonl resolves the image paths
    t1 = time.time()
    result["diagnostics"] = latent_diagnostics(vlm, fit, val, batch_size=32)
    result["diagnostics_minutes"] = (time.time() - t1) / 60
    result["accuracy"] = {}
    for source in args.sources.split(","):
        evaluate(val, out / "eval" / source, vlm=vlm, reasoning="latent", batch_size=32,
                 max_new_tokens=8, progress=False, report=False, latents=source)  # fmt: skip
        rows = read_predictions(out / "eval" / source)
        hops = {s.id: n_hops(s) for s in val}
        by: dict[str, list[bool]] = {}
        for r in rows:
            by.setdefault(str(hops[r["id"]]), []).append(bool(r["correct"]))
        result["accuracy"][source] = {h: sum(v) / len(v) for h, v in sorted(by.items())}
    (out / "gates.json").write_text(json.dumps(result, indent=2) + "\n")
    nh = result["diagnostics"]["next_hop_pointing"]["by_hop"]
    pr = result["diagnostics"]["probes"]
    print("next-hop pointing (gold prefix / own prefix / random / previous hop):")
    for j, v in nh.items():
        print(
            f"  hop {j}: {v['pointing']:.3f} / {v['own_prefix']:.3f} / {v['random']:.3f} / {v['previous_hop']:.3f}  ({v['steps']} steps)"
        )
    print("answer probe from the last latent, by hops:", {h: round(v["accuracy"], 3) for h, v in pr["answer"]["by_hops"].items()},
          "chance", {h: round(v["chance"], 3) for h, v in pr["answer"]["by_hops"].items()})  # fmt: skip
    print(
        "region probe per hop:",
        {j: round(v["accuracy"], 3) for j, v in pr["region"].items() if v["accuracy"] is not None},
    )
    for source, acc in result["accuracy"].items():
        print(f"accuracy ({source}):", {h: round(a, 3) for h, a in acc.items()})


if __name__ == "__main__":
    main()
