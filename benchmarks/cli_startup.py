"""Time the command line's start-up: `python benchmarks/cli_startup.py [--runs 10] [--source DIR ...]`.

Each run is a fresh process (`python -m medlvr --help`, `python -m medlvr --version`,
`python -c "import medlvr"`), the wall time of the whole process, as a user waits for it.
`--source DIR` times the medlvr in DIR (put first on PYTHONPATH), e.g. two checkouts to
compare a change: `--source /path/to/main --source .`. Prints the median and the minimum wall time of
`--runs` runs per command (the minimum is the least disturbed by other jobs) and the median
CPU time (user + system), which other jobs on the machine disturb much less.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "medlvr --help": ["-m", "medlvr", "--help"],
    "medlvr --version": ["-m", "medlvr", "--version"],
    "import medlvr": ["-c", "import medlvr"],
}


def timed(args: list[str], env: dict[str, str]) -> tuple[float, float] | None:
    """Wall and CPU seconds of one process running `python ARGS`; None if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # From a neutral folder: `-c` and `-m` put the working directory first on sys.path.
    done = subprocess.run(
        [sys.executable, *args],
        env=env,
        check=False,
        capture_output=True,
        cwd=tempfile.gettempdir(),
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--source", action="append", default=None, help="a checkout (repeatable)")
    args = parser.parse_args()
    sources = args.source or [str(Path(__file__).resolve().parent.parent)]
    for source in sources:
        env = {**os.environ, "PYTHONPATH": str(Path(source).resolve()), "OMP_NUM_THREADS": "1"}
        for name, cmd in COMMANDS.items():
            if timed(cmd, env) is None:  # also warms the file cache
                print(f"{source}: {name:<17} fails (not in this version?)")
                continue
            wall, cpu = zip(*(t for t in (timed(cmd, env) for _ in range(args.runs)) if t))
            print(
                f"{source}: {name:<17} wall median {statistics.median(wall):.3f} s, "
                f"min {min(wall):.3f} s; CPU median {statistics.median(cpu):.3f} s ({args.runs} runs)"
            )


if __name__ == "__main__":
    main()
