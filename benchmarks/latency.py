"""Latency of the latent segment against the backbone's own `generate` and a written chain of thought.

    .venv/bin/python benchmarks/latency.py [--sizes tiny,medium] [--batches 1,8] [--answer-tokens 16] [--repeats 5]

For each model size and batch size, the median wall time of:
- `generate`: the backbone's own `generate` for N answer tokens (greedy);
- `K=0`, `K=4`, `K=8`: `LatentVLM.generate` with K latent steps, then N answer tokens;
- `CoT-128`: 128 written reasoning tokens before the N answer tokens (K=0, 128+N tokens).
Stop tokens are banned for the N (or 128+N) steps so every run decodes the same length.
Targets (issue 2): K=0 within 1.10x of `generate`; one latent step costs no more than one
decode step; K=8 at least 5x faster than 128-token text reasoning.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from medlvr.config import LatentConfig
from medlvr.data.collate import VQACollator
from medlvr.data.schema import VQASample
from medlvr.model.latent import LatentVLM
from medlvr.model.tiny import build_tiny


def _batch(vlm: LatentVLM, n: int) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    samples, images = [], []
    for i in range(n):
        samples.append(
            VQASample(
                id=f"q{i}",
                dataset="bench",
                split="test",
                images=["x"],
                answer="round",
                answer_type="open",
                question="What is the shape of the lesion in the upper left region?",
            )
        )
        images.append([Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))])
    return VQACollator(vlm.processor, vlm.adapter, with_answers=False, with_rois=False)(
        samples, images=images
    )


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(sizes: list[str], batches: list[int], n_tokens: int, repeats: int) -> list[dict]:
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            vlm = LatentVLM.from_pretrained(
                build_tiny(tmp, size=size), LatentConfig(steps=0, projector="norm")
            )
        for bs in batches:
            batch = _batch(vlm, bs)
            keys = (
                "input_ids",
                "attention_mask",
                "pixel_values",
                "image_grid_thw",
                "mm_token_type_ids",
            )
            hf_inputs = {k: batch[k] for k in keys}

            # Both timers are called within this iteration: binding the loop's values is right.
            def hf():
                with torch.no_grad():
                    vlm.backbone.generate(  # noqa: B023
                        **hf_inputs,  # noqa: B023
                        max_new_tokens=n_tokens,
                        min_new_tokens=n_tokens,
                        do_sample=False,
                    )

            def latent(k: int, extra: int = 0):
                return lambda: vlm.generate(  # noqa: B023
                    batch,  # noqa: B023
                    k,
                    max_new_tokens=n_tokens + extra,
                    min_new_tokens=n_tokens + extra,
                )

            row = {"size": size, "batch": bs, "generate": _median(hf, repeats)}
            for k in (0, 4, 8):
                row[f"K={k}"] = _median(latent(k), repeats)
            row["CoT-128"] = _median(latent(0, 128), repeats)
            # Per-step costs from the loop's own phase timings (median of a few runs).
            phases = [
                vlm.generate(batch, 8, max_new_tokens=n_tokens, min_new_tokens=n_tokens).timings
                for _ in range(repeats)
            ]
            row["latent_step"] = (
                statistics.median(p["latent_s"] for p in phases) / 9
            )  # 8 latents + <|latent_end|>
            row["decode_step"] = statistics.median(p["decode_s"] for p in phases) / max(
                n_tokens - 1, 1
            )
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = run(
        args.sizes.split(","),
        [int(b) for b in args.batches.split(",")],
        args.answer_tokens,
        args.repeats,
    )

    table = Table(
        title=f"Median latency (ms), {args.answer_tokens} answer tokens, {args.threads} threads"
    )
    cols = [
        "size",
        "batch",
        "generate",
        "K=0",
        "K=4",
        "K=8",
        "CoT-128",
        "K=0/generate",
        "latent/decode step",
        "CoT-128/K=8",
    ]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(
            r["size"],
            str(r["batch"]),
            *(f"{r[c] * 1000:.1f}" for c in ("generate", "K=0", "K=4", "K=8", "CoT-128")),
            f"{r['K=0'] / r['generate']:.2f}x",
            f"{r['latent_step'] / r['decode_step']:.2f}x",
            f"{r['CoT-128'] / r['K=8']:.1f}x",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
