"""Time the command line's start-up: `python benchmarks/cli_startup.py [--runs 10] [--source DIR ...]`.

Each run is a fresh process (`python -m medlvr --help`, `python -m medlvr --version`,
`python -c "import medlvr"`), the wall time of the whole process, as a user waits for it.
`--source DIR` times the medlvr in DIR (put first on PYTHONPATH), e.g. two checkouts to
compare a change: `--source /path/to/main --source .`. Prints the median and the minimum wall time of
`--runs` runs per command, the checkouts taking turns (the minimum is the least disturbed by other jobs) and the median
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
    envs = {
        s: {**os.environ, "PYTHONPATH": str(Path(s).resolve()), "OMP_NUM_THREADS": "1"}
        for s in sources
    }
    for name, cmd in COMMANDS.items():
        # Also warms the file cache; a command a version lacks is left out.
        runnable = [s for s in sources if timed(cmd, envs[s]) is not None]
        times: dict[str, list[tuple[float, float]]] = {s: [] for s in runnable}
        for _ in range(args.runs):  # the checkouts take turns: the machine's load hits both alike
            for s in runnable:
                measured = timed(cmd, envs[s])
                if measured is not None:
                    times[s].append(measured)
        for s in sources:
            if s not in times:
                print(f"{s}: {name:<17} fails (not in this version?)")
                continue
            wall, cpu = zip(*times[s])
            print(
                f"{s}: {name:<17} wall median {statistics.median(wall):.3f} s, "
                f"min {min(wall):.3f} s; CPU median {statistics.median(cpu):.3f} s ({len(wall)} runs)"
            )


if __name__ == "__main__":
    main()
