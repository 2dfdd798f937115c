"""Run folders: nothing lost, nothing silently overwritten (issue 17, items 1-3 and 6).

- Two runs into one folder: the second is refused at once, naming the first (a lock the
  operating system drops with its process, so a killed run leaves none behind).
- A training output_dir that holds a run is refused unless --resume or --overwrite.
- --resume with changed settings: applied and recorded (reported), or refused (named).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medlvr.cli import app
from medlvr.config import SFTConfig, load_config
from medlvr.errors import MedlvrError
from medlvr.rundir import LOCK_FILE, FolderBusy, run_folder
from medlvr.train.sft import run_sft
from tests.conftest import REPO, Killed, kill_at


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small synthetic benchmark (84-px images, 3x3 visual tokens)."""
    from medlvr.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth84")
    generate(
        SynthConfig(
            n=40,
            seed=0,
            image_size=84,
            grid=2,
            level=1,
            large_size=1.0,
            small_size=0.5,
            describe=False,
        ),
        out,
    )
    return out


def sft_cfg(tiny_dir: Path, data: Path, out: Path, *overrides: str) -> SFTConfig:
    return load_config(SFTConfig, None, [
        f"model.path={tiny_dir}", f"data.train=[{data / 'train.jsonl'}]", f"output_dir={out}", "mode=latent",
        "latent.steps=1", "batch_size=2", "max_steps=2", "optim.schedule=constant", "optim.lr=1e-3",
        "log.every=1", "log.progress=false", "log.tensorboard=false", "checkpoint.every=1", *overrides,
    ])  # fmt: skip


def snapshot(folder: Path) -> dict[Path, tuple[int, bytes]]:
    return {
        f: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(folder.rglob("*")) if f.is_file()
    }


class Holder:
    """Another process holding a folder's run lock, as a running `medlvr eval` or `train` would."""

    def __init__(self, folder: Path):
        code = (
            "import sys, time; from medlvr.rundir import run_folder\n"
            "with run_folder(sys.argv[1], '--out'):\n    print('ready', flush=True); time.sleep(600)"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, env=env, text=True
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def holder():
    held: list[Holder] = []

    def make(folder: Path) -> Holder:
        held.append(Holder(folder))
        return held[-1]

    yield make
    for h in held:
        if h.proc.poll() is None:
            h.kill()


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


# ---------------------------------------------------------------------------- item 1: one writer per folder


def test_a_second_eval_into_a_busy_folder_is_refused_naming_the_first(
    tiny_dir, data, tmp_path, holder
):
    out = tmp_path / "R"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--data", str(data / "test.jsonl"), "--limit", "3",
                                   "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    first = holder(out)  # the first run, still writing
    before = snapshot(out)
    line = one_error_line(CliRunner().invoke(app, [
        "eval", "--model", str(tiny_dir), "--data", str(data / "test.jsonl"), "--latent-steps", "2", "--reasoning", "latent",
        "--limit", "2", "--out", str(out)]))  # fmt: skip
    assert (
        f"in use by another run: process {first.proc.pid}" in line
        and "choose another --out" in line
    )
    assert snapshot(out) == before, "the refused run must not touch the folder"
    one_error_line(
        CliRunner().invoke(app, ["eval", "report", str(out)])
    )  # nor may a report rebuild
    first.kill()  # kill -9: the operating system drops the lock with the process
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--data", str(data / "test.jsonl"), "--limit", "3",
                                   "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0 and "0 new rows (3 already done)" in res.output, res.output
    assert not (out / LOCK_FILE).exists()


def test_a_second_training_run_into_a_busy_output_dir_is_refused(tiny_dir, data, tmp_path, holder):
    out = tmp_path / "run"
    first = holder(out)
    with pytest.raises(
        FolderBusy, match=f"process {first.proc.pid} on .* choose another output_dir"
    ):
        run_sft(sft_cfg(tiny_dir, data, out))
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]


def test_the_lock_is_reentrant_in_one_process_and_a_folder_it_created_goes_when_empty(tmp_path):
    out = tmp_path / "new"
    with run_folder(out, "--out"), run_folder(out, "--out"):
        assert (out / LOCK_FILE).is_file()
    assert not out.exists()
    (tmp_path / "a-file").write_text("")
    with (
        pytest.raises(
            MedlvrError, match=r"cannot write the folder of --out .*a-file/x: Not a directory"
        ),
        run_folder(tmp_path / "a-file" / "x", "--out"),
    ):
        pass


# ---------------------------------------------------------------------------- item 2: no silent restart


def test_an_output_dir_holding_a_run_needs_resume_or_overwrite(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_sft(
            sft_cfg(tiny_dir, data, out), on_step=kill_at(1)
        )  # a crashed run: step-0000001, metrics
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(
        MedlvrError,
        match=r"holds a run \(config.yaml, metrics.jsonl, step-0000001\): pass --resume",
    ):
        run_sft(sft_cfg(tiny_dir, data, out))
    assert snapshot(out) == before, "refused: nothing truncated or deleted"

    runner = CliRunner()
    args = ["train", "sft", *[f"{k}={v}" for k, v in (("model.path", tiny_dir), ("output_dir", out))],
            f"data.train=[{data / 'train.jsonl'}]", "mode=latent", "latent.steps=1", "batch_size=2", "max_steps=2",
            "checkpoint.every=1", "log.progress=false", "log.tensorboard=false", "optim.schedule=constant", "optim.lr=1e-3",
            "log.every=1"]  # fmt: skip
    line = one_error_line(runner.invoke(app, args))
    assert "--resume" in line and "--overwrite" in line
    one_error_line(runner.invoke(app, [*args, "--resume", "--overwrite"]))
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and (out / "notes.txt").read_text() == "mine"


def test_a_resume_deletes_the_leftover_of_a_save_cut_short(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_sft(sft_cfg(tiny_dir, data, out), on_step=kill_at(1))
    (out / ".tmp-step-0000002").mkdir()  # what a crash (or a full disk) mid-save leaves
    (out / ".tmp-step-0000002" / "optimizer.safetensors").write_bytes(b"partial")
    result = run_sft(sft_cfg(tiny_dir, data, out, "checkpoint.resume=true"))
    assert result.steps == 2 and not (out / ".tmp-step-0000002").exists()


# ---------------------------------------------------------------------------- item 3: resume with changes


def test_resume_applies_and_records_a_changed_learning_rate(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_sft(sft_cfg(tiny_dir, data, out), on_step=kill_at(1))
    with pytest.warns(
        UserWarning,
        match=r"at step 1 with changed settings, applied .*: latent.steps 1 -> 2, "
        r"optim.lr 0.001 -> 1e-05",
    ):
        result = run_sft(
            sft_cfg(
                tiny_dir, data, out, "checkpoint.resume=true", "optim.lr=1e-5", "latent.steps=2"
            )
        )
    assert [(r["step"], r["lr"], r["latent_steps"]) for r in result.history] == [
        (2, pytest.approx(1e-5), 2)
    ]
    recorded = load_config(SFTConfig, out / "config.yaml")
    assert recorded.optim.lr == pytest.approx(1e-5) and recorded.latent.steps == 2
    assert load_config(SFTConfig, out / "step-0000002" / "config.yaml").optim.lr == pytest.approx(
        1e-5
    )
    assert load_config(SFTConfig, out / "step-0000001" / "config.yaml").optim.lr == pytest.approx(
        1e-3
    )


def test_resume_refuses_a_setting_the_checkpoint_was_made_with(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_sft(sft_cfg(tiny_dir, data, out), on_step=kill_at(1))
    before = snapshot(out)
    with pytest.raises(
        MedlvrError,
        match=r"cannot resume .* with changed settings: latent.projector 'norm' -> 'linear', "
        r"seed 0 -> 1 \(the checkpoint was made with the old values\)",
    ):
        run_sft(
            sft_cfg(
                tiny_dir, data, out, "checkpoint.resume=true", "seed=1", "latent.projector=linear"
            )
        )
    assert snapshot(out) == before


def test_resume_continues_exactly_when_nothing_changed(tiny_dir, data, tmp_path):
    full = run_sft(sft_cfg(tiny_dir, data, tmp_path / "full"))
    with pytest.raises(Killed):
        run_sft(sft_cfg(tiny_dir, data, tmp_path / "cut"), on_step=kill_at(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run_sft(sft_cfg(tiny_dir, data, tmp_path / "cut", "checkpoint.resume=true"))
    assert not [w for w in caught if "changed" in str(w.message)], (
        "no setting changed: nothing to report"
    )
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], abs=1e-6)
    assert resumed.history[-1]["lr"] == full.history[-1]["lr"]


# ---------------------------------------------------------------------------- item 6: the distributed path


def test_a_sharded_engine_save_leaves_no_rng_pickle_and_lists_its_own_files(tiny_dir, tmp_path):
    """FSDP / ZeRO-3 save through accelerate's save_state, which pickles the RNG states beside the
    engine's optimizer state: the RNG pickle goes (ours is safetensors + JSON), the rest is listed."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file

    from medlvr.model.latent import LatentVLM
    from medlvr.train.checkpoint import save_checkpoint
    from medlvr.train.optim import build_optimizer, build_scheduler

    vlm = LatentVLM.from_pretrained(tiny_dir)
    cfg = load_config(SFTConfig, None, [f"model.path={tiny_dir}"])
    optimizer = build_optimizer(vlm.named_parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, 10, cfg.optim)

    class ShardedLike:
        """One process that says FSDP and saves the engine state with accelerate's own save_state."""

        distributed_type, is_main_process, process_index, num_processes = (
            DistributedType.FSDP,
            True,
            0,
            1,
        )
        real = Accelerator(cpu=True)

        def get_state_dict(self, model):
            return model.state_dict()

        def wait_for_everyone(self):
            pass

        def save_state(self, path, safe_serialization):
            self.real.save_state(
                path, safe_serialization=safe_serialization
            )  # writes random_states_0.pkl
            torch.save(
                optimizer.state_dict(), Path(path) / "optimizer.bin"
            )  # as FSDP's full optimizer state

    step = save_checkpoint(ShardedLike(), vlm, vlm, optimizer, scheduler, output_dir=tmp_path, step=1,
                           trainer_state={"samples_seen": 2}, config=cfg, lora=False)  # fmt: skip
    assert not list(step.rglob("*.pkl"))
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["pickle_files"] == ["engine_state/optimizer.bin"]
    assert torch.equal(load_file(step / "rng-rank0.safetensors")["torch"], torch.get_rng_state())


def test_a_launch_whose_processes_did_not_join_one_group_stops(
    tiny_dir, data, tmp_path, monkeypatch
):
    """`accelerate launch` with a GPU config on a machine without GPUs can start N lone processes
    (each rank 0 of a world of one) that would all train into one output_dir."""
    from types import SimpleNamespace

    import accelerate

    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO")
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: alone)
    with pytest.raises(
        MedlvrError,
        match=r"the launcher started 2 processes \(WORLD_SIZE=2\) but accelerate joined 1 "
        r"\(DistributedType.NO\): each would run alone .* --nproc_per_node 2",
    ):
        run_sft(sft_cfg(tiny_dir, data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(accelerate, "PartialState", lambda: alone)
    line = one_error_line(CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--data", str(data / "test.jsonl"),
                                                   "--out", str(tmp_path / "R")]))  # fmt: skip
    assert "WORLD_SIZE=2" in line and not (tmp_path / "R").exists()
