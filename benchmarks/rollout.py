"""Rollout throughput: the shared prefix (prefill once per prompt, KV cache repeated G times)
against naive per-sample rollouts (every prompt repeated G times and prefilled G times).

    .venv/bin/python benchmarks/rollout.py [--size medium] [--group 8] [--prompts 2] [--steps 4] [--tokens 16] [--repeats 3]

Both runs sample the same trajectories (same generator, same draw order; see
`medlvr.train.rollout`), with K latent steps and `--tokens` answer tokens (stop tokens
banned so every trajectory has the same length). Reports trajectories per second (median
of `--repeats`), the speed-up, and the time split into prefill, latent steps and decoding
from `LatentVLM.generate`'s own phase timings. Target (issue 6): >= 2x at G = 8 on the
medium model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from medlvr.config import LatentConfig
from medlvr.data.collate import VQACollator
from medlvr.data.schema import VQASample
from medlvr.model.latent import LatentVLM
from medlvr.model.tiny import build_tiny
from medlvr.train.rollout import repeat_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="latent steps K")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        vlm = LatentVLM.from_pretrained(
            build_tiny(tmp, size=args.size), LatentConfig(steps=args.steps, projector="norm")
        )
    rng = np.random.default_rng(0)
    samples = [VQASample(id=f"q{i}", dataset="bench", split="test", images=["x"], answer="yes", answer_type="closed",
                         question="Is there a lesion in the upper left region?") for i in range(args.prompts)]  # fmt: skip
    images = [
        [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))] for _ in samples
    ]
    collate = VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)
    g = args.group
    shared_batch = collate(samples, images=images)
    naive_batch = collate(repeat_rows(samples, g), images=repeat_rows(images, g))

    def run(shared: bool) -> tuple[float, dict[str, float], list]:
        gen = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        out = vlm.generate(
            shared_batch if shared else naive_batch, args.steps, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
            do_sample=True, temperature=1.0, latent_sigma=0.02, group_size=g if shared else 1, generator=gen,
        )  # fmt: skip
        return time.perf_counter() - t, out.timings, out.token_ids

    rows = {}
    for name, shared in (("shared prefix", True), ("per-sample", False)):
        run(shared)  # warm-up
        results = [run(shared) for _ in range(args.repeats)]
        wall = statistics.median(r[0] for r in results)
        split = {
            k: statistics.median(r[1][k] for r in results)
            for k in ("prefill_s", "latent_s", "decode_s")
        }
        rows[name] = (wall, split, results[0][2])
    same = rows["shared prefix"][2] == rows["per-sample"][2]
    n = args.prompts * g
    table = Table(
        title=f"{args.size} model, {args.prompts} prompts x G={g}, K={args.steps}, {args.tokens} tokens, {args.threads} threads"
    )
    for col in ("rollouts", "traj/s", "wall s", "prefill s", "latent s", "decode s"):
        table.add_column(col, justify="right")
    for name, (wall, split, _) in rows.items():
        table.add_row(
            name,
            f"{n / wall:.2f}",
            f"{wall:.3f}",
            f"{split['prefill_s']:.3f}",
            f"{split['latent_s']:.3f}",
            f"{split['decode_s']:.3f}",
        )
    console = Console()
    console.print(table)
    speedup = rows["per-sample"][0] / rows["shared prefix"][0]
    console.print(f"speed-up {speedup:.2f}x (target >= 2x); identical sampled trajectories: {same}")


if __name__ == "__main__":
    main()
