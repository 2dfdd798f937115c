"""FSDP2 (`model.sharding=fsdp2`) on 2 processes vs 1 process: step time and memory per rank.

    python benchmarks/fsdp.py                          # medium model (~24M), global batch 8, ROI-SFT K=4
    python benchmarks/fsdp.py --size tiny --steps 3 --out fsdp.json

Each setting is `medlvr train sft` itself (`run_sft`, the same global batch: 8 on one
process, 4 + 4 on two), launched with torchrun (gloo on CPU, one thread per process). Per
rank it reports the median seconds per optimizer step (after warm-up), the peak resident
set at the last step (before the final checkpoint and export; it includes Python, torch and
the batch's activations), and the bytes of trained state the rank holds, read from its
torch.distributed.checkpoint shard file: trained parameters + AdamW moments (the gradients,
one more parameter-sized share, are not saved). Bytes per parameter = that over the model's
trained parameters: 12 on one process (fp32 4 + 8), 6 per rank on two.

While a step runs, FSDP2 also holds every decoder layer gathered (medlvr.train.sharding:
the latent loop's KV cache reaches earlier calls in backward), i.e. the language model's
parameters once per rank at their all-gather dtype; the line `gathered` gives that size.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch

    torch.set_num_threads(1)
    from medlvr.config import SFTConfig, load_config
    from medlvr.train.sft import run_sft

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    marks: list[tuple[float, float]] = []  # (time, peak RSS MiB) after each step
    cfg = load_config(SFTConfig, None, [
        f"model.path={args.model}", f"data.train=[{args.data}]", f"output_dir={args.run_dir}", "mode=roi",
        f"latent.steps={args.k}", f"batch_size={args.batch // world}", f"max_steps={args.warmup + args.steps}",
        "model.sharding=fsdp2", "checkpoint.every=0", "log.progress=false", "log.tensorboard=false", "seed=0",
    ])  # fmt: skip
    t0 = time.perf_counter()
    result = run_sft(
        cfg,
        on_step=lambda row: marks.append(
            (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        ),
    )
    times = [b[0] - a[0] for a, b in zip([(t0, 0.0), *marks], marks)][args.warmup :]
    shard = (
        Path(args.run_dir)
        / f"step-{cfg.max_steps:07d}"
        / "sharded"
        / f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"
    )
    vlm = result.model
    trained = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
    layers = vlm.adapter.decoder_layers(vlm.base_model)
    # A DTensor's numel() is the whole parameter's: the size gathered on every rank during a step.
    gathered = sum(p.numel() * p.element_size() for layer in layers for p in layer.parameters())
    row = {"world": world, "rank": rank, "median_s": statistics.median(times), "min_s": min(times),
           "peak_mib": marks[-1][1], "state_bytes": shard.stat().st_size, "trained_params": trained,
           "gathered_bytes": gathered if world > 1 else 0}  # fmt: skip
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium", help="tiny / small / medium (built offline)")
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    ap.add_argument("--k", type=int, default=4, help="latent steps K")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    for hidden in ("--model", "--data", "--run-dir", "--result"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.result:
        worker(args)
        return

    from medlvr.data.synth import SynthConfig, generate
    from medlvr.model.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="fsdp_bench_"))
    model = build_tiny(work / "model", size=args.size)
    paths = generate(SynthConfig(n=max(4 * args.batch, 40), seed=0, level=3), work / "synth")
    rows = []
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = work / f"world{world}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
               __file__, "--model", str(model), "--data", str(paths["train"]), "--run-dir", str(work / f"run{world}"),
               "--result", str(result), "--batch", str(args.batch), "--k", str(args.k), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        rows += [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(world)]
    n = rows[0]["trained_params"]
    print(f"ROI-SFT K={args.k}, {args.size} model ({n / 1e6:.1f}M trained parameters, full fine-tuning, fp32), "
          f"global batch {args.batch}, CPU, 1 thread per process")  # fmt: skip
    print(f"{'processes':<11}{'rank':>5}{'median s/step':>15}{'min s/step':>12}{'peak MiB':>10}"
          f"{'state MiB':>11}{'B/param':>9}{'gathered MiB':>14}")  # fmt: skip
    for r in rows:
        print(f"{r['world']:<11}{r['rank']:>5}{r['median_s']:>15.3f}{r['min_s']:>12.3f}{r['peak_mib']:>10.0f}"
              f"{r['state_bytes'] / 2**20:>11.1f}{r['state_bytes'] / n:>9.2f}{r['gathered_bytes'] / 2**20:>14.1f}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
