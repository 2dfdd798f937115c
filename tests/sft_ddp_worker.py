"""Worker for the distributed SFT test: `torchrun --nproc_per_node 2 tests/sft_ddp_worker.py OUT overrides...`.

Trains with `run_sft`, then every rank writes its parameters and loss history under OUT.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def main() -> None:
    from safetensors.torch import save_file

    from medlvr.config import SFTConfig, load_config
    from medlvr.train.sft import run_sft

    out = Path(sys.argv[1])
    cfg = load_config(SFTConfig, None, sys.argv[2:])
    result = run_sft(cfg)
    rank = int(os.environ.get("RANK", "0"))
    save_file(
        {n: p.detach().contiguous() for n, p in result.model.named_parameters()},
        str(out / f"params-rank{rank}.safetensors"),
    )
    (out / f"history-rank{rank}.json").write_text(json.dumps(result.history))


if __name__ == "__main__":
    main()
