"""Worker for the distributed VLPO test: `torchrun --nproc_per_node 2 tests/vlpo_ddp_worker.py OUT overrides...`.

Trains with `run_vlpo` (overrides on top of the shipped recipe tiny/vlpo), then every rank
writes its parameters and logged rows under OUT.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
torch.set_flush_denormal(True)  # as tests/conftest.py, so both sides compute alike


def main() -> None:
    from safetensors.torch import save_file

    from medlvr.config import VLPOConfig, load_config
    from medlvr.train.vlpo import run_vlpo

    out = Path(sys.argv[1])
    result = run_vlpo(load_config(VLPOConfig, "tiny/vlpo", sys.argv[2:]))
    rank = int(os.environ.get("RANK", "0"))
    save_file(
        {n: p.detach().contiguous() for n, p in result.model.named_parameters()},
        str(out / f"params-rank{rank}.safetensors"),
    )
    (out / f"history-rank{rank}.json").write_text(json.dumps(result.history))


if __name__ == "__main__":
    main()
