"""Train-step cost of plain SFT vs ROI-SFT (K = 4, 8): median step time and peak memory.

    python benchmarks/train_step.py                      # medium model (~25M), batch 8, CPU
    python benchmarks/train_step.py --size tiny --steps 5 --threads 2

Each variant runs in its own process (so peak memory is that variant's alone): a full
optimizer step (forward through the latent chain, CE + InfoNCE alignment, backward,
clip, AdamW), on a fixed batch of synthetic-benchmark samples (168 px, 36 visual
tokens per image). Peak memory: `torch.cuda.max_memory_allocated` on GPU, else the
process's peak resident set (ru_maxrss, which includes the Python runtime and the model).
Target from the issue: ROI-SFT at K = 4 costs at most 1.5x plain SFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = [("plain", 0), ("roi", 4), ("roi", 8)]


def one(args: argparse.Namespace) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from medlvr.config import SFTConfig, load_config
    from medlvr.data.collate import VQACollator
    from medlvr.data.schema import read_jsonl
    from medlvr.train.data import load_image
    from medlvr.train.optim import build_optimizer
    from medlvr.train.sft import _aligned, _losses, build_model

    mode, k = args.mode, args.k
    cfg = load_config(SFTConfig, None, [f"model.path={args.model}", f"mode={mode}", f"latent.steps={max(k, 1)}",
                                        f"data.train=[{args.data}]", "align.kind=infonce"])  # fmt: skip
    torch.manual_seed(0)
    vlm = build_model(cfg, None)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vlm.to(dev)
    opt = build_optimizer(vlm.named_parameters(), cfg.optim)
    samples = read_jsonl(args.data)[: args.batch]
    collate = VQACollator(vlm.processor, vlm.adapter, with_rois=mode == "roi")
    batch = collate(samples, images=[[load_image(p) for p in s.images] for s in samples])
    times = []
    for i in range(args.warmup + args.steps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        aligned = _aligned(batch, vlm.image_token_id, cfg.align.kind) if mode == "roi" else None
        ce, al, _ = _losses(cfg, vlm, vlm, batch, k, aligned)
        loss = ce.mean() + (
            cfg.align.weight * al.sum() / aligned.sum().clamp_min(1) if aligned is not None else 0
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"mode": mode, "K": k, "median_s": statistics.median(times), "min_s": min(times), "peak_mib": peak,
            "device": dev, "params_m": sum(p.numel() for p in vlm.parameters()) / 1e6}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium", help="tiny / small / medium (built offline)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:  # child: one variant
        print(json.dumps(one(args)))
        return

    from medlvr.data.synth import SynthConfig, generate
    from medlvr.model.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="train_step_"))
    model = build_tiny(work / "model", size=args.size)
    paths = generate(
        SynthConfig(
            n=max(4 * args.batch, 40),
            seed=0,
            level=3,
            question_types={"attribute": 1, "relational": 1},
        ),
        work / "synth",
    )
    rows = []
    for mode, k in VARIANTS:
        cmd = [sys.executable, __file__, "--mode", mode, "--k", str(k), "--model", str(model), "--data", str(paths["train"]),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
        out = (
            subprocess.run(cmd, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        rows.append(json.loads(out))
    base = rows[0]["median_s"]
    print(
        f"train step, {args.size} model ({rows[0]['params_m']:.1f}M parameters), batch {args.batch}, {rows[0]['device']}, {args.threads} threads"
    )
    print(f"{'variant':<14}{'median s/step':>14}{'min s/step':>12}{'vs plain':>10}{'peak MiB':>10}")
    for r in rows:
        name = "plain SFT" if r["mode"] == "plain" else f"ROI-SFT K={r['K']}"
        print(
            f"{name:<14}{r['median_s']:>14.3f}{r['min_s']:>12.3f}{r['median_s'] / base:>9.2f}x{r['peak_mib']:>10.0f}"
        )
    k4 = next(r for r in rows if r["K"] == 4)["median_s"] / base
    print(f"target ROI-SFT K=4 <= 1.5x plain: {'met' if k4 <= 1.5 else 'NOT met'} ({k4:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
