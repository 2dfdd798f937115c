"""Worker for the FSDP2 tests: `torchrun --nproc_per_node N tests/fsdp_worker.py sft|vlpo OUT overrides...`.

Trains with `run_sft` / `run_vlpo` (VLPO on top of the shipped recipe tiny/vlpo) under
`model.sharding=fsdp2`, then writes under OUT: the trained parameters gathered from the
shards (`params.safetensors`, main process), every rank's shard sizes and loss history, and
(with `MEDLVR_TEST_ANSWERS=FILE.json`, a list of {image, question}) the sharded model's
answers to them as `medlvr predict` gives them.

`MEDLVR_TEST_MODELS=DIR,DIR,...` trains once per model folder, into OUT/0/, OUT/1/, ...
`MEDLVR_TEST_KILL=STEP:RANK` kills rank RANK with SIGKILL right after optimizer step STEP
(after any checkpoint due at that step): a crash of one process mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
torch.set_flush_denormal(True)  # as tests/conftest.py, so both sides compute alike


def main() -> None:
    stage, out, overrides = sys.argv[1], Path(sys.argv[2]), [*sys.argv[3:], "model.sharding=fsdp2"]
    models = os.environ.get("MEDLVR_TEST_MODELS")
    if models:  # one run per model folder, into OUT/<i>/
        for i, path in enumerate(models.split(",")):
            (out / str(i)).mkdir(exist_ok=True)
            train(
                stage,
                out / str(i),
                [*overrides, f"model.path={path}", f"output_dir={out / str(i) / 'run'}"],
            )
    else:
        train(stage, out, overrides)


def train(stage: str, out: Path, overrides: list[str]) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    from medlvr.config import SFTConfig, VLPOConfig, load_config
    from medlvr.train import sharding

    rank = int(os.environ.get("RANK", "0"))
    kill = os.environ.get("MEDLVR_TEST_KILL")
    hook = None
    if kill:
        at, who = (int(x) for x in kill.split(":"))

        def hook(row: dict) -> None:
            if row["step"] == at and rank == who:
                os.kill(os.getpid(), signal.SIGKILL)

    if stage == "sft":
        from medlvr.train.sft import run_sft

        result = run_sft(load_config(SFTConfig, None, overrides), on_step=hook)
    else:
        from medlvr.train.vlpo import run_vlpo

        recipe = "tiny/vlpo"  # the shipped recipe
        result = run_vlpo(load_config(VLPOConfig, recipe, overrides), on_step=hook)
    vlm = result.model
    local = {
        n: list(p.to_local().shape) if isinstance(p, DTensor) else None
        for n, p in vlm.named_parameters()
    }
    (out / f"shards-rank{rank}.json").write_text(
        json.dumps({"sharded": sharding.is_sharded(vlm), "local": local})
    )
    full = get_model_state_dict(
        vlm, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(out / "params.safetensors"))
    (out / f"history-rank{rank}.json").write_text(json.dumps(result.history))
    questions = os.environ.get("MEDLVR_TEST_ANSWERS")
    if questions:
        (out / f"answers-rank{rank}.json").write_text(json.dumps(answers(vlm, Path(questions))))


def answers(vlm, questions: Path) -> dict:
    """`texts`: the answers `medlvr predict --image IMAGE --question QUESTION --max-new-tokens 8`
    gives; `forced`: 8 tokens forced per question (an untrained model may stop at once), with
    the `latents` fed before them."""
    from medlvr.data.images import load_image
    from medlvr.inference import answer_one
    from medlvr.train import sharding

    vlm.eval()
    got: dict = {"texts": [], "forced": [], "latents": []}
    with torch.no_grad(), sharding.gathered(vlm):
        for q in json.loads(questions.read_text()):
            a = answer_one(vlm, [load_image(q["image"])], q["question"], {}, max_new_tokens=8)
            forced = vlm.generate(a.batch, None, max_new_tokens=8, min_new_tokens=8)
            got["texts"].append(a.text)
            got["forced"].append(forced.token_ids[0])
            got["latents"].append(forced.latents[0].tolist())
    return got


if __name__ == "__main__":
    main()
