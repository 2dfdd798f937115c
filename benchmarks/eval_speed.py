"""Throughput of the evaluation harness: `python benchmarks/eval_speed.py [--n 64] [--sizes tiny,medium]`.

For each tiny model size and batch size (1, 8, 32) runs `medlvr.eval.harness.evaluate`
over `n` synthetic test questions (mode latent, K=`--latent-steps`,
`--max-new-tokens` tokens) and prints questions per second of the generation
loop (image loading, collation, generation, scoring and the per-batch flush to
predictions.jsonl included; model loading and reports excluded), and the
speed-up of each batch size over batch 1. One thread by default, since the
CPU is shared.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=64, help="questions per run")
    parser.add_argument(
        "--sizes", default="tiny,medium", help="tiny model sizes (tiny, small, medium)"
    )
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--latent-steps", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from medlvr.config import LatentConfig
    from medlvr.data.schema import read_jsonl
    from medlvr.data.synth import SynthConfig, generate
    from medlvr.eval.harness import evaluate
    from medlvr.model.latent import LatentVLM
    from medlvr.model.tiny import build_tiny

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = generate(SynthConfig(n=max(4 * args.n, 200), seed=0), tmp / "synth")
        samples = (
            read_jsonl(files["test"]) + read_jsonl(files["val"]) + read_jsonl(files["train"])
        )[: args.n]
        for size in args.sizes.split(","):
            folder = build_tiny(tmp / f"model_{size}", size=size)
            vlm = LatentVLM.from_pretrained(
                folder, LatentConfig(steps=args.latent_steps, projector="linear")
            ).eval()
            n_params = sum(p.numel() for p in vlm.parameters())
            evaluate(
                samples[:4],
                tmp / f"warm_{size}",
                vlm=vlm,
                reasoning="latent",
                batch_size=4,
                max_new_tokens=args.max_new_tokens,
                progress=False,
                report=False,
            )
            for bs in batch_sizes:
                res = evaluate(
                    samples,
                    tmp / f"run_{size}_{bs}",
                    vlm=vlm,
                    reasoning="latent",
                    latent_steps=[args.latent_steps],
                    batch_size=bs,
                    max_new_tokens=args.max_new_tokens,
                    progress=False,
                    report=False,
                )
                results[(size, bs)] = res.samples_per_s
                print(
                    f"{size:<7} ({n_params / 1e6:.1f}M params) batch {bs:>3}: {res.n_new} questions in "
                    f"{res.seconds:.2f} s = {res.samples_per_s:.1f} questions/s",
                    flush=True,
                )

    print(
        f"\nquestions/s, mode latent K={args.latent_steps}, {args.max_new_tokens} new tokens, "
        f"n={args.n}, {args.threads} thread(s)"
    )
    head = (
        "| model | "
        + " | ".join(f"batch {b}" for b in batch_sizes)
        + " | "
        + " | ".join(f"speed-up b{b}" for b in batch_sizes[1:])
        + " |"
    )
    print(head)
    print("|" + "---|" * (1 + 2 * len(batch_sizes) - 1))
    for size in args.sizes.split(","):
        base = results[(size, batch_sizes[0])]
        cells = [f"{results[(size, b)]:.1f}" for b in batch_sizes]
        ups = [f"{results[(size, b)] / base:.2f}x" for b in batch_sizes[1:]]
        print(f"| {size} | " + " | ".join(cells + ups) + " |")


if __name__ == "__main__":
    main()
