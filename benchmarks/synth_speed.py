"""Time the embedded synthetic benchmark: `python benchmarks/synth_speed.py [--n 10000] [--workers 2]`.

Generates `n` question records (plus the stage-0 describe/ground records of the
train images) into a temporary folder and prints samples per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from medlvr.data.synth import SynthConfig, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=None, help="default: up to 2 processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", type=int, default=3)
    args = parser.parse_args()
    cfg = SynthConfig(n=args.n, seed=args.seed, level=args.level)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = generate(cfg, Path(tmp), workers=args.workers)
        seconds = time.perf_counter() - start
        n_describe = sum(1 for _ in paths["describe"].open()) if "describe" in paths else 0
    print(
        f"synth: {args.n} samples (+{n_describe} describe/ground records) in {seconds:.1f} s "
        f"= {args.n / seconds:.0f} samples/s (workers={args.workers or 'auto'})"
    )


if __name__ == "__main__":
    main()
